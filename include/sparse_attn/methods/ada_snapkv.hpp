// Method 7b (METHODS.md): Ada-SnapKV (AdaKV's adaptive budget over SnapKV), per layer.
//
// Scores as SnapKV (observation window of the last w queries, causal, fp32 softmax, prefix pooled
// with kernel 7) except the reduction: max over the w queries and over the G query heads of the
// group. Budget: T = c * Hkv tokens per layer (c from budget or ceil(n / CR), raised to the forced
// count when below it). Each head first keeps max(floor(0.2 c), forced) tokens (its forced tokens,
// then its best by score); the rest of T goes to a global top-k over every remaining (head, token)
// score (ties toward the lower head, then the lower position). Heads end with different lengths
// summing to exactly T; decode then attends each head's own length (kv::decode, or
// cache.selection()). c >= n keeps everything. Positions are not re-indexed (keys are post-RoPE).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sparse_attn/methods/snapkv.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct AdaSnapKVOptions : SnapKVOptions {
  double floor_fraction = 0.2;  // each head keeps at least floor(floor_fraction * c) tokens
};

namespace ada_snapkv {

/// Selects per-head kept tokens (does not modify the cache); sum of kept = c * Hkv exactly.
template <class TQ, class Cache>
kv::EvictionPlan select(const TensorView<TQ>& q, const Cache& cache,
                        const AdaSnapKVOptions& opt = {}) {
  constexpr const char* where = "ada_snapkv::select";
  require(opt.floor_fraction >= 0.0 && opt.floor_fraction <= 1.0, where,
          ": floor_fraction must be in [0, 1], got ", opt.floor_fraction);
  const snapkv::detail::Geometry g = snapkv::detail::geometry(q, cache, opt, where);
  const index_t Hkv = cache.kv_heads(), n = g.n;
  kv::EvictionPlan plan;
  plan.budget = g.c * Hkv;
  plan.reachable = g.reachable;
  plan.dense = g.dense;
  plan.score_stride = n;
  plan.scores = snapkv::detail::scores(q, cache, g, opt, kv::detail::Reduce::max, where);
  plan.keep.resize(static_cast<std::size_t>(Hkv));
  auto forced = [&](index_t j) { return g.is_forced(j); };
  if (g.dense) {
    for (index_t h = 0; h < Hkv; ++h)
      plan.keep[static_cast<std::size_t>(h)] =
          kv::detail::keep_top(plan.head_scores(h), n, n, forced);
    return plan;
  }
  // Per-head floor, then a global top-k of what is left.
  const index_t floor_keep = std::max(
      static_cast<index_t>(std::floor(opt.floor_fraction * static_cast<double>(g.c))), g.forced);
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
      std::min<index_t>(plan.budget - floor_keep * Hkv, static_cast<index_t>(rest.size()));
  const float* s = plan.scores.data();
  auto better = [&](index_t a, index_t b) {
    const float x = kv::detail::rank_key(s[a]), y = kv::detail::rank_key(s[b]);
    return x > y || (x == y && a < b);
  };
  if (extra < static_cast<index_t>(rest.size()))
    std::nth_element(rest.begin(), rest.begin() + extra, rest.end(), better);
  for (index_t e = 0; e < extra; ++e) {
    const index_t f = rest[static_cast<std::size_t>(e)];
    plan.keep[static_cast<std::size_t>(f / n)].push_back(f % n);
  }
  for (auto& k : plan.keep) std::sort(k.begin(), k.end());
  return plan;
}

/// select() then apply(): compacts every head to its own length.
template <class TQ, class Cache>
kv::EvictionPlan evict(const TensorView<TQ>& q, Cache& cache, const AdaSnapKVOptions& opt = {}) {
  kv::EvictionPlan plan = select(q, cache, opt);
  kv::apply(plan, cache);
  return plan;
}

}  // namespace ada_snapkv
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
