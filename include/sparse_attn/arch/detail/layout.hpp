// Index maps of the permuted dim orders some micro-kernels accumulate in (ISA-independent).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cstdint>

SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch {

/// Natural dim of lane i of bf16 pair packet x (16 lanes: the even or odd elements of a 32-element
/// chunk, see load_bf16_pair()).
inline std::int64_t pair_dim(std::int64_t x, std::int64_t i) { return (x >> 1) * 32 + 2 * i + (x & 1); }

/// Natural dim of lane m of output packet x of a pair-interleaved bf16 dot-product P.V (16 lanes,
/// see pv_bf16_pair()).
inline std::int64_t interleave_dim(std::int64_t x, std::int64_t m) {
  return (x >> 1) * 32 + (m >> 2) * 8 + (x & 1) * 4 + (m & 3);
}

}  // namespace arch
SPARSE_ATTN_NAMESPACE_END
