// Method 4 (METHODS.md): Vertical-Slash (MInference). Selection only; the common prefill kernel
// executes the returned mask.
//
// Estimate per query head h (reading KV head h / G): the last w = min(64, n_q) queries against
// every key, causal inside the w x w corner, row softmax in fp32 (scaled logits). Vertical score of
// column j = sum of its probabilities over the w rows; slash score of offset delta = p - j >= 0 =
// sum of the probabilities on that diagonal. Forced: columns 0..3 (sinks) and offsets 0..63 (local
// band, main diagonal included). Keep the top V columns and top S offsets (ties toward the lower
// index), V and S given, or found from a target CR: one budget x gives V = max(4, x) and
// S = max(64, x) (so V = S past the forced counts), and x is the smallest whose executed mask's
// pairs reach dense / target (achieved CR <= target). When even the forced sets alone (V = 4,
// S = 64) are denser than the target, they are returned with reachable = false.
//
// Execution, both from the same sets:
//   exact: query i at position p sees {j <= p : j in Vset or p - j in Sset}. The listed key blocks
//          are exactly those holding an allowed element; each is tested element-wise (predicate).
//   tiled: the same block list executed whole (causal cut only): for each query tile the key blocks
//          covering every slash's range plus the blocks of the vertical columns. A superset of
//          exact with no per-element test. (MInference's GPU kernel gathers vertical columns one by
//          one; the CPU kernel has no gather, so their whole blocks are computed.)
// V = S = n_k is dense in both modes.
//
// Memory per head: the two rankings (4 bytes per key each), the exact mode's predicate (one byte
// per key for columns, one per offset), and per selecting worker the estimate's logits
// (n_k x roundup(w, kTileQ) floats = 256 bytes per key at w = 64 on AVX-512) plus prefix counts:
// O(n) per head, never O(n^2). The mask's block lists hold the listed (query block, key block)
// pairs, at most ceil(n_q / b) x ceil(n_k / b) per head.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/methods/detail/selection.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct VerticalSlashOptions {
  index_t vertical = 1000;     // V: columns kept (>= sink_columns), used when compression == 0
  index_t slash = 6096;        // S: offsets kept (>= local_offsets), used when compression == 0
  double compression = 0.0;    // > 0: target CR (finite, >= 1); V, S found by binary search
  index_t last_queries = 64;   // w: estimate from the last min(w, n_q) queries
  index_t sink_columns = 4;    // forced columns 0 .. sink_columns - 1
  index_t local_offsets = 64;  // forced offsets 0 .. local_offsets - 1
  index_t block = 64;          // kernel tile (block_q = block_k)
  float scale =
      std::numeric_limits<float>::quiet_NaN();  // estimate's softmax scale; NaN: 1/sqrt(d)
  int num_threads = 0;           // selection threads of the default executor (0: OpenMP default)
  Executor* executor = nullptr;  // the caller's executor, not owned; nullptr: the default for
                                 // num_threads
};

/// Exact-mode element test: query qi (position p) sees key kj iff column kj is vertical or offset
/// p - kj is a slash (causality is applied by the mask before this test).
struct VerticalSlashPredicate {
  static constexpr bool trivial = false;
  index_t n_k = 0, q_offset = 0;
  std::vector<std::uint8_t> columns;  // [heads][n_k]: 1 = vertical column j
  std::vector<std::uint8_t> offsets;  // [heads][n_k]: 1 = slash offset delta
  bool is_column(index_t h, index_t j) const {
    return columns[static_cast<std::size_t>(h * n_k + j)] != 0;
  }
  bool is_offset(index_t h, index_t delta) const {
    return offsets[static_cast<std::size_t>(h * n_k + delta)] != 0;
  }
  bool operator()(index_t h, index_t qi, index_t kj) const noexcept {
    const index_t delta = qi + q_offset - kj;
    return is_column(h, kj) || (delta >= 0 && is_offset(h, delta));
  }
};

/// The selected mask (pass it to prefill as is) and what was asked and reached.
template <class Pred>
struct VerticalSlashMask : BlockListMask<Pred> {
  VerticalSlashMask() = default;
  explicit VerticalSlashMask(BlockListMask<Pred> m) : BlockListMask<Pred>(std::move(m)) {}
  double target_compression = detail::kNaN;  // requested CR (NaN when V and S were given)
  bool reachable = true;  // false: target beyond the forced sets' cap, clamped to them
  index_t vertical = 0;   // V used (every head), clamped to n_k
  index_t slash = 0;      // S used (every head), clamped to n_k
};
using VerticalSlashExactMask = VerticalSlashMask<VerticalSlashPredicate>;
using VerticalSlashTiledMask = VerticalSlashMask<AllowAll>;

namespace vertical_slash {
namespace detail_vs {

// Per head, every column and every offset ordered best first (forced ones on top).
struct Ranking {
  index_t n_k = 0;
  std::vector<std::int32_t> columns, offsets;  // [heads][n_k]
};

// One estimating worker's buffers: the estimate's logits, both score vectors and an order.
struct RankScratch {
  methods::detail::EstimateScratch estimate;
  std::vector<float> vertical, slash;
  std::vector<std::int32_t> order;
};

template <class QT, class KT>
Ranking rank(const TensorView<QT>& q, const TensorView<KT>& k, index_t G,
             const VerticalSlashOptions& opt, float scale, Executor& ex) {
  Ranking r;
  r.n_k = k.tokens;
  const index_t n_k = k.tokens, w = std::min(opt.last_queries, q.tokens);
  r.columns.resize(static_cast<std::size_t>(q.heads * n_k));
  r.offsets.resize(static_cast<std::size_t>(q.heads * n_k));
  std::vector<RankScratch> ws(static_cast<std::size_t>(std::max(ex.concurrency(), 0)));
  for (RankScratch& s : ws) {
    s.vertical.resize(static_cast<std::size_t>(n_k));
    s.slash.resize(static_cast<std::size_t>(n_k));
    s.order.reserve(static_cast<std::size_t>(n_k));
  }
  run_items(ex, q.heads, [&](index_t h, int worker) {
    RankScratch& s = ws[static_cast<std::size_t>(worker)];
    methods::detail::last_queries_mass(q, k, h, h / G, w, scale, s.estimate, s.vertical.data(),
                                       s.slash.data());
    std::fill_n(s.vertical.begin(), std::min(opt.sink_columns, n_k), methods::detail::kInf);
    std::fill_n(s.slash.begin(), std::min(opt.local_offsets, n_k), methods::detail::kInf);
    methods::detail::order_by_score(s.vertical.data(), n_k, s.order);
    std::copy(s.order.begin(), s.order.end(), r.columns.begin() + h * n_k);
    methods::detail::order_by_score(s.slash.data(), n_k, s.order);
    std::copy(s.order.begin(), s.order.end(), r.offsets.begin() + h * n_k);
  });
  return r;
}

// Per-head working set: flags of the top nv columns / ns offsets and their prefix counts.
struct HeadSets {
  std::vector<std::uint8_t> col, off;           // [n_k]
  std::vector<index_t> col_prefix, off_prefix;  // [n_k + 1]: flags set before index t
  void assign(const Ranking& r, index_t h, index_t nv, index_t ns) {
    const index_t n = r.n_k;
    const std::int32_t* best_cols = r.columns.data() + h * n;
    const std::int32_t* best_offs = r.offsets.data() + h * n;
    col.assign(static_cast<std::size_t>(n), 0);
    off.assign(static_cast<std::size_t>(n), 0);
    for (index_t t = 0; t < nv; ++t) col[static_cast<std::size_t>(best_cols[t])] = 1;
    for (index_t t = 0; t < ns; ++t) off[static_cast<std::size_t>(best_offs[t])] = 1;
    col_prefix.resize(static_cast<std::size_t>(n + 1));
    off_prefix.resize(static_cast<std::size_t>(n + 1));
    index_t* cp = col_prefix.data();
    index_t* op = off_prefix.data();
    cp[0] = op[0] = 0;
    for (index_t j = 0; j < n; ++j) {
      cp[j + 1] = cp[j] + col[static_cast<std::size_t>(j)];
      op[j + 1] = op[j] + off[static_cast<std::size_t>(j)];
    }
  }
  index_t columns_in(index_t a, index_t b) const {  // vertical columns in [a, b)
    return b <= a ? 0 : col_prefix.data()[b] - col_prefix.data()[a];
  }
  index_t offsets_in(index_t a, index_t b) const {  // slash offsets in [a, b)
    return b <= a ? 0 : off_prefix.data()[b] - off_prefix.data()[a];
  }
};

// f(kb) for every key block of query block qb that holds an allowed element of the exact pattern:
// a vertical column j in the block with j <= P1, or a slash offset in [P0 - k1 + 1, P1 - k0].
template <class F>
void for_each_listed(const MaskShape& s, const HeadSets& hs, index_t qb, F&& f) {
  const index_t p0 = s.q_begin(qb) + s.q_offset(), p1 = s.q_end(qb) - 1 + s.q_offset();
  const index_t last = std::min(s.num_k_blocks() - 1, p1 / s.block_k);
  for (index_t kb = 0; kb <= last; ++kb) {
    const index_t k0 = s.k_begin(kb), k1 = s.k_end(kb);
    if (hs.columns_in(k0, std::min(k1, p1 + 1)) > 0 ||
        hs.offsets_in(std::max<index_t>(0, p0 - k1 + 1), p1 - k0 + 1) > 0)
      f(kb);
  }
}

// Exact-mode pairs of one head: sum over queries of |V ∩ [0, p]| + |S ∩ [0, p]| - |overlap|.
inline index_t exact_pairs(const MaskShape& s, const HeadSets& hs) {
  const index_t n = s.n_k, off = s.q_offset();
  index_t total = 0;
  for (index_t j = 0; j < n; ++j) {
    const auto u = static_cast<std::size_t>(j);
    if (hs.off[u]) total += n - std::max(j, off);  // queries p >= delta = j
    if (hs.col[u]) {
      total += n - std::max(j, off);  // queries p >= j
      // Queries p in [off, n) with p - j a slash as well, counted twice above.
      total -= hs.offsets_in(std::max<index_t>(0, off - j), n - j);
    }
  }
  return total;
}

// Tiled-mode pairs of one head: causal pairs of every listed block.
inline index_t tiled_pairs(const MaskShape& s, const HeadSets& hs) {
  index_t total = 0;
  for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
    const index_t p0 = s.q_begin(qb) + s.q_offset(), p1 = s.q_end(qb) - 1 + s.q_offset();
    for_each_listed(s, hs, qb, [&](index_t kb) {
      total += methods::detail::causal_pairs(p0, p1, s.k_begin(kb), s.k_end(kb));
    });
  }
  return total;
}

// Pairs of every head at budgets (nv, ns), summed in head order. sets: one HeadSets per worker.
template <bool Tiled>
index_t total_pairs(const MaskShape& s, const Ranking& r, index_t nv, index_t ns, Executor& ex,
                    std::vector<HeadSets>& sets) {
  std::vector<index_t> per_head(static_cast<std::size_t>(s.heads), 0);
  run_items(ex, s.heads, [&](index_t h, int worker) {
    HeadSets& hs = sets[static_cast<std::size_t>(worker)];
    hs.assign(r, h, nv, ns);
    per_head[static_cast<std::size_t>(h)] = Tiled ? tiled_pairs(s, hs) : exact_pairs(s, hs);
  });
  index_t total = 0;
  for (index_t p : per_head) total += p;
  return total;
}

template <bool Tiled, class QT, class KT>
auto select(const TensorView<QT>& q, const TensorView<KT>& k, const VerticalSlashOptions& opt,
            const char* where) {
  using Pred = std::conditional_t<Tiled, AllowAll, VerticalSlashPredicate>;
  const index_t G = methods::detail::validate_qk(q, k, where);
  require(opt.block >= 1, where, "block must be >= 1, got ", opt.block);
  require(opt.last_queries >= 1, where, "last_queries must be >= 1, got ", opt.last_queries);
  require(opt.sink_columns >= 0 && opt.local_offsets >= 0, where,
          "sink_columns and local_offsets must be >= 0, got ", opt.sink_columns, " and ",
          opt.local_offsets);
  require(opt.num_threads >= 0, where, "num_threads must be >= 0, got ", opt.num_threads);
  require(opt.compression == 0.0 || (std::isfinite(opt.compression) && opt.compression >= 1.0),
          where, "compression must be 0 (use vertical and slash) or finite and >= 1, got ",
          opt.compression);
  if (opt.compression == 0.0) {
    require(opt.vertical >= opt.sink_columns, where, "vertical (V) must be >= sink_columns (",
            opt.sink_columns, "), got ", opt.vertical);
    require(opt.slash >= opt.local_offsets, where, "slash (S) must be >= local_offsets (",
            opt.local_offsets, "), got ", opt.slash);
  }
  const float scale = methods::detail::resolve_scale(opt.scale, q.dim, where);

  const MaskShape shape{q.heads, q.tokens, k.tokens, opt.block, opt.block, true};
  const index_t n_k = k.tokens;
  VerticalSlashMask<Pred> result;
  BlockListBuilder builder(shape, false);
  if (q.tokens == 0) {  // no rows: nothing to estimate or count
    static_cast<BlockListMask<Pred>&>(result) = builder.build(Pred{}, 0);
    return result;
  }
  sparse_attn::detail::with_executor({opt.executor, opt.num_threads}, [&](Executor& ex) {
    const auto workers = static_cast<std::size_t>(std::max(ex.concurrency(), 0));
    // Per worker: the flags and prefix counts of one head, and one row's key blocks.
    std::vector<HeadSets> sets(workers);
    std::vector<std::vector<index_t>> rows(workers);
    for (std::size_t wk = 0; wk < workers; ++wk) {
      sets[wk].col.reserve(static_cast<std::size_t>(n_k));
      sets[wk].off.reserve(static_cast<std::size_t>(n_k));
      sets[wk].col_prefix.reserve(static_cast<std::size_t>(n_k + 1));
      sets[wk].off_prefix.reserve(static_cast<std::size_t>(n_k + 1));
      rows[wk].reserve(static_cast<std::size_t>(shape.num_k_blocks()));
    }
    const Ranking ranking = rank(q, k, G, opt, scale, ex);
    index_t nv = std::min(opt.vertical, n_k), ns = std::min(opt.slash, n_k);
    if (opt.compression > 0.0) {
      // One budget x: V = max(sinks, x), S = max(local, x) (V = S once past the forced counts),
      // so the sparsest legal point is the forced sets alone.
      result.target_compression = opt.compression;
      const index_t sinks = std::min(opt.sink_columns, n_k),
                    local = std::min(opt.local_offsets, n_k);
      auto budgets = [&](index_t x, index_t& v, index_t& s) {
        v = std::max(sinks, x);
        s = std::max(local, x);
      };
      const index_t x = methods::detail::budget_for_compression(
          std::min(sinks, local), n_k, shape.dense_pairs(), opt.compression,
          [&](index_t xx) {
            index_t v, s;
            budgets(xx, v, s);
            return total_pairs<Tiled>(shape, ranking, v, s, ex, sets);
          },
          result.reachable);
      budgets(x, nv, ns);
    }
    result.vertical = nv;
    result.slash = ns;

    Pred pred{};
    if constexpr (!Tiled) {
      pred.n_k = n_k;
      pred.q_offset = shape.q_offset();
      pred.columns.resize(static_cast<std::size_t>(q.heads * n_k));
      pred.offsets.resize(static_cast<std::size_t>(q.heads * n_k));
    }
    run_items(ex, q.heads, [&](index_t h, int worker) {
      HeadSets& hs = sets[static_cast<std::size_t>(worker)];
      std::vector<index_t>& row = rows[static_cast<std::size_t>(worker)];
      hs.assign(ranking, h, nv, ns);
      if constexpr (!Tiled) {
        std::copy(hs.col.begin(), hs.col.end(), pred.columns.begin() + h * n_k);
        std::copy(hs.off.begin(), hs.off.end(), pred.offsets.begin() + h * n_k);
      }
      for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb) {
        row.clear();
        for_each_listed(shape, hs, qb, [&](index_t kb) { row.push_back(kb); });
        builder.set_row(h, qb, row, true);
      }
    });
    // The exact mode's pair count has an O(n) closed form; counting elementwise costs O(n^2 / CR).
    const index_t known = Tiled ? -1 : total_pairs<Tiled>(shape, ranking, nv, ns, ex, sets);
    static_cast<BlockListMask<Pred>&>(result) = builder.build(std::move(pred), known, {&ex});
  });
  return result;
}

}  // namespace detail_vs

/// Exact Vertical-Slash mask of q [Hq, n_q, d] against k [Hkv, n_k, d] (any strides; float, bf16
/// or fp16). Throws sparse_attn::invalid_argument on bad shapes or options.
template <class QT, class KT>
VerticalSlashExactMask select_exact(const TensorView<QT>& q, const TensorView<KT>& k,
                                    const VerticalSlashOptions& opt = {}) {
  return detail_vs::select<false>(q, k, opt, "methods::vertical_slash::select_exact");
}

/// Tiled Vertical-Slash mask (whole blocks, superset of the exact mask for the same V and S).
template <class QT, class KT>
VerticalSlashTiledMask select_tiled(const TensorView<QT>& q, const TensorView<KT>& k,
                                    const VerticalSlashOptions& opt = {}) {
  return detail_vs::select<true>(q, k, opt, "methods::vertical_slash::select_tiled");
}

/// The exact mode (METHODS.md's definition); select_tiled for the whole-block execution.
template <class QT, class KT>
VerticalSlashExactMask select(const TensorView<QT>& q, const TensorView<KT>& k,
                              const VerticalSlashOptions& opt = {}) {
  return select_exact(q, k, opt);
}

}  // namespace vertical_slash
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
