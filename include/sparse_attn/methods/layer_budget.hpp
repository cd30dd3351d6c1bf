/// @file
/// Per-layer budgets: one total compression target split across a model's layers
/// (docs/METHODS.md, section "Per-layer budgets").
///
/// A model of L layers, layer l with D_l dense units (prefill: causal (query, key) pairs; decode:
/// (row, key) pairs read; eviction: cached tokens), and a total target CR c: the layers together
/// keep K = sum_l D_l / c units. A schedule gives each layer a weight w_l > 0 and the layers keep
///
///     k_l = K w_l D_l / sum_j w_j D_j,      so its target CR is c_l = D_l / k_l,
///
/// with k_l <= D_l (c_l >= 1): a layer whose share would exceed its dense units is clamped to
/// dense and the rest is re-split among the others (water filling), so sum_l k_l = K whenever
/// K <= sum_l D_l. Equal weights are the uniform schedule (every c_l = c). Schedules:
///
///   uniform          w_l = 1.
///   pyramid(r)       PyramidKV's shape: w_l falls linearly from r (layer 0) to 1 (layer L - 1),
///                    r >= 1: lower layers, whose attention is broad, keep more; upper layers,
///                    whose attention concentrates on few tokens, keep less.
///   mass-driven(r)   w_l from the layer's measured need n_l: the share of its keys a query
///                    needs to hold a given attention mass (mass_need()), so a layer keeps in
///                    proportion to how spread its attention is; mass_weights() bounds the
///                    spread of the weights to r, as the pyramid's (raw needs span orders of
///                    magnitude between a sink-dominated layer and a near-uniform one, and a
///                    layer's output error does not fall with its need in proportion: the
///                    mass a query leaves out still moves its output).
///
/// Everything here is a pure function of its arguments: no state, safe from any thread.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/methods/detail/selection.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// Per-layer target CRs for a total target CR (see the file comment for the split).
/// @param total_cr     the total target CR c over all layers, finite and >= 1.
/// @param dense_units  D_l per layer (>= 0 each; at least one layer, not all 0).
/// @param weights      w_l per layer, finite and > 0, same length as dense_units.
/// @return c_l per layer, each >= 1 (+inf for a layer with D_l = 0); sum_l D_l / c_l equals
///         sum_l D_l / total_cr up to rounding.
/// @throws sparse_attn::invalid_argument if total_cr is not finite or < 1, the lengths differ or
///         are 0, a D_l is negative or all are 0, or a weight is not finite and > 0.
/// O(L^2) at worst (each water-filling round clamps one layer or ends), no allocation besides
/// the result and one flag per layer.
inline std::vector<double> layer_compressions(double total_cr, const std::vector<double>& dense_units,
                                              const std::vector<double>& weights) {
  constexpr const char* where = "methods::layer_compressions";
  require(std::isfinite(total_cr) && total_cr >= 1.0, where,
          ": the total target CR must be finite and >= 1, got ", total_cr);
  require(!dense_units.empty() && dense_units.size() == weights.size(), where,
          ": needs one weight per layer and at least one layer, got ", dense_units.size(),
          " layers and ", weights.size(), " weights");
  double total = 0.0;
  for (std::size_t l = 0; l < dense_units.size(); ++l) {
    require(std::isfinite(dense_units[l]) && dense_units[l] >= 0.0, where, ": layer ", l,
            " has dense units ", dense_units[l], " (must be finite and >= 0)");
    require(std::isfinite(weights[l]) && weights[l] > 0.0, where, ": layer ", l, " has weight ",
            weights[l], " (must be finite and > 0)");
    total += dense_units[l];
  }
  require(total > 0.0, where, ": every layer has 0 dense units");
  const std::size_t L = dense_units.size();
  std::vector<double> kept(L, 0.0);
  std::vector<char> dense(L, 0);  // clamped to its dense units
  double budget = total / total_cr;
  for (;;) {
    double weighted = 0.0;
    for (std::size_t l = 0; l < L; ++l)
      if (!dense[l]) weighted += weights[l] * dense_units[l];
    bool clamped = false;
    for (std::size_t l = 0; l < L; ++l) {
      if (dense[l]) continue;
      kept[l] = weighted > 0.0 ? budget * weights[l] * dense_units[l] / weighted : 0.0;
      if (kept[l] > dense_units[l] * (1.0 + 1e-12)) {  // over dense: clamp it, re-split the rest
        dense[l] = 1;
        kept[l] = dense_units[l];
        budget -= dense_units[l];
        clamped = true;
        break;
      }
    }
    if (!clamped) break;
  }
  std::vector<double> cr(L);
  for (std::size_t l = 0; l < L; ++l)
    cr[l] = dense_units[l] == 0.0 ? INFINITY
            : dense[l]           ? 1.0
                                 : std::max(1.0, dense_units[l] / kept[l]);
  return cr;
}

/// PyramidKV's weights: linear from r at layer 0 to 1 at layer L - 1 (one layer: 1).
/// @param layers  L, >= 1.
/// @param ratio   r, finite and >= 1 (1: uniform).
/// @return the L weights. O(L).
/// @throws sparse_attn::invalid_argument if layers < 1 or ratio is not finite and >= 1.
inline std::vector<double> pyramid_weights(index_t layers, double ratio) {
  require(layers >= 1, "methods::pyramid_weights", ": needs >= 1 layer, got ", layers);
  require(std::isfinite(ratio) && ratio >= 1.0, "methods::pyramid_weights",
          ": the ratio of the first layer's weight to the last's must be finite and >= 1, got ",
          ratio);
  std::vector<double> w(static_cast<std::size_t>(layers), 1.0);
  for (index_t l = 0; l < layers && layers > 1; ++l)
    w[static_cast<std::size_t>(l)] =
        ratio + (1.0 - ratio) * static_cast<double>(l) / static_cast<double>(layers - 1);
  return w;
}

/// The mass-driven schedule's weights from the layers' needs (mass_need()):
///
///     w_l = clamp(n_l / g, 1 / sqrt(r), sqrt(r)),   g = (prod_l n_l)^(1/L),
///
/// the needs relative to their geometric mean, bounded so that the largest weight is at most r
/// times the smallest (r = 1: uniform). Order-preserving: n_a <= n_b gives w_a <= w_b.
/// @param needs   n_l per layer, each finite and > 0 (at least one layer).
/// @param spread  r, finite and >= 1.
/// @return the L weights, each in [1 / sqrt(r), sqrt(r)]. O(L).
/// @throws sparse_attn::invalid_argument if needs is empty, a need is not finite and > 0, or
///         spread is not finite and >= 1.
inline std::vector<double> mass_weights(const std::vector<double>& needs, double spread) {
  constexpr const char* where = "methods::mass_weights";
  require(!needs.empty(), where, ": needs at least one layer");
  require(std::isfinite(spread) && spread >= 1.0, where,
          ": the spread of the weights must be finite and >= 1, got ", spread);
  double log_mean = 0.0;
  for (std::size_t l = 0; l < needs.size(); ++l) {
    require(std::isfinite(needs[l]) && needs[l] > 0.0, where, ": layer ", l, " has need ",
            needs[l], " (must be finite and > 0)");
    log_mean += std::log(needs[l]) / static_cast<double>(needs.size());
  }
  const double bound = std::sqrt(spread);
  std::vector<double> w(needs.size());
  for (std::size_t l = 0; l < needs.size(); ++l)
    w[l] = std::clamp(std::exp(std::log(needs[l]) - log_mean), 1.0 / bound, bound);
  return w;
}

/// A layer's attention spread, the weight of the mass-driven schedule: over the last
/// w = min(last_queries, n_q) queries of every query head, the fewest keys whose softmax
/// probabilities (fp32, scale, causal) sum to at least p, as a share of the keys the query sees;
/// the median over (head, query). Small for a layer whose queries look at few keys.
/// @param q             queries [Hq, n_q, d] (the last n_q of the n_k positions; any strides;
///                      float, bf16 or fp16).
/// @param k             keys [Hkv, n_k, d], Hq % Hkv == 0, n_q <= n_k, n_q >= 1.
/// @param p             attention mass, in (0, 1].
/// @param scale         softmax scale, finite > 0 (NaN: 1 / sqrt(d)).
/// @param last_queries  w, >= 1.
/// @return the median share, in (0, 1].
/// @throws sparse_attn::invalid_argument if the views are invalid or inconsistent, n_q = 0, p is
///         not in (0, 1], last_queries < 1 or scale is neither NaN nor finite > 0.
/// Complexity O(Hq w n_k d) for the logits plus O(Hq w n_k log n_k) for the sorts; allocates
/// the estimate's scratch (n_k x roundup(w, 64) floats) and one row.
template <class QT, class KT>
double mass_need(const TensorView<QT>& q, const TensorView<KT>& k, double p,
                 float scale = std::numeric_limits<float>::quiet_NaN(),
                 index_t last_queries = 64) {
  constexpr const char* where = "methods::mass_need";
  const index_t G = detail::validate_qk(q, k, where);
  require(q.tokens >= 1, where, ": needs >= 1 query");
  require(p > 0.0 && p <= 1.0, where, ": p must be in (0, 1], got ", p);
  require(last_queries >= 1, where, ": last_queries must be >= 1, got ", last_queries);
  const float s = kernel::resolve_scale(scale, q.dim, where);
  const index_t n_k = k.tokens, w = std::min(last_queries, q.tokens);
  const index_t ldq = (w + arch::kMaxTileQ - 1) / arch::kMaxTileQ * arch::kMaxTileQ;
  detail::EstimateScratch ws;
  std::vector<float> vertical(static_cast<std::size_t>(n_k)), slash(vertical.size()), row;
  std::vector<double> shares;
  shares.reserve(static_cast<std::size_t>(q.heads * w));
  for (index_t h = 0; h < q.heads; ++h) {
    // Leaves the probabilities in ws.s, key-major: P[i][j] = s[j * ldq + i].
    detail::last_queries_mass(q, k, h, h / G, w, s, ws, vertical.data(), slash.data());
    for (index_t i = 0; i < w; ++i) {
      const index_t seen = n_k - w + i + 1;  // keys 0 .. position
      row.resize(static_cast<std::size_t>(seen));
      for (index_t j = 0; j < seen; ++j)
        row[static_cast<std::size_t>(j)] = ws.s[static_cast<std::size_t>(j * ldq + i)];
      std::sort(row.begin(), row.end(), [](float a, float b) { return a > b; });
      double have = 0.0, total = 0.0;
      for (float x : row) total += static_cast<double>(x);
      index_t taken = 0;
      while (taken < seen && have < p * total * (1.0 - 1e-9))
        have += static_cast<double>(row[static_cast<std::size_t>(taken++)]);
      shares.push_back(static_cast<double>(std::max<index_t>(taken, 1)) /
                       static_cast<double>(seen));
    }
  }
  const auto mid = shares.begin() + static_cast<std::ptrdiff_t>(shares.size() / 2);
  std::nth_element(shares.begin(), mid, shares.end());
  return *mid;
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
