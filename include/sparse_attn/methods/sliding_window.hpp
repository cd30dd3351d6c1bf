/// @file
/// Sliding window with attention sinks, prefill form ("A-shape"; docs/METHODS.md, section
/// "sliding_window and streaming"): query at position p sees key j iff j <= p and
/// (j < S or p - j < W). Closed-form: no index memory. S + W >= n gives exactly the dense pattern.
/// The decode/eviction form (keep the first S and the last W tokens) is methods/streaming.hpp; the
/// bare pattern for a given W is masks::sliding_window (mask/patterns.hpp).
///
/// Budget (unit tokens = the window W):
///   count(W)        the window as given (W >= n_k is dense); always reachable.
///   compression(c)  W found by nearest_budget() over the exact pair count of [1, n_k]: the W whose
///                   CR is nearest to c in log ratio. The sparsest mask (W = 1: the S sinks and the
///                   diagonal) caps the CR near n / (2 (S + 1)); a target beyond the tolerance of
///                   what any W achieves is reported reachable = false.
/// Selection cost: O(n_q) per probed W, O(n_q log n_k) for the search; nothing reads q or k.
/// Registry name "sliding_window" (prefill). TriShape (registry "tri_shape") is the same pattern
/// with the last L query rows dense; both select through detail::WindowSelect.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/patterns.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/detail/selection.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

namespace detail {
/// The window family's selection, shared by SlidingWindow and TriShape. Method provides sinks,
/// block, dense_rows() (the last query rows computed densely) and `where` (the error prefix).
template <class Method>
struct WindowSelect {
  /// The mask with this method's sinks, block and dense rows for window W.
  /// @param heads   query heads Hq, >= 1.
  /// @param n_q     queries, the last n_q of the n_k positions (0 <= n_q <= n_k).
  /// @param n_k     keys.
  /// @param window  W, in tokens, >= 1 (W >= n_k is dense).
  /// @return the closed-form mask (no index memory).
  /// @throws sparse_attn::invalid_argument if window < 1, sinks < 0, dense rows < 0, block is not
  ///         in [1, 2^31 - 1], or the shape is invalid (heads < 1, n_q > n_k, ...).
  /// Complexity O(n_q) (the pair count); no allocation.
  IntervalMask mask(index_t heads, index_t n_q, index_t n_k, index_t window) const {
    const Method& m = static_cast<const Method&>(*this);
    require(window >= 1, m.where, ": window must be >= 1, got ", window);
    return IntervalMask(MaskShape{heads, n_q, n_k, m.block, m.block, true}, window, m.sinks,
                        m.dense_rows());
  }

  /// The window whose CR is nearest to `cr` in log ratio (nearest_budget() over W in
  /// [1, max(n_k, 1)] on the exact pair count).
  /// @param heads  query heads Hq.
  /// @param n_q    queries (a suffix of the keys).
  /// @param n_k    keys.
  /// @param cr     target compression ratio, >= 1.
  /// @return W, in tokens, in [1, max(n_k, 1)].
  /// @throws sparse_attn::invalid_argument as mask() does for an invalid shape or parameters.
  /// Complexity O(n_q log n_k); no allocation.
  index_t window_for(index_t heads, index_t n_q, index_t n_k, double cr) const {
    const index_t b = static_cast<const Method&>(*this).block;
    const MaskShape shape{heads, n_q, n_k, b, b, true};
    shape.validate(static_cast<const Method&>(*this).where);
    return nearest_budget(1, std::max<index_t>(n_k, 1), shape.dense_pairs(), cr,
                          [&](index_t w) { return mask(heads, n_q, n_k, w).pairs(); });
  }

  /// Selects the window for q over k (only the shapes are read) and returns its mask.
  /// @param q       queries, [Hq, n_q, d] view (any strides), the last n_q of the n_k positions.
  /// @param k       keys, [Hkv, n_k, d] view, Hq % Hkv == 0, n_q <= n_k.
  /// @param budget  count(W): the window in tokens, as given (always reachable); or
  ///                compression(c): the W whose CR is nearest to c (reachable by the tolerance
  ///                rule). Mass budgets are refused.
  /// @param opt     the kernel's options; only opt.scale is validated.
  /// @return the IntervalMask and its statistics (detail e.g. "S=4 W=412", with " L=64" for
  ///         dense last rows).
  /// @throws sparse_attn::invalid_argument if the budget is malformed or a mass budget, the views
  ///         are invalid or inconsistent (d, Hq % Hkv, n_q > n_k), opt.scale is neither NaN nor
  ///         finite > 0, sinks < 0, dense rows < 0, block < 1 (or > 2^31 - 1), or Hq x n_q x n_k
  ///         exceeds 2^63 - 1.
  /// Complexity O(n_q) for a count budget, O(n_q log n_k) for a compression budget; allocates
  /// only the statistics' detail string. Const, no state: safe to call concurrently.
  template <class QT, class KT>
  PrefillSelection<IntervalMask> select(const TensorView<QT>& q, const TensorView<KT>& k,
                                        const Budget& budget,
                                        const AttentionOptions& opt = {}) const {
    const Method& m = static_cast<const Method&>(*this);
    const char* where = m.where;
    PrefillSelection<IntervalMask> r;
    SelectionTimer timer(r.stats);
    require_budget_kind(budget, true, true, false, where);
    validate_qk(q, k, where);
    (void)kernel::resolve_scale(opt.scale, q.dim, where);
    require(m.sinks >= 0, where, "sinks must be >= 0, got ", m.sinks);
    require(m.block >= 1, where, "block must be >= 1, got ", m.block);
    require(m.dense_rows() >= 0, where, "last_rows must be >= 0, got ", m.dense_rows());
    const index_t w = budget.is_count() ? budget.units()
                                        : window_for(q.heads, q.tokens, k.tokens,
                                                     budget.target_compression());
    r.mask = mask(q.heads, q.tokens, k.tokens, w);
    finish_prefill(r.stats, r.mask, budget, true,
                   m.dense_rows() > 0
                       ? sparse_attn::detail::concat("S=", m.sinks, " W=", w, " L=",
                                                     r.mask.dense_last_rows())
                       : sparse_attn::detail::concat("S=", m.sinks, " W=", w));
    return r;
  }
};
}  // namespace detail

/// The A-shape prefill method: S sink keys plus a causal window of W keys, W chosen by the
/// budget (mask(), window_for(), select(): detail::WindowSelect). A value type of two parameters;
/// its member functions are const, keep no state and may be called concurrently.
struct SlidingWindow : detail::WindowSelect<SlidingWindow> {
  static constexpr const char* name = "sliding_window";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "S sinks + window W (A-shape)";
  static constexpr BudgetUnit unit = BudgetUnit::tokens;  ///< count budgets give the window W
  static constexpr const char* where = "methods::SlidingWindow::select";  ///< error prefix

  index_t sinks = 4;   ///< S: the first S keys are always visible (>= 0; default 4)
  index_t block = 64;  ///< kernel tile size (query and key block), in tokens (>= 1; default 64)

  /// Hands every parameter to the registry: v(name, member, help) for "sinks" and "block".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("sinks", sinks, "first S keys always visible");
    v("block", block, "kernel tile size (query and key block)");
  }
  /// No dense rows: a plain window.
  /// @return 0
  static constexpr index_t dense_rows() { return 0; }
};

/// Tri-shape (SCBench; OpenVINO's other prefill mode): the sliding window with sinks plus the
/// last L query rows dense, since those rows produce the first decoded token. Budgets as the
/// sliding window (count(W), compression(c) by nearest_budget over W); the dense rows cap the CR
/// near n / (2 L). docs/METHODS.md, section "tri_shape".
struct TriShape : detail::WindowSelect<TriShape> {
  static constexpr const char* name = "tri_shape";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "S sinks + window W + the last L query rows dense";
  static constexpr BudgetUnit unit = BudgetUnit::tokens;  ///< count budgets give the window W
  static constexpr const char* where = "methods::TriShape::select";  ///< error prefix

  index_t sinks = 4;       ///< S: the first S keys are always visible (>= 0; default 4)
  index_t last_rows = 64;  ///< L: the last L query rows see every causal key (>= 0; default 64)
  index_t block = 64;      ///< kernel tile size (query and key block), in tokens (default 64)

  /// Hands every parameter to the registry: "sinks", "last_rows", "block".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("sinks", sinks, "first S keys always visible");
    v("last_rows", last_rows, "L: the last L query rows are dense");
    v("block", block, "kernel tile size (query and key block)");
  }
  /// The dense rows.
  /// @return last_rows (L)
  index_t dense_rows() const { return last_rows; }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
