// Decode: split-KV items over a row group's key list. Part of the per-target kernel bodies:
// included by arch/detail/bodies-inl.hpp inside namespace arch::<target>::body (no include guard
// and no includes on purpose, see there).

// Keys per sub-block: one online-softmax update each. 32 rather than 64: the block being computed
// and the next one being prefetched (K and V rows of both, 32 KB at d = 128 bf16) fit in L1.
inline constexpr int kDecodeBlock = 32;

/// Asks for the cache lines of [p, p + bytes) in L2 (a hint; no fault, nothing on other compilers).
inline void prefetch_bytes(const void* p, index_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = static_cast<const char*>(p);
  for (index_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 2);
  if (bytes > 0 && (reinterpret_cast<std::uintptr_t>(c) & 63) != 0) __builtin_prefetch(c + bytes - 1, 0, 2);
#else
  static_cast<void>(p), static_cast<void>(bytes);
#endif
}

/// x[i] <- x[i] rounded to bf16 (nearest even, as bf16(x)), kept as fp32; a loop compilers vectorise.
inline void round_to_bf16(float* x, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    const std::uint32_t u = Eigen::numext::bit_cast<std::uint32_t>(x[i]);
    const std::uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    x[i] = x[i] != x[i] ? x[i] : Eigen::numext::bit_cast<float>(r);  // NaN stays NaN
  }
}

/// Rows padded to the row block: KR = 4 rows share each key load (1 or 2 for tiny groups).
inline index_t decode_padded_rows(index_t R) { return R >= 3 ? (R + 3) / 4 * 4 : R; }
template <class V>
inline index_t pad_lanes(index_t x) { return (x + V::kLanes - 1) / V::kLanes * V::kLanes; }

// One item's decode state: the partial softmax state of a row group (the rows sharing a key list)
// over a run of keys. Keys are processed kDecodeBlock at a time: logits by a register-blocked
// dot-product tile (KJ keys x KR rows, reduced together by one 16-way transpose-reduce), one
// vectorised online-softmax update, then P.V with each V row loaded once for the KR rows. The
// next block's K and V rows are prefetched while a block computes (its K rows during the logits,
// its V rows during P.V): decode reads every byte once, so it runs at memory speed only when the
// loads do not wait.
//
// Products (Precision, kernel/common.hpp): fp32 (q pre-scaled, K/V widened exactly) or bf16: q
// rounded to bf16 unscaled, logits = scale * (fp32 sum of the products), the probabilities rounded
// to bf16 before P.V (the sum l from the unrounded ones). vdpbf16ps computes the bf16 mode where
// the target has it and the rows allow (contiguous, head dims multiples of 32); elsewhere the same
// roundings are applied to fp32 operands and the exact products summed with FMAs (equal results
// up to the order of the sums).
template <class V, class QV, class KV, class VV>
class DecodeItemRunner {
 public:
  using TK = std::remove_const_t<typename KV::value_type>;
  using TV = std::remove_const_t<typename VV::value_type>;
  static constexpr bool kLoadsK = std::is_same_v<TK, float> || V::kWidensHalf;
  static constexpr bool kLoadsV = std::is_same_v<TV, float> || V::kWidensHalf;

  DecodeItemRunner(const QV& q, const KV& k, const VV& v, float scale, bool causal, index_t R,
                   bool bf16_products, const DecodeScratch& ws)
      : q_(q), k_(k), v_(v), d_(q.dim), dv_(v.dim), dp_(pad_lanes<V>(q.dim)),
        dvp_(pad_lanes<V>(v.dim)), n_q_(q.tokens), n_k_(k.tokens), R_(R),
        KR_(R >= 3 ? 4 : static_cast<int>(R)), Rp_(decode_padded_rows(R)), scale_(scale),
        causal_(causal), bf16_(bf16_products), ws_(ws) {
    k_direct_ = kLoadsK && k.stride_dim == 1 && d_ % V::kLanes == 0;
    v_direct_ = kLoadsV && v.stride_dim == 1 && dv_ % V::kLanes == 0;
    if constexpr (V::kHasBf16Pairs && std::is_same_v<TK, bf16>) k_pairs_ = k_direct_ && d_ % 32 == 0;
    if constexpr (V::kHasBf16Pairs && std::is_same_v<TV, bf16>) v_pairs_ = v_direct_ && dv_ % 32 == 0;
    if constexpr (V::kHasBf16Dot && std::is_same_v<TK, bf16>) k_dot_ = bf16_ && k_pairs_;
    if constexpr (V::kHasBf16Dot && std::is_same_v<TV, bf16>) v_dot_ = bf16_ && v_pairs_;
    // Prefetch whole rows when they are contiguous (strided rows: the hardware's business).
    kpf_bytes_ = k.stride_dim == 1 ? d_ * static_cast<index_t>(sizeof(TK)) : 0;
    vpf_bytes_ = v.stride_dim == 1 ? dv_ * static_cast<index_t>(sizeof(TV)) : 0;
    if (k_dot_) k_pairs_ = false;
    if (v_dot_) v_pairs_ = false;
    qs_ = ws.qs;
    qb_ = static_cast<bf16*>(ws.qb);
    kzero_ = static_cast<TK*>(ws.kzero);
    vzero_ = static_cast<TV*>(ws.vzero);
    vfix_ = static_cast<TV*>(ws.vfix);
    std::fill(kzero_, kzero_ + dp_, TK(0.0f));
    std::fill(vzero_, vzero_ + dvp_, TV(0.0f));
  }

  index_t padded_dv() const { return dvp_; }
  /// Natural output dim of position c of a partial output row.
  index_t out_dim(index_t c) const {
    if (v_pairs_) return pair_dim(c / V::kLanes, c % V::kLanes);
    if (v_dot_) return interleave_dim(c / V::kLanes, c % V::kLanes);
    return c;
  }

  // Row r of the group starting at head h0: head h0 + r / n_q, token r % n_q. Reads keys
  // [skip, skip + count) of the concatenated ranges [rb, re).
  void run(index_t hk, index_t h0, const KeyRange* rb, const KeyRange* re, index_t skip,
           index_t count, DecodePartial out) {
    load_queries(h0);
    std::fill(out.m, out.m + Rp_, -INFINITY);
    std::fill(out.l, out.l + Rp_, 0.0f);
    std::fill(out.o, out.o + Rp_ * dvp_, 0.0f);
    rg_ = rb;
    re_ = re;
    while (rg_ != re_ && skip >= rg_->end - rg_->begin) {
      skip -= rg_->end - rg_->begin;
      ++rg_;
    }
    pos_ = rg_ != re_ ? rg_->begin + skip : 0;
    left_ = count;
    const index_t first_masked = n_k_ - n_q_ + 1;  // keys from here on may be causally masked
    if (out.logits != nullptr)  // key mass: padding keys of the stored logits count 0
      for (index_t r = 0; r < R_; ++r) std::fill(out.logits + r * out.ld + count, out.logits + (r + 1) * out.ld, -INFINITY);
    stored_ = 0;
    // Blocks i .. i + kLookahead are cut ahead (buffers i % kRing); block i + kLookahead is
    // prefetched while block i computes.
    int len[kRing] = {};
    for (int i = 0; i <= kLookahead; ++i) len[i] = next_keys(hk, i);
    for (int cur = 0; len[cur] > 0; cur = (cur + 1) % kRing) {
      const int ahead = (cur + kLookahead) % kRing;
      const int nn = len[ahead];
      pf_k_ = nn > 0 && kpf_bytes_ > 0 ? krow_[ahead] : nullptr;
      pf_v_ = nn > 0 && vpf_bytes_ > 0 ? vrow_[ahead] : nullptr;
      pf_n_ = nn;
      const int nj = len[cur];
      keys_ = keyb_[cur];
      gather(nj, cur);
      const bool masked = causal_ && keys_[nj - 1] >= first_masked;
      nbad_ = 0;
      if (masked) isolate_nonfinite(hk, nj, first_masked);
      switch (KR_) {
        case 4: block<4>(nj, masked, out); break;
        case 2: block<2>(nj, masked, out); break;
        default: block<1>(nj, masked, out); break;
      }
      if (nbad_ > 0) add_nonfinite(out.o);
      stored_ += nj;
      len[cur] = 0;
      len[(cur + kLookahead + 1) % kRing] = next_keys(hk, (cur + kLookahead + 1) % kRing);
    }
  }

 private:
  void load_queries(index_t h0) {
    for (index_t r = 0; r < Rp_; ++r) {
      float* qr = qs_ + r * dp_;
      std::fill(qr, qr + dp_, 0.0f);
      if (r >= R_) continue;
      load_row<V>(q_.row(h0 + r / n_q_, r % n_q_), q_.stride_dim, qr, d_);
      if (bf16_) round_to_bf16(qr, d_);  // bf16 products: the scale multiplies the sums
      else for (index_t c = 0; c < d_; ++c) qr[c] *= scale_;
      if (k_dot_)
        for (index_t c = 0; c < d_; ++c) qb_[r * d_ + c] = bf16(qr[c]);
      if (k_pairs_) {  // permute to the pair-packet order of the keys
        std::copy(qr, qr + d_, ws_.tmp);
        for (index_t c = 0; c < d_; ++c) qr[c] = ws_.tmp[pair_dim(c / V::kLanes, c % V::kLanes)];
      }
    }
    if (k_dot_)
      for (index_t r = R_; r < Rp_; ++r) std::fill(qb_ + r * d_, qb_ + (r + 1) * d_, bf16(0.0f));
  }

  // Up to kDecodeBlock next keys of the item into buffer b (indices and K/V row pointers).
  int next_keys(index_t hk, int b) {
    int nj = 0;
    index_t* keys = keyb_[b];
    const TK** kr = krow_[b];
    const TV** vr = vrow_[b];
    while (nj < kDecodeBlock && left_ > 0) {
      if (pos_ == rg_->end) {  // left_ > 0: another range follows
        ++rg_;
        pos_ = rg_->begin;
        continue;
      }
      const int run = static_cast<int>(std::min<index_t>(std::min<index_t>(kDecodeBlock - nj, left_), rg_->end - pos_));
      if constexpr (kernel::is_tensor_view<KV>::value && kernel::is_tensor_view<VV>::value) {
        const TK* k0 = k_.row(hk, pos_);
        const TV* v0 = v_.row(hk, pos_);
        for (int i = 0; i < run; ++i) {
          keys[nj + i] = pos_ + i;
          kr[nj + i] = k0 + i * k_.stride_token;
          vr[nj + i] = v0 + i * v_.stride_token;
        }
      } else {
        for (int i = 0; i < run; ++i) {
          keys[nj + i] = pos_ + i;
          kr[nj + i] = k_.row(hk, pos_ + i);
          vr[nj + i] = v_.row(hk, pos_ + i);
        }
      }
      nj += run;
      left_ -= run;
      pos_ += run;
    }
    return nj;
  }

  // The block's rows: direct rows are read through buffer b's pointers (padding keys point at
  // zero rows), other layouts converted to fp32 rows.
  void gather(int nj, int b) {
    if (k_direct_) {
      kraw_ = krow_[b];
      for (int jj = nj; jj < kDecodeBlock; ++jj) krow_[b][jj] = kzero_;
    } else {
      for (int jj = 0; jj < kDecodeBlock; ++jj) {
        float* dst = ws_.kbuf + jj * dp_;
        if (jj < nj) load_row<V>(krow_[b][jj], k_.stride_dim, dst, d_);
        std::fill(dst + (jj < nj ? d_ : 0), dst + dp_, 0.0f);
        kf_[jj] = dst;
      }
    }
    if (v_direct_) {
      vraw_ = vrow_[b];
      for (int jj = nj; jj < kDecodeBlock; ++jj) vrow_[b][jj] = vzero_;
    } else {
      for (int jj = 0; jj < nj; ++jj) {
        float* dst = ws_.vbuf + jj * dvp_;
        load_row<V>(vrow_[b][jj], v_.stride_dim, dst, dv_);
        std::fill(dst + dv_, dst + dvp_, 0.0f);
        vf_[jj] = dst;
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
      load_row<V>(v_.row(hk, keys_[jj]), v_.stride_dim, ws_.tmp, dv_);
      if (all_finite<V>(ws_.tmp, 1, dv_, dv_)) continue;
      bad_[nbad_++] = jj;
      if (v_direct_) {
        TV* dst = vfix_ + jj * dvp_;
        for (index_t c = 0; c < dv_; ++c) dst[c] = std::isfinite(ws_.tmp[c]) ? vraw_[jj][c] : TV(0.0f);
        for (index_t c = dv_; c < dvp_; ++c) dst[c] = TV(0.0f);
        vraw_[jj] = dst;
      } else {
        float* dst = ws_.vbuf + jj * dvp_;  // vf_[jj]: our converted copy
        for (index_t c = 0; c < dv_; ++c)
          if (!std::isfinite(dst[c])) dst[c] = 0.0f;
      }
    }
    hk_ = hk;
  }
  // After block(): s still holds every row group's probabilities, [Rp / KR][block][KR].
  SPARSE_ATTN_NOINLINE void add_nonfinite(float* o) {
    const index_t KR = KR_;
    for (int b = 0; b < nbad_; ++b) {
      const int jj = bad_[b];
      load_row<V>(v_.row(hk_, keys_[jj]), v_.stride_dim, ws_.tmp, dv_);
      for (index_t r = 0; r < R_; ++r) {
        if (keys_[jj] > n_k_ - n_q_ + r % n_q_) continue;  // row r may not see this key
        const float p = ws_.s[r / KR * KR * kDecodeBlock + jj * KR + r % KR];
        for (index_t c = 0; c < dvp_; ++c) {
          const index_t dim = out_dim(c);
          if (dim < dv_ && !std::isfinite(ws_.tmp[dim])) o[r * dvp_ + c] += p * ws_.tmp[dim];
        }
      }
    }
  }

  template <int KR>
  void block(int nj, bool masked, DecodePartial out) {
    constexpr int KJ = 16 / KR;
    const int nj_pad = (nj + KJ - 1) / KJ * KJ;
    for (index_t r0 = 0; r0 < Rp_; r0 += KR) {
      float* sg = ws_.s + r0 * kDecodeBlock;  // [key][KR] logits of this row group
      if (r0 == 0 && pf_k_ != nullptr) {  // the first row group prefetches the next K rows
        for (int j0 = 0; j0 < nj_pad; j0 += KJ) {
          for (int jj = j0; jj < j0 + KJ && jj < pf_n_; ++jj) prefetch_bytes(pf_k_[jj], kpf_bytes_);
          logits<KR>(r0, j0, sg + j0 * KR);
        }
        for (int jj = nj_pad; jj < pf_n_; ++jj) prefetch_bytes(pf_k_[jj], kpf_bytes_);
      } else {
        for (int j0 = 0; j0 < nj_pad; j0 += KJ) logits<KR>(r0, j0, sg + j0 * KR);
      }
      for (int jj = nj; jj < nj_pad; ++jj)
        for (int rr = 0; rr < KR; ++rr) sg[jj * KR + rr] = -INFINITY;
      for (int rr = 0; rr < KR; ++rr) {
        const index_t r = r0 + rr;
        if (r >= R_) {
          for (int jj = 0; jj < nj_pad; ++jj) sg[jj * KR + rr] = -INFINITY;
        } else if (masked) {
          const index_t p = n_k_ - n_q_ + r % n_q_;
          for (int jj = 0; jj < nj; ++jj)
            if (keys_[jj] > p) sg[jj * KR + rr] = -INFINITY;
        }
      }
      if (out.logits != nullptr) store_logits<KR>(sg, nj, r0, out);
      const TV* const* pf = r0 == 0 ? pf_v_ : nullptr;  // the next V rows, during P.V
      if (!softmax<KR>(sg, nj_pad, out, r0)) {  // every logit masked so far
        if (pf != nullptr)
          for (int jj = 0; jj < pf_n_; ++jj) prefetch_bytes(pf[jj], vpf_bytes_);
        continue;
      }
      if (bf16_ && !v_dot_) round_to_bf16(sg, nj * KR);  // bf16 products: P rounded (emulated)
      if (v_dot_) pv_dot<KR>(sg, nj, r0, out.o, pf);
      else if (v_pairs_) pv<KR, true>(sg, nj, r0, vraw_, out.o, pf);
      else if (v_direct_) pv<KR, false>(sg, nj, r0, vraw_, out.o, pf);
      else pv<KR, false>(sg, nj, r0, vf_, out.o, pf);
    }
  }

  // Key mass: keeps the block's (masked) logits of rows r0..r0+KR for the pass after the merge.
  template <int KR>
  SPARSE_ATTN_NOINLINE void store_logits(const float* sg, int nj, index_t r0, const DecodePartial& out) {
    for (int rr = 0; rr < KR && r0 + rr < R_; ++rr) {
      float* dst = out.logits + (r0 + rr) * out.ld + stored_;
      for (int jj = 0; jj < nj; ++jj) dst[jj] = sg[jj * KR + rr];
    }
  }

  // sg[jj * KR + rr] = q_{r0 + rr} . k_{j0 + jj} for KJ keys x KR rows (16 logits; q pre-scaled
  // in fp32 mode, the scale applied here in bf16 mode).
  template <int KR>
  void logits(index_t r0, int j0, float* dst) {
    constexpr int KJ = 16 / KR;
    Packets<V, 16> acc;
    bool done = false;
    if constexpr (V::kHasBf16Dot && std::is_same_v<TK, bf16>) {
      if (k_dot_) return V::template qk_bf16_logits<KJ, KR>(kraw_ + j0, qb_ + r0 * d_, d_, d_, scale_, dst);
    }
    if (!done) {
      if constexpr (kLoadsK) {
        if (k_pairs_) dots<KJ, KR, true>(kraw_ + j0, r0, acc, dst);
        else if (k_direct_) dots<KJ, KR, false>(kraw_ + j0, r0, acc, dst);
        else dots<KJ, KR, false>(kf_ + j0, r0, acc, dst);
      } else {
        dots<KJ, KR, false>(kf_ + j0, r0, acc, dst);
      }
    }
    if (bf16_) {
      const typename V::F sc = V::set1(scale_);
      for (int i = 0; i < 16; i += V::kLanes) V::store(dst + i, V::mul(V::load(dst + i), sc));
    }
  }

  template <class ET, bool Pairs>
  static typename V::F load_k(const ET* row, index_t x) {
    if constexpr (Pairs && std::is_same_v<ET, bf16> && V::kHasBf16Pairs) return V::load_bf16_pair(row, x);
    else return V::load_as_float(row + x * V::kLanes);
  }

  template <int KJ, int KR, bool Pairs, class ET>
  void dots(const ET* const* kp, index_t r0, typename V::F* acc, float* dst) {
    for (int i = 0; i < 16; ++i) acc[i] = V::zero();
    for (index_t x = 0; x < dp_ / V::kLanes; ++x) {
      Packets<V, KJ> kv;
      for (int jj = 0; jj < KJ; ++jj) kv[jj] = load_k<ET, Pairs>(kp[jj], x);
      for (int rr = 0; rr < KR; ++rr) {
        const typename V::F qv = V::load(qs_ + (r0 + rr) * dp_ + x * V::kLanes);
        for (int jj = 0; jj < KJ; ++jj) acc[jj * KR + rr] = V::fmadd(qv, kv[jj], acc[jj * KR + rr]);
      }
    }
    V::hsum16(acc, dst);
  }

  // Online-softmax update of rows r0..r0+KR over sg (nj_pad keys): sg becomes probabilities
  // e^{s - m_new}, the output rows are rescaled by e^{m_old - m_new}. False if all masked.
  template <int KR>
  bool softmax(float* sg, int nj_pad, DecodePartial out, index_t r0) {
    float* m = out.m + r0;
    float* l = out.l + r0;
    float alpha[static_cast<std::size_t>(KR)];
    if constexpr (V::kHasRowSoftmax) {
      if (!V::template online_softmax_rows<KR>(sg, nj_pad * KR / 16, m, l, alpha)) return false;
    } else {
      bool any = false;
      for (int rr = 0; rr < KR; ++rr) {
        OnlineSoftmax st{m[rr], l[rr]};
        const OnlineSoftmax::Step step = st.update(sg + rr, nj_pad, KR);
        alpha[rr] = step.alpha;
        any = any || step.live;
        m[rr] = st.m;
        l[rr] = st.l;
      }
      if (!any) return false;
    }
    for (int rr = 0; rr < KR; ++rr) {
      if (alpha[rr] == 1.0f) continue;
      float* o = out.o + (r0 + rr) * dvp_;
      const typename V::F av = V::set1(alpha[rr]);
      for (index_t c = 0; c < dvp_; c += V::kLanes) V::store(o + c, V::mul(V::load(o + c), av));
    }
    return true;
  }

  // o_r += sum_j p[r][j] v_j, each V packet loaded once for the KR rows.
  // pf (not null): the next block's V rows, prefetched during the first column tile.
  template <int KR, bool Pairs, class ET>
  void pv(const float* sg, int nj, index_t r0, const ET* const* vp, float* o, const TV* const* pf) {
    constexpr int NP = KR == 4 ? 4 : 8;  // KR x NP accumulators
    index_t c0 = 0;
    for (; c0 + NP * V::kLanes <= dvp_; c0 += NP * V::kLanes, pf = nullptr)
      pv_tile<KR, NP, Pairs>(sg, nj, r0, vp, c0, o, pf);
    for (; c0 < dvp_; c0 += V::kLanes, pf = nullptr) pv_tile<KR, 1, Pairs>(sg, nj, r0, vp, c0, o, pf);
    if (pf != nullptr)  // no column tile ran
      for (int jj = 0; jj < pf_n_; ++jj) prefetch_bytes(pf[jj], vpf_bytes_);
  }
  template <int KR, int NP, bool Pairs, class ET>
  void pv_tile(const float* sg, int nj, index_t r0, const ET* const* vp, index_t c0, float* o,
               const TV* const* pf) {
    Packets2<V, KR, NP> acc;
    for (int r = 0; r < KR; ++r)
      for (int x = 0; x < NP; ++x) acc[r][x] = V::load(o + (r0 + r) * dvp_ + c0 + x * V::kLanes);
    if (pf != nullptr)
      for (int jj = nj; jj < pf_n_; ++jj) prefetch_bytes(pf[jj], vpf_bytes_);
    for (int jj = 0; jj < nj; ++jj) {
      if (pf != nullptr && jj < pf_n_) prefetch_bytes(pf[jj], vpf_bytes_);
      Packets<V, NP> vv;
      for (int x = 0; x < NP; ++x) {
        if constexpr (Pairs && std::is_same_v<ET, bf16> && V::kHasBf16Pairs)
          vv[x] = V::load_bf16_pair(vp[jj], c0 / V::kLanes + x);
        else if constexpr (std::is_same_v<ET, float> || V::kWidensHalf)
          vv[x] = V::load_as_float(vp[jj] + c0 + x * V::kLanes);
      }
      for (int r = 0; r < KR; ++r) {
        const typename V::F pr = V::set1(sg[jj * KR + r]);
        for (int x = 0; x < NP; ++x) acc[r][x] = V::fmadd(pr, vv[x], acc[r][x]);
      }
    }
    for (int r = 0; r < KR; ++r)
      for (int x = 0; x < NP; ++x) V::store(o + (r0 + r) * dvp_ + c0 + x * V::kLanes, acc[r][x]);
  }

  // P.V with bf16 dot products over key pairs (j, j + 1).
  template <int KR>
  void pv_dot(const float* sg, int nj, index_t r0, float* o, const TV* const* pf) {
    if constexpr (V::kHasBf16Dot && std::is_same_v<TV, bf16>) {
      // pt[(jj / 2) * KR + rr] = bf16 pair (p[rr][jj], p[rr][jj + 1]); keys from nj on have p = 0
      // (nj_pad is even) or are never read.
      const int npairs = (nj + 1) / 2;
      V::template pack_p_pairs<KR>(sg, npairs, ws_.pt);
      constexpr int NP = KR == 4 ? 4 : 8;
      index_t c0 = 0;
      for (; c0 + NP * 16 <= dvp_; c0 += NP * 16, pf = nullptr) pv_dot_tile<KR, NP>(npairs, r0, c0, o, pf);
      for (; c0 < dvp_; c0 += 32, pf = nullptr) pv_dot_tile<KR, 2>(npairs, r0, c0, o, pf);
      if (pf != nullptr)
        for (int jj = 0; jj < pf_n_; ++jj) prefetch_bytes(pf[jj], vpf_bytes_);
    } else {
      static_cast<void>(sg), static_cast<void>(nj), static_cast<void>(r0), static_cast<void>(o),
          static_cast<void>(pf);
    }
  }
  template <int KR, int NP>
  void pv_dot_tile(int npairs, index_t r0, index_t c0, float* o, const TV* const* pf) {
    if constexpr (V::kHasBf16Dot && std::is_same_v<TV, bf16>) {
      Packets2<V, KR, NP> acc;
      for (int r = 0; r < KR; ++r)
        for (int x = 0; x < NP; ++x) acc[r][x] = V::load(o + (r0 + r) * dvp_ + c0 + x * 16);
      if (pf != nullptr)
        for (int jj = 2 * npairs; jj < pf_n_; ++jj) prefetch_bytes(pf[jj], vpf_bytes_);
      for (int jp = 0; jp < npairs; ++jp) {
        if (pf != nullptr && 2 * jp < pf_n_) {
          prefetch_bytes(pf[2 * jp], vpf_bytes_);
          if (2 * jp + 1 < pf_n_) prefetch_bytes(pf[2 * jp + 1], vpf_bytes_);
        }
        // Keys from nj on point at the zero row (gather()).
        V::template pv_bf16_pair<KR, NP>(vraw_[2 * jp], vraw_[2 * jp + 1], c0, ws_.pt + jp * KR, acc);
      }
      for (int r = 0; r < KR; ++r)
        for (int x = 0; x < NP; ++x) V::store(o + (r0 + r) * dvp_ + c0 + x * 16, acc[r][x]);
    } else {
      static_cast<void>(npairs), static_cast<void>(r0), static_cast<void>(c0), static_cast<void>(o),
          static_cast<void>(pf);
    }
  }

  const QV& q_;
  const KV& k_;
  const VV& v_;
  index_t d_, dv_, dp_, dvp_, n_q_, n_k_, R_;
  int KR_;
  index_t Rp_;
  float scale_;
  bool causal_;
  bool bf16_;  // bf16 products (Precision); computed by vdpbf16ps where k_dot_ / v_dot_
  DecodeScratch ws_;
  bool k_direct_ = false, v_direct_ = false;  // rows read in place (contiguous, packet multiple)
  bool k_pairs_ = false, v_pairs_ = false;    // bf16 rows read as pair packets (exact fp32 math)
  bool k_dot_ = false, v_dot_ = false;        // bf16 products by vdpbf16ps
  float* qs_ = nullptr;
  bf16* qb_ = nullptr;
  TK* kzero_ = nullptr;
  TV* vzero_ = nullptr;
  TV* vfix_ = nullptr;
  int nbad_ = 0, bad_[kDecodeBlock] = {};  // block keys whose V needs add_nonfinite()
  index_t hk_ = 0;
  index_t stored_ = 0;  // keys of the item done before this block (key-mass logits column)
  // Key cursor of the item (next_keys()), and the key blocks: the current one and the next
  // (indices and row pointers, double-buffered).
  const KeyRange* rg_ = nullptr;
  const KeyRange* re_ = nullptr;
  index_t pos_ = 0, left_ = 0;
  // Blocks between a prefetch and its use: 1 (2 and 3 measured no faster at d = 128).
  static constexpr int kLookahead = 1;
  static constexpr int kRing = kLookahead + 1;
  index_t keyb_[kRing][kDecodeBlock] = {};
  const TK* krow_[kRing][kDecodeBlock] = {};
  const TV* vrow_[kRing][kDecodeBlock] = {};
  const index_t* keys_ = keyb_[0];  // the current block's keys
  // Prefetch of the next block: its rows (null: none or not contiguous), count, bytes per row.
  const TK* const* pf_k_ = nullptr;
  const TV* const* pf_v_ = nullptr;
  int pf_n_ = 0;
  index_t kpf_bytes_ = 0, vpf_bytes_ = 0;
  const TK** kraw_ = krow_[0];  // the current block's rows (direct layouts), padded with zero rows
  const TV** vraw_ = vrow_[0];
  const float* kf_[kDecodeBlock] = {};
  const float* vf_[kDecodeBlock] = {};
};

