// Pieces shared by the data-dependent prefill selections (block_sparse, vertical_slash,
// flex_prefill): argument checks, deterministic top-k (the one ranking order of ranking.hpp),
// cumulative-mass budgets, block mean-pooling, pooled block scores and the attention estimate from
// the last queries. (Budgets, the CR search and reachability are methods/budget.hpp; the softmax
// scale is kernel::resolve_scale.) Everything here is O(n) or O(n / block) memory per
// head.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/arch/dispatch.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/methods/detail/ranking.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods::detail {

using kernel::aligned_vector;
inline constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

/// Validates the Q/K pair a selection reads; returns the GQA group size G = Hq / Hkv.
template <class QV, class KV>
index_t validate_qk(const QV& q, const KV& k, const char* where) {
  validate_view(q, "q");
  validate_view(k, "k");
  require(q.heads >= 1 && k.heads >= 1, where, "q and k need >= 1 head, got q ", q.heads, ", k ",
          k.heads);
  require(q.dim == k.dim && q.dim >= 1, where, "head_dim of q (", q.dim, ") and k (", k.dim,
          ") must be equal and >= 1");
  require(q.heads % k.heads == 0, where, "Hq=", q.heads, " is not a multiple of Hkv=", k.heads,
          " (GQA needs Hq % Hkv == 0)");
  require(q.tokens <= k.tokens, where, "n_q=", q.tokens, " > n_k=", k.tokens,
          "; queries must be a suffix of the keys (n_q <= n_k)");
  return q.heads / k.heads;
}

/// The prefill statistics of a selected mask: pairs and dense pairs from the mask, the target,
/// reachability by the one rule (is_reachable; `honoured` for count and mass budgets) and the
/// resolved budget in the method's terms. No queries (dense_pairs = 0): nothing to compute, so
/// every target is met.
template <class Mask>
void finish_prefill(SelectionStats& s, const Mask& m, const Budget& target, bool honoured,
                    std::string detail) {
  s.pairs = m.pairs();
  s.dense_pairs = m.shape().dense_pairs();
  s.target = target;
  s.detail = std::move(detail);
  finish_stats(s, honoured);
  if (s.dense_pairs == 0) s.reachable = honoured;
}

// ---------------------------------------------------------------------------------------------
// Ranking
// ---------------------------------------------------------------------------------------------

/// order = every index of [0, n) by ScoreOrder (best first). Prefixes of it are nested top-k sets.
inline void order_by_score(const float* score, index_t n, std::vector<std::int32_t>& order) {
  order.resize(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), ScoreOrder{score});
}

/// Keeps the k best of `cand` by ScoreOrder, then sorts them by index (ascending).
inline void keep_top_k(const float* score, std::vector<std::int32_t>& cand, index_t k) {
  const auto kk = static_cast<std::size_t>(std::max<index_t>(0, k));
  if (kk < cand.size()) {
    std::nth_element(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(kk), cand.end(),
                     ScoreOrder{score});
    cand.resize(kk);
  }
  std::sort(cand.begin(), cand.end());
}

/// Smallest m such that the m best entries of `order` carry mass >= gamma (all of them if never).
inline index_t cover_count(const float* mass, const std::vector<std::int32_t>& order,
                           double gamma) {
  double acc = 0.0;
  for (std::size_t m = 0; m < order.size(); ++m) {
    acc += static_cast<double>(mass[order[m]]);
    if (acc >= gamma) return static_cast<index_t>(m + 1);
  }
  return static_cast<index_t>(order.size());
}

// ---------------------------------------------------------------------------------------------
// Pair counts
// ---------------------------------------------------------------------------------------------

/// Causal pairs of a rectangle: #{(p, j) : p in [p0, p1], j in [k0, k1), j <= p}.
inline index_t causal_pairs(index_t p0, index_t p1, index_t k0, index_t k1) {
  if (p1 < p0 || k1 <= k0) return 0;
  const index_t width = k1 - k0;
  index_t total = 0;
  const index_t full_from = std::max(p0, k1 - 1);  // rows that see the whole key range
  if (full_from <= p1) total += (p1 - full_from + 1) * width;
  const index_t a = std::max(p0, k0), b = std::min(p1, k1 - 2);  // rows that see p + 1 - k0 keys
  if (a <= b) total += ((a + 1 - k0) + (b + 1 - k0)) * (b - a + 1) / 2;
  return total;
}

// ---------------------------------------------------------------------------------------------
// Pooling and pooled scores
// ---------------------------------------------------------------------------------------------

/// out[b * d + c] = mean over the real rows t of block b (t < tokens) of view(h, t, c), fp32;
/// the last partial block averages only its real rows. out: [ceil(tokens / block)][d].
template <class T>
void mean_pool(const TensorView<T>& v, index_t h, index_t block, float* out,
               std::vector<float>& row) {
  const index_t d = v.dim, nb = (v.tokens + block - 1) / block;
  row.resize(static_cast<std::size_t>(d));
  for (index_t b = 0; b < nb; ++b) {
    float* o = out + b * d;
    std::fill(o, o + d, 0.0f);
    const index_t t0 = b * block, t1 = std::min(v.tokens, t0 + block);
    for (index_t t = t0; t < t1; ++t) {
      load_row(v.row(h, t), v.stride_dim, row.data(), d);
      for (index_t c = 0; c < d; ++c) o[c] += row[static_cast<std::size_t>(c)];
    }
    const float inv = 1.0f / static_cast<float>(t1 - t0);
    for (index_t c = 0; c < d; ++c) o[c] *= inv;
  }
}

/// Scratch of pooled_scores: O(nk * 64) floats.
struct PooledScratch {
  aligned_vector<float> qt, s;
  std::vector<float> col;
};

/// For every row r of pq ([nq][d]): scores[j] = scale * pq[r] . pk[j] for j < count(r) (pk:
/// [nk][d]), handed to f(r, scores). Rows are processed 64 at a time by the CPU target's
/// prefill micro-kernel (queries in the lanes).
template <class Count, class F>
void pooled_scores(const float* pq, index_t nq, const float* pk, index_t nk, index_t d, float scale,
                   Count&& count, PooledScratch& ws, F&& f) {
  const index_t ldq = arch::kMaxTileQ;
  const CpuTarget target = cpu_target();
  ws.qt.resize(static_cast<std::size_t>(d * ldq));
  ws.s.resize(static_cast<std::size_t>(std::max<index_t>(nk, 1) * ldq));
  ws.col.resize(static_cast<std::size_t>(std::max<index_t>(nk, 1)));
  for (index_t r0 = 0; r0 < nq; r0 += ldq) {
    const index_t rows = std::min(ldq, nq - r0);
    index_t width = 0;
    for (index_t i = 0; i < rows; ++i) width = std::max(width, std::min(nk, count(r0 + i)));
    if (width > 0) {
      std::fill(ws.qt.begin(), ws.qt.end(), 0.0f);
      for (index_t i = 0; i < rows; ++i)
        for (index_t c = 0; c < d; ++c)
          ws.qt[static_cast<std::size_t>(c * ldq + i)] = pq[(r0 + i) * d + c] * scale;
      arch::dispatch(target, [&](auto a) {
        decltype(a)::qk_block(rows, ws.qt.data(), ldq, pk, d, width, d, ws.s.data(), ldq);
      });
    }
    for (index_t i = 0; i < rows; ++i) {
      const index_t n = std::min(nk, count(r0 + i));
      for (index_t j = 0; j < n; ++j)
        ws.col[static_cast<std::size_t>(j)] = ws.s[static_cast<std::size_t>(j * ldq + i)];
      f(r0 + i, static_cast<const float*>(ws.col.data()), n);
    }
  }
}

/// In-place fp32 softmax of x[0, n).
inline void softmax(float* x, index_t n) {
  if (n <= 0) return;
  const float mx = *std::max_element(x, x + n);
  double sum = 0.0;
  for (index_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - mx);
    sum += static_cast<double>(x[j]);
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (index_t j = 0; j < n; ++j) x[j] *= inv;
}

/// sqrt of the Jensen-Shannon divergence (natural log) of two distributions; 0 log 0 = 0.
inline double sqrt_js_divergence(const float* p, const float* q, index_t n) {
  double js = 0.0;
  for (index_t j = 0; j < n; ++j) {
    const double a = p[j], b = q[j], m = 0.5 * (a + b);
    if (a > 0.0) js += 0.5 * a * std::log(a / m);
    if (b > 0.0) js += 0.5 * b * std::log(b / m);
  }
  return std::sqrt(std::max(0.0, js));
}

// ---------------------------------------------------------------------------------------------
// Attention estimate from the last queries (Vertical-Slash, FlexPrefill)
// ---------------------------------------------------------------------------------------------

/// Scratch of last_queries_mass: the logits of w queries against every key, n_k x roundup(w, 64)
/// floats (256 bytes per key at w = 64), plus O(w * d) and a key chunk.
struct EstimateScratch {
  aligned_vector<float> qt, s, m, inv_l, kbuf;
  std::vector<float> row;
};

/// The last w queries of query head h against every key of KV head hk: P = row softmax of
/// scale * q k^T in fp32, causal (the query at position p sees keys j <= p). Writes
/// vertical[j] = sum_i P[i][j] and slash[delta] = sum_i P[i][p_i - delta], both of length n_k.
template <class QV, class KV>
void last_queries_mass(const QV& q, const KV& k, index_t h, index_t hk, index_t w, float scale,
                       EstimateScratch& ws, float* vertical, float* slash) {
  constexpr index_t kTileQ = arch::kMaxTileQ;
  const index_t n_k = k.tokens, d = q.dim;
  std::fill(vertical, vertical + n_k, 0.0f);
  std::fill(slash, slash + n_k, 0.0f);
  if (w <= 0 || n_k == 0) return;
  const index_t ldq = (w + kTileQ - 1) / kTileQ * kTileQ;
  const index_t p_first = n_k - w;  // absolute position of the first estimated query
  constexpr index_t kChunk = 240;   // keys converted per step (a multiple of the 6-row tile)
  const CpuTarget target = cpu_target();
  ws.qt.assign(static_cast<std::size_t>(d * ldq), 0.0f);
  ws.s.resize(static_cast<std::size_t>(n_k * ldq));
  ws.m.assign(static_cast<std::size_t>(ldq), -kInf);
  ws.inv_l.assign(static_cast<std::size_t>(ldq), 0.0f);
  ws.kbuf.resize(static_cast<std::size_t>(kChunk * d));
  ws.row.resize(static_cast<std::size_t>(d));
  for (index_t i = 0; i < w; ++i) {
    load_row(q.row(h, q.tokens - w + i), q.stride_dim, ws.row.data(), d);
    for (index_t c = 0; c < d; ++c)
      ws.qt[static_cast<std::size_t>(c * ldq + i)] = ws.row[static_cast<std::size_t>(c)] * scale;
  }
  float* s = ws.s.data();
  for (index_t j0 = 0; j0 < n_k; j0 += kChunk) {
    const index_t nk = std::min(kChunk, n_k - j0);
    index_t ldk = 0;
    const float* kp = kernel::fp32_rows(k, hk, j0, nk, ws.kbuf.data(), ldk);
    arch::dispatch(target, [&](auto a) {
      decltype(a)::qk_block(ldq, ws.qt.data(), ldq, kp, ldk, nk, d, s + j0 * ldq, ldq);
    });
  }
  // Causal corner: key j is in the future of queries i with p_first + i < j.
  for (index_t j = p_first + 1; j < n_k; ++j)
    for (index_t i = 0; i < j - p_first; ++i) s[j * ldq + i] = -kInf;
  // Column softmax over keys: padded query lanes get m = +inf so they contribute e^{-inf} = 0.
  float* m = ws.m.data();
  float* inv_l = ws.inv_l.data();
  arch::dispatch(target, [&](auto a) { decltype(a)::max_columns(s, ldq, n_k, ldq, m); });
  for (index_t i = w; i < ldq; ++i) m[i] = kInf;
  arch::dispatch(target, [&](auto a) { decltype(a)::exp_columns(s, ldq, n_k, ldq, m, inv_l); });
  for (index_t i = 0; i < ldq; ++i) inv_l[i] = inv_l[i] > 0.0f ? 1.0f / inv_l[i] : 0.0f;
  arch::dispatch(target, [&](auto a) { decltype(a)::scale_columns(s, ldq, n_k, ldq, inv_l, vertical); });
  for (index_t j = 0; j < n_k; ++j) {
    const float* sj = s + j * ldq;
    // Query i sits at p_first + i, so it meets key j on offset p_first + i - j (>= 0 only).
    for (index_t i = std::max<index_t>(0, j - p_first); i < w; ++i) slash[p_first + i - j] += sj[i];
  }
}

}  // namespace methods::detail
SPARSE_ATTN_NAMESPACE_END
