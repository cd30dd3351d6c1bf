/// @file
/// Ada-SnapKV (AdaKV's adaptive budget over SnapKV), per layer (docs/METHODS.md, section
/// "snapkv and ada_snapkv").
///
/// Scores as SnapKV (observation window of the last w queries, causal, fp32 softmax, prefix pooled
/// with kernel 7) except the reduction: max over the w queries and over the G query heads of the
/// group. Budget (unit tokens per KV head, on average): T = c * Hkv tokens per layer, c from
/// count(c) or count_for_compression(n, CR), raised to the forced count when below it (then
/// unreachable, as SnapKV). Each head first keeps max(floor(floor_fraction * c), forced) tokens
/// (its forced tokens, then its best by score); the rest of T goes to a global top-k over every
/// remaining (head, token) score (higher first, ties toward the lower head, then the lower
/// position; NaN last). Heads end with different lengths summing to exactly T; decode then
/// attends each head's own length (decode(q, cache, ...), or cache.selection()). c >= n keeps
/// everything. Positions are not re-indexed (keys are post-RoPE). Registry name "ada_snapkv"
/// (decode; make_policy() gives a PrefillEvictionPolicy).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sparse_attn/methods/detail/ranking.hpp"
#include "sparse_attn/methods/snapkv.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// Ada-SnapKV as a method: SnapKV's scores (max-reduced), a per-head floor and one global top-k
/// of the layer's c x Hkv tokens. A value type of four parameters; select() is const, keeps no
/// state and may be called concurrently on caches nobody modifies meanwhile (with an executor
/// that allows concurrent run(), as the default ones do).
struct AdaSnapKV {
  static constexpr const char* name = "ada_snapkv";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "Ada-SnapKV: adaptive per-head budgets";
  /// Tokens per KV head on average, c (the layer keeps c x Hkv).
  static constexpr BudgetUnit unit = BudgetUnit::tokens;

  index_t window = 32;          ///< w: observation window = forced recent tokens (>= 1; default 32)
  index_t sinks = 4;            ///< first tokens always kept (>= 0; default 4)
  index_t pool_kernel = 7;      ///< average-pool kernel (odd, >= 1; 1 = no pooling; default 7)
  /// Each head keeps at least max(floor(floor_fraction x c), forced) tokens; in [0, 1], default
  /// 0.2.
  double floor_fraction = 0.2;

  /// Hands every parameter to the registry: v(name, member, help) for "window", "sinks",
  /// "pool_kernel" and "floor_fraction".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("window", window, "observation window: the last w prompt queries, always kept");
    v("sinks", sinks, "first tokens always kept");
    v("pool_kernel", pool_kernel, "average-pool kernel over the scores (odd; 1 = none)");
    v("floor_fraction", floor_fraction, "each head keeps at least this fraction of c");
  }

  /// Selects per-head kept tokens (does not modify the cache; evict() applies it); the kept
  /// tokens sum to c x Hkv exactly (everything when c >= n).
  /// @param q       the last n_q >= 1 prompt queries, [Hq, n_q, d] view (any strides; float,
  ///                bf16 or fp16): positions n - n_q .. n - 1 of the cache. Only the last
  ///                min(window, n_q) rows are read.
  /// @param cache   the layer's cache holding the n prompt tokens, every head the same length.
  /// @param budget  count(c) tokens per KV head on average, or compression(CR): c =
  ///                count_for_compression(n, CR). Mass budgets are refused.
  /// @param opt     softmax scale (NaN: 1/sqrt(d)) and executor of the scoring pass.
  /// @return the plan: keep[h] = head h's kept slots, ascending (lengths differ per head);
  ///         scores [Hkv][n] (score_stride = n); dense when c >= n; stats with detail "c=... per
  ///         head on average" (reachable = false when c was raised to the forced count).
  /// @throws sparse_attn::invalid_argument if floor_fraction is not in [0, 1], or for any reason
  ///         SnapKV::select() throws (budget, views, equal head lengths, GQA, head_dim, window,
  ///         sinks, pool_kernel, num_threads, n_q, scale).
  /// Complexity as SnapKV::select(): O(Hq x w x n x d) for the scores, plus O(Hkv x n) for the
  /// floors and the global top-k (nth_element). Allocates as SnapKV plus Hkv x n bytes of flags
  /// and up to Hkv x n indices of remaining candidates. Results do not depend on the thread
  /// count.
  template <class TQ, class Cache>
  kv::EvictionPlan select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                          const AttentionOptions& opt = {}) const {
    kv::EvictionPlan plan;
    {
      SelectionTimer timer(plan.stats);
      select_into(q, cache, budget, opt, plan);
    }
    return plan;
  }

 private:
  template <class TQ, class Cache>
  void select_into(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                   const AttentionOptions& opt, kv::EvictionPlan& plan) const {
    constexpr const char* where = "methods::AdaSnapKV::select";
    require(floor_fraction >= 0.0 && floor_fraction <= 1.0, where,
            ": floor_fraction must be in [0, 1], got ", floor_fraction);
    const snapkv_detail::Geometry g =
        snapkv_detail::geometry(q, cache, window, sinks, pool_kernel, budget, opt, where);
    const index_t Hkv = cache.kv_heads(), n = g.n;
    const index_t total = g.c * Hkv;
    plan.dense = g.dense;
    plan.score_stride = n;
    plan.scores =
        snapkv_detail::scores(q, cache, g, pool_kernel, opt, kv::detail::Reduce::max, where);
    plan.keep.resize(static_cast<std::size_t>(Hkv));
    auto forced = [&](index_t j) { return g.is_forced(j); };
    const std::string info = "c=" + std::to_string(g.c) + " per head on average";
    if (g.dense) {
      for (index_t h = 0; h < Hkv; ++h)
        plan.keep[static_cast<std::size_t>(h)] =
            kv::detail::keep_top(plan.head_scores(h), n, n, forced);
      kv::finish_eviction_stats(plan, cache, budget, g.honoured, info);
      return;
    }
    // Per-head floor, then a global top-k of what is left.
    const index_t floor_keep = std::max(
        static_cast<index_t>(std::floor(floor_fraction * static_cast<double>(g.c))), g.forced);
    std::vector<std::uint8_t> kept(static_cast<std::size_t>(Hkv * n), 0);
    std::vector<index_t> rest;  // flat (h * n + j) indices not kept yet
    rest.reserve(static_cast<std::size_t>(Hkv * n));
    for (index_t h = 0; h < Hkv; ++h) {
      plan.keep[static_cast<std::size_t>(h)] =
          kv::detail::keep_top(plan.head_scores(h), n, floor_keep, forced);
      for (index_t j : plan.keep[static_cast<std::size_t>(h)])
        kept[static_cast<std::size_t>(h * n + j)] = 1;
    }
    for (index_t f = 0; f < Hkv * n; ++f)
      if (!kept[static_cast<std::size_t>(f)]) rest.push_back(f);
    const index_t extra =
        std::min<index_t>(total - floor_keep * Hkv, static_cast<index_t>(rest.size()));
    if (extra < static_cast<index_t>(rest.size()))
      std::nth_element(rest.begin(), rest.begin() + extra, rest.end(),
                       detail::ScoreOrder{plan.scores.data()});
    for (index_t e = 0; e < extra; ++e) {
      const index_t f = rest[static_cast<std::size_t>(e)];
      plan.keep[static_cast<std::size_t>(f / n)].push_back(f % n);
    }
    for (auto& k : plan.keep) std::sort(k.begin(), k.end());
    kv::finish_eviction_stats(plan, cache, budget, g.honoured, info);
  }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
