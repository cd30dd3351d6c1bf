// The amx target: the avx512_bf16 operations plus AMX tiles (tdpbf16ps) for the prefill's bf16
// products Q K^T and P V (arch/amx/tiles.hpp), 16 times the products per instruction of
// vdpbf16ps. Only the prefill differs from avx512_bf16 (arch/dispatch.hpp forwards every other
// entry point there); shapes the tiles do not take (d not a multiple of 32, dv of 16) use the
// avx512_bf16 pair tiles.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/arch/amx/tiles.hpp"
#include "sparse_attn/arch/avx512_bf16/vec.hpp"

#if SPARSE_ATTN_X86_TARGETS
SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA ",avx512bf16,amx-tile,amx-bf16")
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::amx {

struct Vec : avx512_bf16::Vec {
  static constexpr bool kHasAmx = true;
  using TileScope = amx::TileScope;

  // The tile kernels (preconditions: arch/amx/tiles.hpp), reached through Vec so the target-
  // independent bodies name them only in code compiled for this target.
  static void qk_tiles(const bf16* k, index_t ldk, index_t nk, const std::uint32_t* qp, index_t ldq,
                       index_t d, index_t rows, float scale, float* s, index_t lds) {
    amx::qk(k, ldk, nk, qp, ldq, d, rows, scale, s, lds);
  }
  static void pv_tiles(const std::uint32_t* vt, index_t ldvt, index_t nk, const std::uint32_t* pp,
                       index_t ldp, index_t dv, index_t rows, float* ot, index_t ldo) {
    amx::pv(vt, ldvt, nk, pp, ldp, dv, rows, ot, ldo);
  }
  static void transpose_pairs(const std::uint32_t* vp, index_t ldvp, index_t npairs, index_t dv,
                              std::uint32_t* vt, index_t ldvt) {
    amx::transpose_pairs(vp, ldvp, npairs, dv, vt, ldvt);
  }
};

}  // namespace arch::amx
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
SPARSE_ATTN_DIAGNOSTICS_POP
#endif  // SPARSE_ATTN_X86_TARGETS
