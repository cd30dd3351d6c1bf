// Method 7a (METHODS.md): SnapKV, KV eviction at the end of prefill, per KV head.
//
// Observation window: the last w = min(window, n_q) prompt queries (q holds the last n_q prompt
// queries; query i sits at position n - n_q + i of the n cached tokens). Score of key j:
//   s_j = sum over the w queries of (mean over the G query heads of the group of
//         softmax_j(scale * q . k_j)),  causal (the corner of the w queries is triangular),
// fp32 softmax over all keys. As in the SnapKV paper, the scores of the prefix [0, n - w) are
// smoothed by a 1-D average pool (kernel 7, stride 1, zero padding, divisor 7); the window's
// own tokens are forced anyway. Forced: the last w tokens and the first `sinks` (4) tokens.
// Each KV head keeps exactly c tokens: the forced ones plus the top c - forced by score (ties
// toward the lower position), in position order. c = budget, or the smallest c reaching the
// target CR from below: c = ceil(n / CR) (achieved CR = n / c <= target). c >= n keeps all
// (dense); c below the forced count is raised to it (reachable = false).
// Decode tokens appended later are never evicted by SnapKV. Positions are not re-indexed (keys
// are post-RoPE): see kv/cache.hpp.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <limits>
#include <vector>

#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/eviction.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct SnapKVOptions {
  double compression = 10.0;  // target CR (finite, >= 1); ignored when budget > 0
  index_t budget = 0;         // > 0: c, tokens kept per KV head (per-layer average for Ada-SnapKV)
  index_t window = 32;        // w: observation window = forced recent tokens (reference: 256)
  index_t sinks = 4;          // first tokens always kept
  index_t pool_kernel = 7;    // average-pool kernel (odd, >= 1; 1 = no pooling)
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1 / sqrt(d)
  int num_threads = 0;           // threads of the default executor (0: OpenMP default)
  Executor* executor = nullptr;  // the caller's executor, not owned; nullptr: the default for
                                 // num_threads
};

namespace snapkv {
namespace detail {

/// The window and per-head budget c for a cache of n tokens and n_q given queries.
struct Geometry {
  index_t n = 0, w = 0, sinks = 0, forced = 0, c = 0;
  bool reachable = true, dense = false;
  bool is_forced(index_t j) const { return j < sinks || j >= n - w; }
};

template <class TQ, class Cache>
Geometry geometry(const TensorView<TQ>& q, const Cache& cache, const SnapKVOptions& opt,
                  const char* where) {
  validate_view(q, "q");
  require(cache.uniform(), where,
          ": the cache must hold the same number of tokens in every head "
          "(evict once, at the end of prefill)");
  require(q.heads >= 1 && q.heads % cache.kv_heads() == 0, where, ": Hq=", q.heads,
          " is not a multiple of Hkv=", cache.kv_heads());
  require(q.dim == cache.head_dim(), where, ": head_dim of q (", q.dim,
          ") differs from the cache (", cache.head_dim(), ")");
  require(opt.window >= 1, where, ": window must be >= 1, got ", opt.window);
  require(opt.sinks >= 0, where, ": sinks must be >= 0, got ", opt.sinks);
  require(opt.pool_kernel >= 1 && opt.pool_kernel % 2 == 1, where,
          ": pool_kernel must be odd and >= 1, got ", opt.pool_kernel);
  require(opt.budget >= 0, where, ": budget must be >= 0 tokens, got ", opt.budget);
  if (opt.budget == 0)
    require(std::isfinite(opt.compression) && opt.compression >= 1.0, where,
            ": compression must be finite and >= 1, got ", opt.compression);
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
          opt.num_threads);
  Geometry g;
  g.n = cache.max_length();
  require(q.tokens <= g.n, where, ": q has ", q.tokens, " queries but the cache only ", g.n,
          " tokens; the queries are the last n_q prompt positions");
  g.w = std::min({opt.window, q.tokens, g.n});
  g.sinks = std::min(opt.sinks, g.n - g.w);
  g.forced = g.sinks + g.w;
  g.c = opt.budget > 0
            ? opt.budget
            : static_cast<index_t>(std::ceil(static_cast<double>(g.n) / opt.compression - 1e-9));
  if (g.c < g.forced) {
    g.c = g.forced;
    g.reachable = false;
  }
  if (g.c >= g.n) {
    g.c = g.n;
    g.dense = true;
  }
  return g;
}

/// Scores [Hkv][n]: window-attention column scores, reduced over the w queries and the group,
/// pooled over the prefix [0, n - w).
template <class TQ, class Cache>
std::vector<float> scores(const TensorView<TQ>& q, const Cache& cache, const Geometry& g,
                          const SnapKVOptions& opt, kv::detail::Reduce red, const char* where) {
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
                                      {opt.executor, opt.num_threads});
  for (index_t h = 0; h < Hkv; ++h) {
    const float* r = raw.data() + h * n;
    float* o = out.data() + h * n;
    kv::detail::avg_pool(r, n - g.w, opt.pool_kernel, o);
    std::copy(r + n - g.w, r + n, o + n - g.w);
  }
  return out;
}

}  // namespace detail

/// Selects the tokens each KV head keeps (does not modify the cache). q: the last n_q >= 1 prompt
/// queries [Hq, n_q, d]; the cache holds the n prompt tokens (equal lengths).
template <class TQ, class Cache>
kv::EvictionPlan select(const TensorView<TQ>& q, const Cache& cache,
                        const SnapKVOptions& opt = {}) {
  constexpr const char* where = "snapkv::select";
  const detail::Geometry g = detail::geometry(q, cache, opt, where);
  kv::EvictionPlan plan;
  plan.budget = g.c;
  plan.reachable = g.reachable;
  plan.dense = g.dense;
  plan.score_stride = g.n;
  plan.scores = detail::scores(q, cache, g, opt, kv::detail::Reduce::sum, where);
  plan.keep.resize(static_cast<std::size_t>(cache.kv_heads()));
  for (index_t h = 0; h < cache.kv_heads(); ++h)
    plan.keep[static_cast<std::size_t>(h)] = kv::detail::keep_top(
        plan.head_scores(h), g.n, g.c, [&](index_t j) { return g.is_forced(j); });
  return plan;
}

/// select() then apply(): compacts the cache in place; returns the plan (scores, kept slots).
template <class TQ, class Cache>
kv::EvictionPlan evict(const TensorView<TQ>& q, Cache& cache, const SnapKVOptions& opt = {}) {
  kv::EvictionPlan plan = select(q, cache, opt);
  kv::apply(plan, cache);
  return plan;
}

}  // namespace snapkv
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
