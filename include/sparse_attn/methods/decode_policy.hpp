/// @file
/// The one plug-in interface of decode methods: a DecodePolicy is one method at one budget, bound
/// to one layer's cache for a sequence, with the hooks a serving loop calls (DecodeSession in
/// pipeline.hpp, the evaluator's decode loop, the tool):
///
///   after_prefill(q_prompt, cache, opt)   once, after the prompt's K/V were appended: may evict
///                                         (SnapKV, Ada-SnapKV, H2O's seed, StreamingLLM)
///   before_step(q, cache, opt) -> keys    each step, after the step's K/V were appended and before
///                                         the kernel: may evict (StreamingLLM evicts here, so the
///                                         step attends S + W keys) and returns the keys the kernel
///                                         reads (Quest's pages; KeySelection::all() otherwise)
///   after_step(q, cache, opt, key_mass)   each step, after the kernel: H2O adds the step's
///                                         attention mass to its scores and evicts
///
/// Lazy eviction: a policy may evict by marking slots dead instead of compacting the cache (H2O:
/// one token per step would otherwise shift half the cache); its before_step then returns the
/// live slots, live_tokens(cache) counts them and compact(cache) drops the dead ones at once.
///
/// opt are the AttentionOptions the kernel runs with (scale, executor): the same for the method.
/// needs_key_bounds(): the cache must keep per-page key min/max (Quest). wants_key_mass(): the
/// step's kernel should emit the mass each key receives (AttentionOptions::key_mass, summed over
/// the step's query rows and the heads of each GQA group), given to after_step as key_mass
/// [Hkv][cache.max_length()] (row stride cache.max_length() as it is when the kernel runs); a
/// policy given nullptr computes what it needs itself.
///
/// Failures: a hook that throws leaves the cache as it found it (policies validate before they
/// evict), so a loop can undo the step's append (DecodeSession does).
///
/// make_policy<Cache, TQ>(method, budget) builds the policy of any decode method: the method's own
/// policy<Cache, TQ>(budget) when it has one (H2O, StreamingLLM), else, for a select() that returns
/// a kv::EvictionPlan, a policy that evicts once after the prompt (SnapKV, Ada-SnapKV), else a
/// selection policy that calls method.select(q, cache, budget, opt) -> DecodeSelection every step
/// (Quest, Dense). evict(method, q, cache, budget, opt) is select + apply for eviction methods.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <memory>
#include <type_traits>
#include <utility>

#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kv/eviction.hpp"
#include "sparse_attn/mask/key_selection.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

template <class Cache, class TQ = float>
class DecodePolicy {
 public:
  using QView = TensorView<const TQ>;

  virtual ~DecodePolicy() = default;
  /// The method's registry name.
  virtual const char* name() const = 0;
  /// The cache must keep per-page key min/max (kv::CacheOptions::key_bounds).
  virtual bool needs_key_bounds() const { return false; }
  /// after_step() uses the step's per-key attention mass when the kernel emits it.
  virtual bool wants_key_mass() const { return false; }

  /// Once, after the prompt's K/V were appended; q_prompt: the prompt's queries (at least its
  /// last rows: what the method scores with), the last q_prompt.tokens positions of the cache.
  virtual void after_prefill(const QView& q_prompt, Cache& cache, const AttentionOptions& opt) {
    (void)q_prompt, (void)cache, (void)opt;
  }
  /// Each step, after its K/V were appended: may evict; returns the keys the kernel reads.
  virtual KeySelection before_step(const QView& q, Cache& cache, const AttentionOptions& opt) {
    (void)q, (void)cache, (void)opt;
    return KeySelection::all();
  }
  /// Each step, after the kernel; key_mass: see the header comment (nullable).
  virtual void after_step(const QView& q, Cache& cache, const AttentionOptions& opt,
                          const float* key_mass) {
    (void)q, (void)cache, (void)opt, (void)key_mass;
  }

  /// Every check the step's hooks (before_step, after_step) would make that does not depend on
  /// what they compute, without changing anything. DecodeSession::step runs it on every policy
  /// before it appends, so that a step that throws has changed nothing; `cache` does not yet
  /// hold the step's tokens, `key_mass` says whether after_step will get the kernel's mass.
  virtual void check_step(const QView& q, const Cache& cache, const AttentionOptions& opt,
                          bool key_mass) const {
    (void)q, (void)cache, (void)opt, (void)key_mass;
  }
  /// before_step returns a selection other than KeySelection::all() (Quest, Dense): the session
  /// allows one such policy, after every policy that evicts in before_step.
  virtual bool selects_keys() const { return false; }
  /// before_step may evict (StreamingLLM).
  virtual bool evicts_before_step() const { return false; }

  /// Tokens the cache holds for this policy, summed over KV heads: cache.total_length(), less
  /// the slots a lazily compacting policy (H2O) evicted but has not yet compacted away (dead
  /// slots: its before_step selections skip them). What reports of cache occupancy count.
  virtual index_t live_tokens(const Cache& cache) const { return cache.total_length(); }
  /// Removes such dead slots from the cache now, so that cache.total_length() ==
  /// live_tokens(cache) and every slot is live for whoever reads the cache next (a session
  /// combining policies calls it). A no-op for policies that evict eagerly.
  virtual void compact(Cache& cache) { (void)cache; }

  /// The budget the policy was made for.
  const Budget& budget() const { return budget_; }
  /// The statistics of the latest selection or eviction (target = budget()).
  const SelectionStats& stats() const { return stats_; }
  /// The latest eviction's plan (kept slots, scores), or nullptr when the policy has not evicted.
  const kv::EvictionPlan* last_eviction() const { return evicted_ ? &eviction_ : nullptr; }

 protected:
  explicit DecodePolicy(const Budget& budget) : budget_(budget) { stats_.target = budget; }
  /// Records an eviction plan as the latest (and its statistics). Copies the statistics first:
  /// if that throws, nothing changed.
  void record(kv::EvictionPlan&& plan) {
    SelectionStats stats = plan.stats;
    record(std::move(plan), std::move(stats));
  }
  /// The same with the statistics copied beforehand (before the cache changed): cannot throw.
  void record(kv::EvictionPlan&& plan, SelectionStats&& stats) noexcept {
    stats_ = std::move(stats);
    eviction_ = std::move(plan);
    evicted_ = true;
  }

  Budget budget_;
  SelectionStats stats_;
  kv::EvictionPlan eviction_;
  bool evicted_ = false;
};

/// A method whose decode select(q, cache, budget, opt) returns the keys of each step (Quest,
/// Dense), as a policy. Method::needs_key_bounds (a static constexpr bool, false when absent)
/// says whether the cache must keep page key bounds.
template <class Cache, class TQ, class Method>
class SelectionPolicy final : public DecodePolicy<Cache, TQ> {
 public:
  using QView = TensorView<const TQ>;
  SelectionPolicy(const Method& m, const Budget& budget)
      : DecodePolicy<Cache, TQ>(budget), method_(m) {}
  const char* name() const override { return Method::name; }
  bool needs_key_bounds() const override { return bounds_v<Method>; }
  bool selects_keys() const override { return true; }
  /// Selects into a second buffer, swapped in on success: a select that throws leaves
  /// selection() and stats() as they were (both buffers are reused as workspace).
  KeySelection before_step(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    method_.select(q, static_cast<const Cache&>(cache), this->budget_, opt, spare_);
    KeySelection keys = spare_.keys;
    SelectionStats stats = spare_.stats;
    std::swap(sel_, spare_);
    this->stats_ = std::move(stats);
    return keys;
  }
  const Method& method() const { return method_; }
  /// The latest step's selection.
  const DecodeSelection& selection() const { return sel_; }

 private:
  template <class M, class = void>
  struct bounds : std::false_type {};
  template <class M>
  struct bounds<M, std::void_t<decltype(M::needs_key_bounds)>>
      : std::integral_constant<bool, M::needs_key_bounds> {};
  template <class M>
  static constexpr bool bounds_v = bounds<M>::value;

  Method method_;
  DecodeSelection sel_, spare_;
};

/// select() then apply() for any eviction method (SnapKV, Ada-SnapKV, H2O, StreamingLLM): the
/// cache keeps the plan's slots, compacted in place; returns the plan (kept slots, scores, stats).
/// If it throws (the selection, or the cache rejecting the plan), the cache is untouched.
template <class Method, class TQ, class Cache>
kv::EvictionPlan evict(const Method& m, const TensorView<TQ>& q, Cache& cache, const Budget& budget,
                       const AttentionOptions& opt = {}) {
  kv::EvictionPlan plan = m.select(q, static_cast<const Cache&>(cache), budget, opt);
  kv::apply(plan, cache);  // all or nothing; the move out cannot throw
  return plan;
}

namespace detail {
/// evict() for a policy: selects, copies the statistics, applies (the last step that can
/// throw), then records without throwing. A policy whose hook throws has changed nothing.
template <class Method, class TQ, class Cache, class Policy>
void evict_and_record(const Method& m, const TensorView<TQ>& q, Cache& cache, const Budget& budget,
                      const AttentionOptions& opt, Policy& policy) {
  kv::EvictionPlan plan = m.select(q, static_cast<const Cache&>(cache), budget, opt);
  SelectionStats stats = plan.stats;
  kv::apply(plan, cache);
  policy.commit(std::move(plan), std::move(stats));
}
}  // namespace detail

/// A method whose eviction happens once, after the prompt (SnapKV, Ada-SnapKV), as a policy:
/// after_prefill selects and applies; decode steps attend the whole (evicted) cache, each head
/// its own length (decode(q, cache, ...) handles Ada-SnapKV's uneven heads).
template <class Cache, class TQ, class Method>
class PrefillEvictionPolicy final : public DecodePolicy<Cache, TQ> {
 public:
  using QView = TensorView<const TQ>;
  PrefillEvictionPolicy(const Method& m, const Budget& budget)
      : DecodePolicy<Cache, TQ>(budget), method_(m) {}
  const char* name() const override { return Method::name; }
  void after_prefill(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    detail::evict_and_record(method_, q, cache, this->budget_, opt, *this);
  }
  void commit(kv::EvictionPlan&& plan, SelectionStats&& stats) noexcept {
    this->record(std::move(plan), std::move(stats));
  }

 private:
  Method method_;
};

namespace detail {
template <class M, class Cache, class TQ, class = void>
struct has_policy : std::false_type {};

/// Eviction methods: select(q, cache, budget, opt) returns a kv::EvictionPlan.
template <class M, class TQ, class Cache, class = void>
struct selects_eviction : std::false_type {};
template <class M, class TQ, class Cache>
struct selects_eviction<M, TQ, Cache,
                        std::enable_if_t<std::is_same_v<
                            decltype(std::declval<const M&>().select(
                                std::declval<const TensorView<const TQ>&>(),
                                std::declval<const Cache&>(), std::declval<const Budget&>(),
                                std::declval<const AttentionOptions&>())),
                            kv::EvictionPlan>>> : std::true_type {};
template <class M, class Cache, class TQ>
struct has_policy<M, Cache, TQ,
                  std::void_t<decltype(std::declval<const M&>().template policy<Cache, TQ>(
                      std::declval<const Budget&>()))>> : std::true_type {};

/// Selection methods may take a DecodeSelection& to reuse; those that do not are adapted here.
template <class M, class TQ, class Cache, class = void>
struct select_into : std::false_type {};
template <class M, class TQ, class Cache>
struct select_into<M, TQ, Cache,
                   std::void_t<decltype(std::declval<const M&>().select(
                       std::declval<const TensorView<const TQ>&>(), std::declval<const Cache&>(),
                       std::declval<const Budget&>(), std::declval<const AttentionOptions&>(),
                       std::declval<DecodeSelection&>()))>> : std::true_type {};

template <class M>
struct SelectInto {
  M m;
  static constexpr const char* name = M::name;
  template <class TQ, class Cache>
  void select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
              const AttentionOptions& opt, DecodeSelection& out) const {
    out = m.select(q, cache, budget, opt);
  }
};
}  // namespace detail

/// The policy of decode method `m` at `budget` for a cache type and query dtype.
template <class Cache, class TQ, class Method>
std::unique_ptr<DecodePolicy<Cache, TQ>> make_policy(const Method& m, const Budget& budget) {
  budget.validate(Method::name);
  if constexpr (detail::has_policy<Method, Cache, TQ>::value) {
    return m.template policy<Cache, TQ>(budget);
  } else if constexpr (detail::selects_eviction<Method, TQ, Cache>::value) {
    return std::make_unique<PrefillEvictionPolicy<Cache, TQ, Method>>(m, budget);
  } else if constexpr (detail::select_into<Method, TQ, Cache>::value) {
    return std::make_unique<SelectionPolicy<Cache, TQ, Method>>(m, budget);
  } else {
    return std::make_unique<SelectionPolicy<Cache, TQ, detail::SelectInto<Method>>>(
        detail::SelectInto<Method>{m}, budget);
  }
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
