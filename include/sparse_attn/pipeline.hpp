/// @file
/// @brief DecodeSession: the end-to-end serving loop for one attention layer.
///
/// Prefill with any prefill mask, then decode step by step, with any decode methods plugged in
/// as policies (methods/decode_policy.hpp), each step reporting the keys it read and its achieved
/// compression ratio:
/// @code
///   kv::ContiguousCache<bf16> cache({Hkv, d, 0, capacity});
///   DecodeSession<kv::ContiguousCache<bf16>> s(cache);
///   s.set_policy(methods::make_policy<kv::ContiguousCache<bf16>, float>(
///       methods::Quest{}, methods::Budget::compression(10)));
///   s.prefill(q, k, v, out, [&](auto& q, auto& k) { return methods::BlockSparse{}.select(
///       q, k, methods::Budget::compression(8)).mask; });
///   for (...) { StepReport r = s.step(q_t, k_t, v_t, out_t);  r.compression(); }
/// @endcode
/// See sparse_attn::DecodeSession for the hooks' order, the failure guarantees and threading,
/// and docs/METHODS.md, section "Entry points".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <chrono>
#include <cmath>
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
#include "sparse_attn/methods/decode_policy.hpp"
#include "sparse_attn/methods/h2o.hpp"
#include "sparse_attn/methods/quest.hpp"
#include "sparse_attn/methods/snapkv.hpp"
#include "sparse_attn/methods/streaming.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Options of a DecodeSession, fixed at construction; checked by every prefill, ingest and step.
struct SessionOptions {
  /// Softmax scale applied to q . k, for the kernels and the methods; NaN: 1 / sqrt(d).
  float scale = std::numeric_limits<float>::quiet_NaN();
  int num_threads = 0;  ///< Threads of the default executor, >= 0 (0: OpenMP default).
  /// The caller's executor, not owned (it must outlive the session); nullptr: the default one
  /// for num_threads. Runs every policy, kernel and cache append.
  Executor* executor = nullptr;
  index_t split = 512;  ///< Decode kernel split-KV chunk, in keys (>= 16).
};

/// What DecodeSession::prefill() or DecodeSession::ingest() did.
struct PrefillReport {
  index_t tokens = 0;       ///< Prompt tokens appended (per KV head).
  index_t pairs = 0;        ///< The mask's allowed (query, key) pairs, all heads (0 for ingest).
  index_t dense_pairs = 0;  ///< Dense causal pairs of the same shape (0 for ingest).
  /// Wall time of the prefill attention (mask function included), in milliseconds.
  double prefill_ms = 0, evict_ms = 0;
  /// @var evict_ms
  /// Wall time of the policies' after_prefill hooks (scoring and eviction), in milliseconds.

  /// Tokens held after eviction, summed over KV heads (live ones: DecodePolicy::live_tokens).
  index_t cache_tokens = 0;
  /// The eviction plan of the last policy that made one (kept slots, scores, stats); empty when
  /// none did.
  kv::EvictionPlan eviction;
  /// @return the prefill mask's compression dense_pairs / pairs (1 when both are 0, as for
  /// ingest).
  double compression() const { return methods::compression_of(dense_pairs, pairs); }
  /// Cache compression after the prompt's eviction: prompt tokens x KV heads / tokens kept.
  /// @param kv_heads the cache's KV heads.
  /// @return the ratio; 0 when nothing is held.
  double cache_compression(index_t kv_heads) const {
    return cache_tokens > 0
               ? static_cast<double>(tokens * kv_heads) / static_cast<double>(cache_tokens)
               : 0.0;
  }
};

/// What one DecodeSession::step() did.
struct StepReport {
  kv::DecodeStats stats;     ///< Pairs computed, dense pairs of the whole sequence, K/V rows read.
  index_t position = 0;      ///< Position of the step's last token (sequence_length() - 1).
  /// Tokens held after the step's eviction, summed over KV heads (live ones:
  /// DecodePolicy::live_tokens).
  index_t cache_tokens = 0;
  /// Tokens the step's evictions (before_step and after_step) dropped, summed over KV heads.
  index_t evicted = 0;
  /// Wall time of select() (the policies' before_step hooks, eviction included), in milliseconds.
  double select_ms = 0, kernel_ms = 0, evict_ms = 0;
  /// @var kernel_ms
  /// Wall time of the decode kernel, in milliseconds.
  /// @var evict_ms
  /// Wall time of the policies' after_step hooks and compaction, in milliseconds.

  /// @return the step's achieved compression ratio, stats.compression().
  double compression() const { return stats.compression(); }
};

/// @brief Serving loop of one attention layer over a kv::Cache: prefill, then decode steps with
/// decode methods plugged in as policies.
///
/// Prefill masks: prefill() takes either a mask (any type of the common interface) or a callable
/// mask(q, k) -> mask, called on the prompt's views, so data-dependent selections plug in
/// unchanged. Decode methods: set_policy() (one) or add_policy() (several, e.g. SnapKV's eviction
/// with Quest's selection), any methods::DecodePolicy (the library's via methods::make_policy or
/// the registry's make_decode_policy, or your own). Per step the policies' hooks run in the order
/// they were added: before_step (StreamingLLM evicts here; at most one policy returns a selection
/// other than KeySelection::all(), and none may evict after it did), the kernel, after_step
/// (H2O). When a policy wants_key_mass(), the step's kernel also writes the attention mass each
/// key received (AttentionOptions::key_mass) and after_step gets it: no second pass over the
/// cache.
///
/// Occupancy (cache_tokens, evicted) counts live tokens: H2O evicts lazily (dead slots its own
/// selection skips, compacted in batches; DecodePolicy::live_tokens); with several policies the
/// session compacts after every step, so no policy ever sees another's dead slots.
///
/// Plan/run split for timing: select(q) runs the before_step hooks and returns the step's
/// KeySelection (the plan); attend(q, keys, out) runs only the kernel; step() = append + select +
/// attend + after_step.
///
/// Threads: every policy, the cache's appends and the kernels run on SessionOptions::executor
/// (the engine's), or on the default one for num_threads; the softmax scale is
/// SessionOptions::scale. The session itself is not thread-safe: call it from one thread at a
/// time, and leave its cache alone (no other reader or writer) during a call.
///
/// Failures: step() runs every check before it appends (shapes, the kernel's options, the
/// cache's append checks, each policy's check_step()), so an invalid argument changes nothing.
/// When a policy throws later (or anything else in step() or ingest()), the exception reaches the
/// caller unchanged and the step's append is undone, so the cache and `out` are as they were
/// (only an eviction a before_step hook made before the kernel itself failed, e.g. on a failing
/// executor or std::bad_alloc, stays). add_policy() refuses a second selecting policy and an
/// eviction policy after a selecting one (DecodePolicy::selects_keys / evicts_before_step). A
/// custom policy that throws must leave the cache as it found it, as the library's do (they
/// validate before they evict). prefill() writes out before it appends; if a policy throws, out
/// holds the prompt's attention and the cache is unchanged.
///
/// The session refers to the cache (it must outlive the session) and owns its policies.
/// @tparam Cache a kv::Cache (ContiguousCache or PagedCache of float, bf16 or fp16).
/// @tparam TQ element type of the queries (float, bf16 or fp16).
template <class Cache, class TQ = float>
class DecodeSession {
 public:
  using Policy = methods::DecodePolicy<Cache, TQ>;  ///< The policy interface this session runs.
  using QView = TensorView<const TQ>;  ///< View type of the queries, [Hq, tokens, d].

  /// A session without policies (dense decode over the whole cache). O(1); never throws.
  /// @param cache the layer's cache; referenced, not copied: it must outlive the session.
  /// @param opt scale, threads or executor, split (checked by each call, not here).
  explicit DecodeSession(Cache& cache, const SessionOptions& opt = {})
      : cache_(cache), opt_(opt) {}
  /// A session with one policy (set_policy(policy)).
  /// @param cache the layer's cache; referenced, not copied: it must outlive the session.
  /// @param policy the decode method; nullptr: none.
  /// @param opt scale, threads or executor, split (checked by each call, not here).
  /// @throws sparse_attn::invalid_argument when the policy needs key bounds the cache lacks.
  /// @throws std::bad_alloc when the policy list cannot be allocated.
  DecodeSession(Cache& cache, std::unique_ptr<Policy> policy, const SessionOptions& opt = {})
      : cache_(cache), opt_(opt) {
    set_policy(std::move(policy));
  }

  /// @return the session's cache.
  Cache& cache() { return cache_; }
  /// @return the session's cache.
  const Cache& cache() const { return cache_; }
  /// @return the options the session was built with.
  const SessionOptions& options() const { return opt_; }

  /// Replaces every policy by `p` (nullptr: none, dense decode over the whole cache). The old
  /// policies are destroyed. Transactional: if it throws, the policies are as they were.
  /// @param p the new policy, or nullptr.
  /// @throws sparse_attn::invalid_argument when p needs key bounds the cache lacks
  /// (kv::CacheOptions::key_bounds).
  /// @throws std::bad_alloc when the policy list cannot be allocated.
  void set_policy(std::unique_ptr<Policy> p) {
    std::vector<std::unique_ptr<Policy>> next;
    if (p) {
      check_policy(*p, {});
      next.push_back(std::move(p));
    }
    policies_.swap(next);
  }
  /// Adds a policy after the others (its hooks run after theirs). Transactional: a throw adds
  /// nothing (and destroys p).
  /// @param p the policy to add; nullptr: no-op.
  /// @throws sparse_attn::invalid_argument when the policy needs key bounds the cache lacks,
  /// when it selects keys and another policy does, or when it evicts in before_step after a
  /// policy that selects keys.
  /// @throws std::bad_alloc when the policy list cannot grow.
  void add_policy(std::unique_ptr<Policy> p) {
    if (!p) return;
    check_policy(*p, policies_);
    policies_.push_back(std::move(p));
  }
  /// @return the number of policies, in hook order.
  index_t num_policies() const { return static_cast<index_t>(policies_.size()); }
  /// The i-th policy, for its stats() and last_eviction().
  /// @param i index in hook order, in [0, num_policies()).
  /// @return the policy; the reference is valid until set_policy() or the session's end.
  /// @throws std::out_of_range when i is out of range.
  const Policy& policy(index_t i = 0) const { return *policies_.at(static_cast<std::size_t>(i)); }

  /// @brief Prefill of a prompt into the empty cache: attention output, append, then the
  /// policies' after_prefill.
  ///
  /// out = attention of the prompt under `mask`, computed by the prefill kernel on the caller's
  /// views (not the cache); then K/V are appended and the policies' after_prefill hooks run (as
  /// ingest()). Cost: the prefill kernel's (O(allowed pairs x (d + dv))), the append, and the
  /// policies' scoring. Allocates the kernel's workspace, the mask when a callable builds it, and
  /// whatever the policies allocate.
  ///
  /// Failures: the cache must be empty and the append's checks (and, with policies, q's) run
  /// before out is written; the kernel validates q, k, v, out and the mask before it writes. If a
  /// policy throws after the append, the append is undone: out holds the prompt's attention and
  /// the cache is as before.
  /// @param q the prompt's queries, [Hq, n, d] token rows.
  /// @param k the prompt's keys, [Hkv, n, d] token rows (after RoPE), any storage type.
  /// @param v the prompt's values, [Hkv, n, dv] token rows, any storage type.
  /// @param out attention output, [Hq, n, dv].
  /// @param mask_or_fn a prefill mask of the common interface, or a callable mask(q, k) returning
  /// one (called once, on the prompt's views).
  /// @return tokens, pairs and dense pairs of the mask, timings, the cache's occupancy and the
  /// last eviction plan.
  /// @throws sparse_attn::invalid_argument when the cache is not empty (sequence_length() > 0;
  /// use ingest() to extend a sequence), on the append's checks, on the options or q (when
  /// policies are set), on the kernel's checks, or from a policy.
  /// @throws std::bad_alloc when a workspace or buffer cannot be allocated.
  template <class TK, class TV, class TO, class MaskOrFn>
  PrefillReport prefill(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v,
                        const TensorView<TO>& out, MaskOrFn&& mask_or_fn) {
    require(cache_.sequence_length() == 0, "DecodeSession::prefill",
            ": the cache must be empty (prefill starts a sequence; use ingest() to extend one)");
    check_ingest(q, k, v);  // before out is written
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

  /// @brief Appends K/V to the cache and runs the policies' after_prefill (no attention output).
  ///
  /// For a prompt whose attention the engine computed itself, or to extend a sequence. Each
  /// policy's after_prefill runs in order (SnapKV-style policies score the prompt with q and
  /// evict); the report's eviction is the last plan a policy made. Cost: the append plus the
  /// policies' scoring; allocates what they allocate.
  ///
  /// Failures: every check runs before the append. If a policy throws, the exception reaches the
  /// caller and the append is undone when the cache still ends with the appended tokens (a policy
  /// that evicted before another one threw leaves the cache as it left it).
  /// @param q the prompt's queries, or at least its last rows (what the policies score with),
  /// [Hq, n_q, d] with n_q <= max_length() + k.tokens; read only when policies are set.
  /// @param k keys to append, [Hkv, n, d] token rows, any storage type.
  /// @param v values to append, [Hkv, n, dv] token rows, any storage type.
  /// @return tokens appended, the hooks' time (evict_ms), the cache's occupancy and the last
  /// eviction plan; pairs, dense_pairs and prefill_ms are 0.
  /// @throws sparse_attn::invalid_argument on the append's checks (kv::Cache::check_append) and,
  /// when policies are set, on the options or a q that does not fit the cache; or from a policy.
  /// @throws std::bad_alloc when the append's scratch or a policy's buffers cannot be allocated.
  template <class TK, class TV>
  PrefillReport ingest(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v) {
    check_ingest(q, k, v);
    PrefillReport r;
    r.tokens = k.tokens;
    cache_.append(k, v, executor());
    const auto t0 = clock::now();
    SPARSE_ATTN_TRY {
      const AttentionOptions o = method_options();
      for (auto& p : policies_) {
        p->after_prefill(q, cache_, o);
        if (const kv::EvictionPlan* e = p->last_eviction()) r.eviction = *e;
      }
    }
    SPARSE_ATTN_CATCH_ALL {
      undo_append(k.tokens);
      SPARSE_ATTN_RETHROW;
    }
    r.evict_ms = elapsed_ms(t0);
    r.cache_tokens = live_tokens();
    return r;
  }

  /// @brief The step's key selection (the plan): runs the policies' before_step hooks in order.
  ///
  /// The step's K/V must already be appended. Hooks may evict (StreamingLLM); at most one may
  /// return a selection other than KeySelection::all(), and none may evict after it. Not
  /// transactional on its own (step() is): an eviction a hook made stays when a later one throws.
  /// Makes no checks of its own on q (check_step() does).
  /// @param q the step's queries, [Hq, n_q, d].
  /// @param stats when non-null, receives kv::decode_stats() of the selection on the cache.
  /// @return the selection the kernel should read (slots of the cache after any eviction).
  /// @throws sparse_attn::invalid_argument when a policy evicts after another selected, or a
  /// second policy selects keys; what decode_stats() throws; or from a policy.
  KeySelection select(const QView& q, kv::DecodeStats* stats = nullptr) {
    KeySelection keys = KeySelection::all();
    bool selected = false;
    const AttentionOptions o = method_options();
    for (auto& p : policies_) {
      const index_t held = cache_.total_length();
      KeySelection k = p->before_step(q, cache_, o);
      require(!selected || cache_.total_length() == held, "DecodeSession::select", ": policy ",
              p->name(), " evicted after another policy selected the step's keys; add eviction "
              "policies before selection policies");
      if (k.scope() != KeySelection::Scope::all) {
        require(!selected, "DecodeSession::select", ": policy ", p->name(),
                " selects keys, but another policy already did (one selection per step)");
        keys = std::move(k);
        selected = true;
      }
    }
    if (stats) *stats = kv::decode_stats(keys, cache_, q.heads, q.tokens);
    return keys;
  }

  /// The kernel alone: attention of q over `keys` of the cache into out, with the session's
  /// scale, threads and split (decode(q, cache, out, keys, opt): its cost, allocation and
  /// failures). Changes no state of the session or the cache.
  /// @param q the step's queries, [Hq, n_q, d], already appended.
  /// @param keys the selection select() returned (or any valid one).
  /// @param out attention output, [Hq, n_q, dv].
  /// @throws sparse_attn::invalid_argument as decode() on the cache.
  /// @throws std::bad_alloc when the kernel's workspace cannot be allocated.
  template <class TO>
  void attend(const QView& q, const KeySelection& keys, const TensorView<TO>& out) {
    decode(q, cache_, out, keys, kernel_options());
  }

  /// @brief One decode step: append the new token(s), select, attend, then the policies'
  /// after_step.
  ///
  /// Every check runs before the append: the shapes, the kernel's options, the cache's append
  /// checks and each policy's check_step() (check_step()). With policies, the kernel writes a
  /// staging buffer that is copied to out only when the whole step succeeded; with several
  /// policies the cache is compacted after the hooks. Cost: the append (O(Hkv x n_q x (d + dv))),
  /// the policies' selection and scoring, and the kernel (O(pairs x (d + dv)) / threads).
  /// Allocates the staging buffer (Hq x n_q x dv elements of TO, with policies), the kernel's
  /// workspace, and, when a policy wants the key mass, grows a per-session buffer to
  /// Hkv x max_length() floats (amortised: reused across steps).
  ///
  /// Transactional: if any of it throws, the append is undone and the cache and out are as they
  /// were, except that an eviction a before_step hook made before the kernel itself failed (a
  /// failing executor, std::bad_alloc) stays, and without policies a kernel that fails midway may
  /// leave out partly written.
  /// @param q the new tokens' queries, [Hq, n_q, d] token rows, Hq a multiple of Hkv.
  /// @param k the new tokens' keys, [Hkv, n_q, d] token rows (after RoPE), any storage type.
  /// @param v the new tokens' values, [Hkv, n_q, dv] token rows, any storage type.
  /// @param out attention output, [Hq, n_q, dv], not aliasing itself.
  /// @return the step's density, position, occupancy, evictions and timings.
  /// @throws sparse_attn::invalid_argument as check_step(), or from select() or a policy.
  /// @throws std::bad_alloc when a buffer or workspace cannot be allocated.
  template <class TK, class TV, class TO>
  StepReport step(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v,
                  const TensorView<TO>& out) {
    check_step(q, k, v, out);
    // Allocations before the append too: staging for out and the key-mass buffer (at most the
    // cache after the append; an eviction before the kernel only shrinks it).
    const bool staged = !policies_.empty();
    std::vector<std::remove_const_t<TO>> staging(
        staged ? static_cast<std::size_t>(out.heads * out.tokens * out.dim) : 0);
    const TensorView<TO> target =
        staged ? TensorView<TO>(staging.data(), out.heads, out.tokens, out.dim) : out;
    const bool want_mass = wants_key_mass();
    if (want_mass) mass_.reserve(static_cast<std::size_t>(cache_.kv_heads() * (cache_.max_length() + k.tokens)));
    StepReport r;
    cache_.append(k, v, executor());
    SPARSE_ATTN_TRY {
      auto t0 = clock::now();
      const index_t appended = live_tokens();
      const KeySelection keys = select(q, &r.stats);
      r.select_ms = elapsed_ms(t0);
      // The kernel's per-key mass, when a policy uses it: [Hkv][max_length()].
      DecodeOptions ko = kernel_options();
      const float* mass = nullptr;
      if (want_mass) {
        const index_t stride = cache_.max_length();
        mass_.resize(static_cast<std::size_t>(cache_.kv_heads() * stride));  // within capacity
        ko.key_mass = {mass_.data(), stride, 0};
        mass = mass_.data();
      }
      t0 = clock::now();
      decode(q, cache_, target, keys, ko);
      r.kernel_ms = elapsed_ms(t0);
      t0 = clock::now();
      const AttentionOptions o = method_options();
      for (auto& p : policies_) p->after_step(q, cache_, o, mass);
      // A lazily evicting policy (H2O) leaves dead slots that only its own selection skips:
      // with other policies reading the cache, they go now.
      if (policies_.size() > 1)
        for (auto& p : policies_) p->compact(cache_);
      r.evict_ms = elapsed_ms(t0);
      r.evicted = appended - live_tokens();
    }
    SPARSE_ATTN_CATCH_ALL {
      undo_append(k.tokens);
      SPARSE_ATTN_RETHROW;
    }
    if (staged)
      for (index_t h = 0; h < out.heads; ++h)
        for (index_t t = 0; t < out.tokens; ++t)
          for (index_t c = 0; c < out.dim; ++c) out(h, t, c) = target(h, t, c);
    r.position = cache_.sequence_length() - 1;
    r.cache_tokens = live_tokens();
    return r;
  }

  /// The checks step(q, k, v, out) makes before it changes anything, in its order: out (an
  /// output view), q, the shapes against the cache (Hq a positive multiple of Hkv, dims d and dv,
  /// equal token counts), the options (scale, num_threads >= 0, split >= 16, the executor's
  /// concurrency >= 1), the cache's append checks, then each policy's check_step(). Changes
  /// nothing; allocates only an error's message.
  /// @param q the new tokens' queries, [Hq, n_q, d].
  /// @param k the new tokens' keys, [Hkv, n_q, d].
  /// @param v the new tokens' values, [Hkv, n_q, dv].
  /// @param out attention output, [Hq, n_q, dv].
  /// @throws sparse_attn::invalid_argument on the first failed check.
  template <class TK, class TV, class TO>
  void check_step(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v,
                  const TensorView<TO>& out) const {
    validate_view(out, "out", true);
    // Shapes first: a before_step hook may evict (StreamingLLM), which undo_append cannot take
    // back if the kernel then rejected q.
    validate_view(q, "q");
    require(q.heads >= 1 && q.heads % cache_.kv_heads() == 0 && q.dim == cache_.head_dim() &&
                q.tokens == k.tokens && out.heads == q.heads && out.tokens == q.tokens &&
                out.dim == cache_.value_dim(),
            "DecodeSession::step", ": q [", q.heads, ", ", q.tokens, ", ", q.dim, "], k/v of ",
            k.tokens, " tokens and out [", out.heads, ", ", out.tokens, ", ", out.dim,
            "] do not match the cache (Hkv=", cache_.kv_heads(), ", d=", cache_.head_dim(),
            ", dv=", cache_.value_dim(), ")");
    check_options("DecodeSession::step");
    cache_.check_append(k, v, executor());
    const AttentionOptions o = method_options();
    const bool mass = wants_key_mass();
    for (const auto& p : policies_) p->check_step(q, cache_, o, mass);
  }

 private:
  using clock = std::chrono::steady_clock;
  static double elapsed_ms(clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
  }
  ExecutorChoice executor() const { return {opt_.executor, opt_.num_threads}; }
  // The options every kernel and policy checks: scale, threads, split, the executor.
  void check_options(const char* where) const {
    kernel::resolve_scale(opt_.scale, cache_.head_dim(), where);
    require(opt_.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
            opt_.num_threads);
    require(opt_.split >= 16, where, ": split must be >= 16, got ", opt_.split);
    require(opt_.executor == nullptr || opt_.executor->concurrency() >= 1, where,
            ": executor concurrency() must be >= 1, got ",
            opt_.executor ? opt_.executor->concurrency() : 0);
  }
  // ingest()'s checks before the append: q against the cache, the options, the append's own.
  template <class TK, class TV>
  void check_ingest(const QView& q, const TensorView<TK>& k, const TensorView<TV>& v) const {
    cache_.check_append(k, v, executor());
    if (policies_.empty()) return;  // q and the options are only read by the policies
    check_options("DecodeSession::ingest");
    validate_view(q, "q");
    require(q.heads >= 1 && q.heads % cache_.kv_heads() == 0 && q.dim == cache_.head_dim() &&
                q.tokens <= cache_.max_length() + k.tokens,
            "DecodeSession::ingest", ": q [", q.heads, ", ", q.tokens, ", ", q.dim,
            "] does not match the cache (Hkv=", cache_.kv_heads(), ", d=", cache_.head_dim(),
            ") and the ", cache_.max_length() + k.tokens, " tokens it holds after the append");
  }
  void check_policy(const Policy& p, const std::vector<std::unique_ptr<Policy>>& before) const {
    require(!p.needs_key_bounds() || cache_.has_key_bounds(), "DecodeSession", ": method ",
            p.name(), " needs a cache with key bounds (kv::CacheOptions::key_bounds = true)");
    for (const auto& o : before) {
      require(!(p.selects_keys() && o->selects_keys()), "DecodeSession", ": policy ", p.name(),
              " selects keys, but policy ", o->name(),
              " already does; one selection per step");
      require(!(p.evicts_before_step() && o->selects_keys()), "DecodeSession", ": policy ",
              p.name(), " evicts before the step, after policy ", o->name(),
              " selected its keys; add eviction policies before selection policies");
    }
  }
  AttentionOptions method_options() const {
    AttentionOptions o;
    o.scale = opt_.scale;
    o.num_threads = opt_.num_threads;
    o.executor = opt_.executor;
    return o;
  }
  DecodeOptions kernel_options() const {
    DecodeOptions o;
    o.scale = opt_.scale;
    o.num_threads = opt_.num_threads;
    o.executor = opt_.executor;
    o.split = opt_.split;
    return o;
  }
  // Tokens held, summed over KV heads: the cache's, less the dead slots of a lazily evicting
  // policy (DecodePolicy::live_tokens).
  index_t live_tokens() const {
    const index_t total = cache_.total_length();
    index_t held = total;
    for (const auto& p : policies_) held -= total - p->live_tokens(cache_);
    return held;
  }
  bool wants_key_mass() const {
    for (const auto& p : policies_)
      if (p->wants_key_mass()) return true;
    return false;
  }
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
  std::vector<std::unique_ptr<Policy>> policies_;
  std::vector<float> mass_;  // the kernel's key mass of the running step
};

SPARSE_ATTN_NAMESPACE_END
