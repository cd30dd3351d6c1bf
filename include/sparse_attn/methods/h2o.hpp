/// @file
/// H2O, heavy-hitter eviction during decode, per KV head (docs/METHODS.md, section "h2o").
///
/// Accumulated score of token j (per KV head) = sum of the softmax probabilities it has received
/// from every query so far, summed over the G query heads of the group: the prompt's queries
/// (column sums of causal attention, exact fp32 two-pass softmax) and then every decode step's.
/// Whenever a head holds more than H + R tokens it keeps the R most recent and the top H of the
/// rest by score (higher first, ties toward the lower position, NaN last) and drops the others; an
/// evicted token's score is dropped with it. H + R >= n keeps everything (dense).
///
/// Budget (unit tokens per KV head, H + R; R the larger half): count(H + R), or compression(CR):
/// H + R = count_for_compression(sequence length, CR), re-resolved every step so the CR holds as
/// the sequence grows. Achieved CR = sequence length / tokens kept; a compression target the
/// sequence is too short for (CR 10 on 5 tokens keeps 1: CR 5) reports reachable = false.
///
/// A decode step's probabilities are the per-key attention mass the decode kernel emits in the
/// same pass (AttentionOptions::key_mass; State::observe_mass): no second pass over the cache.
/// Without it (observe), they are recomputed by a separate pass over the (small, H + R) cache.
/// The prompt's column sums cost O(n^2 d) like a dense prefill; H2O::prefill_queries = k > 0 seeds
/// them from the last k prompt queries only (a cheaper approximation), 0 from every prompt query
/// (the method as specified), and -1 (the default) chooses: every query up to kExactPromptTokens
/// cached prompt tokens, the last kSeedQueries above. Positions are not re-indexed (keys are
/// post-RoPE): see kv/cache.hpp.
///
/// Two ways to run it. H2O::State is eager: step()/apply() compact the cache to the kept slots at
/// once (what select()/evict() and direct users get). H2OPolicy (the pipeline's, the evaluator's
/// and the bench's) evicts lazily: an evicted slot is only marked dead, every step's kernel reads
/// the live slots through a KeySelection, and the cache is compacted in batches; the tokens each
/// step attends and keeps are the eager ones (see H2OPolicy). A step's selection costs O(n)
/// (State::keep_heavy_recent: one scan finds the one token to drop). Registry name "h2o" (decode;
/// make_policy() gives an H2OPolicy).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
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

/// H2O as a method: heavy hitters (top H by accumulated attention) plus the R most recent tokens
/// per KV head. The struct holds the one parameter; the scores live in an H2O::State (eager) or
/// an H2OPolicy (lazy). H2O's own member functions are const and keep no state.
struct H2O {
  static constexpr const char* name = "h2o";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "H2O heavy hitters + recent, evicts every step";
  static constexpr BudgetUnit unit = BudgetUnit::tokens;  ///< tokens per KV head, H + R

  /// Prompt queries that seed the scores: k > 0 the last k, 0 every one, -1 (default) every one
  /// up to kExactPromptTokens prompt tokens and the last kSeedQueries above. Must be >= -1.
  index_t prefill_queries = -1;
  /// prefill_queries = -1: prompts of at most this many cached tokens (8192) are seeded by every
  /// query.
  static constexpr index_t kExactPromptTokens = 8192, kSeedQueries = 2048;
  /// @var kSeedQueries
  /// prefill_queries = -1: the last queries (2048) that seed prompts longer than
  /// kExactPromptTokens.

  /// Hands the parameter to the registry: v("prefill_queries", prefill_queries, help).
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("prefill_queries", prefill_queries,
      "last prompt queries that seed the scores (0: every one; -1: every one up to 8192 prompt "
      "tokens, the last 2048 above)");
  }

  /// The seeding rows for a prompt of n cached tokens.
  /// @param prefill_queries  the parameter (>= -1).
  /// @param n                cached prompt tokens.
  /// @return 0 = every query, else k > 0: the last k. O(1).
  static index_t seed_queries(index_t prefill_queries, index_t n) {
    if (prefill_queries >= 0) return prefill_queries;
    return n > kExactPromptTokens ? kSeedQueries : 0;
  }

  /// Accumulated scores of one layer's cache, [Hkv][capacity] fp32 aligned with the cache slots,
  /// and the resolved H and R. Evict through apply()/step() so the scores stay aligned with the
  /// cache slots. Every mutating member either succeeds or leaves the State (and the cache) as it
  /// was. Not thread-safe: one State per layer and sequence, used from one thread at a time
  /// (const members may run concurrently).
  class State {
   public:
    /// Binds to the cache (call it after the prompt was appended) and resolves H and R. Scores
    /// start at 0. Checks, then allocates, then commits: if it throws the State is as it was.
    /// @param cache      the layer's cache; its capacity sizes the scores.
    /// @param budget     count(H + R) or compression(CR) (re-resolved from the sequence length
    ///                   at every observation).
    /// @param seed_rows  prefill_queries (>= -1): the prompt rows observe(..., prompt = true)
    ///                   counts.
    /// @throws sparse_attn::invalid_argument if the budget is malformed or a mass budget,
    ///         seed_rows < -1, the cache has no KV head or capacity 0, or Hkv x capacity floats
    ///         exceed the largest array; std::bad_alloc if they cannot be allocated.
    /// Allocates Hkv x capacity floats (zeroed: O(Hkv x capacity)).
    template <class Cache>
    void reset(const Cache& cache, const Budget& budget, index_t seed_rows = -1) {
      constexpr const char* where = "methods::H2O::State::reset";
      require_budget_kind(budget, true, true, false, where);
      require(seed_rows >= -1, where,
              ": prefill_queries must be >= 0 (or -1: chosen by the prompt length), got ",
              seed_rows);
      const index_t H = cache.kv_heads(), cap = cache.capacity();
      require(H >= 1 && cap >= 1, where, ": the cache needs kv_heads and capacity >= 1, got ", H,
              " and ", cap);
      const index_t limit = static_cast<index_t>(std::min<std::size_t>(
          std::vector<float>().max_size(),
          static_cast<std::size_t>(std::numeric_limits<index_t>::max()) / sizeof(float)));
      require(cap <= limit / H, where, ": scores of kv_heads ", H, " x capacity ", cap,
              " floats exceed the largest array (", limit, " floats); use a smaller cache");
      std::vector<float> fresh(static_cast<std::size_t>(H * cap), 0.0f);  // may throw bad_alloc
      budget_ = budget;  // the rest cannot throw
      prefill_queries_ = seed_rows;
      follow(cache);
      stride_ = cap;
      scores_.swap(fresh);
      known_ = 0;
    }

    /// @param cache  a cache.
    /// @return whether reset() was called with this cache (or one of the same capacity).
    template <class Cache>
    bool bound_to(const Cache& cache) const {
      return stride_ == cache.capacity() && !scores_.empty();
    }
    /// @return H, the heavy hitters kept per head (as of the latest observation).
    index_t heavy() const { return heavy_; }
    /// @return R, the most recent tokens kept per head (the larger half of H + R).
    index_t recent() const { return recent_; }
    /// @return the budget given to reset().
    const Budget& budget() const { return budget_; }
    /// @param h  KV head, in [0, Hkv) (not checked).
    /// @return the accumulated scores of head h's slots [0, length(h)) (fp32 probability sums).
    const float* scores(index_t h) const { return scores_.data() + h * stride_; }

    /// Adds the probabilities that q [Hq, n_q, d] (the newest n_q tokens of the cache, e.g. the
    /// prompt's queries or a decode step) gives every cached key, computed here (a second pass
    /// over the cache; observe_mass() takes the kernel's instead). Slots appended since the last
    /// call start at 0. With prefill_queries = k > 0 only the last k rows of a prompt count.
    /// @param q      the queries, [Hq, n_q, d] view (any strides; float, bf16 or fp16): the newest
    ///               n_q tokens of the cache.
    /// @param cache   the layer's cache (equal head lengths, bound by reset()).
    /// @param opt     softmax scale (NaN: 1/sqrt(d)) and executor of the pass.
    /// @param prompt  q is the prompt's queries (apply the prefill_queries seeding rule).
    /// @throws sparse_attn::invalid_argument as check_observe(); the State is then unchanged.
    /// Complexity O(Hq x rows x n x d) for the exact fp32 softmax pass (rows = the counted query
    /// rows, n = the cache's length), on opt's executor. Allocates Hkv x n floats of scratch
    /// (kept in the State and reused) plus the pass's scratch (about n x d floats).
    template <class TQ, class Cache>
    void observe(const TensorView<TQ>& q, const Cache& cache, const AttentionOptions& opt = {},
                 bool prompt = false) {
      const float scale = check_observe(q, cache, opt);  // every check, before any change
      const index_t n = cache.max_length();
      const index_t seed = seed_queries(prefill_queries_, n);
      const index_t row0 = prompt && seed > 0 ? std::max<index_t>(0, q.tokens - seed) : 0;
      // The step's probabilities first (tmp_ is scratch): if that pass throws, the State is as
      // it was. add() cannot throw.
      tmp_.resize(static_cast<std::size_t>(cache.kv_heads() * n));
      kv::detail::attention_column_scores(q, row0, cache.keys(), scale, kv::detail::Reduce::sum,
                                          1.0f, tmp_.data(), n, opt.executor_choice());
      add(tmp_.data(), n, cache);
    }

    /// The checks observe(q, cache, opt) makes, in its order, without changing anything.
    /// @param q      the queries, [Hq, n_q, d] view.
    /// @param cache  the layer's cache.
    /// @param opt    the options.
    /// @return the resolved softmax scale.
    /// @throws sparse_attn::invalid_argument if q is an invalid view, the State is not bound to
    ///         the cache (reset()), the head lengths differ, the cache shrank behind the State's
    ///         back, Hq is not a multiple of Hkv or q's head_dim differs from the cache's,
    ///         opt.num_threads < 0, n_q exceeds the cache's length, or opt.scale is neither NaN
    ///         nor finite > 0.
    template <class TQ, class Cache>
    float check_observe(const TensorView<TQ>& q, const Cache& cache,
                        const AttentionOptions& opt = {}) const {
      constexpr const char* where = "methods::H2O::State::observe";
      validate_view(q, "q");
      check(cache, where);
      require(q.heads % cache.kv_heads() == 0 && q.dim == cache.head_dim(), where, ": q [",
              q.heads, ", ", q.tokens, ", ", q.dim, "] does not match the cache (Hkv=",
              cache.kv_heads(), ", d=", cache.head_dim(), ")");
      require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
              opt.num_threads);
      const index_t n = cache.max_length();
      require(q.tokens <= n, where, ": q has ", q.tokens, " queries but the cache ", n, " tokens");
      return kernel::resolve_scale(opt.scale, q.dim, where);
    }
    /// The checks observe_mass(mass, stride, cache) makes, without changing anything.
    /// @param mass    the key mass buffer.
    /// @param stride  its row stride, in floats.
    /// @param cache   the layer's cache.
    /// @throws sparse_attn::invalid_argument if the State is not bound to the cache, the head
    ///         lengths differ, the cache shrank behind the State's back, mass is null or stride
    ///         < the cache's max_length().
    template <class Cache>
    void check_mass(const float* mass, index_t stride, const Cache& cache) const {
      constexpr const char* where = "methods::H2O::State::observe_mass";
      check(cache, where);
      require(mass != nullptr && stride >= cache.max_length(), where,
              ": need a mass buffer with stride >= ", cache.max_length(), ", got stride ", stride);
    }

    /// Adds a kernel-emitted key mass: mass[h * stride + j] = the probability slot j of KV head
    /// h received this step, summed over the group's query heads and the counted rows (the
    /// decode kernel's AttentionOptions::key_mass over the cache's K view, stride >= the cache's
    /// max_length()).
    /// @param mass    [Hkv][stride] fp32 probabilities, slots [0, max_length()) read.
    /// @param stride  row stride of mass, in floats, >= cache.max_length().
    /// @param cache   the layer's cache.
    /// @throws sparse_attn::invalid_argument as check_mass(); the State is then unchanged.
    /// O(Hkv x n), no allocation.
    template <class Cache>
    void observe_mass(const float* mass, index_t stride, const Cache& cache) {
      check_mass(mass, stride, cache);
      add(mass, stride, cache);
    }

    /// Tokens to keep (does not modify anything): the R most recent plus the top H of the rest
    /// (keep_heavy_recent() on every head's slots [0, n)). The plan carries a copy of the scores.
    /// @param cache  the layer's cache (equal head lengths, bound by reset()).
    /// @return the plan: keep[h] ascending, scores [Hkv][n], dense when n <= H + R, stats with
    ///         detail "H=... R=...".
    /// @throws sparse_attn::invalid_argument if the head lengths differ or the State is not
    ///         bound to the cache.
    /// O(Hkv x n) (one scan per head for a few drops), allocates the plan (Hkv x n floats and
    /// indices).
    template <class Cache>
    kv::EvictionPlan select(const Cache& cache) const {
      constexpr const char* where = "methods::H2O::State::select";
      require(cache.uniform(), where, ": H2O keeps equal head lengths");
      require(stride_ == cache.capacity() && !scores_.empty(), where,
              ": call reset(cache) first");
      kv::EvictionPlan plan;
      {
        SelectionTimer timer(plan.stats);
        const index_t n = cache.max_length(), Hkv = cache.kv_heads();
        plan.dense = n <= heavy_ + recent_;
        plan.score_stride = n;
        plan.scores.resize(static_cast<std::size_t>(Hkv * n));
        plan.keep.resize(static_cast<std::size_t>(Hkv));
        for (index_t h = 0; h < Hkv; ++h) {
          const float* sc = scores(h);
          std::copy(sc, sc + n, plan.scores.begin() + h * n);
          auto& keep = plan.keep[static_cast<std::size_t>(h)];
          keep.resize(static_cast<std::size_t>(n));
          std::iota(keep.begin(), keep.end(), index_t{0});
          keep_heavy_recent(sc, keep, heavy_, recent_);
        }
        kv::finish_eviction_stats(plan, cache, budget_, true, detail());
      }
      return plan;
    }

    /// At most this many drops per head take keep_heavy_recent()'s linear path.
    static constexpr index_t kLinearDrops = 8;

    /// The H2O rule on one head's candidate slots, in place: `slots` (ascending slot indices,
    /// e.g. [0, n), or the live slots of H2OPolicy's lazily compacted cache) keeps its last
    /// `recent` entries and the top `heavy` of the others by score[slot] in the one ranking
    /// order (detail/ranking.hpp: higher first, ties toward the lower slot, NaN last), still
    /// ascending. Returns how many entries it dropped: m - (heavy + recent) when the list holds
    /// m > heavy + recent, else 0.
    /// The order is total (ties are broken by slot), so "the top H of `old` candidates" is the
    /// same set as "all but the `old - H` last-ranked ones": with at most `linear_drops` drops
    /// (a decode step's steady state drops one) those are found by one scan keeping the worst
    /// few seen, O(old x drops), and removed in one pass; more drops take nth_element + a sort
    /// of the H kept, O(old + H log H). Same result either way (linear_drops = 0 forces the
    /// general path; tests compare them).
    /// @param score         scores indexed by slot (every slot in `slots` is read).
    /// @param slots         candidate slots, ascending; filtered in place.
    /// @param heavy         H, the heavy hitters kept among the older candidates.
    /// @param recent        R, the most recent candidates always kept.
    /// @param linear_drops  largest drop count taking the linear path (capped at kLinearDrops).
    /// @return the number of slots dropped. Allocates only on the general path (a copy of the
    ///         old candidates); never throws except std::bad_alloc there.
    static index_t keep_heavy_recent(const float* score, std::vector<index_t>& slots, index_t heavy,
                                     index_t recent, index_t linear_drops = kLinearDrops) {
      const index_t m = static_cast<index_t>(slots.size());
      if (m <= heavy + recent) return 0;
      const index_t old = m - recent, top = std::min(heavy, old), drops = old - top;
      const detail::ScoreOrder ranks_before{score};
      if (drops <= std::min(linear_drops, kLinearDrops)) {
        // worst[0..k): the k last-ranked candidates seen so far, in ranking order (worst[k-1]
        // ranks last); a candidate ranking after worst[0] replaces it.
        index_t worst[kLinearDrops];
        index_t k = 0;
        for (index_t i = 0; i < old; ++i) {
          const index_t s = slots[static_cast<std::size_t>(i)];
          index_t at;  // insertion point: worst[0..at) rank before s
          if (k < drops) {
            at = k++;
          } else if (ranks_before(worst[0], s)) {
            for (index_t e = 1; e < k; ++e) worst[e - 1] = worst[e];
            at = k - 1;
          } else {
            continue;
          }
          while (at > 0 && ranks_before(s, worst[at - 1])) {
            worst[at] = worst[at - 1];
            --at;
          }
          worst[at] = s;
        }
        for (index_t i = 1; i < drops; ++i)  // by slot (insertion sort: a few entries), then
          for (index_t e = i; e > 0 && worst[e] < worst[e - 1]; --e)  // removed in one pass
            std::swap(worst[e], worst[e - 1]);
        auto first = std::lower_bound(slots.begin(), slots.begin() + old, worst[0]);
        auto out = first;
        index_t e = 0;
        for (auto it = first; it != slots.end(); ++it) {
          if (e < drops && *it == worst[e]) {
            ++e;
            continue;
          }
          *out++ = *it;
        }
        slots.erase(out, slots.end());
        return drops;
      }
      std::vector<index_t> order(slots.begin(), slots.begin() + old);
      std::nth_element(order.begin(), order.begin() + top, order.end(), ranks_before);
      std::sort(order.begin(), order.begin() + top);
      std::copy(order.begin(), order.begin() + top, slots.begin());
      slots.erase(std::copy(slots.begin() + old, slots.end(), slots.begin() + top), slots.end());
      return drops;
    }

    /// The resolved budget as the plans' stats.detail, e.g. "H=256 R=256".
    /// @return a new string.
    std::string detail() const {
      return "H=" + std::to_string(heavy_) + " R=" + std::to_string(recent_);
    }

    /// Compacts the cache and the scores to the plan's kept slots. If it throws (State not
    /// bound to the cache, or the cache's retain() rejects the plan), nothing changed.
    /// @param plan   a plan of select() for this cache (a dense plan is a no-op).
    /// @param cache  the layer's cache; compacted to the kept slots.
    /// @throws sparse_attn::invalid_argument if the State is not bound to the cache or the
    ///         cache's retain() rejects the plan.
    /// Cost: the cache's compaction (the kept K/V rows that move) plus O(kept) for the scores.
    template <class Cache>
    void apply(const kv::EvictionPlan& plan, Cache& cache) {
      if (plan.dense) return;
      require(stride_ == cache.capacity() && !scores_.empty(), "methods::H2O::State::apply",
              ": call reset(cache) first");
      kv::apply(plan, cache);  // validates the plan before it moves anything; remap cannot throw
      for (index_t h = 0; h < cache.kv_heads(); ++h) {
        const auto& keep = plan.keep[static_cast<std::size_t>(h)];
        float* s = scores_.data() + h * stride_;
        for (std::size_t i = 0; i < keep.size(); ++i) s[i] = s[keep[i]];
      }
      known_ = cache.max_length();
    }

    /// One decode step after the kernel: observe q, then evict down to H + R if needed. If it
    /// throws, the State and the cache are as they were (the scores it added are taken back).
    /// @param q      the queries, [Hq, n_q, d] view (any strides; float, bf16 or fp16): the newest
    ///               n_q tokens of the cache.
    /// @param cache  the layer's cache; compacted when a head exceeds H + R.
    /// @param opt    softmax scale and executor.
    /// @return the step's plan (dense when nothing was dropped).
    /// @throws sparse_attn::invalid_argument as check_observe(), select() or apply().
    /// Cost: observe() plus select() and apply(); allocates a copy of the n scores per head (to
    /// undo on failure) and the plan.
    template <class TQ, class Cache>
    kv::EvictionPlan step(const TensorView<TQ>& q, Cache& cache,
                          const AttentionOptions& opt = {}) {
      check_observe(q, static_cast<const Cache&>(cache), opt);
      Saved saved = save(cache);
      observe(q, static_cast<const Cache&>(cache), opt);
      return select_apply(cache, saved);
    }
    /// The same with the kernel's key mass (observe_mass) instead of a second pass.
    /// @param mass    the kernel's key mass, [Hkv][stride] fp32.
    /// @param stride  its row stride in floats, >= cache.max_length().
    /// @param cache   the layer's cache.
    /// @return the step's plan.
    /// @throws sparse_attn::invalid_argument as check_mass(), select() or apply().
    /// O(Hkv x n) plus the compaction; allocates as step().
    template <class Cache>
    kv::EvictionPlan step_mass(const float* mass, index_t stride, Cache& cache) {
      check_mass(mass, stride, static_cast<const Cache&>(cache));
      Saved saved = save(cache);
      observe_mass(mass, stride, static_cast<const Cache&>(cache));
      return select_apply(cache, saved);
    }

   private:
    // What observe()/observe_mass() change: the scores of slots [0, n), known_, H and R.
    struct Saved {
      std::vector<float> scores;
      index_t heads = 0, n = 0, known = 0, heavy = 0, recent = 0;
    };
    template <class Cache>
    Saved save(const Cache& cache) const {  // after check(): n <= stride_
      Saved s;
      s.heads = cache.kv_heads();
      s.n = cache.max_length();
      s.scores.resize(static_cast<std::size_t>(cache.kv_heads() * s.n));
      for (index_t h = 0; h < cache.kv_heads(); ++h)
        std::copy(scores(h), scores(h) + s.n, s.scores.begin() + h * s.n);
      s.known = known_, s.heavy = heavy_, s.recent = recent_;
      return s;
    }
    void restore(const Saved& s) noexcept {
      for (index_t h = 0; h < s.heads; ++h)
        std::copy(s.scores.begin() + h * s.n, s.scores.begin() + (h + 1) * s.n,
                  scores_.begin() + h * stride_);
      known_ = s.known, heavy_ = s.heavy, recent_ = s.recent;
    }
    template <class Cache>
    kv::EvictionPlan select_apply(Cache& cache, const Saved& saved) {
      SPARSE_ATTN_TRY {
        kv::EvictionPlan plan = select(static_cast<const Cache&>(cache));
        apply(plan, cache);  // the cache's retain is all or nothing; the remap cannot throw
        return plan;
      }
      SPARSE_ATTN_CATCH_ALL {
        restore(saved);
        SPARSE_ATTN_RETHROW;
      }
#if !SPARSE_ATTN_EXCEPTIONS
      return {};
#endif
    }
    template <class Cache>
    void check(const Cache& cache, const char* where) const {
      require(stride_ == cache.capacity() && !scores_.empty(), where,
              ": call reset(cache) first");
      require(cache.uniform(), where, ": H2O keeps equal head lengths; evict through the State");
      require(known_ <= cache.max_length(), where,
              ": the cache shrank behind the State's back; evict through it");
    }
    // scores += p (p[h * p_stride + j] for slots j < max_length()); new slots start at 0.
    template <class Cache>
    void add(const float* p, index_t p_stride, const Cache& cache) {
      const index_t n = cache.max_length();
      for (index_t h = 0; h < cache.kv_heads(); ++h) {
        float* s = scores_.data() + h * stride_;
        std::fill(s + known_, s + n, 0.0f);
        const float* ph = p + h * p_stride;
        for (index_t j = 0; j < n; ++j) s[j] += ph[j];
      }
      known_ = n;
      follow(cache);
    }
    // H + R from the budget (a compression budget follows the sequence length); R the larger half.
    template <class Cache>
    void follow(const Cache& cache) {
      const index_t total = std::max<index_t>(
          1, budget_.is_count()
                 ? budget_.units()
                 : count_for_compression(cache.sequence_length(), budget_.target_compression()));
      heavy_ = total / 2;
      recent_ = total - heavy_;
    }

    Budget budget_;
    index_t prefill_queries_ = -1;
    index_t heavy_ = 0, recent_ = 1, stride_ = 0, known_ = 0;
    std::vector<float> scores_;  // [Hkv][capacity], aligned with the cache slots
    std::vector<float> tmp_;
  };

  /// One-shot H2O eviction (no decode history): scores = the column sums of q [Hq, n_q, d] (the
  /// newest n_q tokens of the cache; the last prefill_queries rows when > 0) over the cache,
  /// then the R most recent and the top H of the rest per head. Does not modify the cache.
  /// @param q      the queries, [Hq, n_q, d] view (any strides; float, bf16 or fp16): the newest
  ///               n_q tokens of the cache.
  /// @param cache   the layer's cache, every head the same length.
  /// @param budget  count(H + R) tokens per KV head, or compression(CR). Mass budgets are refused.
  /// @param opt     softmax scale (NaN: 1/sqrt(d)) and executor of the scoring pass.
  /// @return the plan (keep, scores [Hkv][n], stats with detail "H=... R=...").
  /// @throws sparse_attn::invalid_argument as State::reset(), State::observe() and
  ///         State::select() (budget kind, prefill_queries, views, shapes, scale, threads).
  /// Complexity O(Hq x rows x n x d) for the scores (rows: see prefill_queries) plus O(Hkv x n).
  /// Allocates a State (Hkv x capacity floats), the pass's scratch and the plan. Thread-safe
  /// on a cache nobody modifies meanwhile.
  template <class TQ, class Cache>
  kv::EvictionPlan select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                          const AttentionOptions& opt = {}) const {
    State st;
    st.reset(cache, budget, prefill_queries);
    st.observe(q, cache, opt, /*prompt=*/true);
    return st.select(cache);
  }
  /// The method's decode policy (H2OPolicy); what make_policy() returns for it.
  /// @param budget  count or compression.
  /// @return the policy (one heap allocation; the scores are allocated by after_prefill).
  /// @throws sparse_attn::invalid_argument if the budget is malformed or a mass budget, or
  ///         prefill_queries < -1.
  template <class Cache, class TQ>
  std::unique_ptr<DecodePolicy<Cache, TQ>> policy(const Budget& budget) const;
};

/// H2O as a policy: seeds the scores from the prompt and evicts after it (compacting the cache);
/// after every step's kernel adds the step's probabilities (the kernel's key mass when given) and
/// evicts down to H + R, lazily.
///
/// Lazy compaction. Evicting one token per step from the middle of a position-ordered cache
/// would shift about half of the kept K/V rows of every head each step (retain()'s memmove, ~13
/// MB a step for 3.3k kept tokens x 8 heads x d = 128 in fp32). Instead a step's eviction only
/// takes the slot off the head's live list (the slot is "dead"); the next before_step returns
/// the live slots as a per-KV-head KeySelection, so the kernel reads exactly the live keys an
/// eager eviction would have left, in the same order: the same split chunks and key blocks, so
/// the same outputs and key mass bit for bit. Dead slots get key mass 0 (not read) and their
/// stale scores are never looked at. Recency (the R most recent) and the heavy-hitter ranking
/// run over the live slots only (H2O::State::keep_heavy_recent on the live list); ties toward
/// the lower slot are ties toward the earlier position, as in a compacted cache.
/// The cache is compacted (retain(live) and the scores remapped with it, H2O::State::apply) when
/// a head's dead slots exceed dead_slack(live) = max(16, live / 8), when a next step of as many
/// tokens as this one would not fit the capacity, after the prompt's eviction, before a step
/// without key mass (observe() then scores every slot of the cache) and on compact().
/// Amortised cost: a compaction moves at most each head's live rows, once per more than live / 8
/// steps (one eviction per step), i.e. fewer than 8 K and V rows per head per step (eager: about
/// live / 2), plus O(live) index work per step (the live lists, the selection's ranges) and at
/// most live / 8 more physical slots in the key-mass buffer and the score update.
/// Reporting: live_tokens() counts live slots. After a step last_eviction() describes it without
/// a copy of the scores: keep[h] = head h's live slots of the cache as it stands (ascending;
/// 0..live-1 right after a compaction), stats as for every eviction (pairs = live tokens), scores
/// empty, dense = nothing was dropped that step. After after_prefill it is the prompt's eager
/// plan (kept prompt slots, scores), until the next step. state() holds the scores of the
/// physical slots (a dead slot's is stale); live_selection() the keys the cache holds.
template <class Cache, class TQ>
///
/// Thread safety: stateful (scores, live lists); one policy per layer and sequence, driven by one
/// thread at a time.
class H2OPolicy final : public DecodePolicy<Cache, TQ> {
 public:
  /// The query view type the hooks take: [Hq, n_q, d].
  using QView = TensorView<const TQ>;
  /// The policy of method `m` (copied) at `budget` (not validated here: use H2O::policy()).
  /// @param m       the configured method.
  /// @param budget  count or compression.
  H2OPolicy(const H2O& m, const Budget& budget) : DecodePolicy<Cache, TQ>(budget), method_(m) {}
  /// @return "h2o".
  const char* name() const override { return H2O::name; }
  /// @return true unless the budget can never evict (then no scores are kept).
  bool wants_key_mass() const override { return !never_; }

  /// Dead slots a head may keep before the cache is compacted.
  /// @param live  the head's live slots.
  /// @return max(16, live / 8).
  static index_t dead_slack(index_t live) { return std::max<index_t>(16, live / 8); }

  /// Binds the scores to the cache (H2O::State::reset), seeds them from the prompt's queries and
  /// evicts eagerly down to H + R (compacting the cache); a budget that can never evict (H + R
  /// >= capacity, or CR 1) skips the scores.
  /// @param q      the prompt's queries, [Hq, n_q, d] view.
  /// @param cache  the layer's cache, holding the prompt.
  /// @param opt    softmax scale and executor.
  /// @throws sparse_attn::invalid_argument as H2O::State::reset(), observe(), select() and
  ///         apply(); the policy and the cache are then unchanged.
  void after_prefill(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    State st;
    st.reset(cache, this->budget_, method_.prefill_queries);
    // A budget that can never evict (H + R >= the cache's capacity, or CR 1) needs no scores.
    const Budget& b = this->budget_;
    const bool never = b.is_count() ? b.units() >= cache.capacity() : b.target_compression() == 1.0;
    if (!never) {
      st.observe(q, static_cast<const Cache&>(cache), opt, /*prompt=*/true);
      kv::EvictionPlan plan = st.select(static_cast<const Cache&>(cache));
      SelectionStats stats = plan.stats;  // copied before the cache changes
      st.apply(plan, cache);              // the last step that can throw
      this->record(std::move(plan), std::move(stats));
    }
    state_ = std::move(st);
    never_ = never;
    seeded_ = true;
    lazy_ = false;  // the cache holds live slots only; the live lists start at the next hook
  }
  KeySelection before_step(const QView& q, Cache& cache, const AttentionOptions& opt) override {
    (void)q, (void)opt;
    if (!seeded_ || never_) return KeySelection::all();
    sync(cache);
    return live_selection(cache);
  }
  /// Adds the step's probabilities to the scores and drops, per head, the live slots beyond
  /// H + R (lazily: they become dead; the cache is compacted when dead slots exceed
  /// dead_slack(), or would overflow the capacity). Without key mass, compacts first and runs
  /// H2O::State::step (a second pass over the cache).
  /// @param q         the step's queries, [Hq, n_q, d] view.
  /// @param cache     the layer's cache.
  /// @param opt       softmax scale and executor.
  /// @param key_mass  the kernel's key mass, [Hkv][cache.max_length()] fp32, or nullptr.
  /// @throws sparse_attn::invalid_argument if after_prefill() was not called, the head lengths
  ///         differ, or as H2O::State::check_observe() / check_mass(); every check runs before
  ///         anything changes.
  /// Cost per step: O(Hkv x live) index work (one scan per head for one drop) plus the
  /// amortised compaction (see the class comment).
  void after_step(const QView& q, Cache& cache, const AttentionOptions& opt,
                  const float* key_mass) override {
    check_after_step(q, cache, opt, key_mass);  // every check before anything changes
    if (never_) return;
    if (key_mass == nullptr) {  // observe()'s own pass reads every slot: compact, then eagerly
      compact(cache);
      this->record(state_.step(q, cache, opt));
      lazy_ = false;
      return;
    }
    sync(cache);
    // Validates before it changes anything; dead slots get the kernel's 0.
    state_.observe_mass(key_mass, cache.max_length(), static_cast<const Cache&>(cache));
    kv::EvictionPlan& e = this->eviction_;
    auto& live = e.keep;
    {
      SelectionTimer timer(e.stats);
      index_t dropped = 0;
      for (index_t h = 0; h < cache.kv_heads(); ++h)
        dropped += State::keep_heavy_recent(state_.scores(h), live[static_cast<std::size_t>(h)],
                                            state_.heavy(), state_.recent());
      // Compact when a head holds too many dead slots, or when dead slots would make the next
      // step (as many tokens as this one) overflow the capacity.
      const index_t n = cache.max_length();
      const bool full = n + q.tokens > cache.capacity();
      bool compact_now = false;
      for (const auto& l : live) {
        const index_t held = static_cast<index_t>(l.size()), dead = n - held;
        compact_now = compact_now || dead > dead_slack(held) || (full && dead > 0);
      }
      if (compact_now) compact_live(cache);
      e.dense = dropped == 0;
      kv::finish_eviction_stats(e, cache, this->budget_, true, state_.detail());
    }
    this->stats_ = e.stats;
    this->evicted_ = true;
  }
  /// Every check after_step() makes, without changing anything (DecodeSession runs it before
  /// the step appends: the cache then holds the step's tokens too, which changes no check).
  /// @param q         the step's queries, [Hq, n_q, d] view.
  /// @param cache     the layer's cache.
  /// @param opt       softmax scale and executor.
  /// @param key_mass  whether after_step() will get the kernel's key mass.
  /// @throws sparse_attn::invalid_argument if after_prefill() was not called, the head lengths
  ///         differ, the scores belong to another cache, or (no key mass) as
  ///         H2O::State::check_observe().
  void check_step(const QView& q, const Cache& cache, const AttentionOptions& opt,
                  bool key_mass) const override {
    (void)key_mass;
    require(seeded_, "H2OPolicy::after_step", ": call after_prefill first (it binds the scores)");
    if (never_) return;
    require(cache.uniform(), "H2OPolicy", ": H2O keeps equal head lengths; evict through it");
    require(state_.bound_to(cache), "H2OPolicy::after_step",
            ": the policy's scores belong to another cache (after_prefill binds them)");
    if (!key_mass) state_.check_observe(q, cache, opt);
  }
  index_t live_tokens(const Cache& cache) const override {
    if (!lazy_) return cache.total_length();
    index_t s = 0;
    for (index_t h = 0; h < cache.kv_heads(); ++h) {
      const auto& l = this->eviction_.keep[static_cast<std::size_t>(h)];
      const index_t n = cache.length(h);
      s += static_cast<index_t>(std::lower_bound(l.begin(), l.end(), std::min(n, known_)) -
                                l.begin()) +
           std::max<index_t>(0, n - known_);
    }
    return s;
  }
  void compact(Cache& cache) override {
    if (!seeded_ || never_ || !lazy_) return;
    sync(cache);
    const index_t n = cache.max_length();
    for (const auto& l : this->eviction_.keep)
      if (static_cast<index_t>(l.size()) < n) {
        compact_live(cache);
        return;
      }
  }

  /// The keys the cache holds for this policy: every slot (KeySelection::all()) when none is
  /// dead, else per KV head the ranges of its live slots (what before_step returns).
  /// @param cache  the layer's cache.
  /// @return the selection; O(Hkv x live), allocates the ranges.
  KeySelection live_selection(const Cache& cache) const {
    if (!lazy_ || live_tokens(cache) == cache.total_length()) return KeySelection::all();
    const index_t Hkv = cache.kv_heads();
    std::vector<std::vector<KeyRange>> r(static_cast<std::size_t>(Hkv));
    bool dead = false;
    for (index_t h = 0; h < Hkv; ++h) {
      const auto& l = this->eviction_.keep[static_cast<std::size_t>(h)];
      auto& rh = r[static_cast<std::size_t>(h)];
      const index_t n = cache.length(h);
      index_t held = 0;
      auto add = [&](index_t b, index_t e) {
        if (!rh.empty() && rh.back().end == b)
          rh.back().end = e;
        else
          rh.push_back({b, e});
        held += e - b;
      };
      for (index_t s : l) {
        if (s >= n) break;
        add(s, s + 1);
      }
      if (n > known_) add(known_, n);  // appended since the lists were synced: live
      dead = dead || held < n;
    }
    return dead ? KeySelection::from_ranges(KeySelection::Scope::per_kv_head, r)
                : KeySelection::all();
  }
  /// @return the scores of the physical slots (a dead slot's is stale).
  const H2O::State& state() const { return state_; }

 private:
  using State = H2O::State;
  // after_step's checks, in its order.
  void check_after_step(const QView& q, const Cache& cache, const AttentionOptions& opt,
                        const float* key_mass) const {
    require(seeded_, "H2OPolicy::after_step", ": call after_prefill first (it binds the scores)");
    if (never_) return;
    require(cache.uniform(), "H2OPolicy", ": H2O keeps equal head lengths; evict through it");
    if (key_mass == nullptr)
      state_.check_observe(q, cache, opt);
    else
      state_.check_mass(key_mass, cache.max_length(), cache);
  }
  // The live lists (eviction_.keep) follow the cache: built as 0..n-1 after an eager eviction;
  // slots appended since the last hook are live; an append taken back (undo_append) drops its
  // slots (the last ones).
  void sync(const Cache& cache) {
    require(cache.uniform(), "H2OPolicy", ": H2O keeps equal head lengths; evict through it");
    auto& live = this->eviction_.keep;
    const index_t n = cache.max_length();
    // Allocations first, then changes that cannot throw: a failing sync changes nothing.
    if (!lazy_) {
      std::vector<std::vector<index_t>> fresh(static_cast<std::size_t>(cache.kv_heads()));
      for (auto& l : fresh) {
        l.resize(static_cast<std::size_t>(n));
        std::iota(l.begin(), l.end(), index_t{0});
      }
      live.swap(fresh);
      this->eviction_.scores.clear();
      this->eviction_.score_stride = 0;
      lazy_ = true;
    } else if (n < known_) {
      for (auto& l : live)
        while (!l.empty() && l.back() >= n) l.pop_back();
    } else {
      for (auto& l : live) l.reserve(l.size() + static_cast<std::size_t>(n - known_));
      for (auto& l : live)
        for (index_t s = known_; s < n; ++s) l.push_back(s);
    }
    known_ = n;
  }
  // Compacts the cache and the scores to the live slots (after sync()).
  void compact_live(Cache& cache) {
    auto& live = this->eviction_.keep;
    kv::EvictionPlan plan;  // a copy: if the retain throws, the lists still describe the cache
    plan.keep = live;
    state_.apply(plan, cache);
    for (auto& l : live) std::iota(l.begin(), l.end(), index_t{0});
    known_ = cache.max_length();
  }

  H2O method_;
  State state_;
  bool seeded_ = false, never_ = false;  // never_: the budget can never evict (no scores kept)
  bool lazy_ = false;    // eviction_.keep holds the live slots of the first known_ slots
  index_t known_ = 0;    // physical slots the live lists cover
};

template <class Cache, class TQ>
std::unique_ptr<DecodePolicy<Cache, TQ>> H2O::policy(const Budget& budget) const {
  require_budget_kind(budget, true, true, false, name);
  require(prefill_queries >= -1, name,
          ": prefill_queries must be >= 0 (or -1: chosen by the prompt length), got ",
          prefill_queries);
  return std::make_unique<H2OPolicy<Cache, TQ>>(*this, budget);
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
