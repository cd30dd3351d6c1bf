// Shared pieces of sparse_attn_bench (main.cpp: presets, rooflines, summary; prefill.cpp and
// decode.cpp: one generic registration per phase over the methods registry,
// sparse_attn/methods/registry.hpp, swept by the one table below). See docs/BENCHMARKS.md.
//
// Timing model: an iteration is what a caller pays for one call: the selection step (data-dependent
// methods) plus the kernel. Google Benchmark reports its wall time as real_time; the counters are
// computed from our own steady clock around the same work (not with Counter::kIsRate, which would
// divide by the main thread's CPU time), so they do not depend on how OpenMP threads are counted.
#pragma once
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <sparse_attn/core/dtype.hpp>
#include <string>
#include <type_traits>
#include <vector>

namespace sa_bench {

namespace sa = sparse_attn;

using index_t = std::int64_t;

enum class Preset { quick, core, full };

struct Config {
  Preset preset = Preset::core;
  int threads = 1;       // --threads T: kernels, selections and rooflines use T threads
  bool progress = true;  // progress lines on stderr
};
Config& config();

inline const char* preset_name(Preset p) {
  return p == Preset::quick ? "quick" : p == Preset::full ? "full" : "core";
}

// ---------------------------------------------------------------------------------------------
// The sweep table: sequence lengths per phase and CR targets per preset, for both phases
// ---------------------------------------------------------------------------------------------

enum class Phase { prefill, decode };

/// The registry method every speedup_vs_dense divides by (registered first, at CR 1 only).
inline constexpr const char* kBaselineMethod = "dense";
/// The closed-form baseline of every sparse method, swept over more CRs than the others: the
/// registry's prefill method of that name, and decode's in-place range case of the same name.
inline constexpr const char* kWindowMethod = "sliding_window";

/// Sequence lengths (prefill: n queries over n keys; decode: the cache length).
inline std::vector<index_t> sweep_sizes(Phase phase) {
  const bool pre = phase == Phase::prefill;
  switch (config().preset) {
    case Preset::quick:
      return {pre ? index_t{1024} : index_t{4096}};
    case Preset::core:
      return pre ? std::vector<index_t>{4096, 16384} : std::vector<index_t>{131072};
    case Preset::full:
      return pre ? std::vector<index_t>{1024, 2048, 4096, 8192, 16384, 32768, 65536}
                 : std::vector<index_t>{4096, 8192, 16384, 32768, 65536, 131072};
  }
  return {};
}

/// CR targets of `method` (the same in both phases): CR 1 for the baseline, the window sweep
/// for sliding_window, the method sweep for every other method (a method new to the registry
/// gets this one without a change here).
inline std::vector<double> sweep_crs(const std::string& method) {
  if (method == kBaselineMethod) return {1};
  const bool window = method == kWindowMethod;
  switch (config().preset) {
    case Preset::quick:
      return {5};
    case Preset::core:
      return window ? std::vector<double>{2, 5, 10, 20} : std::vector<double>{10};
    case Preset::full:
      return {1, 2, 5, 10, 20};
  }
  return {};
}

/// Measurements later benchmarks and the end-of-run summary need (filled as benchmarks finish).
struct Results {
  double fma_gflops = 0.0;                      // roofline/fma_peak
  double bf16_gflops = 0.0;                     // roofline/bf16_dot_peak
  double stream_gbps = 0.0;                     // roofline/stream_read
  std::map<std::string, double> gemm_gflops;    // roofline/eigen_gemm/<shape>
  std::map<std::string, double> dense_seconds;  // "prefill/n:4096/fp32" -> s per iteration
  struct Dense {
    index_t n = 0;
    std::string dtype;
    double seconds = 0.0, gflops = 0.0, bytes = 0.0, flops = 0.0;
  };
  std::map<std::string, Dense> prefill_dense, decode_dense;  // same keys as dense_seconds
};
Results& results();

/// "prefill/n:4096/fp32": the key of the dense baseline of a (phase, n, dtype).
inline std::string dense_key(const std::string& phase, index_t n, const std::string& dtype) {
  return phase + "/n:" + std::to_string(n) + "/" + dtype;
}

/// Formats a CR for a benchmark name: 10 -> "10", 2.5 -> "2.5".
inline std::string fmt_num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

/// Registers `fn` under `name` (times in ms), with a progress line on stderr the first time it
/// starts and any exception turned into SkipWithError.
benchmark::internal::Benchmark* add(const std::string& name,
                                    std::function<void(benchmark::State&)> fn);

/// Steady-clock stopwatch.
/// K and V in fp32 and, on first request, as bf16 (round to nearest even): the inputs of both
/// sweeps.
struct KVStore {
  std::vector<float> k, v;
  std::vector<sa::bf16> k16, v16;

  void ensure_bf16() {
    if (!k16.empty()) return;
    k16.resize(k.size());
    v16.resize(v.size());
    const auto sz = static_cast<std::int64_t>(k.size());
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < sz; ++i) {
      k16[static_cast<std::size_t>(i)] = sa::bf16(k[static_cast<std::size_t>(i)]);
      v16[static_cast<std::size_t>(i)] = sa::bf16(v[static_cast<std::size_t>(i)]);
    }
  }
  /// K (key = true) or V in storage type KT (float or bf16).
  template <class KT>
  const KT* data(bool key) const {
    if constexpr (std::is_same_v<KT, float>)
      return key ? k.data() : v.data();
    else
      return key ? k16.data() : v16.data();
  }
};

class Stopwatch {
 public:
  Stopwatch() : t0_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  std::chrono::steady_clock::time_point t0_;
};

/// Accumulates the time of each iteration (and of its selection step) and reports it.
struct IterationTimer {
  double total = 0.0, select = 0.0;
  std::int64_t iters = 0;
  void add(double select_s, double total_s) {
    total += total_s;
    select += select_s;
    ++iters;
  }
  double per_iter() const { return iters ? total / static_cast<double>(iters) : 0.0; }
};

/// Synthetic attention data with locality: per head a random base vector b_h, every token
/// x_t = alpha * b_h + u_t (u_t uniform with unit variance), rotated by RoPE at position pos0 + t
/// (theta 10000). Queries and keys of one KV head share b_h, so q_i . k_j peaks near i = j and
/// decays with distance, as in real models; data-dependent selections then see structure instead
/// of noise. `base_seed` picks the bases (share it between Q and K), `seed` the noise.
void fill_rope(float* dst, index_t heads, index_t n, index_t d, index_t pos0, int heads_per_base,
               std::uint64_t base_seed, std::uint64_t seed, float alpha);
/// Uniform [-1, 1) values (V).
void fill_uniform(float* dst, std::size_t count, std::uint64_t seed);

/// Progress / info line on stderr (when enabled).
#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
void progress(const char* fmt, ...);

// Registration entry points (one per translation unit).
void register_rooflines();
void register_prefill();
void register_decode();

}  // namespace sa_bench
