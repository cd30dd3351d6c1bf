// Compiling a region of code for an instruction set the includer's -march may lack.
//
// SPARSE_ATTN_TARGET_BEGIN("avx2,fma") ... SPARSE_ATTN_TARGET_END gives every function defined in
// between (templates, member functions and lambdas included) the target attribute, so it may use
// that ISA's intrinsics and the compiler vectorises it for that ISA, whatever -march says. Such a
// function is called only after the dispatcher (arch/dispatch.hpp) has checked that the CPU and
// the OS support the ISA. GCC: #pragma GCC target; clang: #pragma clang attribute.
#pragma once

#if defined(__clang__)
#define SPARSE_ATTN_PRAGMA(x) _Pragma(#x)
#define SPARSE_ATTN_TARGET_BEGIN(isa) \
  SPARSE_ATTN_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define SPARSE_ATTN_TARGET_END _Pragma("clang attribute pop")
#elif defined(__GNUC__)
#define SPARSE_ATTN_PRAGMA(x) _Pragma(#x)
#define SPARSE_ATTN_TARGET_BEGIN(isa) \
  _Pragma("GCC push_options") SPARSE_ATTN_PRAGMA(GCC target(isa))
#define SPARSE_ATTN_TARGET_END _Pragma("GCC pop_options")
#endif

// x86 targets need GCC or clang (target attributes, cpuid); other compilers and CPUs get the
// generic target only.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define SPARSE_ATTN_X86_TARGETS 1
#else
#define SPARSE_ATTN_X86_TARGETS 0
#endif
