// AVX-512 vector operations (F, BW, DQ, VL): 16 fp32 lanes, 32 registers, mask registers.
// The operation set every target provides is listed in arch/generic/vec.hpp.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/arch/detail/target_region.hpp"

#if SPARSE_ATTN_X86_TARGETS
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/core/dtype.hpp"

#define SPARSE_ATTN_AVX512_ISA "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2"

SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA)
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::avx512 {

struct Vec {
  using F = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kTileVecs = 4;  // prefill micro-tile: 4 x 16 queries ...
  static constexpr int kTileRows = 6;  // ... x 6 key rows (or output dims): 24 accumulators
  static constexpr bool kWidensHalf = true;   // bf16 / fp16 packets load as fp32
  static constexpr bool kHasBf16Pairs = true;  // load_bf16_pair()
  static constexpr bool kHasRowSoftmax = true;  // online_softmax_rows()
  static constexpr bool kHasBf16Dot = false;
  static constexpr bool kHasAmx = false;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_store_ps(p, x); }
  static void storeu(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
  /// max(a, b), and a where either is NaN (vmaxps returns its second operand on NaN).
  static F max(F a, F b) { return _mm512_max_ps(b, a); }
  /// x where x != -inf, else 0.
  static F zero_if_neg_inf(F x) {
    return _mm512_maskz_mov_ps(_mm512_cmpneq_ps_mask(x, set1(-INFINITY)), x);
  }
  static float reduce_add(F x) { return _mm512_reduce_add_ps(x); }
  static float reduce_max(F x) { return _mm512_reduce_max_ps(x); }
  static float reduce_min(F x) { return _mm512_reduce_min_ps(x); }

  /// e^x for x in [-87.9, 88.37] (clamped outside; results below FLT_MIN flush to 0), relative
  /// error ~2 ulp; NaN stays NaN. Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2 (n rounded
  /// to nearest by the 1.5 * 2^23 shift), a degree-7 polynomial for e^r, then 2^n built in the
  /// exponent field.
  static F exp(F x) {
    x = _mm512_min_ps(set1(88.3762626647950f), _mm512_max_ps(set1(-87.9f), x));
    const F shift = set1(12582912.0f);
    const F n = _mm512_sub_ps(_mm512_fmadd_ps(x, set1(1.44269504088896341f), shift), shift);
    F r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    F y = set1(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, set1(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, set1(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, set1(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, set1(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, set1(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, set1(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  }
  /// e^x with e^x = 0 exactly for x <= -87 and x = -inf (masked logits never leak weight); NaN
  /// stays NaN (a corrupt logit poisons its row instead of vanishing).
  static F masked_exp(F x) {
    return _mm512_maskz_mov_ps(_mm512_cmpnle_ps_mask(x, set1(-87.0f)), exp(x));
  }

  /// kLanes elements of T at p (unaligned) as fp32: exact for bf16 (a shift) and fp16.
  template <class T>
  static F load_as_float(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, bf16>) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      static_assert(std::is_same_v<T, fp16>, "storage types: float, bf16, fp16");
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  /// bf16 rows read as "pair packets": packet x covers the 32-element chunk x / 2 and holds its
  /// even (x even) or odd (x odd) elements, widened exactly by one shift or one mask of the raw
  /// 32-bit lanes (no cross-lane shuffle). pair_dim() (arch/detail/layout.hpp) maps lanes back.
  static F load_bf16_pair(const bf16* row, std::int64_t x) {
    const __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(row + (x >> 1) * 32));
    return (x & 1) ? _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))
                   : _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  }

  /// out[i] = sum of the lanes of a[i], i < 16: a 16-way transpose-reduce (15 shuffles + adds
  /// instead of 16 horizontal sums).
  static void hsum16(const F* a, float* out) {
    F b[8], c[4], d[2];
    for (int k = 0; k < 8; ++k)
      b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]),
                           _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 4; ++k) {
      const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
      c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int k = 0; k < 2; ++k)
      d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                                        _mm512_shuffle_f32x4(d[0], d[1], 0xDD)));
  }

  /// Online-softmax update of KR rows (KR = 1, 2, 4) over a block laid out [key][KR] (lane i of
  /// packet k holds row i % KR), np packets long. For each row r with running max m[r] and sum
  /// l[r]: m_new = max(m, max_j s_j); s_j <- e^{s_j - m_new}; l <- l e^{m - m_new} + sum_j s_j;
  /// alpha[r] = e^{m - m_new} (the factor the caller applies to the row's accumulator). A row whose
  /// logits are all -inf so far keeps m = -inf and uses 0 in place of m_new. A NaN logit is not a
  /// masked one: it poisons its row through l. False when every row is still all-masked.
  template <int KR>
  static bool online_softmax_rows(float* sg, int np, float* m, float* l, float* alpha) {
    F mx = set1(-INFINITY);
    __mmask16 nan = 0;
    for (int i = 0; i < np; ++i) {
      const F x = _mm512_loadu_ps(sg + 16 * i);
      mx = _mm512_max_ps(x, mx);  // NaN x: keeps mx, so m stays a number
      nan = static_cast<__mmask16>(nan | _mm512_cmpunord_ps_mask(x, x));
    }
    mx = reduce_rows<KR, true>(mx);
    const F m_old = load_rows<KR>(m);
    const F m_new = _mm512_max_ps(m_old, mx);
    const __mmask16 live = _mm512_cmpneq_ps_mask(m_new, set1(-INFINITY));
    if (live == 0 && nan == 0) return false;
    const F m_use = _mm512_maskz_mov_ps(live, m_new);
    const F a = masked_exp(_mm512_sub_ps(m_old, m_use));
    F sum = zero();
    for (int i = 0; i < np; ++i) {
      const F e = masked_exp(_mm512_sub_ps(_mm512_loadu_ps(sg + 16 * i), m_use));
      _mm512_storeu_ps(sg + 16 * i, e);
      sum = _mm512_add_ps(sum, e);
    }
    sum = reduce_rows<KR, false>(sum);
    alignas(64) float mn[16], sm[16], al[16];
    _mm512_store_ps(mn, m_new);
    _mm512_store_ps(sm, sum);
    _mm512_store_ps(al, a);
    for (int rr = 0; rr < KR; ++rr) {
      m[rr] = mn[rr];
      l[rr] = l[rr] * al[rr] + sm[rr];
      alpha[rr] = al[rr];
    }
    return true;
  }

 private:
  // Per-row max (Max) or sum over a packet laid out [key][KR rows]: every lane i gets the
  // reduction over the lanes of row i % KR.
  template <bool Max>
  static F op(F a, F b) { return Max ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b); }
  template <int KR, bool Max>
  static F reduce_rows(F x) {
    x = op<Max>(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // swap 256-bit halves
    x = op<Max>(x, _mm512_shuffle_f32x4(x, x, 0xB1));  // swap adjacent 128-bit lanes
    if constexpr (KR <= 2) x = op<Max>(x, _mm512_permute_ps(x, 0x4E));  // swap 64-bit halves
    if constexpr (KR == 1) x = op<Max>(x, _mm512_permute_ps(x, 0xB1));  // swap adjacent floats
    return x;
  }
  // The KR row values at p, repeated over the 16 lanes.
  template <int KR>
  static F load_rows(const float* p) {
    if constexpr (KR == 4) {
      return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
    } else if constexpr (KR == 2) {
      double t;
      std::memcpy(&t, p, sizeof t);
      return _mm512_castpd_ps(_mm512_set1_pd(t));
    } else {
      return _mm512_set1_ps(*p);
    }
  }
};

}  // namespace arch::avx512
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
SPARSE_ATTN_DIAGNOSTICS_POP
#endif  // SPARSE_ATTN_X86_TARGETS
