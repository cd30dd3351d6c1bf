// split_merge: one long decode split across workers, each holding one shard of the KV cache, and
// the partial results joined with merge_states. Here the workers are threads of one process; the
// same code serves a cache spread over several machines or devices (ship each shard's output and
// LSE, a few KB, instead of the cache). Within one process the decode kernel already splits a
// long cache across its executor's threads by itself.
//
// Each worker runs the decode kernel on its shard, a zero-copy slice of the token-major cache,
// with AttentionOptions::lse set: its output is softmax attention over the shard's keys alone,
// and the LSE (log-sum-exp of the shard's logits) is what merge_states needs to weigh it exactly
// against the others. Partials over disjoint key sets merge in any order or grouping (as they
// arrive, or as a tree). Causality: the new tokens are the cache's last ones; the shard holding
// them runs causal, every earlier shard precedes all of them (DecodeOptions::causal = false).
// Checked against one decode call over the whole cache: the merged output and LSE must match it
// to fp32 rounding (only the summation order differs); exit 1 otherwise.
//
// Usage: split_merge [cache_tokens] [workers]   (defaults 131072 8)
#include <sparse_attn/sparse_attn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

using namespace sparse_attn;

int main(int argc, char** argv) {
  const index_t n = argc > 1 ? std::atoll(argv[1]) : 131072;
  const index_t workers = argc > 2 ? std::atoll(argv[2]) : 8;
  const index_t Hq = 32, Hkv = 8, d = 128, n_q = 4;  // 4 new tokens (e.g. speculative drafts)
  if (workers < 1 || n < workers * n_q) {
    std::fprintf(stderr,
                 "usage: split_merge [cache_tokens] [workers] (cache_tokens >= 4 x workers)\n");
    return 2;
  }

  // The KV cache, token-major bf16 [n][Hkv][d]; the new tokens' queries Q [Hq][n_q][d] fp32.
  std::uint64_t seed = 7;
  auto random = [&seed] {  // xorshift64: uniform in [-1.7, 1.7), variance 1 (fast for 10^8 values)
    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
    return static_cast<float>(static_cast<std::int32_t>(seed >> 32)) * (1.7320508f / 2147483648.0f);
  };
  std::vector<bf16> ks(static_cast<std::size_t>(n * Hkv * d)), vs(ks.size());
  for (auto* x : {&ks, &vs})
    for (bf16& e : *x) e = bf16(random());
  std::vector<float> qs(static_cast<std::size_t>(Hq * n_q * d));
  for (float& e : qs) e = 1.5f * random();
  const auto k = TensorView<const bf16>::token_major(ks.data(), Hkv, n, d);
  const auto v = TensorView<const bf16>::token_major(vs.data(), Hkv, n, d);
  const TensorView<const float> q(qs.data(), Hq, n_q, d);

  // Each worker: its shard [begin, end), its output [Hq][n_q][d] and LSE [Hq][n_q].
  struct Partial {
    index_t begin = 0, end = 0;
    std::vector<float> out, lse;
    double ms = 0;
  };
  std::vector<Partial> parts(static_cast<std::size_t>(workers));
  auto work = [&](Partial& p) {
    const auto t0 = std::chrono::steady_clock::now();
    SerialExecutor own_thread;  // this worker's thread is its whole budget
    DecodeOptions opt;
    opt.executor = &own_thread;
    opt.causal = p.end == n;  // only the last shard holds the new tokens
    opt.lse = LseView(p.lse.data(), n_q);
    const auto ks_ = k.slice_tokens(p.begin, p.end - p.begin),
               vs_ = v.slice_tokens(p.begin, p.end - p.begin);
    decode(q, ks_, vs_, TensorView<float>(p.out.data(), Hq, n_q, d), KeySelection::all(), opt);
    p.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  for (index_t w = 0; w < workers; ++w) {
    Partial& p = parts[static_cast<std::size_t>(w)];
    p.begin = n * w / workers;
    p.end = n * (w + 1) / workers;
    p.out.resize(qs.size());
    p.lse.resize(static_cast<std::size_t>(Hq * n_q));
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (Partial& p : parts) threads.emplace_back(work, std::ref(p));
  for (std::thread& t : threads) t.join();

  // Join: fold every partial into the first one (any order; merge_states is exact).
  Partial& acc = parts[0];
  for (std::size_t w = 1; w < parts.size(); ++w)
    merge_states(TensorView<float>(acc.out.data(), Hq, n_q, d), LseView(acc.lse.data(), n_q),
                 TensorView<const float>(parts[w].out.data(), Hq, n_q, d),
                 LseView(parts[w].lse.data(), n_q));
  const double split_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  // The single call over the whole cache (on the default executor).
  std::vector<float> ref(qs.size()), ref_lse(static_cast<std::size_t>(Hq * n_q));
  DecodeOptions opt;
  opt.lse = LseView(ref_lse.data(), n_q);
  const auto t1 = std::chrono::steady_clock::now();
  decode(q, k, v, TensorView<float>(ref.data(), Hq, n_q, d), KeySelection::all(), opt);
  const double single_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t1).count();

  float diff = 0, scale = 0, lse_diff = 0, lse_scale = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::abs(acc.out[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  for (std::size_t i = 0; i < ref_lse.size(); ++i) {
    lse_diff = std::max(lse_diff, std::abs(acc.lse[i] - ref_lse[i]));
    lse_scale = std::max(lse_scale, std::abs(ref_lse[i]));
  }

  std::printf(
      "decode of %lld new tokens, Hq=%lld, over %lld cached tokens (Hkv=%lld d=%lld bf16), split "
      "across %lld workers:\n",
      static_cast<long long>(n_q), static_cast<long long>(Hq), static_cast<long long>(n),
      static_cast<long long>(Hkv), static_cast<long long>(d), static_cast<long long>(workers));
  for (std::size_t w = 0; w < parts.size(); ++w)
    std::printf("  worker %zu: keys [%7lld, %7lld)%s %.1f ms\n", w,
                static_cast<long long>(parts[w].begin), static_cast<long long>(parts[w].end),
                parts[w].end == n ? " causal" : "       ", parts[w].ms);
  const float tol = 1e-5f * std::max(1.0f, scale);
  const bool ok = diff <= tol && lse_diff <= 1e-5f * std::max(1.0f, lse_scale);
  std::printf(
      "split + merge_states %.1f ms, single call %.1f ms; max |O - single| %.2e (tolerance %.0e), "
      "max |LSE - single| %.2e\n",
      split_ms, single_ms, static_cast<double>(diff), static_cast<double>(tol),
      static_cast<double>(lse_diff));
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
