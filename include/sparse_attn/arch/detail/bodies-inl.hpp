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
          if (mask.allowed_in_block(mh, q0 + i, k0 + j)) ot[c * ldq + i] += s[j * ldq + i] * vp[j * ldv + c];
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

// ---------------------------------------------------------------------------------------------
// bf16 products (Precision::bfloat16): queries and probabilities as bf16 pairs, see the pair tiles
// of arch/avx512_bf16/vec.hpp. Targets without bf16 dot products emulate the mode: the same
// roundings (Q and P to bf16, the scale after the product) with the fp32 tiles.
// ---------------------------------------------------------------------------------------------

/// How a work item computes Q K^T and P V.
enum class Products {
  fp32,           // fp32 products; Q pre-scaled
  bf16_emulated,  // bf16-rounded Q and P through the fp32 tiles; scale applied to S
  bf16_pairs,     // vdpbf16ps pair tiles
  bf16_amx,       // AMX tiles (amx target, amx_shapes)
};

/// Head dims the AMX tiles take: d a multiple of 32 (one A row of K), dv of 16 (one C tile).
inline bool amx_shapes(index_t d, index_t dv) { return d % 32 == 0 && dv % 16 == 0; }
inline index_t round_up(index_t x, index_t m) { return (x + m - 1) / m * m; }

inline float round_bf16(float x) { return static_cast<float>(bf16(x)); }

inline std::uint32_t bf16_bits(float x) {
  return Eigen::numext::bit_cast<std::uint16_t>(bf16(x));
}

/// Covers `rows` query lanes with pair tiles, like Tiles (same widths, same remainder rule).
template <class V>
struct PairTiles {
  static constexpr index_t kTileQ = V::kTileVecs * V::kLanes;
  template <int W>
  static void qk(const std::uint32_t* qp, index_t ldq, const bf16* k, index_t ldk, index_t nk,
                 index_t d2, float scale, float* s) {
    index_t j = 0;
    for (; j + 6 <= nk; j += 6) V::template qk_pairs_tile<6, W>(qp, ldq, k + j * ldk, ldk, d2, scale, s + j * ldq, ldq);
    switch (nk - j) {
      case 5: V::template qk_pairs_tile<5, W>(qp, ldq, k + j * ldk, ldk, d2, scale, s + j * ldq, ldq); break;
      case 4: V::template qk_pairs_tile<4, W>(qp, ldq, k + j * ldk, ldk, d2, scale, s + j * ldq, ldq); break;
      case 3: V::template qk_pairs_tile<3, W>(qp, ldq, k + j * ldk, ldk, d2, scale, s + j * ldq, ldq); break;
      case 2: V::template qk_pairs_tile<2, W>(qp, ldq, k + j * ldk, ldk, d2, scale, s + j * ldq, ldq); break;
      case 1: V::template qk_pairs_tile<1, W>(qp, ldq, k + j * ldk, ldk, d2, scale, s + j * ldq, ldq); break;
      default: break;
    }
  }
  template <int W>
  static void pv(const std::uint32_t* pp, index_t ldq, index_t np, const std::uint32_t* vp,
                 index_t ldvp, index_t dv, float* ot) {
    index_t c = 0;
    for (; c + 6 <= dv; c += 6) V::template pv_pairs_tile<6, W>(pp, ldq, np, vp, ldvp, c, ot, ldq);
    switch (dv - c) {
      case 5: V::template pv_pairs_tile<5, W>(pp, ldq, np, vp, ldvp, c, ot, ldq); break;
      case 4: V::template pv_pairs_tile<4, W>(pp, ldq, np, vp, ldvp, c, ot, ldq); break;
      case 3: V::template pv_pairs_tile<3, W>(pp, ldq, np, vp, ldvp, c, ot, ldq); break;
      case 2: V::template pv_pairs_tile<2, W>(pp, ldq, np, vp, ldvp, c, ot, ldq); break;
      case 1: V::template pv_pairs_tile<1, W>(pp, ldq, np, vp, ldvp, c, ot, ldq); break;
      default: break;
    }
  }
  /// Calls f(integral_constant<W>, t) over the query lanes [0, rows): full tiles, then the rest
  /// with the fewest packets that hold it.
  template <class Fn>
  static void over_rows(index_t rows, Fn&& f) {
    index_t t = 0;
    for (; t + kTileQ <= rows; t += kTileQ) f(std::integral_constant<int, V::kTileVecs>{}, t);
    if (t >= rows) return;
    const index_t vecs = (rows - t + V::kLanes - 1) / V::kLanes;
    if (vecs == 1) f(std::integral_constant<int, 1>{}, t);
    else if (vecs == 2) f(std::integral_constant<int, 2>{}, t);
    else if (vecs == 3) f(std::integral_constant<int, 3>{}, t);
    else f(std::integral_constant<int, V::kTileVecs>{}, t);
  }
  /// S[j][i] = scale * q_i . k_j for j < nk, i < rows.
  static void qk_rows(index_t rows, const std::uint32_t* qp, index_t ldq, const bf16* k, index_t ldk,
                      index_t nk, index_t d2, float scale, float* s) {
    over_rows(rows, [&](auto w, index_t t) { qk<decltype(w)::value>(qp + t, ldq, k, ldk, nk, d2, scale, s + t); });
  }
  /// Ot[c][i] += sum_j V[j][c] P[j][i] for c < dv, i < rows, over np key pairs.
  static void pv_rows(index_t rows, const std::uint32_t* pp, index_t ldq, index_t np,
                      const std::uint32_t* vp, index_t ldvp, index_t dv, float* ot) {
    over_rows(rows, [&](auto w, index_t t) { pv<decltype(w)::value>(pp + t, ldq, np, vp, ldvp, dv, ot + t); });
  }
};

/// The K/V operands of one key block, prepared once for every head of the group.
struct BlockOperands {
  const float* k = nullptr;  // fp32 products: fp32 rows (stride ldk, ldv)
  const float* v = nullptr;
  index_t ldk = 0, ldv = 0;
  const bf16* kb = nullptr;           // bf16 pairs: K rows as bf16 (stride ldk)
  const std::uint32_t* vp = nullptr;  // bf16 pairs: V as pairs (stride ws.dvp)
  bool v_finite = true;  // no NaN or inf in the block's V (checked on partial blocks only)
};

/// Packs V rows [k0, k0 + nk) of KV head hk as pairs: dst[j2 * dvp + c] = (V[2 j2][c],
/// V[2 j2 + 1][c]) for j2 < bkp / 2 (keys beyond nk and dims beyond dv: 0). True when a value
/// is inf or NaN. row_buf: [2][dvp] for strided views.
template <class V, class VV>
bool pack_v_pairs(const VV& v, index_t hk, index_t k0, index_t nk, index_t dvp, index_t bkp,
                  bf16* row_buf, std::uint32_t* dst) {
  bool bad = false;
  if constexpr (std::is_same_v<std::remove_const_t<typename VV::value_type>, bf16> && V::kHasBf16Dot) {
    const index_t dv = v.dim;
    auto row = [&](index_t j, bf16* buf) -> const bf16* {  // V row j of the block, contiguous
      const bf16* src = v.row(hk, k0 + j);
      if (v.stride_dim == 1) return src;
      for (index_t c = 0; c < dv; ++c) buf[c] = src[c * v.stride_dim];
      return buf;
    };
    for (index_t j2 = 0; j2 < bkp / 2; ++j2) {
      std::uint32_t* out = dst + j2 * dvp;
      if (2 * j2 < nk) {
        const bf16* a = row(2 * j2, row_buf);
        const bf16* b = 2 * j2 + 1 < nk ? row(2 * j2 + 1, row_buf + dvp) : nullptr;
        bad = V::interleave_rows(a, b, dv, out) || bad;
        std::fill(out + dv, out + dvp, 0u);
      } else {
        std::fill(out, out + dvp, 0u);
      }
    }
  } else {
    static_cast<void>(v), static_cast<void>(hk), static_cast<void>(k0), static_cast<void>(nk),
        static_cast<void>(dvp), static_cast<void>(bkp), static_cast<void>(row_buf), static_cast<void>(dst);
  }
  return bad;
}

/// One key block of V for the bf16 products, in the layout the work items read: pairs, or
/// pairs transposed when the item uses AMX tiles (see Target::pack_v_pairs).
template <class V, class VV>
bool pack_v(const VV& v, index_t d, index_t hk, index_t k0, index_t nk, const PrefillScratch& ws,
            std::uint32_t* dst) {
  if constexpr (V::kHasAmx) {
    if (amx_shapes(d, v.dim)) {
      const bool bad = pack_v_pairs<V>(v, hk, k0, nk, ws.dvp, ws.bkp, ws.vrow, ws.vp);
      V::transpose_pairs(ws.vp, ws.dvp, ws.bkp / 2, ws.dvp, dst, ws.bkp / 2);
      return bad;
    }
  }
  static_cast<void>(d);
  return pack_v_pairs<V>(v, hk, k0, nk, ws.dvp, ws.bkp, ws.vrow, dst);
}

/// One head's state in a work item: its queries (transposed; pairs for bf16 products), the
/// transposed unnormalised output, running max and sum.
struct HeadTile {
  float* qt;
  std::uint32_t* qp;
  float* ot;
  float* m;
  float* l;
};

/// True when the bf16 value's exponent is all ones (inf or NaN).
inline bool bf16_nonfinite(bf16 x) { return (Eigen::numext::bit_cast<std::uint16_t>(x) & 0x7F80u) == 0x7F80u; }

/// The online-softmax update of one key-major logit block s [nk][ldq] for the query lanes
/// [0, width) of one head: the OnlineSoftmax rule of kernel/softmax_state.hpp vectorised over the
/// lanes. Updates the running max m and sum l, rescales the output rows ot where the max moved,
/// and writes the probabilities back to s (fp32 and emulated products) or as bf16 pairs to
/// ws.pp. full: s holds no -inf (plain e^x).
template <class V>
inline void online_softmax_block(float* s, index_t ldq, index_t nk, index_t width, bool full,
                                 Products mode, const PrefillScratch& ws, float* m, float* l,
                                 float* ot, index_t dv) {
  using F = typename V::F;
  for (index_t i = 0; i < width; i += V::kLanes) {
    const F m_old = V::load(m + i);
    // Four independent running maxima: one chain of nk dependent max operations would take
    // nk x (max latency) cycles, as long as all the products of a small block.
    F mx = m_old, mx1 = m_old, mx2 = m_old, mx3 = m_old;
    index_t jm = 0;
    for (; jm + 4 <= nk; jm += 4) {
      mx = V::max(mx, V::load(s + jm * ldq + i));
      mx1 = V::max(mx1, V::load(s + (jm + 1) * ldq + i));
      mx2 = V::max(mx2, V::load(s + (jm + 2) * ldq + i));
      mx3 = V::max(mx3, V::load(s + (jm + 3) * ldq + i));
    }
    for (; jm < nk; ++jm) mx = V::max(mx, V::load(s + jm * ldq + i));
    mx = V::max(V::max(mx, mx1), V::max(mx2, mx3));
    const F m_use = V::zero_if_neg_inf(mx);  // all masked so far: use 0
    const F alpha = V::masked_exp(V::sub(m_old, m_use));
    F sum = V::zero();
    if constexpr (V::kHasBf16Dot) {
      if (mode != Products::fp32 && mode != Products::bf16_emulated) {  // P straight to bf16 pairs
        for (index_t j = 0; j < nk; j += 2) {  // an odd block's last key pairs with P = 0
          const F x0 = V::sub(V::load(s + j * ldq + i), m_use);
          const F p0 = full ? V::exp_fast(x0) : V::masked_exp_fast(x0);
          F p1 = V::zero();
          if (j + 1 < nk) {
            const F x1 = V::sub(V::load(s + (j + 1) * ldq + i), m_use);
            p1 = full ? V::exp_fast(x1) : V::masked_exp_fast(x1);
          }
          V::store_pairs(ws.pp + j / 2 * ldq + i, p0, p1);
          sum = V::add(sum, V::add(p0, p1));
        }
      }
    }
    for (index_t j = 0; j < nk && (mode == Products::fp32 || mode == Products::bf16_emulated); ++j) {
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
}

/// True for masks that mask a whole logit block at once (mask_block(s, ldq, q0, rows, k0, nk)),
/// instead of one allowed_in_block call per element.
template <class Mask, class = void>
struct masks_blocks : std::false_type {};
template <class Mask>
struct masks_blocks<Mask, std::void_t<decltype(std::declval<const Mask&>().mask_block(
                              static_cast<float*>(nullptr), index_t{}, index_t{}, index_t{}, index_t{},
                              index_t{}))>> : std::true_type {};

// One key block for one head's query tile: logits, mask, online-softmax update (the
// OnlineSoftmax rule of kernel/softmax_state.hpp, vectorised over the tile's queries), P V.
template <class V, class Mask>
inline void prefill_block(const Mask& mask, index_t mh, index_t q0, index_t rows, index_t k0,
                          index_t nk, bool full, const BlockOperands& b, Products mode,
                          float scale, index_t d, index_t dv, const PrefillScratch& ws,
                          const HeadTile& h, const MassRows& mass) {
  const index_t ldq = ws.ldq;
  const index_t width = (rows + V::kLanes - 1) / V::kLanes * V::kLanes;  // lanes computed
  float* s = ws.s;
  float* ot = h.ot;
  float* m = h.m;
  float* l = h.l;
  if (mode == Products::bf16_amx) {
    if constexpr (V::kHasAmx) V::qk_tiles(b.kb, b.ldk, round_up(nk, 16), h.qp, ldq, d, width, scale, s, ldq);
  } else if (mode == Products::bf16_pairs) {
    if constexpr (V::kHasBf16Dot) PairTiles<V>::qk_rows(rows, h.qp, ldq, b.kb, b.ldk, nk, (d + 1) / 2, scale, s);
  } else {
    Tiles<V>::qk_rows(rows, h.qt, ldq, b.k, b.ldk, nk, d, s, ldq);
    if (mode == Products::bf16_emulated)  // the scale multiplies the sum of bf16 products
      for (index_t j = 0; j < nk; ++j)
        for (index_t i = 0; i < width; i += V::kLanes)
          V::store(s + j * ldq + i, V::mul(V::load(s + j * ldq + i), V::set1(scale)));
  }
  if (!full) {
    if constexpr (masks_blocks<Mask>::value) {
      mask.mask_block(s, ldq, q0, rows, k0, nk);
    } else {
      for (index_t j = 0; j < nk; ++j)
        for (index_t i = 0; i < rows; ++i)
          if (!mask.allowed_in_block(mh, q0 + i, k0 + j)) s[j * ldq + i] = -INFINITY;
    }
  }
  if (mass.dst != nullptr) store_mass_logits(s, ldq, nk, mass, ws.ks_ld);
  online_softmax_block<V>(s, ldq, nk, width, full, mode, ws, m, l, ot, dv);
  if (mode == Products::bf16_amx) {
    if constexpr (V::kHasAmx) {  // the tiles take 32 keys at a time: zero pairs up to there
      const index_t nk32 = round_up(nk, 32);
      for (index_t j2 = (nk + 1) / 2; j2 < nk32 / 2; ++j2) std::fill(ws.pp + j2 * ldq, ws.pp + j2 * ldq + width, 0u);
      V::pv_tiles(b.vp, ws.bkp / 2, nk32, ws.pp, ldq, dv, width, ot, ldq);
    }
  } else if (mode == Products::bf16_pairs) {
    if constexpr (V::kHasBf16Dot) PairTiles<V>::pv_rows(rows, ws.pp, ldq, (nk + 1) / 2, b.vp, ws.dvp, dv, ot);
  } else {
    if (mode == Products::bf16_emulated)
      for (index_t j = 0; j < nk; ++j)
        for (index_t i = 0; i < width; ++i) s[j * ldq + i] = round_bf16(s[j * ldq + i]);
    if (full || b.v_finite) Tiles<V>::pv_rows(rows, s, ldq, nk, b.v, b.ldv, dv, ot, ldq);
    else pv_block_nonfinite<V>(mask, mh, q0, rows, k0, nk, b.v, b.ldv, dv, ws, ot);
  }
}

/// Visits one key block of a work item for every head that needs it (mask.for_each_block's
/// callback): converts (or points at) the block's K/V rows once (operands()), then runs each
/// head of a query tile (run()). Head g of query tile t uses the item's scratch tile t * G + g.
template <class V, class Mask, class KV, class VV>
struct PrefillBlockVisitor {
  const Mask& mask;
  const KV& k;
  const VV& v;
  const PrefillScratch& ws;
  index_t hk, q0, rows, d, dv, g_begin, g_end, mh_of_g0;  // heads g in [g_begin, g_end)
  bool per_head_mask;
  index_t mass_sel0 = 0, mass_nsel = 0;  // key mass: the tile's rows kept (nsel 0: none)
  Products mode = Products::fp32;
  float scale = 1.0f;  // applied to S (bf16 products); fp32 products pre-scale Q

  using TK = std::remove_const_t<typename KV::value_type>;
  using TV = std::remove_const_t<typename VV::value_type>;

  // bf16 pairs: K rows as bf16 (in place when contiguous with an even d), V as pairs.
  void bf16_operands(index_t kb, index_t k0, index_t nk, bool full, BlockOperands& b) const {
    if constexpr (std::is_same_v<TK, bf16> && std::is_same_v<TV, bf16> && V::kHasBf16Dot) {
      // The AMX tiles read K 16 rows at a time: a block of another length is copied, zero-padded.
      const bool amx = mode == Products::bf16_amx;
      bool in_place = false;
      if constexpr (kernel::is_tensor_view<KV>::value) {
        in_place = k.stride_dim == 1 && d % 2 == 0 && (!amx || nk % 16 == 0);
        if (in_place) {
          b.kb = k.row(hk, k0);
          b.ldk = k.stride_token;
        }
      }
      if (!in_place) {
        const index_t d2 = (d + 1) / 2 * 2;
        for (index_t j = 0; j < nk; ++j) {
          bf16* dst = ws.kb + j * d2;
          const bf16* src = k.row(hk, k0 + j);
          for (index_t c = 0; c < d; ++c) dst[c] = src[c * k.stride_dim];
          if (d2 > d) dst[d] = bf16(0.0f);
        }
        if (amx) std::fill(ws.kb + nk * d2, ws.kb + round_up(nk, 16) * d2, bf16(0.0f));
        b.kb = ws.kb;
        b.ldk = d2;
      }
      // V: the call's packed pairs; a partial block whose V holds a NaN or inf gets pairs with
      // those elements zeroed (add_nonfinite adds them back to the rows that may see them).
      const index_t blk = hk * ws.vpack_nkb + kb;
      b.vp = ws.vpack + blk * ws.vpack_words;
      b.v_finite = full || ws.vpack_bad[blk] == 0;
      if (!b.v_finite) {
        auto row = [&](index_t j, bf16* buf) -> const bf16* {
          const bf16* src = v.row(hk, k0 + j);
          for (index_t c = 0; c < dv; ++c) {
            const bf16 x = src[c * v.stride_dim];
            buf[c] = bf16_nonfinite(x) ? bf16(0.0f) : x;
          }
          return buf;
        };
        for (index_t j2 = 0; 2 * j2 < nk; ++j2) {
          const bf16* a = row(2 * j2, ws.vrow);
          const bf16* c = 2 * j2 + 1 < nk ? row(2 * j2 + 1, ws.vrow + ws.dvp) : nullptr;
          V::interleave_rows(a, c, dv, ws.vp + j2 * ws.dvp);
        }
        b.vp = ws.vp;
        if constexpr (V::kHasAmx) {
          if (amx) {  // the tiles' layout: pairs transposed, zero beyond the block
            std::fill(ws.vp + (nk + 1) / 2 * ws.dvp, ws.vp + ws.bkp / 2 * ws.dvp, 0u);
            V::transpose_pairs(ws.vp, ws.dvp, ws.bkp / 2, ws.dvp, ws.vt, ws.bkp / 2);
            b.vp = ws.vt;
          }
        }
      }
    } else {
      static_cast<void>(kb), static_cast<void>(k0), static_cast<void>(nk), static_cast<void>(full),
          static_cast<void>(b);
    }
  }

  // P V of the non-finite V elements a partial block's pairs left out: each allowed row adds
  // its bf16 probability (from the pairs) times the element (corrupt data only).
  SPARSE_ATTN_NOINLINE void add_nonfinite(index_t mh, index_t tq0, index_t trows, index_t k0, index_t nk,
                                          float* ot) const {
    const index_t ldq = ws.ldq;
    for (index_t j = 0; j < nk; ++j)
      for (index_t c = 0; c < dv; ++c) {
        const float x = to_float(v.row(hk, k0 + j)[c * v.stride_dim]);
        if (std::isfinite(x)) continue;
        for (index_t i = 0; i < trows; ++i) {
          if (!mask.allowed_in_block(mh, tq0 + i, k0 + j)) continue;
          const std::uint32_t pair = ws.pp[j / 2 * ldq + i];
          const auto bits = static_cast<std::uint16_t>(j % 2 == 0 ? pair & 0xFFFFu : pair >> 16);
          ot[c * ldq + i] += static_cast<float>(Eigen::numext::bit_cast<bf16>(bits)) * x;
        }
      }
  }

  // Starts loading the next key block's K rows and V (rows, or the packed pairs) while this block
  // computes (the usual next visit: kb + 1): a head's K/V are streamed once per work item from
  // L2 or beyond.
  void prefetch_block(index_t kb1, index_t k1, index_t nk) const {
    const index_t end = std::min(k1 + nk, k.tokens);
    const index_t kbytes = d * static_cast<index_t>(sizeof(TK)), vbytes = dv * static_cast<index_t>(sizeof(TV));
    const bool packed = (mode == Products::bf16_pairs || mode == Products::bf16_amx) && kb1 < ws.vpack_nkb;
    for (index_t j = k1; j < end; ++j) {
      const char* kr = reinterpret_cast<const char*>(k.row(hk, j));
      for (index_t b = 0; b < kbytes; b += 64) __builtin_prefetch(kr + b);
      if (packed) continue;
      const char* vr = reinterpret_cast<const char*>(v.row(hk, j));
      for (index_t b = 0; b < vbytes; b += 64) __builtin_prefetch(vr + b);
    }
    if (packed) {
      const char* p = reinterpret_cast<const char*>(ws.vpack + (hk * ws.vpack_nkb + kb1) * ws.vpack_words);
      const index_t bytes = ws.vpack_words * 4;
      for (index_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
    }
  }

  /// The block's K/V operands; full: the block is full for every tile that will run it.
  BlockOperands operands(index_t kb, bool full) const {
    const MaskShape& ms = mask.shape();
    const index_t k0 = ms.k_begin(kb), nk = ms.k_end(kb) - k0;
    BlockOperands b;
    if (k.stride_dim == 1 && v.stride_dim == 1) prefetch_block(kb + 1, k0 + nk, nk);
    if (mode == Products::bf16_pairs || mode == Products::bf16_amx) {
      bf16_operands(kb, k0, nk, full, b);
    } else {
      b.k = fp32_rows<V>(k, hk, k0, nk, ws.kbuf, b.ldk);
      b.v = fp32_rows<V>(v, hk, k0, nk, ws.vbuf, b.ldv);
      b.v_finite = full || all_finite<V>(b.v, nk, dv, b.ldv);
    }
    return b;
  }

  void operator()(index_t kb, bool full) const { run(operands(kb, full), kb, full, q0, rows, 0); }

  /// Runs key block kb for the heads of the query tile at rows [tq0, tq0 + trows) (scratch tiles
  /// tile0 + g).
  void run(const BlockOperands& b, index_t kb, bool full, index_t tq0, index_t trows, index_t tile0) const {
    const MaskShape& ms = mask.shape();
    const index_t k0 = ms.k_begin(kb), nk = ms.k_end(kb) - k0;
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
      const index_t mh = per_head_mask ? mh_of_g0 + g : 0, u = tile0 + g;
      const HeadTile h{ws.qt + u * d * ldq, ws.qp + u * (ws.dp / 2) * ldq, ws.ot + u * dv * ldq,
                       ws.m + u * ldq, ws.l + u * ldq};
      prefill_block<V>(mask, mh, tq0, trows, k0, nk, full, b, mode, scale, d, dv, ws, h, mass);
      if (!b.v_finite && (mode == Products::bf16_pairs || mode == Products::bf16_amx))
        add_nonfinite(mh, tq0, trows, k0, nk, h.ot);
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

/// Writes a finished tile's rows: out[h][tq0 + i] = Ot[.][i] / l[i] (0 for an empty row), and the
/// LSE m + log l (-inf for an empty row).
template <class OV>
inline void store_tile_rows(const OV& out, LseView lse, index_t h, index_t tq0, index_t trows,
                            const float* ot, const float* m, const float* l, index_t ldq, index_t dv,
                            float* row) {
  for (index_t i = 0; i < trows; ++i) {  // l = 0: empty row; l = NaN: poisoned row
    const float inv = l[i] != 0.0f ? 1.0f / l[i] : 0.0f;
    for (index_t c = 0; c < dv; ++c) row[c] = ot[c * ldq + i] * inv;
    store_row(row, out.row(h, tq0 + i), out.stride_dim, dv);
    if (lse) lse(h, tq0 + i) = l[i] != 0.0f ? m[i] + std::log(l[i]) : -INFINITY;
  }
}

/// Work item (KV head hk, query blocks [qb0, qb0 + tiles)): the G query heads of the group over
/// the blocks' key blocks; writes their output rows (and LSE) when done. Several query blocks
/// (tiles > 1: head-shared masks without key mass, see PrefillPlan) visit their key blocks in
/// one merged pass, so each K/V block is prepared and read once for all of them; each query
/// block still visits its own blocks in its own order, so the bits do not depend on tiles.
/// bf16_products: Precision::bfloat16 (kernel/common.hpp), native or emulated per target.
template <class V, class Mask, class QV, class KV, class VV, class OV>
void prefill_item(const Mask& mask, const QV& q, const KV& k, const VV& v, const OV& out,
                  LseView lse, float scale, bool bf16_products, index_t G, index_t hk, index_t qb0,
                  index_t tiles, const PrefillScratch& ws, const PrefillKeyMass& km) {
  const Products mode = !bf16_products                        ? Products::fp32
                        : V::kHasAmx && amx_shapes(q.dim, v.dim) ? Products::bf16_amx
                        : V::kHasBf16Dot                        ? Products::bf16_pairs
                                                                : Products::bf16_emulated;
  const bool pairs = mode == Products::bf16_pairs || mode == Products::bf16_amx;
  const MaskShape& ms = mask.shape();
  const index_t d = q.dim, dv = v.dim, ldq = ws.ldq;
  tiles = std::min(tiles, ms.num_q_blocks() - qb0);
  const index_t T = tiles * G;  // scratch tiles: (query tile t, head g) -> t * G + g
  const index_t q0 = ms.q_begin(qb0), rows = ms.q_end(qb0) - q0;
  // Key mass (one query tile per item): the tile's rows >= row_begin keep their logits.
  const index_t sel0 = std::min(rows, std::max<index_t>(0, km.row_begin - q0));
  const index_t nsel = km.acc != nullptr && ws.ks != nullptr ? rows - sel0 : 0;
  if (nsel > 0) std::fill(ws.ks_state, ws.ks_state + 2 * G, index_t{0});
  const index_t dp2 = ws.dp / 2;  // pair rows of the bf16 queries
  if (pairs) std::fill(ws.qp, ws.qp + T * dp2 * ldq, 0u);
  else std::fill(ws.qt, ws.qt + T * d * ldq, 0.0f);
  std::fill(ws.ot, ws.ot + T * dv * ldq, 0.0f);
  std::fill(ws.m, ws.m + T * ldq, -INFINITY);
  std::fill(ws.l, ws.l + T * ldq, 0.0f);
  for (index_t u = 0; u < T; ++u) {  // transposed queries: fp32 scaled, or bf16 (pairs)
    const index_t g = u % G, tq0 = ms.q_begin(qb0 + u / G), trows = ms.q_end(qb0 + u / G) - tq0;
    float* qt = ws.qt + u * d * ldq;
    std::uint32_t* qp = ws.qp + u * dp2 * ldq;
    for (index_t i = 0; i < trows; ++i) {
      load_row<V>(q.row(hk * G + g, tq0 + i), q.stride_dim, ws.row, d);
      if (pairs)
        for (index_t c = 0; c < d; c += 2)
          qp[c / 2 * ldq + i] = bf16_bits(ws.row[c]) | (c + 1 < d ? bf16_bits(ws.row[c + 1]) << 16 : 0u);
      else if (mode == Products::bf16_emulated)
        for (index_t c = 0; c < d; ++c) qt[c * ldq + i] = round_bf16(ws.row[c]);
      else
        for (index_t c = 0; c < d; ++c) qt[c * ldq + i] = ws.row[c] * scale;
    }
  }
  using Visitor = PrefillBlockVisitor<V, Mask, KV, VV>;
  auto visit_blocks = [&] {
    if (tiles > 1) {  // head-shared mask: merge the tiles' block lists (ws.tile_blocks)
      const Visitor visit{mask, k, v, ws, hk, q0, rows, d, dv, 0, G, 0, false, 0, 0, mode, scale};
      const index_t nkb = ms.num_k_blocks();
      index_t* lists = ws.tile_blocks;  // [tiles][nkb]: 2 kb + full
      index_t* count = ws.tile_blocks + tiles * nkb;
      index_t* pos = count + tiles;
      for (index_t t = 0; t < tiles; ++t) {
        count[t] = 0;
        pos[t] = 0;
        mask.for_each_block(0, qb0 + t, [&](index_t kb, bool full) { lists[t * nkb + count[t]++] = 2 * kb + (full ? 1 : 0); });
      }
      for (;;) {
        index_t kb = -1;
        bool all_full = true;
        for (index_t t = 0; t < tiles; ++t)
          if (pos[t] < count[t] && (kb < 0 || lists[t * nkb + pos[t]] / 2 < kb)) kb = lists[t * nkb + pos[t]] / 2;
        if (kb < 0) break;
        for (index_t t = 0; t < tiles; ++t)
          if (pos[t] < count[t] && lists[t * nkb + pos[t]] / 2 == kb) all_full = all_full && (lists[t * nkb + pos[t]] & 1);
        const BlockOperands b = visit.operands(kb, all_full);
        for (index_t t = 0; t < tiles; ++t) {
          if (pos[t] >= count[t] || lists[t * nkb + pos[t]] / 2 != kb) continue;
          const index_t tq0 = ms.q_begin(qb0 + t);
          visit.run(b, kb, (lists[t * nkb + pos[t]] & 1) != 0, tq0, ms.q_end(qb0 + t) - tq0, t * G);
          ++pos[t];
        }
      }
    } else if (mask.head_shared()) {  // one K/V conversion per block, reused by the G heads
      const Visitor visit{mask, k, v, ws, hk, q0, rows, d, dv, 0, G, 0, false, sel0, nsel, mode, scale};
      mask.for_each_block(0, qb0, visit);
    } else {
      for (index_t g = 0; g < G; ++g) {
        const Visitor visit{mask, k, v, ws, hk, q0, rows, d, dv, g, g + 1, hk * G, true, sel0, nsel, mode, scale};
        mask.for_each_block(hk * G + g, qb0, visit);
      }
    }
  };
  if constexpr (V::kHasAmx) {
    if (mode == Products::bf16_amx) {
      const typename V::TileScope tile_config;  // this thread's tile configuration for the item
      visit_blocks();
    } else {
      visit_blocks();
    }
  } else {
    visit_blocks();
  }
  if (nsel > 0) prefill_key_mass<V>(ms, k.tokens, G, hk, sel0, nsel, ws, km);
  for (index_t u = 0; u < T; ++u) {  // normalise and store
    const index_t h = hk * G + u % G, tq0 = ms.q_begin(qb0 + u / G), trows = ms.q_end(qb0 + u / G) - tq0;
    const float* ot = ws.ot + u * dv * ldq;
    const float* m = ws.m + u * ldq;
    const float* l = ws.l + u * ldq;
    store_tile_rows(out, lse, h, tq0, trows, ot, m, l, ldq, dv, ws.row);
  }
}

// ---------------------------------------------------------------------------------------------
// Line masks (mask/line_mask.hpp): the vertical lines as gathered dense tiles, the diagonals as
// lane-wise products against transposed K/V. Both feed the one online softmax per row
// (online_softmax_block), so a row's result is that of one softmax over the union of its keys.
// ---------------------------------------------------------------------------------------------

/// The element test of gathered column tiles: slot t (column cols[t]) is visible to query qi iff
/// cols[t] <= qi + q_offset. prefill_block asks it only on the tile holding the causal cut.
struct GatheredColumns {
  const std::int32_t* cols;
  index_t q_offset;
  bool allowed_in_block(index_t, index_t qi, index_t t) const noexcept { return cols[t] <= qi + q_offset; }
};

/// Bits [pos, pos + 64) of a bit array (bit b: word b / 64, bit b % 64), pos >= 0.
inline std::uint64_t bits_at(const std::uint64_t* bits, index_t pos) {
  const index_t w = pos >> 6, r = pos & 63;
  return r == 0 ? bits[w] : (bits[w] >> r) | (bits[w + 1] << (64 - r));
}

/// The element rule of a line-mask tile's dense blocks (band windows and the key-block
/// fallback) as 64-bit lane masks. For query lane i at position p = p0 + i and key j, with
/// delta = p - j, the pair is an offset pair iff bit delta + kLineWindow of off_bits is set
/// (off_bits is 0 below that bias, so delta < 0, i.e. j > p, is never set): key j's lanes are
/// bits [p0 - j + kLineWindow, + 64) of off_bits, one shifted read. A column key j is either
/// seen causally by every lane (lanes i >= j - p0; with_columns: the fallback, which has no
/// gathered tiles) or by none (the band windows: the gathered column tiles already count it,
/// so each pair is counted once).
struct LineBandMask {
  const std::uint64_t* off_bits;
  const std::uint8_t* cols;
  index_t q_offset;
  bool with_columns;
  /// Lanes of key kj for the tile whose lane 0 is query q0 (bit i: query q0 + i).
  std::uint64_t lanes(index_t q0, index_t kj) const noexcept {
    const index_t p0 = q0 + q_offset;
    if (kj - p0 >= 64) return 0;  // after every lane's position
    if (cols[kj] == 0) return bits_at(off_bits, p0 - kj + kLineWindow);  // bit position >= 1
    if (!with_columns) return 0;
    return kj <= p0 ? ~std::uint64_t{0} : kj - p0 >= 64 ? 0 : ~std::uint64_t{0} << (kj - p0);
  }
  bool allowed_in_block(index_t, index_t qi, index_t kj) const noexcept {
    const index_t delta = qi + q_offset - kj;
    if (delta < 0) return false;
    return cols[kj] != 0 ? with_columns : ((off_bits[(delta + kLineWindow) >> 6] >> ((delta + kLineWindow) & 63)) & 1) != 0;
  }
  /// Sets the logits s[j][i] of the disallowed pairs (i < rows <= 64) of keys k0 + j to -inf.
  void mask_block(float* s, index_t ldq, index_t q0, index_t rows, index_t k0, index_t nk) const noexcept {
    const std::uint64_t pad = rows >= 64 ? 0 : ~std::uint64_t{0} << rows;  // lanes left alone
    for (index_t j = 0; j < nk; ++j) {
      const std::uint64_t w = lanes(q0, k0 + j) | pad;
      if (w == ~std::uint64_t{0}) continue;
      float* row = s + j * ldq;
      for (index_t i0 = 0; i0 < 64; i0 += 16) {
        const auto c = static_cast<std::uint32_t>((w >> i0) & 0xFFFFu);
        if (c == 0xFFFFu) continue;
        for (index_t i = 0; i < 16; ++i)
          row[i0 + i] = ((c >> i) & 1u) != 0 ? row[i0 + i] : -INFINITY;
      }
    }
  }
};

/// Calls f(std::integral_constant<int, n>) for a run-time n in [1, N].
template <int N, class Fn>
inline void with_static_count(index_t n, Fn&& f) {
  if constexpr (N >= 1) {
    if (n == N) f(std::integral_constant<int, N>{});
    else with_static_count<N - 1>(n, f);
  }
}

/// Where packet v (keys b .. b + kLanes - 1, b = its first key >= -kLineStep) lies in the
/// transposed tiles of LineOperands, for a tile of `dims` rows: its tile's offset plus its column.
inline index_t line_tile_offset(index_t b, index_t dims) {
  const index_t x = b + kLineStep, T = x / kLineStep;
  return T * dims * kLineTileKeys + (x - T * kLineStep);
}

/// Diagonal logits: S[t][i] = sum_c Qt[c][i] K[key_t(i)][c] for slots t < NT and the lanes
/// [0, VV kLanes), where packet v of slot t's keys (on its diagonal) starts at kt[at[t ldat + v]]
/// with dims kLineTileKeys apart: each product is a vector times a vector, with no gather.
template <class V, int NT, int VV>
inline void diagonal_qk(const float* qt, index_t ldq, const float* kt, const index_t* at, index_t ldat,
                        index_t d, float* s) {
  Packets2<V, NT, VV> acc;
  const float* kr[static_cast<std::size_t>(NT)][static_cast<std::size_t>(VV)];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < VV; ++v) {
      acc[t][v] = V::zero();
      kr[t][v] = kt + at[t * ldat + v];
    }
  for (index_t c = 0; c < d; ++c) {
    Packets<V, VV> qv;
    for (int v = 0; v < VV; ++v) qv[v] = V::load(qt + c * ldq + v * V::kLanes);
    for (int t = 0; t < NT; ++t)
      for (int v = 0; v < VV; ++v) acc[t][v] = V::fmadd(qv[v], V::loadu(kr[t][v] + c * kLineTileKeys), acc[t][v]);
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < VV; ++v) V::store(s + t * ldq + v * V::kLanes, acc[t][v]);
}

/// Diagonal P V: Ot[c][i] += sum_{t < nt} P[t][i] V[key_t(i)][c] for dims [c0, c0 + NC) and the
/// lanes [0, VV kLanes) (transposed V tiles, addressed as in diagonal_qk).
template <class V, int NC, int VV>
inline void diagonal_pv(const float* p, index_t ldq, index_t nt, const float* vt, const index_t* at,
                        index_t ldat, index_t c0, float* ot) {
  Packets2<V, NC, VV> acc;
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < VV; ++v) acc[c][v] = V::load(ot + (c0 + c) * ldq + v * V::kLanes);
  for (index_t t = 0; t < nt; ++t) {
    Packets<V, VV> pv;
    for (int v = 0; v < VV; ++v) pv[v] = V::load(p + t * ldq + v * V::kLanes);
    for (int v = 0; v < VV; ++v) {
      const float* vr = vt + at[t * ldat + v] + c0 * kLineTileKeys;
      for (int c = 0; c < NC; ++c) acc[c][v] = V::fmadd(pv[v], V::loadu(vr + c * kLineTileKeys), acc[c][v]);
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < VV; ++v) V::store(ot + (c0 + c) * ldq + v * V::kLanes, acc[c][v]);
}

/// Line-mask work item: query head h, query rows [q0, q0 + nrows) in tiles of kMaxTileQ (at most
/// kLineTiles; tile r uses scratch tile r; positions p = qi + q_offset). Vertical lines, per tile:
/// the gathered columns <= p, `chunk` at a time; tiles of columns <= the tile's first position
/// are full (no test), the rest take the causal cut. Band windows (LineOperands): each dense
/// window m as one block of keys [p0 - m W, p0 - m W + W) cut to [0, p1], bit-masked
/// (LineBandMask, column keys excluded). Residual diagonals: the offsets <= the tile's last
/// position with a lane outside dense windows, kLineSlots at a time, each group for every tile
/// before the next group; lane i of slot t reads key p_i - delta_t, masked when that key is < 0,
/// one of the columns (already counted) or in a dense window (already counted). A tile whose
/// lines would cost more than its whole prefix runs as the prefix's key blocks holding a pair,
/// bit-masked with the columns included. fp32 products, or the bf16 products emulated (Q and P rounded to bf16, the scale
/// after the sum), as Products describes.
template <class V, class QV, class KV, class VV, class OV>
void lines_item(const LineOperands& lo, index_t chunk, const QV& q, const KV& k, const VV& v,
                const OV& out, LseView lse, float scale, bool bf16_products, index_t h, index_t q0,
                index_t nrows, const PrefillScratch& ws) {
  const Products mode = bf16_products ? Products::bf16_emulated : Products::fp32;
  const index_t d = q.dim, dv = out.dim, ldq = ws.ldq;
  const index_t ntiles = (nrows + kMaxTileQ - 1) / kMaxTileQ;
  float* s = ws.s;
  auto tile_of = [&](index_t r) {
    return HeadTile{ws.qt + r * d * ldq, ws.qp, ws.ot + r * dv * ldq, ws.m + r * ldq, ws.l + r * ldq};
  };
  auto rows_of = [&](index_t r) { return std::min(kMaxTileQ, nrows - r * kMaxTileQ); };
  const GatheredColumns gathered{lo.cols, lo.q_offset};
  index_t nslots[kLineTiles];
  for (index_t r = 0; r < ntiles; ++r) {
    const HeadTile tile = tile_of(r);
    const index_t tq0 = q0 + r * kMaxTileQ, rows = rows_of(r);
    std::fill(tile.qt, tile.qt + d * ldq, 0.0f);
    std::fill(tile.ot, tile.ot + dv * ldq, 0.0f);
    std::fill(tile.m, tile.m + ldq, -INFINITY);
    std::fill(tile.l, tile.l + ldq, 0.0f);
    for (index_t i = 0; i < rows; ++i) {
      load_row<V>(q.row(h, tq0 + i), q.stride_dim, ws.row, d);
      for (index_t c = 0; c < d; ++c)
        tile.qt[c * ldq + i] = mode == Products::bf16_emulated ? round_bf16(ws.row[c]) : ws.row[c] * scale;
    }
    // Vertical lines.
    const index_t p0 = tq0 + lo.q_offset, p1 = p0 + rows - 1;
    const index_t nfull = std::upper_bound(lo.cols, lo.cols + lo.ncols, p0) - lo.cols;
    const index_t nvis = std::upper_bound(lo.cols, lo.cols + lo.ncols, p1) - lo.cols;
    auto columns = [&](index_t t0, index_t t1, bool full) {
      for (index_t t = t0; t < t1; t += chunk) {
        const index_t nk = std::min(chunk, t1 - t);
        BlockOperands b;
        b.k = lo.kg + t * d;
        b.ldk = d;
        b.v = lo.vg + t * dv;
        b.ldv = dv;
        b.v_finite = full || all_finite<V>(b.v, nk, dv, dv);
        prefill_block<V>(gathered, 0, tq0, rows, t, nk, full, b, mode, scale, d, dv, ws, tile, MassRows{});
      }
    };
    nslots[r] = std::upper_bound(lo.res_offs, lo.res_offs + lo.nres, p1) - lo.res_offs;
    // Band windows reaching a key >= 0 (p0 - m W + W > 0), and how many of them run dense.
    const index_t wend = std::min(lo.windows, (p0 + kLineWindow - 1) / kLineWindow + 1);
    index_t ndense = 0;
    for (index_t m = 0; m < wend; ++m) ndense += lo.dense[m];
    // Costs in dense pairs: a gathered column pair and a band window pair about 1, a residual
    // diagonal pair about 3 (its own K and V row). A tile whose lines cover much of its prefix
    // runs instead as the key blocks of the prefix that hold one of its pairs, bit-masked.
    const index_t by_lines = kMaxTileQ * (nvis + kLineWindow * ndense + 3 * nslots[r]);
    if (kMaxTileQ * (p1 + 1) <= by_lines) {
      const LineBandMask all{lo.off_bits, lo.col_flags, lo.q_offset, true};
      for (index_t k0 = 0; k0 <= p1 && k0 < lo.n_k; k0 += chunk) {
        const index_t k1 = std::min({lo.n_k, k0 + chunk, p1 + 1});  // keys > p1: no pair
        if (!(std::upper_bound(lo.cols, lo.cols + lo.ncols, std::min(k1 - 1, p1)) >
                  std::lower_bound(lo.cols, lo.cols + lo.ncols, k0) ||
              std::upper_bound(lo.offs, lo.offs + lo.noffs, p1 - k0) >
                  std::lower_bound(lo.offs, lo.offs + lo.noffs, std::max<index_t>(0, p0 - k1 + 1))))
          continue;  // no pair of the tile in this block
        BlockOperands b;
        b.k = fp32_rows<V>(k, lo.hk, k0, k1 - k0, ws.kbuf, b.ldk);
        b.v = fp32_rows<V>(v, lo.hk, k0, k1 - k0, ws.vbuf, b.ldv);
        b.v_finite = lo.v_finite;
        prefill_block<V>(all, 0, tq0, rows, k0, k1 - k0, false, b, mode, scale, d, dv, ws, tile, MassRows{});
      }
      nslots[r] = 0;
      continue;
    }
    columns(0, nfull, true);
    columns(nfull, nvis, false);
    // Dense band windows: keys [p0 - m W, p0 - m W + W) cut to [0, p1], the offset pairs of
    // non-column keys (bit-masked); their diagonals' other lanes are the residual ones.
    const LineBandMask band{lo.off_bits, lo.col_flags, lo.q_offset, false};
    for (index_t m = 0; m < wend; ++m) {
      if (lo.dense[m] == 0) continue;
      const index_t k0 = std::max<index_t>(0, p0 - m * kLineWindow);
      const index_t k1 = std::min(p1 + 1, p0 - m * kLineWindow + kLineWindow);
      if (k1 <= k0) continue;
      BlockOperands b;
      b.k = fp32_rows<V>(k, lo.hk, k0, k1 - k0, ws.kbuf, b.ldk);
      b.v = fp32_rows<V>(v, lo.hk, k0, k1 - k0, ws.vbuf, b.ldv);
      b.v_finite = lo.v_finite;
      prefill_block<V>(band, 0, tq0, rows, k0, k1 - k0, false, b, mode, scale, d, dv, ws, tile, MassRows{});
    }
  }

  // Diagonals.
  constexpr index_t kPk = kMaxTileQ / V::kLanes;  // packets of a tile
  index_t base[static_cast<std::size_t>(kLineSlots)], kat[static_cast<std::size_t>(kLineSlots * kPk)],
      vat[static_cast<std::size_t>(kLineSlots * kPk)];
  const index_t most = *std::max_element(nslots, nslots + ntiles);
  for (index_t t0 = 0; t0 < most; t0 += kLineSlots) {
    for (index_t r = 0; r < ntiles; ++r) {
      const index_t nt = std::min(kLineSlots, nslots[r] - t0);
      if (nt <= 0) continue;
      const HeadTile tile = tile_of(r);
      const index_t rows = rows_of(r), width = round_up(rows, V::kLanes);
      const index_t p0 = q0 + r * kMaxTileQ + lo.q_offset;
      for (index_t t = 0; t < nt; ++t) {
        base[t] = p0 - lo.res_offs[t0 + t];  // lane 0's key
        for (index_t pk = 0; pk < width / V::kLanes; ++pk) {
          kat[t * kPk + pk] = line_tile_offset(base[t] + pk * V::kLanes, d);
          vat[t * kPk + pk] = line_tile_offset(base[t] + pk * V::kLanes, dv);
        }
      }
      // Lanes in groups of up to 4 packets, slots 4 at a time: 16 accumulators.
      for (index_t i = 0; i < width; i += 4 * V::kLanes)
        with_static_count<4>(std::min<index_t>(4, (width - i) / V::kLanes), [&](auto vv) {
          for (index_t t = 0; t < nt; t += 4)
            with_static_count<4>(std::min<index_t>(4, nt - t), [&](auto n) {
              diagonal_qk<V, decltype(n)::value, decltype(vv)::value>(
                  tile.qt + i, ldq, lo.ktiles, kat + t * kPk + i / V::kLanes, kPk, d, s + t * ldq + i);
            });
        });
      for (index_t t = 0; t < nt; ++t) {
        float* st = s + t * ldq;
        const std::uint64_t lanes = lo.res_lanes[t0 + t];  // those outside dense windows
        if (mode == Products::bf16_emulated)  // the scale multiplies the sum of bf16 products
          for (index_t i = 0; i < width; ++i) st[i] *= scale;
        for (index_t i = 0; i < width; ++i) {
          const index_t j = base[t] + i;  // i < rows: j <= p_i < n_k
          if (!(i < rows && j >= 0 && lo.col_flags[j] == 0 && ((lanes >> i) & 1) != 0)) st[i] = -INFINITY;
        }
      }
      online_softmax_block<V>(s, ldq, nt, width, false, mode, ws, tile.m, tile.l, tile.ot, dv);
      if (mode == Products::bf16_emulated)
        for (index_t t = 0; t < nt; ++t)
          for (index_t i = 0; i < width; ++i) s[t * ldq + i] = round_bf16(s[t * ldq + i]);
      if (lo.v_finite) {
        for (index_t i = 0; i < width; i += 4 * V::kLanes)
          with_static_count<4>(std::min<index_t>(4, (width - i) / V::kLanes), [&](auto vv) {
            for (index_t c = 0; c < dv; c += 4)
              with_static_count<4>(std::min<index_t>(4, dv - c), [&](auto n) {
                diagonal_pv<V, decltype(n)::value, decltype(vv)::value>(
                    s + i, ldq, nt, lo.vtiles, vat + i / V::kLanes, kPk, c, tile.ot + i);
              });
          });
      } else {  // corrupt data only: a masked pair's 0 x inf must not reach the row
        for (index_t t = 0; t < nt; ++t)
          for (index_t i = 0; i < rows; ++i) {
            const index_t j = base[t] + i;
            if (j < 0 || lo.col_flags[j] != 0 || ((lo.res_lanes[t0 + t] >> i) & 1) == 0) continue;
            const float* vr = lo.vtiles + line_tile_offset(j, dv);
            for (index_t c = 0; c < dv; ++c) tile.ot[c * ldq + i] += s[t * ldq + i] * vr[c * kLineTileKeys];
          }
      }
    }
  }
  for (index_t r = 0; r < ntiles; ++r) {
    const HeadTile tile = tile_of(r);
    store_tile_rows(out, lse, h, q0 + r * kMaxTileQ, rows_of(r), tile.ot, tile.m, tile.l, ldq, dv, ws.row);
  }
}

#include "sparse_attn/arch/detail/decode_body-inl.hpp"

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
                           LseView lse, float scale, bool bf16_products, index_t G, index_t hk,
                           index_t qb, index_t tiles, const PrefillScratch& ws, const PrefillKeyMass& km) {
    body::prefill_item<Vec>(mask, q, k, v, out, lse, scale, bf16_products, G, hk, qb, tiles, ws, km);
  }

  /// One line-mask prefill item (body::lines_item): query head h, rows [q0, q0 + rows), at most
  /// kLineTiles tiles of kMaxTileQ.
  template <class QV, class KV, class VV, class OV>
  static void prefill_lines_item(const LineOperands& lo, index_t chunk, const QV& q, const KV& k,
                                 const VV& v, const OV& out, LseView lse, float scale,
                                 bool bf16_products, index_t h, index_t q0, index_t rows,
                                 const PrefillScratch& ws) {
    body::lines_item<Vec>(lo, chunk, q, k, v, out, lse, scale, bf16_products, h, q0, rows, ws);
  }

  /// Whether this target computes bf16 products natively (else Precision::bfloat16 is emulated).
  static constexpr bool bf16_dot() { return Vec::kHasBf16Dot; }

  /// Packs one key block of V for the prefill's bf16 products (head dim d of Q and K): pairs
  /// (body::pack_v_pairs), transposed for the AMX tiles where the item will use them. True
  /// when the block holds an inf or NaN. ws: the calling worker's scratch.
  template <class VV>
  static bool pack_v_pairs(const VV& v, index_t d, index_t hk, index_t k0, index_t nk,
                           const PrefillScratch& ws, std::uint32_t* dst) {
    return body::pack_v<Vec>(v, d, hk, k0, nk, ws, dst);
  }

  template <class QV, class KV, class VV>
  static void decode_item(const QV& q, const KV& k, const VV& v, float scale, bool causal,
                          index_t R, bool bf16_products, const DecodeScratch& ws, index_t hk, index_t h0,
                          const KeyRange* rb, const KeyRange* re, index_t skip, index_t count,
                          DecodePartial out) {
    body::DecodeItemRunner<Vec, QV, KV, VV> runner(q, k, v, scale, causal, R, bf16_products, ws);
    runner.run(hk, h0, rb, re, skip, count, out);
  }

  /// map[c] = natural output dim of position c of a decode partial row (c < padded dv).
  template <class QV, class KV, class VV>
  static void decode_out_dims(const QV& q, const KV& k, const VV& v, bool bf16_products,
                              const DecodeScratch& ws, index_t* map) {
    const body::DecodeItemRunner<Vec, QV, KV, VV> runner(q, k, v, 1.0f, false, 1, bf16_products, ws);
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
