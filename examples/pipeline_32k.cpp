// The serving loop end to end with DecodeSession (pipeline.hpp), on 32k tokens of synthetic data by
// default: a sliding-window prefill (W = tokens / 32), then 8 decode steps with every decode method
// (dense, Quest, SnapKV, Ada-SnapKV, H2O, StreamingLLM) at a target compression of 10, each plugged
// into the session as its DecodePolicy (methods::make_policy(method, Budget::compression(10))).
// Each method prints the keys a step reads, its achieved CR (against dense attention over every
// position so far), selection and kernel time, and the relative L2 error of its outputs against
// dense decoding. DecodeSession owns the cache and the per-step plumbing; engine_layer.cpp writes
// the same kind of loop against the kernels directly (the engine's memory, plans and workspace).
//
// Data: Hq = 8, Hkv = 2, d = 64, bf16 cache, Gaussian background. Each decode step's queries follow
// a topic direction; four "needle" keys per topic are planted far back in the prompt (about half
// of a step's attention mass) and the prompt's last 64 queries touch the same topics, so
// query-aware selection and window-scored eviction have something to find.
//
// Usage: pipeline_32k [prompt_tokens] [decode_steps]   (defaults 32768 8; prompt_tokens >= 1024)

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <sparse_attn/pipeline.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <vector>

using namespace sparse_attn;

namespace {

constexpr index_t Hq = 8, Hkv = 2, G = Hq / Hkv, d = 64;
index_t n = 32768, steps = 8, total = n + steps;  // set from the command line

struct Workload {
  std::vector<float> q, k, v;  // [Hq][total][d], [Hkv][total][d]
  TensorView<const float> qv() const { return {q.data(), Hq, total, d}; }
  TensorView<const float> kv() const { return {k.data(), Hkv, total, d}; }
  TensorView<const float> vv() const { return {v.data(), Hkv, total, d}; }
};

Workload make_workload() {
  Workload w;
  std::mt19937 rng(2025);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](std::vector<float>& x, index_t size) {
    x.resize(static_cast<std::size_t>(size));
    for (float& e : x) e = normal(rng);
  };
  fill(w.q, Hq * total * d);
  fill(w.k, Hkv * total * d);
  fill(w.v, Hkv * total * d);
  std::uniform_int_distribution<index_t> where(64, n - n / 16);
  std::uniform_int_distribution<index_t> topic_of(0, steps - 1);
  for (index_t hk = 0; hk < Hkv; ++hk) {
    std::vector<float> topics(static_cast<std::size_t>(steps * d));  // one direction per step
    for (float& e : topics) e = normal(rng);
    auto topic = [&](index_t s) { return topics.data() + s * d; };
    auto q_row = [&](index_t h, index_t t) { return w.q.data() + (h * total + t) * d; };
    auto k_row = [&](index_t t) { return w.k.data() + (hk * total + t) * d; };
    for (index_t g = 0; g < G; ++g) {
      for (index_t s = 0; s < steps; ++s)  // decode queries follow their step's topic
        for (index_t c = 0; c < d; ++c)
          q_row(hk * G + g, n + s)[c] = topic(s)[c] + 0.5f * normal(rng);
      for (index_t t = n - 64; t < n; ++t) {  // the prompt's last queries touch the same topics
        const float* u = topic(topic_of(rng));
        for (index_t c = 0; c < d; ++c) q_row(hk * G + g, t)[c] = u[c] + 0.5f * normal(rng);
      }
    }
    for (index_t s = 0; s < steps; ++s)
      for (int needle = 0; needle < 4; ++needle) {  // keys that answer a topic, far in the past
        float* kr = k_row(where(rng));
        for (index_t c = 0; c < d; ++c) kr[c] = 1.2f * topic(s)[c] + 0.3f * normal(rng);
      }
  }
  return w;
}

struct MethodRun {
  std::string name;
  std::vector<float> out;  // [steps][Hq][d]
  double keys = 0, cr = 0, select_ms = 0, kernel_ms = 0, evict_ms = 0, ingest_ms = 0;
  index_t cache_tokens = 0;
};

// method: nullptr for dense decode.
template <class Cache>
MethodRun run_method(const std::string& name, const Workload& w,
                     std::unique_ptr<methods::DecodePolicy<Cache, float>> policy,
                     bool with_prefill, std::vector<float>* prefill_out = nullptr) {
  kv::CacheOptions co;
  co.kv_heads = Hkv;
  co.head_dim = d;
  co.capacity = total;
  co.page_size = 16;
  co.key_bounds = policy && policy->needs_key_bounds();
  Cache cache(co);
  DecodeSession<Cache> session(cache, std::move(policy));
  MethodRun r;
  r.name = name;
  const auto t0 = std::chrono::steady_clock::now();
  const auto q = w.qv().slice_tokens(0, n), k = w.kv().slice_tokens(0, n),
             v = w.vv().slice_tokens(0, n);
  PrefillReport pr;
  if (with_prefill) {
    // Any prefill mask, or a callable (q, k) -> mask (a method's select(q, k, budget).mask).
    prefill_out->assign(static_cast<std::size_t>(Hq * n * d), 0.0f);
    const index_t window = n / 32;
    pr = session.prefill(
        q, k, v, TensorView<float>(prefill_out->data(), Hq, n, d),
        [window](const TensorView<const float>& qq, const TensorView<const float>& kk) {
          return masks::sliding_window(qq.heads, qq.tokens, kk.tokens, window, 4, 64);
        });
    std::printf("prefill: sliding window W=%lld S=4, %lld pairs, CR %.1fx, %.0f ms\n",
                static_cast<long long>(window), static_cast<long long>(pr.pairs), pr.compression(),
                pr.prefill_ms);
  } else {
    pr = session.ingest(q, k, v);  // cache + eviction only (the prefill output is shared)
  }
  r.ingest_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  r.out.resize(static_cast<std::size_t>(steps * Hq * d));
  for (index_t s = 0; s < steps; ++s) {
    const index_t t = n + s;
    const StepReport sr = session.step(w.qv().slice_tokens(t, 1), w.kv().slice_tokens(t, 1),
                                       w.vv().slice_tokens(t, 1),
                                       TensorView<float>(r.out.data() + s * Hq * d, Hq, 1, d));
    r.keys += sr.stats.keys_per_query(Hq, 1) / steps;
    r.cr += sr.compression() / steps;
    r.select_ms += sr.select_ms / steps;
    r.kernel_ms += sr.kernel_ms / steps;
    r.evict_ms += sr.evict_ms / steps;
    r.cache_tokens = sr.cache_tokens;
  }
  return r;
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * static_cast<double>(a[i] - ref[i]);
    den += ref[i] * static_cast<double>(ref[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  n = argc > 1 ? std::atoll(argv[1]) : 32768;
  steps = argc > 2 ? std::atoll(argv[2]) : 8;
  total = n + steps;
  if (n < 1024 || steps < 1) {
    std::fprintf(stderr, "usage: pipeline_32k [prompt_tokens >= 1024] [decode_steps >= 1]\n");
    return 2;
  }
  const auto start = std::chrono::steady_clock::now();
  const Workload w = make_workload();
  using Contiguous = kv::ContiguousCache<bf16>;
  using Paged = kv::PagedCache<bf16>;
  std::vector<float> prefill_out;
  std::vector<MethodRun> runs;

  const methods::Budget cr10 = methods::Budget::compression(10);
  runs.push_back(run_method<Contiguous>("dense", w, nullptr, true, &prefill_out));
  runs.push_back(run_method<Paged>("quest (paged cache)", w,
                                   methods::make_policy<Paged, float>(methods::Quest{}, cr10),
                                   false));
  runs.push_back(run_method<Contiguous>(
      "snapkv", w, methods::make_policy<Contiguous, float>(methods::SnapKV{}, cr10), false));
  runs.push_back(run_method<Paged>(
      "ada_snapkv (paged)", w, methods::make_policy<Paged, float>(methods::AdaSnapKV{}, cr10),
      false));
  methods::H2O h2o;
  h2o.prefill_queries = 256;  // seed scores from the last 256 prompt queries (O(n^2) otherwise)
  runs.push_back(
      run_method<Contiguous>("h2o", w, methods::make_policy<Contiguous, float>(h2o, cr10), false));
  runs.push_back(run_method<Contiguous>(
      "streaming", w, methods::make_policy<Contiguous, float>(methods::StreamingLLM{}, cr10),
      false));

  std::printf(
      "\n%d prompt tokens, %d decode steps, Hq=%d Hkv=%d d=%d, bf16 cache; per step means:\n",
      static_cast<int>(n), static_cast<int>(steps), static_cast<int>(Hq), static_cast<int>(Hkv),
      static_cast<int>(d));
  std::printf("%-20s %10s %8s %9s %9s %9s %12s %10s %10s\n", "method", "keys/query", "CR",
              "select ms", "kernel ms", "evict ms", "cache tokens", "ingest ms", "rel L2 err");
  for (const MethodRun& r : runs)
    std::printf("%-20s %10.0f %7.1fx %9.3f %9.3f %9.3f %12lld %10.0f %10.3f\n", r.name.c_str(),
                r.keys, r.cr, r.select_ms, r.kernel_ms, r.evict_ms,
                static_cast<long long>(r.cache_tokens), r.ingest_ms, rel_l2(r.out, runs[0].out));
  std::printf("\ntotal %.1f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return 0;
}
