/// @file
/// Run-time dispatch: every compiled target's copy of the kernel bodies, and dispatch(t, f), which
/// calls `f(arch::<t>::Target{})` for target t (arch/target.hpp says which targets exist and how
/// one is chosen). Each target's bodies are arch/detail/bodies-inl.hpp compiled inside that
/// target's namespace and ISA region, so the bodies of different targets never share a symbol.
/// The cost: one switch per work item. See docs/DESIGN.md, section "CPU targets and run-time
/// dispatch".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "sparse_attn/arch/detail/kernel_args.hpp"
#include "sparse_attn/arch/detail/layout.hpp"
#include "sparse_attn/arch/generic/vec.hpp"
#include "sparse_attn/arch/target.hpp"
#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/kernel/view_traits.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/mask/key_selection.hpp"

#if SPARSE_ATTN_TARGET_AVX2
#include "sparse_attn/arch/avx2/vec.hpp"
#endif
#if SPARSE_ATTN_TARGET_AVX512
#include "sparse_attn/arch/avx512/vec.hpp"
#endif
#if SPARSE_ATTN_TARGET_AVX512_BF16
#include "sparse_attn/arch/avx512_bf16/vec.hpp"
#endif
#if SPARSE_ATTN_TARGET_AMX
#include "sparse_attn/arch/amx/vec.hpp"
#endif

SPARSE_ATTN_DIAGNOSTICS_PUSH

SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::generic {
#include "sparse_attn/arch/detail/bodies-inl.hpp"
}  // namespace arch::generic
SPARSE_ATTN_NAMESPACE_END

#if SPARSE_ATTN_TARGET_AVX2
SPARSE_ATTN_TARGET_BEGIN("avx2,fma,f16c,bmi2")
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::avx2 {
#include "sparse_attn/arch/detail/bodies-inl.hpp"
}  // namespace arch::avx2
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
#endif

#if SPARSE_ATTN_TARGET_AVX512
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA)
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::avx512 {
#include "sparse_attn/arch/detail/bodies-inl.hpp"
}  // namespace arch::avx512
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
#endif

#if SPARSE_ATTN_TARGET_AVX512_BF16
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA ",avx512bf16")
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::avx512_bf16 {
#include "sparse_attn/arch/detail/bodies-inl.hpp"
}  // namespace arch::avx512_bf16
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
#endif

#if SPARSE_ATTN_TARGET_AMX
SPARSE_ATTN_TARGET_BEGIN(SPARSE_ATTN_AVX512_ISA ",avx512bf16,amx-tile,amx-bf16")
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::amx {
#include "sparse_attn/arch/detail/bodies-inl.hpp"

/// The amx target's entry points: avx512_bf16's, except the prefill's bf16 products (AMX tiles),
/// so the rest is compiled once for both targets.
struct Entry : avx512_bf16::Target {
  template <class Mask, class QV, class KV, class VV, class OV>
  static void prefill_item(const Mask& mask, const QV& q, const KV& k, const VV& v, const OV& out,
                           LseView lse, float scale, bool bf16_products, index_t G, index_t hk,
                           index_t qb, index_t tiles, const PrefillScratch& ws, const PrefillKeyMass& km) {
    if (bf16_products)
      amx::Target::prefill_item(mask, q, k, v, out, lse, scale, true, G, hk, qb, tiles, ws, km);
    else
      avx512_bf16::Target::prefill_item(mask, q, k, v, out, lse, scale, false, G, hk, qb, tiles, ws, km);
  }
  template <class VV>
  static bool pack_v_pairs(const VV& v, index_t d, index_t hk, index_t k0, index_t nk,
                           const PrefillScratch& ws, std::uint32_t* dst) {
    return amx::Target::pack_v_pairs(v, d, hk, k0, nk, ws, dst);
  }
};
}  // namespace arch::amx
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_TARGET_END
#endif

SPARSE_ATTN_DIAGNOSTICS_POP

SPARSE_ATTN_NAMESPACE_BEGIN
/// CPU targets' kernel bodies (one namespace per compiled target, not documented here) and the
/// run-time dispatch between them.
namespace arch {

/// Calls f(T{}) where T is target t's entry struct (`arch::<t>::Target`; `arch::amx::Entry`); t
/// must be usable (plans check it). Returns f's result.
/// @tparam F a generic callable taking any target's entry struct by value.
/// @param t the target; one not compiled in runs generic.
/// @param f the callable.
/// @return f's result. Throws only what f throws; no allocation.
template <class F>
decltype(auto) dispatch(CpuTarget t, F&& f) {
  switch (t) {
#if SPARSE_ATTN_TARGET_AMX
    case CpuTarget::amx: return f(amx::Entry{});
#endif
#if SPARSE_ATTN_TARGET_AVX512_BF16
    case CpuTarget::avx512_bf16: return f(avx512_bf16::Target{});
#endif
#if SPARSE_ATTN_TARGET_AVX512
    case CpuTarget::avx512: return f(avx512::Target{});
#endif
#if SPARSE_ATTN_TARGET_AVX2
    case CpuTarget::avx2: return f(avx2::Target{});
#endif
    default: return f(generic::Target{});
  }
}

}  // namespace arch
SPARSE_ATTN_NAMESPACE_END
