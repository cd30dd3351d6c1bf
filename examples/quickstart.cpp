// Quickstart: one causal prefill with dense attention and with a sliding window + sinks, on random
// Q/K/V with grouped-query heads. Prints each method's measured compression, time and how far its
// output is from dense.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <sparse_attn/sparse_attn.hpp>
#include <vector>

int main() {
  using namespace sparse_attn;
  const index_t Hq = 8, Hkv = 2, n = 2048, d = 64;
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](index_t count) {
    std::vector<float> x(static_cast<std::size_t>(count));
    for (float& e : x) e = normal(rng);
    return x;
  };
  const std::vector<float> q = random(Hq * n * d), k = random(Hkv * n * d), v = random(Hkv * n * d);
  TensorView<const float> qv(q.data(), Hq, n, d), kv(k.data(), Hkv, n, d), vv(v.data(), Hkv, n, d);

  std::vector<float> dense_out(q.size());
  std::printf("%-26s %12s %8s %10s %14s\n", "method", "pairs", "CR", "ms", "max|O-dense|");
  auto run = [&](const char* name, const IntervalMask& mask, std::vector<float>& out) {
    TensorView<float> ov(out.data(), Hq, n, d);
    const auto t0 = std::chrono::steady_clock::now();
    prefill(qv, kv, vv, ov, mask);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    float diff = 0.0f;
    for (std::size_t i = 0; i < out.size(); ++i)
      diff = std::max(diff, std::abs(out[i] - dense_out[i]));
    std::printf("%-26s %12lld %7.2fx %10.2f %14.3e\n", name, static_cast<long long>(mask.pairs()),
                mask.compression(), ms, diff);
  };
  run("dense (causal)", masks::causal(Hq, n, n), dense_out);
  std::vector<float> sw_out(q.size());
  run("sliding_window W=256 S=4", masks::sliding_window(Hq, n, n, 256, 4, 64), sw_out);
  return 0;
}
