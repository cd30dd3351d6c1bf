/// @file
/// @brief Compiler-diagnostic and inlining macros used by the kernels.
///
/// GCC < 13 reports -Wuninitialized / -Wmaybe-uninitialized inside its own AVX-512 intrinsics
/// (the _mm512_undefined_*() idiom, GCC PR 105593) at every inlined call site. Kernel code that
/// uses those intrinsics is wrapped in SPARSE_ATTN_DIAGNOSTICS_PUSH / SPARSE_ATTN_DIAGNOSTICS_POP
/// so includers building with -Werror stay clean. The macros expand to pragmas only: no code, no
/// run-time cost.

/// @def SPARSE_ATTN_DIAGNOSTICS_PUSH
/// @brief Opens a region in which GCC's -Wuninitialized and -Wmaybe-uninitialized are silenced.
///
/// On GCC (not clang) it pushes the diagnostic state and disables both warnings (the false
/// positives of GCC PR 105593 in AVX-512 intrinsics); elsewhere it expands to nothing. Every
/// PUSH must be matched by a SPARSE_ATTN_DIAGNOSTICS_POP in the same translation unit, after the
/// inline functions whose instantiations trigger the warning.

/// @def SPARSE_ATTN_DIAGNOSTICS_POP
/// @brief Closes the region opened by SPARSE_ATTN_DIAGNOSTICS_PUSH, restoring the includer's
/// diagnostic state (GCC); expands to nothing elsewhere.

/// @def SPARSE_ATTN_NOINLINE
/// @brief Marks a function never to be inlined (GCC/clang `noinline`, MSVC
/// `__declspec(noinline)`, nothing elsewhere).
///
/// Keeps a rarely taken path (a corrupt-data error report) out of the hot loop that calls it, so
/// the loop's code stays small; it does not change behaviour.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#define SPARSE_ATTN_DIAGNOSTICS_PUSH                         \
  _Pragma("GCC diagnostic push")                             \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")      \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define SPARSE_ATTN_DIAGNOSTICS_POP _Pragma("GCC diagnostic pop")
#else
#define SPARSE_ATTN_DIAGNOSTICS_PUSH
#define SPARSE_ATTN_DIAGNOSTICS_POP
#endif

#if defined(__GNUC__)
#define SPARSE_ATTN_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define SPARSE_ATTN_NOINLINE __declspec(noinline)
#else
#define SPARSE_ATTN_NOINLINE
#endif
