/// @file
/// SnapKV and Ada-SnapKV eviction after prefill over a dist::ShardedCache, with a global budget:
/// every KV head keeps the tokens single-process methods::SnapKV (or methods::AdaSnapKV) keeps
/// (docs/DISTRIBUTED.md, section "Decode").
///
/// Scores (methods/snapkv.hpp): s_j = (1/G) sum over the w window queries and the G heads of a
/// group of softmax_j(scale q . k_j), causal, the prefix [0, N - w) smoothed by an average pool.
/// Distributed:
///  1. the window queries are broadcast from rank 0 (Hq x w x d x sizeof(TQ) bytes);
///  2. each shard computes its logits and each row's local log-sum-exp; one MPI_Allgather of the
///     Hkv x G x w local LSEs gives every rank the global normaliser LSE = log sum_r e^{lse_r}
///     (combined in rank order), so each shard's probabilities e^{s - LSE} are the single-process
///     ones to fp32 rounding;
///  3. pooling crosses shard boundaries: one MPI_Allgather of every shard's first and last
///     pool_kernel / 2 raw scores per head (the halo) lets each shard pool its own prefix slots;
///  4. global top-(c - forced) per head: each shard's local best words (score order key, then the
///     global slot: higher score first, ties toward the lower slot, NaN last, as
///     methods::detail::ScoreOrder), one MPI_Allgatherv, and the (c - forced)-th word is the
///     threshold; the sinks and the window are forced, as in SnapKV.
/// The kept set equals single-process SnapKV's unless two candidates' scores at the cut are equal
/// to within fp32 rounding (the scores are sums of the same terms in another order).
/// Ada-SnapKV (evict_ada_snapkv): the same steps 1-3 with the max reduction of
/// methods::AdaSnapKV, then two threshold exchanges as step 4: the per-head floors, then one
/// global top-k over all heads' remaining (head, slot) words; its kept set equals single-process
/// methods::AdaSnapKV's under the same proviso.
/// Not provided: SnapKV's mass budgets.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "sparse_attn/dist/communicator.hpp"
#include "sparse_attn/dist/decode.hpp"
#include "sparse_attn/dist/sharded_cache.hpp"
#include "sparse_attn/methods/quest.hpp"
#include "sparse_attn/methods/ada_snapkv.hpp"
#include "sparse_attn/methods/snapkv.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace dist {

/// What a distributed eviction kept.
struct EvictionStats {
  std::vector<std::vector<index_t>> keep;  ///< [Hkv] this rank's kept local slots (before compaction)
  index_t global_kept = 0;  ///< tokens kept over all ranks, summed over KV heads
  index_t per_head = 0;     ///< c, tokens each KV head keeps over all ranks
  bool dense = false;       ///< the budget covered the cache: nothing was evicted
};

/// @cond SPARSE_ATTN_INTERNAL
namespace detail {

/// SnapKV's geometry over the whole sequence (methods::snapkv_detail::geometry): the window w,
/// the sinks S, forced = S + w, the per-head budget c clamped to [forced, N]; dense when c >= N.
struct SnapGeometry {
  index_t N = 0, w = 0, S = 0, forced = 0, c = 0;
  bool dense = false;
  bool is_forced(index_t x) const { return x < S || x >= N - w; }
};

/// The collective argument check of the SnapKV-style evictions (the same message on every rank)
/// and the geometry. extra_check runs inside the local validation (no MPI), extra_agreed joins
/// the agreed values. Returns the geometry; scale receives the resolved softmax scale.
template <class T, class TQ, class Extra>
SnapGeometry check_snapkv_args(const ShardedCache<T>& cache, const char* where, index_t window,
                               index_t sinks, index_t pool_kernel, const TensorView<TQ>& q,
                               const methods::Budget& budget, const AttentionOptions& opt,
                               Extra&& extra_check, std::vector<Agreed> extra_agreed, float& scale) {
  const index_t Hkv = cache.kv_heads(), d = cache.head_dim(), N = cache.sequence_length();
  const std::string local_error = local_error_of([&] {
    const std::string qname = std::string(where) + ": q";
    validate_view(q, qname.c_str());
    require(q.heads >= 1 && q.heads % Hkv == 0, where, ": q has ", q.heads,
            " heads, a positive multiple of Hkv=", Hkv, " is needed");
    require(q.dim == d, where, ": q has head_dim ", q.dim, ", the cache has ", d);
    require(q.tokens >= 1 && q.tokens <= N, where, ": q has ", q.tokens,
            " queries, 1 to the sequence length ", N, " are allowed");
    require(window >= 1 && sinks >= 0 && pool_kernel >= 1 && pool_kernel % 2 == 1, where,
            ": window=", window, ", sinks=", sinks, ", pool_kernel=", pool_kernel,
            "; window >= 1, sinks >= 0 and an odd pool_kernel >= 1 are allowed");
    methods::require_budget_kind(budget, true, true, false, where);
    for (index_t h = 0; h < Hkv; ++h)
      require(cache.length(h) == N, where, ": KV head ", h, " holds ", cache.length(h), " of ", N,
              " tokens; only a cache never evicted can be (evict once, after prefill)");
    extra_check();
    scale = kernel::resolve_scale(opt.scale, d, where);
  });
  std::vector<Agreed> agreed{{"Hq", q.heads},
                             {"n_q", q.tokens},
                             {"head_dim", q.dim},
                             {"sizeof(q)", static_cast<std::int64_t>(sizeof(TQ))},
                             {"sequence_length", N},
                             {"window", window},
                             {"sinks", sinks},
                             {"pool_kernel", pool_kernel},
                             agreed_double("scale", static_cast<double>(opt.scale))};
  agreed.insert(agreed.end(), extra_agreed.begin(), extra_agreed.end());
  detail::agree_budget(agreed, budget);
  check_collectively(cache.comm(), where, agreed, local_error);

  SnapGeometry g;
  g.N = N;
  g.w = std::min({window, q.tokens, N});
  g.S = std::min(sinks, N - g.w);
  g.forced = g.S + g.w;
  const index_t c = budget.is_count() ? budget.units()
                                      : methods::count_for_compression(N, budget.target_compression());
  g.c = std::clamp(c, g.forced, N);
  g.dense = g.c >= N;
  return g;
}

/// Pooled window scores [Hkv][n_r] of this rank's slots (steps 1-3 of the file comment): the
/// window queries broadcast from rank 0, local logits and LSEs, the global LSE by one
/// MPI_Allgather, the probabilities reduced over the G x w rows (sum x 1/G: SnapKV; max:
/// Ada-SnapKV), then the average pool of the prefix with the neighbours' halo.
template <class T, class TQ>
std::vector<float> snapkv_scores(const ShardedCache<T>& cache, const TensorView<TQ>& q,
                                 const SnapGeometry& g, index_t pool_kernel, float scale,
                                 kv::detail::Reduce red) {
  const Communicator& comm = cache.comm();
  const index_t Hkv = cache.kv_heads(), d = cache.head_dim(), N = g.N, w = g.w;
  const auto& lc = cache.local();
  // 1. The window queries, from rank 0.
  using Q = std::remove_const_t<TQ>;
  const index_t Hq = q.heads, G = Hq / Hkv, rows = w * G;
  std::vector<Q> qbuf = comm.rank() == 0 ? detail::pack(q.slice_tokens(q.tokens - w, w))
                                         : std::vector<Q>(static_cast<std::size_t>(Hq * w * d));
  MPI_Bcast(qbuf.data(), static_cast<int>(qbuf.size() * sizeof(Q)), MPI_BYTE, 0, comm.handle());
  const TensorView<const Q> qw(qbuf.data(), Hq, w, d);

  // 2. Logits [Hkv][rows][n_r] (row r = i * G + g), local LSEs, the global LSE, raw scores.
  const index_t off = cache.slot_offset(0), n_r = lc.length(0);
  const auto kview = lc.keys();
  std::vector<float> logits(static_cast<std::size_t>(Hkv * rows * n_r));
  std::vector<float> lse(static_cast<std::size_t>(Hkv * rows));
  std::vector<float> qrow(static_cast<std::size_t>(d)), krow(static_cast<std::size_t>(d));
  for (index_t hk = 0; hk < Hkv; ++hk)
    for (index_t r = 0; r < rows; ++r) {
      load_row(qw.row(hk * G + r % G, r / G), qw.stride_dim, qrow.data(), d);
      for (float& x : qrow) x *= scale;
      const index_t pos = N - w + r / G;  // the row's position: it sees keys <= pos
      float* s = logits.data() + (hk * rows + r) * n_r;
      OnlineSoftmax st;
      for (index_t j = 0; j < n_r; ++j) {
        if (off + j > pos) {
          s[j] = kNegInf;
          continue;
        }
        load_row(kview.row(hk, j), kview.stride_dim, krow.data(), d);
        float acc = 0.0f;
        for (index_t e = 0; e < d; ++e) acc += qrow[static_cast<std::size_t>(e)] * krow[static_cast<std::size_t>(e)];
        s[j] = acc;
      }
      std::vector<float> tmp(s, s + n_r);
      st.update(tmp.data(), n_r);
      lse[static_cast<std::size_t>(hk * rows + r)] = st.lse();
    }
  const int p = comm.size();
  std::vector<float> all_lse(lse.size() * static_cast<std::size_t>(p));
  MPI_Allgather(lse.data(), static_cast<int>(lse.size()), MPI_FLOAT, all_lse.data(),
                static_cast<int>(lse.size()), MPI_FLOAT, comm.handle());
  for (std::size_t i = 0; i < lse.size(); ++i) {
    float m = kNegInf;
    for (int r = 0; r < p; ++r) m = std::max(m, all_lse[static_cast<std::size_t>(r) * lse.size() + i]);
    double sum = 0.0;
    for (int r = 0; r < p; ++r)
      if (m != kNegInf) sum += std::exp(static_cast<double>(all_lse[static_cast<std::size_t>(r) * lse.size() + i] - m));
    lse[i] = m == kNegInf ? kNegInf : m + static_cast<float>(std::log(sum));
  }
  const bool is_max = red == kv::detail::Reduce::max;
  const float mult = is_max ? 1.0f : 1.0f / static_cast<float>(G);
  std::vector<float> raw(static_cast<std::size_t>(Hkv * n_r), 0.0f);
  for (index_t hk = 0; hk < Hkv; ++hk)
    for (index_t j = 0; j < n_r; ++j) {
      float acc = 0.0f;
      for (index_t r = 0; r < rows; ++r) {
        const float s = logits[static_cast<std::size_t>((hk * rows + r) * n_r + j)];
        if (s == kNegInf) continue;
        const float pr = std::exp(s - lse[static_cast<std::size_t>(hk * rows + r)]);
        acc = is_max ? std::max(acc, pr) : acc + pr;
      }
      raw[static_cast<std::size_t>(hk * n_r + j)] = mult * acc;
    }

  // 3. Halo: every rank's first and last R raw scores per head, then the pool of the prefix.
  const index_t R = pool_kernel / 2, prefix = N - w;
  std::vector<float> edge(static_cast<std::size_t>(Hkv * 2 * R), 0.0f), all_edge(edge.size() * static_cast<std::size_t>(p));
  for (index_t hk = 0; hk < Hkv; ++hk)
    for (index_t i = 0; i < std::min(R, n_r); ++i) {
      edge[static_cast<std::size_t>(hk * 2 * R + i)] = raw[static_cast<std::size_t>(hk * n_r + i)];
      edge[static_cast<std::size_t>(hk * 2 * R + R + i)] = raw[static_cast<std::size_t>(hk * n_r + n_r - 1 - i)];
    }
  if (R > 0)
    MPI_Allgather(edge.data(), static_cast<int>(edge.size()), MPI_FLOAT, all_edge.data(),
                  static_cast<int>(edge.size()), MPI_FLOAT, comm.handle());
  std::vector<index_t> starts(static_cast<std::size_t>(p) + 1, 0);  // global slot of each shard
  for (int r = 0; r < p; ++r) starts[static_cast<std::size_t>(r) + 1] = starts[static_cast<std::size_t>(r)] + cache.shard_length(r, 0);
  auto raw_at = [&](index_t hk, index_t x) -> float {  // raw score of global slot x
    if (x >= off && x < off + n_r) return raw[static_cast<std::size_t>(hk * n_r + x - off)];
    int s = 0;
    while (starts[static_cast<std::size_t>(s) + 1] <= x) ++s;
    const index_t i = x - starts[static_cast<std::size_t>(s)], len = cache.shard_length(s, 0);
    const float* e = all_edge.data() + static_cast<std::size_t>(s) * edge.size() + static_cast<std::size_t>(hk * 2 * R);
    return i < R ? e[i] : e[R + (len - 1 - i)];
  };
  std::vector<float> score(raw.size());
  for (index_t hk = 0; hk < Hkv; ++hk)
    for (index_t j = 0; j < n_r; ++j) {
      const index_t x = off + j;
      if (x >= prefix) {
        score[static_cast<std::size_t>(hk * n_r + j)] = raw[static_cast<std::size_t>(hk * n_r + j)];
        continue;
      }
      double sum = 0.0;
      for (index_t t = std::max<index_t>(0, x - R); t <= std::min(prefix - 1, x + R); ++t)
        sum += static_cast<double>(raw_at(hk, t));
      score[static_cast<std::size_t>(hk * n_r + j)] =
          static_cast<float>(sum / static_cast<double>(pool_kernel));
    }
  return score;
}

/// The rank word of a score and an index (ties toward the lower index, NaN last), as
/// methods::detail::ScoreOrder: a larger word ranks first.
inline std::uint64_t score_word(float score, index_t index) {
  return methods::quest_detail::rank_word(methods::quest_detail::order_key(score), index);
}

/// Global top-k thresholds of U selection units over all ranks (collective; k and U equal on
/// every rank): words[u] holds this rank's candidate rank words of unit u (any order; truncated
/// here to its best k[u]). Returns per unit the k[u]-th largest word over all ranks: a candidate
/// is selected iff k[u] > 0 and its word >= the threshold (0 when the unit has at most k[u]
/// candidates; the maximum word when k[u] <= 0). One MPI_Allgather of U counts (min(size, k + 1):
/// k + 1 marks a truncated list) and one
/// MPI_Allgatherv of at most sum_u k[u] words per rank.
inline std::vector<std::uint64_t> global_thresholds(const Communicator& comm,
                                                    std::vector<std::vector<std::uint64_t>>& words,
                                                    const std::vector<index_t>& k) {
  const index_t U = static_cast<index_t>(k.size());
  const int p = comm.size();
  std::vector<std::uint64_t> flat;
  std::vector<int> counts(static_cast<std::size_t>(U), 0);
  for (index_t u = 0; u < U; ++u) {
    auto& wu = words[static_cast<std::size_t>(u)];
    const index_t ku = k[static_cast<std::size_t>(u)];
    if (ku <= 0) continue;
    // The count sent is min(size, k + 1): k + 1 says "truncated"; k words at most travel.
    counts[static_cast<std::size_t>(u)] = static_cast<int>(std::min<index_t>(static_cast<index_t>(wu.size()), ku + 1));
    if (static_cast<index_t>(wu.size()) > ku) {
      std::nth_element(wu.begin(), wu.begin() + (ku - 1), wu.end(), std::greater<std::uint64_t>());
      wu.resize(static_cast<std::size_t>(ku));
    }
    flat.insert(flat.end(), wu.begin(), wu.end());
  }
  std::vector<int> claimed(static_cast<std::size_t>(p * U)), all_counts(claimed.size()),
      per_rank(static_cast<std::size_t>(p), 0), displ(static_cast<std::size_t>(p), 0);
  MPI_Allgather(counts.data(), static_cast<int>(U), MPI_INT, claimed.data(), static_cast<int>(U),
                MPI_INT, comm.handle());
  for (int r = 0; r < p; ++r)  // words sent: min(claimed, k)
    for (index_t u = 0; u < U; ++u)
      all_counts[static_cast<std::size_t>(r * U + u)] = static_cast<int>(std::min<index_t>(
          claimed[static_cast<std::size_t>(r * U + u)], std::max<index_t>(k[static_cast<std::size_t>(u)], 0)));
  int total = 0;
  for (int r = 0; r < p; ++r) {
    for (index_t u = 0; u < U; ++u) per_rank[static_cast<std::size_t>(r)] += all_counts[static_cast<std::size_t>(r * U + u)];
    displ[static_cast<std::size_t>(r)] = total;
    total += per_rank[static_cast<std::size_t>(r)];
  }
  std::vector<std::uint64_t> all_words(static_cast<std::size_t>(total));
  MPI_Allgatherv(flat.data(), static_cast<int>(flat.size()), MPI_UINT64_T, all_words.data(),
                 per_rank.data(), displ.data(), MPI_UINT64_T, comm.handle());
  std::vector<std::uint64_t> thresholds(static_cast<std::size_t>(U), std::numeric_limits<std::uint64_t>::max());
  std::vector<std::uint64_t> unit;
  for (index_t u = 0; u < U; ++u) {
    const index_t ku = k[static_cast<std::size_t>(u)];
    if (ku <= 0) continue;
    unit.clear();
    index_t candidates = 0;  // over all ranks, capped per rank at k + 1
    for (int r = 0; r < p; ++r) candidates += claimed[static_cast<std::size_t>(r * U + u)];
    if (candidates <= ku) {  // no more candidates than k: every one
      thresholds[static_cast<std::size_t>(u)] = 0;
      continue;
    }
    for (int r = 0; r < p; ++r) {
      int at = displ[static_cast<std::size_t>(r)];
      for (index_t v = 0; v < u; ++v) at += all_counts[static_cast<std::size_t>(r * U + v)];
      unit.insert(unit.end(), all_words.begin() + at,
                  all_words.begin() + at + all_counts[static_cast<std::size_t>(r * U + u)]);
    }
    std::nth_element(unit.begin(), unit.begin() + (ku - 1), unit.end(), std::greater<std::uint64_t>());
    thresholds[static_cast<std::size_t>(u)] = unit[static_cast<std::size_t>(ku - 1)];
  }
  return thresholds;
}

/// Dense result: every rank keeps all its slots (nothing evicted).
template <class T>
void keep_everything(const ShardedCache<T>& cache, EvictionStats& result) {
  const auto& lc = cache.local();
  for (index_t h = 0; h < cache.kv_heads(); ++h)
    for (index_t s = 0; s < lc.length(h); ++s) result.keep[static_cast<std::size_t>(h)].push_back(s);
  result.dense = true;
  result.global_kept = cache.sequence_length() * cache.kv_heads();
}

/// Compacts the local cache to result.keep (ascending per head), rebuilds the page bounds and
/// counts the global kept tokens (cache.length sums the shards: no MPI).
template <class T>
void apply_keep(ShardedCache<T>& cache, EvictionStats& result) {
  CacheAccess::local(cache).retain(result.keep);
  CacheAccess::refresh(cache);
  for (index_t h = 0; h < cache.kv_heads(); ++h) result.global_kept += cache.length(h);
}

}  // namespace detail
/// @endcond

/// SnapKV over the shards (collective): scores the prompt by the observation window and keeps, per
/// KV head, the same c tokens as single-process methods::SnapKV::select + apply on the whole cache
/// (see the file comment for the protocol and the exactness).
/// @param cache the sharded cache holding the prompt, never evicted (every head holds the whole
///        sequence); compacted in place on every rank, then its page bounds are rebuilt.
/// @param method SnapKV's parameters (window, sinks, pool_kernel), equal on every rank.
/// @param q the last n_q prompt queries, [Hq, n_q, d]; read on rank 0 (other ranks: same shape,
///        contents ignored). Only the last min(window, n_q) rows are used.
/// @param budget count(c) tokens per KV head or compression(CR): c = count_for_compression(N, CR).
/// @param opt softmax scale (NaN: 1/sqrt(d)); the rest is not used.
/// @return what was kept.
/// @throws sparse_attn::invalid_argument on every rank, with the same message, before any other
///         collective, when q is invalid or does not match the cache, n_q is not in [1, N], the
///         method's parameters are invalid, the budget is a mass budget, some head was already
///         evicted, or the ranks disagree on any of these.
/// @throws std::bad_alloc when a buffer cannot be allocated.
/// Cost per rank: O(Hq x w x n_r x d) for the logits (kept, Hq x w x n_r floats), O(n_r) for the
/// pooling and the top-k; collectives of the file comment. Thread safety: one call at a time.
template <class T, class TQ>
EvictionStats evict_snapkv(ShardedCache<T>& cache, const methods::SnapKV& method,
                           const TensorView<TQ>& q, const methods::Budget& budget,
                           const AttentionOptions& opt = {}) {
  float scale = 0.0f;
  const detail::SnapGeometry g = detail::check_snapkv_args(
      cache, "dist::evict_snapkv", method.window, method.sinks, method.pool_kernel, q, budget, opt,
      [] {}, {}, scale);
  const index_t Hkv = cache.kv_heads();
  EvictionStats result;
  result.per_head = g.c;
  result.keep.assign(static_cast<std::size_t>(Hkv), {});
  if (g.dense) {
    detail::keep_everything(cache, result);
    return result;
  }
  const std::vector<float> score =
      detail::snapkv_scores(cache, q, g, method.pool_kernel, scale, kv::detail::Reduce::sum);

  // 4. Global top-(c - forced) per head over the non-forced slots; the forced ones are kept.
  const index_t off = cache.slot_offset(0), n_r = cache.local().length(0), extra = g.c - g.forced;
  std::vector<std::vector<std::uint64_t>> words(static_cast<std::size_t>(Hkv));
  for (index_t hk = 0; hk < Hkv && extra > 0; ++hk)
    for (index_t j = 0; j < n_r; ++j)
      if (!g.is_forced(off + j))
        words[static_cast<std::size_t>(hk)].push_back(detail::score_word(score[static_cast<std::size_t>(hk * n_r + j)], off + j));
  const std::vector<std::uint64_t> threshold =
      detail::global_thresholds(cache.comm(), words, std::vector<index_t>(static_cast<std::size_t>(Hkv), extra));
  for (index_t hk = 0; hk < Hkv; ++hk) {
    auto& keep = result.keep[static_cast<std::size_t>(hk)];
    for (index_t j = 0; j < n_r; ++j)
      if (g.is_forced(off + j) ||
          (extra > 0 && detail::score_word(score[static_cast<std::size_t>(hk * n_r + j)], off + j) >=
                            threshold[static_cast<std::size_t>(hk)]))
        keep.push_back(j);
  }
  detail::apply_keep(cache, result);
  return result;
}

/// Ada-SnapKV over the shards (collective): scores the prompt as methods::AdaSnapKV (SnapKV's
/// window scores, max-reduced over the w queries and the G heads of a group, prefix pooled) and
/// keeps, per KV head, the same tokens as single-process methods::AdaSnapKV::select + apply on the
/// whole cache: the layer keeps c x Hkv tokens; each head first keeps its forced tokens and its
/// best up to floor_keep = max(floor(floor_fraction x c), forced), then one global top-k over
/// every remaining (head, token) of all ranks (higher score first, ties toward the lower head,
/// then the lower position, NaN last) takes the rest. Heads end with different lengths.
/// Protocol: steps 1-3 of the file comment (the max reduction in place of the mean), then two
/// threshold exchanges: per head the (floor_keep - forced)-th best rank word (score, global slot),
/// then over all heads the extra-th best word (score, h x N + global slot). Exact up to fp32
/// rounding of the scores at the cut, as evict_snapkv.
/// @param cache the sharded cache holding the prompt, never evicted (every head holds the whole
///        sequence); compacted in place on every rank (per-head lengths differ afterwards), then
///        its page bounds are rebuilt.
/// @param method Ada-SnapKV's parameters (window, sinks, pool_kernel, floor_fraction), equal on
///        every rank.
/// @param q the last n_q prompt queries, [Hq, n_q, d]; read on rank 0 (other ranks: same shape,
///        contents ignored). Only the last min(window, n_q) rows are used.
/// @param budget count(c) tokens per KV head on average or compression(CR): c =
///        count_for_compression(N, CR); c is raised to the forced count; c >= N keeps everything.
/// @param opt softmax scale (NaN: 1/sqrt(d)); the rest is not used.
/// @return what was kept: keep[h] per head (lengths differ), global_kept = c x Hkv (N x Hkv when
///         dense), per_head = c (the average).
/// @throws sparse_attn::invalid_argument on every rank, with the same message, before any other
///         collective, when q is invalid or does not match the cache, n_q is not in [1, N], the
///         method's parameters are invalid (floor_fraction not in [0, 1] included), Hkv x N does
///         not fit 32 bits, the budget is a mass budget, some head was already evicted, or the
///         ranks disagree on any of these.
/// @throws std::bad_alloc when a buffer cannot be allocated.
/// Cost per rank: as evict_snapkv (O(Hq x w x n_r x d) logits, Hq x w x n_r floats kept), plus
/// O(Hkv x n_r) for the floors and the global top-k; one more MPI_Allgather of one count and one
/// MPI_Allgatherv of at most c x Hkv words than evict_snapkv. Thread safety: one call at a time.
template <class T, class TQ>
EvictionStats evict_ada_snapkv(ShardedCache<T>& cache, const methods::AdaSnapKV& method,
                               const TensorView<TQ>& q, const methods::Budget& budget,
                               const AttentionOptions& opt = {}) {
  constexpr const char* where = "dist::evict_ada_snapkv";
  const index_t Hkv = cache.kv_heads(), N = cache.sequence_length();
  float scale = 0.0f;
  const detail::SnapGeometry g = detail::check_snapkv_args(
      cache, where, method.window, method.sinks, method.pool_kernel, q, budget, opt,
      [&] {
        require(method.floor_fraction >= 0.0 && method.floor_fraction <= 1.0, where,
                ": floor_fraction must be in [0, 1], got ", method.floor_fraction);
        require(Hkv * N <= static_cast<index_t>(0xFFFFFFFFu), where, ": Hkv x N = ", Hkv * N,
                " does not fit 32 bits (the global rank words)");
      },
      {agreed_double("floor_fraction", method.floor_fraction)}, scale);
  EvictionStats result;
  result.per_head = g.c;
  result.keep.assign(static_cast<std::size_t>(Hkv), {});
  if (g.dense) {
    detail::keep_everything(cache, result);
    return result;
  }
  const std::vector<float> score =
      detail::snapkv_scores(cache, q, g, method.pool_kernel, scale, kv::detail::Reduce::max);
  const index_t off = cache.slot_offset(0), n_r = cache.local().length(0);
  auto at = [&](index_t hk, index_t j) { return score[static_cast<std::size_t>(hk * n_r + j)]; };

  // 4a. Per-head floors: the forced slots and the global top-(floor_keep - forced) of the rest.
  const index_t floor_keep = std::max(
      static_cast<index_t>(std::floor(method.floor_fraction * static_cast<double>(g.c))), g.forced);
  const index_t k_floor = floor_keep - g.forced;
  std::vector<std::vector<std::uint64_t>> words(static_cast<std::size_t>(Hkv));
  for (index_t hk = 0; hk < Hkv && k_floor > 0; ++hk)
    for (index_t j = 0; j < n_r; ++j)
      if (!g.is_forced(off + j)) words[static_cast<std::size_t>(hk)].push_back(detail::score_word(at(hk, j), off + j));
  const std::vector<std::uint64_t> floor_threshold =
      detail::global_thresholds(cache.comm(), words, std::vector<index_t>(static_cast<std::size_t>(Hkv), k_floor));
  std::vector<std::uint8_t> kept(static_cast<std::size_t>(Hkv * n_r), 0);
  for (index_t hk = 0; hk < Hkv; ++hk)
    for (index_t j = 0; j < n_r; ++j)
      kept[static_cast<std::size_t>(hk * n_r + j)] =
          g.is_forced(off + j) ||
          (k_floor > 0 && detail::score_word(at(hk, j), off + j) >= floor_threshold[static_cast<std::size_t>(hk)]);

  // 4b. The rest of c x Hkv: one global top-k over every remaining (head, slot).
  const index_t extra = std::min(g.c * Hkv - floor_keep * Hkv, (N - floor_keep) * Hkv);
  std::vector<std::vector<std::uint64_t>> rest(1);
  for (index_t hk = 0; hk < Hkv && extra > 0; ++hk)
    for (index_t j = 0; j < n_r; ++j)
      if (!kept[static_cast<std::size_t>(hk * n_r + j)]) rest[0].push_back(detail::score_word(at(hk, j), hk * N + off + j));
  const std::uint64_t threshold = detail::global_thresholds(cache.comm(), rest, {extra})[0];
  for (index_t hk = 0; hk < Hkv; ++hk) {
    auto& keep = result.keep[static_cast<std::size_t>(hk)];
    for (index_t j = 0; j < n_r; ++j)
      if (kept[static_cast<std::size_t>(hk * n_r + j)] ||
          (extra > 0 && detail::score_word(at(hk, j), hk * N + off + j) >= threshold))
        keep.push_back(j);
  }
  detail::apply_keep(cache, result);
  return result;
}

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
