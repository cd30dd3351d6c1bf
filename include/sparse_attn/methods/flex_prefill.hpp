/// @file
/// FlexPrefill (Lai et al., 2025), adaptive and query-aware (docs/METHODS.md, section
/// "flex_prefill"). Selection only; the common prefill kernel executes the returned mask. The
/// original algorithm (bytedance/FlexPrefill, get_active_blocks), per query head h reading KV
/// head h / G, blocks of B = 128:
///   1. Estimate from the last w = min(128, n_q) queries: P = causal row softmax (fp32) of the
///      scaled logits against every key; vertical[j] = mean over rows of P[., j], slash[delta] =
///      sum of the diagonal delta / w. Both are distributions (sum 1).
///   2. Budgets by cumulative mass: c_v = the fewest columns whose vertical mass reaches gamma,
///      c_s likewise for offsets; in blocks floor(c / B) + 1 (as the original), at least
///      ceil(min_budget / B) and at most the number of blocks (the original crashes when
///      n < min_budget or n < w; here every budget is clamped).
///   3. Query-aware test: a = softmax(scale * mean(last w queries) . block-mean keys) over all key
///      blocks, v = vertical summed per key block; if sqrt(JS(a, v)) < tau (natural log, 0 log 0 =
///      0; the original yields NaN there and so never picks such a head), the head is query-aware:
///      its vertical and slash budgets drop to the minimum and, per query block, it adds the key
///      blocks covering gamma of the estimated block attention
///      softmax(scale * pooled_q . pooled_k) over the block-causal row (per query block, as
///      docs/METHODS.md, section "flex_prefill", defines it; the original normalises the whole
///      block map and covers gamma * (number of blocks) of it globally).
///   4. Vertical-slash pattern in blocks: the top budget key blocks by pooled vertical mass
///      (block 0 forced) are kept by every query block that may see them; the top budget offset
///      blocks by pooled slash mass (offsets [sB, (s+1)B); block 0 forced) keep, for query block
///      qb, the key blocks qb - s (the tile's diagonal blocks shifted by s). Ties toward the lower
///      index.
/// gamma = 1 is dense. The budgets adapt per head and per input.
/// Budget:
///   mass(p)         gamma = p (the method's own knob); always reachable.
///   compression(c)  gamma searched so the measured CR is nearest to c: bisection on
///                   x = -log10(1 - gamma) in [0.02, 4] (gamma in [0.045, 0.9999]), 12 steps,
///                   keeping the bracket CR(x_lo) > c >= CR(x_hi) (the CR is monotone in gamma up
///                   to the per-head query-aware decisions); of the two bracketing gammas the one
///                   whose CR is nearer to c in log ratio (ties toward the denser). The vertical /
///                   slash floor becomes min(min_budget, max(1, n_k / (3 c))) tokens (the default
///                   512 alone caps the CR near n / 1536). When even x = 0.02 is denser than c,
///                   that mask is returned; reachable by the tolerance rule. c = 1 is dense
///                   (gamma = 1). Count budgets are refused (unit none).
///
/// Memory per head: the estimate's logits for w queries (n_k x roundup(w, kTileQ) floats per
/// selecting worker, 512 bytes per key at w = 128), vertical and slash masses and their orders
/// (4 floats/ints per key), pooled keys and queries (ceil(n / B) x d floats) and one tile of block
/// scores: O(n) per head, never O(n^2). Registry name "flex_prefill" (prefill).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/detail/selection.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// A FlexPrefill selection: the mask, its statistics, and the per-head decisions behind it.
struct FlexPrefillSelection : PrefillSelection<BlockListMask<AllowAll>> {
  double gamma = 1.0;                     ///< the mass covered (given, or found for a CR)
  index_t min_budget = 0;                 ///< the vertical / slash floor used, in tokens
  std::vector<std::uint8_t> query_aware;  ///< [Hq] 1: the head passed the JS test
  std::vector<float> js_distance;         ///< [Hq] sqrt(JS divergence) of the test (NaN if skipped)
  std::vector<index_t> vertical_blocks;   ///< [Hq] vertical budget in key blocks
  std::vector<index_t> slash_blocks;      ///< [Hq] slash budget in offset blocks
};

/// @cond SPARSE_ATTN_INTERNAL
namespace detail_fp {
// One selecting worker's buffers (sizes in the comments: n_k keys, nkb key blocks, d head dim).
struct Scratch {
  methods::detail::EstimateScratch estimate;
  methods::detail::PooledScratch pooled;
  std::vector<float> vertical, slash;  // [n_k]
  std::vector<float> vb, sb, a;        // [nkb]
  std::vector<float> qmean, row;       // [d]
  std::vector<float> pooled_q;         // [nqb * d]
  std::vector<std::int32_t> order;     // [n_k]
  std::vector<std::int32_t> vsel, ssel;  // [nkb]
  std::vector<std::uint8_t> mark;        // [nkb]
  std::vector<index_t> keep;             // [nkb]
};
}  // namespace detail_fp
/// @endcond

/// FlexPrefill prefill selection: per head, vertical-slash block budgets by cumulative estimated
/// mass gamma, or a query-aware block cover for heads that pass the JS test. A value type of four
/// parameters; select() is const, keeps no state and may be called concurrently (with an
/// executor that allows concurrent run(), as the default ones do). Results do not depend on the
/// executor or its thread count.
struct FlexPrefill {
  static constexpr const char* name = "flex_prefill";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "FlexPrefill, gamma = mass target (or searched for a CR)";
  static constexpr BudgetUnit unit = BudgetUnit::none;  ///< takes no count budget
  static constexpr bool takes_mass = true;  ///< takes Budget::mass (registry: MethodInfo)

  double tau = 0.1;            ///< query-aware threshold on sqrt(JS divergence), >= 0 (0: never)
  /// Fewest tokens of a vertical / slash budget (rounded up to blocks), >= 0; default 512.
  index_t min_budget = 512;
  index_t block = 128;         ///< B: estimation unit and kernel tile (block_q = block_k), >= 1
  index_t last_queries = 128;  ///< w: estimate from the last min(w, n_q) queries, >= 1

  /// Hands every parameter to the registry: v(name, member, help) for "tau", "min_budget",
  /// "block" and "last_queries".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("tau", tau, "query-aware threshold on sqrt(JS divergence) (0: never)");
    v("min_budget", min_budget, "fewest tokens of a vertical / slash budget");
    v("block", block, "B: estimation unit and kernel tile");
    v("last_queries", last_queries, "w: estimate from the last min(w, n_q) queries");
  }

  /// Selects the FlexPrefill mask of q against k.
  /// @param q       queries, [Hq, n_q, d] view (any strides; float, bf16 or fp16), the last n_q
  ///                of the n_k positions.
  /// @param k       keys, [Hkv, n_k, d] view, Hq % Hkv == 0, n_q <= n_k.
  /// @param budget  mass(p): gamma = p; or compression(c): gamma searched (see the file
  ///                comment). Count budgets are refused.
  /// @param opt     softmax scale (NaN: 1/sqrt(d)) and the executor (parallel over query heads).
  /// @return the mask (whole blocks of B, up to causality), its statistics (detail "gamma=...
  ///         min_budget=... query-aware heads=...") and the per-head decisions.
  /// @throws sparse_attn::invalid_argument if the budget is malformed or a count budget, the
  ///         views are invalid or inconsistent (head_dim, Hq % Hkv, n_q > n_k, no heads), tau is
  ///         NaN or < 0, min_budget < 0, block < 1 (or > 2^31 - 1), last_queries < 1,
  ///         opt.scale is neither NaN nor finite > 0, or Hq x n_q x n_k exceeds 2^63 - 1.
  /// Complexity of one selection: O(Hq x w x n_k x d) for the estimate, O(Hq x n_k log n_k) to
  /// order the masses, O((Hq n_q + Hkv n_k) d) to pool and, for query-aware heads,
  /// O((n_q / B) x (n_k / B) x d) block scores; a compression budget runs up to 14 selections
  /// (the bisection). Allocation per selection: Hkv x (n_k / B) x d floats of pooled keys, per
  /// worker the estimate's logits (n_k x roundup(w, 64) floats) and O(n_k + (n_q / B) x d)
  /// buffers, and the mask; the search holds up to three selections at once: never O(n^2).
  template <class QT, class KT>
  FlexPrefillSelection select(const TensorView<QT>& q, const TensorView<KT>& k,
                              const Budget& budget, const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::FlexPrefill::select";
    FlexPrefillSelection out;
    SelectionTimer timer(out.stats);
    require_budget_kind(budget, true, false, true, where);
    methods::detail::validate_qk(q, k, where);
    require(!std::isnan(tau) && tau >= 0.0, where, "tau must be >= 0, got ", tau);
    require(min_budget >= 0, where, "min_budget must be >= 0 tokens, got ", min_budget);
    require(block >= 1, where, "block must be >= 1, got ", block);
    require(last_queries >= 1, where, "last_queries must be >= 1, got ", last_queries);
    const float scale = kernel::resolve_scale(opt.scale, q.dim, where);
    sparse_attn::detail::with_executor(opt.executor_choice(), [&](Executor& ex) {
      if (budget.is_mass()) {
        out = run(q, k, budget.mass_target(), min_budget, scale, ex);
        return;
      }
      const double cr = budget.target_compression();
      if (cr <= 1.0) {
        out = run(q, k, 1.0, min_budget, scale, ex);
        return;
      }
      const index_t floor_tokens = std::min(
          min_budget,
          std::max<index_t>(1, static_cast<index_t>(static_cast<double>(k.tokens) / (3.0 * cr))));
      auto at = [&](double x) {
        return run(q, k, 1.0 - std::pow(10.0, -x), floor_tokens, scale, ex);
      };
      double lo = 0.02, hi = 4.0;  // CR(lo) high, CR(hi) near dense
      FlexPrefillSelection sparse = at(lo);
      if (sparse.mask.compression() < cr) {  // even the sparsest gamma is denser than asked
        out = std::move(sparse);
        return;
      }
      FlexPrefillSelection dense = at(hi);
      for (int it = 0; it < 12; ++it) {  // invariant: CR(lo) >= target > CR(hi) (or hi = start)
        const double mid = 0.5 * (lo + hi);
        FlexPrefillSelection m = at(mid);
        if (m.mask.compression() > cr) {
          lo = mid;
          sparse = std::move(m);
        } else {
          hi = mid;
          dense = std::move(m);
        }
      }
      auto dist = [&](const FlexPrefillSelection& m) {
        return std::fabs(std::log(m.mask.compression() / cr));
      };
      out = dist(sparse) < dist(dense) ? std::move(sparse) : std::move(dense);
    });
    index_t aware = 0;
    for (auto a : out.query_aware) aware += a;
    detail::finish_prefill(out.stats, out.mask, budget, true,
                           sparse_attn::detail::concat("gamma=", out.gamma, " min_budget=",
                                                       out.min_budget,
                                                       " query-aware heads=", aware));
    return out;
  }

 private:
  // One selection at mass gamma with a vertical / slash floor of min_tokens tokens.
  template <class QT, class KT>
  FlexPrefillSelection run(const TensorView<QT>& q, const TensorView<KT>& k, double gamma,
                           index_t min_tokens, float scale, Executor& ex) const {
    namespace sd = methods::detail;
    const index_t G = q.heads / k.heads;

    const MaskShape shape{q.heads, q.tokens, k.tokens, block, block, true};
    const index_t Hq = q.heads, Hkv = k.heads, d = q.dim, n_k = k.tokens, B = block;
    const index_t nqb = shape.num_q_blocks(), nkb = shape.num_k_blocks();
    const index_t w = std::min(last_queries, q.tokens);
    const bool dense = gamma >= 1.0 || q.tokens == 0;
    const index_t min_blocks = std::min(nkb, std::max<index_t>(1, (min_tokens + B - 1) / B));

    FlexPrefillSelection result;
    result.gamma = gamma;
    result.min_budget = min_tokens;
    result.query_aware.assign(static_cast<std::size_t>(Hq), 0);
    result.js_distance.assign(static_cast<std::size_t>(Hq),
                              std::numeric_limits<float>::quiet_NaN());
    result.vertical_blocks.assign(static_cast<std::size_t>(Hq), nkb);
    result.slash_blocks.assign(static_cast<std::size_t>(Hq), nkb);
    BlockListBuilder builder(shape, false);

    auto diag = [&](index_t qb, index_t& d0, index_t& d1) {
      d0 = (shape.q_begin(qb) + shape.q_offset()) / B;
      d1 = (shape.q_end(qb) - 1 + shape.q_offset()) / B;
    };

    {
      // One set of buffers per worker, sized before any item runs.
      std::vector<detail_fp::Scratch> buffers(
          static_cast<std::size_t>(std::max(ex.concurrency(), 0)));
      const auto keys = static_cast<std::size_t>(n_k), blocks = static_cast<std::size_t>(nkb);
      for (detail_fp::Scratch& buf : buffers) {
        buf.keep.reserve(blocks);
        if (dense) continue;
        buf.vertical.resize(keys);
        buf.slash.resize(keys);
        buf.order.reserve(keys);
        buf.vb.reserve(blocks);
        buf.sb.reserve(blocks);
        buf.a.reserve(blocks);
        buf.vsel.reserve(blocks);
        buf.ssel.reserve(blocks);
        buf.mark.reserve(blocks);
        buf.qmean.reserve(static_cast<std::size_t>(d));
        buf.row.reserve(static_cast<std::size_t>(d));
        buf.pooled_q.reserve(static_cast<std::size_t>(nqb * d));
      }
      std::vector<float> pooled_k;
      if (!dense) {
        pooled_k.resize(static_cast<std::size_t>(Hkv * nkb * d));
        run_items(ex, Hkv, [&](index_t hk, int worker) {
          sd::mean_pool(k, hk, B, pooled_k.data() + hk * nkb * d,
                        buffers[static_cast<std::size_t>(worker)].row);
        });
      }
      run_items(ex, Hq, [&](index_t h, int worker) {
        detail_fp::Scratch& buf = buffers[static_cast<std::size_t>(worker)];
        if (dense) {
          for (index_t qb = 0; qb < nqb; ++qb) {
            index_t d0, d1;
            diag(qb, d0, d1);
            buf.keep.clear();
            for (index_t kb = 0; kb <= d1; ++kb) buf.keep.push_back(kb);
            builder.set_row(h, qb, buf.keep, true);
          }
          return;
        }
        const index_t hk = h / G;
        const float* pk = pooled_k.data() + hk * nkb * d;
        // 1. Estimate.
        buf.vertical.resize(static_cast<std::size_t>(n_k));
        buf.slash.resize(static_cast<std::size_t>(n_k));
        sd::last_queries_mass(q, k, h, hk, w, scale, buf.estimate, buf.vertical.data(),
                              buf.slash.data());
        const float inv_w = 1.0f / static_cast<float>(w);
        for (index_t j = 0; j < n_k; ++j) {
          buf.vertical[static_cast<std::size_t>(j)] *= inv_w;
          buf.slash[static_cast<std::size_t>(j)] *= inv_w;
        }
        // 2. Budgets by cumulative mass, in blocks.
        sd::order_by_score(buf.vertical.data(), n_k, buf.order);
        index_t nv = sd::cover_count(buf.vertical.data(), buf.order, gamma) / B + 1;
        sd::order_by_score(buf.slash.data(), n_k, buf.order);
        index_t ns = sd::cover_count(buf.slash.data(), buf.order, gamma) / B + 1;
        nv = std::clamp(nv, min_blocks, nkb);
        ns = std::clamp(ns, min_blocks, nkb);
        buf.vb.assign(static_cast<std::size_t>(nkb), 0.0f);
        buf.sb.assign(static_cast<std::size_t>(nkb), 0.0f);
        for (index_t j = 0; j < n_k; ++j) {
          buf.vb[static_cast<std::size_t>(j / B)] += buf.vertical[static_cast<std::size_t>(j)];
          buf.sb[static_cast<std::size_t>(j / B)] += buf.slash[static_cast<std::size_t>(j)];
        }
        // 3. Query-aware test.
        buf.qmean.assign(static_cast<std::size_t>(d), 0.0f);
        buf.row.resize(static_cast<std::size_t>(d));
        for (index_t i = q.tokens - w; i < q.tokens; ++i) {
          load_row(q.row(h, i), q.stride_dim, buf.row.data(), d);
          for (index_t c = 0; c < d; ++c)
            buf.qmean[static_cast<std::size_t>(c)] += buf.row[static_cast<std::size_t>(c)];
        }
        buf.a.assign(static_cast<std::size_t>(nkb), 0.0f);
        for (index_t kb = 0; kb < nkb; ++kb) {
          float dot = 0.0f;
          for (index_t c = 0; c < d; ++c)
            dot += buf.qmean[static_cast<std::size_t>(c)] * pk[kb * d + c];
          buf.a[static_cast<std::size_t>(kb)] = dot * inv_w * scale;
        }
        sd::softmax(buf.a.data(), nkb);
        const double js = sd::sqrt_js_divergence(buf.a.data(), buf.vb.data(), nkb);
        const bool query_aware = js < tau;
        if (query_aware) nv = ns = min_blocks;
        result.query_aware[static_cast<std::size_t>(h)] = query_aware ? 1 : 0;
        result.js_distance[static_cast<std::size_t>(h)] = static_cast<float>(js);
        result.vertical_blocks[static_cast<std::size_t>(h)] = nv;
        result.slash_blocks[static_cast<std::size_t>(h)] = ns;
        // 4. Top vertical blocks and slash blocks (block 0 of each forced).
        buf.vb[0] = buf.sb[0] = sd::kInf;
        buf.vsel.resize(static_cast<std::size_t>(nkb));
        std::iota(buf.vsel.begin(), buf.vsel.end(), 0);
        sd::keep_top_k(buf.vb.data(), buf.vsel, nv);
        buf.ssel.resize(static_cast<std::size_t>(nkb));
        std::iota(buf.ssel.begin(), buf.ssel.end(), 0);
        sd::keep_top_k(buf.sb.data(), buf.ssel, ns);

        buf.mark.assign(static_cast<std::size_t>(nkb), 0);
        auto emit = [&](index_t qb, const float* scores, index_t n_scores) {
          index_t d0, d1;
          diag(qb, d0, d1);
          for (std::int32_t v : buf.vsel)
            if (v <= d1) buf.mark[static_cast<std::size_t>(v)] = 1;
          for (std::int32_t s : buf.ssel)
            for (index_t kb = std::max<index_t>(0, d0 - s); kb <= d1 - s; ++kb)
              buf.mark[static_cast<std::size_t>(kb)] = 1;
          if (scores != nullptr) {  // query-aware: blocks covering gamma of the row's estimate
            buf.a.assign(scores, scores + n_scores);
            sd::softmax(buf.a.data(), n_scores);
            sd::order_by_score(buf.a.data(), n_scores, buf.order);
            const index_t c = sd::cover_count(buf.a.data(), buf.order, gamma);
            for (index_t t = 0; t < c; ++t)
              buf.mark[static_cast<std::size_t>(buf.order[static_cast<std::size_t>(t)])] = 1;
          }
          buf.keep.clear();
          for (index_t kb = 0; kb <= d1; ++kb)
            if (buf.mark[static_cast<std::size_t>(kb)]) {
              buf.keep.push_back(kb);
              buf.mark[static_cast<std::size_t>(kb)] = 0;
            }
          builder.set_row(h, qb, buf.keep, true);
        };
        if (!query_aware) {
          for (index_t qb = 0; qb < nqb; ++qb) emit(qb, nullptr, 0);
          return;
        }
        buf.pooled_q.resize(static_cast<std::size_t>(nqb * d));
        sd::mean_pool(q, h, B, buf.pooled_q.data(), buf.row);
        sd::pooled_scores(
            buf.pooled_q.data(), nqb, pk, nkb, d, scale,
            [&](index_t qb) {
              index_t d0, d1;
              diag(qb, d0, d1);
              return d1 + 1;
            },
            buf.pooled, emit);
      });
      result.mask = builder.build(AllowAll{}, -1, {&ex});
    }
    return result;
  }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
