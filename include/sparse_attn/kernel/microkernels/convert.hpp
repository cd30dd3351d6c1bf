// Loading packets of storage types as fp32, and a 16-way transpose-reduce for dot products.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <type_traits>

#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/kernel/microkernels/packet.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kernel::mk {

/// True when packets of T can be loaded and widened to fp32 in registers on this ISA.
template <class T>
inline constexpr bool kPacketLoadable =
    std::is_same_v<T, float>
#if defined(__AVX512F__)
    || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>
#endif
    ;

/// kLanes consecutive elements of T at p (unaligned) as an fp32 packet.
template <class T>
inline Packet load_packet(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Eigen::internal::ploadu<Packet>(p);
  }
#if defined(__AVX512F__)
  else if constexpr (std::is_same_v<T, bf16>) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (std::is_same_v<T, fp16>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
#endif
  else {
    static_assert(kPacketLoadable<T>, "no packet load for this type on this ISA");
    return Packet{};
  }
}

/// bf16 rows read as "pair packets": packet x of a row covers the 32-element chunk x / 2 and
/// holds its even (x even) or odd (x odd) elements, widened exactly to fp32 by one shift or one
/// mask of the raw 32-bit lanes (no cross-lane shuffle). Operands and accumulators that meet
/// such packets use the same permuted dim order; pair_dim() maps it back.
#if defined(__AVX512F__)
inline constexpr bool kHasBf16Pairs = true;
inline Packet load_bf16_pair(const bf16* row, std::int64_t x) {
  const __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(row + (x >> 1) * 32));
  return (x & 1) ? _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))
                 : _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
}
#else
inline constexpr bool kHasBf16Pairs = false;
#endif
/// Natural dim of lane i of pair packet x.
inline std::int64_t pair_dim(std::int64_t x, std::int64_t i) { return (x >> 1) * 32 + 2 * i + (x & 1); }

SPARSE_ATTN_DIAGNOSTICS_PUSH
/// out[i] = sum of the lanes of a[i], i < 16.
inline void hsum16(const Packet* a, float* out) {
#if defined(__AVX512F__)
  __m512 b[8], c[4], d[2];
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
#else
  for (int i = 0; i < 16; ++i) out[i] = Eigen::internal::predux(a[i]);
#endif
}
SPARSE_ATTN_DIAGNOSTICS_POP

}  // namespace kernel::mk
SPARSE_ATTN_NAMESPACE_END
