/// @file
/// StreamingLLM, the decode eviction form of the sliding window (docs/METHODS.md, section
/// "sliding_window and streaming"). The cache keeps the first S tokens
/// (attention sinks) and the most recent W; everything else is evicted, at the end of prefill and
/// whenever a decode step's token grows a head past S + W, before the step attends (so every step
/// reads exactly S + W keys). Positions are not re-indexed (keys are post-RoPE, see kv/cache.hpp):
/// the sinks keep positions 0..S-1 and the window its true positions. The prefill form (A-shape
/// mask) is methods/sliding_window.hpp. No scores: the plan's scores are empty.
///
/// Budget (unit tokens per KV head, T = S + W): count(T), or compression(CR): T =
/// count_for_compression(sequence length, CR) at every eviction, so the CR holds as the sequence
/// grows. S = min(sinks, T - 1) and W = T - S (W >= 1: the newest token is always kept). Achieved
/// CR = sequence length / tokens kept; a compression target the cache cannot reach (CR 10 on a
/// cache of 5 tokens keeps 1 token: CR 5) reports reachable = false. Registry name "streaming"
/// (decode).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/eviction.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/decode_policy.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// StreamingLLM as a method: keep S sinks and the W most recent tokens of every KV head. A value
/// type of one parameter; its member functions are const, keep no state and may be called
/// concurrently (on caches nobody modifies meanwhile).
struct StreamingLLM {
  static constexpr const char* name = "streaming";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "StreamingLLM: 4 sinks + recent window";
  static constexpr BudgetUnit unit = BudgetUnit::tokens;  ///< tokens per KV head, T = S + W

  index_t sinks = 4;  ///< S: first tokens always kept (>= 0; at most T - 1 are; default 4)

  /// Hands the parameter to the registry: v("sinks", sinks, help).
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("sinks", sinks, "first tokens always kept (attention sinks), at most budget - 1");
  }

  /// The tokens each head keeps, T = S + W, for a sequence of n tokens so far.
  /// @param n       the cache's sequence length (tokens ever appended).
  /// @param budget  count(T), or compression(CR): T = max(1, count_for_compression(n, CR)).
  /// @return T, >= 1 for a valid budget.
  /// @throws sparse_attn::invalid_argument if the budget is malformed or a mass budget, or
  ///         sinks < 0.
  /// O(1), no allocation.
  index_t total_for(index_t n, const Budget& budget) const {
    require_budget_kind(budget, true, true, false, name);
    require(sinks >= 0, name, ": sinks must be >= 0, got ", sinks);
    return budget.is_count()
               ? budget.units()
               : std::max<index_t>(1, count_for_compression(n, budget.target_compression()));
  }

  /// Keep the first S and the last W slots of every head (does not modify the cache).
  /// @param cache   the layer's cache (any head lengths).
  /// @param budget  count or compression, see total_for().
  /// @return the plan: keep[h] = the kept slots of head h, ascending; no scores; dense when
  ///         nothing is dropped; stats with detail "S=4 W=...".
  /// @throws sparse_attn::invalid_argument as total_for().
  /// Complexity O(Hkv x n) (n = a head's length); allocates the kept-slot lists, at most
  /// Hkv x min(n, T) indices.
  template <class Cache>
  kv::EvictionPlan select(const Cache& cache, const Budget& budget) const {
    kv::EvictionPlan plan;
    {
      SelectionTimer timer(plan.stats);
      const index_t total = total_for(cache.sequence_length(), budget);
      const index_t S = std::min(sinks, total - 1), W = total - S;
      plan.dense = true;
      plan.keep.resize(static_cast<std::size_t>(cache.kv_heads()));
      for (index_t h = 0; h < cache.kv_heads(); ++h) {
        const index_t n = cache.length(h);
        auto& k = plan.keep[static_cast<std::size_t>(h)];
        k.reserve(static_cast<std::size_t>(std::min(n, total)));
        for (index_t j = 0; j < n; ++j)
          if (j < S || j >= n - W) k.push_back(j);
        plan.dense = plan.dense && static_cast<index_t>(k.size()) == n;
      }
      kv::finish_eviction_stats(plan, cache, budget, true,
                                "S=" + std::to_string(S) + " W=" + std::to_string(W));
    }
    return plan;
  }
  /// The selection contract's form: select(cache, budget) (q and opt are not read).
  /// @param q       the queries (ignored).
  /// @param cache   the layer's cache.
  /// @param budget  count or compression.
  /// @param opt     ignored.
  /// @return the plan, as select(cache, budget).
  /// @throws sparse_attn::invalid_argument as total_for().
  template <class TQ, class Cache>
  kv::EvictionPlan select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                          const AttentionOptions& opt = {}) const {
    (void)q, (void)opt;
    return select(cache, budget);
  }

  /// The method's decode policy (StreamingPolicy); what make_policy() returns for it.
  /// @param budget  count or compression.
  /// @return the policy (one heap allocation).
  /// @throws sparse_attn::invalid_argument as total_for() (checked here, once).
  template <class Cache, class TQ>
  std::unique_ptr<DecodePolicy<Cache, TQ>> policy(const Budget& budget) const;
};

/// StreamingLLM as a policy: evicts after the prompt and before every step attends, so every
/// step reads S + W keys. Each eviction costs O(Hkv x n) plus the compaction of the moved rows
/// (the window shifts by the step's tokens).
template <class Cache, class TQ>
class StreamingPolicy final : public DecodePolicy<Cache, TQ> {
 public:
  /// The query view type the hooks take: [Hq, n_q, d].
  using QView = TensorView<const TQ>;
  /// The policy of method `m` (copied) at `budget` (not validated here: use policy()).
  /// @param m       the configured method.
  /// @param budget  count or compression.
  StreamingPolicy(const StreamingLLM& m, const Budget& budget)
      : DecodePolicy<Cache, TQ>(budget), method_(m) {}
  const char* name() const override { return StreamingLLM::name; }
  bool evicts_before_step() const override { return true; }
  void after_prefill(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    detail::evict_and_record(method_, q, cache, this->budget_, opt, *this);
  }
  KeySelection before_step(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    detail::evict_and_record(method_, q, cache, this->budget_, opt, *this);
    return KeySelection::all();
  }
  /// Records an applied plan (used by the eviction helper; cannot throw).
  /// @param plan   the applied plan; moved from.
  /// @param stats  its statistics; moved from.
  void commit(kv::EvictionPlan&& plan, SelectionStats&& stats) noexcept {
    this->record(std::move(plan), std::move(stats));
  }

 private:
  StreamingLLM method_;
};

template <class Cache, class TQ>
std::unique_ptr<DecodePolicy<Cache, TQ>> StreamingLLM::policy(const Budget& budget) const {
  total_for(1, budget);  // validates the budget and the parameters
  return std::make_unique<StreamingPolicy<Cache, TQ>>(*this, budget);
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
