/// @file
/// @brief What every eviction method shares: the plan it produces (kv::EvictionPlan: kept slots
/// per KV head, the scores that chose them, the selection statistics) and applying a plan to a
/// cache (kv::apply).
///
/// Internally also the deterministic "keep forced + top-k" selection and the
/// attention-probability column scores that SnapKV, Ada-SnapKV and H2O rank tokens by when no
/// kernel-emitted key mass is at hand.
///
/// Plan/run: a method's select() builds an EvictionPlan from the cache without touching it;
/// kv::apply() (or cache.retain(plan.keep)) compacts the cache in place. See docs/METHODS.md,
/// section "snapkv and ada_snapkv", and section "h2o".
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/dtype.hpp"  // includes Eigen/Core inside the PR 105593 guard
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/arch/dispatch.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/methods/detail/ranking.hpp"
#include "sparse_attn/methods/selector.hpp"

// Eigen's AVX-512 GEMM (the score pass) trips GCC PR 105593; see core/diagnostics.hpp.
SPARSE_ATTN_DIAGNOSTICS_PUSH

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kv {

/// @brief The outcome of an eviction selection: which slots each KV head keeps.
///
/// stats (methods::SelectionStats): pairs = tokens kept, summed over KV heads; dense_pairs = the
/// tokens of the uncompressed sequence (sequence_length() x Hkv), so compression() is the cache
/// compression against keeping everything ever appended; target, reachable, select_ms and
/// detail (the resolved budget, e.g. "c=410 per head") as for every selection.
/// A plain value type: slots refer to the cache as it was when the plan was made, so apply it
/// before the cache changes.
struct EvictionPlan {
  /// [Hkv] lists of kept slots, each ascending (position order) within [0, length(h)).
  std::vector<std::vector<index_t>> keep;
  /// [Hkv][score_stride] the method's score of every slot (higher = more worth keeping; the
  /// scale is the method's); may be empty.
  std::vector<float> scores;
  index_t score_stride = 0;  ///< Scores per KV head in `scores` (the slots scored per head).
  bool dense = false;  ///< The budget covers the cache: nothing is evicted and apply() is a no-op.
  methods::SelectionStats stats;  ///< Kept tokens against the sequence, target, reachability, time.

  /// Head h's slot scores, score_stride floats; unchecked (requires non-empty `scores`).
  /// @param h KV head, in [0, keep.size()).
  /// @return pointer into `scores`, invalidated when the plan is modified or destroyed.
  const float* head_scores(index_t h) const { return scores.data() + h * score_stride; }
  /// Tokens head h keeps; unchecked.
  /// @param h KV head, in [0, keep.size()).
  /// @return keep[h].size().
  index_t kept(index_t h) const {
    return static_cast<index_t>(keep[static_cast<std::size_t>(h)].size());
  }
  /// @return tokens kept summed over KV heads. O(Hkv).
  index_t total_kept() const {
    index_t s = 0;
    for (const auto& k : keep) s += static_cast<index_t>(k.size());
    return s;
  }
};

/// @brief Compacts the cache to the plan's kept slots: cache.retain(plan.keep) unless plan.dense.
///
/// In place, positions kept, no storage reallocation (see kv::Cache::retain for the cost). The
/// plan must have been made on this cache as it is now. Transactional: a throw changes nothing.
/// The cache must not be used by another thread during the call.
/// @tparam Cache a kv::Cache.
/// @param plan the eviction to apply.
/// @param cache the cache it was selected on.
/// @throws sparse_attn::invalid_argument when plan.keep does not fit the cache (as
/// kv::Cache::retain: not one list per KV head, or a list not strictly increasing within
/// [0, length(h))).
/// @throws std::bad_alloc when retain()'s scratch cannot be allocated.
template <class Cache>
void apply(const EvictionPlan& plan, Cache& cache) {
  if (plan.dense) return;
  cache.retain(plan.keep);
}

/// @brief Fills plan.stats once plan.keep is final, for eviction-method implementers.
///
/// Sets target = budget, pairs = tokens kept, dense_pairs = the cache's sequence_length() x Hkv,
/// detail, and reachable by the budget rule (methods::finish_stats). Leaves select_ms alone.
/// O(Hkv); never throws (moving the string does not allocate).
/// @tparam Cache a kv::Cache.
/// @param plan the plan whose keep lists are final.
/// @param cache the cache the plan was selected on.
/// @param budget the budget the method was asked for.
/// @param honoured whether the method kept what a count or mass budget asked (false when the
/// forced tokens, e.g. sinks and window, exceeded the count): the reachability of those budgets.
/// Ignored for a compression budget, which is reachable iff the achieved CR is within its
/// tolerance of the target.
/// @param detail the resolved budget in the method's terms, e.g. "c=410 per head".
template <class Cache>
void finish_eviction_stats(EvictionPlan& plan, const Cache& cache, const methods::Budget& budget,
                           bool honoured, std::string detail) {
  plan.stats.target = budget;
  plan.stats.pairs = plan.total_kept();
  plan.stats.dense_pairs = cache.sequence_length() * cache.kv_heads();
  plan.stats.detail = std::move(detail);
  methods::finish_stats(plan.stats, honoured);
}

namespace detail {

/// Slots of [0, len) to keep: every forced slot, then the best `c - forced` others by score
/// (higher first, ties toward the lower slot; NaN ranks last), returned ascending.
template <class Forced>
std::vector<index_t> keep_top(const float* score, index_t len, index_t c, Forced&& forced) {
  std::vector<index_t> keep, rest;
  for (index_t j = 0; j < len; ++j) (forced(j) ? keep : rest).push_back(j);
  const index_t extra = std::clamp<index_t>(c - static_cast<index_t>(keep.size()), 0,
                                            static_cast<index_t>(rest.size()));
  if (extra < static_cast<index_t>(rest.size()))
    std::nth_element(rest.begin(), rest.begin() + extra, rest.end(),
                     methods::detail::ScoreOrder{score});
  std::vector<std::uint8_t> kept(static_cast<std::size_t>(len),
                                 0);  // merge in position order, O(len)
  for (index_t j : keep) kept[static_cast<std::size_t>(j)] = 1;
  for (index_t e = 0; e < extra; ++e)
    kept[static_cast<std::size_t>(rest[static_cast<std::size_t>(e)])] = 1;
  keep.clear();
  for (index_t j = 0; j < len; ++j)
    if (kept[static_cast<std::size_t>(j)]) keep.push_back(j);
  return keep;
}

/// out[j] = (sum_{t=j-r}^{j+r} s[t]) / (2r + 1) over t in [0, n) (zero padding, stride 1).
inline void avg_pool(const float* s, index_t n, index_t kernel, float* out) {
  const index_t r = kernel / 2;
  double run = 0.0;  // running window sum
  for (index_t t = 0; t < std::min(r, n); ++t) run += s[t];
  for (index_t j = 0; j < n; ++j) {
    if (j + r < n) run += s[j + r];
    if (j - r - 1 >= 0) run -= s[j - r - 1];
    out[j] = static_cast<float>(run / static_cast<double>(kernel));
  }
}

enum class Reduce { sum, max };

inline constexpr index_t kDirectRows = 16;  // at most this many query rows: direct path

/// attention_column_scores() for a few query rows (rows <= kDirectRows): every logit of a head
/// kept (rows x n floats), one exact softmax per row, serial, on the CPU target's routines.
template <class QV, class KV>
void column_scores_direct(const QV& q, index_t row0, const KV& k, float scale, Reduce red,
                          float mult, float* out, index_t stride) {
  constexpr index_t L = arch::kMaxLanes, kKeys = 64;  // keys converted per routine call
  const index_t Hkv = k.heads, G = q.heads / Hkv, n = k.tokens, d = q.dim;
  const index_t nq = q.tokens - row0, off = n - q.tokens, rows = nq * G;
  const index_t np = (n + L - 1) / L * L;
  std::vector<float> qf(static_cast<std::size_t>(rows * d)), kr(static_cast<std::size_t>(kKeys * d));
  kernel::aligned_vector<float> s(static_cast<std::size_t>(rows * np)), col(static_cast<std::size_t>(np));
  arch::dispatch(cpu_target(), [&](auto target) {
    using T = decltype(target);
    for (index_t hk = 0; hk < Hkv; ++hk) {
      for (index_t r = 0; r < rows; ++r) {  // row r = i * G + g
        float* dst = qf.data() + r * d;
        load_row(q.row(hk * G + r % G, row0 + r / G), q.stride_dim, dst, d);
        for (index_t c = 0; c < d; ++c) dst[c] *= scale;
      }
      for (index_t j0 = 0; j0 < n; j0 += kKeys) {
        const index_t nk = std::min(kKeys, n - j0);
        for (index_t j = 0; j < nk; ++j) load_row(k.row(hk, j0 + j), k.stride_dim, kr.data() + j * d, d);
        T::row_dots(qf.data(), d, rows, kr.data(), d, nk, d, s.data() + j0, np);
      }
      for (index_t r = 0; r < rows; ++r) {  // causal mask and padding, then probabilities
        float* sr = s.data() + r * np;
        std::fill(sr + std::min(n, off + row0 + r / G + 1), sr + np, -INFINITY);
      }
      T::softmax_rows(s.data(), np, rows, np);
      T::reduce_columns(s.data(), np, rows, np, red == Reduce::max, mult, col.data());
      std::copy(col.data(), col.data() + n, out + hk * stride);
    }
  });
}

/// Attention-probability column scores. For each KV head hk and key j < n = k.tokens:
///   out[hk * stride + j] = mult * reduce over (g in the group of hk, query row i in [row0, n_q))
///                          of softmax_j(scale * q[hk*G + g, i] . k[hk, j]),
/// where query row i sits at position n - n_q + i and sees keys j <= that position (causal).
/// Exact two-pass softmax in fp32 on the prefill micro-kernel with keys in the SIMD lanes (keys
/// converted and transposed once per head, n x d floats): pass 1 gets each row's log-sum-exp,
/// pass 2 accumulates the probabilities of each key tile over the rows, in row order, so results
/// do not depend on the executor or its thread count. Efficient for one decode row as for a
/// whole prompt (a few rows run on the calling thread). K may be any KV view type (TensorView,
/// kv::PagedView).
template <class QV, class KV>
void attention_column_scores(const QV& q, index_t row0, const KV& k, float scale, Reduce red,
                             float mult, float* out, index_t stride, Executor& executor) {
  constexpr index_t T = arch::kMaxTileQ;  // keys per tile: the micro-kernel's query lanes
  constexpr index_t kRowBlock = 64;  // query rows per work item of pass 1
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const index_t Hkv = k.heads, G = q.heads / Hkv, n = k.tokens, d = q.dim;
  const index_t nq = q.tokens - row0, off = n - q.tokens;
  if (nq <= 0 || n == 0) {
    for (index_t h = 0; h < Hkv; ++h) std::fill(out + h * stride, out + h * stride + n, 0.0f);
    return;
  }
  const index_t rows = nq * G, tiles = (n + T - 1) / T, blocks = (rows + kRowBlock - 1) / kRowBlock;
  if (rows <= kDirectRows) {  // a decode step: no tiling, no threads
    column_scores_direct(q, row0, k, scale, red, mult, out, stride);
    return;
  }
  std::vector<float> qf(static_cast<std::size_t>(rows * d));                  // [row][d], scaled
  kernel::aligned_vector<float> kt(static_cast<std::size_t>(tiles * d * T));  // [tile][d][T]
  std::vector<float> lse(static_cast<std::size_t>(rows));
  // Per worker, allocated before any item runs: one key row, one tile of logits for a block of
  // rows, and the running max and sum of that block's rows.
  const int workers = std::max(executor.concurrency(), 0);
  const auto slots = static_cast<std::size_t>(workers);
  std::vector<float> key_rows(slots * static_cast<std::size_t>(d));
  kernel::aligned_vector<float> tile_logits(slots * static_cast<std::size_t>(kRowBlock * T));
  std::vector<float> row_max(slots * static_cast<std::size_t>(kRowBlock)), row_sum(row_max.size());
  // Converting a tile is cheap: about 4 chunks of tiles per worker.
  const index_t tile_grain = std::max<index_t>(1, tiles / (4 * std::max(workers, 1)));
  auto pos_of = [&](index_t r) { return off + row0 + r / G; };  // row r = i * G + g
  // s[r][j] = logits of rows [r0, r1) x keys of tile t, -inf where causality masks (or padding).
  const CpuTarget target = cpu_target();
  auto logits = [&](index_t r0, index_t r1, index_t t, float* s) {
    arch::dispatch(target, [&](auto a) {
      decltype(a)::qk_block(T, kt.data() + t * d * T, T, qf.data() + r0 * d, d, r1 - r0, d, s, T);
    });
    const index_t j0 = t * T;
    for (index_t r = r0; r < r1; ++r) {
      const index_t first_masked = std::min(pos_of(r) + 1, n);
      for (index_t j = std::max(first_masked, j0); j < j0 + T; ++j)
        s[(r - r0) * T + j - j0] = kNegInf;
    }
  };
  for (index_t hk = 0; hk < Hkv; ++hk) {
    for (index_t r = 0; r < rows; ++r) {
      float* dst = qf.data() + r * d;
      load_row(q.row(hk * G + r % G, row0 + r / G), q.stride_dim, dst, d);
      for (index_t c = 0; c < d; ++c) dst[c] *= scale;
    }
    float* o = out + hk * stride;
    // Keys, converted and transposed: kt[t][c][j].
    run_chunks(executor, tiles, tile_grain, [&](index_t t0, index_t t1, int worker) {
      float* row = key_rows.data() + worker * d;
      for (index_t t = t0; t < t1; ++t) {
        float* dst = kt.data() + t * d * T;
        for (index_t j = 0; j < T; ++j) {
          if (t * T + j < n)
            load_row(k.row(hk, t * T + j), k.stride_dim, row, d);
          else
            std::fill(row, row + d, 0.0f);
          for (index_t c = 0; c < d; ++c) dst[c * T + j] = row[c];
        }
      }
    });
    // Pass 1: per-row log-sum-exp over the row's causal keys (online over key tiles).
    run_items(executor, blocks, [&](index_t b, int worker) {
      float* s = tile_logits.data() + worker * kRowBlock * T;
      float* m = row_max.data() + worker * kRowBlock;  // running max and sum of each row
      float* l = row_sum.data() + worker * kRowBlock;
      const index_t r0 = b * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
      std::fill(m, m + (r1 - r0), kNegInf);
      std::fill(l, l + (r1 - r0), 0.0f);
      for (index_t t = 0; t * T <= pos_of(r1 - 1); ++t) {
        logits(r0, r1, t, s);
        arch::dispatch(target, [&](auto a) { decltype(a)::online_softmax_rows(s, T, r1 - r0, T, m, l); });
      }
      for (index_t r = r0; r < r1; ++r)
        lse[static_cast<std::size_t>(r)] = m[r - r0] + std::log(l[r - r0]);
    });
    // Pass 2: each key tile's probabilities exp(s - lse) (0 where masked), over rows in order.
    run_items(executor, tiles, [&](index_t t, int worker) {
      float* s = tile_logits.data() + worker * kRowBlock * T;
      alignas(64) float acc[T] = {};
      for (index_t b = 0; b < blocks; ++b) {
        const index_t r0 = b * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
        if (pos_of(r1 - 1) < t * T) continue;  // no row of this block sees the tile
        logits(r0, r1, t, s);
        arch::dispatch(target, [&](auto a) {
          decltype(a)::accumulate_probabilities(s, T, r1 - r0, T, lse.data() + r0, red == Reduce::max, acc);
        });
      }
      for (index_t j = t * T; j < std::min(n, (t + 1) * T); ++j) o[j] = mult * acc[j - t * T];
    });
  }
}

/// attention_column_scores() on the caller's executor, or the default one for `exec.num_threads`.
template <class QV, class KV>
void attention_column_scores(const QV& q, index_t row0, const KV& k, float scale, Reduce red,
                             float mult, float* out, index_t stride, const ExecutorChoice& exec) {
  sparse_attn::detail::with_executor(exec, [&](Executor& e) {
    attention_column_scores(q, row0, k, scale, red, mult, out, stride, e);
  });
}

}  // namespace detail
}  // namespace kv
SPARSE_ATTN_NAMESPACE_END

SPARSE_ATTN_DIAGNOSTICS_POP
