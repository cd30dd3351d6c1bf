// AMX (Advanced Matrix Extensions, Sapphire Rapids and later) bf16 tile micro-kernels for the
// flash-attention prefill: S = scale K Q^T and Ot += V^T P on 16 x 16 fp32 tiles.
//
// AMX has eight tile registers tmm0..tmm7 of up to 16 rows x 64 bytes and one multiply,
//   tdpbf16ps C, A, B:  C[m][n] += sum_{k < 16} A[m][2k] B[k][n].lo + A[m][2k+1] B[k][n].hi
// with A a 16 x 32 bf16 tile, B a 16 x 16 tile of bf16 pairs ("VNNI" layout: B's row k holds the
// pair rows 2k and 2k+1 of the logical 32 x 16 matrix, interleaved) and C 16 x 16 fp32: 8192
// products per instruction, one issued every 16 cycles, 8x the rate of two AVX-512 vdpbf16ps a
// cycle. The products of two bf16 are exact in fp32, so the only rounding is the fp32
// accumulation (as in vdpbf16ps; input and output denormals are flushed to zero).
//   qk: C = 16 keys x 16 queries, A = 16 key rows of K (bf16 as stored), B = Q^T as pairs (qp).
//   pv: C = 16 dims x 16 queries of Ot, A = 16 rows of V^T (vt, made by transpose_pairs), B = P as
//       pairs (pp).
// Both keep 2 x 2 C tiles (32 x 32 outputs) live, with two A and two B tiles feeding them: four
// multiplies per four tile loads.
//
// The tile instructions are written as inline assembly, not the intrinsics, on both compilers:
// GCC 12's _tile_loadd and _tile_loadconfig are asm statements that tell the compiler they read
// no memory (resp. 8 bytes of the 64-byte config), so stores to the buffers a tile is loaded
// from may legally be moved after the load; clang's builtins are fine but need the amx target on
// every caller. The assembly here declares its memory effects and takes the tile numbers as
// template arguments (%c: an immediate printed without '$'); AT&T and Intel dialects are both
// given so -masm=intel includers assemble too.
//
// Use: cpu_has_amx_bf16() once (it also obtains the Linux permission), then per thread and work
// item a TileScope, inside which qk / pv run. transpose_pairs needs only the avx512 target
// (cpu_supports(CpuTarget::avx512)).
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/arch/detail/target_region.hpp"

#if SPARSE_ATTN_X86_TARGETS
#include <immintrin.h>

#include <cstdint>


#include "sparse_attn/arch/avx512/vec.hpp"  // SPARSE_ATTN_AVX512_ISA
#include "sparse_attn/arch/target.hpp"
#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/tensor.hpp"

// ---- Transposes: the avx512 target's ISA (AVX-512 F instructions only), no AMX ---------------
SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA)
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::amx {

namespace detail {
/// The transpose of the 16 x 16 matrix of 32-bit words x (rows r0..r15), in four rounds, each
/// interleaving pairs of rows at twice the previous granularity: words (unpack epi32), word pairs
/// (unpack epi64), 128-bit lanes and pairs of lanes (shuffle_i32x4): 64 shuffles for 256 words.
/// Written out in full so the 16 rows stay in registers (as loops over an array, GCC 12 at -O2
/// neither unrolls nor inlines it and goes through the stack: 4x slower).
struct Rows16 {
  __m512i r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15;
};
__attribute__((always_inline)) inline Rows16 transpose16x16_epi32(const Rows16& x) {
  // Per 128-bit lane l, rows a, b: lo = a[4l] b[4l] a[4l+1] b[4l+1], hi = the next two columns.
  const __m512i a0 = _mm512_unpacklo_epi32(x.r0, x.r1), a1 = _mm512_unpackhi_epi32(x.r0, x.r1);
  const __m512i a2 = _mm512_unpacklo_epi32(x.r2, x.r3), a3 = _mm512_unpackhi_epi32(x.r2, x.r3);
  const __m512i a4 = _mm512_unpacklo_epi32(x.r4, x.r5), a5 = _mm512_unpackhi_epi32(x.r4, x.r5);
  const __m512i a6 = _mm512_unpacklo_epi32(x.r6, x.r7), a7 = _mm512_unpackhi_epi32(x.r6, x.r7);
  const __m512i a8 = _mm512_unpacklo_epi32(x.r8, x.r9), a9 = _mm512_unpackhi_epi32(x.r8, x.r9);
  const __m512i a10 = _mm512_unpacklo_epi32(x.r10, x.r11), a11 = _mm512_unpackhi_epi32(x.r10, x.r11);
  const __m512i a12 = _mm512_unpacklo_epi32(x.r12, x.r13), a13 = _mm512_unpackhi_epi32(x.r12, x.r13);
  const __m512i a14 = _mm512_unpacklo_epi32(x.r14, x.r15), a15 = _mm512_unpackhi_epi32(x.r14, x.r15);
  // b[4g + w], lane l: column 4l + w of rows 4g..4g+3.
  const __m512i b0 = _mm512_unpacklo_epi64(a0, a2), b1 = _mm512_unpackhi_epi64(a0, a2);
  const __m512i b2 = _mm512_unpacklo_epi64(a1, a3), b3 = _mm512_unpackhi_epi64(a1, a3);
  const __m512i b4 = _mm512_unpacklo_epi64(a4, a6), b5 = _mm512_unpackhi_epi64(a4, a6);
  const __m512i b6 = _mm512_unpacklo_epi64(a5, a7), b7 = _mm512_unpackhi_epi64(a5, a7);
  const __m512i b8 = _mm512_unpacklo_epi64(a8, a10), b9 = _mm512_unpackhi_epi64(a8, a10);
  const __m512i b10 = _mm512_unpacklo_epi64(a9, a11), b11 = _mm512_unpackhi_epi64(a9, a11);
  const __m512i b12 = _mm512_unpacklo_epi64(a12, a14), b13 = _mm512_unpackhi_epi64(a12, a14);
  const __m512i b14 = _mm512_unpacklo_epi64(a13, a15), b15 = _mm512_unpackhi_epi64(a13, a15);
  // Lanes 0, 2 (0x88) or 1, 3 (0xdd) of groups g and g + 1: c[w] = columns w, 8 + w of rows 0-7
  // (lanes: rows 0-3, rows 0-3, rows 4-7, rows 4-7), c[4 + w] = columns 4 + w, 12 + w; c[8..15]
  // the same for rows 8-15.
  const __m512i c0 = _mm512_shuffle_i32x4(b0, b4, 0x88), c4 = _mm512_shuffle_i32x4(b0, b4, 0xdd);
  const __m512i c1 = _mm512_shuffle_i32x4(b1, b5, 0x88), c5 = _mm512_shuffle_i32x4(b1, b5, 0xdd);
  const __m512i c2 = _mm512_shuffle_i32x4(b2, b6, 0x88), c6 = _mm512_shuffle_i32x4(b2, b6, 0xdd);
  const __m512i c3 = _mm512_shuffle_i32x4(b3, b7, 0x88), c7 = _mm512_shuffle_i32x4(b3, b7, 0xdd);
  const __m512i c8 = _mm512_shuffle_i32x4(b8, b12, 0x88), c12 = _mm512_shuffle_i32x4(b8, b12, 0xdd);
  const __m512i c9 = _mm512_shuffle_i32x4(b9, b13, 0x88), c13 = _mm512_shuffle_i32x4(b9, b13, 0xdd);
  const __m512i c10 = _mm512_shuffle_i32x4(b10, b14, 0x88), c14 = _mm512_shuffle_i32x4(b10, b14, 0xdd);
  const __m512i c11 = _mm512_shuffle_i32x4(b11, b15, 0x88), c15 = _mm512_shuffle_i32x4(b11, b15, 0xdd);
  // Column w: lanes 0, 2 of c[w] and c[8 + w]; column 8 + w: lanes 1, 3.
  return {_mm512_shuffle_i32x4(c0, c8, 0x88),  _mm512_shuffle_i32x4(c1, c9, 0x88),
          _mm512_shuffle_i32x4(c2, c10, 0x88), _mm512_shuffle_i32x4(c3, c11, 0x88),
          _mm512_shuffle_i32x4(c4, c12, 0x88), _mm512_shuffle_i32x4(c5, c13, 0x88),
          _mm512_shuffle_i32x4(c6, c14, 0x88), _mm512_shuffle_i32x4(c7, c15, 0x88),
          _mm512_shuffle_i32x4(c0, c8, 0xdd),  _mm512_shuffle_i32x4(c1, c9, 0xdd),
          _mm512_shuffle_i32x4(c2, c10, 0xdd), _mm512_shuffle_i32x4(c3, c11, 0xdd),
          _mm512_shuffle_i32x4(c4, c12, 0xdd), _mm512_shuffle_i32x4(c5, c13, 0xdd),
          _mm512_shuffle_i32x4(c6, c14, 0xdd), _mm512_shuffle_i32x4(c7, c15, 0xdd)};
}
}  // namespace detail

/// vt[c * ldvt + jp] = vp[jp * ldvp + c] for jp < npairs, c < dv: the V block as key pairs
/// (vp[jp][c] = (V[2jp][c], V[2jp+1][c])) turned into V^T as pairs, the A operand of pv.
/// Preconditions: npairs % 16 == 0, dv % 16 == 0; no alignment needed (64-byte rows are faster).
inline void transpose_pairs(const std::uint32_t* vp, index_t ldvp, index_t npairs, index_t dv,
                            std::uint32_t* vt, index_t ldvt) {
  for (index_t j0 = 0; j0 < npairs; j0 += 16)
    for (index_t c0 = 0; c0 < dv; c0 += 16) {
      const std::uint32_t* src = vp + j0 * ldvp + c0;
      const auto row = [&](int i) { return _mm512_loadu_si512(src + i * ldvp); };
      const detail::Rows16 t = detail::transpose16x16_epi32(
          {row(0), row(1), row(2), row(3), row(4), row(5), row(6), row(7), row(8), row(9),
           row(10), row(11), row(12), row(13), row(14), row(15)});
      std::uint32_t* dst = vt + c0 * ldvt + j0;
      const auto put = [&](int i, __m512i x) { _mm512_storeu_si512(dst + i * ldvt, x); };
      put(0, t.r0), put(1, t.r1), put(2, t.r2), put(3, t.r3), put(4, t.r4), put(5, t.r5);
      put(6, t.r6), put(7, t.r7), put(8, t.r8), put(9, t.r9), put(10, t.r10), put(11, t.r11);
      put(12, t.r12), put(13, t.r13), put(14, t.r14), put(15, t.r15);
    }
}

}  // namespace arch::amx
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
SPARSE_ATTN_DIAGNOSTICS_POP

// ---- Tiles: call only when cpu_supports(CpuTarget::amx) ---------------------------------------
SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA ",avx512bf16,amx-tile,amx-bf16")
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::amx {

namespace detail {
// One instruction each; T, C, A, B are tile numbers 0..7. Loads and stores name memory as
// clobbered so that the compiler completes earlier stores to the source before a load and reads
// a stored tile only after the store.
template <int T>
inline void tile_load(const void* p, std::int64_t stride_bytes) {
  __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm%c2|tileloadd\ttmm%c2, [%0+%1*1]}"
                   :
                   : "r"(p), "r"(stride_bytes), "i"(T)
                   : "memory");
}
template <int T>
inline void tile_store(void* p, std::int64_t stride_bytes) {
  __asm__ volatile("{tilestored\t%%tmm%c2, (%0,%1,1)|tilestored\t[%0+%1*1], tmm%c2}"
                   :
                   : "r"(p), "r"(stride_bytes), "i"(T)
                   : "memory");
}
template <int T>
inline void tile_zero() {
  __asm__ volatile("{tilezero\t%%tmm%c0|tilezero\ttmm%c0}" : : "i"(T));
}
/// tmm C += tmm A (16 x 32 bf16) . tmm B (16 x 16 bf16 pairs).
template <int C, int A, int B>
inline void tile_dpbf16ps() {
  __asm__ volatile("{tdpbf16ps\t%%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbf16ps\ttmm%c0, tmm%c1, tmm%c2}"
                   :
                   : "i"(C), "i"(A), "i"(B));
}

// Tile roles in both kernels: C tiles 0-3 (C[2 m + n] for row block m, column block n), A tiles
// 4-5, B tiles 6-7.

/// s[j][i] = scale * K[j] . Q[i] for j < 16 MJ, i < 16 NI (see qk); k and qp at the block.
template <int MJ, int NI>
inline void qk_block(const bf16* k, index_t ldk, const std::uint32_t* qp, index_t ldq, index_t d,
                     float scale, float* s, index_t lds) {
  const std::int64_t ka = ldk * 2, qa = ldq * 4;  // strides in bytes
  tile_zero<0>();
  if constexpr (NI == 2) tile_zero<1>();
  if constexpr (MJ == 2) tile_zero<2>();
  if constexpr (MJ == 2 && NI == 2) tile_zero<3>();
  // 32 dims a step: A = 16 key rows x 64 bytes, B = 16 dim-pair rows x 16 queries.
  for (index_t c = 0; c < d; c += 32) {
    const std::uint32_t* q = qp + (c / 2) * ldq;
    tile_load<4>(k + c, ka);
    tile_load<6>(q, qa);
    if constexpr (NI == 2) tile_load<7>(q + 16, qa);
    if constexpr (MJ == 2) tile_load<5>(k + 16 * ldk + c, ka);
    tile_dpbf16ps<0, 4, 6>();
    if constexpr (NI == 2) tile_dpbf16ps<1, 4, 7>();
    if constexpr (MJ == 2) tile_dpbf16ps<2, 5, 6>();
    if constexpr (MJ == 2 && NI == 2) tile_dpbf16ps<3, 5, 7>();
  }
  const std::int64_t sa = lds * 4;
  tile_store<0>(s, sa);
  if constexpr (NI == 2) tile_store<1>(s + 16, sa);
  if constexpr (MJ == 2) tile_store<2>(s + 16 * lds, sa);
  if constexpr (MJ == 2 && NI == 2) tile_store<3>(s + 16 * lds + 16, sa);
  // Scaled after the store, while the (at most 4 KiB) block is in L1: AMX has no scaling.
  const __m512 sc = _mm512_set1_ps(scale);
  for (int j = 0; j < 16 * MJ; ++j)
    for (int v = 0; v < NI; ++v) {
      float* p = s + j * lds + v * 16;
      _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), sc));
    }
}

/// ot[c][i] += sum_j V[j][c] P[j][i] for c < 16 MC, i < 16 NI (see pv); vt, pp, ot at the block.
template <int MC, int NI>
inline void pv_block(const std::uint32_t* vt, index_t ldvt, index_t nk, const std::uint32_t* pp,
                     index_t ldp, float* ot, index_t ldo) {
  const std::int64_t va = ldvt * 4, pa = ldp * 4, oa = ldo * 4;  // strides in bytes
  // The C tiles are read and written once per block, so the per-call cost of 8 tile moves per
  // 32 x 32 outputs is spread over nk / 32 steps: longer key blocks amortise it better.
  tile_load<0>(ot, oa);
  if constexpr (NI == 2) tile_load<1>(ot + 16, oa);
  if constexpr (MC == 2) tile_load<2>(ot + 16 * ldo, oa);
  if constexpr (MC == 2 && NI == 2) tile_load<3>(ot + 16 * ldo + 16, oa);
  // 32 keys a step: A = 16 dim rows x 16 key pairs of V^T, B = 16 key-pair rows x 16 queries.
  for (index_t j2 = 0; j2 < nk / 2; j2 += 16) {
    const std::uint32_t* p = pp + j2 * ldp;
    tile_load<4>(vt + j2, va);
    tile_load<6>(p, pa);
    if constexpr (NI == 2) tile_load<7>(p + 16, pa);
    if constexpr (MC == 2) tile_load<5>(vt + 16 * ldvt + j2, va);
    tile_dpbf16ps<0, 4, 6>();
    if constexpr (NI == 2) tile_dpbf16ps<1, 4, 7>();
    if constexpr (MC == 2) tile_dpbf16ps<2, 5, 6>();
    if constexpr (MC == 2 && NI == 2) tile_dpbf16ps<3, 5, 7>();
  }
  tile_store<0>(ot, oa);
  if constexpr (NI == 2) tile_store<1>(ot + 16, oa);
  if constexpr (MC == 2) tile_store<2>(ot + 16 * ldo, oa);
  if constexpr (MC == 2 && NI == 2) tile_store<3>(ot + 16 * ldo + 16, oa);
}

/// The ldtilecfg operand: palette 1, tiles 0-7 of 16 rows x 64 bytes, tiles 8-15 unused (0).
struct alignas(64) TileConfig {
  std::uint8_t palette_id = 1;
  std::uint8_t start_row = 0;  // restart row after an interrupted tileloadd / tilestored: 0
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};  // bytes per row
  std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");
}  // namespace detail

/// Configures the tiles for qk / pv on this thread (ldtilecfg) and releases them (tilerelease,
/// back to the init state, so context switches stop saving 8 KiB) when it ends. One per thread
/// and work item; other AMX code (e.g. a BLAS) must not run on the thread while it lives, as it
/// would reconfigure the tiles. Construct only when cpu_supports(CpuTarget::amx).
class TileScope {
 public:
  TileScope() {
    const detail::TileConfig cfg;
    __asm__ volatile("ldtilecfg\t%0" : : "m"(cfg));
  }
  ~TileScope() { __asm__ volatile("tilerelease" ::: "memory"); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

/// s[j * lds + i] = scale * sum_{c < d} K[j][c] Q[i][c] for j < nk, i < rows, where K's row j is
/// k + j * ldk (bf16) and qp[(c / 2) * ldq + i] is the word (Q[i][c], Q[i][c + 1]) (low, high
/// half): B = Q^T in the VNNI layout. Inside a TileScope. Preconditions (the caller pads with
/// zeros): nk % 16 == 0, d % 32 == 0, rows % 16 == 0, ldk >= d, ldq >= rows, lds >= rows; k
/// holds nk rows of d bf16, qp d / 2 rows of rows words. No alignment needed; 64-byte aligned
/// rows (ldk % 32, ldq % 16, lds % 16 == 0 and aligned bases) avoid split cache-line loads.
inline void qk(const bf16* k, index_t ldk, index_t nk, const std::uint32_t* qp, index_t ldq,
               index_t d, index_t rows, float scale, float* s, index_t lds) {
  index_t j = 0;
  for (; j + 32 <= nk; j += 32) {
    const bf16* kj = k + j * ldk;
    float* sj = s + j * lds;
    index_t i = 0;
    for (; i + 32 <= rows; i += 32) detail::qk_block<2, 2>(kj, ldk, qp + i, ldq, d, scale, sj + i, lds);
    if (i < rows) detail::qk_block<2, 1>(kj, ldk, qp + i, ldq, d, scale, sj + i, lds);
  }
  if (j < nk) {
    const bf16* kj = k + j * ldk;
    float* sj = s + j * lds;
    index_t i = 0;
    for (; i + 32 <= rows; i += 32) detail::qk_block<1, 2>(kj, ldk, qp + i, ldq, d, scale, sj + i, lds);
    if (i < rows) detail::qk_block<1, 1>(kj, ldk, qp + i, ldq, d, scale, sj + i, lds);
  }
}

/// ot[c * ldo + i] += sum_{j < nk} V[j][c] P[j][i] for c < dv, i < rows, where
/// vt[c * ldvt + j / 2] is the word (V[j][c], V[j + 1][c]) (V^T as key pairs: transpose_pairs)
/// and pp[(j / 2) * ldp + i] the word (P[j][i], P[j + 1][i]). Inside a TileScope.
/// Preconditions (the caller pads with zeros): nk % 32 == 0, dv % 16 == 0, rows % 16 == 0,
/// ldvt >= nk / 2, ldp >= rows, ldo >= rows.
inline void pv(const std::uint32_t* vt, index_t ldvt, index_t nk, const std::uint32_t* pp,
               index_t ldp, index_t dv, index_t rows, float* ot, index_t ldo) {
  index_t c = 0;
  for (; c + 32 <= dv; c += 32) {
    const std::uint32_t* vc = vt + c * ldvt;
    float* oc = ot + c * ldo;
    index_t i = 0;
    for (; i + 32 <= rows; i += 32) detail::pv_block<2, 2>(vc, ldvt, nk, pp + i, ldp, oc + i, ldo);
    if (i < rows) detail::pv_block<2, 1>(vc, ldvt, nk, pp + i, ldp, oc + i, ldo);
  }
  if (c < dv) {
    const std::uint32_t* vc = vt + c * ldvt;
    float* oc = ot + c * ldo;
    index_t i = 0;
    for (; i + 32 <= rows; i += 32) detail::pv_block<1, 2>(vc, ldvt, nk, pp + i, ldp, oc + i, ldo);
    if (i < rows) detail::pv_block<1, 1>(vc, ldvt, nk, pp + i, ldp, oc + i, ldo);
  }
}

}  // namespace arch::amx
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
SPARSE_ATTN_DIAGNOSTICS_POP
#endif  // SPARSE_ATTN_X86_TARGETS
