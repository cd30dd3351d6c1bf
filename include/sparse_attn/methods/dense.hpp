/// @file
/// Dense attention (docs/METHODS.md, section "dense"), the reference and baseline. Selection is the closed-form
/// causal or non-causal pattern (masks::causal / masks::full); execution is the common prefill /
/// decode kernel. As a method it takes only a compression budget, and only CR 1 is reachable
/// (within the budget's tolerance): dense keeps everything whatever is asked, and says so.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/key_selection.hpp"
#include "sparse_attn/mask/patterns.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/detail/selection.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct Dense {
  static constexpr const char* name = "dense";
  static constexpr const char* summary = "dense attention (the reference)";
  static constexpr BudgetUnit unit = BudgetUnit::none;

  bool causal = true;   ///< false: every query sees every key (encoders, cross-attention)
  index_t block = 64;   ///< kernel tile (query and key block) size

  template <class V>
  void visit_params(V&& v) {
    v("causal", causal, "causal (key j visible to the query at position p iff j <= p)");
    v("block", block, "kernel tile size (query and key block)");
  }

  /// Prefill: the dense pattern of q [Hq, n_q, d] over k [Hkv, n_k, d] (n_q <= n_k, queries a
  /// suffix of the keys). Budget: compression only; reachable iff CR 1 is within its tolerance.
  template <class QT, class KT>
  PrefillSelection<IntervalMask> select(const TensorView<QT>& q, const TensorView<KT>& k,
                                        const Budget& budget = {},
                                        const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::Dense::select";
    PrefillSelection<IntervalMask> r;
    SelectionTimer timer(r.stats);
    require_budget_kind(budget, true, false, false, where);
    detail::validate_qk(q, k, where);
    (void)kernel::resolve_scale(opt.scale, q.dim, where);
    r.mask = causal ? masks::causal(q.heads, q.tokens, k.tokens, block)
                    : masks::full(q.heads, q.tokens, k.tokens, block);
    detail::finish_prefill(r.stats, r.mask, budget, true, causal ? "causal" : "full");
    return r;
  }

  /// Decode: every key of the cache (KeySelection::all()). pairs = dense_pairs = the (query row,
  /// key) pairs of dense causal decode over the sequence: Hq * sum over the n_q new tokens t of
  /// (sequence_length - n_q + t + 1). Budget: compression only, as for prefill.
  template <class TQ, class Cache>
  DecodeSelection select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget = {},
                         const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::Dense::select (decode)";
    DecodeSelection r;
    SelectionTimer timer(r.stats);
    require_budget_kind(budget, true, false, false, where);
    validate_view(q, "q");
    const index_t seq = cache.sequence_length();
    require(cache.kv_heads() >= 1 && q.heads % cache.kv_heads() == 0, where, "Hq=", q.heads,
            " is not a multiple of the cache's Hkv=", cache.kv_heads(),
            " (GQA needs Hq % Hkv == 0)");
    require(q.tokens <= seq, where, "n_q=", q.tokens, " > the cache's sequence length ", seq,
            "; the queries must be the newest tokens, already in the cache");
    (void)kernel::resolve_scale(opt.scale, q.dim, where);
    r.keys = KeySelection::all();
    index_t pairs = 0;
    for (index_t t = 0; t < q.tokens; ++t) pairs += seq - q.tokens + t + 1;
    r.stats.pairs = r.stats.dense_pairs = q.heads * pairs;
    r.stats.target = budget;
    r.stats.detail = "all keys";
    finish_stats(r.stats);
    return r;
  }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
