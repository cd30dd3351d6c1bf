// AVX-512 with AVX512-BF16: the AVX-512 operations plus vdpbf16ps, which multiplies bf16 pairs and
// accumulates in fp32: twice the work of an fp32 FMA per instruction, and bf16 K/V read without
// widening. Used by the bf16 product mode (Precision::bfloat16, kernel/common.hpp) of prefill and
// decode; Q and the softmax probabilities are rounded to bf16 (relative error <= 2^-8 per element,
// the order of storing K/V in bf16).
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
  static constexpr bool kHasAmx = false;

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

  // ---- Prefill (bf16 products), in the layouts of the fp32 tiles (queries as lanes) ----------
  // Queries and probabilities are kept as bf16 PAIRS: qp[c2 * ldq + i] is the 32-bit word
  // (Q[i][2 c2], Q[i][2 c2 + 1]) and pp[j2 * ldp + i] the word (P[2 j2][i], P[2 j2 + 1][i]). One
  // vdpbf16ps with a broadcast pair of the other operand then adds two products to each query lane:
  //   S[j][i] += Q[i][2c] K[j][2c] + Q[i][2c+1] K[j][2c+1]       (K pair read from K's row)
  //   Ot[c][i] += P[2j][i] V[2j][c] + P[2j+1][i] V[2j+1][c]      (V pair from vp[j][c], below)
  // the same register blocking as the fp32 tiles with half the instructions per product.

  static __m512i bcast_pair(const void* p) {
    std::uint32_t w;
    std::memcpy(&w, p, sizeof w);
    return _mm512_set1_epi32(static_cast<int>(w));
  }

  /// S[j][i] = scale * sum_c K[j][c] Q[i][c] for j < NJ, i < VV * 16; k rows bf16 (stride ldk),
  /// d2 = pairs of dims (the queries' pair rows beyond d hold zeros).
  template <int NJ, int VV>
  static void qk_pairs_tile(const std::uint32_t* qp, std::int64_t ldq, const bf16* k, std::int64_t ldk,
                            std::int64_t d2, float scale, float* s, std::int64_t lds) {
    F acc[static_cast<std::size_t>(NJ)][static_cast<std::size_t>(VV)];
    for (int j = 0; j < NJ; ++j)
      for (int v = 0; v < VV; ++v) acc[j][v] = _mm512_setzero_ps();
    for (std::int64_t c = 0; c < d2; ++c) {
      __m512bh qv[static_cast<std::size_t>(VV)];
      for (int v = 0; v < VV; ++v) qv[v] = as_bh(_mm512_load_si512(qp + c * ldq + v * 16));
      for (int j = 0; j < NJ; ++j) {
        const __m512bh b = as_bh(bcast_pair(k + j * ldk + 2 * c));
        for (int v = 0; v < VV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], qv[v], b);
      }
    }
    const F sc = _mm512_set1_ps(scale);
    for (int j = 0; j < NJ; ++j)
      for (int v = 0; v < VV; ++v) _mm512_store_ps(s + j * lds + v * 16, _mm512_mul_ps(acc[j][v], sc));
  }

  /// Ot[c0 + c][i] += sum_j V[j][c0 + c] P[j][i] for c < NC, i < VV * 16, over np key pairs; vp
  /// holds V as pairs, vp[j2 * ldvp + c] = (V[2 j2][c], V[2 j2 + 1][c]).
  template <int NC, int VV>
  static void pv_pairs_tile(const std::uint32_t* pp, std::int64_t ldp, std::int64_t np,
                            const std::uint32_t* vp, std::int64_t ldvp, std::int64_t c0, float* ot,
                            std::int64_t ldo) {
    F acc[static_cast<std::size_t>(NC)][static_cast<std::size_t>(VV)];
    for (int c = 0; c < NC; ++c)
      for (int v = 0; v < VV; ++v) acc[c][v] = _mm512_load_ps(ot + (c0 + c) * ldo + v * 16);
    for (std::int64_t j = 0; j < np; ++j) {
      __m512bh pv[static_cast<std::size_t>(VV)];
      for (int v = 0; v < VV; ++v) pv[v] = as_bh(_mm512_load_si512(pp + j * ldp + v * 16));
      const std::uint32_t* vr = vp + j * ldvp + c0;
      for (int c = 0; c < NC; ++c) {
        const __m512bh b = as_bh(_mm512_set1_epi32(static_cast<int>(vr[c])));
        for (int v = 0; v < VV; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], pv[v], b);
      }
    }
    for (int c = 0; c < NC; ++c)
      for (int v = 0; v < VV; ++v) _mm512_store_ps(ot + (c0 + c) * ldo + v * 16, acc[c][v]);
  }

  /// e^x as 2^(x log2 e): n = round(t), 2^(t - n) by its degree-6 Taylor polynomial on
  /// [-1/2, 1/2] (relative error < 2e-7), times 2^n by vscalefps (0 below the fp32 range). Five
  /// operations fewer than exp(): the bf16 products' softmax weights are rounded to 8 bits, but
  /// their fp32 sum keeps this accuracy. The absolute error from rounding t, e^x |x| 2^-24, is at
  /// most 2.5e-8. -inf gives NaN: partial blocks use masked_exp_fast.
  static F exp_fast(F x) {
    const F t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const F shift = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const F n = _mm512_sub_ps(_mm512_add_ps(t, shift), shift);
    const F f = _mm512_sub_ps(t, n);
    F y = _mm512_set1_ps(1.5403530393381606e-4f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
  }
  /// exp_fast with 0 for x <= -87 and -inf (masked logits), NaN kept (as masked_exp).
  static F masked_exp_fast(F x) {
    return _mm512_maskz_mov_ps(_mm512_cmpnle_ps_mask(x, _mm512_set1_ps(-87.0f)), exp_fast(x));
  }

  /// dst[i] = (bf16(a[i]), bf16(b[i])) for 16 lanes: two probability rows as one pair row.
  static void store_pairs(std::uint32_t* dst, F a, F b) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512bh ab = _mm512_cvtne2ps_pbh(b, a);  // lanes 0-15: a, 16-31: b
    __m512i x;
    std::memcpy(&x, &ab, sizeof x);
    _mm512_store_si512(dst, _mm512_permutexvar_epi16(idx, x));
  }

  /// dst[c] = (a[c], b[c]) for c < n: two bf16 rows as one pair row (b null: zeros). True when
  /// a value is inf or NaN (exponent all ones).
  static bool interleave_rows(const bf16* a, const bf16* b, std::int64_t n, std::uint32_t* dst) {
    const __m512i exp_mask = _mm512_set1_epi16(0x7F80);
    __mmask32 bad = 0;
    std::int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c)));
      const __m512i hi = b != nullptr
          ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c))), 16)
          : _mm512_setzero_si512();
      const __m512i w = _mm512_or_si512(lo, hi);
      bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(w, exp_mask), exp_mask);
      _mm512_storeu_si512(dst + c, w);
    }
    bool tail_bad = false;
    for (; c < n; ++c) {
      std::uint16_t x, y = 0;
      std::memcpy(&x, a + c, 2);
      if (b != nullptr) std::memcpy(&y, b + c, 2);
      tail_bad = tail_bad || (x & 0x7F80u) == 0x7F80u || (y & 0x7F80u) == 0x7F80u;
      dst[c] = static_cast<std::uint32_t>(x) | (static_cast<std::uint32_t>(y) << 16);
    }
    return bad != 0 || tail_bad;
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

  /// Decode logits: dst[jj * KR + rr] = scale * (q_rr . k_jj) for KJ x KR = 16 (key, row) pairs,
  /// d a multiple of 32, bf16 q rows qb (stride ldq), bf16 key rows kp[jj]. qk_bf16 and the
  /// transpose-reduce of hsum16 in one always-inlined body: the 16 accumulators stay in registers.
  template <int KJ, int KR>
  __attribute__((always_inline)) static inline void qk_bf16_logits(const bf16* const* kp, const bf16* qb,
                                                                   std::int64_t ldq, std::int64_t d,
                                                                   float scale, float* dst) {
    static_assert(KJ * KR == 16, "one 16-lane result");
    F a[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (std::int64_t c = 0; c < d; c += 32) {
      __m512i kv[static_cast<std::size_t>(KJ)];
#pragma GCC unroll 16
      for (int jj = 0; jj < KJ; ++jj) kv[jj] = _mm512_loadu_si512(reinterpret_cast<const void*>(kp[jj] + c));
#pragma GCC unroll 16
      for (int rr = 0; rr < KR; ++rr) {
        const __m512bh qv = as_bh(_mm512_loadu_si512(reinterpret_cast<const void*>(qb + rr * ldq + c)));
#pragma GCC unroll 16
        for (int jj = 0; jj < KJ; ++jj) a[jj * KR + rr] = _mm512_dpbf16_ps(a[jj * KR + rr], qv, as_bh(kv[jj]));
      }
    }
    F b[8], e[4], f[2];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k)
      b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
      e[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k)
      f[k] = _mm512_add_ps(_mm512_shuffle_f32x4(e[2 * k], e[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(e[2 * k], e[2 * k + 1], 0xDD));
    const F sum = _mm512_add_ps(_mm512_shuffle_f32x4(f[0], f[1], 0x88), _mm512_shuffle_f32x4(f[0], f[1], 0xDD));
    _mm512_storeu_ps(dst, _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
  }

  /// Decode probabilities as bf16 pairs: pt[jp * KR + rr] = (bf16(s[2 jp][rr]), bf16(s[2 jp + 1][rr]))
  /// for jp < npairs, from s laid out [key][KR] (nearest even). Converts 32 floats per step: reads
  /// s up to the next multiple of 32 floats past 2 * npairs * KR (the words beyond are not used).
  template <int KR>
  static void pack_p_pairs(const float* s, int npairs, std::uint32_t* pt) {
    // Word w of a step takes lo = element 2 KR (w / KR) + w % KR, hi = the same + KR.
    const __m512i idx = _mm512_set_epi16(
        2 * KR * (15 / KR) + KR + 15 % KR, 2 * KR * (15 / KR) + 15 % KR, 2 * KR * (14 / KR) + KR + 14 % KR,
        2 * KR * (14 / KR) + 14 % KR, 2 * KR * (13 / KR) + KR + 13 % KR, 2 * KR * (13 / KR) + 13 % KR,
        2 * KR * (12 / KR) + KR + 12 % KR, 2 * KR * (12 / KR) + 12 % KR, 2 * KR * (11 / KR) + KR + 11 % KR,
        2 * KR * (11 / KR) + 11 % KR, 2 * KR * (10 / KR) + KR + 10 % KR, 2 * KR * (10 / KR) + 10 % KR,
        2 * KR * (9 / KR) + KR + 9 % KR, 2 * KR * (9 / KR) + 9 % KR, 2 * KR * (8 / KR) + KR + 8 % KR,
        2 * KR * (8 / KR) + 8 % KR, 2 * KR * (7 / KR) + KR + 7 % KR, 2 * KR * (7 / KR) + 7 % KR,
        2 * KR * (6 / KR) + KR + 6 % KR, 2 * KR * (6 / KR) + 6 % KR, 2 * KR * (5 / KR) + KR + 5 % KR,
        2 * KR * (5 / KR) + 5 % KR, 2 * KR * (4 / KR) + KR + 4 % KR, 2 * KR * (4 / KR) + 4 % KR,
        2 * KR * (3 / KR) + KR + 3 % KR, 2 * KR * (3 / KR) + 3 % KR, 2 * KR * (2 / KR) + KR + 2 % KR,
        2 * KR * (2 / KR) + 2 % KR, 2 * KR * (1 / KR) + KR + 1 % KR, 2 * KR * (1 / KR) + 1 % KR,
        KR + 0, 0);
    const int words = npairs * KR;
    for (int w = 0; w < words; w += 16) {
      const __m512bh ab = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 2 * w + 16), _mm512_loadu_ps(s + 2 * w));
      __m512i x;
      std::memcpy(&x, &ab, sizeof x);
      _mm512_storeu_si512(pt + w, _mm512_permutexvar_epi16(idx, x));
    }
  }
};

}  // namespace arch::avx512_bf16
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
SPARSE_ATTN_DIAGNOSTICS_POP
#endif  // SPARSE_ATTN_X86_TARGETS
