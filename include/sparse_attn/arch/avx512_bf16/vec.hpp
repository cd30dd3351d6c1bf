// AVX-512 with AVX512-BF16: the AVX-512 operations plus vdpbf16ps, which multiplies bf16 pairs and
// accumulates in fp32: twice the work of an fp32 FMA per instruction, and bf16 K/V read without
// widening. Used by the bf16 product path (DecodeOptions::bf16_dot); Q and the softmax
// probabilities are rounded to bf16 (relative error 2^-9 per element, the order of storing K/V in
// bf16).
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/arch/avx512/vec.hpp"

#if SPARSE_ATTN_X86_TARGETS
SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA ",avx512bf16")
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::avx512_bf16 {

struct Vec : avx512::Vec {
  static constexpr bool kHasBf16Dot = true;

  static __m512bh as_bh(__m512i x) {
    __m512bh r;
    std::memcpy(&r, &x, sizeof r);
    return r;
  }

  /// acc[jj * KR + rr] (lane partial sums) = q_rr . k_jj over d (a multiple of 32), bf16 q rows
  /// qb with stride ldq, bf16 key rows kp[jj].
  template <int KJ, int KR>
  static void qk_bf16(const bf16* const* kp, const bf16* qb, std::int64_t ldq, std::int64_t d,
                      F* acc) {
    for (int i = 0; i < KJ * KR; ++i) acc[i] = _mm512_setzero_ps();
    for (std::int64_t c = 0; c < d; c += 32) {
      __m512i kv[static_cast<std::size_t>(KJ)];
      for (int jj = 0; jj < KJ; ++jj)
        kv[jj] = _mm512_loadu_si512(reinterpret_cast<const void*>(kp[jj] + c));
      for (int rr = 0; rr < KR; ++rr) {
        const __m512bh qv = as_bh(_mm512_loadu_si512(reinterpret_cast<const void*>(qb + rr * ldq + c)));
        for (int jj = 0; jj < KJ; ++jj)
          acc[jj * KR + rr] = _mm512_dpbf16_ps(acc[jj * KR + rr], qv, as_bh(kv[jj]));
      }
    }
  }

  /// o[r] += p[r][j] v_j + p[r][j+1] v_{j+1} for KR rows and NP output packets from dim c0,
  /// accumulated in pair-interleaved dim order (interleave_dim() in arch/detail/layout.hpp); pp[r]
  /// holds the bf16 pair (p[r][j], p[r][j+1]) as one 32-bit word, a and b are v_j and v_{j+1}.
  template <int KR, int NP>
  static void pv_bf16_pair(const bf16* a, const bf16* b, std::int64_t c0, const std::uint32_t* pp,
                           F (*acc)[static_cast<std::size_t>(NP)]) {
    __m512i lohi[static_cast<std::size_t>(NP)];
    for (int x = 0; x < NP; x += 2) {
      const __m512i va = _mm512_loadu_si512(reinterpret_cast<const void*>(a + c0 + x * 16));
      const __m512i vb = _mm512_loadu_si512(reinterpret_cast<const void*>(b + c0 + x * 16));
      lohi[x] = _mm512_unpacklo_epi16(va, vb);
      lohi[x + 1] = _mm512_unpackhi_epi16(va, vb);
    }
    for (int r = 0; r < KR; ++r) {
      const __m512bh p = as_bh(_mm512_set1_epi32(static_cast<int>(pp[r])));
      for (int x = 0; x < NP; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], as_bh(lohi[x]), p);
    }
  }
};

}  // namespace arch::avx512_bf16
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
SPARSE_ATTN_DIAGNOSTICS_POP
#endif  // SPARSE_ATTN_X86_TARGETS
