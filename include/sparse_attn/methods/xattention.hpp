/// @file
/// XAttention (Xu et al., 2025): block-sparse prefill whose block importance comes from strided
/// antidiagonal sums of Q K^T, kept per query block until the estimated attention mass reaches a
/// threshold tau. Selection only; the common prefill kernel executes the returned mask.
///
/// Per query head h (reading KV head h / G), block size B, stride S (S divides B):
///   Query groups g cover the rows [gS, gS + S), key groups c the keys [cS, cS + S). The group
///   logit is the scaled sum over one antidiagonal of the S x S sub-matrix of Q K^T,
///       z(g, c) = scale / S * sum_t  q[gS + S - 1 - t] . k[cS + t],
///   over the terms whose query row exists and whose key is causal for it (j <= p; the paper
///   pads with zeros and lets the diagonal group peek S - 1 keys ahead; we do not). Computing it
///   is one product of the "reshaped" matrices Q' [n_q / S, S d] and K' [n_k / S, S d], i.e. 1/S
///   of the Q K^T work, on the kernel's own tile product.
///   Each query group's row is softmaxed over its legal key groups (first key <= its last
///   query's position), and block (qb, kb)'s estimated mass A(qb, kb) is the sum of the
///   probabilities of the groups of query block qb in key block kb (a query block's row of A sums
///   to its number of groups).
///   Selection per (h, qb): block 0 (sink) and the diagonal blocks d0..d1 are forced and counted
///   first; the other legal blocks enter best first (ties toward the lower index) while the mass
///   taken so far is below tau * (row total). Equivalently each optional block has an entry
///   threshold e = (mass taken before it) / (row total) and is kept iff e < tau; tau = 1 keeps
///   every legal block (dense), tau = 0 only the forced ones.
/// Budget:
///   mass(p)         tau = p; always reachable.
///   compression(c)  tau searched over the entry thresholds of every optional block (nearest_budget
///                   over their sorted list: the exact set of distinct masks), so the achieved CR is
///                   the nearest to c in log ratio that any tau gives; forced blocks cap the CR near
///                   n / (2 B) (reported reachable = false beyond the tolerance).
/// Cost: the antidiagonal product, ~n_q n_k d / S multiply-adds per head (causal half of it),
/// i.e. about 1/(2S) of dense causal attention's work, plus one exp per group pair. Memory: per
/// selecting worker the reshaped queries and keys of one head (n_q d + n_k d floats), a tile of
/// group scores (n_k / S x 64 floats) and one query block's block masses; for the whole call the
/// entry thresholds, Hq ceil(n_q / B) ceil(n_k / B) floats (n = 131072, B = 128, Hq = 32:
/// 128 MiB; n = 16384: 2 MiB).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
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

/// An XAttention selection: the mask, its statistics, and the threshold that made it.
struct XAttentionSelection : PrefillSelection<BlockListMask<AllowAll>> {
  double tau = 1.0;  ///< the mass threshold used (given by a mass budget, or found for a CR)
};

/// XAttention's antidiagonal block selection (see the file comment for the rule).
struct XAttention {
  static constexpr const char* name = "xattention";  ///< registry name
  /// one-line description for listings
  static constexpr const char* summary = "XAttention: antidiagonal block mass up to tau";
  static constexpr BudgetUnit unit = BudgetUnit::none;  ///< takes no count budget
  static constexpr bool takes_mass = true;  ///< takes Budget::mass (registry: MethodInfo)

  index_t block = 128;  ///< B: estimation unit and kernel tile (block_q = block_k = B), tokens
  index_t stride = 8;   ///< S: antidiagonal stride in tokens; must divide B (the paper: 8 or 16)

  /// Lists the parameters for the registry (name, reference, help).
  /// @param v visitor called as v(name, field, help) for each parameter
  template <class V>
  void visit_params(V&& v) {
    v("block", block, "B: estimation unit and kernel tile");
    v("stride", stride, "S: antidiagonal stride (divides B)");
  }

  /// Selects the XAttention mask of q against k (causal; queries are the last n_q of n_k tokens).
  /// @param q      queries [Hq, n_q, d], any strides; float, bf16 or fp16
  /// @param k      keys [Hkv, n_k, d], Hq % Hkv == 0, n_q <= n_k
  /// @param budget mass(p): tau = p; compression(c): tau searched for the CR nearest to c
  /// @param opt    scale (NaN: 1/sqrt(d)) and the executor the estimate runs on
  /// @return the mask (per head, B x B blocks), its statistics (detail: tau, mean blocks per
  ///         query block) and tau
  /// @throws sparse_attn::invalid_argument on bad shapes, a count budget, block < 1, stride < 1 or
  ///         stride not dividing block; std::bad_alloc when the buffers cannot be allocated
  /// Thread safety: const; concurrent calls are safe. Allocates its buffers per call.
  template <class QT, class KT>
  XAttentionSelection select(const TensorView<QT>& q, const TensorView<KT>& k,
                             const Budget& budget, const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::XAttention::select";
    XAttentionSelection out;
    SelectionTimer timer(out.stats);
    require_budget_kind(budget, true, false, true, where);
    const index_t G = detail::validate_qk(q, k, where);
    require(block >= 1 && block <= (index_t{1} << 31) - 1, where,
            "block must be in [1, 2^31 - 1], got ", block);
    require(stride >= 1 && stride <= block && block % stride == 0, where,
            "stride must be in [1, block] and divide block=", block, ", got ", stride);
    const float scale = kernel::resolve_scale(opt.scale, q.dim, where);

    const MaskShape shape{q.heads, q.tokens, k.tokens, block, block, true};
    shape.validate(where);
    const index_t nqb = shape.num_q_blocks(), nkb = shape.num_k_blocks();
    // Entry thresholds per (h, qb, kb): -1 forced, +inf illegal (beyond the causal edge),
    // else in [0, 1].
    std::vector<float> entry(static_cast<std::size_t>(q.heads * nqb * nkb),
                             std::numeric_limits<float>::infinity());
    sparse_attn::detail::with_executor(opt.executor_choice(), [&](Executor& ex) {
      estimate(q, k, G, scale, shape, entry.data(), ex);
    });

    double tau = 1.0;
    if (budget.is_mass()) {
      tau = budget.mass_target();
    } else if (budget.target_compression() > 1.0 && shape.dense_pairs() > 0) {
      tau = search_tau(shape, entry, budget.target_compression());
    }
    out.tau = tau;
    out.mask = mask_at(shape, entry, tau, opt);
    index_t listed = 0;
    for (index_t h = 0; h < q.heads; ++h)
      for (index_t qb = 0; qb < nqb; ++qb) listed += out.mask.num_blocks(h, qb);
    const double rows = static_cast<double>(std::max<index_t>(1, q.heads * nqb));
    detail::finish_prefill(out.stats, out.mask, budget, true,
                           sparse_attn::detail::concat("tau=", tau, " S=", stride, " B=", block,
                                                       " mean blocks=",
                                                       static_cast<double>(listed) / rows));
    return out;
  }

  /// The rule's kept blocks from entry thresholds: forced (e < 0), e < tau, or every legal block
  /// when tau >= 1.
  /// @param e   entry threshold of one block (-1 forced, +inf illegal)
  /// @param tau mass threshold in [0, 1]
  /// @return whether the block is kept
  static bool kept(float e, double tau) noexcept {
    if (e < 0.0f) return true;
    if (!(e <= 1.0f)) return false;  // illegal (or NaN: never produced)
    return tau >= 1.0 || static_cast<double>(e) < tau;
  }

 private:
  /// Forced key blocks of query block qb: 0 and its diagonal blocks [d0, d1].
  static std::pair<index_t, index_t> diagonal(const MaskShape& s, index_t qb) {
    const index_t p0 = s.q_begin(qb) + s.q_offset(), p1 = s.q_end(qb) - 1 + s.q_offset();
    return {p0 / s.block_k, p1 / s.block_k};
  }

  /// Fills entry[(h * nqb + qb) * nkb + kb] for every head, query block and legal key block.
  template <class QT, class KT>
  void estimate(const TensorView<QT>& q, const TensorView<KT>& k, index_t G, float scale,
                const MaskShape& shape, float* entry, Executor& ex) const {
    const index_t S = stride, B = block, d = q.dim, sd = S * d;
    const index_t n_q = q.tokens, n_k = k.tokens, off = shape.q_offset();
    const index_t nqb = shape.num_q_blocks(), nkb = shape.num_k_blocks();
    const index_t ng_q = (n_q + S - 1) / S, ng_k = (n_k + S - 1) / S;
    if (n_q == 0) return;
    struct Scratch {
      std::vector<float> qr, kr, row, mass;
      std::vector<double> prob;
      std::vector<std::int32_t> order;
      detail::PooledScratch tile;
    };
    std::vector<Scratch> ws(static_cast<std::size_t>(std::max(ex.concurrency(), 1)));
    for (Scratch& w : ws) {
      w.qr.assign(static_cast<std::size_t>(ng_q * sd), 0.0f);
      w.kr.assign(static_cast<std::size_t>(ng_k * sd), 0.0f);
      w.row.resize(static_cast<std::size_t>(d));
      w.mass.resize(static_cast<std::size_t>(nkb));
      w.prob.resize(static_cast<std::size_t>(ng_k));
      w.order.reserve(static_cast<std::size_t>(nkb));
    }
    const float zscale = scale / static_cast<float>(S);
    run_items(ex, q.heads, [&](index_t h, int worker) {
      Scratch& w = ws[static_cast<std::size_t>(worker)];
      const index_t hk = h / G;
      // Q'[g] = (q[gS + S - 1], ..., q[gS]) and K'[c] = (k[cS], ..., k[cS + S - 1]); rows past
      // the end stay zero (they add nothing to a dot product).
      std::fill(w.qr.begin(), w.qr.end(), 0.0f);
      std::fill(w.kr.begin(), w.kr.end(), 0.0f);
      for (index_t i = 0; i < n_q; ++i) {
        const index_t g = i / S, t = S - 1 - i % S;
        load_row(q.row(h, i), q.stride_dim, w.qr.data() + g * sd + t * d, d);
      }
      for (index_t j = 0; j < n_k; ++j)
        load_row(k.row(hk, j), k.stride_dim, w.kr.data() + j * d, d);

      // Legal key groups of query group g: those whose first key is <= its last query's position.
      auto last_pos = [&](index_t g) { return std::min(g * S + S, n_q) - 1 + off; };
      auto count = [&](index_t g) { return last_pos(g) / S + 1; };
      // The exact (causal, existing rows only) antidiagonal logit of (g, c); -inf without terms.
      auto exact = [&](index_t g, index_t c) {
        float z = 0.0f;
        bool any = false;
        for (index_t t = 0; t < S; ++t) {
          const index_t i = g * S + S - 1 - t, j = c * S + t;
          if (i >= n_q || j >= n_k || j > i + off) continue;
          const float* a = w.qr.data() + g * sd + t * d;
          const float* b = w.kr.data() + c * sd + t * d;
          float dot = 0.0f;
          for (index_t x = 0; x < d; ++x) dot += a[x] * b[x];
          z += dot;
          any = true;
        }
        return any ? z * zscale : -std::numeric_limits<float>::infinity();
      };
      index_t cur_qb = -1;
      auto flush = [&](index_t qb) {  // block masses of qb -> entry thresholds
        float* e = entry + (h * nqb + qb) * nkb;
        const auto [d0, d1] = diagonal(shape, qb);
        double forced = static_cast<double>(w.mass[0]);
        e[0] = -1.0f;
        for (index_t kb = std::max<index_t>(d0, 1); kb <= d1; ++kb) {
          forced += static_cast<double>(w.mass[static_cast<std::size_t>(kb)]);
          e[kb] = -1.0f;
        }
        w.order.clear();
        double total = forced;
        for (index_t kb = 1; kb < d0; ++kb) {
          w.order.push_back(static_cast<std::int32_t>(kb));
          total += static_cast<double>(w.mass[static_cast<std::size_t>(kb)]);
        }
        std::sort(w.order.begin(), w.order.end(), detail::ScoreOrder{w.mass.data()});
        double taken = forced;
        for (std::int32_t kb : w.order) {
          // No usable estimate (all logits non-finite): every optional block enters at 0.
          const double ek = total > 0.0 && std::isfinite(total) ? taken / total : 0.0;
          e[kb] = static_cast<float>(std::min(1.0, ek));
          taken += static_cast<double>(w.mass[static_cast<std::size_t>(kb)]);
        }
      };
      detail::pooled_scores(
          w.qr.data(), ng_q, w.kr.data(), ng_k, sd, zscale, count, w.tile,
          [&](index_t g, const float* z, index_t n) {
            const index_t qb = g * S / B;
            if (qb != cur_qb) {
              if (cur_qb >= 0) flush(cur_qb);
              cur_qb = qb;
              std::fill(w.mass.begin(), w.mass.end(), 0.0f);
            }
            // Groups whose antidiagonal may reach past the causal edge: the last three.
            const index_t fix_from = std::max<index_t>(0, n - 3);
            double mx = -std::numeric_limits<double>::infinity();
            for (index_t c = 0; c < n; ++c) {
              const float v = c >= fix_from ? exact(g, c) : z[c];
              w.prob[static_cast<std::size_t>(c)] = std::isnan(v)
                                                        ? -std::numeric_limits<double>::infinity()
                                                        : static_cast<double>(v);
              mx = std::max(mx, w.prob[static_cast<std::size_t>(c)]);
            }
            if (!std::isfinite(mx)) return;  // no usable logit: the group adds no mass
            double sum = 0.0;
            for (index_t c = 0; c < n; ++c) {
              double& p = w.prob[static_cast<std::size_t>(c)];
              p = std::exp(p - mx);
              sum += p;
            }
            for (index_t c = 0; c < n; ++c)
              w.mass[static_cast<std::size_t>(c * S / B)] +=
                  static_cast<float>(w.prob[static_cast<std::size_t>(c)] / sum);
          });
      if (cur_qb >= 0) flush(cur_qb);
      for (index_t qb = cur_qb + 1; qb < nqb; ++qb) {  // (never: every block has a group)
        std::fill(w.mass.begin(), w.mass.end(), 0.0f);
        flush(qb);
      }
    });
  }

  /// Pairs of the mask at threshold tau, per the rule kept().
  static BlockListMask<AllowAll> mask_at(const MaskShape& shape, const std::vector<float>& entry,
                                         double tau, const AttentionOptions& opt) {
    const index_t nqb = shape.num_q_blocks(), nkb = shape.num_k_blocks();
    BlockListBuilder builder(shape, false);
    std::vector<index_t> keep;
    for (index_t h = 0; h < shape.heads; ++h)
      for (index_t qb = 0; qb < nqb; ++qb) {
        const float* e = entry.data() + (h * nqb + qb) * nkb;
        keep.clear();
        for (index_t kb = 0; kb < nkb; ++kb)
          if (kept(e[kb], tau)) keep.push_back(kb);
        builder.set_row(h, qb, keep, true);
      }
    return builder.build(AllowAll{}, -1, opt.executor_choice());
  }

  /// tau whose mask's CR is nearest to cr: the distinct masks are those of tau = each distinct
  /// entry threshold (blocks with e < tau) and tau = 1 (all); their pair counts are the forced
  /// pairs plus the sorted thresholds' prefix sums of whole-block pairs (an optional block lies
  /// below the diagonal: all its rows see all its keys).
  static double search_tau(const MaskShape& shape, const std::vector<float>& entry, double cr) {
    const index_t nqb = shape.num_q_blocks(), nkb = shape.num_k_blocks();
    std::vector<std::pair<float, index_t>> opt_blocks;  // (threshold, pairs)
    index_t forced_pairs = 0;
    for (index_t h = 0; h < shape.heads; ++h)
      for (index_t qb = 0; qb < nqb; ++qb) {
        const float* e = entry.data() + (h * nqb + qb) * nkb;
        const index_t p0 = shape.q_begin(qb) + shape.q_offset();
        const index_t p1 = shape.q_end(qb) - 1 + shape.q_offset();
        for (index_t kb = 0; kb < nkb; ++kb) {
          if (!(e[kb] <= 1.0f)) continue;
          const index_t pairs = detail::causal_pairs(p0, p1, shape.k_begin(kb), shape.k_end(kb));
          if (e[kb] < 0.0f)
            forced_pairs += pairs;
          else
            opt_blocks.push_back({e[kb], pairs});
        }
      }
    std::sort(opt_blocks.begin(), opt_blocks.end());
    // Distinct thresholds t_u (u < U) and the pairs of "every block with e < t_u"; u = U: all.
    std::vector<float> t;
    std::vector<index_t> below;  // below[u] = pairs of optional blocks with e < t_u
    index_t acc = 0;
    for (std::size_t i = 0; i < opt_blocks.size(); ++i) {
      if (i == 0 || opt_blocks[i].first != opt_blocks[i - 1].first) {
        t.push_back(opt_blocks[i].first);
        below.push_back(acc);
      }
      acc += opt_blocks[i].second;
    }
    const index_t U = static_cast<index_t>(t.size());
    const index_t u = nearest_budget(0, U, shape.dense_pairs(), cr, [&](index_t x) {
      return forced_pairs + (x < U ? below[static_cast<std::size_t>(x)] : acc);
    });
    if (u == 0) return 0.0;  // no optional block: the same mask as every tau <= t_0
    return u < U ? static_cast<double>(t[static_cast<std::size_t>(u)]) : 1.0;
  }
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
