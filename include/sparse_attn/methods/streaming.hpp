// Method 2, decode eviction form (METHODS.md): StreamingLLM. The cache keeps the first S tokens
// (attention sinks) and the most recent W; everything else is evicted, at the end of prefill and
// whenever a decode step grows a head past S + W. Positions are not re-indexed (keys are post-RoPE,
// see kv/cache.hpp): the sinks keep positions 0..S-1 and the window its true positions.
// CR = n / (S + W) for decode; S + W >= n keeps everything (dense). The prefill form (A-shape
// mask) is methods/sliding_window.hpp. No scores: the plan's scores are empty.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <vector>

#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/eviction.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct StreamingOptions {
  index_t sinks = 4;         // S
  index_t window = 1024;     // W: recent tokens kept (when compression == 0 and budget == 0)
  double compression = 0.0;  // > 0: S + W = ceil(sequence length / CR) at every eviction
  index_t budget = 0;        // > 0: S + W = budget
};

namespace streaming {

/// W for a sequence of n tokens so far (W >= 1: the newest token is always kept).
inline index_t resolve_window(index_t n, const StreamingOptions& opt) {
  constexpr const char* where = "streaming";
  require(opt.sinks >= 0, where, ": sinks must be >= 0, got ", opt.sinks);
  require(opt.budget >= 0, where, ": budget must be >= 0 tokens, got ", opt.budget);
  require(opt.compression == 0.0 || (std::isfinite(opt.compression) && opt.compression >= 1.0),
          where, ": compression must be finite and >= 1 (0: use window), got ", opt.compression);
  index_t total = opt.budget;
  if (total == 0 && opt.compression > 0.0)
    total = static_cast<index_t>(std::ceil(static_cast<double>(n) / opt.compression - 1e-9));
  if (total == 0) {
    require(opt.window >= 1, where, ": window must be >= 1, got ", opt.window);
    return opt.window;
  }
  return std::max<index_t>(1, total - opt.sinks);
}

/// Keep the first `sinks` and the last `window` slots of every head.
template <class Cache>
kv::EvictionPlan select(const Cache& cache, index_t sinks, index_t window) {
  require(sinks >= 0 && window >= 1, "streaming::select", ": need sinks >= 0 and window >= 1, got ",
          sinks, " and ", window);
  kv::EvictionPlan plan;
  plan.budget = sinks + window;
  plan.dense = true;
  plan.keep.resize(static_cast<std::size_t>(cache.kv_heads()));
  for (index_t h = 0; h < cache.kv_heads(); ++h) {
    const index_t n = cache.length(h);
    auto& k = plan.keep[static_cast<std::size_t>(h)];
    for (index_t j = 0; j < n; ++j)
      if (j < sinks || j >= n - window) k.push_back(j);
    plan.dense = plan.dense && static_cast<index_t>(k.size()) == n;
  }
  return plan;
}

template <class Cache>
kv::EvictionPlan select(const Cache& cache, const StreamingOptions& opt = {}) {
  return select(cache, opt.sinks, resolve_window(cache.sequence_length(), opt));
}

/// select() then apply().
template <class Cache>
kv::EvictionPlan evict(Cache& cache, index_t sinks, index_t window) {
  kv::EvictionPlan plan = select(cache, sinks, window);
  if (!plan.dense) kv::apply(plan, cache);
  return plan;
}

}  // namespace streaming
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
