/// @file
/// GCC < 13 reports -Wuninitialized / -Wmaybe-uninitialized inside its own AVX-512 intrinsics
/// (the _mm512_undefined_*() idiom, GCC PR 105593) at every inlined call site. Kernel code that
/// uses those intrinsics is wrapped in these macros so includers building with -Werror stay clean.
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

// Keeps a rarely taken path (corrupt data) out of the hot loop that calls it.
#if defined(__GNUC__)
#define SPARSE_ATTN_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define SPARSE_ATTN_NOINLINE __declspec(noinline)
#else
#define SPARSE_ATTN_NOINLINE
#endif
