// custom_threads: every parallel loop of the library on the engine's own thread pool.
//
// An engine implements sparse_attn::Executor (two functions, concurrency() and run(n, body); a
// complete std::thread pool is in thread_pool_executor.hpp) and passes it to every call: the
// kernels and the method selections take it in AttentionOptions::executor, cache appends and
// merge_states in an ExecutorChoice. The library then opens no thread and no OpenMP region of its
// own. Work items are cut independently of the thread count and each is computed in a fixed
// order, so the outputs are bit-identical to the default executor's (OpenMP here) for any pool
// size. This example runs a sparse prefill (Vertical-Slash selection + kernel, plan + run with a
// caller-owned workspace) and a decode step (KV cache append, Quest selection, kernel) both ways,
// counts the parallel loops the pool ran, and exits 1 if any output bit differs.
//
// Usage: custom_threads [tokens] [threads]   (defaults 8192 4)
#include <sparse_attn/sparse_attn.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "thread_pool_executor.hpp"

using namespace sparse_attn;
using methods::Budget;

namespace {

// Forwards to the engine's pool, counting the parallel loops (shows that none bypasses it).
class CountingExecutor final : public Executor {
 public:
  explicit CountingExecutor(Executor& inner) : inner_(inner) {}
  int concurrency() const noexcept override { return inner_.concurrency(); }
  void run(index_t n, ItemFunction body) override {
    ++loops;
    items += n;
    inner_.run(n, body);
  }
  long long loops = 0, items = 0;

 private:
  Executor& inner_;
};

struct Outputs {
  std::vector<std::int32_t> lines;  // the selected prefill mask's lines: columns, then offsets
  std::vector<float> prefill, decode;
  double prefill_ms = 0, decode_ms = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const index_t n = argc > 1 ? std::atoll(argv[1]) : 8192, Hq = 8, Hkv = 2, d = 128;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 4;
  if (n < 2 || threads < 1) {
    std::fprintf(stderr, "usage: custom_threads [tokens >= 2] [threads >= 1]\n");
    return 2;
  }

  // Q [n][Hq][d] and the KV cache [n][Hkv][d], bf16, token-major as the engine stores them.
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<bf16> qs(static_cast<std::size_t>(n * Hq * d)),
      ks(static_cast<std::size_t>(n * Hkv * d)), vs(ks.size());
  for (auto* x : {&qs, &ks, &vs})
    for (bf16& e : *x) e = bf16(normal(rng));
  const auto q = TensorView<const bf16>::token_major(qs.data(), Hq, n, d);
  const auto k = TensorView<const bf16>::token_major(ks.data(), Hkv, n, d);
  const auto v = TensorView<const bf16>::token_major(vs.data(), Hkv, n, d);

  auto run = [&](Executor* executor) {  // nullptr: the default executor
    Outputs r;
    AttentionOptions opt;
    opt.executor = executor;

    // Prefill of the first n - 1 tokens: the method selects on the executor, the kernel runs on
    // it with a workspace the engine owns (sized for the executor's concurrency by the plan).
    auto t0 = std::chrono::steady_clock::now();
    const index_t m = n - 1;
    const auto qp = q.slice_tokens(0, m), kp = k.slice_tokens(0, m), vp = v.slice_tokens(0, m);
    const auto sel = methods::VerticalSlash{}.select(qp, kp, Budget::compression(8), opt);
    const PrefillPlan plan = plan_prefill(attention_shape(qp, kp, vp), sel.mask, opt);
    const WorkspaceBuffer workspace(plan.workspace_bytes());
    r.prefill.resize(static_cast<std::size_t>(Hq * m * d));
    prefill(plan, qp, kp, vp, TensorView<float>(r.prefill.data(), Hq, m, d), sel.mask, workspace,
            opt);
    r.prefill_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    for (index_t h = 0; h < Hq; ++h) {
      r.lines.insert(r.lines.end(), sel.mask.columns(h), sel.mask.columns(h) + sel.mask.num_columns(h));
      r.lines.insert(r.lines.end(), sel.mask.offsets(h), sel.mask.offsets(h) + sel.mask.num_offsets(h));
    }

    // One decode step: the prompt and the new token into a paged cache (appends on the executor),
    // Quest's pages, the decode kernel.
    t0 = std::chrono::steady_clock::now();
    kv::CacheOptions co;
    co.kv_heads = Hkv;
    co.head_dim = d;
    co.capacity = n;
    kv::PagedCache<bf16> cache(co);
    cache.append(kp, vp, opt.executor_choice());
    cache.append(k.slice_tokens(m, 1), v.slice_tokens(m, 1), opt.executor_choice());
    const auto q1 = q.slice_tokens(m, 1);
    const methods::DecodeSelection pages =
        methods::Quest{}.select(q1, cache, Budget::compression(8), opt);
    DecodeOptions dopt;
    dopt.executor = executor;
    r.decode.resize(static_cast<std::size_t>(Hq * d));
    decode(q1, cache.keys(), cache.values(), TensorView<float>(r.decode.data(), Hq, 1, d),
           pages.keys, dopt);
    r.decode_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return r;
  };

  ThreadPoolExecutor pool(threads);
  CountingExecutor counted(pool);
  const Outputs mine = run(&counted);
  const Outputs dflt = run(nullptr);
  const bool same_mask = mine.lines == dflt.lines;
  const bool same_prefill = mine.prefill == dflt.prefill, same_decode = mine.decode == dflt.decode;

  std::printf(
      "%lld tokens, Hq=%lld Hkv=%lld d=%lld bf16; engine pool: %d workers (%d std::threads + the "
      "caller)\n",
      static_cast<long long>(n), static_cast<long long>(Hq), static_cast<long long>(Hkv),
      static_cast<long long>(d), pool.concurrency(), pool.concurrency() - 1);
  std::printf(
      "the pool ran %lld parallel loops (%lld items); the default executor ran the same calls on "
      "OpenMP\n",
      counted.loops, counted.items);
  std::printf(
      "prefill (vertical_slash CR 8): pool %.1f ms, default %.1f ms; mask %s, output bits %s\n",
      mine.prefill_ms, dflt.prefill_ms, same_mask ? "equal" : "DIFFERS",
      same_prefill ? "equal" : "DIFFER");
  std::printf(
      "decode step (cache fill + quest CR 8 + kernel): pool %.2f ms, default %.2f ms; output bits "
      "%s\n",
      mine.decode_ms, dflt.decode_ms, same_decode ? "equal" : "DIFFER");
  const bool ok = same_mask && same_prefill && same_decode && counted.loops > 0;
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
