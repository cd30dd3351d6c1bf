// Compiled twice into one program by tests/multi_arch/CMakeLists.txt: once with
// -march=x86-64-v2 and once with -march=x86-64-v3. MULTI_ARCH_FN names this copy's entry point, so
// the only symbols the two copies have in common are the library's, and those must differ by
// their ISA-tagged namespace (cmake/RunMultiArchTest.cmake checks the objects with nm).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <vector>

#if !defined(MULTI_ARCH_FN) || !defined(MULTI_ARCH_NAME)
#error "MULTI_ARCH_FN and MULTI_ARCH_NAME must name this translation unit's entry point and -march"
#endif

using namespace sparse_attn;

namespace {

constexpr index_t Hq = 4, Hkv = 2, n = 200, d = 64;

template <class T>
std::vector<T> random_values(std::mt19937& rng, index_t count) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> x(static_cast<std::size_t>(count));
  for (T& e : x) e = T(normal(rng));
  return x;
}

// tests/test_kernels.cpp's expect_close metric: max |kernel - oracle| over the largest oracle
// magnitude (at least 1); a non-finite output is an infinite error.
double error(const std::vector<float>& got, const reference::Result& want) {
  double scale = 1.0, err = 0.0;
  for (double x : want.out) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want.out[i]));
  }
  return err / scale;
}

template <class TKV>
double prefill_error(unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<float> q = random_values<float>(rng, Hq * n * d);
  const std::vector<TKV> k = random_values<TKV>(rng, Hkv * n * d), v = random_values<TKV>(rng, Hkv * n * d);
  const TensorView<const float> qv(q.data(), Hq, n, d);
  const TensorView<const TKV> kv(k.data(), Hkv, n, d), vv(v.data(), Hkv, n, d);
  std::vector<float> out(q.size(), -7.0f);
  const IntervalMask mask = masks::causal(Hq, n, n);  // causal
  prefill(qv, kv, vv, TensorView<float>(out.data(), Hq, n, d), mask);
  return error(out, reference::attention_masked(qv, kv, vv, 1.0 / std::sqrt(double(d)), mask));
}

// One new token against all n keys; split = 64 so the split-KV merge runs too.
template <class TKV>
double decode_error(unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<float> q = random_values<float>(rng, Hq * d);
  const std::vector<TKV> k = random_values<TKV>(rng, Hkv * n * d), v = random_values<TKV>(rng, Hkv * n * d);
  const TensorView<const float> qv(q.data(), Hq, 1, d);
  const TensorView<const TKV> kv(k.data(), Hkv, n, d), vv(v.data(), Hkv, n, d);
  std::vector<float> out(q.size(), -7.0f);
  DecodeOptions opt;
  opt.split = 64;
  decode(qv, kv, vv, TensorView<float>(out.data(), Hq, 1, d), KeySelection::all(), opt);
  return error(out, reference::attention(qv, kv, vv, 1.0 / std::sqrt(double(d)),
                                         [](index_t, index_t, index_t) { return true; }));
}

}  // namespace

// The largest error of causal prefill and decode, fp32 and bf16 K/V, over every CPU target this
// copy can run here: its generic kernels (Eigen packets of its own -march, the code the two copies
// must not share) and the run-time dispatched ones at or above its level (arch/target.hpp). The
// forced target is this copy's own state: it lives in the ISA-tagged namespace too.
extern "C++" double MULTI_ARCH_FN() {
  double err = 0.0;
  std::string names;
  for (const CpuTarget t : usable_cpu_targets()) {
    set_cpu_target(t);
    err = std::max({err, prefill_error<float>(1), prefill_error<bf16>(2), decode_error<float>(3),
                    decode_error<bf16>(4)});
    names += std::string(names.empty() ? "" : ", ") + target_name(t);
  }
  reset_cpu_target();
  std::printf("multi_arch: %s copy checked on %s\n", MULTI_ARCH_NAME, names.c_str());
  return err;
}
