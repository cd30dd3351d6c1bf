// Decode benchmarks: decode/<method>/n:<N>/cr:<CR>/<dtype>, one new token, Hq = 32, Hkv = 8
// (GQA group 4), d = 128, K/V cache fp32 or bf16, output fp32. One registration function per
// method; methods whose header is not there yet are compiled out (__has_include).
//
// An iteration is one decode step: the per-step selection (Quest's page scoring) plus the kernel.
// Eviction methods shrink the cache once after prefill; that one-off cost is evict_ms, outside the
// iteration time, and the step is dense decode over the kept tokens.
//
// Counters: GBps (bytes the step reads per second: K/V rows the kernel reads, plus selection
// metadata such as Quest's page min/max), GFLOPs (4 * keys * d per query head), achieved_cr
// (n * Hq / keys read over all query heads), select_ms, speedup_vs_dense.
#include <algorithm>
#include <cmath>
#include <memory>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "bench_common.hpp"

#if __has_include(<sparse_attn/kv/cache.hpp>) && __has_include(<sparse_attn/kv/decode.hpp>)
#include <sparse_attn/kv/cache.hpp>
#include <sparse_attn/kv/decode.hpp>
#define SA_BENCH_KV_CACHE 1
#endif
#if __has_include(<sparse_attn/kv/eviction.hpp>)
#include <sparse_attn/kv/eviction.hpp>  // before quest.hpp, which uses kv::detail::rank_key
#endif
#if defined(SA_BENCH_KV_CACHE) && __has_include(<sparse_attn/methods/quest.hpp>)
#include <sparse_attn/methods/quest.hpp>
#define SA_BENCH_QUEST 1
#endif
#if defined(SA_BENCH_KV_CACHE) && __has_include(<sparse_attn/methods/snapkv.hpp>)
#include <sparse_attn/methods/snapkv.hpp>
#define SA_BENCH_SNAPKV 1
#endif
#if defined(SA_BENCH_KV_CACHE) && __has_include(<sparse_attn/methods/ada_snapkv.hpp>)
#include <sparse_attn/methods/ada_snapkv.hpp>
#define SA_BENCH_ADA_SNAPKV 1
#endif
#if defined(SA_BENCH_KV_CACHE) && __has_include(<sparse_attn/methods/streaming.hpp>)
#include <sparse_attn/methods/streaming.hpp>
#define SA_BENCH_STREAMING 1
#endif
#if defined(SA_BENCH_KV_CACHE) && __has_include(<sparse_attn/methods/h2o.hpp>)
#include <sparse_attn/methods/h2o.hpp>
#define SA_BENCH_H2O 1
#endif

namespace sa_bench {
namespace {

namespace sa = sparse_attn;
using sa::bf16;

constexpr index_t kHq = 32, kHkv = 8, kDim = 128;
constexpr index_t kSinks = 4;
constexpr index_t kWindowQueries = 32;  // prompt queries kept for SnapKV's observation window

// ---------------------------------------------------------------------------------------------
// Inputs: one cache per n (fp32 and, on first use, bf16), the new token's queries
// ---------------------------------------------------------------------------------------------

struct DecodeData {
  index_t n = 0;
  std::vector<float> qw;  // [Hq, 32, d]: the last 32 prompt queries; the new token is the last
  std::vector<float> k, v, out;
  std::vector<bf16> k16, v16;
  /// The queries of the last w tokens (positions n - w .. n - 1).
  sa::TensorView<const float> window(index_t w) const {
    return sa::TensorView<const float>(qw.data(), kHq, kWindowQueries, kDim)
        .slice_tokens(kWindowQueries - w, w);
  }
  /// The new token's queries [Hq, 1, d] (position n - 1).
  sa::TensorView<const float> q() const { return window(1); }
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
  if (bf16_kv && cur->k16.empty()) {
    cur->k16.resize(cur->k.size());
    cur->v16.resize(cur->v.size());
    const auto sz = static_cast<std::int64_t>(cur->k.size());
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < sz; ++i) {
      cur->k16[static_cast<std::size_t>(i)] = bf16(cur->k[static_cast<std::size_t>(i)]);
      cur->v16[static_cast<std::size_t>(i)] = bf16(cur->v[static_cast<std::size_t>(i)]);
    }
  }
  return *cur;
}

template <class KT>
const KT* kv_ptr(const DecodeData& d, bool key) {
  if constexpr (std::is_same_v<KT, float>)
    return key ? d.k.data() : d.v.data();
  else
    return key ? d.k16.data() : d.v16.data();
}

template <class KT>
struct Views {
  sa::TensorView<const float> q;
  sa::TensorView<const KT> k, v;
  sa::TensorView<float> out;
};

template <class KT>
Views<KT> views(DecodeData& D) {
  const index_t n = D.n;
  return {D.q(), sa::TensorView<const KT>(kv_ptr<KT>(D, true), kHkv, n, kDim),
          sa::TensorView<const KT>(kv_ptr<KT>(D, false), kHkv, n, kDim),
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
  if (c.method == "dense") {
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
template <class KT>
void run_fixed(benchmark::State& st, const Case& c, const sa::KeySelection& sel,
               const std::string& label, const sa::DecodeOptions& opt = decode_options()) {
  DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
  const Views<KT> x = views<KT>(D);
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

template <class Fn>
void add_both_dtypes(const std::string& method, index_t n, const std::string& tag, Fn fn) {
  for (const std::string dtype : {"fp32", "bf16"}) {
    const Case c{method, n, dtype};
    add("decode/" + method + "/n:" + std::to_string(n) + "/" + tag + "/" + dtype,
        [c, fn](benchmark::State& st) {
          if (c.dtype == "fp32")
            fn(st, c, float{});
          else
            fn(st, c, bf16{});
        });
  }
}

// ---------------------------------------------------------------------------------------------
// Sweeps per preset
// ---------------------------------------------------------------------------------------------

std::vector<index_t> sizes() {
  switch (config().preset) {
    case Preset::quick:
      return {4096};
    case Preset::core:
      return {131072};
    case Preset::full:
      return {4096, 8192, 16384, 32768, 65536, 131072};
  }
  return {};
}
std::vector<double> window_crs() {
  switch (config().preset) {
    case Preset::quick:
      return {5};
    case Preset::core:
      return {2, 5, 10, 20};
    case Preset::full:
      return {1, 2, 5, 10, 20};
  }
  return {};
}
std::vector<double> method_crs() {
  switch (config().preset) {
    case Preset::quick:
      return {5};
    case Preset::core:
      return {10};
    case Preset::full:
      return {1, 2, 5, 10, 20};
  }
  return {};
}

/// Tokens a method keeps per KV head for a target CR (at least the sinks, at most n).
index_t budget_for_cr(index_t n, double cr) {
  return std::clamp<index_t>(static_cast<index_t>(std::llround(static_cast<double>(n) / cr)),
                             kSinks + 1, n);
}

// ---------------------------------------------------------------------------------------------
// dense: every key, GQA-packed (each K/V byte read once per group)
// ---------------------------------------------------------------------------------------------

void add_dense(index_t n) {
  add_both_dtypes("dense", n, "cr:1", [](benchmark::State& st, const Case& c, auto tag) {
    run_fixed<decltype(tag)>(st, c, sa::KeySelection::all(), "");
  });
}

// ---------------------------------------------------------------------------------------------
// sliding_window: the first 4 tokens and the last W, read in place through a per-KV-head range
// list (the kernel's sparse path with no selection cost; streaming evicts instead)
// ---------------------------------------------------------------------------------------------

void add_sliding_window(index_t n, double cr) {
  add_both_dtypes("sliding_window", n, "cr:" + fmt_num(cr),
                  [cr](benchmark::State& st, const Case& c, auto tag) {
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
                    run_fixed<decltype(tag)>(
                        st, c, sel, "W=" + std::to_string(w) + " S=" + std::to_string(kSinks));
                  });
}

// ---------------------------------------------------------------------------------------------
// dense_bf16dot: dense over a bf16 cache with DecodeOptions::bf16_dot (vdpbf16ps for q.k and p.v),
// registered only when the option exists and the build has AVX512-BF16
// ---------------------------------------------------------------------------------------------

template <class O, class = void>
struct has_bf16_dot : std::false_type {};
template <class O>
struct has_bf16_dot<O, std::void_t<decltype(std::declval<O&>().bf16_dot)>> : std::true_type {};

template <class O>
bool enable_bf16_dot(O& o) {
  if constexpr (has_bf16_dot<O>::value) {
    o.bf16_dot = true;
    return true;
  } else {
    (void)o;
    return false;
  }
}

void add_dense_bf16dot(index_t n) {
#if defined(__AVX512BF16__)
  sa::DecodeOptions probe;
  if (!enable_bf16_dot(probe)) return;
  const Case c{"dense_bf16dot", n, "bf16"};
  add("decode/dense_bf16dot/n:" + std::to_string(n) + "/cr:1/bf16", [c](benchmark::State& st) {
    sa::DecodeOptions o = decode_options();
    enable_bf16_dot(o);
    run_fixed<bf16>(st, c, sa::KeySelection::all(), "DecodeOptions::bf16_dot", o);
  });
#else
  (void)n;
#endif
}

#if defined(SA_BENCH_KV_CACHE)
// ---------------------------------------------------------------------------------------------
// Methods over a kv::Cache. The prepared cache (and any method state) of the running benchmark is
// kept across Google Benchmark's repeated calls of one benchmark and freed when the next starts.
// ---------------------------------------------------------------------------------------------

template <class KT>
using Cache = sa::kv::ContiguousCache<KT>;

template <class KT>
struct Prepared {
  std::string key;
  std::unique_ptr<Cache<KT>> cache;
  double evict_ms = 0.0;  // one-off eviction after prefill (SnapKV, Ada-SnapKV, StreamingLLM, H2O)
  std::string label;
#if defined(SA_BENCH_QUEST)
  sa::methods::QuestPlan quest;
#endif
#if defined(SA_BENCH_H2O)
  std::unique_ptr<sa::methods::h2o::State> h2o;
#endif
#if defined(SA_BENCH_STREAMING)
  index_t window = 0;
#endif
};

template <class KT>
Prepared<KT>& prepared_slot() {
  static Prepared<KT> p;
  return p;
}

/// The prepared state for `key`, empty (cache == nullptr) when it must be built; frees any other.
template <class KT>
Prepared<KT>& prepared(const std::string& key) {
  Prepared<KT>& p = prepared_slot<KT>();
  if (p.key != key) {
    prepared_slot<float>() = Prepared<float>{};
    prepared_slot<bf16>() = Prepared<bf16>{};
    p.key = key;
  }
  return p;
}

/// A cache holding the n prompt tokens (rounded to KT), room for `extra` more.
template <class KT>
std::unique_ptr<Cache<KT>> make_cache(const DecodeData& D, index_t extra, bool key_bounds) {
  sa::kv::CacheOptions o;
  o.kv_heads = kHkv;
  o.head_dim = kDim;
  o.capacity = D.n + extra;
  o.page_size = 16;
  o.key_bounds = key_bounds;
  auto c = std::make_unique<Cache<KT>>(o);
  c->append(sa::TensorView<const float>(D.k.data(), kHkv, D.n, kDim),
            sa::TensorView<const float>(D.v.data(), kHkv, D.n, kDim));
  return c;
}

/// The work of kv::decode() over `keys` on the cache, plus `extra_bytes` of selection reads.
template <class KT>
StepWork cache_work(const sa::KeySelection& keys, const Cache<KT>& cache, double extra_bytes) {
  const sa::kv::DecodeStats s = sa::kv::decode_stats(keys, cache, kHq, 1);
  StepWork w;
  w.q_head_keys = static_cast<double>(s.pairs);
  w.bytes = static_cast<double>(s.kv_rows) * 2.0 * kDim * sizeof(KT) + extra_bytes;
  return w;
}

/// Counters of a cache-based step; CR against the sequence the step belongs to.
template <class KT>
void cache_counters(benchmark::State& st, const Case& c, const IterationTimer& t, const StepWork& w,
                    bool per_step_select, const Prepared<KT>& p, index_t seq_len) {
  set_counters(st, c, t, w, per_step_select, static_cast<double>(seq_len));
  if (p.evict_ms > 0.0) st.counters["evict_ms"] = p.evict_ms;
  if (!p.label.empty()) st.SetLabel(p.label);
}
#endif

// ---------------------------------------------------------------------------------------------
// quest (METHODS.md 6): per step, page upper bounds from the cache's key min/max, top-B pages +
// the current page, sparse decode over them. select_ms = the bounds + top-B; the bounds' reads
// (2 x d values per page and KV head) count in GBps.
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_QUEST)
void add_quest(index_t n, double cr) {
  add_both_dtypes(
      "quest", n, "cr:" + fmt_num(cr), [cr](benchmark::State& st, const Case& c, auto tag) {
        using KT = decltype(tag);
        DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
        Prepared<KT>& p = prepared<KT>("quest/" + std::to_string(c.n) + "/" + c.dtype);
        if (!p.cache) p.cache = make_cache<KT>(D, 0, true);
        const Cache<KT>& cache = *p.cache;
        sa::methods::QuestOptions qo;
        qo.compression = cr;
        qo.num_threads = config().threads;
        const sa::DecodeOptions opt = decode_options();
        const sa::TensorView<const float> q = D.q();
        const sa::TensorView<float> out(D.out.data(), kHq, 1, kDim);
        sa::methods::quest::select(q, cache, qo, p.quest);
        IterationTimer t;
        for (auto _ : st) {
          Stopwatch sw;
          sa::methods::quest::select(q, cache, qo, p.quest);
          const double sel = sw.seconds();
          sa::kv::decode(q, cache, out, p.quest.keys, opt);
          t.add(sel, sw.seconds());
        }
        benchmark::DoNotOptimize(D.out.data());
        double pages = 0.0;
        for (index_t h = 0; h < kHkv; ++h) pages += static_cast<double>(cache.num_pages(h));
        const double meta_bytes = pages * 2.0 * kDim * sizeof(KT);  // per-page key min and max
        p.label =
            "B=" + std::to_string(p.quest.budget_pages.empty() ? 0 : p.quest.budget_pages[0]) +
            " pages of " + std::to_string(cache.page_size()) +
            (p.quest.reachable ? "" : ", target unreachable (clamped)");
        cache_counters<KT>(st, c, t, cache_work<KT>(p.quest.keys, cache, meta_bytes), true, p,
                           cache.sequence_length());
      });
}
#endif

// ---------------------------------------------------------------------------------------------
// snapkv / ada_snapkv (METHODS.md 7): evict once after prefill (evict_ms, from the last 32 prompt
// queries), then every step is dense decode over the kept tokens (Ada-SnapKV: per-head lengths).
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_SNAPKV) || defined(SA_BENCH_ADA_SNAPKV)
/// A step over an evicted cache: kv::decode over every head's kept tokens.
template <class KT, class Evict>
void run_evicted(benchmark::State& st, const Case& c, double cr, Evict evict) {
  DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
  Prepared<KT>& p =
      prepared<KT>(c.method + "/" + std::to_string(c.n) + "/" + fmt_num(cr) + "/" + c.dtype);
  if (!p.cache) {
    p.cache = make_cache<KT>(D, 0, false);
    Stopwatch sw;
    const sa::kv::EvictionPlan plan = evict(D.window(kWindowQueries), *p.cache);
    p.evict_ms = sw.seconds() * 1e3;
    p.label = "kept " + std::to_string(plan.total_kept()) + " of " + std::to_string(kHkv * c.n) +
              (plan.reachable ? "" : ", target unreachable (clamped)");
  }
  const Cache<KT>& cache = *p.cache;
  const sa::DecodeOptions opt = decode_options();
  const sa::TensorView<const float> q = D.q();
  const sa::TensorView<float> out(D.out.data(), kHq, 1, kDim);
  const sa::KeySelection all = sa::KeySelection::all();
  IterationTimer t;
  for (auto _ : st) {
    Stopwatch sw;
    sa::kv::decode(q, cache, out, all, opt);
    t.add(0.0, sw.seconds());
  }
  benchmark::DoNotOptimize(D.out.data());
  cache_counters<KT>(st, c, t, cache_work<KT>(all, cache, 0.0), false, p, cache.sequence_length());
}
#endif

#if defined(SA_BENCH_SNAPKV)
void add_snapkv(index_t n, double cr) {
  add_both_dtypes("snapkv", n, "cr:" + fmt_num(cr),
                  [cr](benchmark::State& st, const Case& c, auto tag) {
                    run_evicted<decltype(tag)>(st, c, cr, [cr](const auto& qw, auto& cache) {
                      sa::methods::SnapKVOptions o;
                      o.compression = cr;
                      o.window = kWindowQueries;
                      o.num_threads = config().threads;
                      return sa::methods::snapkv::evict(qw, cache, o);
                    });
                  });
}
#endif

#if defined(SA_BENCH_ADA_SNAPKV)
void add_ada_snapkv(index_t n, double cr) {
  add_both_dtypes("ada_snapkv", n, "cr:" + fmt_num(cr),
                  [cr](benchmark::State& st, const Case& c, auto tag) {
                    run_evicted<decltype(tag)>(st, c, cr, [cr](const auto& qw, auto& cache) {
                      sa::methods::AdaSnapKVOptions o;
                      o.compression = cr;
                      o.window = kWindowQueries;
                      o.num_threads = config().threads;
                      return sa::methods::ada_snapkv::evict(qw, cache, o);
                    });
                  });
}
#endif

// ---------------------------------------------------------------------------------------------
// streaming (METHODS.md 2, eviction form): evict to S + W after prefill, then the steady-state
// step: append the new token, evict the oldest window token (select_ms: select + compaction),
// dense decode over S + W.
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_STREAMING)
void add_streaming(index_t n, double cr) {
  add_both_dtypes(
      "streaming", n, "cr:" + fmt_num(cr), [cr](benchmark::State& st, const Case& c, auto tag) {
        using KT = decltype(tag);
        DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
        Prepared<KT>& p =
            prepared<KT>("streaming/" + std::to_string(c.n) + "/" + fmt_num(cr) + "/" + c.dtype);
        sa::methods::StreamingOptions so;
        so.sinks = kSinks;
        so.compression = cr;
        if (!p.cache) {
          p.cache = make_cache<KT>(D, 1, false);
          p.window = sa::methods::streaming::resolve_window(c.n, so);
          Stopwatch sw;
          sa::methods::streaming::evict(*p.cache, so.sinks, p.window);
          p.evict_ms = sw.seconds() * 1e3;
          p.label = "S=" + std::to_string(so.sinks) + " W=" + std::to_string(p.window);
        }
        Cache<KT>& cache = *p.cache;
        const sa::DecodeOptions opt = decode_options();
        const sa::TensorView<const float> q = D.q();
        const sa::TensorView<float> out(D.out.data(), kHq, 1, kDim);
        // The new token's K/V: the prompt's last row (values do not matter for timing).
        const sa::TensorView<const float> kn(D.k.data() + (c.n - 1) * kDim, kHkv, 1, kDim,
                                             c.n * kDim, kDim);
        const sa::TensorView<const float> vn(D.v.data() + (c.n - 1) * kDim, kHkv, 1, kDim,
                                             c.n * kDim, kDim);
        const sa::KeySelection all = sa::KeySelection::all();
        IterationTimer t;
        for (auto _ : st) {
          Stopwatch sw;
          cache.append(kn, vn);
          const double t_append = sw.seconds();
          sa::methods::streaming::evict(cache, so.sinks, p.window);
          const double t_evict = sw.seconds();
          sa::kv::decode(q, cache, out, all, opt);
          t.add(t_evict - t_append, sw.seconds());
        }
        benchmark::DoNotOptimize(D.out.data());
        cache_counters<KT>(st, c, t, cache_work<KT>(all, cache, 0.0), true, p,
                           cache.sequence_length());
      });
}
#endif

// ---------------------------------------------------------------------------------------------
// h2o (METHODS.md 8): scores seeded from the last 32 prompt queries (H2OOptions::prefill_queries:
// exact column sums over the whole prompt cost a dense prefill), evict to H + R (evict_ms); then
// the steady-state step: append, decode over H + R + 1 keys, observe the step's probabilities and
// evict one token (select_ms: observe + select + compaction; observe re-reads the keys, counted
// in GBps).
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_H2O)
void add_h2o(index_t n, double cr) {
  add_both_dtypes(
      "h2o", n, "cr:" + fmt_num(cr), [cr](benchmark::State& st, const Case& c, auto tag) {
        using KT = decltype(tag);
        DecodeData& D = decode_data(c.n, std::is_same_v<KT, bf16>);
        Prepared<KT>& p =
            prepared<KT>("h2o/" + std::to_string(c.n) + "/" + fmt_num(cr) + "/" + c.dtype);
        if (!p.cache) {
          p.cache = make_cache<KT>(D, 1, false);
          sa::methods::H2OOptions ho;
          ho.compression = cr;
          ho.prefill_queries = kWindowQueries;
          ho.num_threads = config().threads;
          p.h2o = std::make_unique<sa::methods::h2o::State>();
          Stopwatch sw;
          p.h2o->reset(*p.cache, ho);
          p.h2o->observe(D.window(kWindowQueries), *p.cache, true);
          p.h2o->apply(p.h2o->select(*p.cache), *p.cache);
          p.evict_ms = sw.seconds() * 1e3;
          p.label = "H=" + std::to_string(p.h2o->heavy()) +
                    " R=" + std::to_string(p.h2o->recent()) + ", prompt scores from the last " +
                    std::to_string(kWindowQueries) + " queries";
        }
        Cache<KT>& cache = *p.cache;
        sa::methods::h2o::State& state = *p.h2o;
        const sa::DecodeOptions opt = decode_options();
        const sa::TensorView<const float> q = D.q();
        const sa::TensorView<float> out(D.out.data(), kHq, 1, kDim);
        const sa::TensorView<const float> kn(D.k.data() + (c.n - 1) * kDim, kHkv, 1, kDim,
                                             c.n * kDim, kDim);
        const sa::TensorView<const float> vn(D.v.data() + (c.n - 1) * kDim, kHkv, 1, kDim,
                                             c.n * kDim, kDim);
        const sa::KeySelection all = sa::KeySelection::all();
        IterationTimer t;
        StepWork w;
        index_t seq = 0;
        for (auto _ : st) {
          Stopwatch sw;
          cache.append(kn, vn);
          sa::kv::decode(q, cache, out, all, opt);
          const double t_kernel = sw.seconds();
          w = cache_work<KT>(all, cache, 0.0);
          seq = cache.sequence_length();
          const double observe_bytes =
              static_cast<double>(cache.total_length()) * kDim * sizeof(KT);
          w.bytes += observe_bytes;
          const double t0 = sw.seconds();
          state.step(q, cache);
          const double t1 = sw.seconds();
          t.add(t1 - t0, t_kernel + (t1 - t0));  // the counters' bookkeeping excluded
        }
        benchmark::DoNotOptimize(D.out.data());
        if (t.iters > 0) cache_counters<KT>(st, c, t, w, true, p, seq);
      });
}
#endif

}  // namespace

void register_decode() {
  for (index_t n : sizes()) {
    add_dense(n);  // first: the speedup_vs_dense baseline of this n
    add_dense_bf16dot(n);
    for (double cr : window_crs()) add_sliding_window(n, cr);
    for (double cr : method_crs()) {
#if defined(SA_BENCH_QUEST)
      add_quest(n, cr);
#endif
#if defined(SA_BENCH_SNAPKV)
      add_snapkv(n, cr);
#endif
#if defined(SA_BENCH_ADA_SNAPKV)
      add_ada_snapkv(n, cr);
#endif
#if defined(SA_BENCH_STREAMING)
      add_streaming(n, cr);
#endif
#if defined(SA_BENCH_H2O)
      add_h2o(n, cr);
#endif
      (void)cr;
    }
  }
}

}  // namespace sa_bench
