// `sparse-attn decode`: step-by-step decoding against a KV cache, from .npy files.
//
// Inputs: Q [Hq, n_q, d], K [Hkv, n, d], V [Hkv, n, dv] with T = --steps <= n_q <= n. Row i of Q
// is the query of position n - n_q + i (queries are the last n_q positions, as for `attend`).
//   - The cache is filled with the first n - T tokens of K/V (the prompt) and the eviction method,
//     if any, runs on it, scoring with the prompt's queries given in Q (rows 0 .. n_q - T - 1,
//     i.e. positions n - n_q .. n - T - 1).
//   - Then positions n - T .. n - 1 are decoded one at a time: step t appends K/V row n - T + t,
//     selects keys (dense or Quest), attends with Q row n_q - T + t, and lets the method evict.
// Output O [Hq, T, dv] float32: row t is step t's attention output. One JSON line on stdout with
// the per-step keys read and achieved compression (vs dense attention over every position so far).
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
  std::string method = "dense";
  double compression = 10.0;
  index_t budget = 0;
  index_t page = 16;
  index_t window = 0;
  index_t sinks = 4;
  index_t steps = 1;
  double scale = std::numeric_limits<double>::quiet_NaN();
  int threads = 0;
  std::string kv_dtype = "auto";
  std::string layout = "contiguous";
  bool per_query_head = false;
  CLI::Option *compression_opt = nullptr, *budget_opt = nullptr, *window_opt = nullptr,
              *sinks_opt = nullptr, *scale_opt = nullptr, *page_opt = nullptr, *per_q_opt = nullptr;
};

// Option checks that need no file: every method's flags, then ranges.
void check_options(const DecodeArgs& a) {
  const std::string& m = a.method;
  const bool budgeted = a.compression_opt->count() || a.budget_opt->count();
  if (m == "dense") check(!budgeted, "--compression/--budget do not apply to --method dense");
  if (m == "dense" || m == "quest")
    check(!a.window_opt->count() && !a.sinks_opt->count(),
          "--window/--sinks do not apply to --method ", m);
  if (m == "h2o") check(!a.sinks_opt->count(), "--sinks does not apply to --method h2o");
  if (m == "streaming")
    check(!(a.window_opt->count() && budgeted),
          "--method streaming takes --window or --compression/--budget, not both");
  check(m == "quest" || !a.per_q_opt->count(), "--per-query-head applies only to --method quest");
  if (a.compression_opt->count())
    check(std::isfinite(a.compression) && a.compression >= 1.0,
          "--compression must be finite and >= 1, got ", a.compression);
  if (a.budget_opt->count()) check(a.budget >= 1, "--budget must be >= 1 token, got ", a.budget);
  check(a.page >= 1, "--page must be >= 1, got ", a.page);
  if (a.window_opt->count()) check(a.window >= 1, "--window must be >= 1, got ", a.window);
  check(a.sinks >= 0, "--sinks must be >= 0, got ", a.sinks);
  check(a.steps >= 1, "--steps must be >= 1, got ", a.steps);
  check(a.threads >= 0, "--threads must be >= 0 (0 = OpenMP default), got ", a.threads);
  if (a.scale_opt->count())
    check(std::isfinite(a.scale) && a.scale > 0, "--scale must be finite and > 0, got ", a.scale);
}

SessionOptions session_options(const DecodeArgs& a, index_t prompt) {
  SessionOptions so;
  so.scale = static_cast<float>(a.scale);
  so.num_threads = a.threads;
  const bool by_budget = a.budget_opt->count() > 0;
  const double cr = a.compression;
  const std::string& m = a.method;
  if (m == "quest") {
    so.decode = DecodeMethod::quest;
    so.quest.compression = cr;
    so.quest.budget = by_budget ? a.budget : 0;
    so.quest.per_query_head = a.per_query_head;
  } else if (m == "snapkv" || m == "ada_snapkv") {
    so.eviction = m == "snapkv" ? Eviction::snapkv : Eviction::ada_snapkv;
    methods::SnapKVOptions& o = m == "snapkv" ? so.snapkv : so.ada_snapkv;
    o.compression = cr;
    o.budget = by_budget ? a.budget : 0;
    if (a.window_opt->count()) o.window = a.window;
    o.sinks = a.sinks;
  } else if (m == "h2o") {
    so.eviction = Eviction::h2o;
    so.h2o.compression = cr;
    so.h2o.budget = by_budget ? a.budget : 0;
    if (a.window_opt->count()) {  // explicit R: H = the rest of the budget
      const index_t total =
          by_budget ? a.budget
                    : static_cast<index_t>(std::ceil(static_cast<double>(prompt) / cr - 1e-9));
      so.h2o.recent = a.window;
      so.h2o.heavy = std::max<index_t>(0, total - a.window);
    }
  } else if (m == "streaming") {
    so.eviction = Eviction::streaming;
    so.streaming.sinks = a.sinks;
    if (a.window_opt->count()) so.streaming.window = a.window;
    if (by_budget)
      so.streaming.budget = a.budget;
    else if (a.compression_opt->count())
      so.streaming.compression = cr;
  }
  return so;
}

struct Outcome {
  nlohmann::ordered_json steps = nlohmann::ordered_json::array();
  index_t cache_after_prefill = 0;
  double prefill_evict_ms = 0, select_ms = 0, kernel_ms = 0, evict_ms = 0;
  double mean_compression = 0;
};

template <class Cache>
Outcome run_session(const DecodeArgs& a, const std::vector<float>& qf, const Tensor3& q,
                    const std::vector<float>& kf, const std::vector<float>& vf, const Tensor3& k,
                    const Tensor3& v, std::vector<float>& out) {
  const index_t T = a.steps, n = k.tokens, prompt = n - T, nq_prompt = q.tokens - T;
  kv::CacheOptions co;
  co.kv_heads = k.heads;
  co.head_dim = k.dim;
  co.value_dim = v.dim;
  co.capacity = n;
  co.page_size = a.page;
  co.key_bounds = a.method == "quest";
  Cache cache(co);
  // One executor for every method, kernel and append; its threads start before timing (an empty
  // item per worker).
  OpenMPExecutor pool(a.threads);
  run_items(pool, pool.concurrency(), [](index_t, int) {});
  SessionOptions so = session_options(a, prompt);
  so.executor = &pool;
  DecodeSession<Cache> session(cache, so);
  TensorView<const float> qv(qf.data(), q.heads, q.tokens, q.dim);
  TensorView<const float> kv(kf.data(), k.heads, n, k.dim), vv(vf.data(), v.heads, n, v.dim);

  Outcome r;
  const PrefillReport pr = session.ingest(qv.slice_tokens(0, nq_prompt), kv.slice_tokens(0, prompt),
                                          vv.slice_tokens(0, prompt));
  r.cache_after_prefill = pr.cache_tokens;
  r.prefill_evict_ms = pr.evict_ms;
  for (index_t t = 0; t < T; ++t) {
    TensorView<float> ot(out.data() + t * v.dim, q.heads, 1, v.dim, T * v.dim, v.dim, 1);
    const StepReport s =
        session.step(qv.slice_tokens(nq_prompt + t, 1), kv.slice_tokens(prompt + t, 1),
                     vv.slice_tokens(prompt + t, 1), ot);
    nlohmann::ordered_json js;
    js["position"] = s.position;
    js["keys_read"] = s.stats.keys_per_query(q.heads, 1);
    js["achieved_compression"] = s.compression();
    js["cache_tokens"] = s.cache_tokens;
    r.steps.push_back(js);
    r.select_ms += s.select_ms;
    r.kernel_ms += s.kernel_ms;
    r.evict_ms += s.evict_ms;
    r.mean_compression += s.compression() / static_cast<double>(T);
  }
  return r;
}

template <class T>
Outcome run_layout(const DecodeArgs& a, const std::vector<float>& qf, const Tensor3& q,
                   const std::vector<float>& kf, const std::vector<float>& vf, const Tensor3& k,
                   const Tensor3& v, std::vector<float>& out) {
  if (a.layout == "paged") return run_session<kv::PagedCache<T>>(a, qf, q, kf, vf, k, v, out);
  return run_session<kv::ContiguousCache<T>>(a, qf, q, kf, vf, k, v, out);
}

void run_decode(const DecodeArgs& a) {
  check_options(a);
  OutputSet::check_writable(a.out, "--out");
  const QkvFiles files = load_qkv(a.q, a.k, a.v);
  const Tensor3 &q = files.q, &k = files.k, &v = files.v;
  check(a.steps <= q.tokens, "--steps ", a.steps, " > n_q=", q.tokens,
        "; every decode step needs its own row of Q");
  const bool scores_prompt = a.method == "snapkv" || a.method == "ada_snapkv" || a.method == "h2o";
  check(!scores_prompt || q.tokens > a.steps, "--method ", a.method,
        " scores the prompt with its queries: Q needs rows before the ", a.steps,
        " decoded ones (n_q > --steps)");

  std::string kv_dtype = a.kv_dtype;
  if (kv_dtype == "auto") {
    check(k.array.dtype == v.array.dtype, "K and V dtypes differ ('", k.array.descr(), "' vs '",
          v.array.descr(), "'); pass --kv-dtype to choose the storage type");
    kv_dtype = k.array.dtype == io::NpyDtype::f2 ? "fp16" : "fp32";
  }
  const std::vector<float> qf = q.array.to_float(), kf = k.array.to_float(),
                           vf = v.array.to_float();
  std::vector<float> out(static_cast<std::size_t>(q.heads * a.steps * v.dim));
  Outcome r;
  if (kv_dtype == "bf16")
    r = run_layout<bf16>(a, qf, q, kf, vf, k, v, out);
  else if (kv_dtype == "fp16")
    r = run_layout<fp16>(a, qf, q, kf, vf, k, v, out);
  else
    r = run_layout<float>(a, qf, q, kf, vf, k, v, out);

  OutputSet outputs;
  outputs.stage(a.out, out.data(), {q.heads, a.steps, v.dim});
  outputs.commit();

  nlohmann::ordered_json j;
  j["method"] = a.method;
  j["hq"] = q.heads;
  j["hkv"] = k.heads;
  j["n_q"] = q.tokens;
  j["n_k"] = k.tokens;
  j["d"] = q.dim;
  if (v.dim != q.dim) j["dv"] = v.dim;
  j["dtype"] = kv_dtype;
  j["layout"] = a.layout;
  j["page"] = a.page;
  j["steps"] = a.steps;
  j["prompt_tokens"] = k.tokens - a.steps;
  if (a.budget_opt->count())
    j["budget"] = a.budget;
  else if (a.method != "dense" && (a.method != "streaming" || a.compression_opt->count()))
    j["target_compression"] = a.compression;
  j["scale"] = std::isnan(a.scale) ? 1.0 / std::sqrt(static_cast<double>(q.dim)) : a.scale;
  j["threads"] = OpenMPExecutor(a.threads).concurrency();
  j["cpu_target"] = target_name(cpu_target());
  j["cache_tokens_after_prefill"] = r.cache_after_prefill;
  j["mean_achieved_compression"] = r.mean_compression;
  j["prefill_evict_ms"] = r.prefill_evict_ms;
  j["select_ms"] = r.select_ms;
  j["kernel_ms"] = r.kernel_ms;
  j["evict_ms"] = r.evict_ms;
  j["per_step"] = r.steps;
  std::cout << j.dump() << std::endl;
}

}  // namespace

Command add_decode_command(CLI::App& root) {
  auto a = std::make_shared<DecodeArgs>();
  CLI::App* sub = root.add_subcommand(
      "decode",
      "Decode the last --steps rows of Q one token at a time against a KV cache built from the "
      "preceding tokens (each step appends its own K/V first); prints one JSON line");
  sub->add_option("--q", a->q, "queries .npy [Hq, n_q, d]: row i is position n_k - n_q + i")
      ->required();
  sub->add_option("--k", a->k, "keys .npy [Hkv, n_k, d], '<f4' or '<f2'")->required();
  sub->add_option("--v", a->v, "values .npy [Hkv, n_k, dv], '<f4' or '<f2'")->required();
  sub->add_option("--out", a->out, "output .npy [Hq, steps, dv] float32")->required();
  sub->add_option("--method", a->method, "decode method")
      ->check(CLI::IsMember({"dense", "quest", "snapkv", "ada_snapkv", "h2o", "streaming"}))
      ->capture_default_str();
  a->compression_opt = sub->add_option("--compression", a->compression,
                                       "target compression ratio (default 10; streaming: "
                                       "S + W = n / C)");
  a->budget_opt = sub->add_option("--budget", a->budget,
                                  "token budget: quest B*P, snapkv c per head, ada_snapkv c "
                                  "(average per head), h2o H + R, streaming S + W");
  a->compression_opt->excludes(a->budget_opt);
  a->page_opt = sub->add_option("--page", a->page, "page size P (Quest pages, paged layout)")
                    ->capture_default_str();
  a->window_opt = sub->add_option(
      "--window", a->window,
      "snapkv/ada_snapkv: observation window w (default 32); h2o: recent tokens R (default half "
      "the budget); streaming: recent window W (default 1024)");
  a->sinks_opt =
      sub->add_option("--sinks", a->sinks, "snapkv/ada_snapkv/streaming: sink tokens kept")
          ->capture_default_str();
  sub->add_option("--steps", a->steps, "decode steps T: the last T rows of Q and of K/V")
      ->capture_default_str();
  a->per_q_opt = sub->add_flag("--per-query-head", a->per_query_head,
                               "quest: select pages per query head instead of per KV head");
  a->scale_opt = sub->add_option("--scale", a->scale, "logit scale (default 1/sqrt(d))");
  sub->add_option("--threads", a->threads, "OpenMP threads (0 = OpenMP default)")
      ->capture_default_str();
  sub->add_option(
         "--kv-dtype", a->kv_dtype,
         "cache storage: fp32, bf16 (rounded to nearest even), fp16; auto = the files' dtype")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}))
      ->capture_default_str();
  sub->add_option("--layout", a->layout, "cache storage layout")
      ->check(CLI::IsMember({"contiguous", "paged"}))
      ->capture_default_str();
  return Command{sub, [a] { run_decode(*a); }};
}

}  // namespace sparse_attn::cli
