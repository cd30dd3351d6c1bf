// `sparse-attn attend`: one prefill over Q [Hq, n_q, d], K [Hkv, n_k, d], V [Hkv, n_k, dv] from
// .npy files.
// Queries are the last n_q positions of the n_k keys (chunked-prefill convention).
#include <omp.h>

#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <vector>

#include "cli.hpp"

namespace sparse_attn::cli {
namespace {

struct AttendArgs {
  std::string q, k, v, out, lse;
  bool causal = true;
  std::string method = "dense";
  index_t window = methods::SlidingWindowOptions{}.window;
  index_t sinks = methods::SlidingWindowOptions{}.sinks;
  double scale = std::numeric_limits<double>::quiet_NaN();
  int threads = 0;
  std::string kv_dtype = "auto";
  std::string out_dtype = "fp32";
  index_t block = 64;
  // Which optional flags were given (CLI11 option handles).
  CLI::Option *window_opt = nullptr, *sinks_opt = nullptr, *scale_opt = nullptr,
              *causal_opt = nullptr;
};

// K or V in the storage type the kernel reads.
template <class T>
std::vector<T> to_storage(const io::NpyArray& a) {
  if constexpr (std::is_same_v<T, fp16>) {
    if (a.dtype == io::NpyDtype::f2) return a.f2;  // already fp16: used as stored
  }
  if constexpr (std::is_same_v<T, float>) return a.to_float();
  std::vector<T> out(static_cast<std::size_t>(a.size()));
  if (a.dtype == io::NpyDtype::f4) {
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = from_float<T>(a.f4[i]);  // RNE
  } else {
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] = from_float<T>(static_cast<float>(a.f2[i]));
  }
  return out;
}

struct RunResult {
  double ms = 0;
};

template <class TKV, class TO>
RunResult run_kernel(const AttendArgs& a, const Tensor3& q, const Tensor3& k, const Tensor3& v,
                     const IntervalMask& mask, OutputSet& outputs) {
  const std::vector<float> qf = q.array.to_float();
  const std::vector<TKV> ks = to_storage<TKV>(k.array), vs = to_storage<TKV>(v.array);
  std::vector<TO> out(static_cast<std::size_t>(q.heads * q.tokens * v.dim));
  std::vector<float> lse(a.lse.empty() ? 0 : static_cast<std::size_t>(q.heads * q.tokens));

  TensorView<const float> qv(qf.data(), q.heads, q.tokens, q.dim);
  TensorView<const TKV> kv(ks.data(), k.heads, k.tokens, k.dim);
  TensorView<const TKV> vv(vs.data(), v.heads, v.tokens, v.dim);
  TensorView<TO> ov(out.data(), q.heads, q.tokens, v.dim);
  PrefillOptions opt;
  opt.scale = static_cast<float>(a.scale);
  opt.num_threads = a.threads;
  if (!lse.empty()) opt.lse = LseView(lse.data(), q.tokens);

  // Start the OpenMP thread pool first, so `ms` times the kernel and not thread creation.
  const int team = a.threads > 0 ? a.threads : omp_get_max_threads();
#pragma omp parallel num_threads(team)
  {}
  const auto t0 = std::chrono::steady_clock::now();
  prefill(qv, kv, vv, ov, mask, opt);
  const auto t1 = std::chrono::steady_clock::now();

  outputs.stage(a.out, out.data(), {q.heads, q.tokens, v.dim});
  if (!lse.empty()) outputs.stage(a.lse, lse.data(), {q.heads, q.tokens});
  return {std::chrono::duration<double, std::milli>(t1 - t0).count()};
}

template <class TKV>
RunResult run_out(const AttendArgs& a, const Tensor3& q, const Tensor3& k, const Tensor3& v,
                  const IntervalMask& mask, OutputSet& outputs) {
  if (a.out_dtype == "fp16") return run_kernel<TKV, fp16>(a, q, k, v, mask, outputs);
  return run_kernel<TKV, float>(a, q, k, v, mask, outputs);
}

void run_attend(const AttendArgs& a) {
  const bool sliding = a.method == "sliding_window";
  // Option checks first: no file is read before the command line is known to be sane.
  if (a.scale_opt->count())
    check(std::isfinite(a.scale) && a.scale > 0, "--scale must be finite and > 0, got ", a.scale);
  check(a.threads >= 0, "--threads must be >= 0 (0 = OpenMP default), got ", a.threads);
  check(a.block >= 1, "--block must be >= 1, got ", a.block);
  if (sliding) {
    check(a.window >= 1, "--window must be >= 1, got ", a.window);
    check(a.sinks >= 0, "--sinks must be >= 0, got ", a.sinks);
    check(a.causal, "--method sliding_window is causal only; drop --no-causal");
  } else {
    check(!a.window_opt->count() && !a.sinks_opt->count(),
          "--window/--sinks apply only to --method sliding_window, not --method ", a.method);
  }
  check(a.out != a.lse, "--out and --lse name the same file ", a.out);
  OutputSet::check_writable(a.out, "--out");
  if (!a.lse.empty()) OutputSet::check_writable(a.lse, "--lse");

  const Tensor3 q = load_tensor3(a.q, "--q");
  const Tensor3 k = load_tensor3(a.k, "--k");
  const Tensor3 v = load_tensor3(a.v, "--v");
  check(k.heads == v.heads && k.tokens == v.tokens, "K and V shapes differ: K ",
        k.array.shape_str(), ", V ", v.array.shape_str(), "; heads and tokens must match");
  check(q.dim == k.dim, "head dim mismatch: Q has d=", q.dim, ", K has d=", k.dim);
  check(q.heads % k.heads == 0, "Q heads (", q.heads, ") must be a multiple of K/V heads (",
        k.heads, ")");
  check(q.tokens <= k.tokens, "n_q=", q.tokens, " > n_k=", k.tokens,
        "; queries are the last n_q of the n_k positions, so n_q <= n_k");

  std::string kv_dtype = a.kv_dtype;
  if (kv_dtype == "auto") {
    check(k.array.dtype == v.array.dtype, "K and V dtypes differ ('", k.array.descr(), "' vs '",
          v.array.descr(), "'); pass --kv-dtype to choose the storage type");
    kv_dtype = k.array.dtype == io::NpyDtype::f2 ? "fp16" : "fp32";
  }

  const IntervalMask mask =
      sliding
          ? methods::sliding_window(q.heads, q.tokens, k.tokens,
                                    methods::SlidingWindowOptions{a.window, a.sinks, a.block})
          : methods::dense(q.heads, q.tokens, k.tokens, methods::DenseOptions{a.causal, a.block});

  OutputSet outputs;
  RunResult r;
  if (kv_dtype == "bf16")
    r = run_out<bf16>(a, q, k, v, mask, outputs);
  else if (kv_dtype == "fp16")
    r = run_out<fp16>(a, q, k, v, mask, outputs);
  else
    r = run_out<float>(a, q, k, v, mask, outputs);
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
  j["out_dtype"] = a.out_dtype;
  j["causal"] = a.causal;
  if (sliding) {
    j["window"] = a.window;
    j["sinks"] = a.sinks;
  }
  j["block"] = a.block;
  j["scale"] = std::isnan(a.scale) ? 1.0 / std::sqrt(static_cast<double>(q.dim)) : a.scale;
  j["threads"] = a.threads > 0 ? a.threads : omp_get_max_threads();
  j["pairs"] = mask.pairs();
  j["achieved_compression"] = mask.compression();
  j["ms"] = r.ms;
  std::cout << j.dump() << std::endl;
}

}  // namespace

Command add_attend_command(CLI::App& root) {
  auto a = std::make_shared<AttendArgs>();
  CLI::App* sub = root.add_subcommand(
      "attend", "Prefill attention: O = softmax(scale * Q K^T + mask) V; prints one JSON line");
  sub->add_option("--q", a->q, "queries .npy [Hq, n_q, d], '<f4' or '<f2'")->required();
  sub->add_option("--k", a->k, "keys .npy [Hkv, n_k, d], '<f4' or '<f2'")->required();
  sub->add_option("--v", a->v, "values .npy [Hkv, n_k, dv], '<f4' or '<f2'")->required();
  sub->add_option("--out", a->out, "output .npy [Hq, n_q, dv]")->required();
  sub->add_option("--lse", a->lse, "also write log-sum-exp .npy [Hq, n_q] (float32, natural log)");
  a->causal_opt = sub->add_flag("--causal,!--no-causal", a->causal, "causal mask (default)");
  sub->add_option("--method", a->method, "selection method")
      ->check(CLI::IsMember({"dense", "sliding_window"}))
      ->capture_default_str();
  a->window_opt =
      sub->add_option("--window", a->window, "sliding_window: keys p-W < j <= p are visible")
          ->capture_default_str();
  a->sinks_opt = sub->add_option("--sinks", a->sinks, "sliding_window: first S keys always visible")
                     ->capture_default_str();
  a->scale_opt = sub->add_option("--scale", a->scale, "logit scale (default 1/sqrt(d))");
  sub->add_option("--threads", a->threads, "OpenMP threads (0 = OpenMP default)")
      ->capture_default_str();
  sub->add_option("--kv-dtype", a->kv_dtype,
                  "K/V storage: fp32, bf16 (float32 files rounded to nearest even), fp16; "
                  "auto = the files' dtype")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}))
      ->capture_default_str();
  sub->add_option("--out-dtype", a->out_dtype, "output dtype")
      ->check(CLI::IsMember({"fp32", "fp16"}))
      ->capture_default_str();
  sub->add_option("--block", a->block, "kernel tile size (query and key block)")
      ->capture_default_str();
  return Command{sub, [a] { run_attend(*a); }};
}

}  // namespace sparse_attn::cli
