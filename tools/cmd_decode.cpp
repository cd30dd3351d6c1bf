// `sparse-attn decode`: step-by-step decoding against a KV cache, from .npy files, with any decode
// method of the registry (sparse_attn/methods/registry.hpp) at a budget, run as its DecodePolicy
// by a DecodeSession (pipeline.hpp).
//
// Inputs: Q [Hq, n_q, d], K [Hkv, n, d], V [Hkv, n, dv] with T = --steps <= n_q <= n. Row i of Q
// is the query of position n - n_q + i (queries are the last n_q positions, as for `attend`).
//   - The cache is filled with the first n - T tokens of K/V (the prompt) and the policy's
//     after_prefill runs on it, scoring with the prompt's queries given in Q (rows 0 .. n_q - T - 1,
//     i.e. positions n - n_q .. n - T - 1).
//   - Then positions n - T .. n - 1 are decoded one at a time: step t appends K/V row n - T + t,
//     the policy selects (or evicts), the kernel attends with Q row n_q - T + t, and the policy
//     runs after the step.
// Output O [Hq, T, dv] float32: row t is step t's attention output. One JSON line on stdout with
// the per-step keys read and achieved compression (vs dense attention over every position so far)
// and the run's: achieved CR = dense pairs / pairs read over every step, reachable by the budget's
// rule (compression: within its tolerance of the target; count / mass: the method honoured it).
// GCC < 13 (PR 105593): with several cache types in one -O3 TU, Eigen's pexp is emitted out of
// line and warns inside its AVX-512 intrinsics; the pragma must cover Eigen's own lines.
#include <sparse_attn/core/diagnostics.hpp>
SPARSE_ATTN_DIAGNOSTICS_PUSH
#include <Eigen/Core>
SPARSE_ATTN_DIAGNOSTICS_POP

#include <cmath>
#include <iostream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <sparse_attn/pipeline.hpp>
#include <string>
#include <vector>

#include "cli.hpp"

namespace sparse_attn::cli {
namespace {

struct DecodeArgs {
  std::string q, k, v, out;
  RunOptions run;
  MethodArgs m;
  index_t page = 16;
  index_t steps = 1;
  std::string kv_dtype = "auto";
  std::string layout = "contiguous";
};

const std::vector<methods::MethodInfo>& registry() {
  static const std::vector<methods::MethodInfo> r = methods::decode_methods();
  return r;
}

// What the command line resolves to, checked before any file is read.
struct Plan {
  const methods::MethodInfo* info = nullptr;
  methods::Budget budget;
  methods::ParamSettings settings;
  nlohmann::ordered_json params;  // every parameter's value
};

Plan check_options(const DecodeArgs& a) {
  Plan plan;
  plan.info = &method_info(registry(), a.m.method);
  plan.budget = a.m.budget(*plan.info);
  plan.settings = a.m.settings();
  // Unknown parameters and bad values now (the registry names the method's parameters).
  plan.params = methods::with_decode_method(plan.info->name, plan.settings,
                                            [](auto& method) { return params_json(method); });
  check(a.page >= 1, "--page must be >= 1, got ", a.page);
  check(a.steps >= 1, "--steps must be >= 1, got ", a.steps);
  a.run.check_ranges();
  return plan;
}

struct Outcome {
  nlohmann::ordered_json steps = nlohmann::ordered_json::array();
  index_t cache_after_prefill = 0;
  index_t pairs = 0, dense_pairs = 0;  // over every step
  bool honoured = true;                // every selection / eviction honoured its budget
  std::string detail;
  double prefill_evict_ms = 0, select_ms = 0, kernel_ms = 0, evict_ms = 0;
  double mean_compression = 0;
};

template <class Cache>
Outcome run_session(const DecodeArgs& a, const Plan& plan, const std::vector<float>& qf,
                    const Tensor3& q, const std::vector<float>& kf, const std::vector<float>& vf,
                    const Tensor3& k, const Tensor3& v, std::vector<float>& out) {
  const index_t T = a.steps, n = k.tokens, prompt = n - T, nq_prompt = q.tokens - T;
  auto policy = methods::make_decode_policy<Cache, float>(plan.info->name, plan.settings,
                                                          plan.budget);
  kv::CacheOptions co;
  co.kv_heads = k.heads;
  co.head_dim = k.dim;
  co.value_dim = v.dim;
  co.capacity = n;
  co.page_size = a.page;
  co.key_bounds = policy->needs_key_bounds();
  Cache cache(co);
  // One executor for the policy, the kernel and the appends; its threads start before timing.
  OpenMPExecutor pool(a.run.threads);
  warm_up(pool);
  SessionOptions so;
  so.scale = static_cast<float>(a.run.scale);
  so.num_threads = a.run.threads;
  so.executor = &pool;
  DecodeSession<Cache, float> session(cache, std::move(policy), so);
  const methods::DecodePolicy<Cache, float>& pol = session.policy();
  TensorView<const float> qv(qf.data(), q.heads, q.tokens, q.dim);
  TensorView<const float> kv(kf.data(), k.heads, n, k.dim), vv(vf.data(), v.heads, n, v.dim);

  Outcome r;
  PrefillReport pr;
  try {
    pr = session.ingest(qv.slice_tokens(0, nq_prompt), kv.slice_tokens(0, prompt),
                        vv.slice_tokens(0, prompt));
  } catch (const invalid_argument& e) {
    // Without prompt queries a method that scores the prompt has nothing to score with.
    if (nq_prompt > 0) throw;
    throw invalid_argument(sparse_attn::detail::concat(
        "--method ", plan.info->name, " failed on the prompt with no prompt queries (Q has ",
        q.tokens, " rows, all decoded; methods that score the prompt need n_q > --steps): ",
        e.what()));
  }
  r.cache_after_prefill = pr.cache_tokens;
  r.prefill_evict_ms = pr.evict_ms;
  auto note = [&](const methods::SelectionStats& s) {
    r.honoured = r.honoured && s.reachable;
    if (!s.detail.empty()) r.detail = s.detail;
  };
  if (pol.last_eviction() != nullptr) note(pol.stats());
  for (index_t t = 0; t < T; ++t) {
    TensorView<float> ot(out.data() + t * v.dim, q.heads, 1, v.dim, T * v.dim, v.dim, 1);
    const StepReport s =
        session.step(qv.slice_tokens(nq_prompt + t, 1), kv.slice_tokens(prompt + t, 1),
                     vv.slice_tokens(prompt + t, 1), ot);
    note(pol.stats());
    nlohmann::ordered_json js;
    js["position"] = s.position;
    js["keys_read"] = s.stats.keys_per_query(q.heads, 1);
    js["achieved_compression"] = s.compression();
    js["cache_tokens"] = s.cache_tokens;
    r.steps.push_back(js);
    r.pairs += s.stats.pairs;
    r.dense_pairs += s.stats.dense_pairs;
    r.select_ms += s.select_ms;
    r.kernel_ms += s.kernel_ms;
    r.evict_ms += s.evict_ms;
    r.mean_compression += s.compression() / static_cast<double>(T);
  }
  return r;
}

void run_decode(const DecodeArgs& a) {
  const Plan plan = check_options(a);
  // The output path next: a FIFO, device or directory is refused before anything is read or run.
  OutputSet outputs;
  const std::size_t out_index = outputs.add(a.out, "--out");
  const QkvFiles files = load_qkv(a.q, a.k, a.v);
  const Tensor3 &q = files.q, &k = files.k, &v = files.v;
  check(a.steps <= q.tokens, "--steps ", a.steps, " > n_q=", q.tokens,
        "; every decode step needs its own row of Q");
  const std::string kv_dtype = resolve_kv_dtype(a.kv_dtype, k, v);

  const std::vector<float> qf = q.array.to_float(), kf = k.array.to_float(),
                           vf = v.array.to_float();
  std::vector<float> out(static_cast<std::size_t>(q.heads * a.steps * v.dim));
  const Outcome r = with_kv_type(kv_dtype, [&](auto tkv) {
    using T = decltype(tkv);
    if (a.layout == "paged")
      return run_session<kv::PagedCache<T>>(a, plan, qf, q, kf, vf, k, v, out);
    return run_session<kv::ContiguousCache<T>>(a, plan, qf, q, kf, vf, k, v, out);
  });

  outputs.stage_npy(out_index, out.data(), {q.heads, a.steps, v.dim});
  outputs.commit();

  const double achieved = methods::compression_of(r.dense_pairs, r.pairs);
  nlohmann::ordered_json j = problem_json(plan.info->name, files, kv_dtype);
  j["layout"] = a.layout;
  j["page"] = a.page;
  j["steps"] = a.steps;
  j["prompt_tokens"] = k.tokens - a.steps;
  add_run_json(j, a.run, q.dim);
  add_selection_json(j, plan.budget, methods::is_reachable(plan.budget, achieved, r.honoured),
                     achieved, r.pairs);
  j["detail"] = r.detail;
  j["params"] = plan.params;
  j["cache_tokens_after_prefill"] = r.cache_after_prefill;
  j["mean_achieved_compression"] = r.mean_compression;
  j["prefill_evict_ms"] = r.prefill_evict_ms;
  j["select_ms"] = r.select_ms;
  j["kernel_ms"] = r.kernel_ms;
  j["evict_ms"] = r.evict_ms;
  j["per_step"] = r.steps;
  std::cout << j.dump() << std::endl;
}

constexpr const char* kFooter = R"(Budget: at most one of --compression C (default: dense 1, every other method 10), --budget N
(the method's count unit, in tokens per KV head unless its line says otherwise), --mass P
[--mass-floor N] [--mass-cap N] (floor and cap in the count unit). The run's achieved CR is
dense (query row, key) pairs / pairs read, summed over the steps; a target CR it misses by more
than --tolerance is still run (exit 0) and reported with reachable: false.
Output: O [Hq, steps, dv] .npy and one JSON line: budget, target_compression (null for --budget /
--mass), reachable, achieved_compression, pairs, detail (the latest selection or eviction in the
method's terms), params, per_step (position, keys_read, achieved_compression, cache_tokens) and
the times (prefill_evict_ms, select_ms, kernel_ms, evict_ms).
)";

}  // namespace

Command add_decode_command(CLI::App& root) {
  auto a = std::make_shared<DecodeArgs>();
  CLI::App* sub = root.add_subcommand(
      "decode",
      "Decode the last --steps rows of Q one token at a time against a KV cache built from the "
      "preceding tokens (each step appends its own K/V first); prints one JSON line");
  sub->footer(methods_help(registry(), "Methods (--method NAME; --param NAME=VALUE sets a parameter):") +
              kFooter + kOutputFilesHelp);
  sub->add_option("--q", a->q, "queries .npy [Hq, n_q, d]: row i is position n_k - n_q + i")
      ->required();
  sub->add_option("--k", a->k, "keys .npy [Hkv, n_k, d], '<f4' or '<f2'")->required();
  sub->add_option("--v", a->v, "values .npy [Hkv, n_k, dv], '<f4' or '<f2'")->required();
  sub->add_option("--out", a->out, "output .npy [Hq, steps, dv] float32")->required();
  a->m.add_to(sub, registry());
  sub->add_option("--page", a->page, "cache page size P (Quest's pages, the paged layout's pages)")
      ->capture_default_str();
  sub->add_option("--steps", a->steps, "decode steps T: the last T rows of Q and of K/V")
      ->capture_default_str();
  a->run.add_to(sub);
  add_kv_dtype_option(sub, a->kv_dtype);
  sub->add_option("--layout", a->layout, "cache storage layout")
      ->check(CLI::IsMember({"contiguous", "paged"}))
      ->capture_default_str();
  return Command{sub, [a] { run_decode(*a); }};
}

}  // namespace sparse_attn::cli
