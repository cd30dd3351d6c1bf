/// @file
/// dist::TokenRange: a half-open range of global token positions, the unit in which the dist/
/// layer says which tokens a rank holds (a decode shard, a prefill chunk).
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace dist {

/// A half-open range of global token positions [begin, end). A plain value.
struct TokenRange {
  index_t begin = 0;  ///< First global position.
  index_t end = 0;    ///< One past the last global position.
  /// @return end - begin (0 for an empty range).
  index_t size() const { return end - begin; }
};

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
