/// @file
/// @brief Fidelity-vs-compression evaluation of every registered method on one problem
/// (docs/METHODS.md, section "Evaluation").
///
/// Every method comes from the registry (methods/registry.hpp) and is asked for
/// Budget::compression(target CR) with its default parameters (EvalOptions::params overrides them).
/// The methods of EvalOptions::adaptive run a second time per target CR, adaptively: at the mass
/// budget Budget::mass(p) whose p, searched by bisection, gives the achieved CR nearest the target
/// (Record::adaptive, label "<method>+mass"): the same pairs as the fixed budget, spent per head
/// (and query block) where the method estimates the attention mass.
///
/// Prefill: every query row of the problem. Dense runs first (output, LSE, time); then each
/// (method, target CR) selects a mask (timed: selection) and runs the common prefill kernel on it
/// (timed: kernel), and is compared with dense (metrics.hpp): achieved CR = dense causal pairs /
/// computed pairs, relative L2 error (layer output, median and worst head), attention-mass recall
/// from the two LSEs (every row), top-1 recall (every row up to 8192 queries, else a strided sample
/// of 2048 rows including the last), and whether the last query row computes the needle keys.
///
/// Decode: the last R query rows are R decode steps. Step t (0-based) is the token at position p_t
/// = n_k - R + t; its cache holds keys [0, p_t] as the method left them. Concretely: a kv::Cache
/// gets the prompt keys [0, n_k - R), the method's DecodePolicy (methods/decode_policy.hpp) runs
/// after_prefill with the prompt's queries (query rows [0, n_q - R)), then for each step: the
/// step's key/value is appended, before_step selects (or evicts) and returns the KeySelection, the
/// core decode kernel runs (timed: kernel; it also emits the per-key attention mass when the policy
/// wants it), after_step runs. Dense decode is the same loop with no policy: keys [0, p_t]. Budgets
/// of eviction methods are relative to the sequence length when they evict. Achieved CR = sum_t Hq
/// (p_t + 1) / pairs read; reachable iff it is within the budget's tolerance of the target
/// (methods::is_reachable); errors over the R x Hq output rows; mass recall from the LSEs; top-1
/// recall of each step's dense argmax over [0, p_t]; needles at the last step. Speed-up = dense
/// time / (selection + kernel time) of the same run.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "sparse_attn/eval/metrics.hpp"
#include "sparse_attn/eval/problem.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/decode.hpp"
#include "sparse_attn/kernel/prefill.hpp"
#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/decode.hpp"
#include "sparse_attn/methods/layer_budget.hpp"
#include "sparse_attn/methods/registry.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
/// @brief Evaluation of the sparse methods against dense attention: problems (eval::Problem,
/// the synthetic workload), fidelity metrics and the fidelity-vs-compression sweep
/// (eval::evaluate). See docs/METHODS.md, section "Evaluation".
namespace eval {

/// One (dataset, phase, method, target CR) point of the evaluation.
struct Record {
  /// Problem name (Problem::name).
  std::string dataset, phase, method, detail;
  /// @var phase
  /// "prefill" or "decode".
  /// @var method
  /// Registry name of the method ("dense" for the baseline).
  /// @var detail
  /// The resolved budget in the method's terms (SelectionStats::detail), e.g. "W=412".

  /// The budget the method ran at, as Budget::str(): "cr=5" for a fixed budget, "mass=0.873" for
  /// an adaptive one (a mass target searched for the target CR; see EvalOptions::adaptive).
  std::string budget = "cr=1";
  /// Whether the budget was a mass target searched for target_cr (adaptive: the achieved CR is
  /// the target's, the units spent per head follow the estimated attention mass).
  bool adaptive = false;

  index_t tokens = 0;  ///< n_k: keys (positions) of the problem.
  index_t rows = 0;    ///< Query rows evaluated per head (n_q, or R decode steps).
  /// Compression ratio asked for (1 for dense).
  double target_cr = 1.0, achieved_cr = 1.0;
  /// @var achieved_cr
  /// Compression ratio achieved: dense causal pairs / pairs computed (decode: read).

  bool reachable = true;  ///< Whether achieved_cr is within the budget's tolerance of target_cr.
  /// Relative L2 error of the whole output (OutputError::overall).
  double err_layer = 0.0, err_median_head = 0.0, err_worst_head = 0.0;
  /// @var err_median_head
  /// Median over query heads of the per-head relative L2 error.
  /// @var err_worst_head
  /// Largest per-head relative L2 error.

  /// Mean attention-mass recall over (head, row), in [0, 1].
  double mass_mean = 1.0, mass_min = 1.0;
  /// @var mass_min
  /// Smallest attention-mass recall of a (head, row), in [0, 1].

  double top1 = 1.0;      ///< Share of (head, row) whose dense argmax key was computed.
  index_t top1_rows = 0;  ///< Rows per head that top-1 was measured on (top1_rows()).
  /// (head, needle) pairs computed at the last query row.
  index_t needles_kept = 0, needles_total = 0;
  /// @var needles_total
  /// (head, needle) pairs there are: Hq x the problem's needles.

  /// Selection time in milliseconds (decode: every policy hook over the whole run).
  double ms_select = 0.0, ms_kernel = 0.0, ms_dense = 0.0;
  /// @var ms_kernel
  /// Kernel time in milliseconds (prefill: best of up to 5 runs; decode: summed over the steps).
  /// @var ms_dense
  /// The dense baseline's kernel time on the same phase, in milliseconds.

  /// @return the method's name with "+mass" for an adaptive record (the reports' series name).
  std::string label() const { return adaptive ? method + "+mass" : method; }
  /// @return selection + kernel time, in milliseconds.
  double ms_total() const { return ms_select + ms_kernel; }
  /// @return ms_dense / ms_total(); NaN when ms_total() is 0.
  double speedup() const { return ms_total() > 0.0 ? ms_dense / ms_total() : kNaN; }
};

/// What evaluate() sweeps and how.
struct EvalOptions {
  /// Target CRs, each run with every selected method (dense is always added at CR 1).
  std::vector<double> compressions{2, 5, 10, 20};
  /// Run the prefill phase (evaluate() only).
  bool prefill = true, decode = true;
  /// @var decode
  /// Run the decode phase (evaluate() only).

  index_t last_rows = 64;  ///< R: decode steps, the last R query rows, in [1, n_q).
  int num_threads = 0;     ///< Threads of the default executor, >= 0 (0: OpenMP default).
  /// The caller's executor, not owned; nullptr: the default one for num_threads. Runs every
  /// method, kernel and metric.
  Executor* executor = nullptr;
  /// Parameter settings per method name (methods/registry.hpp), applied over its defaults.
  std::vector<std::pair<std::string, methods::ParamSettings>> params;
  /// Prefill kernels faster than this (milliseconds) are repeated, best of at most 5 runs.
  double min_time_ms = 30;
  std::vector<std::string> prefill_methods;  ///< Prefill methods to run by name; empty: all.
  std::vector<std::string> decode_methods;   ///< Decode methods to run by name; empty: all.
  /// Methods (among those run) that also run adaptively: at each target CR, a mass budget
  /// Budget::mass(p) whose p is searched so that the achieved CR is nearest the target (in log
  /// ratio; 16 bisection steps over p in (0, 1], each a selection or, for decode, a decode loop).
  /// The same number of pairs as the fixed budget, spent per head (and query block) where the
  /// estimated attention mass is. Names that take no mass budget are refused.
  std::vector<std::string> adaptive{"block_sparse", "vertical_slash", "quest", "quest_head",
                                    "snapkv"};
  /// Called with a line of progress after each dense run and each (method, CR); may be empty.
  std::function<void(const std::string&)> progress;
};

/// @cond INTERNAL
namespace detail_eval {

// The dense baseline row of a phase: CR 1, exact, every needle kept; the sparse rows start from it.
inline Record dense_record(const Problem& p, const char* phase, index_t rows, index_t top1_rows,
                           double dense_ms) {
  Record r;
  r.dataset = p.name;
  r.phase = phase;
  r.method = "dense";
  r.tokens = p.k.tokens;
  r.rows = rows;
  r.top1_rows = top1_rows;
  r.needles_total = r.needles_kept = p.q.heads * static_cast<index_t>(p.needles.size());
  r.ms_kernel = r.ms_dense = dense_ms;
  return r;
}

using Clock = std::chrono::steady_clock;
inline double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}
// Runs one empty item per worker, so the first timed call does not pay for starting the threads
// (an OpenMP team, an engine's pool).
inline void warm_threads(const ExecutorChoice& exec) {
  sparse_attn::detail::with_executor(exec, [](Executor& ex) {
    run_items(ex, ex.concurrency(), [](index_t, int) {});
  });
}
// Best-of timing: runs f once, then again while the total stays under min_ms (at most 5 runs).
template <class F>
double time_best(F&& f, double min_ms) {
  double best = 0.0, total = 0.0;
  for (int run = 0; run < 5; ++run) {
    const auto t0 = Clock::now();
    f();
    const double ms = ms_since(t0);
    best = run == 0 ? ms : std::min(best, ms);
    total += ms;
    if (total >= min_ms) break;
  }
  return best;
}
inline bool wanted(const std::vector<std::string>& list, const char* name) {
  return list.empty() || std::find(list.begin(), list.end(), name) != list.end();
}
// The settings EvalOptions::params gives method `name` (empty: its defaults).
inline methods::ParamSettings params_for(const EvalOptions& opt, const std::string& name) {
  for (const auto& [method, settings] : opt.params)
    if (method == name) return settings;
  return {};
}
inline std::string cr_label(double cr) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", cr);
  return buf;
}

// The mass target p in (0, 1] whose achieved CR is nearest `target` in log ratio: 16 bisection
// steps over p (the achieved CR falls as p grows). run(p) selects (and runs) at Budget::mass(p)
// and returns its achieved CR; every result is kept by the caller's run, the best one is
// reported by index. Returns the best p.
template <class Run>
double search_mass(double target, Run&& run) {
  double lo = 0.0, hi = 1.0, best_p = 1.0, best_d = std::numeric_limits<double>::infinity();
  auto visit = [&](double p) {
    const double cr = run(p);
    const double d = std::fabs(std::log(cr / target));
    if (d < best_d || (d == best_d && p > best_p)) best_d = d, best_p = p;
    return cr;
  };
  if (visit(1.0) >= target) return best_p;  // even p = 1 is sparser than asked
  for (int step = 0; step < 16; ++step) {
    const double mid = 0.5 * (lo + hi);
    if (visit(mid) >= target)
      lo = mid;
    else
      hi = mid;
  }
  return best_p;
}

// Checks the adaptive list against the registry: each name a method that takes mass budgets.
inline void check_adaptive(const EvalOptions& opt, const std::vector<methods::MethodInfo>& a,
                           const std::vector<methods::MethodInfo>& b, const char* where) {
  for (const std::string& name : opt.adaptive) {
    bool ok = false;
    for (const auto* list : {&a, &b})
      for (const methods::MethodInfo& m : *list) ok = ok || (m.name == name && m.takes_mass);
    require(ok, where, ": EvalOptions::adaptive names '", name,
            "', which is not a method that takes mass budgets");
  }
}

}  // namespace detail_eval
/// @endcond

/// A prefill selection with its mask type erased: what the evaluator runs and inspects. The
/// closures share the mask and view the problem's data, which must outlive them.
struct PrefillRun {
  methods::SelectionStats stats;  ///< The selection's statistics (pairs, CR, reachability, time).
  /// Runs the prefill kernel under the mask: out [Hq, n_q, dv] with the given options.
  std::function<void(const TensorView<float>& out, const AttentionOptions& opt)> run;
  /// Whether the mask computes the pair (query head h, query row qi, key kj).
  std::function<bool(index_t h, index_t qi, index_t kj)> keeps;
};

/// Selects with prefill method `name` (registry) on problem p at `budget`. Cost: the method's
/// selection; allocates the mask (shared by the returned closures).
/// @param name registry name of a prefill method.
/// @param settings parameter settings applied over the method's defaults.
/// @param p the problem.
/// @param budget the budget, e.g. Budget::compression(10).
/// @param opt scale, threads or executor for the selection.
/// @return the type-erased selection.
/// @throws sparse_attn::invalid_argument when the name or a setting is unknown or invalid, or the
/// method rejects the problem or budget.
/// @throws std::bad_alloc when the selection cannot be allocated.
inline PrefillRun select_prefill(const std::string& name, const methods::ParamSettings& settings,
                                 const Problem& p, const methods::Budget& budget,
                                 const AttentionOptions& opt) {
  return methods::with_prefill_method(name, settings, [&](const auto& method) {
    auto sel = method.select(p.q, p.k, budget, opt);
    using Mask = decltype(sel.mask);
    auto m = std::make_shared<const Mask>(std::move(sel.mask));
    PrefillRun r;
    r.stats = std::move(sel.stats);
    const TensorView<const float> q = p.q, k = p.k, v = p.v;
    r.run = [m, q, k, v](const TensorView<float>& out, const AttentionOptions& o) {
      prefill(q, k, v, out, *m, o);
    };
    r.keeps = [m](index_t h, index_t qi, index_t kj) { return m->allowed(h, qi, kj); };
    return r;
  });
}

/// @brief Prefill records of the selected methods (dense first) on problem p.
///
/// Dense prefill of every query row (output, LSE, best-of time), the dense argmax of the top-1
/// rows, then for every selected prefill method (registry order; "dense" and user-mask methods
/// skipped) and every target CR: selection, kernel (best-of time) and the metrics against dense.
/// Cost: the dense and sparse kernels (each up to 5 times), O(Hq x top-1 rows x n_k x d) for the
/// argmax, and each method's selection. Allocates two outputs and two LSE arrays
/// (Hq x n_q x (dv + 1) floats each), the argmax and each selection's mask.
/// @param p the problem.
/// @param opt the sweep (compressions, prefill_methods, params, threads, min_time_ms, progress).
/// @return the dense record, then one record per (method, CR), followed for an adaptive method
/// by its adaptive record at that CR.
/// @throws sparse_attn::invalid_argument when p is invalid (Problem::validate), num_threads < 0,
/// opt.adaptive names a method that takes no mass budget, or a method's settings or selection
/// fail.
/// @throws std::bad_alloc when a buffer cannot be allocated.
inline std::vector<Record> evaluate_prefill(const Problem& p, const EvalOptions& opt) {
  namespace de = detail_eval;
  p.validate("eval::evaluate_prefill");
  de::check_adaptive(opt, methods::prefill_methods(), methods::decode_methods(),
                     "eval::evaluate_prefill");
  require(opt.num_threads >= 0, "eval::evaluate_prefill",
          ": num_threads must be >= 0 (0: default), got ", opt.num_threads);
  const index_t hq = p.q.heads, nq = p.q.tokens, dv = p.v.dim;
  AttentionOptions kopt;
  kopt.scale = p.scale;
  kopt.num_threads = opt.num_threads;
  kopt.executor = opt.executor;
  const ExecutorChoice exec{opt.executor, opt.num_threads};
  de::warm_threads(exec);

  std::vector<float> dense_out(static_cast<std::size_t>(hq * nq * dv)), dense_lse(static_cast<std::size_t>(hq * nq));
  const TensorView<float> dense_view(dense_out.data(), hq, nq, dv);
  const auto dense_mask = masks::causal(hq, nq, p.k.tokens);
  AttentionOptions dopt = kopt;
  dopt.lse = LseView(dense_lse.data(), nq);
  const double dense_ms = de::time_best([&] { prefill(p.q, p.k, p.v, dense_view, dense_mask, dopt); }, opt.min_time_ms);
  if (opt.progress) opt.progress(p.name + " prefill: dense " + std::to_string(dense_ms) + " ms");

  const std::vector<index_t> rows = top1_rows(nq);
  const std::vector<index_t> argmax = dense_argmax(p.q, p.k, rows, true, exec);

  std::vector<Record> out;
  const Record dense = de::dense_record(p, "prefill", nq, static_cast<index_t>(rows.size()), dense_ms);
  out.push_back(dense);

  std::vector<float> got(dense_out.size()), lse(dense_lse.size());
  const TensorView<float> got_view(got.data(), hq, nq, dv);
  // Kernel, metrics and progress line of one selection; r holds the method, budget and times.
  auto measure = [&](const PrefillRun& sel, Record r) {
    AttentionOptions o = kopt;
    o.lse = LseView(lse.data(), nq);
    r.ms_kernel = de::time_best([&] { sel.run(got_view, o); }, opt.min_time_ms);
    r.achieved_cr = sel.stats.compression();
    r.reachable = r.adaptive ? methods::is_reachable(methods::Budget::compression(r.target_cr),
                                                     r.achieved_cr)
                             : sel.stats.reachable;
    r.detail = sel.stats.detail;
    const OutputError e = output_error(got_view, dense_view);
    r.err_layer = e.overall;
    r.err_median_head = e.median_head();
    r.err_worst_head = e.worst_head();
    const MassRecall mr = mass_recall(lse, dense_lse);
    r.mass_mean = mr.mean;
    r.mass_min = mr.min;
    index_t hit = 0;
    for (index_t h = 0; h < hq; ++h)
      for (std::size_t i = 0; i < rows.size(); ++i)
        hit += sel.keeps(h, rows[i], argmax[static_cast<std::size_t>(h) * rows.size() + i]) ? 1 : 0;
    r.top1 = static_cast<double>(hit) / static_cast<double>(hq * static_cast<index_t>(rows.size()));
    r.needles_kept = 0;
    for (index_t h = 0; h < hq; ++h)
      for (index_t j : p.needles) r.needles_kept += sel.keeps(h, nq - 1, j) ? 1 : 0;
    if (opt.progress)
      opt.progress(p.name + " prefill: " + r.label() + " CR " + de::cr_label(r.target_cr) +
                   " -> " + de::cr_label(r.achieved_cr) + ", err " + de::cr_label(r.err_layer));
    out.push_back(r);
  };
  for (const methods::MethodInfo& m : methods::prefill_methods()) {
    if (m.name == "dense" || m.needs_user_mask || !de::wanted(opt.prefill_methods, m.name.c_str()))
      continue;
    const bool adaptive = m.takes_mass && std::find(opt.adaptive.begin(), opt.adaptive.end(),
                                                    m.name) != opt.adaptive.end();
    const methods::ParamSettings settings = de::params_for(opt, m.name);
    for (double cr : opt.compressions) {
      Record r = dense;
      r.method = m.name;
      r.target_cr = cr;
      r.budget = methods::Budget::compression(cr).str();
      auto t0 = de::Clock::now();
      const PrefillRun sel =
          select_prefill(m.name, settings, p, methods::Budget::compression(cr), kopt);
      r.ms_select = de::ms_since(t0);
      measure(sel, r);
      if (!adaptive) continue;
      // The mass target whose achieved CR is nearest cr (a calibration an engine makes once per
      // layer); the record times one selection at that target, not the search.
      const double mass = de::search_mass(cr, [&](double q) {
        return select_prefill(m.name, settings, p, methods::Budget::mass(q), kopt)
            .stats.compression();
      });
      t0 = de::Clock::now();
      const PrefillRun best = select_prefill(m.name, settings, p, methods::Budget::mass(mass), kopt);
      r.ms_select = de::ms_since(t0);
      r.adaptive = true;
      r.budget = methods::Budget::mass(mass).str();
      measure(best, r);
    }
  }
  return out;
}

/// Outputs of one decode loop (run_decode()).
struct DecodeRun {
  /// Attention output of the R steps, [Hq][R][dv].
  std::vector<float> out, lse;
  /// @var lse
  /// LSE of each step's row, [Hq][R].

  /// (query row, key) pairs read, summed over the steps and query heads.
  index_t pairs = 0, dense_pairs = 0;
  /// @var dense_pairs
  /// Pairs dense causal attention reads over the same steps: sum_t Hq (p_t + 1).

  /// Time of the policy's hooks (after_prefill, before_step, after_step), in milliseconds.
  double ms_select = 0.0, ms_kernel = 0.0;
  /// @var ms_kernel
  /// Time of the decode kernel summed over the steps, in milliseconds.

  /// (query head, step) pairs whose dense argmax key was read.
  index_t top1_hit = 0, needles_kept = 0;
  /// @var needles_kept
  /// (query head, needle) pairs read at the last step.
};

/// The cache the evaluator decodes on: contiguous fp32.
using EvalCache = kv::Cache<float>;
/// The decode policies the evaluator runs (methods::make_decode_policy for EvalCache and fp32
/// queries).
using EvalPolicy = methods::DecodePolicy<EvalCache, float>;

/// @brief Runs the decode loop of a policy (nullptr: dense) over the last R query rows of p.
///
/// A fresh EvalCache of capacity n_k gets the prompt keys [0, n_k - R); the policy's
/// after_prefill sees query rows [0, n_q - R); then each step t appends key n_k - R + t,
/// selects (before_step), runs the kernel (timed; with the per-key mass when the policy wants
/// it) and runs after_step. The cache's appends and the kernel run on `exec`. Arguments are not
/// validated beyond what the cache, the policy and the kernel check: p must be valid and R in
/// [1, n_q). Cost: R decode steps plus the policy's work. Allocates the cache
/// (Hkv x n_k x (d + dv) floats, plus key bounds when the policy needs them), the outputs, a
/// key-mass buffer (Hkv x n_k floats) when the policy wants it, and a kernel workspace per step.
/// @param p the problem.
/// @param R decode steps, in [1, n_q).
/// @param pol the decode policy, or nullptr for dense decode; its state changes with the run.
/// @param argmax [Hq][R] dense argmax position of each step (step t, query head h at
/// h * R + t), or empty to skip top-1.
/// @param exec the caller's executor, or the default one for exec.num_threads.
/// @return the outputs, LSEs, pair counts, timings, top-1 hits and needles kept.
/// @throws sparse_attn::invalid_argument from the cache, the policy or the kernel on invalid
/// arguments.
/// @throws std::bad_alloc when a buffer cannot be allocated.
inline DecodeRun run_decode(const Problem& p, index_t R, EvalPolicy* pol,
                            const std::vector<index_t>& argmax, const ExecutorChoice& exec) {
  namespace de = detail_eval;
  const index_t hq = p.q.heads, hkv = p.k.heads, G = hq / hkv, nk = p.k.tokens, nq = p.q.tokens;
  const index_t dv = p.v.dim, n0 = nk - R;
  kv::CacheOptions co;
  co.kv_heads = hkv;
  co.head_dim = p.k.dim;
  co.value_dim = dv;
  co.capacity = nk;
  co.page_size = 16;  // Quest's pages
  co.key_bounds = pol != nullptr && pol->needs_key_bounds();
  EvalCache cache(co);
  cache.append(p.k.slice_tokens(0, n0), p.v.slice_tokens(0, n0), exec);
  DecodeRun run;
  run.out.assign(static_cast<std::size_t>(hq * R * dv), 0.0f);
  run.lse.assign(static_cast<std::size_t>(hq * R), 0.0f);
  DecodeOptions dopt;
  dopt.scale = p.scale;
  dopt.num_threads = exec.num_threads;
  dopt.executor = exec.executor;
  if (pol != nullptr) {
    const auto t0 = de::Clock::now();
    pol->after_prefill(p.q.slice_tokens(0, nq - R), cache, dopt);
    run.ms_select += de::ms_since(t0);
  }
  // Per-key attention mass of each step ([Hkv][max_length()]), emitted by the kernel for
  // policies that score keys.
  const bool wants_mass = pol != nullptr && pol->wants_key_mass();
  std::vector<float> mass(wants_mass ? static_cast<std::size_t>(hkv * cache.capacity()) : 0);
  // Is absolute position `pos` among the keys unit u of head hk reads under `keys`?
  auto reads = [&](const KeySelection& keys, index_t h, index_t pos) {
    const index_t hk = h / G, len = cache.length(hk);
    const index_t* P = cache.positions(hk);
    const index_t* it = std::lower_bound(P, P + len, pos);
    if (it == P + len || *it != pos) return false;
    const index_t slot = it - P;
    if (keys.scope() == KeySelection::Scope::all) return true;
    const index_t u = keys.scope() == KeySelection::Scope::per_q_head ? h : hk;
    for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
      if (slot >= r->begin && slot < r->end) return true;
    return false;
  };
  for (index_t t = 0; t < R; ++t) {
    const index_t pos = n0 + t;
    cache.append(p.k.slice_tokens(pos, 1), p.v.slice_tokens(pos, 1), exec);
    const TensorView<const float> q = p.q.slice_tokens(nq - R + t, 1);
    auto t0 = de::Clock::now();
    const KeySelection keys = pol != nullptr ? pol->before_step(q, cache, dopt) : KeySelection::all();
    run.ms_select += de::ms_since(t0);
    const kv::DecodeStats st = kv::decode_stats(keys, cache, hq, 1);
    run.pairs += st.pairs;
    run.dense_pairs += st.dense_pairs;
    const TensorView<float> o(run.out.data() + t * dv, hq, 1, dv, R * dv, dv, 1);
    DecodeOptions step_opt = dopt;
    step_opt.lse = LseView(run.lse.data() + t, R, 1);
    if (wants_mass) step_opt.key_mass = KeyMassView{mass.data(), cache.max_length(), 0};
    t0 = de::Clock::now();
    decode(q, cache, o, keys, step_opt);
    run.ms_kernel += de::ms_since(t0);
    if (!argmax.empty())
      for (index_t h = 0; h < hq; ++h) run.top1_hit += reads(keys, h, argmax[static_cast<std::size_t>(h * R + t)]) ? 1 : 0;
    if (t == R - 1)
      for (index_t h = 0; h < hq; ++h)
        for (index_t j : p.needles) run.needles_kept += reads(keys, h, j) ? 1 : 0;
    if (pol != nullptr) {
      t0 = de::Clock::now();
      pol->after_step(q, cache, dopt, wants_mass ? mass.data() : nullptr);
      run.ms_select += de::ms_since(t0);
    }
  }
  return run;
}

/// Caches of at most this many keys (summed over KV heads) decode on one thread unless
/// EvalOptions::num_threads says otherwise: such a step reads ~1 MB, less than what waking a second
/// thread costs on a busy machine, and dense and sparse are timed alike.
inline constexpr index_t kSingleThreadDecodeKeys = 32768;

/// @brief Decode records of the selected methods (dense first): the last opt.last_rows query rows
/// as decode steps.
///
/// Computes the dense argmax of each step's row, runs the dense decode loop, then for every
/// selected decode method (registry order, "dense" skipped) and every target CR the method's
/// policy at Budget::compression(CR) through run_decode(), and the metrics against dense. A
/// cache of at most kSingleThreadDecodeKeys keys (summed over KV heads) decodes on one thread
/// unless opt.num_threads or opt.executor says otherwise. Cost: O(Hq x R x n_k x d) for the
/// argmax plus one decode loop per (method, CR). Allocates one cache and the outputs per run.
/// @param p the problem.
/// @param opt the sweep (compressions, last_rows, decode_methods, params, threads, progress).
/// @return the dense record, then one record per (method, CR), followed for an adaptive method
/// by its adaptive record at that CR (its p searched over whole decode loops: ~17 loops).
/// @throws sparse_attn::invalid_argument when p is invalid (Problem::validate), num_threads < 0,
/// last_rows is outside [1, n_q), opt.adaptive names a method that takes no mass budget, or a
/// method's settings or policy fail.
/// @throws std::bad_alloc when a buffer cannot be allocated.
inline std::vector<Record> evaluate_decode(const Problem& p, const EvalOptions& opt) {
  namespace de = detail_eval;
  p.validate("eval::evaluate_decode");
  de::check_adaptive(opt, methods::prefill_methods(), methods::decode_methods(),
                     "eval::evaluate_decode");
  require(opt.num_threads >= 0, "eval::evaluate_decode",
          ": num_threads must be >= 0 (0: default), got ", opt.num_threads);
  const index_t R = opt.last_rows, hq = p.q.heads, nq = p.q.tokens, dv = p.v.dim;
  require(R >= 1 && R < nq, "eval::evaluate_decode", ": last_rows R=", R,
          " must be in [1, n_q) (the prompt keeps at least one query row), n_q=", nq);
  const int threads = opt.num_threads > 0 ? opt.num_threads
                      : p.k.tokens * p.k.heads <= kSingleThreadDecodeKeys ? 1 : 0;
  // The caller's executor runs everything; the default one follows the small-cache rule above.
  const ExecutorChoice exec{opt.executor, threads};
  de::warm_threads({opt.executor, opt.num_threads});

  std::vector<index_t> step_rows(static_cast<std::size_t>(R));
  for (index_t t = 0; t < R; ++t) step_rows[static_cast<std::size_t>(t)] = nq - R + t;
  const std::vector<index_t> argmax =
      dense_argmax(p.q, p.k, step_rows, true, {opt.executor, opt.num_threads});  // [h][t]

  const DecodeRun dense_run = run_decode(p, R, nullptr, {}, exec);
  const double dense_ms = dense_run.ms_kernel;
  if (opt.progress) opt.progress(p.name + " decode: dense " + std::to_string(dense_ms) + " ms for " + std::to_string(R) + " steps");
  const TensorView<const float> dense_view(dense_run.out.data(), hq, R, dv);

  std::vector<Record> out;
  const Record dense = de::dense_record(p, "decode", R, R, dense_ms);
  out.push_back(dense);

  for (const methods::MethodInfo& m : methods::decode_methods()) {
    if (m.name == "dense" || !de::wanted(opt.decode_methods, m.name.c_str())) continue;
    const bool adaptive = m.takes_mass && std::find(opt.adaptive.begin(), opt.adaptive.end(),
                                                    m.name) != opt.adaptive.end();
    const methods::ParamSettings settings = de::params_for(opt, m.name);
    for (double cr : opt.compressions) {
      for (const bool by_mass : {false, true}) {
        if (by_mass && !adaptive) continue;
        Record r = dense;
        r.method = m.name;
        r.target_cr = cr;
        r.adaptive = by_mass;
        auto run_at = [&](const methods::Budget& b, std::string* detail) {
          const auto pol = methods::make_decode_policy<EvalCache, float>(m.name, settings, b);
          DecodeRun run = run_decode(p, R, pol.get(), argmax, exec);
          if (detail != nullptr) *detail = pol->stats().detail;
          return run;
        };
        // Adaptive: the mass target whose achieved CR over the run is nearest cr (each candidate
        // is a whole decode loop); the record is the run at that target.
        const methods::Budget budget =
            by_mass ? methods::Budget::mass(de::search_mass(cr, [&](double q) {
                        const DecodeRun t = run_at(methods::Budget::mass(q), nullptr);
                        return compression_ratio(t.dense_pairs, t.pairs);
                      }))
                    : methods::Budget::compression(cr);
        r.budget = budget.str();
        const DecodeRun run = run_at(budget, &r.detail);
        r.ms_select = run.ms_select;
        r.ms_kernel = run.ms_kernel;
        r.achieved_cr = compression_ratio(run.dense_pairs, run.pairs);
        r.reachable = methods::is_reachable(methods::Budget::compression(cr), r.achieved_cr);
        const OutputError e = output_error(TensorView<const float>(run.out.data(), hq, R, dv), dense_view);
        r.err_layer = e.overall;
        r.err_median_head = e.median_head();
        r.err_worst_head = e.worst_head();
        const MassRecall mr = mass_recall(run.lse, dense_run.lse);
        r.mass_mean = mr.mean;
        r.mass_min = mr.min;
        r.top1 = static_cast<double>(run.top1_hit) / static_cast<double>(hq * R);
        r.needles_kept = run.needles_kept;
        if (opt.progress)
          opt.progress(p.name + " decode: " + r.label() + " CR " + de::cr_label(cr) + " -> " +
                       de::cr_label(r.achieved_cr) + ", err " + de::cr_label(r.err_layer));
        out.push_back(r);
      }
    }
  }
  return out;
}

/// Both phases as selected in opt (opt.prefill, opt.decode): evaluate_prefill() then
/// evaluate_decode(). The evaluator holds no shared state; timings are meaningful only when
/// nothing else loads the machine.
/// @param p the problem.
/// @param opt the sweep.
/// @return the prefill records, then the decode records.
/// @throws sparse_attn::invalid_argument as evaluate_prefill() and evaluate_decode().
/// @throws std::bad_alloc when a buffer cannot be allocated.
inline std::vector<Record> evaluate(const Problem& p, const EvalOptions& opt) {
  std::vector<Record> out;
  if (opt.prefill) out = evaluate_prefill(p, opt);
  if (opt.decode) {
    auto d = evaluate_decode(p, opt);
    out.insert(out.end(), d.begin(), d.end());
  }
  return out;
}

/// How a total budget is split across layers (methods/layer_budget.hpp).
enum class LayerSchedule {
  uniform,  ///< every layer at the total target CR
  pyramid,  ///< PyramidKV: weights falling linearly from ScheduleOptions::pyramid_ratio to 1
  mass      ///< methods::mass_weights() of each layer's methods::mass_need() (need_mass, mass_spread)
};

/// @param s  a schedule.
/// @return its name: "uniform", "pyramid" or "mass". O(1), no allocation.
inline const char* to_string(LayerSchedule s) {
  return s == LayerSchedule::uniform ? "uniform" : s == LayerSchedule::pyramid ? "pyramid" : "mass";
}

/// What evaluate_schedules() splits and how.
struct ScheduleOptions {
  /// The schedules compared, each at every EvalOptions::compressions total target.
  std::vector<LayerSchedule> schedules{LayerSchedule::uniform, LayerSchedule::pyramid,
                                       LayerSchedule::mass};
  double pyramid_ratio = 3.0;  ///< the first layer's weight over the last's, >= 1
  double need_mass = 0.95;     ///< the mass whose key share weighs a layer (mass schedule)
  double mass_spread = 3.0;    ///< the mass schedule's largest weight over its smallest, >= 1
};

/// One (phase, method, schedule, total target CR) over a model's layers.
struct ScheduleRecord {
  std::string phase;     ///< "prefill" or "decode"
  std::string method;    ///< the method's registry name
  std::string schedule;  ///< to_string() of the schedule
  double target_cr = 1.0;    ///< the total target CR
  double achieved_cr = 1.0;  ///< total achieved CR: sum_l D_l / sum_l (D_l / achieved_l)
  double err_mean = 0.0;     ///< mean over layers of the layer's relative L2 output error
  double err_max = 0.0;      ///< largest over layers of the layer's relative L2 output error
  std::vector<double> layer_target;    ///< per layer: the target CR the schedule gave it
  std::vector<double> layer_achieved;  ///< per layer: its achieved CR
  std::vector<double> layer_err;       ///< per layer: its relative L2 output error
  std::vector<double> layer_weight;    ///< per layer: the schedule's weight w_l
};

/// @brief Per-layer budgets over a model's layers: for every schedule, total target CR
/// (opt.compressions) and selected method (opt.prefill_methods / opt.decode_methods, fixed
/// compression budgets), the per-layer target CRs of methods::layer_compressions() (D_l = the
/// layer's dense pairs: causal (query, key) pairs in prefill, sum_t Hq (p_t + 1) over the decode
/// steps), each layer evaluated at its own target (evaluate_prefill() / evaluate_decode()), and
/// the totals.
/// @param layers the layers' problems, in model order (at least one).
/// @param opt the sweep (compressions = the total targets; phases, methods, last_rows, threads;
/// adaptive is ignored).
/// @param so the schedules and their parameters.
/// @return one record per (phase, method, schedule, total CR), in that nesting.
/// @throws sparse_attn::invalid_argument as evaluate_prefill() / evaluate_decode(), or when
/// layers is empty, a total target is < 1, pyramid_ratio or mass_spread < 1, or need_mass is
/// not in (0, 1].
/// @throws std::bad_alloc when a buffer cannot be allocated.
/// Cost: one evaluation per layer and phase at every target CR the schedules give it (one dense
/// baseline each), plus methods::mass_need() once per layer for the mass schedule.
inline std::vector<ScheduleRecord> evaluate_schedules(const std::vector<Problem>& layers,
                                                      const EvalOptions& opt,
                                                      const ScheduleOptions& so = {}) {
  constexpr const char* where = "eval::evaluate_schedules";
  require(!layers.empty(), where, ": needs at least one layer");
  const index_t L = static_cast<index_t>(layers.size());
  std::vector<double> need(layers.size(), 1.0);
  for (LayerSchedule s : so.schedules)
    if (s == LayerSchedule::mass)
      for (std::size_t l = 0; l < layers.size(); ++l)
        need[l] = methods::mass_need(layers[l].q, layers[l].k, so.need_mass, layers[l].scale);
  std::vector<ScheduleRecord> out;
  for (const char* phase : {"prefill", "decode"}) {
    const bool pre = std::string(phase) == "prefill";
    if ((pre && !opt.prefill) || (!pre && !opt.decode)) continue;
    std::vector<double> dense_units;
    for (const Problem& p : layers) {
      const double nq = static_cast<double>(p.q.tokens), nk = static_cast<double>(p.k.tokens),
                   R = static_cast<double>(opt.last_rows), hq = static_cast<double>(p.q.heads);
      // Prefill: sum over rows i of (n_k - n_q + i + 1); decode: sum over steps of (p_t + 1).
      dense_units.push_back(pre ? hq * (nq * (nk - nq) + nq * (nq + 1) / 2)
                                : hq * (R * (nk - R) + R * (R + 1) / 2));
    }
    // Each schedule's layer targets (the same for every method), then one evaluation per layer
    // at every target it was given: one dense baseline per layer and phase.
    std::vector<std::vector<double>> weights, targets;  // [schedule], [schedule x CR][layer]
    for (LayerSchedule s : so.schedules) {
      weights.push_back(s == LayerSchedule::uniform   ? std::vector<double>(layers.size(), 1.0)
                        : s == LayerSchedule::pyramid ? methods::pyramid_weights(L, so.pyramid_ratio)
                                                      : methods::mass_weights(need, so.mass_spread));
      for (double cr : opt.compressions)
        targets.push_back(methods::layer_compressions(cr, dense_units, weights.back()));
    }
    std::vector<std::vector<Record>> per_layer(layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l) {
      EvalOptions o = opt;
      o.compressions.clear();
      for (const auto& t : targets)
        if (std::find(o.compressions.begin(), o.compressions.end(), t[l]) == o.compressions.end())
          o.compressions.push_back(t[l]);
      o.adaptive = {};
      o.progress = nullptr;
      per_layer[l] = pre ? evaluate_prefill(layers[l], o) : evaluate_decode(layers[l], o);
    }
    const std::vector<methods::MethodInfo> infos =
        pre ? methods::prefill_methods() : methods::decode_methods();
    for (const methods::MethodInfo& m : infos) {
      const auto& wanted = pre ? opt.prefill_methods : opt.decode_methods;
      if (m.name == "dense" || m.needs_user_mask || !detail_eval::wanted(wanted, m.name.c_str()))
        continue;
      for (std::size_t si = 0; si < so.schedules.size(); ++si)
        for (std::size_t ci = 0; ci < opt.compressions.size(); ++ci) {
          ScheduleRecord r;
          r.phase = phase;
          r.method = m.name;
          r.schedule = to_string(so.schedules[si]);
          r.target_cr = opt.compressions[ci];
          r.layer_weight = weights[si];
          r.layer_target = targets[si * opt.compressions.size() + ci];
          double kept = 0.0, dense = 0.0;
          for (std::size_t l = 0; l < layers.size(); ++l) {
            const auto it = std::find_if(per_layer[l].begin(), per_layer[l].end(), [&](const Record& x) {
              return x.method == m.name && x.target_cr == r.layer_target[l];
            });
            require(it != per_layer[l].end(), where, ": no record of ", m.name, " at CR ",
                    r.layer_target[l], " on layer ", l);  // not reached: evaluated above
            r.layer_achieved.push_back(it->achieved_cr);
            r.layer_err.push_back(it->err_layer);
            kept += dense_units[l] / it->achieved_cr;
            dense += dense_units[l];
            r.err_mean += it->err_layer / static_cast<double>(layers.size());
            r.err_max = std::max(r.err_max, it->err_layer);
          }
          r.achieved_cr = kept > 0.0 ? dense / kept : 1.0;
          if (opt.progress)
            opt.progress(std::string(phase) + " " + m.name + " " + r.schedule + " CR " +
                         detail_eval::cr_label(r.target_cr) + " -> " +
                         detail_eval::cr_label(r.achieved_cr) + ", mean err " +
                         detail_eval::cr_label(r.err_mean));
          out.push_back(std::move(r));
        }
    }
  }
  return out;
}

/// Per (dataset prefix, phase, method) log-linear fit over records (error = err_layer) whose
/// dataset name starts with `dataset_prefix`, across every length present (fit_log_linear()).
/// O(records).
/// @param recs records of any number of problems.
/// @param dataset_prefix records whose dataset starts with this are used ("" : all).
/// @param phase "prefill" or "decode".
/// @param method the series: a method's registry name, or Record::label() ("quest+mass") for its
/// adaptive records.
/// @return the fit; not ok() when too few usable records match.
/// @throws std::bad_alloc when the points cannot be allocated.
inline LogLinearFit fit_records(const std::vector<Record>& recs, const std::string& dataset_prefix,
                                const std::string& phase, const std::string& method) {
  std::vector<FitPoint> pts;
  for (const Record& r : recs)
    if (r.phase == phase && r.label() == method && r.dataset.compare(0, dataset_prefix.size(), dataset_prefix) == 0)
      pts.push_back({r.err_layer, r.achieved_cr, static_cast<double>(r.tokens)});
  return fit_log_linear(pts);
}

}  // namespace eval
SPARSE_ATTN_NAMESPACE_END
