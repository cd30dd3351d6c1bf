// Decode benchmarks: decode/<method>/n:<N>/cr:<CR>/<dtype>, one new token, Hq = 32, Hkv = 8
// (GQA group 4), d = 128, output fp32. dtype: fp32 (q and the K/V cache fp32), bf16 (q, K and V
// bf16: bf16 products by default, Precision::automatic), bf16kv (q fp32, K/V bf16: exact fp32
// products of the widened values). One benchmark per method of the
// registry (methods::decode_methods(), dense first), size, CR (bench_common.hpp's sweep table) and
// dtype, all through one step harness driven by the method's DecodePolicy
// (methods::make_decode_policy at Budget::compression(CR), as the pipeline runs it): a method added
// to the registry appears here without a change. One case is not a registry method:
// sliding_window (sinks + window read in place through per-KV-head ranges: the sparse decode path
// with no selection cost).
//
// Prepare (once per benchmark, untimed): a cache holding the n prompt tokens, then
// after_prefill(the last 32 prompt queries) (timed as evict_ms: SnapKV's, Ada-SnapKV's,
// StreamingLLM's and H2O's one-off eviction). An iteration is one steady-state decode step:
// append the new token's K/V; keys = before_step (Quest's page selection, StreamingLLM's
// eviction); the decode kernel over those keys (emitting each key's attention mass when the policy
// wants_key_mass(): H2O); after_step (H2O's score update and eviction). select_ms = before_step +
// after_step. A method whose cache grows with every step (no eviction per step: dense, Quest,
// SnapKV, Ada-SnapKV) gets the appended token dropped again after the step (cache.undo_append,
// outside the timed region), so every iteration measures the same cache length.
//
// Counters: GBps (bytes the step reads per second: K/V rows the kernel reads, plus the per-page key
// min/max of a policy that needs_key_bounds(): Quest), GFLOPs (4 * keys * d per query head),
// achieved_cr (sequence length * Hq / keys read over all query heads), select_ms, evict_ms,
// speedup_vs_dense.
#include <algorithm>
#include <cmath>
#include <memory>
#include <sparse_attn/kv/cache.hpp>
#include <sparse_attn/kv/decode.hpp>
#include <sparse_attn/methods/budget.hpp>
#include <sparse_attn/methods/decode_policy.hpp>
#include <sparse_attn/methods/registry.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "bench_common.hpp"

namespace sa_bench {
namespace {

using sa::bf16;

constexpr index_t kHq = 32, kHkv = 8, kDim = 128;
constexpr index_t kSinks = 4;
constexpr index_t kWindowQueries = 32;  // prompt queries kept for SnapKV's observation window

// ---------------------------------------------------------------------------------------------
// Inputs: one cache per n (fp32 and, on first use, bf16), the new token's queries
// ---------------------------------------------------------------------------------------------

struct DecodeData : KVStore {
  index_t n = 0;
  std::vector<float> qw;  // [Hq, 32, d]: the last 32 prompt queries; the new token is the last
  std::vector<bf16> qw16;  // qw rounded to bf16 (the bf16 dtype), filled with the bf16 K/V
  std::vector<float> out;
  /// The queries of the last w tokens (positions n - w .. n - 1), as QT (float or bf16).
  template <class QT = float>
  sa::TensorView<const QT> window(index_t w) const {
    const QT* base;
    if constexpr (std::is_same_v<QT, float>) base = qw.data();
    else base = qw16.data();
    return sa::TensorView<const QT>(base, kHq, kWindowQueries, kDim).slice_tokens(kWindowQueries - w, w);
  }
  /// The new token's queries [Hq, 1, d] (position n - 1).
  template <class QT = float>
  sa::TensorView<const QT> q() const { return window<QT>(1); }
};

DecodeData& decode_data(index_t n, bool bf16_kv) {
  static std::unique_ptr<DecodeData> cur;
  if (!cur || cur->n != n) {
    cur.reset();
    progress("decode: generating a cache of n=%lld", static_cast<long long>(n));
    cur = std::make_unique<DecodeData>();
    cur->n = n;
    const auto sz = static_cast<std::size_t>(kHkv * n * kDim);
    cur->k.resize(sz);
    cur->v.resize(sz);
    cur->qw.resize(static_cast<std::size_t>(kHq * kWindowQueries * kDim));
    cur->out.assign(static_cast<std::size_t>(kHq * kDim), 0.0f);
    fill_rope(cur->k.data(), kHkv, n, kDim, 0, 1, 1, 202, 0.7f);
    fill_uniform(cur->v.data(), sz, 303);
    // The prompt's last 32 queries (the new token is the last); query head h shares the base of
    // KV head h / G.
    fill_rope(cur->qw.data(), kHq, kWindowQueries, kDim, n - kWindowQueries,
              static_cast<int>(kHq / kHkv), 1, 101, 0.7f);
  }
  if (bf16_kv) {
    cur->ensure_bf16();
    if (cur->qw16.empty())
      for (float x : cur->qw) cur->qw16.push_back(bf16(x));
  }
  return *cur;
}


template <class KT, class QT>
struct Views {
  sa::TensorView<const QT> q;
  sa::TensorView<const KT> k, v;
  sa::TensorView<float> out;
};

template <class KT, class QT>
Views<KT, QT> views(DecodeData& D) {
  const index_t n = D.n;
  return {D.q<QT>(), sa::TensorView<const KT>(D.data<KT>(true), kHkv, n, kDim),
          sa::TensorView<const KT>(D.data<KT>(false), kHkv, n, kDim),
          sa::TensorView<float>(D.out.data(), kHq, 1, kDim)};
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

struct Case {
  std::string method;
  index_t n = 0;
  std::string dtype;
};

/// What one step read: keys summed over query heads (FLOPs, CR) and bytes (bandwidth).
struct StepWork {
  double q_head_keys = 0.0;  // sum over query heads of keys attended
  double bytes = 0.0;        // K/V rows read (once per KV head for shared lists) + metadata
};

/// Work of a decode step over `sel` (as the kernel executes it) on a cache of n_k tokens.
template <class KT>
StepWork selection_work(const sa::KeySelection& sel, index_t n_k) {
  StepWork w;
  const double row_bytes = 2.0 * kDim * sizeof(KT);  // one K row and one V row
  const index_t G = kHq / kHkv;
  switch (sel.scope()) {
    case sa::KeySelection::Scope::all:
      w.q_head_keys = static_cast<double>(kHq * n_k);
      w.bytes = static_cast<double>(kHkv * n_k) * row_bytes;
      break;
    case sa::KeySelection::Scope::per_kv_head:
      for (index_t u = 0; u < kHkv; ++u) {
        const double keys = static_cast<double>(sel.keys(u, n_k));
        w.q_head_keys += keys * static_cast<double>(G);
        w.bytes += keys * row_bytes;
      }
      break;
    case sa::KeySelection::Scope::per_q_head:
      for (index_t u = 0; u < kHq; ++u) {
        const double keys = static_cast<double>(sel.keys(u, n_k));
        w.q_head_keys += keys;
        w.bytes += keys * row_bytes;
      }
      break;
  }
  return w;
}

void set_counters(benchmark::State& st, const Case& c, const IterationTimer& t, const StepWork& w,
                  bool has_select, double n_total) {
  const double iters = static_cast<double>(t.iters);
  if (iters == 0) return;
  st.counters["GBps"] = w.bytes * iters / t.total / 1e9;
  st.counters["GFLOPs"] = 4.0 * w.q_head_keys * kDim * iters / t.total / 1e9;
  st.counters["achieved_cr"] = n_total * kHq / w.q_head_keys;
  if (has_select) st.counters["select_ms"] = t.select / iters * 1e3;
  const std::string key = dense_key("decode", c.n, c.dtype);
  Results& r = results();
  if (c.method == kBaselineMethod) {
    r.dense_seconds[key] = t.per_iter();
    r.decode_dense[key] = {c.n,          c.dtype,
                           t.per_iter(), 4.0 * w.q_head_keys * kDim * iters / t.total / 1e9,
                           w.bytes,      4.0 * w.q_head_keys * kDim};
  }
  if (auto it = r.dense_seconds.find(key); it != r.dense_seconds.end())
    st.counters["speedup_vs_dense"] = it->second / t.per_iter();
}

sa::DecodeOptions decode_options() {
  sa::DecodeOptions o;
  o.num_threads = config().threads;
  return o;
}

/// A step over a fixed key selection (no per-step selection).
template <class KT, class QT>
void run_fixed(benchmark::State& st, const Case& c, const sa::KeySelection& sel,
               const std::string& label, const sa::DecodeOptions& opt = decode_options()) {
  DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
  const Views<KT, QT> x = views<KT, QT>(D);
  IterationTimer t;
  for (auto _ : st) {
    Stopwatch sw;
    sa::decode(x.q, x.k, x.v, x.out, sel, opt);
    t.add(0.0, sw.seconds());
  }
  benchmark::DoNotOptimize(D.out.data());
  set_counters(st, c, t, selection_work<KT>(sel, c.n), false, static_cast<double>(c.n));
  if (!label.empty()) st.SetLabel(label);
}

/// Registers the three dtypes of one benchmark: fn(st, c, KT{}, QT{}) with K/V type KT and query
/// type QT: fp32 (float, float), bf16 (bf16, bf16), bf16kv (bf16, float).
template <class Fn>
void add_dtypes(const std::string& method, index_t n, const std::string& tag, Fn fn) {
  for (const std::string dtype : {"fp32", "bf16", "bf16kv"}) {
    const Case c{method, n, dtype};
    add("decode/" + method + "/n:" + std::to_string(n) + "/" + tag + "/" + dtype,
        [c, fn](benchmark::State& st) {
          if (c.dtype == "fp32")
            fn(st, c, float{}, float{});
          else if (c.dtype == "bf16")
            fn(st, c, bf16{}, bf16{});
          else
            fn(st, c, bf16{}, float{});
        });
  }
}

/// Tokens the sliding window keeps per KV head for a target CR (budget.hpp's one conversion; at
/// least the sinks and one recent token).
index_t budget_for_cr(index_t n, double cr) {
  return std::max<index_t>(sa::methods::count_for_compression(n, cr), std::min(n, kSinks + 1));
}

// ---------------------------------------------------------------------------------------------
// sliding_window: the first 4 tokens and the last W, read in place through a per-KV-head range
// list (the kernel's sparse path with no selection cost; streaming evicts instead)
// ---------------------------------------------------------------------------------------------

void add_sliding_window(index_t n, double cr) {
  add_dtypes("sliding_window", n, "cr:" + fmt_num(cr),
             [cr](benchmark::State& st, const Case& c, auto kt, auto qt) {
               const index_t keep = budget_for_cr(c.n, cr);
               const index_t w = keep - kSinks;
               std::vector<sa::KeyRange> r;
               if (c.n - w <= kSinks)
                 r.push_back({0, c.n});
               else
                 r = {{0, kSinks}, {c.n - w, c.n}};
               const auto sel = sa::KeySelection::from_ranges(
                   sa::KeySelection::Scope::per_kv_head,
                   std::vector<std::vector<sa::KeyRange>>(kHkv, r));
               run_fixed<decltype(kt), decltype(qt)>(
                   st, c, sel, "W=" + std::to_string(w) + " S=" + std::to_string(kSinks));
             });
}

// ---------------------------------------------------------------------------------------------
// Every registry method over a kv::Cache, through its DecodePolicy. The prepared cache and policy
// (with its state) of the running benchmark are kept across Google Benchmark's repeated calls of
// one benchmark and freed when the next starts.
// ---------------------------------------------------------------------------------------------

template <class KT>
using Cache = sa::kv::ContiguousCache<KT>;
template <class KT, class QT>
using Policy = sa::methods::DecodePolicy<Cache<KT>, QT>;

/// Parameter settings the bench gives every decode method that has a parameter of that name
/// (checked against the method's parameters, methods::MethodInfo::params): the observation window
/// / prompt-score rows are the 32 prompt queries the bench keeps (H2O's exact prompt scores
/// would cost a dense prefill).
const sa::methods::ParamSettings& bench_settings() {
  static const sa::methods::ParamSettings s = {
      {"window", std::to_string(kWindowQueries)},
      {"prefill_queries", std::to_string(kWindowQueries)},
  };
  return s;
}

/// The bench's settings that `method` has a parameter for.
sa::methods::ParamSettings settings_for(const std::string& method) {
  sa::methods::ParamSettings out;
  for (const sa::methods::MethodInfo& m : sa::methods::decode_methods()) {
    if (m.name != method) continue;
    for (const auto& kv : bench_settings())
      for (const sa::methods::ParamInfo& p : m.params)
        if (p.name == kv.first) out.push_back(kv);
  }
  return out;
}

/// The inputs of one decode step: the new token's queries, K/V row and output.
template <class QT>
struct StepInputs {
  sa::TensorView<const QT> q;
  sa::TensorView<const float> kn, vn;
  sa::TensorView<float> out;
};

template <class QT>
StepInputs<QT> step_inputs(DecodeData& D) {
  // The new token's K/V: the prompt's last row (values do not matter for timing).
  const index_t n = D.n;
  const auto last_row = [&](const std::vector<float>& x) {
    return sa::TensorView<const float>(x.data() + (n - 1) * kDim, kHkv, 1, kDim, n * kDim, kDim);
  };
  return {D.q<QT>(), last_row(D.k), last_row(D.v), sa::TensorView<float>(D.out.data(), kHq, 1, kDim)};
}

template <class KT, class QT>
struct Prepared {
  std::string key;
  std::unique_ptr<Cache<KT>> cache;
  std::unique_ptr<Policy<KT, QT>> policy;
  double evict_ms = 0.0;     // after_prefill (when it evicted)
  bool undo_growth = false;  // the cache grows every step: drop the new token after each
  std::string settings;      // ", window=32" etc.: the bench's settings the method took
  std::vector<float> mass;   // the kernel's per-key mass (wants_key_mass)
};

template <class KT, class QT>
Prepared<KT, QT>& prepared_slot() {
  static Prepared<KT, QT> p;
  return p;
}

/// The prepared state for `key`, empty (cache == nullptr) when it must be built; frees any other.
template <class KT, class QT>
Prepared<KT, QT>& prepared(const std::string& key) {
  Prepared<KT, QT>& p = prepared_slot<KT, QT>();
  if (p.key != key) {
    prepared_slot<float, float>() = Prepared<float, float>{};
    prepared_slot<bf16, bf16>() = Prepared<bf16, bf16>{};
    prepared_slot<bf16, float>() = Prepared<bf16, float>{};
    p.key = key;
  }
  return p;
}

/// Room the cache reserves past the prompt: the two calibration steps of prepare().
constexpr index_t kStepRoom = 2;

/// A cache holding the n prompt tokens (rounded to KT), room for kStepRoom more.
template <class KT>
std::unique_ptr<Cache<KT>> make_cache(const DecodeData& D, bool key_bounds) {
  sa::kv::CacheOptions o;
  o.kv_heads = kHkv;
  o.head_dim = kDim;
  o.capacity = D.n + kStepRoom;
  o.page_size = 16;
  o.key_bounds = key_bounds;
  auto c = std::make_unique<Cache<KT>>(o);
  c->append(sa::TensorView<const float>(D.k.data(), kHkv, D.n, kDim),
            sa::TensorView<const float>(D.v.data(), kHkv, D.n, kDim));
  return c;
}

sa::AttentionOptions method_options() {
  sa::AttentionOptions o;
  o.num_threads = config().threads;
  return o;
}

/// The work of decode(q, cache, ...) over `keys` (the cache as the kernel read it), plus the
/// per-page key bounds when the policy reads them.
template <class KT>
StepWork cache_work(const sa::KeySelection& keys, const Cache<KT>& cache, bool key_bounds) {
  const sa::kv::DecodeStats s = sa::kv::decode_stats(keys, cache, kHq, 1);
  StepWork w;
  w.q_head_keys = static_cast<double>(s.pairs);
  w.bytes = static_cast<double>(s.kv_rows) * 2.0 * kDim * sizeof(KT);
  if (key_bounds) {
    double pages = 0.0;
    for (index_t h = 0; h < kHkv; ++h) pages += static_cast<double>(cache.num_pages(h));
    w.bytes += pages * 2.0 * kDim * sizeof(KT);  // per-page key min and max
  }
  return w;
}

/// What one step did, for the counters.
struct StepResult {
  double select_s = 0.0, total_s = 0.0;  // before_step + after_step; the whole step
  StepWork work;                         // as the kernel executed it
  index_t seq_len = 0;                   // the sequence the step belongs to
};

/// One steady-state decode step through the policy: append, before_step, kernel (+ key mass),
/// after_step. The counters' bookkeeping between the kernel and after_step is not timed.
template <class KT, class QT>
StepResult decode_step(Prepared<KT, QT>& p, const StepInputs<QT>& in) {
  Cache<KT>& cache = *p.cache;
  Policy<KT, QT>& policy = *p.policy;
  const sa::AttentionOptions mo = method_options();
  StepResult r;
  Stopwatch sw;
  cache.append(in.kn, in.vn);
  const double t_append = sw.seconds();
  const sa::KeySelection keys = policy.before_step(in.q, cache, mo);
  const double t_before = sw.seconds();
  sa::DecodeOptions opt;
  opt.num_threads = config().threads;
  float* mass = nullptr;
  if (policy.wants_key_mass()) {
    const index_t stride = cache.max_length();
    p.mass.resize(static_cast<std::size_t>(kHkv * stride));
    mass = p.mass.data();
    opt.key_mass = {mass, stride, 0};
  }
  sa::decode(in.q, cache, in.out, keys, opt);
  const double t_kernel = sw.seconds();
  r.work = cache_work<KT>(keys, cache, policy.needs_key_bounds());
  r.seq_len = cache.sequence_length();
  Stopwatch sw_after;
  policy.after_step(in.q, cache, mo, mass);
  const double t_after = sw_after.seconds();
  r.select_s = (t_before - t_append) + t_after;
  r.total_s = t_kernel + t_after;
  return r;
}

/// Builds the cache and the policy of c.method at CR `cr` (untimed), runs after_prefill on the
/// last 32 prompt queries (evict_ms), then two untimed calibration steps: a cache that grew by one
/// token at each (no per-step eviction) gets its appended token dropped after every step.
template <class KT, class QT>
Prepared<KT, QT>& prepare(const Case& c, double cr) {
  DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
  Prepared<KT, QT>& p =
      prepared<KT, QT>(c.method + "/" + std::to_string(c.n) + "/" + fmt_num(cr) + "/" + c.dtype);
  if (p.cache) return p;
  const sa::methods::ParamSettings settings = settings_for(c.method);
  for (const auto& kv : settings) p.settings += ", " + kv.first + "=" + kv.second;
  p.policy = sa::methods::make_decode_policy<Cache<KT>, QT>(
      c.method, settings, sa::methods::Budget::compression(cr));
  p.cache = make_cache<KT>(D, p.policy->needs_key_bounds());
  Stopwatch sw;
  p.policy->after_prefill(D.window<QT>(kWindowQueries), *p.cache, method_options());
  p.evict_ms = p.policy->last_eviction() ? sw.seconds() * 1e3 : 0.0;

  const StepInputs<QT> in = step_inputs<QT>(D);
  // Growth in live tokens: H2O evicts lazily (the dead slot stays until a batched compaction).
  const index_t held0 = p.policy->live_tokens(*p.cache);
  for (index_t i = 0; i < kStepRoom; ++i) decode_step(p, in);
  p.undo_growth = p.policy->live_tokens(*p.cache) == held0 + kStepRoom * kHkv;
  // Nothing was evicted after those appends (the cache grew by each): they can be taken back.
  if (p.undo_growth) p.cache->undo_append(kStepRoom);
  return p;
}

/// The label: the latest selection's or eviction's resolved budget, what an eviction kept, the
/// bench's parameter settings, and whether the target was reachable.
template <class KT, class QT>
std::string policy_label(const Prepared<KT, QT>& p) {
  const sa::methods::SelectionStats& s = p.policy->stats();
  std::string label = s.detail;
  if (const sa::kv::EvictionPlan* e = p.policy->last_eviction())
    label += (label.empty() ? "" : ", ") + std::string("kept ") +
             std::to_string(e->stats.pairs) + " of " + std::to_string(e->stats.dense_pairs);
  label += p.settings;
  if (!s.reachable) label += ", target unreachable";
  if (!label.empty() && label.compare(0, 2, ", ") == 0) label.erase(0, 2);
  return label;
}

void add_method(const std::string& method, index_t n, double cr) {
  add_dtypes(method, n, "cr:" + fmt_num(cr),
             [cr](benchmark::State& st, const Case& c, auto kt, auto qt) {
               using KT = decltype(kt);
               using QT = decltype(qt);
               DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
               Prepared<KT, QT>& p = prepare<KT, QT>(c, cr);
               const StepInputs<QT> in = step_inputs<QT>(D);
               IterationTimer t;
               StepResult last;
               for (auto _ : st) {
                 last = decode_step(p, in);
                 t.add(last.select_s, last.total_s);
                 if (p.undo_growth) {
                   st.PauseTiming();
                   p.cache->undo_append(1);
                   st.ResumeTiming();
                 }
               }
               benchmark::DoNotOptimize(D.out.data());
               if (t.iters == 0) return;
               set_counters(st, c, t, last.work, true, static_cast<double>(last.seq_len));
               if (p.evict_ms > 0.0) st.counters["evict_ms"] = p.evict_ms;
               const std::string label = policy_label(p);
               if (!label.empty()) st.SetLabel(label);
             });
}

}  // namespace

void register_decode() {
  // The registry's decode methods, the baseline first (its speedup_vs_dense divides the others).
  std::vector<sa::methods::MethodInfo> methods = sa::methods::decode_methods();
  std::stable_partition(methods.begin(), methods.end(),
                        [](const sa::methods::MethodInfo& m) { return m.name == kBaselineMethod; });
  for (index_t n : sweep_sizes(Phase::decode)) {
    for (const sa::methods::MethodInfo& m : methods) {
      for (double cr : sweep_crs(m.name)) add_method(m.name, n, cr);
      if (m.name == kBaselineMethod)
        for (double cr : sweep_crs(kWindowMethod)) add_sliding_window(n, cr);
    }
  }
}

}  // namespace sa_bench
