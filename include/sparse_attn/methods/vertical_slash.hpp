/// @file
/// Vertical-Slash (MInference; docs/METHODS.md, section "vertical_slash"). Selection only; the
/// common prefill kernel executes the returned mask.
///
/// Estimate per query head h (reading KV head h / G): the last w = min(64, n_q) queries against
/// every key, causal inside the w x w corner, row softmax in fp32 (scaled logits). Vertical score
/// of column j = sum of its probabilities over the w rows; slash score of offset delta = p - j >=
/// 0 = sum of the probabilities on that diagonal. Forced: columns 0..3 (sinks) and offsets 0..63
/// (local band, main diagonal included). Keep the top V columns and top S offsets (ties toward the
/// lower index, ranking.hpp). (64, 4 and 64 are the defaults of last_queries, sink_columns and
/// local_offsets.)
/// Budget (unit lines = V + S):
///   count(L)        L lines split by vertical_share: V = clamp(round(L * share), sinks,
///                   L - local), S = L - V (V = S = L / 2 at the default share 0.5); each clamped
///                   to n_k. Reachable iff L >= sinks + local (below, the forced sets alone are
///                   kept).
///   compression(c)  L by nearest_budget() over the executed mask's exact pair count (monotone in
///                   L: the sets are prefixes of one ranking), so the CR nearest to c in log ratio;
///                   reachable iff within the tolerance. When even the forced sets alone (V = 4,
///                   S = 64) are denser than the target, they are returned with reachable = false.
///   mass(p, floor, cap)
///                   per head its own V and S: the two rankings merged by score (forced lines
///                   first, ties toward the column), the shortest prefix whose exact attention
///                   mass on the w estimate rows reaches p (a pair that is both on a column and
///                   on a slash counts once), clamped to [floor, cap] lines (never below the
///                   forced sets). Reachable unless the cap is below the forced lines. The result
///                   reports each head's V and S; `vertical` and `slash` are the largest.
/// VerticalSlash (registry "vertical_slash") executes exactly; VerticalSlashTiled
/// ("vertical_slash_tiled") executes the same sets in whole blocks (below). One implementation.
///
/// Execution, both from the same sets:
///   exact: query i at position p sees {j <= p : j in Vset or p - j in Sset}: a LineMask
///          (mask/line_mask.hpp), which the prefill kernel runs as the columns gathered into
///          dense K/V tiles plus the diagonals as bit-masked dense band windows and, where
///          sparse, lane-wise against transposed K/V, with no per-element predicate in
///          the hot loops (docs/METHODS.md, section "vertical_slash").
///   tiled: the same block list executed whole (causal cut only): for each query tile the key
///          blocks covering every slash's range plus the blocks of the vertical columns. A
///          superset of exact with no per-element test. (MInference's GPU kernel gathers vertical
///          columns one by one; the CPU kernel has no gather, so their whole blocks are computed.)
/// V = S = n_k is dense in both modes.
///
/// Memory per head: the two rankings (4 bytes per key each), the exact mode's line mask (one
/// byte per key for columns, one per offset, 4 bytes per line), and per selecting worker the estimate's logits
/// (n_k x roundup(w, kTileQ) floats = 256 bytes per key at w = 64 on AVX-512) plus prefix counts:
/// O(n) per head, never O(n^2). The mask's block lists hold the listed (query block, key block)
/// pairs, at most ceil(n_q / b) x ceil(n_k / b) per head.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/mask/line_mask.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/detail/selection.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// A Vertical-Slash selection: the mask, its statistics, and the V and S the heads kept.
template <class Mask>
struct VerticalSlashSelection : PrefillSelection<Mask> {
  index_t vertical = 0;  ///< V used (every head; mass budgets: the largest), clamped to n_k
  index_t slash = 0;     ///< S used (every head; mass budgets: the largest), clamped to n_k
  std::vector<index_t> head_vertical;  ///< [Hq] V of each query head
  std::vector<index_t> head_slash;     ///< [Hq] S of each query head
};

/// @cond SPARSE_ATTN_INTERNAL
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
  std::vector<std::uint8_t> is_col, is_off;  // mass budgets: the lines taken so far
};

// A mass budget's lines of one head: walk the two rankings merged by score (forced lines first;
// ties toward the column), adding each line's exact new mass on the w estimate rows (P: the
// estimate's probabilities, key-major, P[j * ldq + i]; a pair already covered by the other kind
// counts once), and stop at the shortest prefix whose mass reaches p * w; that prefix clamped to
// the budget's floor and cap (and to [forced, 2 n_k]) gives (V, S). O((V + S) w).
inline void mass_lines(const float* P, index_t ldq, index_t w, index_t n_k, const float* vscore,
                       const float* sscore, const std::int32_t* cols, const std::int32_t* offs,
                       index_t forced, const Budget& budget, std::vector<std::uint8_t>& is_col,
                       std::vector<std::uint8_t>& is_off, index_t& nv, index_t& ns) {
  const index_t p_first = n_k - w;  // position of estimate row 0
  is_col.assign(static_cast<std::size_t>(n_k), 0);
  is_off.assign(static_cast<std::size_t>(n_k), 0);
  const double want = budget.mass_target() * static_cast<double>(w) * (1.0 - 1e-9);
  const index_t lo = std::max(budget.mass_floor(), forced);
  const index_t hi = std::min(std::max(lo, budget.mass_cap()), 2 * n_k);
  double have = 0.0;
  nv = ns = 0;
  while (nv + ns < hi && (nv + ns < lo || have < want)) {
    const bool take_col =
        ns >= n_k || (nv < n_k && !(methods::detail::rank_key(sscore[offs[ns]]) >
                                    methods::detail::rank_key(vscore[cols[nv]])));
    if (take_col) {
      const index_t j = cols[nv++];
      is_col[static_cast<std::size_t>(j)] = 1;
      for (index_t i = std::max<index_t>(0, j - p_first); i < w; ++i)
        if (!is_off[static_cast<std::size_t>(p_first + i - j)]) have += P[j * ldq + i];
    } else {
      const index_t delta = offs[ns++];
      is_off[static_cast<std::size_t>(delta)] = 1;
      for (index_t i = std::max<index_t>(0, delta - p_first); i < w; ++i) {
        const index_t j = p_first + i - delta;
        if (!is_col[static_cast<std::size_t>(j)]) have += P[j * ldq + i];
      }
    }
  }
}

template <class QT, class KT, class Params>
Ranking rank(const TensorView<QT>& q, const TensorView<KT>& k, index_t G, const Params& opt,
             float scale, Executor& ex, const Budget* mass = nullptr,
             std::vector<index_t>* nv = nullptr, std::vector<index_t>* ns = nullptr) {
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
    if (mass != nullptr) {
      const index_t ldq = (w + arch::kMaxTileQ - 1) / arch::kMaxTileQ * arch::kMaxTileQ;
      const index_t forced = std::min(opt.sink_columns, n_k) + std::min(opt.local_offsets, n_k);
      mass_lines(s.estimate.s.data(), ldq, w, n_k, s.vertical.data(), s.slash.data(),
                 r.columns.data() + h * n_k, r.offsets.data() + h * n_k, forced, *mass,
                 s.is_col, s.is_off, (*nv)[static_cast<std::size_t>(h)],
                 (*ns)[static_cast<std::size_t>(h)]);
    }
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

// Pairs of every head at its budget lines(h) = (V, S), summed in head order. sets: one HeadSets
// per worker.
template <bool Tiled, class Lines>
index_t total_pairs(const MaskShape& s, const Ranking& r, Lines&& lines, Executor& ex,
                    std::vector<HeadSets>& sets) {
  std::vector<index_t> per_head(static_cast<std::size_t>(s.heads), 0);
  run_items(ex, s.heads, [&](index_t h, int worker) {
    HeadSets& hs = sets[static_cast<std::size_t>(worker)];
    const auto [nv, ns] = lines(h);
    hs.assign(r, h, nv, ns);
    per_head[static_cast<std::size_t>(h)] = Tiled ? tiled_pairs(s, hs) : exact_pairs(s, hs);
  });
  index_t total = 0;
  for (index_t p : per_head) total += p;
  return total;
}

}  // namespace detail_vs
/// @endcond

/// Vertical-Slash prefill selection: top vertical columns and slash diagonals estimated from the
/// last queries. A value type of five parameters; select() is const, keeps no state and may be
/// called concurrently (with an executor that allows concurrent run(), as the default ones do).
/// Results do not depend on the executor or its thread count.
/// @tparam Tiled  false: exact execution (element predicate); true: whole listed blocks.
template <bool Tiled>
struct BasicVerticalSlash {
  /// Registry name: "vertical_slash" or "vertical_slash_tiled".
  static constexpr const char* name = Tiled ? "vertical_slash_tiled" : "vertical_slash";
  /// One-line summary (the tool's method list).
  static constexpr const char* summary =
      Tiled ? "MInference V/S, whole blocks" : "MInference V/S, exact";
  static constexpr BudgetUnit unit = BudgetUnit::lines;  ///< lines = V columns + S diagonals
  static constexpr bool takes_mass = true;  ///< takes Budget::mass (registry: MethodInfo)
  /// The executed mask: exact = a LineMask (the columns and diagonals themselves); tiled =
  /// whole blocks.
  using Mask = std::conditional_t<Tiled, BlockListMask<AllowAll>, LineMask>;

  index_t last_queries = 64;    ///< w: estimate from the last min(w, n_q) queries (>= 1; 64)
  index_t sink_columns = 4;     ///< forced columns 0 .. sink_columns - 1 (>= 0; default 4)
  index_t local_offsets = 64;   ///< forced offsets 0 .. local_offsets - 1 (>= 0; default 64)
  index_t block = 64;           ///< kernel tile (block_q = block_k), tokens (>= 1; default 64)
  double vertical_share = 0.5;  ///< fraction of a budget's lines that are columns, in [0, 1]

  /// Hands every parameter to the registry: v(name, member, help) for "last_queries",
  /// "sink_columns", "local_offsets", "block" and "vertical_share".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("last_queries", last_queries, "w: estimate from the last min(w, n_q) queries");
    v("sink_columns", sink_columns, "forced columns 0 .. sink_columns - 1");
    v("local_offsets", local_offsets, "forced offsets 0 .. local_offsets - 1 (local band)");
    v("block", block, "kernel tile size (query and key block)");
    v("vertical_share", vertical_share, "fraction of the budget's lines that are columns");
  }

  /// (V, S) of L lines over n_k keys (see the budget rules in the file comment): below the
  /// forced sets' size the forced sets; both clamped to n_k. O(1).
  /// @param lines  L, lines asked for (>= 0).
  /// @param n_k    keys.
  /// @param v      out: V, vertical columns.
  /// @param s      out: S, slash offsets.
  void split(index_t lines, index_t n_k, index_t& v, index_t& s) const {
    const index_t sinks = std::min(sink_columns, n_k), local = std::min(local_offsets, n_k);
    if (lines <= sinks + local) {
      v = sinks;
      s = local;
    } else {
      const auto wanted =
          static_cast<index_t>(std::llround(static_cast<double>(lines) * vertical_share));
      v = std::clamp(wanted, sinks, lines - local);
      s = lines - v;
    }
    v = std::min(v, n_k);
    s = std::min(s, n_k);
  }

  /// Selects the Vertical-Slash mask of q against k.
  /// @param q       queries, [Hq, n_q, d] view (any strides; float, bf16 or fp16), the last n_q
  ///                of the n_k positions.
  /// @param k       keys, [Hkv, n_k, d] view, Hq % Hkv == 0, n_q <= n_k.
  /// @param budget  count(L lines), compression(c) or mass(p, floor, cap) (lines per head; see
  ///                the file comment).
  /// @param opt     softmax scale (NaN: 1/sqrt(d)) of the estimate, and the executor (parallel
  ///                over query heads).
  /// @return the mask (Mask; tile `block` for the tiled blocks, the geometry's block size for the
  ///         exact line mask, whose kernel uses its own tiles), its statistics (detail "V=... S=...") and the V and
  ///         S used.
  /// @throws sparse_attn::invalid_argument if the budget is malformed, the
  ///         views are invalid or inconsistent (head_dim, Hq % Hkv, n_q > n_k, no heads),
  ///         block < 1 (or > 2^31 - 1), last_queries < 1, sink_columns or local_offsets < 0,
  ///         vertical_share is not in [0, 1], opt.scale is neither NaN nor finite > 0, or
  ///         Hq x n_q x n_k exceeds 2^63 - 1.
  /// Complexity O(Hq x w x n_k x d) for the estimate, O(Hq x n_k log n_k) for the rankings,
  /// O(Hq x n_k) for the exact line mask or O(Hq x (n_q / b) x (n_k / b)) to list the tiled blocks, plus, for a compression budget,
  /// O(log n_k) pair counts of O(Hq x n_k) (exact) or O(Hq x (n_q / b) x (n_k / b)) (tiled).
  /// Allocation: the rankings (2 x Hq x n_k int32), per worker the estimate's logits
  /// (n_k x roundup(w, 64) floats) and O(n_k) flags and prefix counts, the exact mode's line
  /// mask (2 x Hq x n_k bytes + the lines) or the tiled mode's block lists: never O(n^2).
  template <class QT, class KT>
  VerticalSlashSelection<Mask> select(const TensorView<QT>& q, const TensorView<KT>& k,
                                      const Budget& budget,
                                      const AttentionOptions& opt = {}) const {
    using namespace detail_vs;
    constexpr const char* where =
        Tiled ? "methods::VerticalSlashTiled::select" : "methods::VerticalSlash::select";
    VerticalSlashSelection<Mask> result;
    SelectionTimer timer(result.stats);
    require_budget_kind(budget, true, true, true, where);
    const index_t G = methods::detail::validate_qk(q, k, where);
    require(block >= 1, where, "block must be >= 1, got ", block);
    require(last_queries >= 1, where, "last_queries must be >= 1, got ", last_queries);
    require(sink_columns >= 0 && local_offsets >= 0, where,
            "sink_columns and local_offsets must be >= 0, got ", sink_columns, " and ",
            local_offsets);
    require(vertical_share >= 0.0 && vertical_share <= 1.0, where,
            "vertical_share must be in [0, 1], got ", vertical_share);
    const float scale = kernel::resolve_scale(opt.scale, q.dim, where);

    const MaskShape shape{q.heads, q.tokens, k.tokens, block, block, true};
    const index_t n_k = k.tokens;
    const index_t sinks = std::min(sink_columns, n_k), local = std::min(local_offsets, n_k);
    index_t lines = budget.is_count() ? budget.units() : 0;
    if (q.tokens == 0) {  // no rows: nothing to estimate or count
      if constexpr (Tiled) result.mask = BlockListBuilder(shape, false).build(AllowAll{}, 0);
      else result.mask = LineMask(shape, std::vector<std::uint8_t>(static_cast<std::size_t>(q.heads * n_k)),
                                  std::vector<std::uint8_t>(static_cast<std::size_t>(q.heads * n_k)));
      detail::finish_prefill(result.stats, result.mask, budget, true, "V=0 S=0");
      return result;
    }
    index_t nv = 0, ns = 0;  // count and compression budgets: every head's (V, S)
    // Mass budgets: each head's own.
    std::vector<index_t> head_v(static_cast<std::size_t>(q.heads)),
        head_s(static_cast<std::size_t>(q.heads));
    auto lines_of = [&](index_t h) {
      return budget.is_mass() ? std::pair<index_t, index_t>{head_v[static_cast<std::size_t>(h)],
                                                            head_s[static_cast<std::size_t>(h)]}
                              : std::pair<index_t, index_t>{nv, ns};
    };
    sparse_attn::detail::with_executor(opt.executor_choice(), [&](Executor& ex) {
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
      const Ranking ranking = budget.is_mass()
                                  ? rank(q, k, G, *this, scale, ex, &budget, &head_v, &head_s)
                                  : rank(q, k, G, *this, scale, ex);
      if (budget.is_compression()) {
        // Lines L from the forced sets alone (L = 0) to the point where both sets hold every key.
        // A tiny share puts that point beyond any index: the search stops at 2^53 lines (the
        // split's rounding is exact below it), where the larger set already holds every key.
        const double lean = std::min(vertical_share, 1.0 - vertical_share);
        const double full = lean > 0.0 ? std::ceil(static_cast<double>(n_k) / lean) + 2.0 : 0.0;
        const index_t hi = lean <= 0.0        ? n_k + sinks + local
                           : full < 0x1p53    ? static_cast<index_t>(full)
                                              : index_t{1} << 53;
        lines = nearest_budget(0, hi, shape.dense_pairs(), budget.target_compression(),
                               [&](index_t x) {
                                 index_t v, s;
                                 split(x, n_k, v, s);
                                 return total_pairs<Tiled>(
                                     shape, ranking,
                                     [&](index_t) { return std::pair<index_t, index_t>{v, s}; },
                                     ex, sets);
                               });
      }
      split(lines, n_k, nv, ns);
      if (budget.is_mass()) {  // the largest over heads
        nv = *std::max_element(head_v.begin(), head_v.end());
        ns = *std::max_element(head_s.begin(), head_s.end());
      }

      if constexpr (Tiled) {
        BlockListBuilder builder(shape, false);
        run_items(ex, q.heads, [&](index_t h, int worker) {
          HeadSets& hs = sets[static_cast<std::size_t>(worker)];
          std::vector<index_t>& row = rows[static_cast<std::size_t>(worker)];
          const auto [hv, hsl] = lines_of(h);
          hs.assign(ranking, h, hv, hsl);
          for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb) {
            row.clear();
            for_each_listed(shape, hs, qb, [&](index_t kb) { row.push_back(kb); });
            builder.set_row(h, qb, row, true);
          }
        });
        result.mask = builder.build(AllowAll{}, -1, {&ex});
      } else {  // the lines themselves: per head the flags of the top nv columns and ns offsets
        std::vector<std::uint8_t> cols(static_cast<std::size_t>(q.heads * n_k), 0);
        std::vector<std::uint8_t> offs(static_cast<std::size_t>(q.heads * n_k), 0);
        for (index_t h = 0; h < q.heads; ++h) {
          const auto [hv, hsl] = lines_of(h);
          for (index_t t = 0; t < hv; ++t) cols[static_cast<std::size_t>(h * n_k + ranking.columns[static_cast<std::size_t>(h * n_k + t)])] = 1;
          for (index_t t = 0; t < hsl; ++t) offs[static_cast<std::size_t>(h * n_k + ranking.offsets[static_cast<std::size_t>(h * n_k + t)])] = 1;
        }
        result.mask = LineMask(shape, std::move(cols), std::move(offs));
      }
    });
    result.vertical = nv;
    result.slash = ns;
    for (index_t h = 0; h < q.heads; ++h) {
      const auto [hv, hsl] = lines_of(h);
      result.head_vertical.push_back(hv);
      result.head_slash.push_back(hsl);
    }
    const bool honoured = budget.is_count()  ? lines >= sinks + local
                          : budget.is_mass() ? budget.mass_cap() >= sinks + local
                                             : true;
    std::string det = sparse_attn::detail::concat("V=", nv, " S=", ns);
    if (budget.is_mass()) {
      const auto [vmin, vmax] = std::minmax_element(head_v.begin(), head_v.end());
      const auto [smin, smax] = std::minmax_element(head_s.begin(), head_s.end());
      det = sparse_attn::detail::concat("V=", *vmin, "-", *vmax, " S=", *smin, "-", *smax,
                                        " per head");
    }
    detail::finish_prefill(result.stats, result.mask, budget, honoured, std::move(det));
    return result;
  }
};

/// Exact Vertical-Slash (the definition of docs/METHODS.md, section "vertical_slash").
using VerticalSlash = BasicVerticalSlash<false>;
/// Tiled Vertical-Slash: whole blocks, a superset of the exact mask for the same V and S.
using VerticalSlashTiled = BasicVerticalSlash<true>;

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
