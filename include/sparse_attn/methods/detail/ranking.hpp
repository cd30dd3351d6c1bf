// The one ranking order every selection uses (block-sparse, Vertical-Slash, FlexPrefill, Quest,
// SnapKV / Ada-SnapKV, H2O): higher score first, ties toward the lower index, NaN ranks last.
// A strict weak order even with NaN scores (NaN is mapped to -inf), so std::sort / nth_element
// stay well defined on corrupt inputs, and the result is deterministic (no tie depends on the
// sort algorithm).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <limits>

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods::detail {

/// The score a ranking compares: s, or -inf when s is NaN.
inline float rank_key(float s) {
  return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
}

/// "a ranks before b" over indices into `score` (any integer index type: std::int32_t,
/// index_t, ...): rank_key(score[a]) > rank_key(score[b]), ties toward the lower index.
/// Prefixes of a list sorted by it are nested top-k sets.
struct ScoreOrder {
  const float* score;
  template <class I>
  bool operator()(I a, I b) const {
    const float x = rank_key(score[a]), y = rank_key(score[b]);
    return x > y || (x == y && a < b);
  }
};

}  // namespace methods::detail
SPARSE_ATTN_NAMESPACE_END
