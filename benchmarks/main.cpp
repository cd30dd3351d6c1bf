// sparse_attn_bench: presets, the machine's rooflines (measured in the same run), and the
// end-of-run ratios of the dense kernels against them. Prefill and decode benchmarks are registered
// by prefill.cpp and decode.cpp. Usage: docs/BENCHMARKS.md, or `sparse_attn_bench --help`.
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdarg>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bench_common.hpp"
#include "sparse_attn/arch/target.hpp"

namespace sa_bench {

Config& config() {
  static Config c;
  return c;
}

Results& results() {
  static Results r;
  return r;
}

void progress(const char* fmt, ...) {
  if (!config().progress) return;
  std::va_list ap;
  va_start(ap, fmt);
  std::fputs("[sparse_attn_bench] ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  va_end(ap);
}

namespace {
int g_registered = 0;
}

benchmark::internal::Benchmark* add(const std::string& name,
                                    std::function<void(benchmark::State&)> fn) {
  const int index = ++g_registered;
  auto wrapped = [name, index, fn = std::move(fn)](benchmark::State& st) {
    static std::set<std::string> started;
    if (started.insert(name).second) progress("(%d/%d) %s", index, g_registered, name.c_str());
    try {
      fn(st);
    } catch (const std::exception& e) {
      if (!st.error_occurred()) st.SkipWithError(e.what());
    }
  };
  // Default timing (no UseRealTime/UseManualTime/MinTime: those append "/real_time",
  // "/manual_time" or "/min_time:X" to the name). JSON real_time is the wall time per iteration.
  auto* b = benchmark::RegisterBenchmark(name.c_str(), wrapped);
  b->Unit(benchmark::kMillisecond);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Synthetic data
// ---------------------------------------------------------------------------------------------

namespace {
// splitmix64: a seedable stream per (head, token), so data does not depend on the thread count.
inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
struct Rng {
  std::uint64_t s;
  explicit Rng(std::uint64_t seed) : s(mix(seed)) {}
  float uniform() {  // [-1, 1)
    s = mix(s);
    return static_cast<float>(static_cast<double>(s >> 40) / static_cast<double>(1ULL << 23) - 1.0);
  }
};
}  // namespace

// Setup uses every core whatever --threads says: the values depend only on the seeds.
void fill_uniform(float* dst, std::size_t count, std::uint64_t seed) {
  const std::int64_t chunk = 1 << 16;
  const std::int64_t chunks = (static_cast<std::int64_t>(count) + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(omp_get_num_procs())
  for (std::int64_t c = 0; c < chunks; ++c) {
    Rng r(seed * 0x100000001b3ULL + static_cast<std::uint64_t>(c));
    const std::int64_t end =
        std::min<std::int64_t>(static_cast<std::int64_t>(count), (c + 1) * chunk);
    for (std::int64_t i = c * chunk; i < end; ++i) dst[i] = r.uniform();
  }
}

void fill_rope(float* dst, index_t heads, index_t n, index_t d, index_t pos0, int heads_per_base,
               std::uint64_t base_seed, std::uint64_t seed, float alpha) {
  const index_t half = d / 2;
  std::vector<float> inv_freq(static_cast<std::size_t>(half));
  for (index_t c = 0; c < half; ++c)
    inv_freq[static_cast<std::size_t>(c)] = static_cast<float>(
        std::pow(10000.0, -2.0 * static_cast<double>(c) / static_cast<double>(d)));
  std::vector<float> bases(static_cast<std::size_t>(heads * d));
  for (index_t h = 0; h < heads; ++h) {
    Rng r(base_seed * 7919ULL + static_cast<std::uint64_t>(h / heads_per_base));
    for (index_t c = 0; c < d; ++c)
      bases[static_cast<std::size_t>(h * d + c)] = r.uniform() * 1.7320508f;
  }
#pragma omp parallel for schedule(static) num_threads(omp_get_num_procs())
  for (index_t ht = 0; ht < heads * n; ++ht) {
    const index_t h = ht / n, t = ht % n;
    Rng r(seed * 0x100000001b3ULL + static_cast<std::uint64_t>(ht));
    float* x = dst + ht * d;
    for (index_t c = 0; c < d; ++c)
      x[c] = alpha * bases[static_cast<std::size_t>(h * d + c)] + r.uniform() * 1.7320508f;
    const double pos = static_cast<double>(pos0 + t);
    for (index_t c = 0; c < half; ++c) {  // rotate pairs (c, c + d/2), as in Llama's RoPE
      const double a = pos * static_cast<double>(inv_freq[static_cast<std::size_t>(c)]);
      const float cs = static_cast<float>(std::cos(a)), sn = static_cast<float>(std::sin(a));
      const float x0 = x[c], x1 = x[c + half];
      x[c] = x0 * cs - x1 * sn;
      x[c + half] = x0 * sn + x1 * cs;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rooflines: what this machine can do with the thread count of the run
// ---------------------------------------------------------------------------------------------

namespace {

using Clock = Stopwatch;

// fp32 FMA throughput: kChains independent accumulator chains per thread, so the FMA latency is
// hidden and only the issue rate counts. acc = acc * a + b converges (no overflow, no denormals).
#if defined(__AVX512F__)
constexpr int kChains = 16;  // 32 zmm registers: 16 accumulators + 2 operands
#else
constexpr int kChains = 12;  // 16 ymm/xmm registers
#endif
constexpr std::int64_t kFmaSteps = 1 << 21;

double fma_thread(float a_in, float b_in) {
#if defined(__AVX512F__)
  const __m512 a = _mm512_set1_ps(a_in), b = _mm512_set1_ps(b_in);
  __m512 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(static_cast<float>(j));
  for (std::int64_t i = 0; i < kFmaSteps; ++i) {
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  }
  __m512 s = acc[0];
  for (int j = 1; j < kChains; ++j) s = _mm512_add_ps(s, acc[j]);
  return static_cast<double>(_mm512_reduce_add_ps(s));
#else
  using namespace Eigen::internal;
  using P = packet_traits<float>::type;
  const P a = pset1<P>(a_in), b = pset1<P>(b_in);
  P acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = pset1<P>(static_cast<float>(j));
  for (std::int64_t i = 0; i < kFmaSteps; ++i) {
    for (int j = 0; j < kChains; ++j) acc[j] = pmadd(acc[j], a, b);
  }
  P s = acc[0];
  for (int j = 1; j < kChains; ++j) s = padd(s, acc[j]);
  return static_cast<double>(predux(s));
#endif
}

constexpr int fma_lanes() {
#if defined(__AVX512F__)
  return 16;
#else
  return static_cast<int>(sizeof(Eigen::internal::packet_traits<float>::type) / sizeof(float));
#endif
}

void bm_fma_peak(benchmark::State& st) {
  const int T = config().threads;
  float a = 0.999999f, b = 1e-6f;
  benchmark::DoNotOptimize(a);
  benchmark::DoNotOptimize(b);
  double sink = 0.0, total = 0.0;
  for (auto _ : st) {
    Clock c;
#pragma omp parallel num_threads(T) reduction(+ : sink)
    sink += fma_thread(a, b);
    const double s = c.seconds();
    total += s;
  }
  benchmark::DoNotOptimize(sink);
  const double flops = 2.0 * fma_lanes() * kChains * static_cast<double>(kFmaSteps) * T *
                       static_cast<double>(st.iterations());
  const double gflops = flops / total / 1e9;
  results().fma_gflops = gflops;
  st.counters["GFLOPs"] = gflops;
  st.SetLabel(std::string(fma_lanes() == 16 ? "avx512 fmadd" : "eigen pmadd") + ", " +
              std::to_string(kChains) + " chains x " + std::to_string(T) + " threads");
}

void bm_bf16_dot_peak(benchmark::State& st) {
#if defined(__AVX512BF16__)
  const int T = config().threads;
  constexpr int kB = 16;
  float a_in = 1e-3f;
  benchmark::DoNotOptimize(a_in);
  double sink = 0.0, total = 0.0;
  for (auto _ : st) {
    Clock c;
#pragma omp parallel num_threads(T) reduction(+ : sink)
    {
      const __m512 x = _mm512_set1_ps(a_in);
      const __m512bh a = _mm512_cvtne2ps_pbh(x, x);
      const __m512bh b = _mm512_cvtne2ps_pbh(x, x);
      __m512 acc[kB];
      for (int j = 0; j < kB; ++j) acc[j] = _mm512_setzero_ps();
      for (std::int64_t i = 0; i < kFmaSteps; ++i)
        for (int j = 0; j < kB; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
      __m512 s = acc[0];
      for (int j = 1; j < kB; ++j) s = _mm512_add_ps(s, acc[j]);
      sink += static_cast<double>(_mm512_reduce_add_ps(s));
    }
    const double s = c.seconds();
    total += s;
  }
  benchmark::DoNotOptimize(sink);
  // vdpbf16ps: 32 bf16 products summed pairwise into 16 fp32 lanes = 64 FLOP.
  const double flops =
      64.0 * kB * static_cast<double>(kFmaSteps) * T * static_cast<double>(st.iterations());
  const double gflops = flops / total / 1e9;
  results().bf16_gflops = gflops;
  st.counters["GFLOPs"] = gflops;
  st.SetLabel("avx512 vdpbf16ps, " + std::to_string(kB) + " chains x " + std::to_string(T) +
              " threads");
#else
  st.SkipWithError(
      "roofline/bf16_dot_peak: built without __AVX512BF16__ (needs -march with avx512bf16)");
#endif
}

// STREAM-like read of 1 GiB: each thread sums its contiguous slice with 8 independent
// accumulators (first-touched by the same thread, so pages are local on NUMA machines).
constexpr std::size_t kStreamFloats = std::size_t{1} << 28;  // 1 GiB

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

float* stream_buffer() {
  static std::unique_ptr<float, AlignedFree> buf;
  if (!buf) {
    progress("roofline/stream_read: allocating and touching 1 GiB");
    buf.reset(static_cast<float*>(std::aligned_alloc(64, kStreamFloats * sizeof(float))));
    if (!buf) return nullptr;
    float* p = buf.get();
    const std::int64_t n = static_cast<std::int64_t>(kStreamFloats);
#pragma omp parallel for schedule(static) num_threads(config().threads)
    for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(i & 1023) * 1e-3f;
  }
  return buf.get();
}

float read_slice(const float* p, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (; i + 128 <= n; i += 128)
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_load_ps(p + i + 16 * j));
  for (int j = 1; j < 8; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
  float s = _mm512_reduce_add_ps(acc[0]);
#else
  using namespace Eigen::internal;
  using P = packet_traits<float>::type;
  constexpr int L = static_cast<int>(sizeof(P) / sizeof(float));
  P acc[8];
  for (auto& a : acc) a = pset1<P>(0.0f);
  for (; i + 8 * L <= n; i += 8 * L)
    for (int j = 0; j < 8; ++j) acc[j] = padd(acc[j], pload<P>(p + i + L * j));
  for (int j = 1; j < 8; ++j) acc[0] = padd(acc[0], acc[j]);
  float s = predux(acc[0]);
#endif
  for (; i < n; ++i) s += p[i];
  return s;
}

void bm_stream_read(benchmark::State& st) {
  const int T = config().threads;
  const float* p = stream_buffer();
  if (!p) {
    st.SkipWithError("roofline/stream_read: could not allocate 1 GiB");
    return;
  }
  const std::int64_t n = static_cast<std::int64_t>(kStreamFloats);
  double total = 0.0;
  float sink = 0.0f;
  for (auto _ : st) {
    Clock c;
#pragma omp parallel num_threads(T) reduction(+ : sink)
    {
      const std::int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      // Slices of whole 64-byte lines, matching the first touch's static schedule roughly.
      const std::int64_t per = (n / nt + 15) / 16 * 16;
      const std::int64_t b = std::min(n, t * per), e = std::min(n, b + per);
      sink += read_slice(p + b, e - b);
    }
    const double s = c.seconds();
    total += s;
  }
  benchmark::DoNotOptimize(sink);
  const double bytes =
      static_cast<double>(kStreamFloats * sizeof(float)) * static_cast<double>(st.iterations());
  const double gbps = bytes / total / 1e9;
  results().stream_gbps = gbps;
  st.counters["GBps"] = gbps;
  st.SetLabel("1 GiB, 8 accumulators x " + std::to_string(T) + " threads");
}

// Eigen sgemm on the two GEMM shapes of one dense attention head at n = 4096, d = 128:
// S = Q K^T ([n x d] x [d x n]) and O = P V ([n x n] x [n x d]).
void bm_eigen_gemm(benchmark::State& st, index_t m, index_t k, index_t n, const std::string& key) {
  const int T = config().threads;
  Eigen::setNbThreads(T);
  Eigen::MatrixXf A(m, k), B(k, n), C(m, n);
  fill_uniform(A.data(), static_cast<std::size_t>(A.size()), 11);
  fill_uniform(B.data(), static_cast<std::size_t>(B.size()), 12);
  double total = 0.0;
  for (auto _ : st) {
    Clock c;
    C.noalias() = A * B;
    benchmark::DoNotOptimize(C.data());
    benchmark::ClobberMemory();
    const double s = c.seconds();
    total += s;
  }
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(k) *
                       static_cast<double>(n) * static_cast<double>(st.iterations());
  const double gflops = flops / total / 1e9;
  results().gemm_gflops[key] = gflops;
  st.counters["GFLOPs"] = gflops;
  st.SetLabel("Eigen " EIGEN_MAKESTRING(EIGEN_WORLD_VERSION) "." EIGEN_MAKESTRING(
                  EIGEN_MAJOR_VERSION) "." EIGEN_MAKESTRING(EIGEN_MINOR_VERSION) ", " +
              std::to_string(Eigen::nbThreads()) + " threads");
}

}  // namespace

void register_rooflines() {
  add("roofline/fma_peak", bm_fma_peak);
  add("roofline/bf16_dot_peak", bm_bf16_dot_peak);
  add("roofline/stream_read", bm_stream_read);
  for (auto [m, k, n] :
       {std::array<index_t, 3>{4096, 128, 4096}, std::array<index_t, 3>{4096, 4096, 128}}) {
    const std::string key =
        "m:" + std::to_string(m) + "/k:" + std::to_string(k) + "/n:" + std::to_string(n);
    add("roofline/eigen_gemm/" + key,
        [m = m, k = k, n = n, key](benchmark::State& st) { bm_eigen_gemm(st, m, k, n, key); });
  }
}

// ---------------------------------------------------------------------------------------------
// End-of-run summary: the dense kernels against the rooflines (ratios, not assertions)
// ---------------------------------------------------------------------------------------------

namespace {

std::string ratio(double num, double den, const char* fmt) {
  if (!(num > 0.0) || !(den > 0.0)) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, num / den);
  return buf;
}

std::string ms(double seconds) {
  if (!(seconds > 0.0)) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f ms", seconds * 1e3);
  return buf;
}

void print_summary() {
  const Results& r = results();
  if (r.prefill_dense.empty() && r.decode_dense.empty()) return;
  std::fprintf(stderr,
               "\n== dense kernels vs this machine's rooflines, %d thread%s (ratios, not "
               "assertions) ==\n",
               config().threads, config().threads == 1 ? "" : "s");
  std::fprintf(stderr,
               "rooflines: fma_peak %.1f GFLOP/s, bf16_dot_peak %.1f GFLOP/s, stream_read "
               "%.2f GB/s (0: not run; see --benchmark_filter)\n",
               r.fma_gflops, r.bf16_gflops, r.stream_gbps);
  double gemm_best = 0.0;
  for (const auto& [k, g] : r.gemm_gflops) gemm_best = std::max(gemm_best, g);
  const std::string prefill_target = dense_key("prefill", 4096, "fp32");
  const std::string decode_target = dense_key("decode", 131072, "bf16");
  const bool have_prefill = r.prefill_dense.count(prefill_target) > 0;
  const bool have_decode = r.decode_dense.count(decode_target) > 0;
  // The target shapes when they ran, else every dense shape that did.
  for (const auto& [key, e] : r.prefill_dense) {
    if (have_prefill && key != prefill_target) continue;
    std::fprintf(stderr,
                 "prefill dense causal %s n=%lld: %.1f GFLOP/s = %s of fma_peak, %s of "
                 "eigen_gemm%s\n",
                 e.dtype.c_str(), static_cast<long long>(e.n), e.gflops,
                 ratio(e.gflops, r.fma_gflops, "%.2f").c_str(),
                 ratio(e.gflops, gemm_best, "%.2f").c_str(),
                 key == prefill_target ? "   <- target shape" : "");
  }
  for (const auto& [key, e] : r.decode_dense) {
    if (have_decode && key != decode_target) continue;
    // The bf16 dtype computes bf16 products (vdpbf16ps): its compute roof is bf16_dot_peak.
    const bool bf16_products = e.dtype == "bf16";
    const double peak = bf16_products ? r.bf16_gflops : r.fma_gflops;
    const double t_bw = r.stream_gbps > 0 ? e.bytes / (r.stream_gbps * 1e9) : 0.0;
    const double t_fl = peak > 0 ? e.flops / (peak * 1e9) : 0.0;
    const double roof = (t_bw > 0 && t_fl > 0) ? std::max(t_bw, t_fl) : 0.0;
    std::fprintf(stderr,
                 "decode dense %s n=%lld: %s vs roofline %s = max(bytes/stream_read %s, "
                 "flops/%s %s): %s of roofline (roofline time / time)%s\n",
                 e.dtype.c_str(), static_cast<long long>(e.n), ms(e.seconds).c_str(),
                 ms(roof).c_str(), ms(t_bw).c_str(), bf16_products ? "bf16_dot_peak" : "fma_peak",
                 ms(t_fl).c_str(), ratio(roof, e.seconds, "%.2f").c_str(),
                 key == decode_target ? "   <- target shape" : "");
  }
  if (!have_prefill || !have_decode)
    std::fprintf(stderr,
                 "(target shapes prefill fp32 n=4096, decode bf16 n=131072: %s; the "
                 "default preset runs both)\n",
                 !have_prefill && !have_decode ? "neither ran"
                 : !have_prefill               ? "prefill did not run"
                                               : "decode did not run");
}

void usage() {
  std::printf(
      "sparse_attn_bench [--quick | --full] [--threads T] [--no-progress] [benchmark flags]\n"
      "  (default)      core set: rooflines; prefill n 4096, 16384 (dense, sliding window at CR\n"
      "                 2/5/10/20, other prefill methods at CR 10); decode n 131072\n"
      "  --quick        smoke run: every family at its smallest size, short min_time (< 2 min)\n"
      "  --full         prefill n 1024..65536, decode n 4096..131072, CR 1/2/5/10/20, all methods\n"
      "  --threads T    threads for kernels, selections and rooflines (default 1)\n"
      "  --no-progress  no progress lines on stderr\n"
      "Any other flag goes to Google Benchmark, e.g. --benchmark_filter=prefill/dense\n"
      "  --benchmark_format=json --benchmark_out=FILE --benchmark_min_time=S "
      "--benchmark_list_tests\n"
      "Benchmark names: prefill/<method>/n:<N>/cr:<CR>/<fp32|bf16> (K/V dtype; Q fp32),\n"
      "  decode/<method>/n:<N>/cr:<CR>/<dtype>, roofline/<name>. See docs/BENCHMARKS.md.\n");
}

}  // namespace
}  // namespace sa_bench

int main(int argc, char** argv) {
  using namespace sa_bench;
  Config& cfg = config();
  std::vector<char*> rest{argv[0]};
  bool user_min_time = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick")
      cfg.preset = Preset::quick;
    else if (a == "--full")
      cfg.preset = Preset::full;
    else if (a == "--core")
      cfg.preset = Preset::core;
    else if (a == "--no-progress")
      cfg.progress = false;
    else if (a == "--threads" || a.rfind("--threads=", 0) == 0) {
      const char* v = a == "--threads" ? (i + 1 < argc ? argv[++i] : nullptr) : argv[i] + 10;
      char* end = nullptr;
      const long t = v ? std::strtol(v, &end, 10) : 0;
      if (!v || *end != '\0' || t < 1 || t > 4096) {
        std::fprintf(stderr, "sparse_attn_bench: --threads needs an integer >= 1, got '%s'\n",
                     v ? v : "");
        return 2;
      }
      cfg.threads = static_cast<int>(t);
    } else if (a == "--help" || a == "-h") {
      usage();
      rest.push_back(argv[i]);  // Google Benchmark's own flag list follows
    } else {
      if (a.rfind("--benchmark_min_time", 0) == 0) user_min_time = true;
      rest.push_back(argv[i]);
    }
  }
  // Quick: a short min_time unless the user gave one (a flag, not MinTime(): no name suffix).
  static char quick_min_time[] = "--benchmark_min_time=0.02";
  if (cfg.preset == Preset::quick && !user_min_time) rest.insert(rest.begin() + 1, quick_min_time);
  omp_set_num_threads(cfg.threads);
  Eigen::setNbThreads(cfg.threads);

  int bargc = static_cast<int>(rest.size());
  rest.push_back(nullptr);
  benchmark::Initialize(&bargc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(bargc, rest.data())) return 2;

  benchmark::AddCustomContext("sparse_attn_preset", preset_name(cfg.preset));
  benchmark::AddCustomContext("sparse_attn_threads", std::to_string(cfg.threads));
  std::string isa;
#if defined(__AVX512F__)
  isa += "avx512f ";
#endif
#if defined(__AVX512BF16__)
  isa += "avx512bf16 ";
#endif
#if defined(__AVX2__)
  isa += "avx2 ";
#endif
#if defined(__FMA__)
  isa += "fma ";
#endif
  isa += Eigen::SimdInstructionSetsInUse();
  benchmark::AddCustomContext("sparse_attn_isa", isa);
  // The kernels' run-time target (a portable build picks it from cpuid; SPARSE_ATTN_TARGET forces one).
  benchmark::AddCustomContext("sparse_attn_cpu_target", sparse_attn::target_name(sparse_attn::cpu_target()));

  register_rooflines();  // first: later summaries divide by them
  register_prefill();    // dense before the other methods of each (n, dtype)
  register_decode();
  progress("preset %s, %d thread%s", preset_name(cfg.preset), cfg.threads,
           cfg.threads == 1 ? "" : "s");
  benchmark::RunSpecifiedBenchmarks();
  print_summary();
  benchmark::Shutdown();
  return 0;
}
