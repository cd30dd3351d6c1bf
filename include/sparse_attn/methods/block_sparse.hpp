// Method 3 (METHODS.md): block-sparse prefill (MInference's block kernel, "Block-Sparse" in the
// Sparse Frontier paper). Selection only; the common prefill kernel executes the returned mask.
//
// Per query head h (reading KV head h / G), with b x b blocks (b = the kernel tile):
//   pooled_q[qb] = mean of the real query rows of block qb, pooled_k[kb] likewise for keys
//   (the last partial block averages only its real rows); block score = pooled_q . pooled_k
//   (no softmax, no scale: only the ranking matters).
//   Query block qb (absolute positions P0..P1) may use key blocks 0..P1/b (block-causal) and always
//   keeps block 0 (sink), its diagonal block(s) P0/b..P1/b and the block before, P0/b - 1. It keeps
//   k blocks in total (forced ones included; ties toward the lower index), so rows with fewer
//   legal blocks are dense; k >= number of key blocks is exactly dense.
//   Token causality inside the diagonal block comes from the mask's causal flag.
// CR -> k: pairs(k) does not depend on the scores (non-diagonal blocks are whole b x b squares),
// so k is the smallest one whose exact pair count reaches dense / target (achieved CR <= target).
// A target above what the forced blocks allow clamps to the sparsest k and sets reachable = false.
//
// Memory: per KV head the pooled keys, ceil(n_k / b) x d floats (kept for the whole call); per
// selecting worker the pooled queries (ceil(n_q / b) x d) and one tile of block scores
// (ceil(n_k / b) x kTileQ floats): O(n / b) per head, never O(n^2). The mask stores at most k
// block indices per (head, query block).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <limits>
#include <vector>

#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/methods/detail/selection.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct BlockSparseOptions {
  double compression = 10.0;  // target CR (finite, >= 1); ignored when top_k > 0
  index_t top_k = 0;          // > 0: key blocks per query block (forced included), no CR search
  index_t block = 64;         // b: estimation unit = kernel tile (block_q = block_k = b)
  int num_threads = 0;        // selection threads of the default executor (0: OpenMP default)
  Executor* executor = nullptr;  // the caller's executor, not owned; nullptr: the default for
                                 // num_threads
};

/// The selected mask (pass it to prefill as is) and what was asked and reached.
struct BlockSparseMask : BlockListMask<AllowAll> {
  BlockSparseMask() = default;
  explicit BlockSparseMask(BlockListMask<AllowAll> m) : BlockListMask<AllowAll>(std::move(m)) {}
  double target_compression = detail::kNaN;  // requested CR (NaN when top_k was given)
  bool reachable = true;  // false: target beyond the forced blocks' cap, clamped to the sparsest k
  index_t top_k = 0;      // k used: each query block keeps min(legal, max(k, forced)) key blocks
};

namespace block_sparse {

namespace detail_bs {
// One selecting worker's buffers: pooled queries of a head, a row buffer, the candidates and kept
// blocks of one query block, and one tile of block scores.
struct Scratch {
  std::vector<float> pooled_q, row;
  std::vector<std::int32_t> cand;
  std::vector<index_t> keep;
  methods::detail::PooledScratch scores;
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

/// Exact pairs the block-sparse mask keeps with k blocks per query block, over all heads.
inline index_t pairs_for_k(const MaskShape& s, index_t k) {
  index_t per_head = 0;
  for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
    const auto g = detail_bs::row_geometry(s, qb);
    const index_t rows = s.q_end(qb) - s.q_begin(qb);
    const index_t candidates = std::max<index_t>(0, g.d0 - 2);  // blocks 1 .. d0 - 2
    const index_t extra = std::clamp<index_t>(k - g.forced, 0, candidates);
    const index_t off_diag = g.forced - (g.d1 - g.d0 + 1) + extra;  // whole b x b blocks
    per_head += methods::detail::causal_pairs(g.p0, g.p1, s.k_begin(g.d0), s.k_end(g.d1)) +
                off_diag * rows * s.block_k;
  }
  return per_head * s.heads;
}

/// Selects the block-sparse mask of q [Hq, n_q, d] against k [Hkv, n_k, d] (any strides; float,
/// bf16 or fp16). Throws sparse_attn::invalid_argument on bad shapes or options.
template <class QT, class KT>
BlockSparseMask select(const TensorView<QT>& q, const TensorView<KT>& k,
                       const BlockSparseOptions& opt = {}) {
  constexpr const char* where = "methods::block_sparse::select";
  const index_t G = methods::detail::validate_qk(q, k, where);
  require(opt.block >= 1, where, "block must be >= 1, got ", opt.block);
  require(opt.top_k >= 0, where, "top_k must be >= 0 (0: derive k from compression), got ",
          opt.top_k);
  if (opt.top_k == 0) methods::detail::validate_compression(opt.compression, where, "compression");
  require(opt.num_threads >= 0, where, "num_threads must be >= 0, got ", opt.num_threads);

  const MaskShape shape{q.heads, q.tokens, k.tokens, opt.block, opt.block, true};
  const index_t nkb = shape.num_k_blocks(), nqb = shape.num_q_blocks();
  BlockSparseMask result;
  index_t kk = std::max<index_t>(opt.top_k, 1);
  if (opt.top_k == 0) {
    result.target_compression = opt.compression;
    const index_t lo = std::min<index_t>(3, std::max<index_t>(nkb, 1));
    kk = methods::detail::budget_for_compression(
        lo, std::max(nkb, lo), shape.dense_pairs(), opt.compression,
        [&](index_t x) { return pairs_for_k(shape, x); }, result.reachable);
  }
  result.top_k = std::min(kk, std::max<index_t>(nkb, 1));

  BlockListBuilder builder(shape, false);
  // Key blocks 1 .. d0 - 2 compete for k - forced places; everything else is forced or illegal.
  auto needs_scores = [&](index_t qb) {
    const auto g = detail_bs::row_geometry(shape, qb);
    return kk - g.forced > 0 && kk - g.forced < g.d0 - 2;
  };
  bool any_scores = false;
  for (index_t qb = 0; qb < nqb && !any_scores; ++qb) any_scores = needs_scores(qb);

  const index_t d = q.dim, Hkv = k.heads;
  sparse_attn::detail::with_executor({opt.executor, opt.num_threads}, [&](Executor& ex) {
    // One set of buffers per worker, sized before any item runs.
    std::vector<detail_bs::Scratch> ws(static_cast<std::size_t>(std::max(ex.concurrency(), 0)));
    for (detail_bs::Scratch& w : ws) {
      w.row.resize(static_cast<std::size_t>(d));
      if (any_scores) w.pooled_q.resize(static_cast<std::size_t>(nqb * d));
      w.cand.reserve(static_cast<std::size_t>(nkb));
      w.keep.reserve(static_cast<std::size_t>(nkb));
    }
    // Pooled keys, once per KV head.
    std::vector<float> pooled_k;
    if (any_scores) {
      pooled_k.resize(static_cast<std::size_t>(Hkv * nkb * d));
      run_items(ex, Hkv, [&](index_t hk, int worker) {
        methods::detail::mean_pool(k, hk, opt.block, pooled_k.data() + hk * nkb * d,
                                   ws[static_cast<std::size_t>(worker)].row);
      });
    }
    // scores[kb] for kb < d0 - 1 whenever the row needs_scores (else unused).
    auto emit = [&](detail_bs::Scratch& w, index_t h, index_t qb, const float* scores) {
      const auto g = detail_bs::row_geometry(shape, qb);
      w.cand.clear();
      for (index_t kb = 1; kb <= g.d0 - 2; ++kb) w.cand.push_back(static_cast<std::int32_t>(kb));
      if (needs_scores(qb))
        methods::detail::keep_top_k(scores, w.cand, kk - g.forced);
      else if (kk <= g.forced)
        w.cand.clear();
      w.keep.clear();
      w.keep.push_back(0);
      for (std::int32_t kb : w.cand) w.keep.push_back(kb);
      for (index_t kb = std::max<index_t>(1, g.d0 - 1); kb <= g.d1; ++kb) w.keep.push_back(kb);
      builder.set_row(h, qb, w.keep, true);
    };
    run_items(ex, q.heads, [&](index_t h, int worker) {
      detail_bs::Scratch& w = ws[static_cast<std::size_t>(worker)];
      if (!any_scores) {
        for (index_t qb = 0; qb < nqb; ++qb) emit(w, h, qb, nullptr);
        return;
      }
      methods::detail::mean_pool(q, h, opt.block, w.pooled_q.data(), w.row);
      methods::detail::pooled_scores(
          w.pooled_q.data(), nqb, pooled_k.data() + (h / G) * nkb * d, nkb, d, 1.0f,
          [&](index_t qb) {
            return needs_scores(qb) ? detail_bs::row_geometry(shape, qb).d0 - 1 : 0;
          },
          w.scores, [&](index_t qb, const float* scores, index_t) { emit(w, h, qb, scores); });
    });
    static_cast<BlockListMask<AllowAll>&>(result) = builder.build(AllowAll{}, -1, {&ex});
  });
  return result;
}

}  // namespace block_sparse
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
