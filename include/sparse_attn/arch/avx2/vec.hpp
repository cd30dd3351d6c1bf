// AVX2 + FMA + F16C vector operations: 8 fp32 lanes, 16 registers. The operation set every target
// provides is listed in arch/generic/vec.hpp.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/arch/detail/target_region.hpp"

#if SPARSE_ATTN_X86_TARGETS
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/core/dtype.hpp"

SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_TARGET_BEGIN("avx2,fma,f16c,bmi2")
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::avx2 {

struct Vec {
  using F = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kTileVecs = 2;  // prefill micro-tile: 2 x 8 queries x 6 key rows:
  static constexpr int kTileRows = 6;  // 12 accumulators of 16 registers
  static constexpr bool kWidensHalf = true;
  static constexpr bool kHasBf16Pairs = false;
  static constexpr bool kHasRowSoftmax = false;
  static constexpr bool kHasBf16Dot = false;
  static constexpr bool kHasAmx = false;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_store_ps(p, x); }
  static void storeu(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  /// max(a, b), and a where either is NaN.
  static F max(F a, F b) { return _mm256_max_ps(b, a); }
  static F zero_if_neg_inf(F x) {
    return _mm256_and_ps(_mm256_cmp_ps(x, set1(-INFINITY), _CMP_NEQ_UQ), x);
  }
  static float reduce_add(F x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(F x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_min(F x) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
  }

  /// e^x: the same reduction and polynomial as the AVX-512 target (avx512/vec.hpp).
  static F exp(F x) {
    x = _mm256_min_ps(set1(88.3762626647950f), _mm256_max_ps(set1(-88.3762626647949f), x));
    const F n = _mm256_floor_ps(_mm256_fmadd_ps(x, set1(1.44269504088896341f), set1(0.5f)));
    F r = _mm256_fnmadd_ps(n, set1(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    F y = set1(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, set1(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, set1(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, set1(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, set1(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, set1(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, set1(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
  /// e^x, exactly 0 for x <= -87 and -inf; NaN stays NaN.
  static F masked_exp(F x) {
    return _mm256_and_ps(_mm256_cmp_ps(x, set1(-87.0f), _CMP_NLE_UQ), exp(x));
  }

  template <class T>
  static F load_as_float(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, bf16>) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      static_assert(std::is_same_v<T, fp16>, "storage types: float, bf16, fp16");
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }

  /// out[i] = sum of the lanes of a[i], i < 16.
  static void hsum16(const F* a, float* out) {
    for (int h = 0; h < 2; ++h) {  // 8-way transpose-reduce per half
      const F* b = a + 8 * h;
      const F s01 = _mm256_hadd_ps(b[0], b[1]), s23 = _mm256_hadd_ps(b[2], b[3]);
      const F s45 = _mm256_hadd_ps(b[4], b[5]), s67 = _mm256_hadd_ps(b[6], b[7]);
      const F s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
      const F lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
      const F hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
      _mm256_storeu_ps(out + 8 * h, _mm256_add_ps(lo, hi));
    }
  }
};

}  // namespace arch::avx2
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
SPARSE_ATTN_DIAGNOSTICS_POP
#endif  // SPARSE_ATTN_X86_TARGETS
