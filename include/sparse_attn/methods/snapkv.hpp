/// @file
/// SnapKV, KV eviction at the end of prefill, per KV head (docs/METHODS.md, section "snapkv and
/// ada_snapkv").
///
/// Observation window: the last w = min(window, n_q) prompt queries (q holds the last n_q prompt
/// queries; query i sits at position n - n_q + i of the n cached tokens). Score of key j:
///   s_j = sum over the w queries of (mean over the G query heads of the group of
///         softmax_j(scale * q . k_j)),  causal (the corner of the w queries is triangular),
/// fp32 softmax over all keys. As in the SnapKV paper, the scores of the prefix [0, n - w) are
/// smoothed by a 1-D average pool (kernel 7, stride 1, zero padding, divisor 7); the window's
/// own tokens are forced anyway. Forced: the last w tokens and the first `sinks` (4) tokens.
/// Each KV head keeps exactly c tokens: the forced ones plus the top c - forced by score (ties
/// toward the lower position, NaN last), in position order.
/// Budget (unit tokens per KV head): count(c), or compression(CR): c = count_for_compression(n, CR)
/// (budget.hpp). c >= n keeps all (dense); c below the forced count is raised to it (a count
/// budget is then not honoured, and a compression target misses by the rule: reachable = false).
/// mass(p, floor, cap): per KV head its own c_h, the forced tokens plus the fewest best-scored
/// others whose estimated mass reaches p, clamped to [floor, cap] (and to [forced, n]). The
/// estimated mass of token j is its score over the head's total score (the pooled scores that
/// rank the tokens; the unpooled window scores of the window's own tokens), so p = 1 keeps
/// every token with a positive score. Reachable unless the cap is below the forced count.
/// Decode tokens appended later are never evicted by SnapKV. Positions are not re-indexed (keys
/// are post-RoPE): see kv/cache.hpp. Registry name "snapkv" (decode; make_policy() gives a
/// PrefillEvictionPolicy).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/eviction.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/decode_policy.hpp"
#include "sparse_attn/methods/detail/ranking.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// @cond SPARSE_ATTN_INTERNAL
namespace snapkv_detail {

/// The window and per-head budget c for a cache of n tokens and n_q given queries.
struct Geometry {
  index_t n = 0, w = 0, sinks = 0, forced = 0, c = 0;
  bool honoured = true, dense = false;
  bool is_forced(index_t j) const { return j < sinks || j >= n - w; }
};

template <class TQ, class Cache>
Geometry geometry(const TensorView<TQ>& q, const Cache& cache, index_t window, index_t sinks,
                  index_t pool_kernel, const Budget& budget, const AttentionOptions& opt,
                  const char* where, bool mass_ok = false) {
  require_budget_kind(budget, true, true, mass_ok, where);
  validate_view(q, "q");
  require(cache.uniform(), where,
          ": the cache must hold the same number of tokens in every head "
          "(evict once, at the end of prefill)");
  require(q.heads >= 1 && q.heads % cache.kv_heads() == 0, where, ": Hq=", q.heads,
          " is not a multiple of Hkv=", cache.kv_heads());
  require(q.dim == cache.head_dim(), where, ": head_dim of q (", q.dim,
          ") differs from the cache (", cache.head_dim(), ")");
  require(window >= 1, where, ": window must be >= 1, got ", window);
  require(sinks >= 0, where, ": sinks must be >= 0, got ", sinks);
  require(pool_kernel >= 1 && pool_kernel % 2 == 1, where,
          ": pool_kernel must be odd and >= 1, got ", pool_kernel);
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
          opt.num_threads);
  Geometry g;
  g.n = cache.max_length();
  require(q.tokens >= 1, where,
          ": needs >= 1 prompt query (the observation window scores the keys), got 0");
  require(q.tokens <= g.n, where, ": q has ", q.tokens, " queries but the cache only ", g.n,
          " tokens; the queries are the last n_q prompt positions");
  g.w = std::min({window, q.tokens, g.n});
  g.sinks = std::min(sinks, g.n - g.w);
  g.forced = g.sinks + g.w;
  // Mass budgets: c is each head's own (mass_count()); here the cap, for the forced check.
  g.c = budget.is_count()  ? budget.units()
        : budget.is_mass() ? std::min(budget.mass_cap(), g.n)
                           : count_for_compression(g.n, budget.target_compression());
  if (g.c < g.forced) {
    g.c = g.forced;
    g.honoured = false;
  }
  if (g.c >= g.n) {
    g.c = g.n;
    g.dense = true;
  }
  return g;
}

/// A mass budget's c for one head: the forced tokens plus the fewest others, best score first
/// (ScoreOrder), whose share of the head's total score reaches p; clamped to the budget's floor
/// and cap and to [forced, n]. NaN and negative scores carry no mass. O(n log n).
inline index_t mass_count(const float* score, const Geometry& g, const Budget& budget) {
  std::vector<index_t> rest;
  rest.reserve(static_cast<std::size_t>(g.n));
  double total = 0.0, have = 0.0;
  auto mass = [&](index_t j) {
    const double x = static_cast<double>(score[j]);
    return x > 0.0 ? x : 0.0;  // false for NaN
  };
  for (index_t j = 0; j < g.n; ++j) {
    total += mass(j);
    if (g.is_forced(j))
      have += mass(j);
    else
      rest.push_back(j);
  }
  std::sort(rest.begin(), rest.end(), methods::detail::ScoreOrder{score});
  const double want = budget.mass_target() * total;
  index_t take = 0;
  while (take < static_cast<index_t>(rest.size()) && have < want * (1.0 - 1e-12))
    have += mass(rest[static_cast<std::size_t>(take++)]);
  const index_t c = budget.clamp_to_mass_limits(g.forced + take);
  return std::clamp(c, g.forced, g.n);
}

/// Scores [Hkv][n]: window-attention column scores, reduced over the w queries and the group,
/// pooled over the prefix [0, n - w).
template <class TQ, class Cache>
std::vector<float> scores(const TensorView<TQ>& q, const Cache& cache, const Geometry& g,
                          index_t pool_kernel, const AttentionOptions& opt, kv::detail::Reduce red,
                          const char* where) {
  const index_t Hkv = cache.kv_heads(), n = g.n;
  std::vector<float> raw(static_cast<std::size_t>(Hkv * n)), out(raw.size());
  if (n == 0 || g.w == 0) return out;
  const float scale = kernel::resolve_scale(opt.scale, q.dim, where);
  const float mult = red == kv::detail::Reduce::sum
                         ? 1.0f / static_cast<float>(q.heads / Hkv)  // mean over the group
                         : 1.0f;
  // Queries: the last w of q; they sit at positions n - w .. n - 1.
  const TensorView<TQ> qw = q.slice_tokens(q.tokens - g.w, g.w);
  kv::detail::attention_column_scores(qw, 0, cache.keys(), scale, red, mult, raw.data(), n,
                                      opt.executor_choice());
  for (index_t h = 0; h < Hkv; ++h) {
    const float* r = raw.data() + h * n;
    float* o = out.data() + h * n;
    kv::detail::avg_pool(r, n - g.w, pool_kernel, o);
    std::copy(r + n - g.w, r + n, o + n - g.w);
  }
  return out;
}

}  // namespace snapkv_detail
/// @endcond

/// SnapKV as a method: one eviction of the prompt's cache by observation-window scores, c
/// tokens per KV head. A value type of three parameters; select() is const, keeps no state and
/// may be called concurrently on caches nobody modifies meanwhile (with an executor that allows
/// concurrent run(), as the default ones do).
struct SnapKV {
  static constexpr const char* name = "snapkv";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "SnapKV eviction after prefill";
  static constexpr BudgetUnit unit = BudgetUnit::tokens;  ///< tokens per KV head, c
  static constexpr bool takes_mass = true;  ///< takes Budget::mass (registry: MethodInfo)

  /// w: the observation window, the last w prompt queries, whose tokens are always kept
  /// (>= 1; default 32; the SnapKV reference uses 256).
  index_t window = 32;
  index_t sinks = 4;        ///< first tokens always kept (>= 0; default 4)
  index_t pool_kernel = 7;  ///< average-pool kernel over the prefix scores (odd, >= 1; 1 = none)

  /// Hands every parameter to the registry: v(name, member, help) for "window", "sinks" and
  /// "pool_kernel".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("window", window, "observation window: the last w prompt queries, always kept");
    v("sinks", sinks, "first tokens always kept");
    v("pool_kernel", pool_kernel, "average-pool kernel over the scores (odd; 1 = none)");
  }

  /// Selects the tokens each KV head keeps (does not modify the cache; evict() applies it).
  /// @param q       the last n_q >= 1 prompt queries, [Hq, n_q, d] view (any strides; float,
  ///                bf16 or fp16): positions n - n_q .. n - 1 of the cache. Only the last
  ///                min(window, n_q) rows are read.
  /// @param cache   the layer's cache holding the n prompt tokens, every head the same length.
  /// @param budget  count(c) tokens per KV head, or compression(CR): c =
  ///                count_for_compression(n, CR), or mass(p, floor, cap): each head's own c
  ///                (see the file comment).
  /// @param opt     softmax scale (NaN: 1/sqrt(d)) and executor of the scoring pass.
  /// @return the plan: keep[h] = head h's c kept slots, ascending; scores [Hkv][n] (the pooled
  ///         window scores; score_stride = n); dense when every head keeps n; stats with detail
  ///         "c=... per head" (mass: "c=min-max per head"; reachable = false when c was raised
  ///         to the forced count).
  /// @throws sparse_attn::invalid_argument if the budget is malformed, q is an
  ///         invalid view, the head lengths differ, Hq is not a multiple of Hkv, q's head_dim
  ///         differs from the cache's, window < 1, sinks < 0, pool_kernel is even or < 1,
  ///         opt.num_threads < 0, n_q < 1 or n_q > n, or opt.scale is neither NaN nor finite > 0.
  /// Complexity O(Hq x w x n x d) for the scores (an exact two-pass fp32 softmax, parallel over
  /// key tiles and query rows on opt's executor), plus O(Hkv x n) for pooling and the top-c
  /// (nth_element; a mass budget sorts each head's scores, O(Hkv x n log n)). Allocates the plan (Hkv x n floats of scores, Hkv x c slot indices), one
  /// more Hkv x n floats of raw scores and the scoring scratch (n x d floats of converted keys,
  /// G x w x d of queries, small per-worker tiles). Results do not depend on the thread count.
  template <class TQ, class Cache>
  kv::EvictionPlan select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                          const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::SnapKV::select";
    kv::EvictionPlan plan;
    {
      SelectionTimer timer(plan.stats);
      const snapkv_detail::Geometry g = snapkv_detail::geometry(q, cache, window, sinks,
                                                                pool_kernel, budget, opt, where,
                                                                /*mass_ok=*/true);
      plan.score_stride = g.n;
      plan.scores = snapkv_detail::scores(q, cache, g, pool_kernel, opt, kv::detail::Reduce::sum,
                                          where);
      const index_t Hkv = cache.kv_heads();
      plan.keep.resize(static_cast<std::size_t>(Hkv));
      index_t c_min = g.c, c_max = g.c;
      for (index_t h = 0; h < Hkv; ++h) {
        const index_t c =
            budget.is_mass() ? snapkv_detail::mass_count(plan.head_scores(h), g, budget) : g.c;
        c_min = h == 0 ? c : std::min(c_min, c);
        c_max = h == 0 ? c : std::max(c_max, c);
        plan.keep[static_cast<std::size_t>(h)] = kv::detail::keep_top(
            plan.head_scores(h), g.n, c, [&](index_t j) { return g.is_forced(j); });
      }
      plan.dense = budget.is_mass() ? c_min >= g.n : g.dense;
      kv::finish_eviction_stats(
          plan, cache, budget, g.honoured,
          "c=" + std::to_string(c_min) + (c_max != c_min ? "-" + std::to_string(c_max) : "") +
              " per head");
    }
    return plan;
  }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
