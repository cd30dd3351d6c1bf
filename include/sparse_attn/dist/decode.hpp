/// @file
/// Context-parallel decode over a dist::ShardedCache: one collective call per step and layer
/// (docs/DISTRIBUTED.md, section "Decode").
///
/// Protocol of dist::decode_step (all ranks call it; q, k_new and v_new are read on rank 0):
///  1. dist::check_collectively of the shapes, dtypes, policy, budget and options, plus each rank's
///     local validation (the tail's capacity included): a bad argument raises the same
///     sparse_attn::invalid_argument on every rank before any other collective.
///  2. MPI_Bcast of q from rank 0 (Hq x n_q x d x sizeof(TQ) bytes); rank 0 sends k_new, v_new to
///     the tail (last) rank, which appends them (Hkv x n_q x (d + dv) x sizeof(TK|TV) bytes).
///  3. Selection on every shard, mapped from the single-process rule to global slots:
///     - dense: every slot;
///     - window / streaming: the first S and the last W global slots of each head, intersected
///       with the shard (streaming: T = S + W from the global sequence length, as StreamingLLM);
///     - quest: each shard scores the global pages whose last slot it holds (the page bounds are
///       global, see sharded_cache.hpp, so the scores are bit-identical to single-process Quest),
///       keeps its local top-B rank words (methods::quest_detail::rank_word: score order, ties
///       toward the lower page, NaN last), and one MPI_Allgatherv of those candidates gives every
///       rank the global B-th word: the threshold. The pages at or above it, plus the current
///       page(s), are exactly single-process Quest's (the global top B is contained in the union
///       of the local top B's). Bytes: 8 x sum over ranks and units of min(B, candidates on the
///       rank), plus one Allgather of the counts.
///  4. The decode kernel on the shard with DecodeOptions::lse: only the tail holds the new
///     tokens, so only it runs causal; the other shards precede every new token.
///  5. MPI_Gather of every rank's partial (out, lse), Hq x n_q x (dv + 1) floats, to rank 0, which
///     merges them in rank order with merge_state (exact: partials over disjoint key sets).
///  6. One MPI_Allreduce of two counters (pairs, K/V rows read) for the statistics.
/// The output lands on rank 0. The result equals the single-process decode over the same keys to
/// fp32 rounding (only the summation order differs); the selected key set is identical.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "sparse_attn/arch/dispatch.hpp"
#include "sparse_attn/dist/communicator.hpp"
#include "sparse_attn/dist/sharded_cache.hpp"
#include "sparse_attn/kernel/decode.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/kv/decode.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/quest.hpp"
#include "sparse_attn/methods/streaming.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace dist {

/// Which keys a distributed decode step reads: the single-process rule of a method, applied to
/// the global slots of the sharded cache. A value type; build it with the named constructors.
struct StepPolicy {
  /// The selection rule.
  enum class Kind {
    dense,      ///< every key
    quest,      ///< methods::Quest: global top-B pages by key bound + the current page(s)
    window,     ///< the first `sinks` and the last `window` slots of each head
    streaming,  ///< methods::StreamingLLM's kept keys (S sinks + W recent, T from the budget)
  };
  Kind kind = Kind::dense;  ///< the rule
  /// quest: count(n) tokens or compression(c) (mass is not supported distributed);
  /// streaming: count(T) or compression(c), as methods::StreamingLLM.
  methods::Budget budget = methods::Budget::count(1);
  bool per_query_head = false;  ///< quest: rank pages per query head (methods::Quest's flag)
  index_t sinks = 4;            ///< window, streaming: S, first slots always read (>= 0)
  index_t window = 1;           ///< window: W, the most recent slots read (>= 1)

  /// @return the dense policy.
  static StepPolicy dense() { return {}; }
  /// Quest at `budget`.
  /// @param budget count(n) tokens (B = n / P pages) or compression(c).
  /// @param per_query_head rank per query head instead of per KV head.
  /// @return the policy.
  static StepPolicy quest(const methods::Budget& budget, bool per_query_head = false) {
    StepPolicy p;
    p.kind = Kind::quest;
    p.budget = budget;
    p.per_query_head = per_query_head;
    return p;
  }
  /// Sinks + sliding window (the decode form of methods::SlidingWindow).
  /// @param sinks S >= 0.
  /// @param window W >= 1.
  /// @return the policy.
  static StepPolicy sliding_window(index_t sinks, index_t window) {
    StepPolicy p;
    p.kind = Kind::window;
    p.sinks = sinks;
    p.window = window;
    return p;
  }
  /// StreamingLLM's keys at `budget` (as a selection: the cache keeps its tokens).
  /// @param budget count(T) or compression(c), T = S + W.
  /// @param sinks S, first tokens always kept.
  /// @return the policy.
  static StepPolicy streaming(const methods::Budget& budget, index_t sinks = 4) {
    StepPolicy p;
    p.kind = Kind::streaming;
    p.budget = budget;
    p.sinks = sinks;
    return p;
  }
};

/// What one distributed step read, on this rank and over all ranks.
struct StepStats {
  /// This rank's selection in local slots (KeySelection::all(): every local slot of every head);
  /// add ShardedCache::slot_offset(h) for global slots, or map with global_position().
  KeySelection keys;
  index_t local_kv_rows = 0;   ///< K/V rows this rank read, summed over selection units
  index_t global_kv_rows = 0;  ///< the same over all ranks (= the single-process kv_rows)
  index_t pairs = 0;           ///< (query row, key) pairs computed over all ranks
  /// Pairs of dense causal attention over the global sequence (kv::DecodeStats::dense_pairs).
  index_t dense_pairs = 0;
  std::vector<index_t> budget_pages;  ///< quest: B per unit (pages besides the current ones)
  /// @return dense_pairs / pairs (1 when both are 0).
  double compression() const {
    return pairs == 0 ? 1.0 : static_cast<double>(dense_pairs) / static_cast<double>(pairs);
  }
};

/// @cond SPARSE_ATTN_INTERNAL
namespace detail {

// A view's rows packed contiguously, [heads][tokens][dim], in the view's storage type.
template <class TV>
std::vector<std::remove_const_t<TV>> pack(const TensorView<TV>& v) {
  std::vector<std::remove_const_t<TV>> out(static_cast<std::size_t>(v.heads * v.tokens * v.dim));
  std::size_t i = 0;
  for (index_t h = 0; h < v.heads; ++h)
    for (index_t t = 0; t < v.tokens; ++t)
      for (index_t c = 0; c < v.dim; ++c) out[i++] = v.row(h, t)[c * v.stride_dim];
  return out;
}

// The budget as agreed values (kind, value bits, tolerance bits).
inline void agree_budget(std::vector<Agreed>& a, const methods::Budget& b) {
  a.push_back({"budget kind", static_cast<std::int64_t>(b.kind())});
  a.push_back(agreed_double("budget value", b.target_compression()));
  a.push_back(agreed_double("budget tolerance", b.tolerance()));
}

// Global slot range [b, e) of head h intersected with the shard, appended as local slots.
inline void add_global(std::vector<KeyRange>& l, index_t b, index_t e, index_t off, index_t len) {
  b = std::max(b, off) - off;
  e = std::min(e, off + len) - off;
  if (b >= e) return;
  if (!l.empty() && l.back().end == b)
    l.back().end = e;
  else
    l.push_back({b, e});
}

// Quest over the shards: fills lists (local slots per unit) and B per unit. Collective.
template <class T, class TQ>
void quest_lists(const ShardedCache<T>& cache, const TensorView<const TQ>& q, const StepPolicy& pol,
                 float scale, std::vector<std::vector<KeyRange>>& lists,
                 std::vector<index_t>& budget_pages) {
  const index_t Hkv = cache.kv_heads(), d = cache.head_dim(), P = cache.page_size();
  const index_t G = q.heads / Hkv, n_q = q.tokens;
  const bool per_q = pol.per_query_head;
  const index_t units = per_q ? q.heads : Hkv;
  // Q^- and Q^+ per unit, summed in methods::Quest's order (bit-identical scores).
  std::vector<float> qpn(static_cast<std::size_t>(units * 2 * d), 0.0f), row(static_cast<std::size_t>(d));
  for (index_t h = 0; h < q.heads; ++h)
    for (index_t t = 0; t < n_q; ++t) {
      load_row(q.row(h, t), q.stride_dim, row.data(), d);
      float* qn = qpn.data() + (per_q ? h : h / G) * 2 * d;
      for (index_t c = 0; c < d; ++c) {
        const float x = row[static_cast<std::size_t>(c)] * scale;
        qn[c] += std::min(x, 0.0f);
        qn[d + c] += std::max(x, 0.0f);
      }
    }
  budget_pages.assign(static_cast<std::size_t>(units), 0);
  std::vector<index_t> first_cur(static_cast<std::size_t>(units));
  std::vector<std::uint64_t> words;  // this rank's candidates, unit after unit
  std::vector<int> counts(static_cast<std::size_t>(units), 0);
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u, L = cache.length(hk);
    const index_t fc = (L - n_q) / P, cur_keys = L - fc * P;
    index_t B = 0;
    if (pol.budget.is_count()) {
      B = pol.budget.units() / P;
    } else {
      const index_t keys = methods::count_for_compression(L, pol.budget.target_compression());
      B = std::max<index_t>(0, (keys - cur_keys + P - 1) / P);
    }
    B = std::min(B, fc);
    budget_pages[static_cast<std::size_t>(u)] = B;
    first_cur[static_cast<std::size_t>(u)] = fc;
    if (B == 0 || B == fc) continue;  // nothing to rank: none or every earlier page
    const index_t off = cache.slot_offset(hk), len = cache.local().length(hk);
    const index_t g0 = CacheAccess::first_page(cache, hk), np = CacheAccess::num_pages(cache, hk);
    const std::size_t start = words.size();
    arch::dispatch(cpu_target(), [&](auto a) {
      using A = decltype(a);
      for (index_t g = g0; g < std::min(g0 + np, fc); ++g) {
        if (std::min((g + 1) * P, L) > off + len) continue;  // scored by the rank holding its end
        const float U = A::dot(qpn.data() + u * 2 * d, CacheAccess::page_bounds(cache, hk, g), 2 * d);
        words.push_back(methods::quest_detail::rank_word(methods::quest_detail::order_key(U), g));
      }
    });
    if (static_cast<index_t>(words.size() - start) > B) {  // only the local top B can be global
      std::nth_element(words.begin() + static_cast<std::ptrdiff_t>(start),
                       words.begin() + static_cast<std::ptrdiff_t>(start) + (B - 1), words.end(),
                       std::greater<std::uint64_t>());
      words.resize(start + static_cast<std::size_t>(B));
    }
    counts[static_cast<std::size_t>(u)] = static_cast<int>(words.size() - start);
  }
  // Every rank's candidates: counts per (rank, unit), then the words.
  const int p = cache.comm().size();
  std::vector<int> all_counts(static_cast<std::size_t>(p * units));
  MPI_Allgather(counts.data(), static_cast<int>(units), MPI_INT, all_counts.data(),
                static_cast<int>(units), MPI_INT, cache.comm().handle());
  std::vector<int> per_rank(static_cast<std::size_t>(p), 0), displ(static_cast<std::size_t>(p), 0);
  int total = 0;
  for (int r = 0; r < p; ++r) {
    for (index_t u = 0; u < units; ++u)
      per_rank[static_cast<std::size_t>(r)] += all_counts[static_cast<std::size_t>(r * units + u)];
    displ[static_cast<std::size_t>(r)] = total;
    total += per_rank[static_cast<std::size_t>(r)];
  }
  std::vector<std::uint64_t> all_words(static_cast<std::size_t>(total));
  MPI_Allgatherv(words.data(), static_cast<int>(words.size()), MPI_UINT64_T, all_words.data(),
                 per_rank.data(), displ.data(), MPI_UINT64_T, cache.comm().handle());
  // Per unit: the union's B-th word is the threshold; the selected pages are those at or above.
  lists.assign(static_cast<std::size_t>(units), {});
  std::vector<std::uint64_t> unit_words;
  std::vector<index_t> chosen;
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u, L = cache.length(hk);
    const index_t B = budget_pages[static_cast<std::size_t>(u)], fc = first_cur[static_cast<std::size_t>(u)];
    chosen.clear();
    if (B > 0 && B < fc) {
      unit_words.clear();
      for (int r = 0; r < p; ++r) {
        int at = displ[static_cast<std::size_t>(r)];
        for (index_t v = 0; v < u; ++v) at += all_counts[static_cast<std::size_t>(r * units + v)];
        const int n = all_counts[static_cast<std::size_t>(r * units + u)];
        unit_words.insert(unit_words.end(), all_words.begin() + at, all_words.begin() + at + n);
      }
      std::nth_element(unit_words.begin(), unit_words.begin() + (B - 1), unit_words.end(),
                       std::greater<std::uint64_t>());
      const std::uint64_t threshold = unit_words[static_cast<std::size_t>(B - 1)];
      for (const std::uint64_t w : unit_words)
        if (w >= threshold) chosen.push_back(methods::quest_detail::word_page(w));
      std::sort(chosen.begin(), chosen.end());
    }
    const index_t off = cache.slot_offset(hk), len = cache.local().length(hk);
    if (len == 0) continue;
    auto& l = lists[static_cast<std::size_t>(u)];
    const index_t g0 = off / P, g1 = (off + len - 1) / P + 1;
    for (index_t g = g0; g < g1; ++g) {
      const bool take = g >= fc || B == fc || std::binary_search(chosen.begin(), chosen.end(), g);
      if (take) add_global(l, g * P, std::min((g + 1) * P, L), off, len);
    }
  }
}

// Dense or window lists in local slots (window: the first S and last W global slots).
template <class T>
void window_lists(const ShardedCache<T>& cache, index_t units, index_t G, bool per_q, index_t S,
                  index_t W, bool dense, std::vector<std::vector<KeyRange>>& lists) {
  lists.assign(static_cast<std::size_t>(units), {});
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u, L = cache.length(hk);
    const index_t off = cache.slot_offset(hk), len = cache.local().length(hk);
    auto& l = lists[static_cast<std::size_t>(u)];
    if (dense) {
      add_global(l, 0, L, off, len);
      continue;
    }
    const index_t s = std::min(S, L);
    add_global(l, 0, s, off, len);
    add_global(l, std::max(s, L - W), L, off, len);
  }
}

// This rank's partial decode: out [Hq][n_q][dv], lse [Hq][n_q] over `keys` (local slots).
template <class T, class TQ>
void partial_decode(const ShardedCache<T>& cache, const TensorView<const TQ>& q,
                    const KeySelection& keys, const DecodeOptions& base, float* out, float* lse) {
  const auto& lc = cache.local();
  const index_t Hq = q.heads, n_q = q.tokens, dv = cache.value_dim();
  DecodeOptions o = base;
  o.key_mass = {};
  if (cache.owns_tail()) {  // the new tokens are the shard's last n_q slots: causal
    o.causal = true;
    o.lse = LseView(lse, n_q);
    decode(q, lc, TensorView<float>(out, Hq, n_q, dv), keys, o);
    return;
  }
  o.causal = false;  // every new token follows every key of this shard
  const index_t n_k = lc.max_length();
  if (n_k == 0) {
    std::fill(out, out + Hq * n_q * dv, 0.0f);
    std::fill(lse, lse + Hq * n_q, kNegInf);
    return;
  }
  // The kernel wants n_q <= n_k: a short shard runs its queries one at a time.
  const index_t step = n_k >= n_q ? n_q : 1;
  for (index_t t = 0; t < n_q; t += step) {
    o.lse = LseView(lse + t, n_q, 1);
    sparse_attn::decode(q.slice_tokens(t, step), lc.keys(), lc.values(),
                        TensorView<float>(out + t * dv, Hq, step, dv, n_q * dv, dv, 1), keys, o);
  }
}

}  // namespace detail
/// @endcond

/// One context-parallel decode step of n_q new tokens (collective; see the file comment for the
/// protocol, the bytes moved and why the selection is exact).
///
/// The step appends k_new, v_new to the tail shard, selects the keys by `policy` on every shard,
/// runs the decode kernel on each shard and merges the partial results on rank 0, where `out`
/// (and opt.lse, when set) receive attention of q over the selected keys: what a single process
/// computes with the same method on the whole cache, to fp32 rounding.
/// @param cache the sharded cache (its tail grows by n_q tokens).
/// @param q the new tokens' queries, [Hq, n_q, d]; read on rank 0. Other ranks pass a view of the
///        same shape and type (its contents are ignored).
/// @param k_new their keys, [Hkv, n_q, d]; read on rank 0 (other ranks: same shape, ignored).
/// @param v_new their values, [Hkv, n_q, dv]; read on rank 0 (other ranks: same shape, ignored).
/// @param out [Hq, n_q, dv] fp32: the result on rank 0; on the other ranks it must have the same
///        shape and is left untouched.
/// @param policy the selection rule (equal on every rank).
/// @param opt the kernel's options (scale, split, precision, executor; lse: the merged LSE on rank
///        0). causal and key_mass are ignored: the tail runs causal, the other shards do not.
/// @param stats optional out (every rank): the local selection and the step's global counts.
/// @throws sparse_attn::invalid_argument on every rank, with the same message, before any other
///         collective, when a rank's views are invalid or do not match the cache ([Hq, n_q, d]
///         with Hq a positive multiple of Hkv, n_q >= 1, k_new/v_new/out of the matching shapes),
///         the tail lacks capacity for n_q tokens, the policy is invalid (quest: a mass budget;
///         window < 1; sinks < 0; streaming: a mass budget), opt.scale or opt.split is invalid, or
///         the ranks disagree on any of these values or on the cache's sequence length.
/// @throws std::bad_alloc when a buffer cannot be allocated.
/// Cost per rank: the kernel over the rank's selected keys plus the bytes of the file comment.
/// Allocates the packed q (every rank), k_new/v_new (rank 0 and the tail), the partial results
/// (Hq x n_q x (dv + 1) floats; p times that on rank 0) and the selection lists.
/// Thread safety: one call at a time per cache and communicator.
template <class T, class TQ, class TK, class TV>
void decode_step(ShardedCache<T>& cache, const TensorView<TQ>& q, const TensorView<TK>& k_new,
                 const TensorView<TV>& v_new, const TensorView<float>& out, const StepPolicy& policy,
                 const DecodeOptions& opt = {}, StepStats* stats = nullptr) {
  constexpr const char* where = "dist::decode_step";
  const Communicator& comm = cache.comm();
  const index_t Hkv = cache.kv_heads(), d = cache.head_dim(), dv = cache.value_dim();
  float scale = 0.0f;
  const std::string local_error = local_error_of([&] {
    validate_view(q, "dist::decode_step: q");
    validate_view(k_new, "dist::decode_step: k_new");
    validate_view(v_new, "dist::decode_step: v_new");
    validate_view(out, "dist::decode_step: out", true);
    require(q.heads >= 1 && q.heads % Hkv == 0, where, ": q has ", q.heads,
            " heads, a positive multiple of Hkv=", Hkv, " is needed");
    require(q.dim == d, where, ": q has head_dim ", q.dim, ", the cache has ", d);
    require(q.tokens >= 1, where, ": q has no token, n_q >= 1 is needed");
    require(k_new.heads == Hkv && k_new.tokens == q.tokens && k_new.dim == d, where, ": k_new is [",
            k_new.heads, ", ", k_new.tokens, ", ", k_new.dim, "], [Hkv=", Hkv, ", n_q=", q.tokens,
            ", d=", d, "] is needed");
    require(v_new.heads == Hkv && v_new.tokens == q.tokens && v_new.dim == dv, where,
            ": v_new is [", v_new.heads, ", ", v_new.tokens, ", ", v_new.dim, "], [Hkv=", Hkv,
            ", n_q=", q.tokens, ", dv=", dv, "] is needed");
    require(out.heads == q.heads && out.tokens == q.tokens && out.dim == dv, where, ": out is [",
            out.heads, ", ", out.tokens, ", ", out.dim, "], [Hq=", q.heads, ", n_q=", q.tokens,
            ", dv=", dv, "] is needed");
    scale = kernel::resolve_scale(opt.scale, d, where);
    require(opt.split >= 16, where, ": split must be >= 16, got ", opt.split);
    switch (policy.kind) {
      case StepPolicy::Kind::dense: break;
      case StepPolicy::Kind::quest:
        methods::require_budget_kind(policy.budget, true, true, false, where);
        break;
      case StepPolicy::Kind::window:
        require(policy.sinks >= 0 && policy.window >= 1, where, ": sinks=", policy.sinks,
                ", window=", policy.window, "; sinks >= 0 and window >= 1 are allowed");
        break;
      case StepPolicy::Kind::streaming:
        methods::StreamingLLM{policy.sinks}.total_for(cache.sequence_length() + q.tokens,
                                                      policy.budget);
        break;
      default: require(false, where, ": unknown policy kind ", static_cast<int>(policy.kind));
    }
    if (cache.owns_tail())  // the tail must have room for the new tokens
      cache.local().check_append(k_new, v_new);
  });
  std::vector<Agreed> agreed{{"Hq", q.heads},
                             {"n_q", q.tokens},
                             {"head_dim", q.dim},
                             {"value_dim", v_new.dim},
                             {"k_new tokens", k_new.tokens},
                             {"sizeof(q)", static_cast<std::int64_t>(sizeof(TQ))},
                             {"sizeof(k_new)", static_cast<std::int64_t>(sizeof(TK))},
                             {"sizeof(v_new)", static_cast<std::int64_t>(sizeof(TV))},
                             {"kv_heads", Hkv},
                             {"page_size", cache.page_size()},
                             {"sequence_length", cache.sequence_length()},
                             {"policy", static_cast<std::int64_t>(policy.kind)},
                             {"per_query_head", policy.per_query_head ? 1 : 0},
                             {"sinks", policy.sinks},
                             {"window", policy.window},
                             agreed_double("scale", static_cast<double>(opt.scale)),
                             {"split", opt.split},
                             {"precision", static_cast<std::int64_t>(opt.precision)}};
  detail::agree_budget(agreed, policy.budget);
  check_collectively(comm, where, agreed, local_error);

  // 2. q to every rank, k_new / v_new to the tail.
  using Q = std::remove_const_t<TQ>;
  using K = std::remove_const_t<TK>;
  using V = std::remove_const_t<TV>;
  const index_t Hq = q.heads, n_q = q.tokens;
  const int last = comm.size() - 1;
  std::vector<Q> qbuf = comm.rank() == 0 ? detail::pack(q) : std::vector<Q>(static_cast<std::size_t>(Hq * n_q * d));
  MPI_Bcast(qbuf.data(), static_cast<int>(qbuf.size() * sizeof(Q)), MPI_BYTE, 0, comm.handle());
  const TensorView<const Q> qv(qbuf.data(), Hq, n_q, d);
  if (comm.rank() == 0 || cache.owns_tail()) {
    std::vector<K> kbuf = comm.rank() == 0 ? detail::pack(k_new) : std::vector<K>(static_cast<std::size_t>(Hkv * n_q * d));
    std::vector<V> vbuf = comm.rank() == 0 ? detail::pack(v_new) : std::vector<V>(static_cast<std::size_t>(Hkv * n_q * dv));
    if (last != 0 && comm.rank() == 0) {
      MPI_Send(kbuf.data(), static_cast<int>(kbuf.size() * sizeof(K)), MPI_BYTE, last, 0, comm.handle());
      MPI_Send(vbuf.data(), static_cast<int>(vbuf.size() * sizeof(V)), MPI_BYTE, last, 1, comm.handle());
    } else if (last != 0) {
      MPI_Recv(kbuf.data(), static_cast<int>(kbuf.size() * sizeof(K)), MPI_BYTE, 0, 0, comm.handle(), MPI_STATUS_IGNORE);
      MPI_Recv(vbuf.data(), static_cast<int>(vbuf.size() * sizeof(V)), MPI_BYTE, 0, 1, comm.handle(), MPI_STATUS_IGNORE);
    }
    if (cache.owns_tail())
      detail::CacheAccess::local(cache).append(TensorView<const K>(kbuf.data(), Hkv, n_q, d),
                                               TensorView<const V>(vbuf.data(), Hkv, n_q, dv),
                                               opt.executor_choice());
  }
  detail::CacheAccess::appended(cache, n_q);

  // 3. The selection, in local slots.
  const index_t G = Hq / Hkv;
  const bool per_q = policy.kind == StepPolicy::Kind::quest && policy.per_query_head;
  const index_t units = per_q ? Hq : Hkv;
  std::vector<std::vector<KeyRange>> lists;
  std::vector<index_t> budget_pages;
  switch (policy.kind) {
    case StepPolicy::Kind::quest:
      detail::quest_lists(cache, qv, policy, scale, lists, budget_pages);
      break;
    case StepPolicy::Kind::window:
      detail::window_lists(cache, units, G, per_q, policy.sinks, policy.window, false, lists);
      break;
    case StepPolicy::Kind::streaming: {
      const index_t total = methods::StreamingLLM{policy.sinks}.total_for(cache.sequence_length(), policy.budget);
      const index_t S = std::min(policy.sinks, total - 1);
      detail::window_lists(cache, units, G, per_q, S, total - S, false, lists);
      break;
    }
    default: detail::window_lists(cache, units, G, per_q, 0, 0, true, lists);
  }
  const KeySelection keys = policy.kind == StepPolicy::Kind::dense && cache.local().uniform()
                                ? KeySelection::all()
                                : KeySelection::from_ranges(per_q ? KeySelection::Scope::per_q_head
                                                                  : KeySelection::Scope::per_kv_head,
                                                            lists);

  // 4. The partial result, [Hq][n_q][dv] then the LSE [Hq][n_q].
  const std::size_t part_floats = static_cast<std::size_t>(Hq * n_q * (dv + 1));
  std::vector<float> part(part_floats);
  detail::partial_decode(cache, qv, keys, opt, part.data(), part.data() + Hq * n_q * dv);

  // 5. Merge on rank 0, in rank order.
  std::vector<float> all(comm.rank() == 0 ? part_floats * static_cast<std::size_t>(comm.size()) : 0);
  MPI_Gather(part.data(), static_cast<int>(part_floats), MPI_FLOAT, all.data(),
             static_cast<int>(part_floats), MPI_FLOAT, 0, comm.handle());
  if (comm.rank() == 0) {
    float* acc = all.data();
    float* acc_lse = acc + Hq * n_q * dv;
    for (int r = 1; r < comm.size(); ++r) {
      const float* o = all.data() + part_floats * static_cast<std::size_t>(r);
      const float* l = o + Hq * n_q * dv;
      for (index_t i = 0; i < Hq * n_q; ++i) merge_state(acc + i * dv, acc_lse[i], o + i * dv, l[i], dv);
    }
    for (index_t h = 0; h < Hq; ++h)
      for (index_t t = 0; t < n_q; ++t) {
        store_row(acc + (h * n_q + t) * dv, out.row(h, t), out.stride_dim, dv);
        if (opt.lse) opt.lse(h, t) = acc_lse[h * n_q + t];
      }
  }

  // 6. Statistics: K/V rows read and pairs over all ranks (on every rank: the Allreduce is
  // collective whether or not this rank asked for them).
  std::int64_t counts[2] = {0, 0};  // pairs, kv rows
  const auto& lc = cache.local();
  std::vector<KeyRange> clipped;
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u, len = lc.length(hk), rows_heads = per_q ? 1 : G;
    kv::detail::clip_ranges(keys, u, len, len, clipped);
    counts[1] += kv::detail::count_keys(clipped);
    for (index_t t = 0; t < n_q; ++t) {
      if (cache.owns_tail()) kv::detail::clip_ranges(keys, u, len, len - n_q + t + 1, clipped);
      counts[0] += rows_heads * kv::detail::count_keys(clipped);
    }
  }
  const index_t local_rows = counts[1];
  MPI_Allreduce(MPI_IN_PLACE, counts, 2, MPI_INT64_T, MPI_SUM, comm.handle());
  if (stats == nullptr) return;
  stats->local_kv_rows = local_rows;
  stats->keys = keys;
  stats->pairs = counts[0];
  stats->global_kv_rows = counts[1];
  stats->dense_pairs = 0;
  for (index_t t = 0; t < n_q; ++t) stats->dense_pairs += Hq * (cache.sequence_length() - n_q + t + 1);
  stats->budget_pages = std::move(budget_pages);
}

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
