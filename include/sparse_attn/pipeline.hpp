// End-to-end serving loop for one attention layer: prefill with any prefill mask, an eviction
// policy, then decode step by step with any decode selection, each step reporting the keys it
// read and its achieved compression ratio.
//
//   kv::ContiguousCache<bf16> cache({Hkv, d, 0, capacity});
//   SessionOptions so;  so.decode = DecodeMethod::quest;  so.quest.compression = 10;
//   DecodeSession<kv::ContiguousCache<bf16>> s(cache, so);
//   s.prefill(q, k, v, out, [&](auto& q, auto& k) { return methods::block_sparse::select(q, k); });
//   for (...) { StepReport r = s.step(q_t, k_t, v_t, out_t);  r.compression(); }
//
// Prefill masks: prefill() takes either a mask (any type of the common interface) or a callable
// mask(q, k) -> mask, called on the prompt's views, so data-dependent selections
// (block_sparse, vertical_slash, flex_prefill, ...) plug in unchanged. Decode selection:
// DecodeMethod::dense / quest, or set_selector() with any callable. Eviction: Eviction::snapkv /
// ada_snapkv / h2o / streaming, or set_eviction() with any EvictionPolicy.
// Plan/run split for timing: select(q) returns the step's KeySelection (the plan) and
// attend(q, keys, out) runs only the kernel; step() = append + select + attend + evict.
// Threads: every method, the cache's appends and the kernels run on SessionOptions::executor (the
// engine's), or on the default one for num_threads.
// Failures: when a selector or an eviction policy throws (or anything else in step() or
// ingest()), the exception reaches the caller unchanged and the step's append is undone, so the
// cache and `out` are as they were. A custom policy that throws must leave the cache as it found
// it, as the library's do (they validate before they evict). prefill() writes out before it
// appends; if its policy throws, out holds the prompt's attention and the cache is unchanged.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/decode.hpp"
#include "sparse_attn/kernel/prefill.hpp"
#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/decode.hpp"
#include "sparse_attn/kv/eviction.hpp"
#include "sparse_attn/methods/ada_snapkv.hpp"
#include "sparse_attn/methods/h2o.hpp"
#include "sparse_attn/methods/quest.hpp"
#include "sparse_attn/methods/snapkv.hpp"
#include "sparse_attn/methods/streaming.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

enum class DecodeMethod { dense, quest };
enum class Eviction { none, snapkv, ada_snapkv, h2o, streaming };

struct SessionOptions {
  DecodeMethod decode = DecodeMethod::dense;
  methods::QuestOptions quest;
  Eviction eviction = Eviction::none;
  methods::SnapKVOptions snapkv;
  methods::AdaSnapKVOptions ada_snapkv;
  methods::H2OOptions h2o;
  methods::StreamingOptions streaming;
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1 / sqrt(d); used by every method
  int num_threads = 0;  // threads of the default executor (0: OpenMP default); every method
  Executor* executor = nullptr;  // the caller's executor, not owned; nullptr: the default for
                                 // num_threads; every method, kernel and cache append
  index_t split = 512;           // decode kernel split-KV chunk
};

/// What prefill()/ingest() did.
struct PrefillReport {
  index_t tokens = 0;       // prompt tokens appended
  index_t pairs = 0;        // prefill mask's allowed pairs (0 for ingest)
  index_t dense_pairs = 0;  // dense causal pairs of the same shape
  double prefill_ms = 0, evict_ms = 0;
  index_t cache_tokens = 0;   // tokens held after eviction, summed over KV heads
  kv::EvictionPlan eviction;  // the policy's plan (kept slots and scores); empty when none
  double compression() const { return kv::DecodeStats{pairs, dense_pairs, 0}.compression(); }
  /// Prompt tokens x KV heads / tokens kept.
  double cache_compression(index_t kv_heads) const {
    return cache_tokens > 0
               ? static_cast<double>(tokens * kv_heads) / static_cast<double>(cache_tokens)
               : 0.0;
  }
};

/// What one decode step did.
struct StepReport {
  kv::DecodeStats stats;     // pairs computed, dense pairs, K/V rows read
  index_t position = 0;      // position of the step's last token
  index_t cache_tokens = 0;  // tokens held after the step's eviction, summed over KV heads
  index_t evicted = 0;       // tokens the step's eviction dropped, summed over KV heads
  double select_ms = 0, kernel_ms = 0, evict_ms = 0;
  double compression() const { return stats.compression(); }
};

/// An eviction policy: called after the prompt is in the cache and after every decode step.
template <class Cache, class TQ>
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual const char* name() const = 0;
  /// q: the prompt's queries (the last q.tokens positions of the cache).
  virtual kv::EvictionPlan after_prefill(const TensorView<const TQ>& q, Cache& cache) = 0;
  /// q: the step's queries; the kernel already ran over the cache.
  virtual kv::EvictionPlan after_step(const TensorView<const TQ>& q, Cache& cache) = 0;
};

namespace policies {

inline kv::EvictionPlan no_eviction() {
  kv::EvictionPlan p;
  p.dense = true;
  return p;
}

template <class Cache, class TQ>
class SnapKV final : public EvictionPolicy<Cache, TQ> {
 public:
  explicit SnapKV(const methods::SnapKVOptions& o) : opt_(o) {}
  const char* name() const override { return "snapkv"; }
  kv::EvictionPlan after_prefill(const TensorView<const TQ>& q, Cache& c) override {
    return methods::snapkv::evict(q, c, opt_);
  }
  kv::EvictionPlan after_step(const TensorView<const TQ>&, Cache&) override {
    return no_eviction();
  }

 private:
  methods::SnapKVOptions opt_;
};

template <class Cache, class TQ>
class AdaSnapKV final : public EvictionPolicy<Cache, TQ> {
 public:
  explicit AdaSnapKV(const methods::AdaSnapKVOptions& o) : opt_(o) {}
  const char* name() const override { return "ada_snapkv"; }
  kv::EvictionPlan after_prefill(const TensorView<const TQ>& q, Cache& c) override {
    return methods::ada_snapkv::evict(q, c, opt_);
  }
  kv::EvictionPlan after_step(const TensorView<const TQ>&, Cache&) override {
    return no_eviction();
  }

 private:
  methods::AdaSnapKVOptions opt_;
};

template <class Cache, class TQ>
class H2O final : public EvictionPolicy<Cache, TQ> {
 public:
  explicit H2O(const methods::H2OOptions& o) : opt_(o) {}
  const char* name() const override { return "h2o"; }
  kv::EvictionPlan after_prefill(const TensorView<const TQ>& q, Cache& c) override {
    state_.reset(c, opt_);
    state_.observe(q, c, /*prompt=*/true);
    kv::EvictionPlan plan = state_.select(c);
    state_.apply(plan, c);
    return plan;
  }
  kv::EvictionPlan after_step(const TensorView<const TQ>& q, Cache& c) override {
    return state_.step(q, c);
  }
  const methods::h2o::State& state() const { return state_; }

 private:
  methods::H2OOptions opt_;
  methods::h2o::State state_;
};

template <class Cache, class TQ>
class Streaming final : public EvictionPolicy<Cache, TQ> {
 public:
  explicit Streaming(const methods::StreamingOptions& o) : opt_(o) {}
  const char* name() const override { return "streaming"; }
  kv::EvictionPlan after_prefill(const TensorView<const TQ>&, Cache& c) override {
    return evict(c);
  }
  kv::EvictionPlan after_step(const TensorView<const TQ>&, Cache& c) override { return evict(c); }

 private:
  kv::EvictionPlan evict(Cache& c) {
    return methods::streaming::evict(c, opt_.sinks,
                                     methods::streaming::resolve_window(c.sequence_length(), opt_));
  }
  methods::StreamingOptions opt_;
};

}  // namespace policies

template <class Cache, class TQ = float>
class DecodeSession {
 public:
  using Policy = EvictionPolicy<Cache, TQ>;
  using QView = TensorView<const TQ>;
  using Selector = std::function<KeySelection(const QView&, const Cache&)>;

  explicit DecodeSession(Cache& cache, const SessionOptions& opt = {}) : cache_(cache), opt_(opt) {
    propagate(opt_.quest);
    propagate(opt_.snapkv);
    propagate(opt_.ada_snapkv);
    propagate(opt_.h2o);
    switch (opt_.eviction) {
      case Eviction::none:
        break;
      case Eviction::snapkv:
        policy_ = std::make_unique<policies::SnapKV<Cache, TQ>>(opt_.snapkv);
        break;
      case Eviction::ada_snapkv:
        policy_ = std::make_unique<policies::AdaSnapKV<Cache, TQ>>(opt_.ada_snapkv);
        break;
      case Eviction::h2o:
        policy_ = std::make_unique<policies::H2O<Cache, TQ>>(opt_.h2o);
        break;
      case Eviction::streaming:
        policy_ = std::make_unique<policies::Streaming<Cache, TQ>>(opt_.streaming);
        break;
    }
  }

  Cache& cache() { return cache_; }
  const Cache& cache() const { return cache_; }
  const SessionOptions& options() const { return opt_; }
  const Policy* eviction() const { return policy_.get(); }
  /// Replaces the eviction policy (nullptr: none).
  void set_eviction(std::unique_ptr<Policy> p) { policy_ = std::move(p); }
  /// Replaces the decode selection with selector(q, cache) -> KeySelection (empty: use options).
  void set_selector(Selector s) { selector_ = std::move(s); }

  /// Prefill of the prompt q [Hq, n, d], k/v [Hkv, n, d|dv] into an empty cache: out = attention
  /// under `mask` (a mask, or a callable mask(q, k) returning one), computed on the caller's
  /// views; then K/V are appended and the eviction policy runs.
  template <class TK, class TV, class TO, class MaskOrFn>
  PrefillReport prefill(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v,
                        const TensorView<TO>& out, MaskOrFn&& mask_or_fn) {
    require(cache_.sequence_length() == 0, "DecodeSession::prefill",
            ": the cache must be empty (prefill starts a sequence; use ingest() to extend one)");
    const auto t0 = clock::now();
    PrefillReport r;
    if constexpr (std::is_invocable_v<MaskOrFn&, const QView&, const TensorView<TK>&>) {
      const auto mask = mask_or_fn(q, k);
      run_prefill(q, k, v, out, mask, r);
    } else {
      run_prefill(q, k, v, out, mask_or_fn, r);
    }
    const double ms = elapsed_ms(t0);
    PrefillReport ir = ingest(q, k, v);
    ir.pairs = r.pairs;
    ir.dense_pairs = r.dense_pairs;
    ir.prefill_ms = ms;
    return ir;
  }

  /// Appends the prompt's K/V to the cache and runs the eviction policy (no attention output).
  /// q: the prompt's queries, or at least its last rows (what the policy scores with).
  template <class TK, class TV>
  PrefillReport ingest(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v) {
    PrefillReport r;
    r.tokens = k.tokens;
    cache_.append(k, v, executor());
    const auto t0 = clock::now();
    if (policy_) {
      SPARSE_ATTN_TRY { r.eviction = policy_->after_prefill(q, cache_); }
      SPARSE_ATTN_CATCH_ALL {
        undo_append(k.tokens);
        SPARSE_ATTN_RETHROW;
      }
    }
    r.evict_ms = elapsed_ms(t0);
    r.cache_tokens = cache_.total_length();
    return r;
  }

  /// The step's key selection (the plan) for q [Hq, n_q, d], whose K/V are already appended.
  KeySelection select(const QView& q, kv::DecodeStats* stats = nullptr) {
    KeySelection keys;
    if (selector_) {
      keys = selector_(q, cache_);
      if (stats) *stats = kv::decode_stats(keys, cache_, q.heads, q.tokens);
    } else if (opt_.decode == DecodeMethod::quest) {
      methods::quest::select(q, cache_, opt_.quest, quest_plan_);
      keys = quest_plan_.keys;
      if (stats) *stats = quest_plan_.stats;
    } else {
      keys = KeySelection::all();
      if (stats) *stats = kv::decode_stats(keys, cache_, q.heads, q.tokens);
    }
    return keys;
  }

  /// The kernel alone: attention of q over `keys` of the cache into out [Hq, n_q, dv].
  template <class TO>
  void attend(const QView& q, const KeySelection& keys, const TensorView<TO>& out) {
    DecodeOptions o;
    o.scale = opt_.scale;
    o.num_threads = opt_.num_threads;
    o.executor = opt_.executor;
    o.split = opt_.split;
    kv::decode(q, cache_, out, keys, o);
  }

  /// One decode step: append k/v [Hkv, n_q, d|dv] of the new token(s), select, attend, evict.
  /// If any of it throws, the cache and out are as they were.
  template <class TK, class TV, class TO>
  StepReport step(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v,
                  const TensorView<TO>& out) {
    validate_view(out, "out", true);
    // With an eviction policy the kernel writes to staging, copied to out once the policy has
    // run: out [Hq, n_q, dv] is a few KB per step, and a policy that throws leaves it untouched.
    std::vector<std::remove_const_t<TO>> staging(
        policy_ ? static_cast<std::size_t>(out.heads * out.tokens * out.dim) : 0);
    const TensorView<TO> target =
        policy_ ? TensorView<TO>(staging.data(), out.heads, out.tokens, out.dim) : out;
    StepReport r;
    cache_.append(k, v, executor());
    SPARSE_ATTN_TRY {
      auto t0 = clock::now();
      const KeySelection keys = select(q, &r.stats);
      r.select_ms = elapsed_ms(t0);
      t0 = clock::now();
      attend(q, keys, target);
      r.kernel_ms = elapsed_ms(t0);
      const index_t held = cache_.total_length();
      t0 = clock::now();
      if (policy_) policy_->after_step(q, cache_);
      r.evict_ms = elapsed_ms(t0);
      r.evicted = held - cache_.total_length();
    }
    SPARSE_ATTN_CATCH_ALL {
      undo_append(k.tokens);
      SPARSE_ATTN_RETHROW;
    }
    if (policy_)
      for (index_t h = 0; h < out.heads; ++h)
        for (index_t t = 0; t < out.tokens; ++t)
          for (index_t c = 0; c < out.dim; ++c) out(h, t, c) = target(h, t, c);
    r.position = cache_.sequence_length() - 1;
    r.cache_tokens = cache_.total_length();
    return r;
  }

  /// The last Quest plan (bounds, budgets), when decode = quest.
  const methods::QuestPlan& quest_plan() const { return quest_plan_; }

 private:
  using clock = std::chrono::steady_clock;
  static double elapsed_ms(clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
  }
  template <class O>
  void propagate(O& o) {
    if (std::isnan(o.scale)) o.scale = opt_.scale;
    if (o.num_threads == 0) o.num_threads = opt_.num_threads;
    if (o.executor == nullptr) o.executor = opt_.executor;
  }
  ExecutorChoice executor() const { return {opt_.executor, opt_.num_threads}; }
  // After a failure past the append of m tokens: undoes it when the cache still ends with them
  // (a policy that evicted before it threw leaves the cache as it left it). The failure, not
  // this, is what the caller sees.
  void undo_append(index_t m) noexcept {
    SPARSE_ATTN_TRY { cache_.undo_append(m); }
    SPARSE_ATTN_CATCH_ALL {}
  }
  template <class TK, class TV, class TO, class Mask>
  void run_prefill(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v,
                   const TensorView<TO>& out, const Mask& mask, PrefillReport& r) {
    PrefillOptions po;
    po.scale = opt_.scale;
    po.num_threads = opt_.num_threads;
    po.executor = opt_.executor;
    sparse_attn::prefill(q, k, v, out, mask, po);
    r.pairs = mask.pairs();
    r.dense_pairs = mask.shape().dense_pairs();
  }

  Cache& cache_;
  SessionOptions opt_;
  std::unique_ptr<Policy> policy_;
  Selector selector_;
  methods::QuestPlan quest_plan_;
};

SPARSE_ATTN_NAMESPACE_END
