/// @file
/// The one plug-in interface of decode methods: a DecodePolicy is one method at one budget, bound
/// to one layer's cache for a sequence, with the hooks a serving loop calls (DecodeSession in
/// pipeline.hpp, the evaluator's decode loop, the tool):
///
/// @code{.unparsed}
///   after_prefill(q_prompt, cache, opt)   once, after the prompt's K/V were appended: may evict
///                                         (SnapKV, Ada-SnapKV, H2O's seed, StreamingLLM)
///   before_step(q, cache, opt) -> keys    each step, after the step's K/V were appended and before
///                                         the kernel: may evict (StreamingLLM evicts here, so the
///                                         step attends S + W keys) and returns the keys the kernel
///                                         reads (Quest's pages; KeySelection::all() otherwise)
///   after_step(q, cache, opt, key_mass)   each step, after the kernel: H2O adds the step's
///                                         attention mass to its scores and evicts
/// @endcode
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
///
/// Thread safety: a policy holds the state of one sequence's layer (scores, the last plan,
/// lazily evicted slots) and is driven by one thread at a time; distinct policies (layers,
/// sequences) are independent and may run concurrently. See docs/METHODS.md, section "Entry
/// points".
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

/// One decode method at one budget, bound to one layer's KV cache for a sequence: the hooks a
/// decode loop calls around the prompt and every step (see the file comment for their order).
/// The base class is the dense policy: it never evicts and every step reads every key. Built by
/// make_policy() or make_decode_policy(); not copyable through the interface (held by
/// std::unique_ptr). Stateful: drive one instance from one thread at a time.
/// @tparam Cache  the KV cache type (kv::Cache or a type of its interface).
/// @tparam TQ     the element type of the query views (float, bf16, fp16).
template <class Cache, class TQ = float>
class DecodePolicy {
 public:
  /// The query view type the hooks take: [Hq, n_q, d].
  using QView = TensorView<const TQ>;

  virtual ~DecodePolicy() = default;
  /// @return the method's registry name (a static string).
  virtual const char* name() const = 0;
  /// @return true if the cache must keep per-page key min/max (kv::CacheOptions::key_bounds);
  ///         Quest's policy does.
  virtual bool needs_key_bounds() const { return false; }
  /// @return true if after_step() uses the step's per-key attention mass when the kernel emits
  ///         it (AttentionOptions::key_mass); H2O's policy does.
  virtual bool wants_key_mass() const { return false; }

  /// Once, after the prompt's K/V were appended: may score the prompt and evict. If it throws,
  /// the cache is as it found it. The base does nothing.
  /// @param q_prompt  the prompt's queries, [Hq, n_q, d] view (at least its last rows: what the
  ///                  method scores with), the last q_prompt.tokens positions of the cache.
  /// @param cache     the layer's cache, holding the prompt.
  /// @param opt       the options the kernel runs with (scale, executor).
  /// @throws sparse_attn::invalid_argument on inputs the method rejects (see its select()).
  virtual void after_prefill(const QView& q_prompt, Cache& cache, const AttentionOptions& opt) {
    (void)q_prompt, (void)cache, (void)opt;
  }
  /// Each step, after the step's K/V were appended and before the kernel: may evict (then the
  /// cache is as it found it if it throws). The base returns KeySelection::all().
  /// @param q      the step's queries, [Hq, n_q, d] view: the newest n_q tokens of the cache.
  /// @param cache  the layer's cache, holding the step's tokens.
  /// @param opt    the options the kernel runs with.
  /// @return the keys the step's kernel reads (decode(q, cache, out, keys, opt)).
  /// @throws sparse_attn::invalid_argument on inputs the method rejects.
  virtual KeySelection before_step(const QView& q, Cache& cache, const AttentionOptions& opt) {
    (void)q, (void)cache, (void)opt;
    return KeySelection::all();
  }
  /// Each step, after the kernel: may update scores and evict. The base does nothing.
  /// @param q         the step's queries, [Hq, n_q, d] view.
  /// @param cache     the layer's cache.
  /// @param opt       the options the kernel ran with.
  /// @param key_mass  the kernel's per-key attention mass, [Hkv][cache.max_length()] fp32 (row
  ///                  stride cache.max_length() as it was when the kernel ran), summed over the
  ///                  step's query rows and each GQA group's heads; nullptr when not emitted
  ///                  (the policy then computes what it needs itself).
  /// @throws sparse_attn::invalid_argument on inputs the method rejects.
  virtual void after_step(const QView& q, Cache& cache, const AttentionOptions& opt,
                          const float* key_mass) {
    (void)q, (void)cache, (void)opt, (void)key_mass;
  }

  /// Every check the step's hooks (before_step, after_step) would make that does not depend on
  /// what they compute, without changing anything. DecodeSession::step runs it on every policy
  /// before it appends, so that a step that throws has changed nothing; `cache` does not yet
  /// hold the step's tokens, `key_mass` says whether after_step will get the kernel's mass.
  /// @param q         the step's queries, [Hq, n_q, d] view.
  /// @param cache     the layer's cache, before the step's append.
  /// @param opt       the options the kernel will run with.
  /// @param key_mass  whether after_step() will be given the kernel's key mass.
  /// @throws sparse_attn::invalid_argument when a hook of the step would reject its inputs.
  virtual void check_step(const QView& q, const Cache& cache, const AttentionOptions& opt,
                          bool key_mass) const {
    (void)q, (void)cache, (void)opt, (void)key_mass;
  }
  /// before_step returns a selection other than KeySelection::all() (Quest, Dense): the session
  /// allows one such policy, after every policy that evicts in before_step.
  /// @return whether this policy selects keys in before_step.
  virtual bool selects_keys() const { return false; }
  /// @return true if before_step may evict (StreamingLLM).
  virtual bool evicts_before_step() const { return false; }

  /// Tokens the cache holds for this policy, summed over KV heads: cache.total_length(), less
  /// the slots a lazily compacting policy (H2O) evicted but has not yet compacted away (dead
  /// slots: its before_step selections skip them). What reports of cache occupancy count.
  /// @param cache  the layer's cache this policy is bound to.
  /// @return live tokens, summed over KV heads. O(Hkv) for the base; no allocation.
  virtual index_t live_tokens(const Cache& cache) const { return cache.total_length(); }
  /// Removes such dead slots from the cache now, so that cache.total_length() ==
  /// live_tokens(cache) and every slot is live for whoever reads the cache next (a session
  /// combining policies calls it). A no-op for policies that evict eagerly.
  /// @param cache  the layer's cache this policy is bound to.
  /// @throws sparse_attn::invalid_argument if the cache no longer matches the policy's state;
  ///         the cache is then unchanged.
  virtual void compact(Cache& cache) { (void)cache; }

  /// @return the budget the policy was made for.
  const Budget& budget() const { return budget_; }
  /// @return the statistics of the latest selection or eviction (target = budget()).
  const SelectionStats& stats() const { return stats_; }
  /// @return the latest eviction's plan (kept slots, scores), or nullptr when the policy has
  ///         not evicted; valid until the next hook call.
  const kv::EvictionPlan* last_eviction() const { return evicted_ ? &eviction_ : nullptr; }

 protected:
  /// A policy at `budget` (stats().target = budget).
  /// @param budget  the budget every selection or eviction of the policy asks for.
  explicit DecodePolicy(const Budget& budget) : budget_(budget) { stats_.target = budget; }
  /// Records an eviction plan as the latest (and its statistics). Copies the statistics first:
  /// if that throws, nothing changed.
  /// @param plan  the eviction just applied; moved from.
  void record(kv::EvictionPlan&& plan) {
    SelectionStats stats = plan.stats;
    record(std::move(plan), std::move(stats));
  }
  /// The same with the statistics copied beforehand (before the cache changed): cannot throw.
  /// @param plan   the eviction just applied; moved from.
  /// @param stats  its statistics; moved from.
  void record(kv::EvictionPlan&& plan, SelectionStats&& stats) noexcept {
    stats_ = std::move(stats);
    eviction_ = std::move(plan);
    evicted_ = true;
  }

  Budget budget_;              ///< the budget the policy was made for
  SelectionStats stats_;       ///< statistics of the latest selection or eviction
  kv::EvictionPlan eviction_;  ///< the latest eviction (valid when evicted_)
  bool evicted_ = false;       ///< the policy has evicted at least once
};

/// A method whose decode select(q, cache, budget, opt) returns the keys of each step (Quest,
/// Dense), as a policy. Method::needs_key_bounds (a static constexpr bool, false when absent)
/// says whether the cache must keep page key bounds. Never evicts; holds the method (a copy) and
/// two DecodeSelection buffers reused across steps.
/// @tparam Method  a decode method whose select(q, cache, budget, opt, DecodeSelection&) fills a
///                 selection (make_policy() adapts one that returns it).
template <class Cache, class TQ, class Method>
class SelectionPolicy final : public DecodePolicy<Cache, TQ> {
 public:
  /// The query view type the hooks take: [Hq, n_q, d].
  using QView = TensorView<const TQ>;
  /// The policy of method `m` (copied) at `budget`; nothing is validated here.
  /// @param m       the configured method.
  /// @param budget  the budget of every step's selection.
  SelectionPolicy(const Method& m, const Budget& budget)
      : DecodePolicy<Cache, TQ>(budget), method_(m) {}
  /// @return Method::name.
  const char* name() const override { return Method::name; }
  /// @return Method::needs_key_bounds (false when the method does not declare it).
  bool needs_key_bounds() const override { return bounds_v<Method>; }
  /// @return true: before_step returns the method's selection.
  bool selects_keys() const override { return true; }
  /// Selects into a second buffer, swapped in on success: a select that throws leaves
  /// selection() and stats() as they were (both buffers are reused as workspace).
  /// @param q      the step's queries, [Hq, n_q, d] view: the newest n_q tokens of the cache.
  /// @param cache  the layer's cache (read only).
  /// @param opt    the options the kernel runs with.
  /// @return a copy of the step's KeySelection (allocates the copy).
  /// @throws sparse_attn::invalid_argument what the method's select() throws.
  KeySelection before_step(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    method_.select(q, static_cast<const Cache&>(cache), this->budget_, opt, spare_);
    KeySelection keys = spare_.keys;
    SelectionStats stats = spare_.stats;
    std::swap(sel_, spare_);
    this->stats_ = std::move(stats);
    return keys;
  }
  /// @return the method the policy runs.
  const Method& method() const { return method_; }
  /// @return the latest step's selection (keys and statistics).
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
/// @param m       an eviction method (its select() returns a kv::EvictionPlan).
/// @param q       the queries it scores with, [Hq, n_q, d] view: the newest n_q tokens of the
///                cache (the prompt's, after prefill).
/// @param cache   the layer's cache; compacted to the kept slots (positions are kept).
/// @param budget  the budget (kinds and units of the method).
/// @param opt     scale and executor, as for the kernel.
/// @return the applied plan.
/// @throws sparse_attn::invalid_argument what m.select() or the cache's retain() throws.
/// Cost: the method's selection, then one compaction of the kept K/V rows (O(kept x d)).
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
/// @tparam Method  an eviction method (select(q, cache, budget, opt) -> kv::EvictionPlan).
template <class Cache, class TQ, class Method>
class PrefillEvictionPolicy final : public DecodePolicy<Cache, TQ> {
 public:
  /// The query view type the hooks take: [Hq, n_q, d].
  using QView = TensorView<const TQ>;
  /// The policy of method `m` (copied) at `budget`; the budget's kind is checked by the first
  /// after_prefill().
  /// @param m       the configured method.
  /// @param budget  the budget of the prompt's eviction.
  PrefillEvictionPolicy(const Method& m, const Budget& budget)
      : DecodePolicy<Cache, TQ>(budget), method_(m) {}
  /// @return Method::name.
  const char* name() const override { return Method::name; }
  /// Selects the prompt's eviction and applies it (evict()); records the plan.
  /// @param q      the prompt's queries, [Hq, n_q, d] view.
  /// @param cache  the layer's cache, holding the prompt; compacted.
  /// @param opt    scale and executor.
  /// @throws sparse_attn::invalid_argument what the method's select() or the cache's retain()
  ///         throws; the cache and the policy are then unchanged.
  void after_prefill(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    detail::evict_and_record(method_, q, cache, this->budget_, opt, *this);
  }
  /// Records an applied plan (used by the eviction helper; cannot throw).
  /// @param plan   the applied plan; moved from.
  /// @param stats  its statistics; moved from.
  void commit(kv::EvictionPlan&& plan, SelectionStats&& stats) noexcept {
    this->record(std::move(plan), std::move(stats));
  }

 private:
  Method method_;
};

namespace detail {
template <class M, class Cache, class TQ, class = void>
struct has_policy : std::false_type {};

// Eviction methods: select(q, cache, budget, opt) returns a kv::EvictionPlan.
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

// Selection methods may take a DecodeSelection& to reuse; those that do not are adapted here.
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

/// The policy of decode method `m` at `budget` for a cache type and query dtype: the method's
/// own policy<Cache, TQ>() when it has one (H2O, StreamingLLM), a PrefillEvictionPolicy for an
/// eviction method (SnapKV, Ada-SnapKV), else a SelectionPolicy (Quest, Dense).
/// @tparam Cache   the KV cache type.
/// @tparam TQ      the query element type.
/// @param m        the configured decode method (copied into the policy).
/// @param budget   the budget.
/// @return the new policy (one heap allocation).
/// @throws sparse_attn::invalid_argument if the budget is malformed, or (methods with their own
///         policy) of a kind the method does not take or with invalid parameters. Other methods
///         check the budget's kind at their first selection.
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
