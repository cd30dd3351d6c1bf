// Tiny causal attention through the installed package; exits 0 when the output is sane.
#include <cmath>
#include <cstdio>
#include <sparse_attn/sparse_attn.hpp>
#include <vector>

int main() {
  using namespace sparse_attn;
  const index_t H = 2, n = 16, d = 8;
  std::vector<float> q(H * n * d), k(H * n * d), v(H * n * d), o(H * n * d, -1.0f);
  for (std::size_t i = 0; i < q.size(); ++i) {
    q[i] = std::sin(0.1f * static_cast<float>(i));
    k[i] = std::cos(0.07f * static_cast<float>(i));
    v[i] = static_cast<float>(i % 5);
  }
  TensorView<const float> qv(q.data(), H, n, d), kv(k.data(), H, n, d), vv(v.data(), H, n, d);
  TensorView<float> ov(o.data(), H, n, d);
  const IntervalMask mask = masks::causal(H, n, n, 4);
  prefill(qv, kv, vv, ov, mask, PrefillOptions{});
  // Query 0 sees only key 0, so its output is V's first row.
  for (index_t h = 0; h < H; ++h)
    for (index_t c = 0; c < d; ++c)
      if (std::abs(o[h * n * d + c] - v[h * n * d + c]) > 1e-5f) {
        std::printf("consumer: wrong output at head %lld dim %lld\n", static_cast<long long>(h),
                    static_cast<long long>(c));
        return 1;
      }
  for (float x : o)
    if (!std::isfinite(x) || x < 0.0f || x > 4.0f) return 1;  // convex mix of V's values in [0, 4]
#if defined(_OPENMP)
  const char* openmp = "on";
#else
  const char* openmp = "off";  // what RunInstallConsumer.cmake checks without OpenMP
#endif
  std::printf("consumer: ok (pairs=%lld, compression=%.2f, OpenMP %s)\n",
              static_cast<long long>(mask.pairs()), mask.compression(), openmp);
  return 0;
}
