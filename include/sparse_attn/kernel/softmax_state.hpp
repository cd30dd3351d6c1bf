/// @file
/// The online-softmax state, and exact merging of partial attention results.
///
/// Over a stream of logit blocks of one row, the state keeps m = max of the logits seen and
/// l = sum_j e^{s_j - m}. A new block moves m to m' = max(m, max_j s_j), rescales l (and the row's
/// output accumulator) by alpha = e^{m - m'}, and adds sum_j e^{s_j - m'}; at the end
/// o = acc / l and lse = m + log l. Every kernel follows this rule: the prefill micro-kernel and
/// the decode kernel vectorise it over rows (arch/), the decode chunk merge, eviction scoring and
/// the selections call OnlineSoftmax directly.
/// A partial result over a key subset K_a is (o_a, lse_a) with o_a = sum_{j in K_a} e^{s_j} v_j /
/// sum_{j in K_a} e^{s_j} and lse_a = log sum_{j in K_a} e^{s_j}. For disjoint subsets the union is
/// o = w_a o_a + w_b o_b with w_x = e^{lse_x - lse}, lse = log(e^{lse_a} + e^{lse_b}).
/// See docs/DESIGN.md, section "Online softmax".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// -infinity as float: the logit of a masked key and the LSE of a row that attends no key.
inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

/// Running softmax statistics of one row: m (max logit so far; -inf while every logit was -inf)
/// and l = sum of e^{s - m}. A NaN logit is not a masked one: m ignores it, l becomes NaN, and the
/// row's output and LSE come out NaN (docs/ROBUSTNESS.md).
///
/// A plain 8-byte value; O(1) state, no allocation. Not synchronised: one row per thread.
struct OnlineSoftmax {
  float m = kNegInf;  ///< Running max of the logits.
  float l = 0.0f;     ///< Running sum of e^{s - m}.


  /// What one update did: alpha = e^{m_old - m_new} (the factor for the row's accumulator), and
  /// whether the row has any weight so far (false: every logit was -inf, nothing to accumulate).
  struct Step {
    float alpha;  ///< e^{m_old - m_new}: multiply the row's accumulator by it before adding.
    bool live;    ///< False while every logit of the row was -inf (nothing to accumulate).
  };

  /// Folds in n logits x[0], x[stride], ..., replacing each by its weight e^{x - m_new} (0 for
  /// -inf). A row with every logit -inf so far keeps m = -inf and gets weights 0, alpha 1.
  /// @param x n logits (scaled, natural units), overwritten with their weights e^{x - m_new}.
  /// @param n number of logits, >= 0.
  /// @param stride floats between consecutive logits.
  /// @return the rescale factor for the accumulator and whether the row is live.
  /// O(n) exps, never throws.
  Step update(float* x, index_t n, index_t stride = 1) {
    float mx = kNegInf;
    bool nan = false;
    for (index_t j = 0; j < n; ++j) {
      mx = std::max(mx, x[j * stride]);  // std::max(a, NaN) = a: m stays a number
      nan = nan || std::isnan(x[j * stride]);
    }
    const float m_new = std::max(m, mx);
    if (m_new == kNegInf && !nan) {
      for (index_t j = 0; j < n; ++j) x[j * stride] = 0.0f;
      return {1.0f, false};
    }
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float alpha = m == kNegInf ? 0.0f : std::exp(m - m_use);
    float sum = 0.0f;
    for (index_t j = 0; j < n; ++j) {
      float& e = x[j * stride];
      e = e == kNegInf ? 0.0f : std::exp(e - m_use);
      sum += e;
    }
    m = m_new;
    l = l * alpha + sum;
    return {alpha, true};
  }

  /// Folds in another state over a disjoint key subset: returns the weights (w_this, w_other) by
  /// which the two accumulators combine (acc = w_this acc_this + w_other acc_other). A state that
  /// saw no key (m = -inf, l = 0) gets weight 0; a NaN l is kept (it poisons the row).
  /// @param o the state over the other key subset.
  /// @return (w_this, w_other). Never throws.
  std::pair<float, float> merge(const OnlineSoftmax& o) {
    const bool empty_this = m == kNegInf && l == 0.0f, empty_other = o.m == kNegInf && o.l == 0.0f;
    if (empty_other) return {1.0f, 0.0f};
    if (empty_this) {
      *this = o;
      return {0.0f, 1.0f};
    }
    const float m_new = std::max(m, o.m);
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float wa = std::exp(m - m_use), wb = std::exp(o.m - m_use);
    l = wa * l + wb * o.l;
    m = m_new;
    return {wa, wb};
  }

  /// @return 1 / l, or 0 for a row that saw no key (l = 0); NaN for a poisoned row.
  float inv_sum() const { return l != 0.0f ? 1.0f / l : 0.0f; }
  /// @return the natural log-sum-exp of the logits seen: m + log l, -inf for an empty row.
  float lse() const { return l != 0.0f ? m + std::log(l) : kNegInf; }
};

/// Merges (o_b, lse_b) into (o_a, lse_a) in place for one row of d values. An empty subset has
/// lse = -inf (its o is ignored); merging two empty subsets leaves o_a = 0, lse_a = -inf.
/// @param o_a d floats (stride stride_a), the result over subset a; receives the merged row.
/// @param lse_a natural LSE of subset a; receives the merged LSE.
/// @param o_b d floats (stride stride_b), the result over subset b.
/// @param lse_b natural LSE of subset b.
/// @param d number of channels.
/// @param stride_a floats between channels of o_a.
/// @param stride_b floats between channels of o_b.
/// O(d), never throws, allocates nothing.
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
  // A normalised partial result is the state {m = lse, l = 1} with accumulator o.
  OnlineSoftmax a{lse_a, 1.0f};
  const auto [wa, wb] = a.merge({lse_b, 1.0f});
  const float inv = a.inv_sum();
  for (index_t c = 0; c < d; ++c)
    o_a[c * stride_a] = (wa * o_a[c * stride_a] + wb * o_b[c * stride_b]) * inv;
  lse_a = a.lse();
}

/// Merges whole partial results: (out_a, lse_a) <- merge((out_a, lse_a), (out_b, lse_b)), for
/// attention over two disjoint key subsets of the same queries. Shapes must match.
/// @param out_a [H, n, d] fp32 view, any strides; receives the merged result.
/// @param lse_a [H, n] natural LSE of out_a; updated in place.
/// @param out_b [H, n, d] fp32 view, any strides.
/// @param lse_b [H, n] natural LSE of out_b.
/// @param exec executor (default: OpenMP or the calling thread).
/// @throws sparse_attn::invalid_argument when a view is invalid (validate_view; out_a must not
///         alias itself), the shapes differ, an LSE view is null, or exec.num_threads < 0.
/// O(H n d), allocates nothing; rows run in parallel on the executor. The LSE views and the
/// overlap of out_a with out_b are not checked.
inline void merge_states(TensorView<float> out_a, LseView lse_a, TensorView<const float> out_b,
                         LseView lse_b, const ExecutorChoice& exec = {}) {
  validate_view(out_a, "merge_states: out_a", true);
  validate_view(out_b, "merge_states: out_b");
  require(out_a.heads == out_b.heads && out_a.tokens == out_b.tokens && out_a.dim == out_b.dim,
          "merge_states", "shape mismatch: out_a is ", out_a.heads, "x", out_a.tokens, "x",
          out_a.dim, ", out_b is ", out_b.heads, "x", out_b.tokens, "x", out_b.dim);
  require(bool(lse_a) && bool(lse_b), "merge_states", "both LSE views are required");
  require(exec.num_threads >= 0, "merge_states", "num_threads must be >= 0 (0: default), got ",
          exec.num_threads);
  const index_t rows = out_a.heads * out_a.tokens;
  sparse_attn::detail::with_executor(exec, [&](Executor& ex) {
    // A row costs O(d): about 4 chunks of rows per worker.
    const index_t grain = std::max<index_t>(1, rows / (4 * std::max(ex.concurrency(), 1)));
    run_chunks(ex, rows, grain, [&](index_t r0, index_t r1, int) {
      for (index_t r = r0; r < r1; ++r) {
        const index_t h = r / out_a.tokens, i = r % out_a.tokens;
        merge_state(out_a.row(h, i), lse_a(h, i), out_b.row(h, i), lse_b(h, i), out_a.dim,
                    out_a.stride_dim, out_b.stride_dim);
      }
    });
  });
}

SPARSE_ATTN_NAMESPACE_END
