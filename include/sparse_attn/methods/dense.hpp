/// @file
/// Dense attention, the reference and baseline (docs/METHODS.md, section "dense"). Selection is
/// the closed-form causal or non-causal pattern (masks::causal / masks::full); execution is the
/// common prefill / decode kernel. As a method it takes only a compression budget, and only CR 1
/// is reachable (within the budget's tolerance): dense keeps everything whatever is asked, and
/// says so.
/// Registry name "dense", both a prefill and a decode method.
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

/// Dense attention as a method: the causal (or full) pattern for prefill, every cached key for
/// decode. A value type of two parameters; select() is const, keeps no state and may be called
/// concurrently from any number of threads.
struct Dense {
  static constexpr const char* name = "dense";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "dense attention (the reference)";
  static constexpr BudgetUnit unit = BudgetUnit::none;  ///< takes no count budget

  /// Prefill: key j visible to the query at position p iff j <= p (default true); false: every
  /// query sees every key (encoders, cross-attention).
  bool causal = true;
  index_t block = 64;   ///< prefill kernel tile (query and key block) size, in tokens; default 64

  /// Hands every parameter to the registry: v(name, member, help) for "causal" and "block".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("causal", causal, "causal (key j visible to the query at position p iff j <= p)");
    v("block", block, "kernel tile size (query and key block)");
  }

  /// Prefill: the dense pattern of q over k (masks::causal or masks::full), a closed-form
  /// IntervalMask; q and k are only validated, never read.
  /// @param q       queries, [Hq, n_q, d] view (any strides), the last n_q of the n_k positions.
  /// @param k       keys, [Hkv, n_k, d] view, Hq % Hkv == 0, n_q <= n_k.
  /// @param budget  compression only; reachable iff CR 1 is within its tolerance.
  /// @param opt     the kernel's options; only opt.scale is validated.
  /// @return the mask (tile `block`) and its statistics (pairs = dense pairs).
  /// @throws sparse_attn::invalid_argument if the budget is not a valid compression budget, the
  ///         views are invalid, d differs or is < 1, Hq or Hkv < 1, Hq % Hkv != 0, n_q > n_k,
  ///         opt.scale is neither NaN nor finite > 0, block is not in [1, 2^31 - 1], or
  ///         Hq x n_q x n_k exceeds 2^63 - 1.
  /// Complexity O(n_q) (the mask's pair count); allocates only the statistics' detail string.
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
  /// @param q       the step's queries, [Hq, n_q, d] view: the newest n_q tokens, already
  ///                appended to the cache.
  /// @param cache   the layer's KV cache (kv::Cache or a type of its interface); not read
  ///                beyond its lengths.
  /// @param budget  compression only.
  /// @param opt     the kernel's options; only opt.scale is validated.
  /// @return KeySelection::all() and its statistics.
  /// @throws sparse_attn::invalid_argument if the budget is not a valid compression budget, q is
  ///         an invalid view, Hq is not a multiple of the cache's Hkv, n_q exceeds the cache's
  ///         sequence length, or opt.scale is neither NaN nor finite > 0.
  /// Complexity O(n_q); allocates only the statistics' detail string. Reads the cache: do not
  /// modify it concurrently.
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
