// An engine's own threads and memory: the kernels run on a std::thread pool (the engine's, see
// thread_pool_executor.hpp) through plan + run with one preallocated workspace, over a token-major
// bf16 KV cache used in place, for several layers. The output is bit-identical to the default
// (OpenMP) executor. Usage: engine_threads [tokens] [threads]; exit 1 if the bits differ.
#include <sparse_attn/sparse_attn.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "thread_pool_executor.hpp"

using namespace sparse_attn;

int main(int argc, char** argv) {
  const index_t n = argc > 1 ? std::atoll(argv[1]) : 2048, Hq = 8, Hkv = 2, d = 64, layers = 3;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 4;
  std::printf("CPU target: %s\n", target_name(cpu_target()));

  // Token-major cache [n][Hkv][d] per layer, as engines store it; views address it in place.
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(Hq * n * d));
  std::vector<bf16> k(static_cast<std::size_t>(layers * n * Hkv * d)), v(k.size());
  for (auto& x : q) x = nd(rng);
  for (auto& x : k) x = bf16(nd(rng));
  for (auto& x : v) x = bf16(nd(rng));
  auto cache_view = [&](const std::vector<bf16>& c, index_t layer) {
    return TensorView<const bf16>::token_major(c.data() + layer * n * Hkv * d, Hkv, n, d);
  };
  const TensorView<const float> qv(q.data(), Hq, n, d);

  ThreadPoolExecutor pool(threads);
  AttentionOptions opt;
  opt.executor = &pool;
  const IntervalMask mask = masks::sliding_window(Hq, n, n, std::max<index_t>(64, n / 4), 4, 64);
  const PrefillPlan plan = plan_prefill(attention_shape(qv, cache_view(k, 0), cache_view(v, 0)), mask, opt);
  DecodeOptions dopt;
  dopt.executor = &pool;
  const DecodePlan dplan = plan_decode(attention_shape(qv.slice_tokens(n - 1, 1), cache_view(k, 0), cache_view(v, 0)),
                                       KeySelection::all(), dopt);
  // One workspace for every layer and both phases, allocated once (an arena in a real engine).
  WorkspaceBuffer workspace(std::max(plan.workspace_bytes(), dplan.workspace_bytes()));
  std::printf("workspace: %zu KiB for %d workers\n", workspace.bytes() / 1024, pool.concurrency());

  std::vector<float> out(q.size()), ref(q.size()), dout(static_cast<std::size_t>(Hq * d)), dref(dout.size());
  bool same = true;
  for (index_t layer = 0; layer < layers; ++layer) {
    const auto kv = cache_view(k, layer), vv = cache_view(v, layer);
    prefill(plan, qv, kv, vv, TensorView<float>(out.data(), Hq, n, d), mask, workspace, opt);
    prefill(qv, kv, vv, TensorView<float>(ref.data(), Hq, n, d), mask);  // default executor
    decode(dplan, qv.slice_tokens(n - 1, 1), kv, vv, TensorView<float>(dout.data(), Hq, 1, d),
           KeySelection::all(), workspace, dopt);
    decode(qv.slice_tokens(n - 1, 1), kv, vv, TensorView<float>(dref.data(), Hq, 1, d));
    const bool layer_same = out == ref && dout == dref;
    std::printf("layer %lld: prefill CR %.2f, prefill and decode bits %s the default executor's\n",
                static_cast<long long>(layer), mask.compression(), layer_same ? "equal" : "DIFFER from");
    same = same && layer_same;
  }
  return same ? 0 : 1;
}
