// Split-KV flash decoding: a few new query tokens against a long KV cache, over any key subset.
//
// Rows sharing a key list are packed: with a per-KV-head (or dense) selection the G query heads of
// a group x the n_q new tokens form one row group, so every K/V byte is read once per group. The
// group's key list is cut into chunks of `split` keys (independent of the thread count, so results
// are bit-identical for any number of threads); each (group, chunk) item computes a partial
// online-softmax state (o, m, l) and the partials are merged exactly, in chunk order.
//
// Causality: new token t sits at position n_k - n_q + t and sees keys j <= that position.
#pragma once
#include <algorithm>
#include <vector>

#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kernel/microkernels/convert.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/mask/key_selection.hpp"

namespace sparse_attn {

struct DecodeOptions : AttentionOptions {
  bool causal = true;
  index_t split = 512;  // keys per split-KV chunk (>= 16)
};

namespace kernel {

inline constexpr index_t kDecodeKeys = 16;    // keys per sub-block (a multiple of every packet width)

// Partial state of one (row group, chunk) item.
struct DecodePartial {
  float* o;  // [R][dv] unnormalised
  float* m;  // [R]
  float* l;  // [R]
};

template <class QV, class KV, class VV>
struct DecodeItemRunner {
  using TK = std::remove_const_t<typename KV::value_type>;
  using TV = std::remove_const_t<typename VV::value_type>;
  const QV& q;
  const KV& k;
  const VV& v;
  index_t d, dv, dp, dvp, n_q, n_k, R, Rp;
  float scale;
  bool causal;
  bool k_direct, v_direct;           // rows read in place (contiguous, packet-multiple dims)
  bool k_pairs = false, v_pairs = false;  // bf16 rows read as pair packets (permuted dim order)
  aligned_vector<float> qs;          // [Rp][dp] scaled queries, zero padded
  aligned_vector<float> kbuf, vbuf;  // [16][dp], [16][dvp] converted rows (non-direct layouts)
  aligned_vector<float> s;           // [Rp][16] logits, then probabilities
  std::vector<float> tmp;
  std::vector<TK> kzero;             // a zero row for padding keys
  std::vector<TV> vzero;

  DecodeItemRunner(const QV& q_, const KV& k_, const VV& v_, float scale_, bool causal_, index_t R_)
      : q(q_), k(k_), v(v_), d(q_.dim), dv(v_.dim), dp(pad(q_.dim)), dvp(pad(v_.dim)),
        n_q(q_.tokens), n_k(k_.tokens), R(R_), Rp((R_ + 3) / 4 * 4), scale(scale_),
        causal(causal_) {
    k_direct = mk::kPacketLoadable<TK> && k.stride_dim == 1 && d % mk::kLanes == 0;
    v_direct = mk::kPacketLoadable<TV> && v.stride_dim == 1 && dv % mk::kLanes == 0;
    if constexpr (mk::kHasBf16Pairs && std::is_same_v<TK, bf16>) k_pairs = k_direct && d % 32 == 0;
    if constexpr (mk::kHasBf16Pairs && std::is_same_v<TV, bf16>) v_pairs = v_direct && dv % 32 == 0;
    qs.assign(static_cast<std::size_t>(Rp * dp), 0.0f);
    kbuf.assign(static_cast<std::size_t>(kDecodeKeys * dp), 0.0f);
    vbuf.assign(static_cast<std::size_t>(kDecodeKeys * dvp), 0.0f);
    s.assign(static_cast<std::size_t>(Rp * kDecodeKeys), 0.0f);
    tmp.assign(static_cast<std::size_t>(std::max(dp, dvp)), 0.0f);
    kzero.assign(static_cast<std::size_t>(dp), TK(0.0f));
    vzero.assign(static_cast<std::size_t>(dvp), TV(0.0f));
  }
  static index_t pad(index_t x) { return (x + mk::kLanes - 1) / mk::kLanes * mk::kLanes; }

  // s[r][jb + jj] = q_r . k_jj for KJ keys x KR rows at a time; KJ * KR = 16 dot products are
  // reduced together by one transpose-reduce.
  template <bool Pairs, class ET>
  static mk::Packet load(const ET* row, index_t x) {
#if defined(__AVX512F__)
    if constexpr (Pairs && std::is_same_v<ET, bf16>) return mk::load_bf16_pair(row, x);
    else
#endif
      return mk::load_packet(row + x * mk::kLanes);
  }

  template <int KJ, int KR, bool Pairs, class ET>
  void qk(const ET* const* kp) {
    using namespace Eigen::internal;
    for (index_t r0 = 0; r0 < Rp; r0 += KR)
      for (int j0 = 0; j0 < kDecodeKeys; j0 += KJ) {
        mk::Packet acc[16];
        for (auto& a : acc) a = pset1<mk::Packet>(0.0f);
        for (index_t c = 0; c < dp; c += mk::kLanes) {
          mk::Packet kv[KJ];
          for (int jj = 0; jj < KJ; ++jj) kv[jj] = load<Pairs>(kp[j0 + jj], c / mk::kLanes);
          for (int rr = 0; rr < KR; ++rr) {
            const mk::Packet qv = pload<mk::Packet>(qs.data() + (r0 + rr) * dp + c);
            for (int jj = 0; jj < KJ; ++jj) acc[jj * KR + rr] = pmadd(qv, kv[jj], acc[jj * KR + rr]);
          }
        }
        alignas(64) float sums[16];
        mk::hsum16(acc, sums);
        for (int jj = 0; jj < KJ; ++jj)
          for (int rr = 0; rr < KR; ++rr) s[static_cast<std::size_t>((r0 + rr) * kDecodeKeys + j0 + jj)] = sums[jj * KR + rr];
      }
  }

  // o_r += sum_j p[r][j] v_j for 4 rows x NP packets of output dims starting at c0.
  template <int NP, bool Pairs, class ET>
  void pv_tile(const ET* const* vp, int nj, index_t r0, index_t c0, float* o) {
    using namespace Eigen::internal;
    constexpr int L = mk::kLanes;
    mk::Packet acc[4][NP];
    for (int r = 0; r < 4; ++r)
      for (int x = 0; x < NP; ++x) acc[r][x] = pload<mk::Packet>(o + (r0 + r) * dvp + c0 + x * L);
    for (int jj = 0; jj < nj; ++jj) {
      mk::Packet vv[NP];
      for (int x = 0; x < NP; ++x) vv[x] = load<Pairs>(vp[jj], c0 / L + x);
      for (int r = 0; r < 4; ++r) {
        const mk::Packet pr = pset1<mk::Packet>(s[static_cast<std::size_t>((r0 + r) * kDecodeKeys + jj)]);
        for (int x = 0; x < NP; ++x) acc[r][x] = pmadd(pr, vv[x], acc[r][x]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int x = 0; x < NP; ++x) pstore(o + (r0 + r) * dvp + c0 + x * L, acc[r][x]);
  }

  template <bool Pairs, class ET>
  void pv(const ET* const* vp, int nj, float* o) {
    constexpr int L = mk::kLanes;
    for (index_t r0 = 0; r0 < Rp; r0 += 4) {
      index_t c0 = 0;
      for (; c0 + 4 * L <= dvp; c0 += 4 * L) pv_tile<4, Pairs>(vp, nj, r0, c0, o);
      switch ((dvp - c0) / L) {
        case 3: pv_tile<3, Pairs>(vp, nj, r0, c0, o); break;
        case 2: pv_tile<2, Pairs>(vp, nj, r0, c0, o); break;
        case 1: pv_tile<1, Pairs>(vp, nj, r0, c0, o); break;
        default: break;
      }
    }
  }

  template <bool Pairs, class ET>
  void dispatch_qk(const ET* const* kp) {
    if (R >= 4) qk<4, 4, Pairs>(kp);
    else if (R >= 2) qk<8, 2, Pairs>(kp);
    else qk<16, 1, Pairs>(kp);
  }

  // Row r of the group starting at head h0: head h0 + r / n_q, token r % n_q. Reads keys
  // [skip, skip + count) of the concatenated ranges [rb, re). out.o rows are dvp wide.
  void run(index_t hk, index_t h0, const KeyRange* rb, const KeyRange* re, index_t skip,
           index_t count, DecodePartial out) {
    using namespace Eigen::internal;
    using mk::Packet;
    constexpr int L = mk::kLanes;
    for (index_t r = 0; r < R; ++r) {
      float* qr = qs.data() + r * dp;
      load_row(q.row(h0 + r / n_q, r % n_q), q.stride_dim, qr, d);
      for (index_t c = 0; c < d; ++c) qr[c] *= scale;
      if (k_pairs) {  // permute to the pair-packet order of the keys
        std::copy(qr, qr + d, tmp.begin());
        for (index_t x = 0; x < d / mk::kLanes; ++x)
          for (index_t i = 0; i < mk::kLanes; ++i) qr[x * mk::kLanes + i] = tmp[static_cast<std::size_t>(mk::pair_dim(x, i))];
      }
    }
    for (index_t r = 0; r < Rp; ++r) {
      out.m[r] = kNegInf;
      out.l[r] = 0.0f;
    }
    std::fill(out.o, out.o + Rp * dvp, 0.0f);
    const KeyRange* rg = rb;
    while (rg != re && skip >= rg->end - rg->begin) { skip -= rg->end - rg->begin; ++rg; }
    index_t pos = rg != re ? rg->begin + skip : 0;
    index_t keys_idx[kDecodeKeys];
    const TK* kraw[kDecodeKeys];
    const TV* vraw[kDecodeKeys];
    const float* kf[kDecodeKeys];
    const float* vf[kDecodeKeys];
    const index_t first_masked = n_k - n_q + 1;  // keys at or after this may be causally masked
    while (count > 0) {
      int nj = 0;
      while (nj < kDecodeKeys && count > 0) {
        keys_idx[nj++] = pos++;
        --count;
        if (pos == rg->end && ++rg != re) pos = rg->begin;
      }
      for (int jj = 0; jj < kDecodeKeys; ++jj) {
        const bool real = jj < nj;
        if (k_direct) kraw[jj] = real ? k.row(hk, keys_idx[jj]) : kzero.data();
        else kf[jj] = real ? convert(k, hk, keys_idx[jj], kbuf.data() + jj * dp, d) : kbuf.data() + jj * dp;
        if (v_direct) vraw[jj] = real ? v.row(hk, keys_idx[jj]) : vzero.data();
        else vf[jj] = real ? convert(v, hk, keys_idx[jj], vbuf.data() + jj * dvp, dv) : vbuf.data() + jj * dvp;
      }
      if (!k_direct)
        for (int jj = nj; jj < kDecodeKeys; ++jj) std::fill(kbuf.begin() + jj * dp, kbuf.begin() + (jj + 1) * dp, 0.0f);
      if constexpr (mk::kPacketLoadable<TK>) {
        if (k_pairs) dispatch_qk<true>(kraw);
        else if (k_direct) dispatch_qk<false>(kraw);
        else dispatch_qk<false>(kf);
      } else {
        dispatch_qk<false>(kf);
      }
      const bool any_masked = causal && keys_idx[nj - 1] >= first_masked;
      for (index_t r = 0; r < Rp; ++r) {
        float* sr = s.data() + r * kDecodeKeys;
        if (r >= R) { std::fill(sr, sr + kDecodeKeys, 0.0f); continue; }
        for (int jj = nj; jj < kDecodeKeys; ++jj) sr[jj] = kNegInf;
        if (any_masked) {
          const index_t p = n_k - n_q + r % n_q;
          for (int jj = 0; jj < nj; ++jj)
            if (keys_idx[jj] > p) sr[jj] = kNegInf;
        }
        Packet mx = pset1<Packet>(kNegInf);
        for (int jj = 0; jj < kDecodeKeys; jj += L) mx = pmax(mx, pload<Packet>(sr + jj));
        const float m_new = std::max(out.m[r], predux_max(mx));
        if (m_new == kNegInf) {
          std::fill(sr, sr + kDecodeKeys, 0.0f);
          continue;
        }
        const float alpha = out.m[r] == kNegInf ? 0.0f : std::exp(out.m[r] - m_new);
        Packet sum = pset1<Packet>(0.0f);
        for (int jj = 0; jj < kDecodeKeys; jj += L) {
          const Packet e = masked_exp(psub(pload<Packet>(sr + jj), pset1<Packet>(m_new)));
          pstore(sr + jj, e);
          sum = padd(sum, e);
        }
        out.l[r] = out.l[r] * alpha + predux(sum);
        out.m[r] = m_new;
        if (alpha != 1.0f) {
          float* o = out.o + r * dvp;
          const Packet a = pset1<Packet>(alpha);
          for (index_t c = 0; c < dvp; c += L) pstore(o + c, pmul(pload<Packet>(o + c), a));
        }
      }
      if constexpr (mk::kPacketLoadable<TV>) {
        if (v_pairs) pv<true>(vraw, nj, out.o);
        else if (v_direct) pv<false>(vraw, nj, out.o);
        else pv<false>(vf, nj, out.o);
      } else {
        pv<false>(vf, nj, out.o);
      }
    }
  }

  template <class View>
  static const float* convert(const View& view, index_t h, index_t t, float* buf, index_t n) {
    load_row(view.row(h, t), view.stride_dim, buf, n);
    return buf;
  }
};

}  // namespace kernel

/// Decode attention of q [Hq, n_q, d] (the newest n_q tokens) against the cache k, v
/// [Hkv, n_k, d|dv] restricted to `keys`, written to out [Hq, n_q, dv]. K/V may be any view type
/// with TensorView's accessors (row(h, t), stride_dim, heads, tokens, dim), e.g. a paged cache.
template <class QV, class KV, class VV, class OV>
void decode(const QV& q, const KV& k, const VV& v, const OV& out,
            const KeySelection& keys = KeySelection::all(), const DecodeOptions& opt = {}) {
  constexpr const char* where = "decode";
  const index_t G = kernel::validate_qkvo(q, k, v, out, where);
  const float scale = kernel::resolve_scale(opt.scale, q.dim, where);
  require(opt.split >= kernel::kDecodeKeys, where, ": split must be >= ", kernel::kDecodeKeys,
          ", got ", opt.split);
  keys.validate(k.tokens, q.heads, k.heads, where);
  if (q.tokens == 0 || q.heads == 0) return;
  const index_t n_q = q.tokens, n_k = k.tokens, dv = v.dim;
  const index_t dvp = (dv + kernel::mk::kLanes - 1) / kernel::mk::kLanes * kernel::mk::kLanes;
  const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
  const index_t units = per_q ? q.heads : k.heads;
  const index_t heads_per_unit = per_q ? 1 : G;
  const index_t R = heads_per_unit * n_q;
  const index_t Rp = (R + 3) / 4 * 4;  // rows padded to the micro-kernel's row block
  const KeyRange everything{0, n_k};

  // Items: (unit, chunk) over each unit's key list.
  struct Item {
    index_t unit, skip, count, slot;
  };
  std::vector<Item> items;
  std::vector<index_t> first_item(static_cast<std::size_t>(units) + 1, 0);
  for (index_t u = 0; u < units; ++u) {
    const index_t L = keys.scope() == KeySelection::Scope::all ? n_k : keys.keys(u, n_k);
    for (index_t s0 = 0; s0 < L; s0 += opt.split)
      items.push_back({u, s0, std::min(opt.split, L - s0), static_cast<index_t>(items.size())});
    first_item[static_cast<std::size_t>(u) + 1] = static_cast<index_t>(items.size());
  }
  const std::size_t n_items = items.size();
  kernel::aligned_vector<float> po(n_items * static_cast<std::size_t>(Rp * dvp));
  std::vector<float> pm(n_items * static_cast<std::size_t>(Rp)), pl(pm.size());

  kernel::parallel_region(opt.num_threads, [&] {
    kernel::DecodeItemRunner<QV, KV, VV> runner(q, k, v, scale, opt.causal, R);
#pragma omp for schedule(dynamic, 1)
    for (std::size_t i = 0; i < n_items; ++i) {
      const Item& it = items[i];
      const index_t hk = per_q ? it.unit / G : it.unit;
      const index_t h0 = per_q ? it.unit : it.unit * G;
      const KeyRange* rb = keys.scope() == KeySelection::Scope::all ? &everything : keys.ranges_begin(it.unit);
      const KeyRange* re = keys.scope() == KeySelection::Scope::all ? &everything + 1 : keys.ranges_end(it.unit);
      runner.run(hk, h0, rb, re, it.skip, it.count,
                 {po.data() + i * static_cast<std::size_t>(Rp * dvp), pm.data() + i * static_cast<std::size_t>(Rp),
                  pl.data() + i * static_cast<std::size_t>(Rp)});
    }
    // Merge the chunks of each row in chunk order: o = sum_c e^{m_c - M} o_c / sum_c e^{m_c - M} l_c.
    std::vector<float> acc(static_cast<std::size_t>(dv));
#pragma omp for schedule(static)
    for (index_t ur = 0; ur < units * R; ++ur) {
      const index_t u = ur / R, r = ur % R;
      const index_t h = (per_q ? u : u * G) + r / n_q, t = r % n_q;
      const index_t i0 = first_item[static_cast<std::size_t>(u)], i1 = first_item[static_cast<std::size_t>(u) + 1];
      float M = kNegInf;
      for (index_t i = i0; i < i1; ++i) M = std::max(M, pm[static_cast<std::size_t>(i * Rp + r)]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float l = 0.0f;
      if (M != kNegInf) {
        for (index_t i = i0; i < i1; ++i) {
          const float mi = pm[static_cast<std::size_t>(i * Rp + r)];
          if (mi == kNegInf) continue;
          const float w = std::exp(mi - M);
          l += w * pl[static_cast<std::size_t>(i * Rp + r)];
          const float* o = po.data() + static_cast<std::size_t>((i * Rp + r) * dvp);
          if (runner.v_pairs) {  // partial outputs are in pair-packet order
            for (index_t c = 0; c < dv; ++c)
              acc[static_cast<std::size_t>(kernel::mk::pair_dim(c / kernel::mk::kLanes, c % kernel::mk::kLanes))] += w * o[c];
          } else {
            for (index_t c = 0; c < dv; ++c) acc[static_cast<std::size_t>(c)] += w * o[c];
          }
        }
      }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      for (auto& x : acc) x *= inv;
      store_row(acc.data(), out.row(h, t), out.stride_dim, dv);
      if (opt.lse) opt.lse(h, t) = l > 0.0f ? M + std::log(l) : kNegInf;
    }
  });
}

}  // namespace sparse_attn
