// AVX512-BF16 micro-kernels for decode over a bf16 cache (DecodeOptions::bf16_dot): the
// vdpbf16ps instruction multiplies bf16 pairs and accumulates in fp32, doing twice the work of an
// fp32 FMA per instruction and reading K/V without any widening. Q and the softmax probabilities
// are rounded to bf16 (relative error 2^-9 per element, the same order as storing K/V in bf16).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cstdint>

#include "sparse_attn/core/dtype.hpp"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SPARSE_ATTN_HAS_BF16_DOT 1
#else
#define SPARSE_ATTN_HAS_BF16_DOT 0
#endif

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kernel::mk {

inline constexpr bool kHasBf16Dot = SPARSE_ATTN_HAS_BF16_DOT != 0;

/// Output packet x of a pair-interleaved P.V product holds, in lane m, this natural dim.
inline std::int64_t interleave_dim(std::int64_t x, std::int64_t m) {
  return (x >> 1) * 32 + (m >> 2) * 8 + (x & 1) * 4 + (m & 3);
}

#if SPARSE_ATTN_HAS_BF16_DOT
inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

/// acc[jj * KR + rr] (lane sums) = q_rr . k_jj over d (a multiple of 32) with bf16 q rows qb.
template <int KJ, int KR>
inline void qk_bf16(const bf16* const* kp, const bf16* qb, std::int64_t ldq, std::int64_t d,
                    __m512* acc) {
  for (int i = 0; i < KJ * KR; ++i) acc[i] = _mm512_setzero_ps();
  for (std::int64_t c = 0; c < d; c += 32) {
    __m512i kv[KJ];
    for (int jj = 0; jj < KJ; ++jj) kv[jj] = _mm512_loadu_si512(reinterpret_cast<const void*>(kp[jj] + c));
    for (int rr = 0; rr < KR; ++rr) {
      const __m512bh qv = as_bh(_mm512_loadu_si512(reinterpret_cast<const void*>(qb + rr * ldq + c)));
      for (int jj = 0; jj < KJ; ++jj) acc[jj * KR + rr] = _mm512_dpbf16_ps(acc[jj * KR + rr], qv, as_bh(kv[jj]));
    }
  }
}

/// o[r] += p[r][j] v_j + p[r][j+1] v_{j+1} for 4 rows, NP output packets from dim c0 (pair
/// interleaved order, see interleave_dim); pp[r] holds the bf16 pair (p[r][j], p[r][j+1]).
template <int NP>
inline void pv_bf16_pair(const bf16* vj, const bf16* vj1, std::int64_t c0, const std::uint32_t* pp,
                         __m512 (*acc)[NP]) {
  __m512i lohi[NP];
  for (int x = 0; x < NP; x += 2) {
    const __m512i a = _mm512_loadu_si512(reinterpret_cast<const void*>(vj + c0 + x * 16));
    const __m512i b = _mm512_loadu_si512(reinterpret_cast<const void*>(vj1 + c0 + x * 16));
    lohi[x] = _mm512_unpacklo_epi16(a, b);
    if (x + 1 < NP) lohi[x + 1] = _mm512_unpackhi_epi16(a, b);
  }
  for (int r = 0; r < 4; ++r) {
    const __m512bh p = as_bh(_mm512_set1_epi32(static_cast<int>(pp[r])));
    for (int x = 0; x < NP; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], as_bh(lohi[x]), p);
  }
}
#endif

}  // namespace kernel::mk
SPARSE_ATTN_NAMESPACE_END
