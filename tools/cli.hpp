// Shared plumbing of the `sparse-attn` tool. Each subcommand lives in tools/cmd_<name>.cpp and
// exposes one `add_<name>_command`; sparse_attn_cli.cpp registers them and maps errors to exit
// codes: 0 ok, 2 bad input or usage (one line on stderr), 1 internal failure.
#pragma once
#include <CLI/CLI.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <vector>

#include "check.hpp"
#include "output_file.hpp"
#include "sparse_attn/arch/target.hpp"
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/io/npy.hpp"
#include "sparse_attn/methods/registry.hpp"

namespace sparse_attn::cli {

constexpr int kExitOk = 0;
constexpr int kExitInternal = 1;
constexpr int kExitBadInput = 2;

/// A registered subcommand: its CLI11 node and the body to run once parsing succeeded. The body
/// throws sparse_attn::invalid_argument for bad input and must leave no output file behind.
struct Command {
  CLI::App* app = nullptr;
  std::function<void()> run;
};

Command add_attend_command(CLI::App& root);
Command add_decode_command(CLI::App& root);


/// A rank-3 [heads, tokens, dim] floating-point array read from an .npy file.
struct Tensor3 {
  io::NpyArray array;
  index_t heads = 0, tokens = 0, dim = 0;
};

/// Reads `path` (named `what` in messages, e.g. "--q") and checks rank 3, float dtype, extents
/// >= 1.
inline Tensor3 load_tensor3(const std::string& path, const char* what) {
  Tensor3 t;
  try {
    t.array = io::read_npy(path, {io::NpyDtype::f4, io::NpyDtype::f2});
  } catch (const invalid_argument& e) {
    throw invalid_argument(sparse_attn::detail::concat(what, " ", e.what()));
  }
  check(t.array.rank() == 3, what, " ", path, ": must have rank 3 [heads, tokens, dim], got shape ",
        t.array.shape_str(), " (rank ", t.array.rank(), ")");
  t.heads = t.array.shape[0];
  t.tokens = t.array.shape[1];
  t.dim = t.array.shape[2];
  check(t.heads >= 1 && t.tokens >= 1 && t.dim >= 1, what, " ", path,
        ": every extent must be >= 1, got shape ", t.array.shape_str());
  return t;
}

/// --q, --k, --v of one problem: each read by load_tensor3, then checked against each other (K and
/// V agree in heads and tokens, Q's head dim equals K's, GQA heads, n_q <= n_k).
struct QkvFiles {
  Tensor3 q, k, v;
};
inline QkvFiles load_qkv(const std::string& q_path, const std::string& k_path,
                         const std::string& v_path) {
  QkvFiles f{load_tensor3(q_path, "--q"), load_tensor3(k_path, "--k"), load_tensor3(v_path, "--v")};
  const Tensor3 &q = f.q, &k = f.k, &v = f.v;
  check(k.heads == v.heads && k.tokens == v.tokens, "K and V shapes differ: K ",
        k.array.shape_str(), ", V ", v.array.shape_str(), "; heads and tokens must match");
  check(q.dim == k.dim, "head dim mismatch: Q has d=", q.dim, ", K has d=", k.dim);
  check(q.heads % k.heads == 0, "Q heads (", q.heads, ") must be a multiple of K/V heads (",
        k.heads, ")");
  check(q.tokens <= k.tokens, "n_q=", q.tokens, " > n_k=", k.tokens,
        "; queries are the last n_q of the n_k positions, so n_q <= n_k");
  return f;
}

// ---------------------------------------------------------------------------------------------
// What attend and decode share: the storage dtype, the run options, the JSON header.

/// --kv-dtype: "auto" becomes the files' dtype (K and V must agree), anything else is kept.
inline std::string resolve_kv_dtype(const std::string& flag, const Tensor3& k, const Tensor3& v) {
  if (flag != "auto") return flag;
  check(k.array.dtype == v.array.dtype, "K and V dtypes differ ('", k.array.descr(), "' vs '",
        v.array.descr(), "'); pass --kv-dtype to choose the storage type");
  return k.array.dtype == io::NpyDtype::f2 ? "fp16" : "fp32";
}

/// --kv-dtype: the K/V (cache) storage type.
inline void add_kv_dtype_option(CLI::App* sub, std::string& kv_dtype) {
  sub->add_option("--kv-dtype", kv_dtype,
                  "K/V storage: fp32, bf16 (float32 values rounded to nearest even), fp16; "
                  "auto = the files' dtype")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}))
      ->capture_default_str();
}

/// Calls f(T{}) with the storage type named by a resolved --kv-dtype (fp32, bf16, fp16).
template <class F>
decltype(auto) with_kv_type(const std::string& dtype, F&& f) {
  if (dtype == "bf16") return f(bf16{});
  if (dtype == "fp16") return f(fp16{});
  return f(float{});
}

/// --scale and --threads, the options every kernel run takes.
struct RunOptions {
  double scale = std::numeric_limits<double>::quiet_NaN();  // NaN: 1 / sqrt(d)
  int threads = 0;
  CLI::Option* scale_opt = nullptr;

  void add_to(CLI::App* sub) {
    scale_opt = sub->add_option("--scale", scale, "logit scale (default 1/sqrt(d))");
    sub->add_option("--threads", threads, "OpenMP threads (0 = OpenMP default)")
        ->capture_default_str();
  }
  void check_ranges() const {
    if (scale_opt->count())
      check(std::isfinite(scale) && scale > 0, "--scale must be finite and > 0, got ", scale);
    check(threads >= 0, "--threads must be >= 0 (0 = OpenMP default), got ", threads);
  }
  /// The attention options of a call on `pool` (the same for a method's selection and the kernel).
  AttentionOptions attention(Executor& pool) const {
    AttentionOptions o;
    o.scale = static_cast<float>(scale);
    o.num_threads = threads;
    o.executor = &pool;
    return o;
  }
  double resolved_scale(index_t d) const {
    return std::isnan(scale) ? 1.0 / std::sqrt(static_cast<double>(d)) : scale;
  }
};

/// Starts the pool's threads (one empty item per worker), so no timed call pays for it.
inline void warm_up(Executor& pool) { run_items(pool, pool.concurrency(), [](index_t, int) {}); }

/// The JSON line's problem fields: method, hq, hkv, n_q, n_k, d, dv (when it differs from d), dtype.
inline nlohmann::ordered_json problem_json(const std::string& method, const QkvFiles& f,
                                           const std::string& kv_dtype) {
  nlohmann::ordered_json j;
  j["method"] = method;
  j["hq"] = f.q.heads;
  j["hkv"] = f.k.heads;
  j["n_q"] = f.q.tokens;
  j["n_k"] = f.k.tokens;
  j["d"] = f.q.dim;
  if (f.v.dim != f.q.dim) j["dv"] = f.v.dim;
  j["dtype"] = kv_dtype;
  return j;
}

/// The JSON line's run fields: scale (resolved), threads, cpu_target.
inline void add_run_json(nlohmann::ordered_json& j, const RunOptions& r, index_t d) {
  j["scale"] = r.resolved_scale(d);
  j["threads"] = OpenMPExecutor(r.threads).concurrency();
  j["cpu_target"] = target_name(cpu_target());
}

// ---------------------------------------------------------------------------------------------
// Methods, from the one registry (sparse_attn/methods/registry.hpp): --method, the budget
// (--compression | --budget | --mass, --tolerance), --param NAME=VALUE, the generated help.

/// The registry entry called `name` (which must be one of `registry`).
inline const methods::MethodInfo& method_info(const std::vector<methods::MethodInfo>& registry,
                                              const std::string& name) {
  for (const methods::MethodInfo& m : registry)
    if (m.name == name) return m;
  std::string known;
  for (const methods::MethodInfo& m : registry) known += (known.empty() ? "" : ", ") + m.name;
  check(false, "--method: unknown method '", name, "'; known: ", known);
  return registry.front();  // not reached
}

inline bool has_param(const methods::MethodInfo& m, const std::string& name) {
  for (const methods::ParamInfo& p : m.params)
    if (p.name == name) return true;
  return false;
}

/// --method and its budget and parameters, as given on the command line.
struct MethodArgs {
  std::string method = methods::Dense::name;
  double compression = std::numeric_limits<double>::quiet_NaN();
  double tolerance = methods::kDefaultCompressionTolerance;
  double count = 0;  // read as a number so that 2.5 gets the budget message, not a parse error
  double mass = std::numeric_limits<double>::quiet_NaN();
  double mass_floor = 0, mass_cap = 0;  // numbers, like count
  std::vector<std::string> params;
  CLI::Option *compression_opt = nullptr, *tolerance_opt = nullptr, *count_opt = nullptr,
              *mass_opt = nullptr, *mass_floor_opt = nullptr, *mass_cap_opt = nullptr;

  /// Adds --method (checked against `registry`), --compression, --tolerance, --budget, --mass,
  /// --param.
  void add_to(CLI::App* sub, const std::vector<methods::MethodInfo>& registry) {
    std::vector<std::string> names;
    for (const methods::MethodInfo& m : registry) names.push_back(m.name);
    sub->add_option("--method", method, "method (see below)")
        ->check(CLI::IsMember(names))
        ->capture_default_str();
    compression_opt = sub->add_option(
        "--compression", compression,
        "budget: target compression ratio C, finite, >= 1 (dense pairs / computed pairs); the "
        "method picks the budget whose CR is nearest (default: dense 1, others 10)");
    tolerance_opt = sub->add_option(
        "--tolerance", tolerance,
        "with --compression: the result is reachable when the achieved CR is within this "
        "relative distance of C, in [0, 1)")
        ->capture_default_str();
    count_opt = sub->add_option("--budget", count,
                                "budget: N >= 1 units of the method's count unit (see below)");
    mass_opt = sub->add_option("--mass", mass,
                               "budget: attention mass P in (0, 1] to keep per head (methods "
                               "that estimate it)");
    mass_floor_opt = sub->add_option(
        "--mass-floor", mass_floor,
        "with --mass: keep at least N units per head (the method's count unit, as --budget)");
    mass_cap_opt = sub->add_option(
        "--mass-cap", mass_cap,
        "with --mass: keep at most N units per head (the method's count unit, as --budget)");
    sub->add_option("--param", params,
                    "NAME=VALUE: sets one of the method's parameters (see below); repeatable");
  }

  /// The budget: the one given, or the default (dense: CR 1; every other method: CR 10).
  methods::Budget budget(const methods::MethodInfo& info) const {
    const bool c = compression_opt->count() > 0, n = count_opt->count() > 0,
               p = mass_opt->count() > 0;
    check(int{c} + int{n} + int{p} <= 1,
          "--compression, --budget and --mass are alternative budgets; give at most one");
    check(!tolerance_opt->count() || c, "--tolerance applies only to a --compression budget");
    const bool lo = mass_floor_opt->count() > 0, hi = mass_cap_opt->count() > 0;
    check(p || (!lo && !hi), "--mass-floor and --mass-cap apply only to a --mass budget");
    check(std::isfinite(tolerance) && tolerance >= 0.0 && tolerance < 1.0,
          "--tolerance must be in [0, 1) (relative: 0.1 = +-10%), got ", tolerance);
    if (n) {
      check(info.unit != methods::BudgetUnit::none, "--budget does not apply to --method ",
            info.name, ": it has no count unit");
      check(count >= 1.0 && count == std::floor(count) && count < 9.0e15,
            "--budget must be a whole number >= 1 of ", methods::to_string(info.unit),
            " (--method ", info.name, "), got ", count);
      return methods::Budget::count(static_cast<index_t>(count));
    }
    if (p) {
      check(mass > 0.0 && mass <= 1.0, "--mass must be in (0, 1] (the attention mass kept), got ",
            mass);
      // (given, value, flag, least value)
      for (const auto& [given, value, flag, least] :
           {std::tuple<bool, double, const char*, double>{lo, mass_floor, "--mass-floor", 0.0},
            {hi, mass_cap, "--mass-cap", 1.0}})
        check(!given || (value >= least && value == std::floor(value) && value < 9.0e15), flag,
              " must be a whole number >= ", least, " of ", methods::to_string(info.unit),
              " (--method ", info.name, "), got ", value);
      check(!lo || !hi || mass_floor <= mass_cap, "--mass-floor (", mass_floor,
            ") must not exceed --mass-cap (", mass_cap, ")");
      return methods::Budget::mass(mass, lo ? static_cast<index_t>(mass_floor) : 0,
                                   hi ? static_cast<index_t>(mass_cap) : methods::Budget::kNoCap);
    }
    const double cr = c ? compression : default_compression(info);
    check(std::isfinite(cr) && cr >= 1.0, "--compression must be finite and >= 1 (1 = dense), got ",
          cr);
    return methods::Budget::compression(cr, tolerance);
  }
  bool budget_given() const {
    return compression_opt->count() > 0 || count_opt->count() > 0 || mass_opt->count() > 0;
  }

  /// The default target CR: 1 for dense (its only reachable target), 10 for every other method.
  static double default_compression(const methods::MethodInfo& info) {
    return info.name == methods::Dense::name ? 1.0 : 10.0;
  }

  /// The --param settings, NAME=VALUE each, in order (the registry checks names and values).
  methods::ParamSettings settings() const {
    methods::ParamSettings out;
    for (const std::string& s : params) {
      const std::size_t eq = s.find('=');
      check(eq != std::string::npos && eq > 0 && eq + 1 < s.size(),
            "--param expects NAME=VALUE (e.g. --param block=32), got '", s, "'");
      out.emplace_back(s.substr(0, eq), s.substr(eq + 1));
    }
    return out;
  }
};

/// The resolved parameters of a configured method: name -> value as text.
template <class M>
nlohmann::ordered_json params_json(const M& configured) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [name, value] : methods::param_values(configured)) j[name] = value;
  return j;
}

/// The JSON line's selection fields: budget, target_compression (null for count / mass),
/// reachable, achieved_compression, pairs.
inline void add_selection_json(nlohmann::ordered_json& j, const methods::Budget& budget,
                               bool reachable, double achieved, index_t pairs) {
  j["budget"] = budget.str();
  if (budget.is_compression())
    j["target_compression"] = budget.target_compression();
  else
    j["target_compression"] = nullptr;
  j["reachable"] = reachable;
  j["achieved_compression"] = achieved;
  j["pairs"] = pairs;
}

namespace detail_help {
// Appends `text` to `out` wrapped at `width` columns, continuation lines indented by `indent`.
inline void wrap(std::string& out, const std::string& text, std::size_t col, std::size_t indent,
                 std::size_t width = 100) {
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find(' ', pos);
    if (end == std::string::npos) end = text.size();
    const std::string word = text.substr(pos, end - pos);
    if (col > indent && col + 1 + word.size() > width) {
      out += "\n" + std::string(indent, ' ');
      col = indent;
    } else if (col > indent) {
      out += ' ';
      ++col;
    }
    out += word;
    col += word.size();
    pos = end + 1;
  }
  out += "\n";
}
}  // namespace detail_help

/// The help footer's method list, generated from the registry: name, summary, count unit,
/// parameters with their defaults and help.
inline std::string methods_help(const std::vector<methods::MethodInfo>& registry,
                                const char* heading) {
  std::string s = std::string(heading) + "\n";
  constexpr std::size_t kName = 24;
  for (const methods::MethodInfo& m : registry) {
    std::string line = "  " + m.name;
    line += std::string(line.size() < kName ? kName - line.size() : 1, ' ');
    s += line;
    detail_help::wrap(s, m.summary, line.size(), kName);
    s += std::string(kName, ' ');
    detail_help::wrap(s,
                      m.unit == methods::BudgetUnit::none
                          ? std::string("--budget: no count unit")
                          : std::string("--budget N counts ") + methods::to_string(m.unit),
                      kName, kName);
    for (const methods::ParamInfo& p : m.params) {
      std::string head = std::string(kName, ' ') + "--param " + p.name + "=" + p.default_value + " ";
      s += head;
      detail_help::wrap(s, p.help, head.size(), kName + 4);
    }
  }
  return s;
}

}  // namespace sparse_attn::cli
