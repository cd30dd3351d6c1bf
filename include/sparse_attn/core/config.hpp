/// @file
/// Build configuration seen by every header: the ISA tag of the including translation unit.
///
/// Everything the library defines lives in `sparse_attn::<isa tag>`, an inline namespace named
/// after the instruction set the includer compiles for (its -march). Code written as
/// `sparse_attn::prefill` finds it unchanged, but two translation units built with different
/// -march (per-ISA objects, the way engines ship one binary to many CPUs) produce different
/// symbols, so the linker can never hand one of them the other's code (an ODR violation seen as
/// SIGILL or wrong results). The run-time dispatched kernels of arch/ are tagged a second time by
/// their own target inside that namespace. See docs/DESIGN.md, section "CPU targets and run-time
/// dispatch".
#pragma once

/// @def SPARSE_ATTN_ISA_TAG
/// Name of the inline namespace of this translation unit, from its predefined ISA macros: the
/// first of isa_avx512_bf16 (F+BW+DQ+VL+BF16), isa_avx512 (F+BW+DQ+VL), isa_avx512f, isa_avx2
/// (AVX2+FMA), isa_avx, isa_sse4_2, isa_x86_64, isa_aarch64_sve, isa_aarch64, isa_generic whose
/// features the compiler enables.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512BF16__)
#define SPARSE_ATTN_ISA_TAG isa_avx512_bf16
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define SPARSE_ATTN_ISA_TAG isa_avx512
#elif defined(__AVX512F__)
#define SPARSE_ATTN_ISA_TAG isa_avx512f
#elif defined(__AVX2__) && defined(__FMA__)
#define SPARSE_ATTN_ISA_TAG isa_avx2
#elif defined(__AVX__)
#define SPARSE_ATTN_ISA_TAG isa_avx
#elif defined(__SSE4_2__)
#define SPARSE_ATTN_ISA_TAG isa_sse4_2
#elif defined(__x86_64__) || defined(_M_X64)
#define SPARSE_ATTN_ISA_TAG isa_x86_64
#elif defined(__aarch64__) && defined(__ARM_FEATURE_SVE)
#define SPARSE_ATTN_ISA_TAG isa_aarch64_sve
#elif defined(__aarch64__)
#define SPARSE_ATTN_ISA_TAG isa_aarch64
#else
#define SPARSE_ATTN_ISA_TAG isa_generic
#endif

/// Opens `namespace sparse_attn { inline namespace SPARSE_ATTN_ISA_TAG {`.
#define SPARSE_ATTN_NAMESPACE_BEGIN \
  namespace sparse_attn {           \
  inline namespace SPARSE_ATTN_ISA_TAG {
/// Closes what SPARSE_ATTN_NAMESPACE_BEGIN opened.
#define SPARSE_ATTN_NAMESPACE_END \
  }                               \
  }

/// @def SPARSE_ATTN_EXCEPTIONS
/// 1 when exceptions are on, 0 when the includer compiles with -fno-exceptions (errors then go to
/// the handler of core/error.hpp).
/// @def SPARSE_ATTN_TRY
/// `try`, or `if (true)` without exceptions; used with SPARSE_ATTN_CATCH_ALL for rollback code
/// that compiles either way.
/// @def SPARSE_ATTN_CATCH_ALL
/// `catch (...)`, or `else` (a branch never taken) without exceptions.
/// @def SPARSE_ATTN_RETHROW
/// `throw` (rethrow the caught exception), or a no-op without exceptions.

// Exceptions: on unless the includer compiles with -fno-exceptions (core/error.hpp).
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#define SPARSE_ATTN_EXCEPTIONS 1
#else
#define SPARSE_ATTN_EXCEPTIONS 0
#endif
#if SPARSE_ATTN_EXCEPTIONS
#define SPARSE_ATTN_TRY try
#define SPARSE_ATTN_CATCH_ALL catch (...)
#define SPARSE_ATTN_RETHROW throw
#else  // errors never unwind: the handler of core/error.hpp ends the process
#define SPARSE_ATTN_TRY if (true)
#define SPARSE_ATTN_CATCH_ALL else
#define SPARSE_ATTN_RETHROW static_cast<void>(0)
#endif
