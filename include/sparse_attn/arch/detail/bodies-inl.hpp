// The arithmetic of every kernel, written once over a target's vector operations `Vec` (the
// interface listed in arch/generic/vec.hpp). No include guard and no includes on purpose: this
// file is included once per target, inside that target's namespace (arch::<target>) and, for the
// x86 targets, inside its SPARSE_ATTN_TARGET_BEGIN region, so each target gets its own copy
// compiled for its ISA (see arch/dispatch.hpp). Everything it needs is included before.
//
// Entry points (struct Target at the end): prefill_item() computes one prefill work item,
// decode_item() one decode (row group, chunk) item, decode_merge_row() merges a row's chunks;
// qk_block() and the row operations serve the selections.

namespace body {

// Register arrays of N (N x M) packets. The bound is converted explicitly: GCC's -Wsign-conversion
// flags an int template parameter used as the bound of an array of vector type.
template <class V, int N>
using Packets = typename V::F[static_cast<std::size_t>(N)];
template <class V, int N, int M>
using Packets2 = typename V::F[static_cast<std::size_t>(N)][static_cast<std::size_t>(M)];

// ---------------------------------------------------------------------------------------------
// Register-blocked fp32 micro-kernels. Queries are kept transposed (Qt[c][i], i = query within
// the tile), so every product is "broadcast one K or V element, multiply a vector of queries":
// no horizontal reductions, and the online-softmax row max / row sum become vertical operations
// over key rows.
// ---------------------------------------------------------------------------------------------

/// S[j][i] = sum_c K[j][c] * Qt[c][i] for j < NJ, i < VV * kLanes.
/// qt: [d][ldq] (aligned), k: rows of length d with stride ldk, s: [NJ][lds] (aligned).
template <class V, int NJ, int VV>
inline void qk_tile(const float* qt, index_t ldq, const float* k, index_t ldk, index_t d, float* s,
                    index_t lds) {
  Packets2<V, NJ, VV> acc;
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < VV; ++v) acc[j][v] = V::zero();
  for (index_t c = 0; c < d; ++c) {
    Packets<V, VV> qv;
    for (int v = 0; v < VV; ++v) qv[v] = V::load(qt + c * ldq + v * V::kLanes);
    for (int j = 0; j < NJ; ++j) {
      const typename V::F b = V::set1(k[j * ldk + c]);
      for (int v = 0; v < VV; ++v) acc[j][v] = V::fmadd(qv[v], b, acc[j][v]);
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < VV; ++v) V::store(s + j * lds + v * V::kLanes, acc[j][v]);
}

/// Ot[c][i] += sum_j V[j][c] * P[j][i] for c in [c0, c0 + NC), i < VV * kLanes, j < nk.
template <class V, int NC, int VV>
inline void pv_tile(const float* p, index_t ldp, index_t nk, const float* vmat, index_t ldv,
                    index_t c0, float* ot, index_t ldo) {
  Packets2<V, NC, VV> acc;
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < VV; ++v) acc[c][v] = V::load(ot + (c0 + c) * ldo + v * V::kLanes);
  for (index_t j = 0; j < nk; ++j) {
    Packets<V, VV> pv;
    for (int v = 0; v < VV; ++v) pv[v] = V::load(p + j * ldp + v * V::kLanes);
    const float* vr = vmat + j * ldv + c0;
    for (int c = 0; c < NC; ++c) {
      const typename V::F b = V::set1(vr[c]);
      for (int v = 0; v < VV; ++v) acc[c][v] = V::fmadd(pv[v], b, acc[c][v]);
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < VV; ++v) V::store(ot + (c0 + c) * ldo + v * V::kLanes, acc[c][v]);
}

/// S[j][i] for all nk keys (kTileRows at a time, the remainder by smaller tiles), i < VV lanes.
template <class V, int VV>
inline void qk_block(const float* qt, index_t ldq, const float* k, index_t ldk, index_t nk,
                     index_t d, float* s, index_t lds) {
  static_assert(V::kTileRows == 6, "remainder switch assumes 6 rows per tile");
  index_t j = 0;
  for (; j + 6 <= nk; j += 6) qk_tile<V, 6, VV>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds);
  switch (nk - j) {
    case 5: qk_tile<V, 5, VV>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 4: qk_tile<V, 4, VV>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 3: qk_tile<V, 3, VV>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 2: qk_tile<V, 2, VV>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 1: qk_tile<V, 1, VV>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    default: break;
  }
}

/// Ot[c][i] += sum_j V[j][c] P[j][i] for all dv output dims, i < VV lanes.
template <class V, int VV>
inline void pv_block(const float* p, index_t ldp, index_t nk, const float* vmat, index_t ldv,
                     index_t dv, float* ot, index_t ldo) {
  index_t c = 0;
  for (; c + 6 <= dv; c += 6) pv_tile<V, 6, VV>(p, ldp, nk, vmat, ldv, c, ot, ldo);
  switch (dv - c) {
    case 5: pv_tile<V, 5, VV>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 4: pv_tile<V, 4, VV>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 3: pv_tile<V, 3, VV>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 2: pv_tile<V, 2, VV>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 1: pv_tile<V, 1, VV>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    default: break;
  }
}

/// Covers `rows` transposed queries with micro-tiles: full tiles of kTileVecs packets, then the
/// rest with the fewest packets that hold it. A lane's arithmetic does not depend on the tile
/// width, so the bits are those of full tiles; short query blocks only skip padding lanes.
template <class V, int VV = V::kTileVecs>
struct Tiles {
  static constexpr index_t kTileQ = V::kTileVecs * V::kLanes;
  template <int W>
  static void qk(const float* qt, index_t ldq, const float* k, index_t ldk, index_t nk, index_t d,
                 float* s, index_t lds, index_t t) {
    qk_block<V, W>(qt + t, ldq, k, ldk, nk, d, s + t, lds);
  }
  /// S = Q K^T for query lanes [0, rows) (rows <= ldq).
  static void qk_rows(index_t rows, const float* qt, index_t ldq, const float* k, index_t ldk,
                      index_t nk, index_t d, float* s, index_t lds) {
    index_t t = 0;
    for (; t + kTileQ <= rows; t += kTileQ) qk<V::kTileVecs>(qt, ldq, k, ldk, nk, d, s, lds, t);
    if (t >= rows) return;
    const index_t vecs = (rows - t + V::kLanes - 1) / V::kLanes;
    if (vecs == 1) qk<1>(qt, ldq, k, ldk, nk, d, s, lds, t);
    else if (vecs == 2 || V::kTileVecs == 2) qk<V::kTileVecs >= 2 ? 2 : 1>(qt, ldq, k, ldk, nk, d, s, lds, t);
    else if (vecs == 3) qk<V::kTileVecs >= 3 ? 3 : 1>(qt, ldq, k, ldk, nk, d, s, lds, t);
    else qk<V::kTileVecs>(qt, ldq, k, ldk, nk, d, s, lds, t);
  }
  template <int W>
  static void pv(const float* p, index_t ldp, index_t nk, const float* vmat, index_t ldv,
                 index_t dv, float* ot, index_t ldo, index_t t) {
    pv_block<V, W>(p + t, ldp, nk, vmat, ldv, dv, ot + t, ldo);
  }
  /// Ot += V^T P for query lanes [0, rows).
  static void pv_rows(index_t rows, const float* p, index_t ldp, index_t nk, const float* vmat,
                      index_t ldv, index_t dv, float* ot, index_t ldo) {
    index_t t = 0;
    for (; t + kTileQ <= rows; t += kTileQ) pv<V::kTileVecs>(p, ldp, nk, vmat, ldv, dv, ot, ldo, t);
    if (t >= rows) return;
    const index_t vecs = (rows - t + V::kLanes - 1) / V::kLanes;
    if (vecs == 1) pv<1>(p, ldp, nk, vmat, ldv, dv, ot, ldo, t);
    else if (vecs == 2 || V::kTileVecs == 2) pv<V::kTileVecs >= 2 ? 2 : 1>(p, ldp, nk, vmat, ldv, dv, ot, ldo, t);
    else if (vecs == 3) pv<V::kTileVecs >= 3 ? 3 : 1>(p, ldp, nk, vmat, ldv, dv, ot, ldo, t);
    else pv<V::kTileVecs>(p, ldp, nk, vmat, ldv, dv, ot, ldo, t);
  }
};

/// dst[i] = float(src[i * stride]) for i < n, widening whole packets where the target can.
template <class V, class T>
inline void load_row(const T* src, index_t stride, float* dst, index_t n) {
  index_t i = 0;
  if constexpr (!std::is_same_v<T, float> && V::kWidensHalf) {
    if (stride == 1)
      for (; i + V::kLanes <= n; i += V::kLanes) V::storeu(dst + i, V::load_as_float(src + i));
  }
  ::sparse_attn::load_row(src + i * stride, stride, dst + i, n - i);
}

/// True when n rows of w floats at p (row stride ld) are all finite: x * 0 is 0, or NaN for
/// +-inf and NaN.
template <class V>
inline bool all_finite(const float* p, index_t n, index_t w, index_t ld) {
  const typename V::F zero = V::zero();
  typename V::F acc = zero;
  float tail = 0.0f;
  for (index_t j = 0; j < n; ++j) {
    const float* r = p + j * ld;
    index_t c = 0;
    for (; c + V::kLanes <= w; c += V::kLanes) acc = V::add(acc, V::mul(V::loadu(r + c), zero));
    for (; c < w; ++c) tail += r[c] * 0.0f;
  }
  return V::reduce_add(acc) + tail == 0.0f;
}

/// Rows [t0, t0 + n) of head h of a K or V view as fp32 rows with stride *ld: a pointer into the
/// view when it already holds contiguous fp32 rows, else converted into buf.
template <class V, class View>
inline const float* fp32_rows(const View& view, index_t h, index_t t0, index_t n, float* buf,
                              index_t& ld) {
  using T = std::remove_const_t<typename View::value_type>;
  if constexpr (std::is_same_v<T, float> && kernel::is_tensor_view<View>::value) {
    if (view.stride_dim == 1) {
      ld = view.stride_token;
      return view.row(h, t0);
    }
  }
  ld = view.dim;
  for (index_t j = 0; j < n; ++j) load_row<V>(view.row(h, t0 + j), view.stride_dim, buf + j * ld, view.dim);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------

// P V of a partial block whose V holds a NaN or inf (corrupt data only): a masked pair's 0 * NaN
// must not reach rows that may not see the key. P V runs on a copy with those elements zeroed (the
// same bits for every other row), then they are added to the rows allowed to see them.
template <class V, class Mask>
SPARSE_ATTN_NOINLINE void pv_block_nonfinite(const Mask& mask, index_t mh, index_t q0, index_t rows,
                                             index_t k0, index_t nk, const float* vp, index_t ldv,
                                             index_t dv, const PrefillScratch& ws, float* ot) {
  const index_t ldq = ws.ldq;
  const float* s = ws.s;
  for (index_t j = 0; j < nk; ++j)
    for (index_t c = 0; c < dv; ++c) {
      const float x = vp[j * ldv + c];
      ws.vfix[j * dv + c] = std::isfinite(x) ? x : 0.0f;
    }
  Tiles<V>::pv_rows(rows, s, ldq, nk, ws.vfix, dv, dv, ot, ldq);
  for (index_t j = 0; j < nk; ++j)
    for (index_t c = 0; c < dv; ++c)
      if (!std::isfinite(vp[j * ldv + c]))
        for (index_t i = 0; i < rows; ++i)
          if (mask.allowed(mh, q0 + i, k0 + j)) ot[c * ldq + i] += s[j * ldq + i] * vp[j * ldv + c];
}

// Key mass: where a head's key-mass rows [sel0, sel0 + nsel) of the tile keep their logits
// (width: nsel padded to kMaxLanes; dst null: nothing to keep).
struct MassRows {
  float* dst = nullptr;
  index_t sel0 = 0, nsel = 0, width = 0;
};

// Copies the block's (masked) logits of the key-mass rows: dst[j * ld + i], -inf in the padding.
SPARSE_ATTN_NOINLINE inline void store_mass_logits(const float* s, index_t lds, index_t nk,
                                                   const MassRows& mass, index_t ld) {
  for (index_t j = 0; j < nk; ++j) {
    float* dst = mass.dst + j * ld;
    std::copy(s + j * lds + mass.sel0, s + j * lds + mass.sel0 + mass.nsel, dst);
    std::fill(dst + mass.nsel, dst + mass.width, -INFINITY);
  }
}

// One key block for one head's query tile: logits, mask, online-softmax update (the
// OnlineSoftmax rule of kernel/softmax_state.hpp, vectorised over the tile's queries), P V.
// v_finite: the block's V rows hold no NaN or inf (only needed for partial blocks).
template <class V, class Mask>
inline void prefill_block(const Mask& mask, index_t mh, index_t q0, index_t rows, index_t k0,
                          index_t nk, bool full, const float* kp, index_t ldk, const float* vp,
                          index_t ldv, bool v_finite, index_t d, index_t dv,
                          const PrefillScratch& ws, float* qt, float* ot, float* m, float* l,
                          const MassRows& mass) {
  using F = typename V::F;
  const index_t ldq = ws.ldq;
  const index_t width = (rows + V::kLanes - 1) / V::kLanes * V::kLanes;  // lanes computed
  float* s = ws.s;
  Tiles<V>::qk_rows(rows, qt, ldq, kp, ldk, nk, d, s, ldq);
  if (!full) {
    for (index_t j = 0; j < nk; ++j)
      for (index_t i = 0; i < rows; ++i)
        if (!mask.allowed(mh, q0 + i, k0 + j)) s[j * ldq + i] = -INFINITY;
  }
  if (mass.dst != nullptr) store_mass_logits(s, ldq, nk, mass, ws.ks_ld);
  for (index_t i = 0; i < width; i += V::kLanes) {
    const F m_old = V::load(m + i);
    F mx = m_old;
    for (index_t j = 0; j < nk; ++j) mx = V::max(mx, V::load(s + j * ldq + i));
    const F m_use = V::zero_if_neg_inf(mx);  // all masked so far: use 0
    const F alpha = V::masked_exp(V::sub(m_old, m_use));
    F sum = V::zero();
    for (index_t j = 0; j < nk; ++j) {
      // Full blocks hold finite logits <= m: plain e^x (below -88 it is ~1e-38, not 0: harmless
      // beside the row's max term 1). Partial blocks hold -inf, which must give exactly 0.
      const F x = V::sub(V::load(s + j * ldq + i), m_use);
      const F p = full ? V::exp(x) : V::masked_exp(x);
      V::store(s + j * ldq + i, p);
      sum = V::add(sum, p);
    }
    V::store(l + i, V::fmadd(V::load(l + i), alpha, sum));
    V::store(m + i, mx);
    if (V::reduce_min(alpha) != 1.0f)  // the running max moved for some row of this packet
      for (index_t c = 0; c < dv; ++c) V::store(ot + c * ldq + i, V::mul(V::load(ot + c * ldq + i), alpha));
  }
  if (full || v_finite) Tiles<V>::pv_rows(rows, s, ldq, nk, vp, ldv, dv, ot, ldq);
  else pv_block_nonfinite<V>(mask, mh, q0, rows, k0, nk, vp, ldv, dv, ws, ot);
}

/// Visits one key block of a work item for every head that needs it (mask.for_each_block's
/// callback): converts (or points at) the block's K/V rows once, then runs each head.
template <class V, class Mask, class KV, class VV>
struct PrefillBlockVisitor {
  const Mask& mask;
  const KV& k;
  const VV& v;
  const PrefillScratch& ws;
  index_t hk, q0, rows, d, dv, g_begin, g_end, mh_of_g0;  // heads g in [g_begin, g_end)
  bool per_head_mask;
  index_t mass_sel0 = 0, mass_nsel = 0;  // key mass: the tile's rows kept (nsel 0: none)

  void operator()(index_t kb, bool full) const {
    const MaskShape& ms = mask.shape();
    const index_t k0 = ms.k_begin(kb), nk = ms.k_end(kb) - k0;
    index_t ldk = 0, ldv = 0;
    const float* kp = fp32_rows<V>(k, hk, k0, nk, ws.kbuf, ldk);
    const float* vp = fp32_rows<V>(v, hk, k0, nk, ws.vbuf, ldv);
    const bool v_finite = full || all_finite<V>(vp, nk, dv, ldv);
    const index_t ldq = ws.ldq;
    for (index_t g = g_begin; g < g_end; ++g) {
      MassRows mass;
      if (mass_nsel > 0) {  // record the block and where its logits go
        index_t* st = ws.ks_state + 2 * g;
        ws.ks_blocks[g * ms.num_k_blocks() + st[0]++] = kb;
        mass = {ws.ks + (g * ws.ks_nk + st[1]) * ws.ks_ld, mass_sel0, mass_nsel,
                (mass_nsel + kMaxLanes - 1) / kMaxLanes * kMaxLanes};
        st[1] += nk;
      }
      prefill_block<V>(mask, per_head_mask ? mh_of_g0 + g : 0, q0, rows, k0, nk, full, kp, ldk, vp,
                       ldv, v_finite, d, dv, ws, ws.qt + g * d * ldq, ws.ot + g * dv * ldq,
                       ws.m + g * ldq, ws.l + g * ldq, mass);
    }
  }
};

/// Prefill key mass: out[j] = sum_i e^{s[j][i] - m[i]} inv[i] for keys j < keys, columns
/// i < width (a multiple of kMaxLanes; uncounted columns hold -inf logits and m = inv = 0).
template <class V>
inline void key_mass_columns(const float* s, index_t lds, index_t keys, index_t width,
                             const float* m, const float* inv, float* out) {
  for (index_t j = 0; j < keys; ++j) {
    typename V::F acc = V::zero();
    for (index_t i = 0; i < width; i += V::kLanes)
      acc = V::fmadd(V::masked_exp(V::sub(V::load(s + j * lds + i), V::load(m + i))), V::load(inv + i), acc);
    out[j] = V::reduce_add(acc);
  }
}

/// Adds x (>= 0) to a fixed-point key-mass sum; NaN or inf sets bit 63.
inline void add_key_mass(const PrefillKeyMass& km, index_t idx, float x) {
  if (x == 0.0f) return;
  if (!(x <= 3.0e38f)) {
    km.acc[idx].fetch_or(std::numeric_limits<std::int64_t>::min(), std::memory_order_relaxed);
    return;
  }
  km.acc[idx].fetch_add(static_cast<std::int64_t>(std::llround(static_cast<double>(x) * km.scale)),
                        std::memory_order_relaxed);
}

/// Key mass of a finished work item: for each head g, the probabilities e^{s - m} / l of its
/// kept rows (final m, l), summed per key over the rows, added to the KV head's sums.
template <class V>
SPARSE_ATTN_NOINLINE void prefill_key_mass(const MaskShape& ms, index_t n_k, index_t G, index_t hk,
                                           index_t sel0, index_t nsel, const PrefillScratch& ws,
                                           const PrefillKeyMass& km) {
  const index_t width = (nsel + kMaxLanes - 1) / kMaxLanes * kMaxLanes, nkb = ms.num_k_blocks();
  float* mcol = ws.ks_col;
  float* icol = ws.ks_col + ws.ks_ld;
  for (index_t g = 0; g < G; ++g) {
    const float* m = ws.m + g * ws.ldq + sel0;
    const float* l = ws.l + g * ws.ldq + sel0;
    bool poisoned = false;
    for (index_t i = 0; i < width; ++i) {  // empty rows (l = 0), padding and poisoned rows count 0
      const bool counted = i < nsel && l[i] != 0.0f && !std::isnan(l[i]);
      poisoned = poisoned || (i < nsel && std::isnan(l[i]));
      mcol[i] = counted ? m[i] : 0.0f;
      icol[i] = counted ? 1.0f / l[i] : 0.0f;
    }
    const index_t* st = ws.ks_state + 2 * g;
    index_t pos = 0;
    for (index_t b = 0; b < st[0]; ++b) {
      const index_t kb = ws.ks_blocks[g * nkb + b], k0 = ms.k_begin(kb), nk = ms.k_end(kb) - k0;
      const float* s = ws.ks + (g * ws.ks_nk + pos) * ws.ks_ld;
      key_mass_columns<V>(s, ws.ks_ld, nk, width, mcol, icol, ws.ks_sum);
      if (poisoned)  // corrupt data only: a poisoned row makes NaN the keys it reads
        for (index_t j = 0; j < nk; ++j)
          for (index_t i = 0; i < nsel; ++i)
            if (std::isnan(l[i]) && s[j * ws.ks_ld + i] != -INFINITY) ws.ks_sum[j] = std::numeric_limits<float>::quiet_NaN();
      for (index_t j = 0; j < nk; ++j) add_key_mass(km, hk * n_k + k0 + j, ws.ks_sum[j]);
      pos += nk;
    }
  }
}

/// Work item (KV head hk, query block qb): the G query heads of the group over the block's key
/// blocks; writes their output rows (and LSE) when done.
template <class V, class Mask, class QV, class KV, class VV, class OV>
void prefill_item(const Mask& mask, const QV& q, const KV& k, const VV& v, const OV& out,
                  LseView lse, float scale, index_t G, index_t hk, index_t qb,
                  const PrefillScratch& ws, const PrefillKeyMass& km) {
  const MaskShape& ms = mask.shape();
  const index_t d = q.dim, dv = v.dim, ldq = ws.ldq;
  const index_t q0 = ms.q_begin(qb), rows = ms.q_end(qb) - q0;
  // Key mass: the tile's rows >= row_begin keep their logits (sel0, nsel).
  const index_t sel0 = std::min(rows, std::max<index_t>(0, km.row_begin - q0));
  const index_t nsel = km.acc != nullptr && ws.ks != nullptr ? rows - sel0 : 0;
  if (nsel > 0) std::fill(ws.ks_state, ws.ks_state + 2 * G, index_t{0});
  std::fill(ws.qt, ws.qt + G * d * ldq, 0.0f);
  std::fill(ws.ot, ws.ot + G * dv * ldq, 0.0f);
  std::fill(ws.m, ws.m + G * ldq, -INFINITY);
  std::fill(ws.l, ws.l + G * ldq, 0.0f);
  for (index_t g = 0; g < G; ++g) {  // transposed, scaled queries
    float* qt = ws.qt + g * d * ldq;
    for (index_t i = 0; i < rows; ++i) {
      load_row<V>(q.row(hk * G + g, q0 + i), q.stride_dim, ws.row, d);
      for (index_t c = 0; c < d; ++c) qt[c * ldq + i] = ws.row[c] * scale;
    }
  }
  if (mask.head_shared()) {  // one K/V conversion per block, reused by the G heads of the group
    const PrefillBlockVisitor<V, Mask, KV, VV> visit{mask, k, v, ws, hk, q0, rows, d, dv, 0, G, 0, false, sel0, nsel};
    mask.for_each_block(0, qb, visit);
  } else {
    for (index_t g = 0; g < G; ++g) {
      const PrefillBlockVisitor<V, Mask, KV, VV> visit{mask, k, v,     ws,     hk,   q0,  rows, d,
                                                       dv,   g, g + 1, hk * G, true, sel0, nsel};
      mask.for_each_block(hk * G + g, qb, visit);
    }
  }
  if (nsel > 0) prefill_key_mass<V>(ms, k.tokens, G, hk, sel0, nsel, ws, km);
  for (index_t g = 0; g < G; ++g) {  // normalise and store
    const index_t h = hk * G + g;
    const float* ot = ws.ot + g * dv * ldq;
    const float* m = ws.m + g * ldq;
    const float* l = ws.l + g * ldq;
    for (index_t i = 0; i < rows; ++i) {  // l = 0: empty row; l = NaN: poisoned row
      const float inv = l[i] != 0.0f ? 1.0f / l[i] : 0.0f;
      for (index_t c = 0; c < dv; ++c) ws.row[c] = ot[c * ldq + i] * inv;
      store_row(ws.row, out.row(h, q0 + i), out.stride_dim, dv);
      if (lse) lse(h, q0 + i) = l[i] != 0.0f ? m[i] + std::log(l[i]) : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decode: split-KV items over a row group's key list
// ---------------------------------------------------------------------------------------------

inline constexpr int kDecodeBlock = 64;  // keys per sub-block: one online-softmax update each

/// Rows padded to the row block: KR = 4 rows share each key load (1 or 2 for tiny groups).
inline index_t decode_padded_rows(index_t R) { return R >= 3 ? (R + 3) / 4 * 4 : R; }
template <class V>
inline index_t pad_lanes(index_t x) { return (x + V::kLanes - 1) / V::kLanes * V::kLanes; }

// One item's decode state: the partial softmax state of a row group (the rows sharing a key list)
// over a run of keys. Keys are processed kDecodeBlock at a time: logits by a register-blocked
// dot-product tile (KJ keys x KR rows, reduced together by one 16-way transpose-reduce), one
// vectorised online-softmax update, then P.V with each V row loaded once for the KR rows.
template <class V, class QV, class KV, class VV>
class DecodeItemRunner {
 public:
  using TK = std::remove_const_t<typename KV::value_type>;
  using TV = std::remove_const_t<typename VV::value_type>;
  static constexpr bool kLoadsK = std::is_same_v<TK, float> || V::kWidensHalf;
  static constexpr bool kLoadsV = std::is_same_v<TV, float> || V::kWidensHalf;

  DecodeItemRunner(const QV& q, const KV& k, const VV& v, float scale, bool causal, index_t R,
                   bool bf16_dot, const DecodeScratch& ws)
      : q_(q), k_(k), v_(v), d_(q.dim), dv_(v.dim), dp_(pad_lanes<V>(q.dim)),
        dvp_(pad_lanes<V>(v.dim)), n_q_(q.tokens), n_k_(k.tokens), R_(R),
        KR_(R >= 3 ? 4 : static_cast<int>(R)), Rp_(decode_padded_rows(R)), scale_(scale),
        causal_(causal), ws_(ws) {
    k_direct_ = kLoadsK && k.stride_dim == 1 && d_ % V::kLanes == 0;
    v_direct_ = kLoadsV && v.stride_dim == 1 && dv_ % V::kLanes == 0;
    if constexpr (V::kHasBf16Pairs && std::is_same_v<TK, bf16>) k_pairs_ = k_direct_ && d_ % 32 == 0;
    if constexpr (V::kHasBf16Pairs && std::is_same_v<TV, bf16>) v_pairs_ = v_direct_ && dv_ % 32 == 0;
    if constexpr (V::kHasBf16Dot && std::is_same_v<TK, bf16>) k_dot_ = bf16_dot && k_pairs_;
    if constexpr (V::kHasBf16Dot && std::is_same_v<TV, bf16>) v_dot_ = bf16_dot && v_pairs_;
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
    const KeyRange* rg = rb;
    while (rg != re && skip >= rg->end - rg->begin) {
      skip -= rg->end - rg->begin;
      ++rg;
    }
    index_t pos = rg != re ? rg->begin + skip : 0;
    const index_t first_masked = n_k_ - n_q_ + 1;  // keys from here on may be causally masked
    if (out.logits != nullptr)  // key mass: padding keys of the stored logits count 0
      for (index_t r = 0; r < R_; ++r) std::fill(out.logits + r * out.ld + count, out.logits + (r + 1) * out.ld, -INFINITY);
    stored_ = 0;
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
      stored_ += nj;
    }
  }

 private:
  void load_queries(index_t h0) {
    for (index_t r = 0; r < Rp_; ++r) {
      float* qr = qs_ + r * dp_;
      std::fill(qr, qr + dp_, 0.0f);
      if (r >= R_) continue;
      load_row<V>(q_.row(h0 + r / n_q_, r % n_q_), q_.stride_dim, qr, d_);
      for (index_t c = 0; c < d_; ++c) qr[c] *= scale_;
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

  // Row pointers of the block's keys (padding keys point at zero rows).
  void gather(index_t hk, int nj) {
    for (int jj = 0; jj < kDecodeBlock; ++jj) {
      const bool real = jj < nj;
      if (k_direct_) {
        kraw_[jj] = real ? k_.row(hk, keys_[jj]) : kzero_;
      } else {
        float* dst = ws_.kbuf + jj * dp_;
        if (real) load_row<V>(k_.row(hk, keys_[jj]), k_.stride_dim, dst, d_);
        std::fill(dst + (real ? d_ : 0), dst + dp_, 0.0f);
        kf_[jj] = dst;
      }
      if (v_direct_) {
        vraw_[jj] = real ? v_.row(hk, keys_[jj]) : vzero_;
      } else if (real) {
        float* dst = ws_.vbuf + jj * dvp_;
        load_row<V>(v_.row(hk, keys_[jj]), v_.stride_dim, dst, dv_);
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
      for (int j0 = 0; j0 < nj_pad; j0 += KJ) logits<KR>(r0, j0, sg + j0 * KR);
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
      if (!softmax<KR>(sg, nj_pad, out, r0)) continue;  // every logit masked so far
      if (v_dot_) pv_dot<KR>(sg, nj, r0, out.o);
      else if (v_pairs_) pv<KR, true>(sg, nj, r0, vraw_, out.o);
      else if (v_direct_) pv<KR, false>(sg, nj, r0, vraw_, out.o);
      else pv<KR, false>(sg, nj, r0, vf_, out.o);
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

  // sg[jj * KR + rr] = q_{r0 + rr} . k_{j0 + jj} for KJ keys x KR rows.
  template <int KR>
  void logits(index_t r0, int j0, float* dst) {
    constexpr int KJ = 16 / KR;
    Packets<V, 16> acc;
    if constexpr (V::kHasBf16Dot && std::is_same_v<TK, bf16>) {
      if (k_dot_) {
        V::template qk_bf16<KJ, KR>(kraw_ + j0, qb_ + r0 * d_, d_, d_, acc);
        V::hsum16(acc, dst);
        return;
      }
    }
    if constexpr (kLoadsK) {
      if (k_pairs_) return dots<KJ, KR, true>(kraw_ + j0, r0, acc, dst);
      if (k_direct_) return dots<KJ, KR, false>(kraw_ + j0, r0, acc, dst);
    }
    dots<KJ, KR, false>(kf_ + j0, r0, acc, dst);
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
  template <int KR, bool Pairs, class ET>
  void pv(const float* sg, int nj, index_t r0, const ET* const* vp, float* o) {
    constexpr int NP = KR == 4 ? 4 : 8;  // KR x NP accumulators
    index_t c0 = 0;
    for (; c0 + NP * V::kLanes <= dvp_; c0 += NP * V::kLanes) pv_tile<KR, NP, Pairs>(sg, nj, r0, vp, c0, o);
    for (; c0 < dvp_; c0 += V::kLanes) pv_tile<KR, 1, Pairs>(sg, nj, r0, vp, c0, o);
  }
  template <int KR, int NP, bool Pairs, class ET>
  void pv_tile(const float* sg, int nj, index_t r0, const ET* const* vp, index_t c0, float* o) {
    Packets2<V, KR, NP> acc;
    for (int r = 0; r < KR; ++r)
      for (int x = 0; x < NP; ++x) acc[r][x] = V::load(o + (r0 + r) * dvp_ + c0 + x * V::kLanes);
    for (int jj = 0; jj < nj; ++jj) {
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
  void pv_dot(const float* sg, int nj, index_t r0, float* o) {
    if constexpr (V::kHasBf16Dot && std::is_same_v<TV, bf16>) {
      // pt[(jj / 2) * KR + rr] = bf16 pair (p[rr][jj], p[rr][jj + 1]).
      const int npairs = (nj + 1) / 2;
      for (int jp = 0; jp < npairs; ++jp)
        for (int rr = 0; rr < KR; ++rr) {
          const float p0 = sg[2 * jp * KR + rr];
          const float p1 = 2 * jp + 1 < nj ? sg[(2 * jp + 1) * KR + rr] : 0.0f;
          ws_.pt[jp * KR + rr] =
              static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(bf16(p0))) |
              (static_cast<std::uint32_t>(Eigen::numext::bit_cast<std::uint16_t>(bf16(p1))) << 16);
        }
      constexpr int NP = KR == 4 ? 4 : 8;
      index_t c0 = 0;
      for (; c0 + NP * 16 <= dvp_; c0 += NP * 16) pv_dot_tile<KR, NP>(npairs, nj, r0, c0, o);
      for (; c0 < dvp_; c0 += 32) pv_dot_tile<KR, 2>(npairs, nj, r0, c0, o);
    } else {
      static_cast<void>(sg), static_cast<void>(nj), static_cast<void>(r0), static_cast<void>(o);
    }
  }
  template <int KR, int NP>
  void pv_dot_tile(int npairs, int nj, index_t r0, index_t c0, float* o) {
    if constexpr (V::kHasBf16Dot && std::is_same_v<TV, bf16>) {
      Packets2<V, KR, NP> acc;
      for (int r = 0; r < KR; ++r)
        for (int x = 0; x < NP; ++x) acc[r][x] = V::load(o + (r0 + r) * dvp_ + c0 + x * 16);
      for (int jp = 0; jp < npairs; ++jp) {
        const bf16* a = vraw_[2 * jp];
        const bf16* b = 2 * jp + 1 < nj ? vraw_[2 * jp + 1] : vzero_;
        V::template pv_bf16_pair<KR, NP>(a, b, c0, ws_.pt + jp * KR, acc);
      }
      for (int r = 0; r < KR; ++r)
        for (int x = 0; x < NP; ++x) V::store(o + (r0 + r) * dvp_ + c0 + x * 16, acc[r][x]);
    } else {
      static_cast<void>(npairs), static_cast<void>(nj), static_cast<void>(r0), static_cast<void>(c0),
          static_cast<void>(o);
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
  DecodeScratch ws_;
  bool k_direct_ = false, v_direct_ = false;  // rows read in place (contiguous, packet multiple)
  bool k_pairs_ = false, v_pairs_ = false;    // bf16 rows read as pair packets (exact fp32 math)
  bool k_dot_ = false, v_dot_ = false;        // bf16 dot products (DecodeOptions::bf16_dot)
  float* qs_ = nullptr;
  bf16* qb_ = nullptr;
  TK* kzero_ = nullptr;
  TV* vzero_ = nullptr;
  TV* vfix_ = nullptr;
  int nbad_ = 0, bad_[kDecodeBlock] = {};  // block keys whose V needs add_nonfinite()
  index_t hk_ = 0;
  index_t stored_ = 0;  // keys of the item done before this block (key-mass logits column)
  index_t keys_[kDecodeBlock] = {};
  const TK* kraw_[kDecodeBlock] = {};
  const TV* vraw_[kDecodeBlock] = {};
  const float* kf_[kDecodeBlock] = {};
  const float* vf_[kDecodeBlock] = {};
};

// ---------------------------------------------------------------------------------------------
// Row and column operations of the selections and eviction scoring (methods/, kv/eviction.hpp).
// Matrices are row-major [rows][width] with row stride lds (a multiple of kMaxLanes, aligned).
// ---------------------------------------------------------------------------------------------

/// sum_c a[c] * b[c] (b of a storage type, widened exactly).
template <class V, class T>
inline float dot(const float* a, const T* b, index_t n) {
  typename V::F acc0 = V::zero(), acc1 = V::zero();
  index_t c = 0;
  if constexpr (std::is_same_v<T, float> || V::kWidensHalf) {
    for (; c + 2 * V::kLanes <= n; c += 2 * V::kLanes) {
      acc0 = V::fmadd(V::loadu(a + c), V::load_as_float(b + c), acc0);
      acc1 = V::fmadd(V::loadu(a + c + V::kLanes), V::load_as_float(b + c + V::kLanes), acc1);
    }
    for (; c + V::kLanes <= n; c += V::kLanes) acc0 = V::fmadd(V::loadu(a + c), V::load_as_float(b + c), acc0);
  }
  float tail = 0.0f;
  for (; c < n; ++c) tail += a[c] * to_float(b[c]);
  return V::reduce_add(V::add(acc0, acc1)) + tail;
}

/// s[r * lds + j] = q_r . k_j for rows r < rows (q rows of stride ldq) and keys j < nk (fp32 rows
/// of stride ldk), over d dims.
template <class V>
inline void row_dots(const float* q, index_t ldq, index_t rows, const float* k, index_t ldk,
                     index_t nk, index_t d, float* s, index_t lds) {
  for (index_t j = 0; j < nk; ++j)
    for (index_t r = 0; r < rows; ++r) s[r * lds + j] = dot<V>(q + r * ldq, k + j * ldk, d);
}

/// OnlineSoftmax update of every row r < rows over its `width` logits, without storing weights:
/// m[r] <- max(m[r], max_j s[r][j]); l[r] <- l[r] e^{m_old - m_new} + sum_j e^{s[r][j] - m_new}.
/// Rows still all -inf are left as they are. width: a multiple of kMaxLanes.
template <class V>
inline void online_softmax_rows(const float* s, index_t lds, index_t rows, index_t width, float* m,
                                float* l) {
  for (index_t r = 0; r < rows; ++r) {
    const float* sr = s + r * lds;
    typename V::F mx = V::load(sr);
    for (index_t j = V::kLanes; j < width; j += V::kLanes) mx = V::max(mx, V::load(sr + j));
    const float m_new = std::max(m[r], V::reduce_max(mx));
    if (m_new == -INFINITY) continue;
    const typename V::F mv = V::set1(m_new);
    typename V::F sum = V::zero();
    for (index_t j = 0; j < width; j += V::kLanes) sum = V::add(sum, V::masked_exp(V::sub(V::load(sr + j), mv)));
    l[r] = (m[r] == -INFINITY ? 0.0f : l[r] * std::exp(m[r] - m_new)) + V::reduce_add(sum);
    m[r] = m_new;
  }
}

/// acc[j] <- acc[j] (+ or max) e^{s[r][j] - shift[r]} over rows r in order (0 where s = -inf):
/// softmax probabilities of rows with known log-sum-exp, reduced over the rows per column.
template <class V>
inline void accumulate_probabilities(const float* s, index_t lds, index_t rows, index_t width,
                                     const float* shift, bool take_max, float* acc) {
  for (index_t j = 0; j < width; j += V::kLanes) {
    typename V::F a = V::load(acc + j);
    for (index_t r = 0; r < rows; ++r) {
      const typename V::F p = V::masked_exp(V::sub(V::load(s + r * lds + j), V::set1(shift[r])));
      a = take_max ? V::max(a, p) : V::add(a, p);
    }
    V::store(acc + j, a);
  }
}

/// Column softmax of a key-major block: s is [keys][width] (width query lanes, padded lanes
/// included), m[i] the max of column i. s <- e^{s - m} (0 for -inf), l[i] += the column sums.
template <class V>
inline void exp_columns(float* s, index_t lds, index_t keys, index_t width, const float* m, float* l) {
  for (index_t j = 0; j < keys; ++j)
    for (index_t i = 0; i < width; i += V::kLanes) {
      const typename V::F p = V::masked_exp(V::sub(V::load(s + j * lds + i), V::load(m + i)));
      V::store(s + j * lds + i, p);
      V::store(l + i, V::add(V::load(l + i), p));
    }
}

/// m[i] <- max(m[i], max_j s[j][i]) over keys j (key-major block).
template <class V>
inline void max_columns(const float* s, index_t lds, index_t keys, index_t width, float* m) {
  for (index_t j = 0; j < keys; ++j)
    for (index_t i = 0; i < width; i += V::kLanes) V::store(m + i, V::max(V::load(m + i), V::load(s + j * lds + i)));
}

/// s[j][i] <- s[j][i] * scale[i]; row_sum[j] = sum_i s[j][i] (key-major block).
template <class V>
inline void scale_columns(float* s, index_t lds, index_t keys, index_t width, const float* scale,
                          float* row_sum) {
  for (index_t j = 0; j < keys; ++j) {
    typename V::F acc = V::zero();
    for (index_t i = 0; i < width; i += V::kLanes) {
      const typename V::F p = V::mul(V::load(s + j * lds + i), V::load(scale + i));
      V::store(s + j * lds + i, p);
      acc = V::add(acc, p);
    }
    row_sum[j] = V::reduce_add(acc);
  }
}

/// Exact softmax of each row in place: s[r][j] <- e^{s - max_r} / sum (0 for -inf); width a
/// multiple of kMaxLanes, padding -inf.
template <class V>
inline void softmax_rows(float* s, index_t lds, index_t rows, index_t width) {
  for (index_t r = 0; r < rows; ++r) {
    float* sr = s + r * lds;
    typename V::F mx = V::set1(-INFINITY);
    for (index_t j = 0; j < width; j += V::kLanes) mx = V::max(mx, V::load(sr + j));
    const typename V::F m = V::set1(V::reduce_max(mx));
    typename V::F sum = V::zero();
    for (index_t j = 0; j < width; j += V::kLanes) {
      const typename V::F e = V::masked_exp(V::sub(V::load(sr + j), m));
      V::store(sr + j, e);
      sum = V::add(sum, e);
    }
    const typename V::F inv = V::set1(1.0f / V::reduce_add(sum));
    for (index_t j = 0; j < width; j += V::kLanes) V::store(sr + j, V::mul(V::load(sr + j), inv));
  }
}

/// out[j] = mult * (sum or max over rows r of s[r][j]), j < width.
template <class V>
inline void reduce_columns(const float* s, index_t lds, index_t rows, index_t width, bool take_max,
                           float mult, float* out) {
  for (index_t j = 0; j < width; j += V::kLanes) {
    typename V::F acc = V::zero();
    for (index_t r = 0; r < rows; ++r) {
      const typename V::F p = V::load(s + r * lds + j);
      acc = take_max ? V::max(acc, p) : V::add(acc, p);
    }
    V::store(out + j, V::mul(acc, V::set1(mult)));
  }
}

/// Decode key mass: out[j] = sum over rows r with inv[r] != 0 of e^{s[r][j] - m[r]} inv[r], in row
/// order, for j < width (a multiple of kMaxLanes; rows aligned, stride lds). out may be row 0 of s.
/// A poisoned row (inv NaN) makes NaN the keys it reads (s != -inf) and only those.
template <class V>
inline void key_mass_rows(const float* s, index_t lds, index_t rows, index_t width, const float* m,
                          const float* inv, float* out) {
  bool poisoned = false;
  for (index_t r = 0; r < rows; ++r) poisoned = poisoned || std::isnan(inv[r]);
  for (index_t j = 0; j < width; j += V::kLanes) {
    typename V::F acc = V::zero();
    for (index_t r = 0; r < rows; ++r) {
      if (!(inv[r] != 0.0f && inv[r] == inv[r])) continue;  // empty, not counted, or poisoned
      const typename V::F p = V::masked_exp(V::sub(V::load(s + r * lds + j), V::set1(m[r])));
      acc = V::fmadd(p, V::set1(inv[r]), acc);
    }
    if (poisoned) {  // corrupt data only
      float tmp[kMaxLanes];
      V::storeu(tmp, acc);
      for (index_t r = 0; r < rows; ++r)
        if (std::isnan(inv[r]))
          for (index_t x = 0; x < V::kLanes; ++x)
            if (s[r * lds + j + x] != -INFINITY) tmp[x] = std::numeric_limits<float>::quiet_NaN();
      acc = V::loadu(tmp);
    }
    V::store(out + j, acc);
  }
}

}  // namespace body

/// The entry points the kernel drivers call through arch::dispatch (one real call per work
/// item; everything below it is compiled for this target).
struct Target {
  static constexpr index_t lanes() { return Vec::kLanes; }

  template <class Mask, class QV, class KV, class VV, class OV>
  static void prefill_item(const Mask& mask, const QV& q, const KV& k, const VV& v, const OV& out,
                           LseView lse, float scale, index_t G, index_t hk, index_t qb,
                           const PrefillScratch& ws, const PrefillKeyMass& km) {
    body::prefill_item<Vec>(mask, q, k, v, out, lse, scale, G, hk, qb, ws, km);
  }

  template <class QV, class KV, class VV>
  static void decode_item(const QV& q, const KV& k, const VV& v, float scale, bool causal,
                          index_t R, bool bf16_dot, const DecodeScratch& ws, index_t hk, index_t h0,
                          const KeyRange* rb, const KeyRange* re, index_t skip, index_t count,
                          DecodePartial out) {
    body::DecodeItemRunner<Vec, QV, KV, VV> runner(q, k, v, scale, causal, R, bf16_dot, ws);
    runner.run(hk, h0, rb, re, skip, count, out);
  }

  /// map[c] = natural output dim of position c of a decode partial row (c < padded dv).
  template <class QV, class KV, class VV>
  static void decode_out_dims(const QV& q, const KV& k, const VV& v, bool bf16_dot,
                              const DecodeScratch& ws, index_t* map) {
    const body::DecodeItemRunner<Vec, QV, KV, VV> runner(q, k, v, 1.0f, false, 1, bf16_dot, ws);
    for (index_t c = 0; c < runner.padded_dv(); ++c) map[c] = runner.out_dim(c);
  }

  static void key_mass_rows(const float* s, index_t lds, index_t rows, index_t width, const float* m,
                            const float* inv, float* out) {
    body::key_mass_rows<Vec>(s, lds, rows, width, m, inv, out);
  }

  template <class T>
  static float dot(const float* a, const T* b, index_t n) { return body::dot<Vec>(a, b, n); }
  static void row_dots(const float* q, index_t ldq, index_t rows, const float* k, index_t ldk,
                       index_t nk, index_t d, float* s, index_t lds) {
    body::row_dots<Vec>(q, ldq, rows, k, ldk, nk, d, s, lds);
  }
  static void online_softmax_rows(const float* s, index_t lds, index_t rows, index_t width, float* m, float* l) {
    body::online_softmax_rows<Vec>(s, lds, rows, width, m, l);
  }
  static void accumulate_probabilities(const float* s, index_t lds, index_t rows, index_t width,
                                       const float* shift, bool take_max, float* acc) {
    body::accumulate_probabilities<Vec>(s, lds, rows, width, shift, take_max, acc);
  }
  static void exp_columns(float* s, index_t lds, index_t keys, index_t width, const float* m, float* l) {
    body::exp_columns<Vec>(s, lds, keys, width, m, l);
  }
  static void max_columns(const float* s, index_t lds, index_t keys, index_t width, float* m) {
    body::max_columns<Vec>(s, lds, keys, width, m);
  }
  static void scale_columns(float* s, index_t lds, index_t keys, index_t width, const float* scale, float* row_sum) {
    body::scale_columns<Vec>(s, lds, keys, width, scale, row_sum);
  }
  static void softmax_rows(float* s, index_t lds, index_t rows, index_t width) {
    body::softmax_rows<Vec>(s, lds, rows, width);
  }
  static void reduce_columns(const float* s, index_t lds, index_t rows, index_t width, bool take_max,
                             float mult, float* out) {
    body::reduce_columns<Vec>(s, lds, rows, width, take_max, mult, out);
  }

  /// S[j][i] = sum_c K[j][c] Qt[c][i] for i < rows (queries transposed, ldq a multiple of 64).
  static void qk_block(index_t rows, const float* qt, index_t ldq, const float* k, index_t ldk,
                       index_t nk, index_t d, float* s, index_t lds) {
    body::Tiles<Vec>::qk_rows(rows, qt, ldq, k, ldk, nk, d, s, lds);
  }
};
