// A consumer translation unit for cmake/RunStrictConsumer.cmake: the umbrella header and an
// instantiation of each main entry point, compiled with the strictest warnings a downstream
// project commonly uses (-Wconversion -Wsign-conversion -Wshadow ... -Werror), with and without
// OpenMP and exceptions. Our headers are included with -I, not -isystem, so every warning in them
// counts; the code here has to be clean itself.
#include <sparse_attn/sparse_attn.hpp>

#include <cstddef>
#include <cstdio>
#include <random>
#include <vector>

using namespace sparse_attn;

namespace {

constexpr index_t Hq = 4, Hkv = 2, n = 256, d = 64;

std::size_t count(index_t heads, index_t tokens) {
  return static_cast<std::size_t>(heads * tokens * d);
}

template <class T>
std::vector<T> random_values(std::mt19937& rng, std::size_t size) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> x(size);
  for (T& e : x) e = from_float<T>(normal(rng));
  return x;
}

// Prefill over K/V of type T: dense causal, sliding window + sinks (the bare pattern and the
// method at a target CR), block-sparse selection.
template <class T>
float prefill_all(std::mt19937& rng) {
  const std::vector<float> q = random_values<float>(rng, count(Hq, n));
  const std::vector<T> k = random_values<T>(rng, count(Hkv, n)), v = random_values<T>(rng, count(Hkv, n));
  const TensorView<const float> qv(q.data(), Hq, n, d);
  const TensorView<const T> kv(k.data(), Hkv, n, d), vv(v.data(), Hkv, n, d);
  std::vector<float> out(q.size());
  const TensorView<float> ov(out.data(), Hq, n, d);
  prefill(qv, kv, vv, ov, masks::causal(Hq, n, n));
  prefill(qv, kv, vv, ov, masks::sliding_window(Hq, n, n, 64, 4, 64));
  const auto window = methods::SlidingWindow{}.select(qv, kv, methods::Budget::compression(2.0));
  prefill(qv, kv, vv, ov, window.mask);
  const auto bs = methods::BlockSparse{}.select(qv, kv, methods::Budget::compression(2.0));
  prefill(qv, kv, vv, ov, bs.mask);
  return out[0] + static_cast<float>(bs.stats.compression() + window.stats.compression());
}

// A decode step straight on K/V views, then through a paged bf16 KV cache: Quest's page selection,
// then SnapKV eviction of the cache.
float decode_all(std::mt19937& rng) {
  const std::vector<float> q = random_values<float>(rng, count(Hq, 1));
  const std::vector<float> k = random_values<float>(rng, count(Hkv, n)), v = random_values<float>(rng, count(Hkv, n));
  const TensorView<const float> qv(q.data(), Hq, 1, d);
  const TensorView<const float> kv(k.data(), Hkv, n, d), vv(v.data(), Hkv, n, d);
  std::vector<float> out(q.size());
  const TensorView<float> ov(out.data(), Hq, 1, d);
  decode(qv, kv, vv, ov);

  kv::CacheOptions co;
  co.kv_heads = Hkv;
  co.head_dim = d;
  co.capacity = n;
  co.page_size = 16;
  kv::PagedCache<bf16> cache(co);
  cache.append(kv, vv);
  const methods::Budget cr4 = methods::Budget::compression(4.0);
  const methods::DecodeSelection plan = methods::Quest{}.select(qv, cache, cr4);
  decode(qv, cache, ov, plan.keys);

  const std::vector<float> window = random_values<float>(rng, count(Hq, 32));
  const kv::EvictionPlan evicted =
      methods::evict(methods::SnapKV{}, TensorView<const float>(window.data(), Hq, 32, d), cache, cr4);
  decode(qv, cache, ov);
  return out[0] + static_cast<float>(evicted.stats.pairs);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const float sum = prefill_all<float>(rng) + prefill_all<bf16>(rng) + decode_all(rng);
  std::printf("strict_consumer: %g\n", static_cast<double>(sum));
  return 0;
}
