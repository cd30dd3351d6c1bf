// Online-softmax state and exact merging of partial attention results.
// A partial result over a key subset K_a is (o_a, lse_a) with o_a = sum_{j in K_a} e^{s_j} v_j /
// sum_{j in K_a} e^{s_j} and lse_a = log sum_{j in K_a} e^{s_j}. For disjoint subsets the union is
// o = w_a o_a + w_b o_b with w_x = e^{lse_x - lse}, lse = log(e^{lse_a} + e^{lse_b}).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <limits>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

/// Merges (o_b, lse_b) into (o_a, lse_a) in place for one row of d values. An empty subset has
/// lse = -inf (its o is ignored); merging two empty subsets leaves o_a = 0, lse_a = -inf.
inline void merge_state(float* o_a, float& lse_a, const float* o_b, float lse_b, index_t d,
                        index_t stride_a = 1, index_t stride_b = 1) {
  if (lse_b == kNegInf) {
    if (lse_a == kNegInf)
      for (index_t c = 0; c < d; ++c) o_a[c * stride_a] = 0.0f;
    return;
  }
  if (lse_a == kNegInf) {
    for (index_t c = 0; c < d; ++c) o_a[c * stride_a] = o_b[c * stride_b];
    lse_a = lse_b;
    return;
  }
  const float m = std::max(lse_a, lse_b);
  const float ea = std::exp(lse_a - m), eb = std::exp(lse_b - m);
  const float inv = 1.0f / (ea + eb);
  const float wa = ea * inv, wb = eb * inv;
  for (index_t c = 0; c < d; ++c) o_a[c * stride_a] = wa * o_a[c * stride_a] + wb * o_b[c * stride_b];
  lse_a = m + std::log(ea + eb);
}

/// Merges whole partial results: (out_a, lse_a) <- merge((out_a, lse_a), (out_b, lse_b)), for
/// attention over two disjoint key subsets of the same queries. Shapes must match.
inline void merge_states(TensorView<float> out_a, LseView lse_a, TensorView<const float> out_b,
                         LseView lse_b) {
  validate_view(out_a, "merge_states: out_a", true);
  validate_view(out_b, "merge_states: out_b");
  require(out_a.heads == out_b.heads && out_a.tokens == out_b.tokens && out_a.dim == out_b.dim,
          "merge_states", "shape mismatch: out_a is ", out_a.heads, "x", out_a.tokens, "x",
          out_a.dim, ", out_b is ", out_b.heads, "x", out_b.tokens, "x", out_b.dim);
  require(bool(lse_a) && bool(lse_b), "merge_states", "both LSE views are required");
#pragma omp parallel for schedule(static)
  for (index_t h = 0; h < out_a.heads; ++h)
    for (index_t i = 0; i < out_a.tokens; ++i)
      merge_state(out_a.row(h, i), lse_a(h, i), out_b.row(h, i), lse_b(h, i), out_a.dim,
                  out_a.stride_dim, out_b.stride_dim);
}

SPARSE_ATTN_NAMESPACE_END
