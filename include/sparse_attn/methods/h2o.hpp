// Method 8 (METHODS.md): H2O, heavy-hitter eviction during decode, per KV head.
//
// Accumulated score of token j (per KV head) = sum of the softmax probabilities it has received
// from every query so far, summed over the G query heads of the group: the prompt's queries
// (column sums of causal attention, exact fp32 two-pass softmax) and then every decode step's.
// Whenever a head holds more than H + R tokens it keeps the R most recent and the top H of the
// rest by score (ties toward the lower position) and drops the others; an evicted token's score
// is dropped with it. H + R >= n keeps everything (dense).
//
// The probabilities are recomputed by a separate pass over the (small, H + R) cache after the
// kernel ran, so the kernel stays method-agnostic. The prompt's column sums cost O(n^2 d) like a
// dense prefill; H2OOptions::prefill_queries = k > 0 seeds them from the last k prompt queries
// only (a cheaper approximation; 0, the default, is the method as specified).
// Positions are not re-indexed (keys are post-RoPE): see kv/cache.hpp.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <limits>
#include <vector>

#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/eviction.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct H2OOptions {
  index_t heavy = 0;            // H (when heavy + recent > 0)
  index_t recent = 0;           // R, >= 1 when given
  double compression = 10.0;    // else H + R = ceil(sequence length / CR), R the larger half,
                                // re-resolved every step so the CR holds as the sequence grows
  index_t budget = 0;           // > 0 (and heavy + recent == 0): fixed H + R = budget
  index_t prefill_queries = 0;  // prompt queries that seed the scores (0: every query given)
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1 / sqrt(d)
  int num_threads = 0;           // threads of the default executor (0: OpenMP default)
  Executor* executor = nullptr;  // the caller's executor, not owned; nullptr: the default for
                                 // num_threads
};

namespace h2o {

/// Accumulated scores of one layer's cache. Evict through apply()/step() so the scores stay
/// aligned with the cache slots.
class State {
 public:
  /// Binds to the cache (call it after the prompt was appended) and resolves H and R. Scores
  /// start at 0.
  template <class Cache>
  void reset(const Cache& cache, const H2OOptions& opt) {
    constexpr const char* where = "h2o::State::reset";
    require(opt.heavy >= 0 && opt.recent >= 0, where, ": heavy and recent must be >= 0, got ",
            opt.heavy, " and ", opt.recent);
    require(opt.budget >= 0, where, ": budget must be >= 0 tokens, got ", opt.budget);
    require(opt.prefill_queries >= 0, where, ": prefill_queries must be >= 0, got ",
            opt.prefill_queries);
    require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
            opt.num_threads);
    opt_ = opt;
    cr_ = 0.0;
    if (opt.heavy + opt.recent > 0) {
      require(opt.recent >= 1, where, ": recent must be >= 1 (the newest token is always kept)");
      heavy_ = opt.heavy;
      recent_ = opt.recent;
    } else if (opt.budget > 0) {
      split(opt.budget);
    } else {
      require(std::isfinite(opt.compression) && opt.compression >= 1.0, where,
              ": compression must be finite and >= 1, got ", opt.compression);
      cr_ = opt.compression;
      follow(cache);
    }
    stride_ = cache.capacity();
    scores_.assign(static_cast<std::size_t>(cache.kv_heads() * stride_), 0.0f);
    known_ = 0;
  }

  index_t heavy() const { return heavy_; }
  index_t recent() const { return recent_; }
  const H2OOptions& options() const { return opt_; }
  /// Accumulated score of head h's slots [0, length(h)).
  const float* scores(index_t h) const { return scores_.data() + h * stride_; }

  /// Adds the probabilities that q [Hq, n_q, d] (the newest n_q tokens of the cache, e.g. the
  /// prompt's queries or a decode step) gives every cached key. Slots appended since the last
  /// call start at 0. With prefill_queries = k > 0 only the last k rows of a prompt count.
  template <class TQ, class Cache>
  void observe(const TensorView<TQ>& q, const Cache& cache, bool prompt = false) {
    constexpr const char* where = "h2o::State::observe";
    validate_view(q, "q");
    require(stride_ == cache.capacity() && !scores_.empty(), where, ": call reset(cache) first");
    require(cache.uniform(), where, ": H2O keeps equal head lengths; evict through the State");
    require(q.heads % cache.kv_heads() == 0 && q.dim == cache.head_dim(), where, ": q [", q.heads,
            ", ", q.tokens, ", ", q.dim, "] does not match the cache (Hkv=", cache.kv_heads(),
            ", d=", cache.head_dim(), ")");
    const index_t n = cache.max_length();
    require(q.tokens <= n, where, ": q has ", q.tokens, " queries but the cache ", n, " tokens");
    require(known_ <= n, where, ": the cache shrank behind the State's back; evict through it");
    const index_t row0 = prompt && opt_.prefill_queries > 0
                             ? std::max<index_t>(0, q.tokens - opt_.prefill_queries)
                             : 0;
    // The step's probabilities first: if that pass throws, the State is as it was.
    tmp_.resize(static_cast<std::size_t>(cache.kv_heads() * n));
    kv::detail::attention_column_scores(
        q, row0, cache.keys(), kernel::resolve_scale(opt_.scale, q.dim, where),
        kv::detail::Reduce::sum, 1.0f, tmp_.data(), n, {opt_.executor, opt_.num_threads});
    for (index_t h = 0; h < cache.kv_heads(); ++h)
      std::fill(scores_.begin() + h * stride_ + known_, scores_.begin() + h * stride_ + n, 0.0f);
    known_ = n;
    follow(cache);
    for (index_t h = 0; h < cache.kv_heads(); ++h)
      for (index_t j = 0; j < n; ++j)
        scores_[static_cast<std::size_t>(h * stride_ + j)] +=
            tmp_[static_cast<std::size_t>(h * n + j)];
  }

  /// Tokens to keep (does not modify anything): the R most recent plus the top H of the rest.
  template <class Cache>
  kv::EvictionPlan select(const Cache& cache) const {
    require(cache.uniform(), "h2o::State::select", ": H2O keeps equal head lengths");
    const index_t n = cache.max_length(), Hkv = cache.kv_heads();
    kv::EvictionPlan plan;
    plan.budget = heavy_ + recent_;
    plan.dense = n <= heavy_ + recent_;
    plan.score_stride = n;
    plan.scores.resize(static_cast<std::size_t>(Hkv * n));
    plan.keep.resize(static_cast<std::size_t>(Hkv));
    for (index_t h = 0; h < Hkv; ++h) {
      std::copy(scores(h), scores(h) + n, plan.scores.begin() + h * n);
      plan.keep[static_cast<std::size_t>(h)] = kv::detail::keep_top(
          scores(h), n, heavy_ + recent_, [&](index_t j) { return j >= n - recent_; });
    }
    return plan;
  }

  /// Compacts the cache and the scores to the plan's kept slots.
  template <class Cache>
  void apply(const kv::EvictionPlan& plan, Cache& cache) {
    if (plan.dense) return;
    for (index_t h = 0; h < cache.kv_heads(); ++h) {
      const auto& keep = plan.keep[static_cast<std::size_t>(h)];
      float* s = scores_.data() + h * stride_;
      for (std::size_t i = 0; i < keep.size(); ++i) s[i] = s[keep[i]];
    }
    kv::apply(plan, cache);
    known_ = cache.max_length();
  }

  /// One decode step after the kernel: observe q, then evict down to H + R if needed.
  template <class TQ, class Cache>
  kv::EvictionPlan step(const TensorView<TQ>& q, Cache& cache) {
    observe(q, cache);
    kv::EvictionPlan plan = select(cache);
    apply(plan, cache);
    return plan;
  }

 private:
  void split(index_t total) {
    total = std::max<index_t>(total, 1);
    heavy_ = total / 2;
    recent_ = total - heavy_;
  }
  // A target CR keeps H + R = ceil(sequence length / CR) as the sequence grows.
  template <class Cache>
  void follow(const Cache& cache) {
    if (cr_ > 0.0)
      split(static_cast<index_t>(
          std::ceil(static_cast<double>(cache.sequence_length()) / cr_ - 1e-9)));
  }

  H2OOptions opt_;
  double cr_ = 0.0;  // > 0: budget follows the sequence length
  index_t heavy_ = 0, recent_ = 1, stride_ = 0, known_ = 0;
  std::vector<float> scores_;  // [Hkv][capacity], aligned with the cache slots
  std::vector<float> tmp_;
};

}  // namespace h2o
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
