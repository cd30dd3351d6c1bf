// Run-time dispatch: every compiled target's copy of the kernel bodies, and dispatch(t, f), which
// calls f(arch::<t>::Target{}) for target t (arch/target.hpp says which targets exist and how
// one is chosen). Each target's bodies are arch/detail/bodies-inl.hpp compiled inside that
// target's namespace and ISA region, so the bodies of different targets never share a symbol.
// The cost: one switch per work item.
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

SPARSE_ATTN_DIAGNOSTICS_POP

SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch {

/// Calls f(T{}) where T is target t's entry struct (arch::<t>::Target); t must be usable (plans
/// check it). Returns f's result.
template <class F>
decltype(auto) dispatch(CpuTarget t, F&& f) {
  switch (t) {
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
