/// @file
/// Block-sparse prefill (MInference's block kernel, "Block-Sparse" in the Sparse Frontier paper;
/// docs/METHODS.md, section "block_sparse"). Selection only; the common prefill kernel executes
/// the returned mask.
///
/// Per query head h (reading KV head h / G), with b x b blocks (b = the kernel tile):
///   pooled_q[qb] = mean of the real query rows of block qb, pooled_k[kb] likewise for keys
///   (the last partial block averages only its real rows); block score = pooled_q . pooled_k
///   (no softmax, no scale: only the ranking matters).
///   Query block qb (absolute positions P0..P1) may use key blocks 0..P1/b (block-causal) and
///   always keeps block 0 (sink), its diagonal block(s) P0/b..P1/b and the block before, P0/b - 1.
///   Token causality inside the diagonal block comes from the mask's causal flag.
/// Budget (unit blocks = k, key blocks per query block):
///   count(k)        every query block keeps k blocks in total (forced ones included; the best
///                   others by score, ties toward the lower index, ranking.hpp), so rows with
///                   fewer legal blocks are dense; k >= number of key blocks is exactly dense.
///                   Reachable iff no row's forced blocks exceed k (k >= 3, or 4 where the query
///                   suffix is not block-aligned and the diagonal spans two blocks).
///   compression(c)  k by nearest_budget() over pairs_for_k (the pair count does not depend on
///                   the scores: non-diagonal blocks are whole b x b squares): the k whose CR is
///                   nearest to c in log ratio; reachable iff that CR is within the tolerance of c
///                   (the forced blocks cap the CR near n / (5 b) at k = 3, and k moves in whole
///                   blocks: at n = 8192, b = 64 the CRs around 10 are 10.09 (k = 7) and 8.78
///                   (k = 8)).
///   mass(p)         per head and query block, the fewest key blocks, forced ones counted first,
///                   whose estimated attention mass reaches p. The estimate of key block j is
///                   softmax_j over the legal blocks of scale * pooled_q . pooled_k[j] + log(t_j),
///                   t_j = the keys of block j a query row of the block sees on average (b for a
///                   whole block): the softmax of the pooled logits, weighted by the block's keys.
///                   Candidates enter best first; p = 1 keeps every legal block (dense). The
///                   budget's floor and cap bound each row's k (forced blocks included); reachable
///                   unless the cap is below some row's forced blocks (3 or 4, as for count);
///                   the mean k is reported in stats.detail.
///
/// Memory: per KV head the pooled keys, ceil(n_k / b) x d floats (kept for the whole call); per
/// selecting worker the pooled queries (ceil(n_q / b) x d) and one tile of block scores
/// (ceil(n_k / b) x kTileQ floats): O(n / b) per head, never O(n^2). The mask stores at most k
/// block indices per (head, query block) (mass budgets: the blocks each row needs). Registry name
/// "block_sparse" (prefill).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/detail/ranking.hpp"
#include "sparse_attn/methods/detail/selection.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// @cond SPARSE_ATTN_INTERNAL
namespace detail_bs {
// One selecting worker's buffers: pooled queries of a head, a row buffer, the candidates and kept
// blocks of one query block, one tile of block scores, and (mass budgets) the block logits.
struct Scratch {
  std::vector<float> pooled_q, row, logit;
  std::vector<double> prob;
  std::vector<std::int32_t> cand;
  std::vector<index_t> keep;
  detail::PooledScratch scores;
};

// Geometry of query block qb: its diagonal key blocks [d0, d1] (one block unless the query suffix
// is not block-aligned) and the number of forced blocks {0, d0 - 1, d0..d1}.
struct RowGeometry {
  index_t p0, p1, d0, d1, forced;
};
inline RowGeometry row_geometry(const MaskShape& s, index_t qb) {
  RowGeometry g{};
  g.p0 = s.q_begin(qb) + s.q_offset();
  g.p1 = s.q_end(qb) - 1 + s.q_offset();
  g.d0 = g.p0 / s.block_k;
  g.d1 = g.p1 / s.block_k;
  g.forced = (g.d1 - g.d0 + 1) + (g.d0 >= 1 ? 1 : 0) + (g.d0 >= 2 ? 1 : 0);
  return g;
}
}  // namespace detail_bs
/// @endcond

/// Block-sparse top-k prefill selection by mean-pooled block scores. A value type of one
/// parameter; select() is const, keeps no state and may be called concurrently (with an
/// executor that allows concurrent run(), as the default ones do). Results do not depend on the
/// executor or its thread count.
struct BlockSparse {
  static constexpr const char* name = "block_sparse";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "MInference block top-k, b = 64";
  static constexpr BudgetUnit unit = BudgetUnit::blocks;  ///< k, key blocks per query block
  static constexpr bool takes_mass = true;  ///< takes Budget::mass (registry: MethodInfo)

  index_t block = 64;  ///< b: estimation unit = kernel tile (block_q = block_k = b), >= 1; 64

  /// Hands the parameter to the registry: v("block", block, help).
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("block", block, "b: estimation unit and kernel tile (block_q = block_k = b)");
  }

  /// Exact pairs the block-sparse mask keeps with k blocks per query block, over all heads (it
  /// does not depend on the scores).
  /// @param s  the mask's shape (heads, n_q, n_k, block_q = block_k = b, causal), validated.
  /// @param k  blocks per query block (forced ones included).
  /// @return the (query, key) pairs. O(n_q / b), no allocation.
  static index_t pairs_for_k(const MaskShape& s, index_t k) {
    index_t per_head = 0;
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
      const auto g = detail_bs::row_geometry(s, qb);
      const index_t rows = s.q_end(qb) - s.q_begin(qb);
      const index_t candidates = std::max<index_t>(0, g.d0 - 2);  // blocks 1 .. d0 - 2
      const index_t extra = std::clamp<index_t>(k - g.forced, 0, candidates);
      const index_t off_diag = g.forced - (g.d1 - g.d0 + 1) + extra;  // whole b x b blocks
      per_head += detail::causal_pairs(g.p0, g.p1, s.k_begin(g.d0), s.k_end(g.d1)) +
                  off_diag * rows * s.block_k;
    }
    return per_head * s.heads;
  }

  /// The most forced blocks of any query block (a count budget below it is not honoured).
  /// @param s  the mask's shape, validated.
  /// @return 1 to 4 forced blocks (0 when n_q = 0). O(n_q / b), no allocation.
  static index_t max_forced(const MaskShape& s) {
    index_t f = 0;
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb)
      f = std::max(f, detail_bs::row_geometry(s, qb).forced);
    return f;
  }

  /// Selects the block-sparse mask of q against k.
  /// @param q       queries, [Hq, n_q, d] view (any strides; float, bf16 or fp16), the last n_q
  ///                of the n_k positions.
  /// @param k       keys, [Hkv, n_k, d] view, Hq % Hkv == 0, n_q <= n_k.
  /// @param budget  count(k blocks), compression(c) or mass(p) (see the file comment).
  /// @param opt     softmax scale (NaN: 1/sqrt(d); used by mass budgets) and the executor
  ///                (parallel over KV heads for pooling, query heads for the selection).
  /// @return the block-list mask (tile b, every listed block computed whole up to causality)
  ///         and its statistics (detail "k=5 blocks", or "p=0.9: mean k=... blocks").
  /// @throws sparse_attn::invalid_argument if the budget is malformed, the views are invalid or
  ///         inconsistent (head_dim, Hq % Hkv, n_q > n_k, no heads), block < 1 (or > 2^31 - 1),
  ///         opt.scale is neither NaN nor finite > 0, or Hq x n_q x n_k exceeds 2^63 - 1.
  /// Complexity O((Hq n_q + Hkv n_k) d) to pool, O(Hq x (n_q / b) x (n_k / b) x d) for the block
  /// scores, O(Hq x (n_q / b) x (n_k / b)) to rank (mass: times log(n_k / b)), plus
  /// O((n_q / b) log(n_k / b)) for a compression search; no scores are computed when no row
  /// has a choice. Allocation: Hkv x (n_k / b) x d floats of pooled keys, per worker
  /// (n_q / b) x d pooled queries and a (n_k / b) x 64 score tile, and the mask (at most k block
  /// indices per head and query block): never O(n^2).
  template <class QT, class KT>
  PrefillSelection<BlockListMask<AllowAll>> select(const TensorView<QT>& q,
                                                   const TensorView<KT>& k, const Budget& budget,
                                                   const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::BlockSparse::select";
    PrefillSelection<BlockListMask<AllowAll>> result;
    SelectionTimer timer(result.stats);
    require_budget_kind(budget, true, true, true, where);
    const index_t G = detail::validate_qk(q, k, where);
    require(block >= 1, where, "block must be >= 1, got ", block);
    const float scale = kernel::resolve_scale(opt.scale, q.dim, where);

    const MaskShape shape{q.heads, q.tokens, k.tokens, block, block, true};
    const index_t nkb = shape.num_k_blocks(), nqb = shape.num_q_blocks();
    const bool by_mass = budget.is_mass();
    const double p = by_mass ? budget.mass_target() : 1.0;
    index_t kk = nkb;  // k of count and compression budgets
    bool honoured = true;
    if (budget.is_count()) {
      kk = budget.units();
      honoured = kk >= max_forced(shape);
    } else if (by_mass) {
      honoured = budget.mass_cap() >= max_forced(shape);
    } else if (budget.is_compression()) {
      const index_t lo = std::min<index_t>(3, std::max<index_t>(nkb, 1));
      kk = nearest_budget(lo, std::max(nkb, lo), shape.dense_pairs(), budget.target_compression(),
                          [&](index_t x) { return pairs_for_k(shape, x); });
    }
    kk = std::max<index_t>(1, std::min(kk, std::max<index_t>(nkb, 1)));

    BlockListBuilder builder(shape, false);
    // Count / compression: key blocks 1 .. d0 - 2 compete for k - forced places; everything else
    // is forced or illegal. Mass: every legal block is scored (p < 1).
    auto needs_scores = [&](index_t qb) {
      const auto g = detail_bs::row_geometry(shape, qb);
      if (by_mass)  // p < 1, or a cap below the row's legal blocks
        return g.d0 >= 3 && (p < 1.0 || budget.mass_cap() < g.forced + g.d0 - 2);
      return kk - g.forced > 0 && kk - g.forced < g.d0 - 2;
    };
    bool any_scores = false;
    for (index_t qb = 0; qb < nqb && !any_scores; ++qb) any_scores = needs_scores(qb);

    const index_t d = q.dim, Hkv = k.heads;
    std::vector<index_t> kept_per_head(static_cast<std::size_t>(q.heads), 0);
    sparse_attn::detail::with_executor(opt.executor_choice(), [&](Executor& ex) {
      // One set of buffers per worker, sized before any item runs.
      std::vector<detail_bs::Scratch> ws(static_cast<std::size_t>(std::max(ex.concurrency(), 0)));
      for (detail_bs::Scratch& w : ws) {
        w.row.resize(static_cast<std::size_t>(d));
        if (any_scores) w.pooled_q.resize(static_cast<std::size_t>(nqb * d));
        w.cand.reserve(static_cast<std::size_t>(nkb));
        w.keep.reserve(static_cast<std::size_t>(nkb));
        if (by_mass) {
          w.logit.reserve(static_cast<std::size_t>(nkb));
          w.prob.reserve(static_cast<std::size_t>(nkb));
        }
      }
      // Pooled keys, once per KV head.
      std::vector<float> pooled_k;
      if (any_scores) {
        pooled_k.resize(static_cast<std::size_t>(Hkv * nkb * d));
        run_items(ex, Hkv, [&](index_t hk, int worker) {
          detail::mean_pool(k, hk, block, pooled_k.data() + hk * nkb * d,
                            ws[static_cast<std::size_t>(worker)].row);
        });
      }
      // The optional key blocks of a row: 1 .. d0 - 2 (0, d0 - 1 and the diagonal are forced).
      auto all_candidates = [](detail_bs::Scratch& w, const detail_bs::RowGeometry& g) {
        w.cand.clear();
        for (index_t kb = 1; kb <= g.d0 - 2; ++kb) w.cand.push_back(static_cast<std::int32_t>(kb));
      };
      // Mass budgets: the candidates 1 .. d0 - 2 that cover p after the forced blocks.
      auto cover_mass = [&](detail_bs::Scratch& w, const detail_bs::RowGeometry& g,
                            const float* scores) {
        const index_t legal = g.d1 + 1;
        w.logit.resize(static_cast<std::size_t>(legal));
        w.prob.resize(static_cast<std::size_t>(legal));
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t j = 0; j < legal; ++j) {
          // t_j: keys of block j the block's rows see on average (causal cut on the diagonal).
          const double t = static_cast<double>(detail::causal_pairs(
                               g.p0, g.p1, shape.k_begin(j), shape.k_end(j))) /
                           static_cast<double>(g.p1 - g.p0 + 1);
          const double z = static_cast<double>(scores[j]) + std::log(t);
          w.logit[static_cast<std::size_t>(j)] = static_cast<float>(z);
          w.prob[static_cast<std::size_t>(j)] = z;
          if (!std::isnan(z)) mx = std::max(mx, z);
        }
        all_candidates(w, g);
        // The floor and cap count every kept block, the forced ones included.
        const index_t lo = std::max<index_t>(0, budget.mass_floor() - g.forced);
        const index_t hi = std::max(lo, budget.mass_cap() - g.forced);
        auto limit = [&](std::size_t take) {
          return static_cast<std::size_t>(std::min(
              std::clamp(static_cast<index_t>(take), lo, hi), static_cast<index_t>(w.cand.size())));
        };
        if (!std::isfinite(mx)) {  // no usable estimate (corrupt input): all, up to the cap
          w.cand.resize(limit(w.cand.size()));
          return;
        }
        double sum = 0.0;
        for (double& x : w.prob) {
          x = std::isnan(x) ? 0.0 : std::exp(x - mx);  // NaN logits carry no mass
          sum += x;
        }
        double acc = 0.0;
        auto mass = [&](index_t j) { return w.prob[static_cast<std::size_t>(j)] / sum; };
        acc += mass(0);
        for (index_t j = std::max<index_t>(1, g.d0 - 1); j <= g.d1; ++j) acc += mass(j);
        std::sort(w.cand.begin(), w.cand.end(), detail::ScoreOrder{w.logit.data()});
        std::size_t take = 0;
        while (take < w.cand.size() && acc < p) acc += mass(w.cand[take++]);
        w.cand.resize(limit(take));
        std::sort(w.cand.begin(), w.cand.end());
      };
      // scores[kb] for the legal blocks the row needs (count: kb < d0 - 1; mass: kb <= d1).
      auto emit = [&](detail_bs::Scratch& w, index_t h, index_t qb, const float* scores) {
        const auto g = detail_bs::row_geometry(shape, qb);
        if (by_mass) {
          if (needs_scores(qb))
            cover_mass(w, g, scores);
          else  // p = 1 or no candidates: every legal block
            all_candidates(w, g);
        } else {
          all_candidates(w, g);
          if (needs_scores(qb))
            detail::keep_top_k(scores, w.cand, kk - g.forced);
          else if (kk <= g.forced)
            w.cand.clear();
        }
        w.keep.clear();
        w.keep.push_back(0);
        for (std::int32_t kb : w.cand) w.keep.push_back(kb);
        for (index_t kb = std::max<index_t>(1, g.d0 - 1); kb <= g.d1; ++kb) w.keep.push_back(kb);
        kept_per_head[static_cast<std::size_t>(h)] += static_cast<index_t>(w.keep.size());
        builder.set_row(h, qb, w.keep, true);
      };
      run_items(ex, q.heads, [&](index_t h, int worker) {
        detail_bs::Scratch& w = ws[static_cast<std::size_t>(worker)];
        if (!any_scores) {
          for (index_t qb = 0; qb < nqb; ++qb) emit(w, h, qb, nullptr);
          return;
        }
        detail::mean_pool(q, h, block, w.pooled_q.data(), w.row);
        // Count budgets rank by the raw pooled dot product (a positive scale does not change the
        // ranking); mass budgets need the scaled logits.
        detail::pooled_scores(
            w.pooled_q.data(), nqb, pooled_k.data() + (h / G) * nkb * d, nkb, d,
            by_mass ? scale : 1.0f,
            [&](index_t qb) {
              if (!needs_scores(qb)) return index_t{0};
              const auto g = detail_bs::row_geometry(shape, qb);
              return by_mass ? g.d1 + 1 : g.d0 - 1;
            },
            w.scores, [&](index_t qb, const float* scores, index_t) { emit(w, h, qb, scores); });
      });
      const index_t known = by_mass ? -1 : pairs_for_k(shape, kk);
      result.mask = builder.build(AllowAll{}, known, {&ex});
    });
    std::string det;
    if (by_mass) {
      index_t kept = 0;
      for (index_t c : kept_per_head) kept += c;
      const double rows = static_cast<double>(std::max<index_t>(1, q.heads * nqb));
      det = sparse_attn::detail::concat("p=", p, ": mean k=", static_cast<double>(kept) / rows,
                                        " blocks");
    } else {
      det = sparse_attn::detail::concat("k=", kk, " blocks");
    }
    detail::finish_prefill(result.stats, result.mask, budget, honoured, std::move(det));
    return result;
  }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
