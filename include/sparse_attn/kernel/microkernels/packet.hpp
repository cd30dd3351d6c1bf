// Register-blocked fp32 micro-kernels for the tiled kernels, written once over Eigen's packet
// abstraction: the includer's -march picks AVX-512 (16 lanes, 32 registers), AVX2 (8 lanes) or
// SSE (4 lanes) at compile time.
//
// Layout trick: queries are kept transposed (Qt[c][i], i = query within the tile), so every product
// is "broadcast one K or V element, multiply a vector of queries": no horizontal reductions, and
// the online-softmax row max / row sum become vertical operations over key rows.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/dtype.hpp"  // includes Eigen/Core inside the PR 105593 guard
#include <algorithm>
#include <cstdint>
#include <type_traits>

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kernel::mk {

using Packet = Eigen::internal::packet_traits<float>::type;
inline constexpr int kLanes = static_cast<int>(sizeof(Packet) / sizeof(float));
#if defined(__AVX512F__)
inline constexpr int kVecs = 4;  // query vectors per micro-tile (64 queries)
inline constexpr int kRows = 6;  // key rows (QK) or output dims (PV) per micro-tile: 24 accumulators
#else
inline constexpr int kVecs = 2;
inline constexpr int kRows = 6;
#endif
inline constexpr int kTileQ = kVecs * kLanes;  // queries covered by one micro-tile

using Eigen::internal::padd;
using Eigen::internal::pload;
using Eigen::internal::pmadd;
using Eigen::internal::pmax;
using Eigen::internal::pmul;
using Eigen::internal::pset1;
using Eigen::internal::pstore;
using Eigen::internal::psub;

/// S[j][i] = sum_c K[j][c] * Qt[c][i] for j < NJ, i < V * kLanes.
/// qt: [d][ldq] (aligned), k: rows of length d with stride ldk, s: [NJ][lds] (aligned).
template <int NJ, int V = kVecs>
inline void qk_tile(const float* qt, std::int64_t ldq, const float* k, std::int64_t ldk, int d,
                    float* s, std::int64_t lds) {
  Packet acc[NJ][V];
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = pset1<Packet>(0.0f);
  for (int c = 0; c < d; ++c) {
    Packet qv[V];
    for (int v = 0; v < V; ++v) qv[v] = pload<Packet>(qt + c * ldq + v * kLanes);
    for (int j = 0; j < NJ; ++j) {
      const Packet b = pset1<Packet>(k[j * ldk + c]);
      for (int v = 0; v < V; ++v) acc[j][v] = pmadd(qv[v], b, acc[j][v]);
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < V; ++v) pstore(s + j * lds + v * kLanes, acc[j][v]);
}

/// Ot[c][i] += sum_j V[j][c] * P[j][i] for c in [c0, c0 + NC), i < V * kLanes, j < nk.
template <int NC, int V = kVecs>
inline void pv_tile(const float* p, std::int64_t ldp, int nk, const float* vmat, std::int64_t ldv,
                    int c0, float* ot, std::int64_t ldo) {
  Packet acc[NC][V];
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < V; ++v) acc[c][v] = pload<Packet>(ot + (c0 + c) * ldo + v * kLanes);
  for (int j = 0; j < nk; ++j) {
    Packet pv[V];
    for (int v = 0; v < V; ++v) pv[v] = pload<Packet>(p + j * ldp + v * kLanes);
    const float* vr = vmat + j * ldv + c0;
    for (int c = 0; c < NC; ++c) {
      const Packet b = pset1<Packet>(vr[c]);
      for (int v = 0; v < V; ++v) acc[c][v] = pmadd(pv[v], b, acc[c][v]);
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < V; ++v) pstore(ot + (c0 + c) * ldo + v * kLanes, acc[c][v]);
}

/// S[j][i] for all nk keys (kRows at a time, remainder by smaller tiles), i < V * kLanes.
template <int V = kVecs>
inline void qk_block(const float* qt, std::int64_t ldq, const float* k, std::int64_t ldk, int nk,
                     int d, float* s, std::int64_t lds) {
  int j = 0;
  for (; j + kRows <= nk; j += kRows)
    qk_tile<kRows, V>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds);
  switch (nk - j) {
    case 5: qk_tile<5, V>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 4: qk_tile<4, V>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 3: qk_tile<3, V>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 2: qk_tile<2, V>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    case 1: qk_tile<1, V>(qt, ldq, k + j * ldk, ldk, d, s + j * lds, lds); break;
    default: break;
  }
  static_assert(kRows == 6, "remainder switch assumes kRows == 6");
}

/// Ot[c][i] += sum_j V[j][c] P[j][i] for all d output dims, i < V * kLanes.
template <int V = kVecs>
inline void pv_block(const float* p, std::int64_t ldp, int nk, const float* vmat, std::int64_t ldv,
                     int d, float* ot, std::int64_t ldo) {
  int c = 0;
  for (; c + kRows <= d; c += kRows) pv_tile<kRows, V>(p, ldp, nk, vmat, ldv, c, ot, ldo);
  switch (d - c) {
    case 5: pv_tile<5, V>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 4: pv_tile<4, V>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 3: pv_tile<3, V>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 2: pv_tile<2, V>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    case 1: pv_tile<1, V>(p, ldp, nk, vmat, ldv, c, ot, ldo); break;
    default: break;
  }
}

/// Covers `rows` transposed queries with micro-tiles: calls f(t, std::integral_constant<int, V>)
/// for full tiles (V = kVecs vectors, kTileQ queries from column t), then once for the rest with
/// the fewest vectors that hold it. A lane's arithmetic does not depend on V, so the result bits
/// are the same as with full tiles; short query blocks (block_q < kTileQ, the last block of a
/// sequence) just skip the padding lanes.
template <class F>
inline void for_each_tile(std::int64_t rows, F&& f) {
  std::int64_t t = 0;
  for (; t + kTileQ <= rows; t += kTileQ) f(t, std::integral_constant<int, kVecs>{});
  if (t >= rows) return;
  const std::int64_t vecs = (rows - t + kLanes - 1) / kLanes;
#if defined(__AVX512F__)
  static_assert(kVecs == 4, "tail switch assumes kVecs == 4");
  switch (vecs) {
    case 1: f(t, std::integral_constant<int, 1>{}); break;
    case 2: f(t, std::integral_constant<int, 2>{}); break;
    case 3: f(t, std::integral_constant<int, 3>{}); break;
    default: f(t, std::integral_constant<int, 4>{}); break;
  }
#else
  static_assert(kVecs == 2, "tail switch assumes kVecs == 2");
  if (vecs == 1) f(t, std::integral_constant<int, 1>{});
  else f(t, std::integral_constant<int, 2>{});
#endif
}

}  // namespace kernel::mk
SPARSE_ATTN_NAMESPACE_END
