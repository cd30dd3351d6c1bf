/// @file
/// Naive double-precision attention oracle on a materialised mask: the ground truth for tests and
/// debugging. O(n_q * n_k * d) time, no tiling, no online softmax. Not included by
/// sparse_attn.hpp. The functions validate nothing: the views must be consistent (Hq a multiple
/// of Hkv >= 1, equal d of Q and K, equal heads and tokens of K and V).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <limits>
#include <vector>

#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/mask/block_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
/// The double-precision attention oracle (tests, debugging).
namespace reference {

/// Output and LSE of the oracle, contiguous in double.
struct Result {
  index_t heads = 0,  ///< Query heads (Hq).
      n_q = 0,        ///< Queries per head.
      dv = 0;         ///< Channels per output row.
  std::vector<double> out;  ///< [heads][n_q][dv]; 0 for a row with no allowed key.
  std::vector<double> lse;  ///< [heads][n_q], natural log, -inf for empty rows.
  /// @param h head.
  /// @param i query.
  /// @param c channel.
  /// @return out[h][i][c] (unchecked).
  double operator()(index_t h, index_t i, index_t c) const { return out[static_cast<std::size_t>((h * n_q + i) * dv + c)]; }
  /// @param h head.
  /// @param i query.
  /// @return lse[h][i] (unchecked).
  double lse_at(index_t h, index_t i) const { return lse[static_cast<std::size_t>(h * n_q + i)]; }
};

/// softmax(scale * q k^T restricted to allowed(h, i, j)) v in double, GQA head h -> h / (Hq/Hkv).
/// Rows run on `exec`; an exception of `allowed` reaches the caller.
/// @param q [Hq, n_q, d] view, any element type.
/// @param k [Hkv, n_k, d] view (TensorView or kv::PagedView).
/// @param v [Hkv, n_k, dv] view.
/// @param scale softmax scale multiplying q . k (no default: pass 1 / sqrt(d) for the usual).
/// @param allowed called as allowed(h, i, j) -> bool for every (head, query, key); from several
///        threads at once.
/// @param exec executor for the rows.
/// @return the result (allocates Hq x n_q x (dv + 1) doubles and one n_k row per worker).
/// @throws what `allowed` throws; sparse_attn::invalid_argument for executor faults or
///         exec.num_threads < 0; std::bad_alloc.
/// O(Hq x n_q x n_k x (d + dv)).
template <class QV, class KV, class VV, class Allowed>
Result attention(const QV& q, const KV& k, const VV& v, double scale, Allowed&& allowed,
                 const ExecutorChoice& exec = {}) {
  Result r;
  r.heads = q.heads;
  r.n_q = q.tokens;
  r.dv = v.dim;
  r.out.assign(static_cast<std::size_t>(q.heads * q.tokens * v.dim), 0.0);
  r.lse.assign(static_cast<std::size_t>(q.heads * q.tokens), -std::numeric_limits<double>::infinity());
  const index_t G = q.heads / k.heads;
  sparse_attn::detail::with_executor(exec, [&](Executor& ex) {
    // One row of logits per worker.
    std::vector<std::vector<double>> logits(
        static_cast<std::size_t>(std::max(ex.concurrency(), 0)),
        std::vector<double>(static_cast<std::size_t>(k.tokens)));
    run_items(ex, q.heads * q.tokens, [&](index_t hi, int worker) {
      const index_t h = hi / q.tokens, i = hi % q.tokens, hk = h / G;
      std::vector<double>& s = logits[static_cast<std::size_t>(worker)];
      double mx = -std::numeric_limits<double>::infinity();
      for (index_t j = 0; j < k.tokens; ++j) {
        if (!allowed(h, i, j)) {
          s[static_cast<std::size_t>(j)] = -std::numeric_limits<double>::infinity();
          continue;
        }
        double acc = 0;
        for (index_t c = 0; c < q.dim; ++c)
          acc += static_cast<double>(to_float(q(h, i, c))) * static_cast<double>(to_float(k(hk, j, c)));
        s[static_cast<std::size_t>(j)] = acc * scale;
        mx = std::max(mx, acc * scale);
      }
      if (mx == -std::numeric_limits<double>::infinity()) return;
      double sum = 0;
      double* o = &r.out[static_cast<std::size_t>((h * q.tokens + i) * v.dim)];
      for (index_t j = 0; j < k.tokens; ++j) {
        if (s[static_cast<std::size_t>(j)] == -std::numeric_limits<double>::infinity()) continue;
        const double p = std::exp(s[static_cast<std::size_t>(j)] - mx);
        sum += p;
        for (index_t c = 0; c < v.dim; ++c) o[c] += p * static_cast<double>(to_float(v(hk, j, c)));
      }
      for (index_t c = 0; c < v.dim; ++c) o[c] /= sum;
      r.lse[static_cast<std::size_t>(h * q.tokens + i)] = mx + std::log(sum);
    });
  });
  return r;
}

/// Oracle on any mask of the common interface, via its dense export.
/// @param q [Hq, n_q, d] view.
/// @param k [Hkv, n_k, d] view.
/// @param v [Hkv, n_k, dv] view.
/// @param scale softmax scale.
/// @param mask the mask, geometry [Hq, n_q, n_k].
/// @param exec executor for the rows.
/// @return the result.
/// @throws as to_dense() and attention(); std::bad_alloc (one n_q x n_k bool matrix per mask head).
template <class QV, class KV, class VV, class Mask>
Result attention_masked(const QV& q, const KV& k, const VV& v, double scale, const Mask& mask,
                        const ExecutorChoice& exec = {}) {
  std::vector<Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>> dense;
  const index_t nh = mask.head_shared() ? 1 : q.heads;
  for (index_t h = 0; h < nh; ++h) dense.push_back(to_dense(mask, h));
  return attention(
      q, k, v, scale,
      [&](index_t h, index_t i, index_t j) {
        return dense[static_cast<std::size_t>(mask.head_shared() ? 0 : h)](i, j);
      },
      exec);
}

/// Per-key attention mass in double (AttentionOptions::key_mass): mass[hk * n_k + j] = sum over
/// the query heads h of group hk and the rows i >= row_begin of softmax_j(scale q_i . k_j over
/// the keys with allowed(h, i, j)); 0 for keys no such row may see. Serial.
/// @param q [Hq, n_q, d] view.
/// @param k [Hkv, n_k, d] view.
/// @param scale softmax scale.
/// @param allowed called as allowed(h, i, j) -> bool.
/// @param row_begin first query row counted, in [0, n_q].
/// @return [Hkv][n_k] masses.
/// @throws what `allowed` throws; std::bad_alloc. O(Hq x (n_q - row_begin) x n_k x d).
template <class QV, class KV, class Allowed>
std::vector<double> key_mass(const QV& q, const KV& k, double scale, Allowed&& allowed,
                             index_t row_begin) {
  std::vector<double> mass(static_cast<std::size_t>(k.heads * k.tokens), 0.0);
  std::vector<double> s(static_cast<std::size_t>(k.tokens));
  const index_t G = q.heads / k.heads;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  for (index_t h = 0; h < q.heads; ++h)
    for (index_t i = row_begin; i < q.tokens; ++i) {
      const index_t hk = h / G;
      double mx = -kInf;
      for (index_t j = 0; j < k.tokens; ++j) {
        double& x = s[static_cast<std::size_t>(j)];
        x = -kInf;
        if (!allowed(h, i, j)) continue;
        double acc = 0;
        for (index_t c = 0; c < q.dim; ++c)
          acc += static_cast<double>(to_float(q(h, i, c))) * static_cast<double>(to_float(k(hk, j, c)));
        x = acc * scale;
        mx = std::max(mx, x);
      }
      if (mx == -kInf) continue;
      double sum = 0;
      for (index_t j = 0; j < k.tokens; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
      for (index_t j = 0; j < k.tokens; ++j)
        mass[static_cast<std::size_t>(hk * k.tokens + j)] += std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
    }
  return mass;
}

/// key_mass() on any mask of the common interface, via its dense export.
/// @param q [Hq, n_q, d] view.
/// @param k [Hkv, n_k, d] view.
/// @param scale softmax scale.
/// @param mask the mask, geometry [Hq, n_q, n_k].
/// @param row_begin first query row counted, in [0, n_q].
/// @return [Hkv][n_k] masses.
/// @throws as to_dense() and key_mass().
template <class QV, class KV, class Mask>
std::vector<double> key_mass_masked(const QV& q, const KV& k, double scale, const Mask& mask,
                                    index_t row_begin) {
  std::vector<Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>> dense;
  const index_t nh = mask.head_shared() ? 1 : q.heads;
  for (index_t h = 0; h < nh; ++h) dense.push_back(to_dense(mask, h));
  return key_mass(
      q, k, scale,
      [&](index_t h, index_t i, index_t j) {
        return dense[static_cast<std::size_t>(mask.head_shared() ? 0 : h)](i, j);
      },
      row_begin);
}

}  // namespace reference
SPARSE_ATTN_NAMESPACE_END
