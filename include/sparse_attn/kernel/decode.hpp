// Split-KV flash decoding: a few new query tokens against a long KV cache, over any key subset.
//
// Rows sharing a key list are packed: with a per-KV-head (or dense) selection the G query heads of
// a group x the n_q new tokens form one row group, so every K/V byte is read once per group. The
// group's key list is cut into chunks of `split` keys (independent of the thread count, so results
// are bit-identical for any number of threads); each (group, chunk) item computes a partial
// online-softmax state (o, m, l) and the partials are merged exactly, in chunk order.
//
// Causality: new token t sits at position n_k - n_q + t and sees keys j <= that position.
// Non-finite inputs (docs/ROBUSTNESS.md): a NaN in a row's query or in the K row of a key it reads
// makes the row NaN (and its LSE); a non-finite V element reaches only the rows that read its key.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kernel/microkernels/bf16_dot.hpp"
#include "sparse_attn/kernel/microkernels/convert.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/mask/key_selection.hpp"

SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_NAMESPACE_BEGIN

struct DecodeOptions : AttentionOptions {
  bool causal = true;
  index_t split = 512;  // keys per split-KV chunk (>= 16)
  /// bf16 caches only, on CPUs with AVX512-BF16 (else ignored): compute q.k and p.v with bf16 dot
  /// products (vdpbf16ps), rounding q and the probabilities to bf16. About twice the arithmetic
  /// throughput; relative error ~1e-3 instead of ~1e-6. Head dims must be multiples of 32.
  bool bf16_dot = false;
};

namespace kernel {

inline constexpr int kDecodeBlock = 64;  // keys per sub-block: one online-softmax update each

// Partial state of one (row group, chunk) item.
struct DecodePartial {
  float* o;  // [Rp][dvp] unnormalised, in the runner's output dim order (see out_dim)
  float* m;  // [Rp] running max of logits
  float* l;  // [Rp] running sum of e^{s - m}
};

// Per-row reductions over a packet laid out [key][KR rows] (lane i belongs to row i % KR): the
// result holds, in every lane i, the reduction over the lanes of row i % KR.
#if defined(__AVX512F__)
template <int KR, class Op>
inline __m512 reduce_rows(__m512 x, Op op) {
  x = op(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // swap 256-bit halves
  x = op(x, _mm512_shuffle_f32x4(x, x, 0xB1));  // swap adjacent 128-bit lanes
  if constexpr (KR <= 2) x = op(x, _mm512_permute_ps(x, 0x4E));  // swap 64-bit halves
  if constexpr (KR == 1) x = op(x, _mm512_permute_ps(x, 0xB1));  // swap adjacent floats
  return x;
}
// The KR row values at p, repeated over the 16 lanes.
template <int KR>
inline __m512 load_rows(const float* p) {
  if constexpr (KR == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  else if constexpr (KR == 2) {
    double t;
    std::memcpy(&t, p, sizeof t);
    return _mm512_castpd_ps(_mm512_set1_pd(t));
  } else return _mm512_set1_ps(*p);
}
#endif

// One worker's decode state: computes the partial softmax state of a row group (the rows sharing
// a key list) over a run of keys. Keys are processed kDecodeBlock at a time: logits by a
// register-blocked dot-product tile (KJ keys x KR rows, reduced together by one 16-way
// transpose-reduce), one vectorised online-softmax update, then P.V with each V row loaded once
// for the KR rows of a group.
template <class QV, class KV, class VV>
class DecodeItemRunner {
 public:
  using TK = std::remove_const_t<typename KV::value_type>;
  using TV = std::remove_const_t<typename VV::value_type>;

  DecodeItemRunner(const QV& q, const KV& k, const VV& v, float scale, bool causal, index_t R,
                   bool bf16_dot)
      : q_(q), k_(k), v_(v), d_(q.dim), dv_(v.dim), dp_(pad(q.dim)), dvp_(pad(v.dim)),
        n_q_(q.tokens), n_k_(k.tokens), R_(R), KR_(R >= 3 ? 4 : static_cast<int>(R)),
        Rp_(padded_rows(R)), scale_(scale), causal_(causal) {
    k_direct_ = mk::kPacketLoadable<TK> && k.stride_dim == 1 && d_ % mk::kLanes == 0;
    v_direct_ = mk::kPacketLoadable<TV> && v.stride_dim == 1 && dv_ % mk::kLanes == 0;
    if constexpr (mk::kHasBf16Pairs && std::is_same_v<TK, bf16>) k_pairs_ = k_direct_ && d_ % 32 == 0;
    if constexpr (mk::kHasBf16Pairs && std::is_same_v<TV, bf16>) v_pairs_ = v_direct_ && dv_ % 32 == 0;
    if constexpr (mk::kHasBf16Dot && std::is_same_v<TK, bf16>) k_dot_ = bf16_dot && k_pairs_;
    if constexpr (mk::kHasBf16Dot && std::is_same_v<TV, bf16>) v_dot_ = bf16_dot && v_pairs_;
    if (k_dot_) k_pairs_ = false;
    if (v_dot_) v_pairs_ = false;
    qs_.assign(static_cast<std::size_t>(Rp_ * dp_), 0.0f);
    qb_.assign(static_cast<std::size_t>(Rp_ * d_), bf16(0.0f));
    if (!k_direct_) kbuf_.assign(static_cast<std::size_t>(kDecodeBlock * dp_), 0.0f);
    if (!v_direct_) vbuf_.assign(static_cast<std::size_t>(kDecodeBlock * dvp_), 0.0f);
    s_.assign(static_cast<std::size_t>(Rp_ * kDecodeBlock), 0.0f);
    pt_.assign(static_cast<std::size_t>(Rp_ * kDecodeBlock / 2), 0u);
    kzero_.assign(static_cast<std::size_t>(dp_), TK(0.0f));
    vzero_.assign(static_cast<std::size_t>(dvp_), TV(0.0f));
    tmp_.assign(static_cast<std::size_t>(std::max(dp_, dvp_)), 0.0f);
  }

  /// Rows padded to the row block: KR = 4 rows share each key load (1 or 2 for tiny groups).
  static index_t padded_rows(index_t R) { return R >= 3 ? (R + 3) / 4 * 4 : R; }
  index_t padded_dv() const { return dvp_; }
  /// Natural output dim of position c of a partial output row.
  index_t out_dim(index_t c) const {
    if (v_pairs_) return mk::pair_dim(c / mk::kLanes, c % mk::kLanes);
    if (v_dot_) return mk::interleave_dim(c / mk::kLanes, c % mk::kLanes);
    return c;
  }

  // Row r of the group starting at head h0: head h0 + r / n_q, token r % n_q. Reads keys
  // [skip, skip + count) of the concatenated ranges [rb, re).
  void run(index_t hk, index_t h0, const KeyRange* rb, const KeyRange* re, index_t skip,
           index_t count, DecodePartial out) {
    load_queries(h0);
    std::fill(out.m, out.m + Rp_, kNegInf);
    std::fill(out.l, out.l + Rp_, 0.0f);
    std::fill(out.o, out.o + Rp_ * dvp_, 0.0f);
    const KeyRange* rg = rb;
    while (rg != re && skip >= rg->end - rg->begin) {
      skip -= rg->end - rg->begin;
      ++rg;
    }
    index_t pos = rg != re ? rg->begin + skip : 0;
    const index_t first_masked = n_k_ - n_q_ + 1;  // keys from here on may be causally masked
    while (count > 0) {
      int nj = 0;
      while (nj < kDecodeBlock && count > 0) {
        keys_[nj++] = pos++;
        --count;
        if (pos == rg->end && ++rg != re) pos = rg->begin;
      }
      gather(hk, nj);
      const bool masked = causal_ && keys_[nj - 1] >= first_masked;
      nbad_ = 0;
      if (masked) isolate_nonfinite(hk, nj, first_masked);
      switch (KR_) {
        case 4: block<4>(nj, masked, out); break;
        case 2: block<2>(nj, masked, out); break;
        default: block<1>(nj, masked, out); break;
      }
      if (nbad_ > 0) add_nonfinite(out.o);
    }
  }

 private:
  static index_t pad(index_t x) { return (x + mk::kLanes - 1) / mk::kLanes * mk::kLanes; }

  void load_queries(index_t h0) {
    for (index_t r = 0; r < R_; ++r) {
      float* qr = qs_.data() + r * dp_;
      load_row(q_.row(h0 + r / n_q_, r % n_q_), q_.stride_dim, qr, d_);
      for (index_t c = 0; c < d_; ++c) qr[c] *= scale_;
      if (k_dot_)
        for (index_t c = 0; c < d_; ++c) qb_[static_cast<std::size_t>(r * d_ + c)] = bf16(qr[c]);
      if (k_pairs_) {  // permute to the pair-packet order of the keys
        std::copy(qr, qr + d_, tmp_.begin());
        for (index_t c = 0; c < d_; ++c)
          qr[c] = tmp_[static_cast<std::size_t>(mk::pair_dim(c / mk::kLanes, c % mk::kLanes))];
      }
    }
  }

  // Row pointers of the block's keys (padding keys point at zero rows).
  void gather(index_t hk, int nj) {
    for (int jj = 0; jj < kDecodeBlock; ++jj) {
      const bool real = jj < nj;
      if (k_direct_) {
        kraw_[jj] = real ? k_.row(hk, keys_[jj]) : kzero_.data();
      } else {
        float* dst = kbuf_.data() + jj * dp_;
        if (real) load_row(k_.row(hk, keys_[jj]), k_.stride_dim, dst, d_);
        else std::fill(dst, dst + dp_, 0.0f);
        kf_[jj] = dst;
      }
      if (v_direct_) {
        vraw_[jj] = real ? v_.row(hk, keys_[jj]) : vzero_.data();
      } else if (real) {
        load_row(v_.row(hk, keys_[jj]), v_.stride_dim, vbuf_.data() + jj * dvp_, dv_);
        vf_[jj] = vbuf_.data() + jj * dvp_;
      }
    }
  }

  // Keys some row may not see (the newest n_q - 1) whose V row holds NaN or inf (corrupt data
  // only): a masked pair's 0 * NaN must not reach those rows. P.V reads a copy with the
  // non-finite elements zeroed (the same bits for every other row); add_nonfinite() then adds
  // them to the rows allowed to see the key.
  SPARSE_ATTN_NOINLINE void isolate_nonfinite(index_t hk, int nj, index_t first_masked) {
    for (int jj = 0; jj < nj; ++jj) {
      if (keys_[jj] < first_masked) continue;
      load_row(v_.row(hk, keys_[jj]), v_.stride_dim, tmp_.data(), dv_);
      if (all_finite(tmp_.data(), 1, dv_, dv_)) continue;
      bad_[nbad_++] = jj;
      if (v_direct_) {
        vfix_.resize(static_cast<std::size_t>(kDecodeBlock * dvp_), TV(0.0f));
        TV* dst = vfix_.data() + jj * dvp_;
        for (index_t c = 0; c < dv_; ++c)
          dst[c] = std::isfinite(tmp_[static_cast<std::size_t>(c)]) ? vraw_[jj][c] : TV(0.0f);
        vraw_[jj] = dst;
      } else {
        float* dst = vbuf_.data() + jj * dvp_;  // vf_[jj]: our converted copy
        for (index_t c = 0; c < dv_; ++c)
          if (!std::isfinite(dst[c])) dst[c] = 0.0f;
      }
    }
    hk_ = hk;
  }
  // After block(): s_ still holds every row group's probabilities, [Rp / KR][block][KR].
  SPARSE_ATTN_NOINLINE void add_nonfinite(float* o) {
    const index_t KR = KR_;
    for (int b = 0; b < nbad_; ++b) {
      const int jj = bad_[b];
      load_row(v_.row(hk_, keys_[jj]), v_.stride_dim, tmp_.data(), dv_);
      for (index_t r = 0; r < R_; ++r) {
        if (keys_[jj] > n_k_ - n_q_ + r % n_q_) continue;  // row r may not see this key
        const float p = s_[static_cast<std::size_t>(r / KR * KR * kDecodeBlock + jj * KR + r % KR)];
        for (index_t c = 0; c < dvp_; ++c) {
          const index_t dim = out_dim(c);
          if (dim < dv_ && !std::isfinite(tmp_[static_cast<std::size_t>(dim)]))
            o[r * dvp_ + c] += p * tmp_[static_cast<std::size_t>(dim)];
        }
      }
    }
  }

  template <int KR>
  void block(int nj, bool masked, DecodePartial out) {
    constexpr int KJ = 16 / KR;
    const int nj_pad = (nj + KJ - 1) / KJ * KJ;
    for (index_t r0 = 0; r0 < Rp_; r0 += KR) {
      float* sg = s_.data() + r0 * kDecodeBlock;  // [key][KR] logits of this row group
      for (int j0 = 0; j0 < nj_pad; j0 += KJ) logits<KR>(r0, j0, sg + j0 * KR);
      for (int jj = nj; jj < nj_pad; ++jj)
        for (int rr = 0; rr < KR; ++rr) sg[jj * KR + rr] = kNegInf;
      for (int rr = 0; rr < KR; ++rr) {
        const index_t r = r0 + rr;
        if (r >= R_) {
          for (int jj = 0; jj < nj_pad; ++jj) sg[jj * KR + rr] = kNegInf;
        } else if (masked) {
          const index_t p = n_k_ - n_q_ + r % n_q_;
          for (int jj = 0; jj < nj; ++jj)
            if (keys_[jj] > p) sg[jj * KR + rr] = kNegInf;
        }
      }
      if (!softmax<KR>(sg, nj_pad, out, r0)) continue;  // every logit masked so far
      if constexpr (mk::kPacketLoadable<TV>) {
        if (v_dot_) pv_dot<KR>(sg, nj, r0, out.o);
        else if (v_pairs_) pv<KR, true>(sg, nj, r0, vraw_, out.o);
        else if (v_direct_) pv<KR, false>(sg, nj, r0, vraw_, out.o);
        else pv<KR, false>(sg, nj, r0, vf_, out.o);
      } else {
        pv<KR, false>(sg, nj, r0, vf_, out.o);
      }
    }
  }

  // sg[jj * KR + rr] = q_{r0 + rr} . k_{j0 + jj} for KJ keys x KR rows.
  template <int KR>
  void logits(index_t r0, int j0, float* dst) {
    constexpr int KJ = 16 / KR;
    mk::Packet acc[16];
#if SPARSE_ATTN_HAS_BF16_DOT
    if constexpr (std::is_same_v<TK, bf16>) {
      if (k_dot_) {
        mk::qk_bf16<KJ, KR>(kraw_ + j0, qb_.data() + r0 * d_, d_, d_, acc);
        mk::hsum16(acc, dst);
        return;
      }
    }
#endif
    if constexpr (mk::kPacketLoadable<TK>) {
      if (k_pairs_) return dots<KJ, KR, true>(kraw_ + j0, r0, acc, dst);
      if (k_direct_) return dots<KJ, KR, false>(kraw_ + j0, r0, acc, dst);
    }
    dots<KJ, KR, false>(kf_ + j0, r0, acc, dst);
  }

  template <int KJ, int KR, bool Pairs, class ET>
  void dots(const ET* const* kp, index_t r0, mk::Packet* acc, float* dst) {
    using namespace Eigen::internal;
    for (int i = 0; i < 16; ++i) acc[i] = pset1<mk::Packet>(0.0f);
    for (index_t x = 0; x < dp_ / mk::kLanes; ++x) {
      mk::Packet kv[KJ];
      for (int jj = 0; jj < KJ; ++jj) {
#if defined(__AVX512F__)
        if constexpr (Pairs && std::is_same_v<ET, bf16>) kv[jj] = mk::load_bf16_pair(kp[jj], x);
        else
#endif
          kv[jj] = mk::load_packet(kp[jj] + x * mk::kLanes);
      }
      for (int rr = 0; rr < KR; ++rr) {
        const mk::Packet qv = pload<mk::Packet>(qs_.data() + (r0 + rr) * dp_ + x * mk::kLanes);
        for (int jj = 0; jj < KJ; ++jj) acc[jj * KR + rr] = pmadd(qv, kv[jj], acc[jj * KR + rr]);
      }
    }
    mk::hsum16(acc, dst);
  }

  // Online-softmax update of rows r0..r0+KR over sg (nj_pad keys): sg becomes probabilities
  // e^{s - m_new}, the output rows are rescaled by e^{m_old - m_new}. False if all masked.
  template <int KR>
  bool softmax(float* sg, int nj_pad, DecodePartial out, index_t r0) {
    float* m = out.m + r0;
    float* l = out.l + r0;
    float alpha[KR];
#if defined(__AVX512F__)
    const int np = nj_pad * KR / 16;
    __m512 mx = _mm512_set1_ps(kNegInf);
    __mmask16 nan = 0;  // lanes holding a NaN logit: not masked, it must poison its row
    for (int i = 0; i < np; ++i) {
      const __m512 x = _mm512_loadu_ps(sg + 16 * i);
      mx = _mm512_max_ps(x, mx);  // vmaxps returns its second operand for NaN: m stays a number
      nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q));
    }
    mx = reduce_rows<KR>(mx, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
    const __m512 m_old = load_rows<KR>(m);
    const __m512 m_new = _mm512_max_ps(m_old, mx);
    const __mmask16 live = _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
    if (live == 0 && nan == 0) return false;
    const __m512 m_use = _mm512_maskz_mov_ps(live, m_new);  // rows still all-masked use 0
    const __m512 a = masked_exp(_mm512_sub_ps(m_old, m_use));
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < np; ++i) {
      const __m512 e = masked_exp(_mm512_sub_ps(_mm512_loadu_ps(sg + 16 * i), m_use));
      _mm512_storeu_ps(sg + 16 * i, e);
      sum = _mm512_add_ps(sum, e);
    }
    sum = reduce_rows<KR>(sum, [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); });
    alignas(64) float mn[16], sm[16], al[16];
    _mm512_store_ps(mn, m_new);
    _mm512_store_ps(sm, sum);
    _mm512_store_ps(al, a);
    for (int rr = 0; rr < KR; ++rr) {
      m[rr] = mn[rr];
      l[rr] = l[rr] * al[rr] + sm[rr];
      alpha[rr] = al[rr];
    }
#else
    bool any = false;
    for (int rr = 0; rr < KR; ++rr) {
      float mx = kNegInf;
      bool nan = false;  // a NaN logit is not masked: it must poison its row
      for (int jj = 0; jj < nj_pad; ++jj) {
        mx = std::max(mx, sg[jj * KR + rr]);  // std::max(a, NaN) = a: m stays a number
        nan = nan || std::isnan(sg[jj * KR + rr]);
      }
      const float m_new = std::max(m[rr], mx);
      if (m_new == kNegInf && !nan) {
        for (int jj = 0; jj < nj_pad; ++jj) sg[jj * KR + rr] = 0.0f;
        alpha[rr] = 1.0f;
        continue;
      }
      any = true;
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      alpha[rr] = m[rr] == kNegInf ? 0.0f : std::exp(m[rr] - m_use);
      float sum = 0.0f;
      for (int jj = 0; jj < nj_pad; ++jj) {
        float& x = sg[jj * KR + rr];
        x = x == kNegInf ? 0.0f : std::exp(x - m_use);
        sum += x;
      }
      m[rr] = m_new;
      l[rr] = l[rr] * alpha[rr] + sum;
    }
    if (!any) return false;
#endif
    for (int rr = 0; rr < KR; ++rr) {
      if (alpha[rr] == 1.0f) continue;
      float* o = out.o + (r0 + rr) * dvp_;
      const mk::Packet av = Eigen::internal::pset1<mk::Packet>(alpha[rr]);
      for (index_t c = 0; c < dvp_; c += mk::kLanes)
        Eigen::internal::pstore(o + c, Eigen::internal::pmul(Eigen::internal::pload<mk::Packet>(o + c), av));
    }
    return true;
  }

  // o_r += sum_j p[r][j] v_j, each V packet loaded once for the KR rows.
  template <int KR, bool Pairs, class ET>
  void pv(const float* sg, int nj, index_t r0, const ET* const* vp, float* o) {
    constexpr int NP = KR == 4 ? 4 : 8;  // KR x NP accumulators
    index_t c0 = 0;
    for (; c0 + NP * mk::kLanes <= dvp_; c0 += NP * mk::kLanes) pv_tile<KR, NP, Pairs>(sg, nj, r0, vp, c0, o);
    for (; c0 < dvp_; c0 += mk::kLanes) pv_tile<KR, 1, Pairs>(sg, nj, r0, vp, c0, o);
  }
  template <int KR, int NP, bool Pairs, class ET>
  void pv_tile(const float* sg, int nj, index_t r0, const ET* const* vp, index_t c0, float* o) {
    using namespace Eigen::internal;
    mk::Packet acc[KR][NP];
    for (int r = 0; r < KR; ++r)
      for (int x = 0; x < NP; ++x) acc[r][x] = pload<mk::Packet>(o + (r0 + r) * dvp_ + c0 + x * mk::kLanes);
    for (int jj = 0; jj < nj; ++jj) {
      mk::Packet vv[NP];
      for (int x = 0; x < NP; ++x) {
#if defined(__AVX512F__)
        if constexpr (Pairs && std::is_same_v<ET, bf16>) vv[x] = mk::load_bf16_pair(vp[jj], c0 / mk::kLanes + x);
        else
#endif
          vv[x] = mk::load_packet(vp[jj] + c0 + x * mk::kLanes);
      }
      for (int r = 0; r < KR; ++r) {
        const mk::Packet pr = pset1<mk::Packet>(sg[jj * KR + r]);
        for (int x = 0; x < NP; ++x) acc[r][x] = pmadd(pr, vv[x], acc[r][x]);
      }
    }
    for (int r = 0; r < KR; ++r)
      for (int x = 0; x < NP; ++x) pstore(o + (r0 + r) * dvp_ + c0 + x * mk::kLanes, acc[r][x]);
  }

  // P.V with bf16 dot products over key pairs (j, j + 1).
  template <int KR>
  void pv_dot(const float* sg, int nj, index_t r0, float* o) {
#if SPARSE_ATTN_HAS_BF16_DOT
    if constexpr (std::is_same_v<TV, bf16>) {
      // pt[(jj / 2) * KR + rr] = bf16 pair (p[rr][jj], p[rr][jj + 1]).
      const int npairs = (nj + 1) / 2;
      for (int jp = 0; jp < npairs; ++jp)
        for (int rr = 0; rr < KR; ++rr) {
          const float p0 = sg[2 * jp * KR + rr];
          const float p1 = 2 * jp + 1 < nj ? sg[(2 * jp + 1) * KR + rr] : 0.0f;
          pt_[static_cast<std::size_t>(jp * KR + rr)] =
              static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(bf16(p0))) |
              (static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(bf16(p1))) << 16);
        }
      constexpr int NP = KR == 4 ? 4 : 8;
      index_t c0 = 0;
      for (; c0 + NP * 16 <= dvp_; c0 += NP * 16) pv_dot_tile<KR, NP>(npairs, nj, r0, c0, o);
      for (; c0 < dvp_; c0 += 32) pv_dot_tile<KR, 2>(npairs, nj, r0, c0, o);
    }
#else
    (void)sg, (void)nj, (void)r0, (void)o;
#endif
  }
#if SPARSE_ATTN_HAS_BF16_DOT
  template <int KR, int NP>
  void pv_dot_tile(int npairs, int nj, index_t r0, index_t c0, float* o) {
    __m512 acc[KR][NP];
    for (int r = 0; r < KR; ++r)
      for (int x = 0; x < NP; ++x) acc[r][x] = _mm512_load_ps(o + (r0 + r) * dvp_ + c0 + x * 16);
    for (int jp = 0; jp < npairs; ++jp) {
      const bf16* a = vraw_[2 * jp];
      const bf16* b = 2 * jp + 1 < nj ? vraw_[2 * jp + 1] : vzero_.data();
      __m512i lohi[NP];
      for (int x = 0; x < NP; x += 2) {
        const __m512i va = _mm512_loadu_si512(reinterpret_cast<const void*>(a + c0 + x * 16));
        const __m512i vb = _mm512_loadu_si512(reinterpret_cast<const void*>(b + c0 + x * 16));
        lohi[x] = _mm512_unpacklo_epi16(va, vb);
        lohi[x + 1] = _mm512_unpackhi_epi16(va, vb);
      }
      for (int r = 0; r < KR; ++r) {
        const __m512bh p = mk::as_bh(_mm512_set1_epi32(static_cast<int>(pt_[static_cast<std::size_t>(jp * KR + r)])));
        for (int x = 0; x < NP; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], mk::as_bh(lohi[x]), p);
      }
    }
    for (int r = 0; r < KR; ++r)
      for (int x = 0; x < NP; ++x) _mm512_store_ps(o + (r0 + r) * dvp_ + c0 + x * 16, acc[r][x]);
  }
#endif

  const QV& q_;
  const KV& k_;
  const VV& v_;
  index_t d_, dv_, dp_, dvp_, n_q_, n_k_, R_;
  int KR_;
  index_t Rp_;
  float scale_;
  bool causal_;
  bool k_direct_ = false, v_direct_ = false;  // rows read in place (contiguous, packet multiple)
  bool k_pairs_ = false, v_pairs_ = false;    // bf16 rows read as pair packets (exact fp32 math)
  bool k_dot_ = false, v_dot_ = false;        // bf16 dot products (DecodeOptions::bf16_dot)
  aligned_vector<float> qs_;                  // [Rp][dp] scaled queries (key dim order)
  std::vector<bf16> qb_;                      // [Rp][d] bf16 queries (dot path)
  aligned_vector<float> kbuf_, vbuf_;         // converted rows for non-direct layouts
  aligned_vector<float> s_;                   // [Rp / KR][block][KR] logits / probabilities
  std::vector<std::uint32_t> pt_;             // bf16 probability pairs (dot path)
  std::vector<TK> kzero_;
  std::vector<TV> vzero_;
  std::vector<float> tmp_;
  std::vector<TV> vfix_;                      // V rows with non-finite elements zeroed (rare)
  int nbad_ = 0, bad_[kDecodeBlock];          // block keys whose V needs add_nonfinite()
  index_t hk_ = 0;
  index_t keys_[kDecodeBlock];
  const TK* kraw_[kDecodeBlock];
  const TV* vraw_[kDecodeBlock];
  const float* kf_[kDecodeBlock];
  const float* vf_[kDecodeBlock];
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
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: OpenMP default), got ",
          opt.num_threads);  // checked even when there is nothing to compute
  require(opt.split >= 16, where, ": split must be >= 16, got ", opt.split);
  keys.validate(k.tokens, q.heads, k.heads, where);
  if (q.tokens == 0 || q.heads == 0) return;
  const index_t n_q = q.tokens, n_k = k.tokens, dv = v.dim;
  const index_t dvp = (dv + kernel::mk::kLanes - 1) / kernel::mk::kLanes * kernel::mk::kLanes;
  const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
  const index_t units = per_q ? q.heads : k.heads;
  const index_t heads_per_unit = per_q ? 1 : G;
  const index_t R = heads_per_unit * n_q;
  const index_t Rp = kernel::DecodeItemRunner<QV, KV, VV>::padded_rows(R);
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
    kernel::DecodeItemRunner<QV, KV, VV> runner(q, k, v, scale, opt.causal, R, opt.bf16_dot);
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
      const float M_use = M == kNegInf ? 0.0f : M;  // -inf: every chunk empty or NaN-poisoned
      std::fill(acc.begin(), acc.end(), 0.0f);
      float l = 0.0f;
      for (index_t i = i0; i < i1; ++i) {
        const float mi = pm[static_cast<std::size_t>(i * Rp + r)];
        const float li = pl[static_cast<std::size_t>(i * Rp + r)];
        if (mi == kNegInf && li == 0.0f) continue;  // no key of this chunk (a NaN l is kept)
        const float w = std::exp(mi - M_use);
        l += w * li;
        const float* o = po.data() + static_cast<std::size_t>((i * Rp + r) * dvp);
        for (index_t c = 0; c < dv; ++c)
          acc[static_cast<std::size_t>(runner.out_dim(c))] += w * o[c];
      }
      const float inv = l != 0.0f ? 1.0f / l : 0.0f;  // l = 0: empty row; l = NaN: poisoned row
      for (auto& x : acc) x *= inv;
      store_row(acc.data(), out.row(h, t), out.stride_dim, dv);
      if (opt.lse) opt.lse(h, t) = l != 0.0f ? M + std::log(l) : kNegInf;
    }
  });
}

SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_DIAGNOSTICS_POP
