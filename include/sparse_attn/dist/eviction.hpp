/// @file
/// SnapKV eviction after prefill over a dist::ShardedCache, with a global budget: every KV head
/// keeps the c tokens single-process methods::SnapKV keeps (docs/DISTRIBUTED.md, section "Decode").
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
/// Not provided: Ada-SnapKV's cross-head budget and SnapKV's mass budgets.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "sparse_attn/dist/communicator.hpp"
#include "sparse_attn/dist/decode.hpp"
#include "sparse_attn/dist/sharded_cache.hpp"
#include "sparse_attn/methods/quest.hpp"
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
  constexpr const char* where = "dist::evict_snapkv";
  const Communicator& comm = cache.comm();
  const index_t Hkv = cache.kv_heads(), d = cache.head_dim(), N = cache.sequence_length();
  float scale = 0.0f;
  const std::string local_error = local_error_of([&] {
    validate_view(q, "dist::evict_snapkv: q");
    require(q.heads >= 1 && q.heads % Hkv == 0, where, ": q has ", q.heads,
            " heads, a positive multiple of Hkv=", Hkv, " is needed");
    require(q.dim == d, where, ": q has head_dim ", q.dim, ", the cache has ", d);
    require(q.tokens >= 1 && q.tokens <= N, where, ": q has ", q.tokens,
            " queries, 1 to the sequence length ", N, " are allowed");
    require(method.window >= 1 && method.sinks >= 0 && method.pool_kernel >= 1 &&
                method.pool_kernel % 2 == 1,
            where, ": window=", method.window, ", sinks=", method.sinks, ", pool_kernel=",
            method.pool_kernel, "; window >= 1, sinks >= 0 and an odd pool_kernel >= 1 are allowed");
    methods::require_budget_kind(budget, true, true, false, where);
    for (index_t h = 0; h < Hkv; ++h)
      require(cache.length(h) == N, where, ": KV head ", h, " holds ", cache.length(h), " of ", N,
              " tokens; only a cache never evicted can be (evict once, after prefill)");
    scale = kernel::resolve_scale(opt.scale, d, where);
  });
  std::vector<Agreed> agreed{{"Hq", q.heads},
                             {"n_q", q.tokens},
                             {"head_dim", q.dim},
                             {"sizeof(q)", static_cast<std::int64_t>(sizeof(TQ))},
                             {"sequence_length", N},
                             {"window", method.window},
                             {"sinks", method.sinks},
                             {"pool_kernel", method.pool_kernel},
                             agreed_double("scale", static_cast<double>(opt.scale))};
  detail::agree_budget(agreed, budget);
  check_collectively(comm, where, agreed, local_error);

  // Geometry, as methods::snapkv_detail::geometry.
  const index_t w = std::min({method.window, q.tokens, N});
  const index_t S = std::min(method.sinks, N - w), forced = S + w;
  index_t c = budget.is_count() ? budget.units() : methods::count_for_compression(N, budget.target_compression());
  c = std::clamp(c, forced, N);
  EvictionStats result;
  result.per_head = c;
  result.keep.assign(static_cast<std::size_t>(Hkv), {});
  const auto& lc = cache.local();
  if (c >= N) {  // dense: every rank keeps everything
    result.dense = true;
    for (index_t h = 0; h < Hkv; ++h)
      for (index_t s = 0; s < lc.length(h); ++s) result.keep[static_cast<std::size_t>(h)].push_back(s);
    result.global_kept = N * Hkv;
    return result;
  }

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
  const float mult = 1.0f / static_cast<float>(G);
  std::vector<float> raw(static_cast<std::size_t>(Hkv * n_r), 0.0f);
  for (index_t hk = 0; hk < Hkv; ++hk)
    for (index_t j = 0; j < n_r; ++j) {
      float acc = 0.0f;
      for (index_t r = 0; r < rows; ++r) {
        const float s = logits[static_cast<std::size_t>((hk * rows + r) * n_r + j)];
        if (s != kNegInf) acc += std::exp(s - lse[static_cast<std::size_t>(hk * rows + r)]);
      }
      raw[static_cast<std::size_t>(hk * n_r + j)] = mult * acc;
    }

  // 3. Halo: every rank's first and last R raw scores per head, then the pool of the prefix.
  const index_t R = method.pool_kernel / 2, prefix = N - w;
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
          static_cast<float>(sum / static_cast<double>(method.pool_kernel));
    }

  // 4. Global top-(c - forced) per head: local best words, gathered; the threshold.
  const index_t extra = c - forced, rest = N - forced;
  auto is_forced = [&](index_t x) { return x < S || x >= N - w; };
  std::vector<std::uint64_t> words;
  std::vector<int> counts(static_cast<std::size_t>(Hkv), 0);
  auto word_of = [&](index_t hk, index_t j) {
    return methods::quest_detail::rank_word(
        methods::quest_detail::order_key(score[static_cast<std::size_t>(hk * n_r + j)]), off + j);
  };
  for (index_t hk = 0; hk < Hkv && extra > 0 && extra < rest; ++hk) {
    const std::size_t start = words.size();
    for (index_t j = 0; j < n_r; ++j)
      if (!is_forced(off + j)) words.push_back(word_of(hk, j));
    if (static_cast<index_t>(words.size() - start) > extra) {
      std::nth_element(words.begin() + static_cast<std::ptrdiff_t>(start),
                       words.begin() + static_cast<std::ptrdiff_t>(start) + (extra - 1), words.end(),
                       std::greater<std::uint64_t>());
      words.resize(start + static_cast<std::size_t>(extra));
    }
    counts[static_cast<std::size_t>(hk)] = static_cast<int>(words.size() - start);
  }
  std::vector<int> all_counts(static_cast<std::size_t>(p * Hkv)), per_rank(static_cast<std::size_t>(p), 0),
      displ(static_cast<std::size_t>(p), 0);
  MPI_Allgather(counts.data(), static_cast<int>(Hkv), MPI_INT, all_counts.data(), static_cast<int>(Hkv),
                MPI_INT, comm.handle());
  int total = 0;
  for (int r = 0; r < p; ++r) {
    for (index_t h = 0; h < Hkv; ++h) per_rank[static_cast<std::size_t>(r)] += all_counts[static_cast<std::size_t>(r * Hkv + h)];
    displ[static_cast<std::size_t>(r)] = total;
    total += per_rank[static_cast<std::size_t>(r)];
  }
  std::vector<std::uint64_t> all_words(static_cast<std::size_t>(total));
  MPI_Allgatherv(words.data(), static_cast<int>(words.size()), MPI_UINT64_T, all_words.data(),
                 per_rank.data(), displ.data(), MPI_UINT64_T, comm.handle());
  std::vector<std::uint64_t> unit;
  for (index_t hk = 0; hk < Hkv; ++hk) {
    std::uint64_t threshold = std::numeric_limits<std::uint64_t>::max();  // extra == 0: none
    if (extra >= rest) threshold = 0;                                     // every candidate
    if (extra > 0 && extra < rest) {
      unit.clear();
      for (int r = 0; r < p; ++r) {
        int at = displ[static_cast<std::size_t>(r)];
        for (index_t v = 0; v < hk; ++v) at += all_counts[static_cast<std::size_t>(r * Hkv + v)];
        unit.insert(unit.end(), all_words.begin() + at,
                    all_words.begin() + at + all_counts[static_cast<std::size_t>(r * Hkv + hk)]);
      }
      std::nth_element(unit.begin(), unit.begin() + (extra - 1), unit.end(), std::greater<std::uint64_t>());
      threshold = unit[static_cast<std::size_t>(extra - 1)];
    }
    auto& keep = result.keep[static_cast<std::size_t>(hk)];
    for (index_t j = 0; j < n_r; ++j)
      if (is_forced(off + j) || (extra > 0 && word_of(hk, j) >= threshold)) keep.push_back(j);
  }
  detail::CacheAccess::local(cache).retain(result.keep);
  detail::CacheAccess::refresh(cache);
  for (index_t h = 0; h < Hkv; ++h) result.global_kept += cache.length(h);
  return result;
}

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
