/// @file
/// Storage types and their conversion to fp32. K/V may be stored as float, bf16 or fp16; every
/// kernel accumulates in fp32 and converts rows on load.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/diagnostics.hpp"
// Eigen first: its AVX-512 pexp trips GCC PR 105593 when emitted out of line (see diagnostics.hpp).
SPARSE_ATTN_DIAGNOSTICS_PUSH
#include <Eigen/Core>
SPARSE_ATTN_DIAGNOSTICS_POP
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>


SPARSE_ATTN_NAMESPACE_BEGIN

/// bfloat16 storage (8-bit exponent, 7-bit mantissa): Eigen's type, 2 bytes.
using bf16 = Eigen::bfloat16;
/// IEEE binary16 storage: Eigen's type, 2 bytes.
using fp16 = Eigen::half;

/// True for the element types views may hold: float, bf16, fp16 (without const).
template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

/// A storage type as a value (plans record the element types they were made for).
enum class DType {
  float32,   ///< float
  bfloat16,  ///< bf16
  float16    ///< fp16
};

/// The DType of a storage type (const ignored); a static_assert rejects other types.
/// @tparam T float, bf16 or fp16, possibly const.
/// @return its DType.
template <class T>
constexpr DType dtype_of() {
  static_assert(is_storage_type_v<std::remove_const_t<T>>, "storage types: float, bf16, fp16");
  if constexpr (std::is_same_v<std::remove_const_t<T>, bf16>) return DType::bfloat16;
  else if constexpr (std::is_same_v<std::remove_const_t<T>, fp16>) return DType::float16;
  else return DType::float32;
}

/// Short name of a storage type for messages and reports.
/// @param t the type.
/// @return "fp32", "bf16" or "fp16" ("unknown" for a value outside the enum); a static string.
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::float32: return "fp32";
    case DType::bfloat16: return "bf16";
    case DType::float16: return "fp16";
  }
  return "unknown";
}

/// Short name of a storage type given as a template argument (const is not stripped).
/// @tparam T the type.
/// @return "fp32", "bf16", "fp16" or "unknown"; a static string.
template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  else if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else if constexpr (std::is_same_v<T, fp16>) return "fp16";
  else return "unknown";
}

/// Widens a stored value to fp32 (exact for bf16 and fp16).
/// @param x the value.
/// @return float(x).
template <class T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

/// Narrows fp32 to a storage type, rounding to nearest even for bf16/fp16.
/// @tparam T the storage type.
/// @param x the value.
/// @return T(x).
template <class T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

/// dst[i] = float(src[i * stride]) for i < n (exact). Plain C++ that compilers vectorise for the
/// includer's -march; the kernels' hot loops widen whole packets in arch/ instead.
/// @param src first element of the row.
/// @param stride elements between consecutive values of src (any sign).
/// @param dst n floats, not overlapping src.
/// @param n number of elements; nothing is read when n <= 0.
/// Never throws, allocates nothing.
template <class T>
inline void load_row(const T* src, std::int64_t stride, float* dst, std::int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      if (n > 0) std::memcpy(dst, src, sizeof(float) * static_cast<std::size_t>(n));
      return;
    }
  }
  for (std::int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i * stride]);
}

/// dst[i * stride] = T(src[i]) for i < n (round to nearest even for bf16/fp16).
/// @param src n floats.
/// @param dst first element of the destination row, not overlapping src.
/// @param stride elements between consecutive values of dst.
/// @param n number of elements, >= 0 (the contiguous fp32 path passes n to memcpy unchecked).
/// Never throws, allocates nothing.
template <class T>
inline void store_row(const float* src, T* dst, std::int64_t stride, std::int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      std::memcpy(dst, src, sizeof(float) * static_cast<std::size_t>(n));
      return;
    }
  }
  for (std::int64_t i = 0; i < n; ++i) dst[i * stride] = from_float<T>(src[i]);
}

SPARSE_ATTN_NAMESPACE_END
