/// @file
/// Which instruction-set target the kernels run on, decided once at run time.
///
/// Targets, lowest first: generic (Eigen packets of the includer's -march; always there, the only
/// one off x86), avx2 (AVX2 + FMA + F16C), avx512 (F/BW/DQ/VL), avx512_bf16 (+ AVX512-BF16), amx
/// (+ AMX-TILE and AMX-BF16: the prefill's bf16 products on tiles, everything else as
/// avx512_bf16). A translation unit compiles generic plus every x86 target at or above its own
/// -march level, and always avx512_bf16 and amx (a portable -march=x86-64-v2 build: all five,
/// picked at run time; a -march=native build on an AVX-512 BF16 machine: generic, avx512_bf16 and
/// amx, so the native path is compiled directly and an AMX CPU refused the tiles by its OS falls
/// back to avx512_bf16).
/// The choice: the best compiled target that the CPU (cpuid) and the OS (XCR0: the OS saves the
/// AVX / AVX-512 / tile register state; on Linux the process must also ask for the tile state,
/// which the first cpu_target() call does once) support, unless overridden by the environment
/// variable SPARSE_ATTN_TARGET=generic|avx2|avx512|avx512_bf16|amx (read at the first call) or by
/// set_cpu_target(). Forcing a target the CPU lacks, or one not compiled into the program, is an
/// error (sparse_attn::invalid_argument naming the supported ones). See docs/DESIGN.md, section
/// "CPU targets and run-time dispatch".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "sparse_attn/arch/detail/target_region.hpp"
#include "sparse_attn/core/error.hpp"

#if SPARSE_ATTN_X86_TARGETS
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

/// @def SPARSE_ATTN_TARGET_AVX2
/// 1 when this translation unit compiles the avx2 target (x86, -march below AVX2+FMA+F16C), else 0.
/// @def SPARSE_ATTN_TARGET_AVX512
/// 1 when this translation unit compiles the avx512 target (x86, -march below AVX-512 F/BW/DQ/VL),
/// else 0.
/// @def SPARSE_ATTN_TARGET_AVX512_BF16
/// 1 when this translation unit compiles the avx512_bf16 target (every x86 build), else 0.
/// @def SPARSE_ATTN_TARGET_AMX
/// 1 when this translation unit compiles the amx target (every x86 build), else 0.

// Compiled targets (see above): x86 targets at or above the includer's level.
#if SPARSE_ATTN_X86_TARGETS
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
      defined(__AVX512VL__) && defined(__AVX512BF16__))
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__))
#if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define SPARSE_ATTN_TARGET_AVX2 1
#endif
#define SPARSE_ATTN_TARGET_AVX512 1
#endif
#endif
#define SPARSE_ATTN_TARGET_AVX512_BF16 1
#define SPARSE_ATTN_TARGET_AMX 1
#endif
#ifndef SPARSE_ATTN_TARGET_AVX2
#define SPARSE_ATTN_TARGET_AVX2 0
#endif
#ifndef SPARSE_ATTN_TARGET_AVX512
#define SPARSE_ATTN_TARGET_AVX512 0
#endif
#ifndef SPARSE_ATTN_TARGET_AVX512_BF16
#define SPARSE_ATTN_TARGET_AVX512_BF16 0
#endif
#ifndef SPARSE_ATTN_TARGET_AMX
#define SPARSE_ATTN_TARGET_AMX 0
#endif

SPARSE_ATTN_NAMESPACE_BEGIN

/// An instruction-set target of the dispatched kernels, lowest first (the values order them).
enum class CpuTarget {
  generic = 0,      ///< Eigen packets of the includer's -march; every CPU.
  avx2 = 1,         ///< AVX2 + FMA + F16C (+ BMI2).
  avx512 = 2,       ///< AVX-512 F/BW/DQ/VL.
  avx512_bf16 = 3,  ///< avx512 + AVX512-BF16 (vdpbf16ps for the bf16 products).
  amx = 4           ///< avx512_bf16 + AMX-TILE and AMX-BF16 (the prefill's bf16 products on tiles).
};
/// Number of CpuTarget values (they are 0 .. kNumCpuTargets - 1).
inline constexpr int kNumCpuTargets = 5;

/// Name of a target, as SPARSE_ATTN_TARGET and parse_cpu_target() spell it.
/// @param t the target.
/// @return "generic", "avx2", "avx512", "avx512_bf16" or "amx" ("unknown" outside the enum); a
///         static string.
inline const char* target_name(CpuTarget t) {
  switch (t) {
    case CpuTarget::generic: return "generic";
    case CpuTarget::avx2: return "avx2";
    case CpuTarget::avx512: return "avx512";
    case CpuTarget::avx512_bf16: return "avx512_bf16";
    case CpuTarget::amx: return "amx";
  }
  return "unknown";
}

/// True when this program holds code for target t (see the file comment).
/// @param t the target.
/// @return whether the including translation unit compiled t's kernels. Never throws.
inline bool target_compiled(CpuTarget t) {
  switch (t) {
    case CpuTarget::generic: return true;
    case CpuTarget::avx2: return SPARSE_ATTN_TARGET_AVX2 != 0;
    case CpuTarget::avx512: return SPARSE_ATTN_TARGET_AVX512 != 0;
    case CpuTarget::avx512_bf16: return SPARSE_ATTN_TARGET_AVX512_BF16 != 0;
    case CpuTarget::amx: return SPARSE_ATTN_TARGET_AMX != 0;
  }
  return false;
}

namespace detail {
#if SPARSE_ATTN_X86_TARGETS
struct CpuFeatures {
  bool avx2 = false, avx512 = false, avx512_bf16 = false, amx = false;
};

/// Asks Linux for the AMX tile-data state (XFEATURE_XTILEDATA, 18) for this process: since 5.16
/// a process's first tile instruction faults until it asked with arch_prctl(ARCH_REQ_XCOMP_PERM)
/// (the state enlarges every signal frame by 8 KiB). Process-wide; false when refused (kernel
/// without AMX support, sigaltstack too small) and off Linux.
inline bool request_tile_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return f;
  const bool fma = (c >> 12) & 1u, osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u, f16c = (c >> 29) & 1u;
  if (!(osxsave && avx)) return f;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0u));
  const bool os_avx = (xcr0_lo & 0x6u) == 0x6u;       // XMM and YMM state saved by the OS
  const bool os_avx512 = (xcr0_lo & 0xE6u) == 0xE6u;  // plus opmask, ZMM_Hi256, Hi16_ZMM
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
  if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return f;
  const bool avx2 = (b7 >> 5) & 1u, bmi2 = (b7 >> 8) & 1u;
  const bool f512 = (b7 >> 16) & 1u, dq = (b7 >> 17) & 1u, bw = (b7 >> 30) & 1u, vl = (b7 >> 31) & 1u;
  unsigned a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  const bool bf16 = __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71) && ((a71 >> 5) & 1u);
  f.avx2 = os_avx && avx2 && fma && f16c && bmi2;
  f.avx512 = f.avx2 && os_avx512 && f512 && dq && bw && vl;
  f.avx512_bf16 = f.avx512 && bf16;
  // AMX: cpuid leaf 7 EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), the Linux permission, then XCR0
  // bits 17-18 (XTILECFG, XTILEDATA: the OS saves the tile state), read after the request.
  const bool amx_bf16 = (d7 >> 22) & 1u, amx_tile = (d7 >> 24) & 1u;
  if (f.avx512_bf16 && amx_bf16 && amx_tile && request_tile_permission()) {
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0u));
    f.amx = (xcr0_lo & 0x60000u) == 0x60000u;
  }
  return f;
}
#endif

inline bool cpu_supports_impl(CpuTarget t) {
#if SPARSE_ATTN_X86_TARGETS
  static const CpuFeatures f = detect_cpu_features();
  switch (t) {
    case CpuTarget::generic: return true;
    case CpuTarget::avx2: return f.avx2;
    case CpuTarget::avx512: return f.avx512;
    case CpuTarget::avx512_bf16: return f.avx512_bf16;
    case CpuTarget::amx: return f.amx;
  }
  return false;
#else
  return t == CpuTarget::generic;
#endif
}

inline std::string usable_targets() {
  std::string s;
  for (int i = 0; i < kNumCpuTargets; ++i) {
    const auto t = static_cast<CpuTarget>(i);
    if (target_compiled(t) && cpu_supports_impl(t)) s += (s.empty() ? "" : ", ") + std::string(target_name(t));
  }
  return s;
}

inline void check_usable(CpuTarget t, const char* where) {
  require(target_compiled(t), where, "target ", target_name(t),
          " is not compiled into this program (targets below the -march level of the including "
          "translation unit are left out; build for a lower -march to keep them); usable here: ",
          usable_targets());
  require(cpu_supports_impl(t), where, "this CPU (or its OS) does not support target ",
          target_name(t), "; usable here: ", usable_targets());
}

// -1: automatic (environment, else best); else a forced CpuTarget.
inline std::atomic<int>& forced_target() {
  static std::atomic<int> forced{-1};
  return forced;
}
}  // namespace detail

/// True when the CPU and the OS support target t (independent of what is compiled).
/// The first call runs cpuid/xgetbv once (thread-safe static) and, on Linux with an AMX CPU, asks
/// the kernel for the tile state for the whole process.
/// @param t the target.
/// @return whether t can run here; generic always can.
inline bool cpu_supports(CpuTarget t) { return detail::cpu_supports_impl(t); }

/// Parses a target name (generic, avx2, avx512, avx512_bf16, amx); throws invalid_argument
/// otherwise.
/// @param name the name, exact and case-sensitive.
/// @return the target (whether it is usable is not checked).
/// @throws sparse_attn::invalid_argument for any other name.
inline CpuTarget parse_cpu_target(const std::string& name) {
  for (int i = 0; i < kNumCpuTargets; ++i)
    if (name == target_name(static_cast<CpuTarget>(i))) return static_cast<CpuTarget>(i);
  raise_invalid_argument("unknown CPU target '" + name +
                         "'; allowed: generic, avx2, avx512, avx512_bf16, amx");
}

/// The best target that is compiled in and supported by this CPU and OS.
/// @return the highest usable target (generic at least). Ignores SPARSE_ATTN_TARGET and
///         set_cpu_target().
inline CpuTarget best_cpu_target() {
  for (int i = kNumCpuTargets - 1; i > 0; --i) {
    const auto t = static_cast<CpuTarget>(i);
    if (target_compiled(t) && detail::cpu_supports_impl(t)) return t;
  }
  return CpuTarget::generic;
}

/// The target the kernels use: set_cpu_target()'s, else SPARSE_ATTN_TARGET's, else the best.
/// Throws invalid_argument when SPARSE_ATTN_TARGET names an unknown or unusable target.
/// @return the target for the next plan.
/// @throws sparse_attn::invalid_argument as above (on every call while no target is forced, since
///         the variable, read once, is parsed each time).
/// Thread-safe; O(1) after the first call.
inline CpuTarget cpu_target() {
  const int forced = detail::forced_target().load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<CpuTarget>(forced);
  static const char* env = std::getenv("SPARSE_ATTN_TARGET");
  if (env != nullptr && *env != '\0') {
    const CpuTarget t = parse_cpu_target(env);
    detail::check_usable(t, "SPARSE_ATTN_TARGET");
    return t;
  }
  static const CpuTarget best = best_cpu_target();
  return best;
}

/// Forces target t for every later plan of this program (thread-safe; plans already built keep
/// theirs). Throws invalid_argument if t is not compiled in or not supported by the CPU.
/// @param t the target to force; wins over SPARSE_ATTN_TARGET.
/// @throws sparse_attn::invalid_argument when t is not usable (the message lists the usable ones).
/// The setting is per ISA namespace (per -march of the includer), like every symbol here.
inline void set_cpu_target(CpuTarget t) {
  detail::check_usable(t, "set_cpu_target");
  detail::forced_target().store(static_cast<int>(t), std::memory_order_relaxed);
}

/// Back to automatic choice (SPARSE_ATTN_TARGET, else the best). Thread-safe, never throws.
inline void reset_cpu_target() { detail::forced_target().store(-1, std::memory_order_relaxed); }

/// The targets usable in this program on this CPU, lowest first.
/// @return the compiled and supported targets (generic first); allocates the vector.
inline std::vector<CpuTarget> usable_cpu_targets() {
  std::vector<CpuTarget> v;
  for (int i = 0; i < kNumCpuTargets; ++i) {
    const auto t = static_cast<CpuTarget>(i);
    if (target_compiled(t) && detail::cpu_supports_impl(t)) v.push_back(t);
  }
  return v;
}

SPARSE_ATTN_NAMESPACE_END
