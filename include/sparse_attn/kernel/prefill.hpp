// Tiled flash-attention prefill over any mask of the common interface (mask/block_mask.hpp).
//
// Work item = (KV head, query block): the G query heads of a GQA group are processed together so a
// K/V block is converted once and reused by every head of the group (when the mask is the same for
// all heads). For each visited key block: S = Q K^T * scale (micro-kernel), masked on partial
// blocks, online softmax (running max m, running sum l, accumulator rescaled by e^{m_old - m_new}),
// O += P V. Items are sorted by their block count and handed out dynamically, so causal and sparse
// rows of unequal work stay balanced. Each item is computed by one thread in a fixed order, so the
// output bits do not depend on the thread count.
//
// Output: out[h, i] = softmax over allowed keys, or 0 for a row with no allowed key.
// LSE (optional): lse[h, i] = log sum_{allowed j} exp(scale * q_i . k_j) (natural log), -inf for an
// empty row.
// Non-finite inputs (docs/ROBUSTNESS.md): a NaN in q_i or in the K row of a key row i may see makes
// row i NaN (and its LSE); a non-finite V element reaches only the rows allowed to see its key.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <numeric>
#include <vector>

#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/mask/block_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

using PrefillOptions = AttentionOptions;

namespace kernel {

// Per-thread scratch for one work item (G heads x one query tile).
struct PrefillScratch {
  index_t ldq = 0;            // padded tile width (multiple of the micro-tile)
  aligned_vector<float> qt;   // [G][d][ldq]   scaled, transposed queries
  aligned_vector<float> ot;   // [G][dv][ldq]  transposed unnormalised output
  aligned_vector<float> m;    // [G][ldq]      running max of logits
  aligned_vector<float> l;    // [G][ldq]      running sum of e^{s - m}
  aligned_vector<float> s;    // [bk][ldq]     logits, then probabilities
  aligned_vector<float> kbuf, vbuf, row;
  std::vector<float> vfix;    // [bk][dv] V block with non-finite elements zeroed (rarely used)
  void reserve(index_t G, index_t d, index_t dv, index_t bq, index_t bk) {
    ldq = (bq + mk::kTileQ - 1) / mk::kTileQ * mk::kTileQ;
    qt.assign(G * d * ldq, 0.0f);
    ot.assign(G * dv * ldq, 0.0f);
    m.assign(G * ldq, 0.0f);
    l.assign(G * ldq, 0.0f);
    s.assign(bk * ldq, 0.0f);
    kbuf.assign(bk * d, 0.0f);
    vbuf.assign(bk * dv, 0.0f);
    row.assign(std::max(d, dv), 0.0f);
  }
};

// P V of a partial block whose V holds a NaN or inf (corrupt data only): a masked pair's 0 * NaN
// must not reach rows that may not see the key. P V runs on a copy with those elements zeroed (the
// same bits for every other row), then they are added to the rows allowed to see them.
template <class Mask>
SPARSE_ATTN_NOINLINE void pv_block_nonfinite(const Mask& mask, index_t mh, index_t q0,
                                             index_t rows, index_t k0, index_t nk, const float* vp,
                                             index_t ldv, index_t dv, PrefillScratch& ws,
                                             float* ot) {
  const index_t ldq = ws.ldq;
  const float* s = ws.s.data();
  ws.vfix.resize(static_cast<std::size_t>(nk * dv));
  for (index_t j = 0; j < nk; ++j)
    for (index_t c = 0; c < dv; ++c) {
      const float x = vp[j * ldv + c];
      ws.vfix[static_cast<std::size_t>(j * dv + c)] = std::isfinite(x) ? x : 0.0f;
    }
  mk::for_each_tile(rows, [&](index_t t, auto vecs) {
    mk::pv_block<decltype(vecs)::value>(s + t, ldq, static_cast<int>(nk), ws.vfix.data(), dv,
                                        static_cast<int>(dv), ot + t, ldq);
  });
  for (index_t j = 0; j < nk; ++j)
    for (index_t c = 0; c < dv; ++c)
      if (!std::isfinite(vp[j * ldv + c]))
        for (index_t i = 0; i < rows; ++i)
          if (mask.allowed(mh, q0 + i, k0 + j))
            ot[c * ldq + i] += s[j * ldq + i] * vp[j * ldv + c];
}

// One key block for one head's query tile: logits, mask, online softmax, P V. v_finite: the
// block's V rows hold no NaN or inf (only needed for partial blocks).
template <class Mask>
inline void prefill_block(const Mask& mask, index_t mh, index_t q0, index_t rows, index_t k0,
                          index_t nk, bool full, const float* kp, index_t ldk, const float* vp,
                          index_t ldv, bool v_finite, index_t d, index_t dv, PrefillScratch& ws,
                          float* qt, float* ot, float* m, float* l) {
  using namespace Eigen::internal;
  using mk::Packet;
  const index_t ldq = ws.ldq;
  const index_t width = (rows + mk::kLanes - 1) / mk::kLanes * mk::kLanes;  // lanes computed
  float* s = ws.s.data();
  mk::for_each_tile(rows, [&](index_t t, auto vecs) {
    mk::qk_block<decltype(vecs)::value>(qt + t, ldq, kp, ldk, static_cast<int>(nk),
                                        static_cast<int>(d), s + t, ldq);
  });
  if (!full) {
    for (index_t j = 0; j < nk; ++j)
      for (index_t i = 0; i < rows; ++i)
        if (!mask.allowed(mh, q0 + i, k0 + j)) s[j * ldq + i] = kNegInf;
  }
  const Packet neg_inf = pset1<Packet>(kNegInf), zero = pset1<Packet>(0.0f);
  for (index_t i = 0; i < width; i += mk::kLanes) {
    const Packet m_old = pload<Packet>(m + i);
    Packet mx = m_old;
    for (index_t j = 0; j < nk; ++j) mx = pmax(mx, pload<Packet>(s + j * ldq + i));
    const Packet m_use = pselect(pcmp_eq(mx, neg_inf), zero, mx);  // all-masked so far: use 0
    const Packet alpha = masked_exp(psub(m_old, m_use));
    Packet sum = zero;
    for (index_t j = 0; j < nk; ++j) {
      // Full blocks hold finite logits <= m: plain e^x (below -88 it is ~1e-38, not 0: harmless
      // beside the row's max term 1). Partial blocks hold -inf, which must give exactly 0.
      const Packet x = psub(pload<Packet>(s + j * ldq + i), m_use);
      const Packet p = full ? pexp(x) : masked_exp(x);
      pstore(s + j * ldq + i, p);
      sum = padd(sum, p);
    }
    pstore(l + i, pmadd(pload<Packet>(l + i), alpha, sum));
    pstore(m + i, mx);
    if (predux_min(alpha) != 1.0f)  // the running max moved for some row of this packet
      for (index_t c = 0; c < dv; ++c) pstore(ot + c * ldq + i, pmul(pload<Packet>(ot + c * ldq + i), alpha));
  }
  if (full || v_finite) {
    mk::for_each_tile(rows, [&](index_t t, auto vecs) {
      mk::pv_block<decltype(vecs)::value>(s + t, ldq, static_cast<int>(nk), vp, ldv,
                                          static_cast<int>(dv), ot + t, ldq);
    });
  } else {
    pv_block_nonfinite(mask, mh, q0, rows, k0, nk, vp, ldv, dv, ws, ot);
  }
}

}  // namespace kernel

/// Attention of q [Hq, n_q, d] against k, v [Hkv, n_k, d|dv] under `mask`, written to
/// out [Hq, n_q, dv]. Q, K, V, out element types: float, bf16 or fp16 (accumulation in fp32).
/// Queries are the last n_q positions of the n_k keys. Throws sparse_attn::invalid_argument on
/// inconsistent shapes, mask geometry or options.
template <class QV, class KV, class VV, class OV, class Mask>
void prefill(const QV& q, const KV& k, const VV& v, const OV& out, const Mask& mask,
             const AttentionOptions& opt = {}) {
  constexpr const char* where = "prefill";
  const index_t G = kernel::validate_qkvo(q, k, v, out, where);
  const MaskShape& ms = mask.shape();
  require(ms.heads == q.heads && ms.n_q == q.tokens && ms.n_k == k.tokens, where,
          ": mask geometry (heads=", ms.heads, ", n_q=", ms.n_q, ", n_k=", ms.n_k,
          ") does not match Q/K (heads=", q.heads, ", n_q=", q.tokens, ", n_k=", k.tokens, ")");
  const float scale = kernel::resolve_scale(opt.scale, q.dim, where);
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: OpenMP default), got ",
          opt.num_threads);  // checked even when there is nothing to compute
  if (q.tokens == 0 || q.heads == 0) return;
  const index_t Hkv = k.heads, d = q.dim, dv = v.dim;
  const index_t nqb = ms.num_q_blocks(), bq = ms.block_q, bk = ms.block_k;
  const bool shared = mask.head_shared();

  // Work items (KV head, query block), heaviest first; ties keep index order (deterministic).
  const index_t n_items = Hkv * nqb;
  std::vector<index_t> cost(static_cast<std::size_t>(n_items), 0);
  for (index_t it = 0; it < n_items; ++it) {
    const index_t hk = it / nqb, qb = it % nqb;
    index_t c = 0;
    for (index_t g = 0; g < (shared ? 1 : G); ++g)
      mask.for_each_block(shared ? 0 : hk * G + g, qb, [&](index_t, bool) { ++c; });
    cost[static_cast<std::size_t>(it)] = shared ? c * G : c;
  }
  std::vector<index_t> order(static_cast<std::size_t>(n_items));
  std::iota(order.begin(), order.end(), index_t{0});
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    return cost[static_cast<std::size_t>(a)] > cost[static_cast<std::size_t>(b)];
  });

  kernel::parallel_region(opt.num_threads, [&] {
    kernel::PrefillScratch ws;  // tiles never exceed the sequence, whatever the block sizes
    ws.reserve(G, d, dv, std::min(bq, q.tokens), std::min(bk, std::max<index_t>(k.tokens, 1)));
    const index_t ldq = ws.ldq;
#pragma omp for schedule(dynamic, 1)
    for (index_t oi = 0; oi < n_items; ++oi) {
      const index_t it = order[static_cast<std::size_t>(oi)];
      const index_t hk = it / nqb, qb = it % nqb;
      const index_t q0 = ms.q_begin(qb), rows = ms.q_end(qb) - q0;
      // Load transposed, scaled queries; reset the softmax state.
      std::fill(ws.qt.begin(), ws.qt.end(), 0.0f);
      std::fill(ws.ot.begin(), ws.ot.end(), 0.0f);
      std::fill(ws.m.begin(), ws.m.end(), kNegInf);
      std::fill(ws.l.begin(), ws.l.end(), 0.0f);
      for (index_t g = 0; g < G; ++g) {
        float* qt = ws.qt.data() + g * d * ldq;
        for (index_t i = 0; i < rows; ++i) {
          load_row(q.row(hk * G + g, q0 + i), q.stride_dim, ws.row.data(), d);
          for (index_t c = 0; c < d; ++c) qt[c * ldq + i] = ws.row[static_cast<std::size_t>(c)] * scale;
        }
      }
      auto run_head = [&](index_t g, index_t mh, index_t kb, bool full, const float* kp,
                          index_t ldk, const float* vp, index_t ldv, bool v_finite) {
        kernel::prefill_block(mask, mh, q0, rows, ms.k_begin(kb), ms.k_end(kb) - ms.k_begin(kb),
                              full, kp, ldk, vp, ldv, v_finite, d, dv, ws,
                              ws.qt.data() + g * d * ldq, ws.ot.data() + g * dv * ldq,
                              ws.m.data() + g * ldq, ws.l.data() + g * ldq);
      };
      // Converts (or points at) the block's K/V rows; partial blocks also check V is finite.
      auto load_kv = [&](index_t kb, bool full, const float*& kp, index_t& ldk, const float*& vp,
                         index_t& ldv) {
        const index_t k0 = ms.k_begin(kb), nk = ms.k_end(kb) - k0;
        kp = kernel::fp32_rows(k, hk, k0, nk, ws.kbuf.data(), ldk);
        vp = kernel::fp32_rows(v, hk, k0, nk, ws.vbuf.data(), ldv);
        return full || kernel::all_finite(vp, nk, dv, ldv);
      };
      if (shared) {  // one K/V conversion per block, reused by the G heads of the group
        mask.for_each_block(0, qb, [&](index_t kb, bool full) {
          const float *kp, *vp;
          index_t ldk, ldv;
          const bool v_finite = load_kv(kb, full, kp, ldk, vp, ldv);
          for (index_t g = 0; g < G; ++g) run_head(g, 0, kb, full, kp, ldk, vp, ldv, v_finite);
        });
      } else {
        for (index_t g = 0; g < G; ++g)
          mask.for_each_block(hk * G + g, qb, [&](index_t kb, bool full) {
            const float *kp, *vp;
            index_t ldk, ldv;
            const bool v_finite = load_kv(kb, full, kp, ldk, vp, ldv);
            run_head(g, hk * G + g, kb, full, kp, ldk, vp, ldv, v_finite);
          });
      }
      // Normalise and store.
      for (index_t g = 0; g < G; ++g) {
        const index_t h = hk * G + g;
        const float* ot = ws.ot.data() + g * dv * ldq;
        const float* m = ws.m.data() + g * ldq;
        const float* l = ws.l.data() + g * ldq;
        for (index_t i = 0; i < rows; ++i) {  // l = 0: empty row; l = NaN: poisoned row
          const float inv = l[i] != 0.0f ? 1.0f / l[i] : 0.0f;
          for (index_t c = 0; c < dv; ++c) ws.row[static_cast<std::size_t>(c)] = ot[c * ldq + i] * inv;
          store_row(ws.row.data(), out.row(h, q0 + i), out.stride_dim, dv);
          if (opt.lse) opt.lse(h, q0 + i) = l[i] != 0.0f ? m[i] + std::log(l[i]) : kNegInf;
        }
      }
    }
  });
}

SPARSE_ATTN_NAMESPACE_END
