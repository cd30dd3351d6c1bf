// Quickstart: views over your Q/K/V memory (no copies), a sparse mask chosen by a method at a
// target compression, and the one prefill kernel that runs any mask. Prints the achieved
// compression and how far the sparse output is from dense causal attention.
// Usage: quickstart [tokens]   (default 8192)
#include <sparse_attn/sparse_attn.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
  using namespace sparse_attn;
  const index_t n = argc > 1 ? std::atoll(argv[1]) : 8192, Hq = 8, Hkv = 2, d = 64;
  // Synthetic heads: a signal drifting along the positions plus noise (nearby tokens attend).
  std::vector<float> q(Hq * n * d), k(Hkv * n * d), v(Hkv * n * d), dense(q.size()),
      sparse(q.size()), s(n * d);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  for (index_t i = d; i < n * d; ++i) s[i] = 0.98f * s[i - d] + 0.2f * normal(rng);
  for (auto* x : {&q, &k, &v})
    for (std::size_t i = 0; i < x->size(); ++i)
      (*x)[i] = (x == &v ? 0.0f : 1.3f * s[i % s.size()]) + normal(rng);

  // Views [heads, tokens, dim] over your memory (strides: TensorView's other constructors).
  const TensorView<const float> qv(q.data(), Hq, n, d), kv(k.data(), Hkv, n, d),
      vv(v.data(), Hkv, n, d);
  prefill(qv, kv, vv, TensorView<float>(dense.data(), Hq, n, d), masks::causal(Hq, n, n));

  // A method selects which (query, key) pairs to compute; the same kernel executes them.
  const auto sel = methods::VerticalSlash{}.select(qv, kv, methods::Budget::compression(10));
  prefill(qv, kv, vv, TensorView<float>(sparse.data(), Hq, n, d), sel.mask);

  double err = 0, norm = 0;
  for (std::size_t i = 0; i < q.size(); ++i) {
    err += (sparse[i] - dense[i]) * static_cast<double>(sparse[i] - dense[i]);
    norm += dense[i] * static_cast<double>(dense[i]);
  }
  std::printf("vertical_slash: %lld of %lld causal pairs, CR %.2f (target 10)\n",
              static_cast<long long>(sel.mask.pairs()),
              static_cast<long long>(sel.mask.shape().dense_pairs()), sel.mask.compression());
  std::printf("rel L2 error vs dense causal attention: %.3f\n", std::sqrt(err / norm));
  return 0;
}
