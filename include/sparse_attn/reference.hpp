/// @file
/// Naive double-precision attention oracle on a materialised mask: the ground truth for tests and
/// debugging. O(n_q * n_k * d) time, no tiling, no online softmax.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <limits>
#include <vector>

#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/mask/block_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace reference {

struct Result {
  index_t heads = 0, n_q = 0, dv = 0;
  std::vector<double> out;  ///< [heads][n_q][dv]
  std::vector<double> lse;  ///< [heads][n_q], natural log, -inf for empty rows
  double operator()(index_t h, index_t i, index_t c) const { return out[static_cast<std::size_t>((h * n_q + i) * dv + c)]; }
  double lse_at(index_t h, index_t i) const { return lse[static_cast<std::size_t>(h * n_q + i)]; }
};

/// softmax(scale * q k^T restricted to allowed(h, i, j)) v in double, GQA head h -> h / (Hq/Hkv).
/// Rows run on `exec`; an exception of `allowed` reaches the caller.
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
