/// @file
/// Sliding window, prefill form ("A-shape"; docs/METHODS.md, section "sliding_window and
/// streaming"): query at position p sees key j iff j <= p and
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

struct SlidingWindow {
  static constexpr const char* name = "sliding_window";
  static constexpr const char* summary = "S sinks + window W (A-shape)";
  static constexpr BudgetUnit unit = BudgetUnit::tokens;

  index_t sinks = 4;   ///< S: the first S keys are always visible
  index_t block = 64;  ///< kernel tile size

  template <class V>
  void visit_params(V&& v) {
    v("sinks", sinks, "first S keys always visible");
    v("block", block, "kernel tile size (query and key block)");
  }

  /// The A-shape mask of Hq query heads, n_q queries (a suffix of n_k keys) with window `window`.
  IntervalMask mask(index_t heads, index_t n_q, index_t n_k, index_t window) const {
    return masks::sliding_window(heads, n_q, n_k, window, sinks, block);
  }

  /// The window whose CR is nearest to `cr` (nearest_budget over W in [1, max(n_k, 1)]).
  index_t window_for(index_t heads, index_t n_q, index_t n_k, double cr) const {
    const index_t dense = MaskShape{heads, n_q, n_k, block, block, true}.dense_pairs();
    return nearest_budget(1, std::max<index_t>(n_k, 1), dense, cr,
                          [&](index_t w) { return mask(heads, n_q, n_k, w).pairs(); });
  }

  /// Selects the window for q [Hq, n_q, d] over k [Hkv, n_k, d] (only the shapes are read).
  template <class QT, class KT>
  PrefillSelection<IntervalMask> select(const TensorView<QT>& q, const TensorView<KT>& k,
                                        const Budget& budget,
                                        const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::SlidingWindow::select";
    PrefillSelection<IntervalMask> r;
    SelectionTimer timer(r.stats);
    require_budget_kind(budget, true, true, false, where);
    detail::validate_qk(q, k, where);
    (void)kernel::resolve_scale(opt.scale, q.dim, where);
    require(sinks >= 0, where, "sinks must be >= 0, got ", sinks);
    require(block >= 1, where, "block must be >= 1, got ", block);
    const index_t w = budget.is_count() ? budget.units()
                                        : window_for(q.heads, q.tokens, k.tokens,
                                                     budget.target_compression());
    r.mask = mask(q.heads, q.tokens, k.tokens, w);
    detail::finish_prefill(r.stats, r.mask, budget, true,
                           sparse_attn::detail::concat("S=", sinks, " W=", w));
    return r;
  }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
