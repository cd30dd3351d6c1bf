// Prefill benchmarks: prefill/<method>/n:<N>/cr:<CR>/<dtype>, H = 8 query and KV heads, d = 128,
// causal. dtype: fp32 (Q, K, V, out fp32), bf16 (Q, K, V, out bf16: bf16 products, the default
// precision for all-bf16 inputs), bf16kv (Q and out fp32, K/V bf16: exact fp32 products).
// One benchmark per method of the registry
// (methods::prefill_methods(), dense first), size, CR (bench_common.hpp's sweep table) and dtype:
// each iteration calls the method's select(q, k, Budget::compression(CR), opt) and runs the
// prefill kernel over the mask. A method added to the registry appears here without a change.
// user_mask (a method that selects from the caller's mask) has its own case: a random layout.
//
// Counters: GFLOPs (useful FLOP/s: 4 * mask.pairs() * d over the iteration time, selection
// included), achieved_cr (mask.compression()), select_ms (the select() call per iteration),
// speedup_vs_dense (the dense benchmark of the same n and dtype, run earlier).
#include <algorithm>
#include <cmath>
#include <memory>
#include <sparse_attn/methods/registry.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.hpp"

namespace sa_bench {
namespace {

using sa::bf16;

constexpr index_t kHeads = 8, kDim = 128;

// ---------------------------------------------------------------------------------------------
// Inputs: one set per n (the previous n's set is freed), bf16 K/V converted on first use
// ---------------------------------------------------------------------------------------------

struct PrefillData : KVStore {
  index_t n = 0;
  std::vector<float> q, out;
  std::vector<bf16> q16, out16;  // the bf16 dtype's Q and output (made on first use)

  template <class T>
  const T* query() const {
    if constexpr (std::is_same_v<T, bf16>) return q16.data();
    else return q.data();
  }
  template <class T>
  T* output() {
    if constexpr (std::is_same_v<T, bf16>) return out16.data();
    else return out.data();
  }
};

PrefillData& prefill_data(index_t n, bool bf16_kv, bool bf16_q) {
  static std::unique_ptr<PrefillData> cur;
  if (!cur || cur->n != n) {
    cur.reset();
    progress("prefill: generating inputs for n=%lld", static_cast<long long>(n));
    cur = std::make_unique<PrefillData>();
    cur->n = n;
    const auto sz = static_cast<std::size_t>(kHeads * n * kDim);
    cur->q.resize(sz);
    cur->k.resize(sz);
    cur->v.resize(sz);
    cur->out.assign(sz, 0.0f);
    fill_rope(cur->q.data(), kHeads, n, kDim, 0, 1, 1, 101, 0.7f);
    fill_rope(cur->k.data(), kHeads, n, kDim, 0, 1, 1, 202, 0.7f);
    fill_uniform(cur->v.data(), sz, 303);
  }
  if (bf16_kv) cur->ensure_bf16();
  if (bf16_q && cur->q16.empty()) {
    cur->q16.resize(cur->q.size());
    std::transform(cur->q.begin(), cur->q.end(), cur->q16.begin(), [](float x) { return bf16(x); });
    cur->out16.assign(cur->q.size(), bf16(0.0f));
  }
  return *cur;
}


// ---------------------------------------------------------------------------------------------
// The common runner
// ---------------------------------------------------------------------------------------------

struct Case {
  std::string method;
  index_t n = 0;
  std::string dtype;
  double cr = 1.0;
};

sa::AttentionOptions method_options() {
  sa::AttentionOptions o;
  o.num_threads = config().threads;
  return o;
}

/// Runs select(q, k) -> PrefillSelection (timed every iteration: what a caller pays) and the
/// prefill kernel over its mask; sets the counters. `label_prefix` goes before the selection's
/// resolved budget in the label.
template <class QT, class KT, class Select>
void run_prefill(benchmark::State& st, const Case& c, Select select,
                 const std::string& label_prefix = "") {
  PrefillData& D = prefill_data(c.n, std::is_same_v<KT, bf16>, std::is_same_v<QT, bf16>);
  const sa::TensorView<const QT> q(D.query<QT>(), kHeads, c.n, kDim);
  const sa::TensorView<const KT> k(D.data<KT>(true), kHeads, c.n, kDim);
  const sa::TensorView<const KT> v(D.data<KT>(false), kHeads, c.n, kDim);
  const sa::TensorView<QT> out(D.output<QT>(), kHeads, c.n, kDim);
  sa::PrefillOptions opt;
  opt.num_threads = config().threads;

  auto sel = select(q, k);  // validates and gives the pair count before timing
  IterationTimer t;
  for (auto _ : st) {
    Stopwatch sw;
    sel = select(q, k);
    const double s = sw.seconds();
    sa::prefill(q, k, v, out, sel.mask, opt);
    t.add(s, sw.seconds());
  }
  benchmark::DoNotOptimize(D.output<QT>());

  const double iters = static_cast<double>(t.iters);
  const double flops = 4.0 * static_cast<double>(sel.mask.pairs()) * static_cast<double>(kDim);
  st.counters["GFLOPs"] = flops * iters / t.total / 1e9;
  st.counters["achieved_cr"] = sel.mask.compression();
  st.counters["select_ms"] = t.select / iters * 1e3;
  const std::string key = dense_key("prefill", c.n, c.dtype);
  Results& r = results();
  if (c.method == kBaselineMethod) {
    r.dense_seconds[key] = t.per_iter();
    r.prefill_dense[key] = {c.n, c.dtype, t.per_iter(), flops * iters / t.total / 1e9, 0.0, flops};
  }
  if (auto it = r.dense_seconds.find(key); it != r.dense_seconds.end())
    st.counters["speedup_vs_dense"] = it->second / t.per_iter();
  const std::string label = label_prefix + sel.stats.detail +
                            (sel.stats.reachable ? "" : ", target unreachable");
  if (!label.empty()) st.SetLabel(label);
}

/// The element types of a dtype suffix: Q (and the output) and K/V.
template <class Q, class K>
struct Types {
  using QT = Q;
  using KT = K;
};

/// Registers the fp32, bf16 and bf16kv variants of prefill/<method>/n:<n>/cr:<cr>; run(st, c, t)
/// runs one (t: a Types value naming the element types).
template <class Run>
void add_dtypes(const std::string& method, index_t n, double cr, Run run) {
  for (const std::string dtype : {"fp32", "bf16", "bf16kv"}) {
    const std::string name =
        "prefill/" + method + "/n:" + std::to_string(n) + "/cr:" + fmt_num(cr) + "/" + dtype;
    const Case c{method, n, dtype, cr};
    add(name, [c, run](benchmark::State& st) {
      if (c.dtype == "fp32")
        run(st, c, Types<float, float>{});
      else if (c.dtype == "bf16")
        run(st, c, Types<bf16, bf16>{});
      else
        run(st, c, Types<float, bf16>{});
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Every registry method, generically: its defaults, its own search for the CR
// ---------------------------------------------------------------------------------------------

void add_method(const std::string& method, index_t n, double cr) {
  add_dtypes(method, n, cr, [](benchmark::State& st, const Case& c, auto types) {
    using T = decltype(types);
    sa::methods::with_prefill_method(c.method, {}, [&](const auto& m) {
      const sa::AttentionOptions o = method_options();
      const sa::methods::Budget budget = sa::methods::Budget::compression(c.cr);
      run_prefill<typename T::QT, typename T::KT>(st, c,
                      [&](const auto& q, const auto& k) { return m.select(q, k, budget, o); });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// user_mask: an engine's own block layout (block CSR) handed to the library as a methods::UserMask.
// The layout is random but deterministic: per query block the sink block, the diagonal and random
// earlier blocks, k per row (block-causal), k chosen for the target CR. select_ms = the UserMask's
// validation of the layout + its select().
// ---------------------------------------------------------------------------------------------

struct RandomLayout {
  sa::MaskShape shape;
  std::vector<index_t> offsets;
  std::vector<std::int32_t> cols;
  index_t k = 0;
};

RandomLayout random_layout(index_t n, double cr) {
  RandomLayout L;
  L.shape = sa::MaskShape{kHeads, n, n, 64, 64, true};
  const index_t nb = L.shape.num_q_blocks(), b = 64;
  // Pairs per head with k blocks per row: whole off-diagonal blocks + causal diagonal blocks.
  auto pairs = [&](index_t k) {
    index_t p = 0;
    for (index_t qb = 0; qb < nb; ++qb) {
      const index_t rows = L.shape.q_end(qb) - L.shape.q_begin(qb);
      p += (std::min(qb + 1, k) - 1) * rows * b + rows * (rows + 1) / 2;
    }
    return p;
  };
  const double target = static_cast<double>(L.shape.dense_pairs() / kHeads) / cr;
  // k whose pair count is closest to dense / cr (1: the diagonal block alone).
  double best = -1.0;
  for (index_t k = 1; k <= std::max<index_t>(nb, 1); ++k) {
    const double err = std::abs(static_cast<double>(pairs(k)) - target);
    if (best < 0.0 || err < best) {
      best = err;
      L.k = k;
    }
  }
  L.offsets.assign(1, 0);
  std::uint64_t s = 0x243f6a8885a308d3ULL;
  std::vector<std::int32_t> row;
  for (index_t h = 0; h < kHeads; ++h)
    for (index_t qb = 0; qb < nb; ++qb) {
      row.clear();
      const index_t want = std::min(qb + 1, L.k);
      row.push_back(static_cast<std::int32_t>(qb));
      if (want >= 2 && qb > 0) row.push_back(0);
      // Fisher-Yates prefix over the candidates 1..qb-1.
      std::vector<std::int32_t> cand;
      for (index_t kb = 1; kb < qb; ++kb) cand.push_back(static_cast<std::int32_t>(kb));
      for (index_t i = 0;
           i < want - static_cast<index_t>(row.size()) && i < static_cast<index_t>(cand.size());
           ++i) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        const index_t j =
            i + static_cast<index_t>((s >> 33) % static_cast<std::uint64_t>(
                                                     cand.size() - static_cast<std::size_t>(i)));
        std::swap(cand[static_cast<std::size_t>(i)], cand[static_cast<std::size_t>(j)]);
      }
      const index_t extra = std::min<index_t>(want - static_cast<index_t>(row.size()),
                                              static_cast<index_t>(cand.size()));
      row.insert(row.end(), cand.begin(), cand.begin() + extra);
      std::sort(row.begin(), row.end());
      L.cols.insert(L.cols.end(), row.begin(), row.end());
      L.offsets.push_back(static_cast<index_t>(L.cols.size()));
    }
  return L;
}

void add_user_mask(index_t n, double cr) {
  add_dtypes(sa::methods::UserMask::name, n, cr,
                  [](benchmark::State& st, const Case& c, auto types) {
                    using T = decltype(types);
                    const RandomLayout layout = random_layout(c.n, c.cr);
                    const sa::AttentionOptions o = method_options();
                    const sa::methods::Budget budget = sa::methods::Budget::compression(c.cr);
                    run_prefill<typename T::QT, typename T::KT>(
                        st, c,
                        [&](const auto& q, const auto& k) {
                          const sa::methods::UserMask m(layout.shape, false, layout.offsets,
                                                        layout.cols);
                          return m.select(q, k, budget, o);
                        },
                        "random block CSR, k=" + std::to_string(layout.k) + ", ");
                  });
}

}  // namespace

void register_prefill() {
  // The registry's prefill methods, the baseline first (its speedup_vs_dense divides the others).
  std::vector<sa::methods::MethodInfo> methods = sa::methods::prefill_methods();
  std::stable_partition(methods.begin(), methods.end(),
                        [](const sa::methods::MethodInfo& m) { return m.name == kBaselineMethod; });
  for (index_t n : sweep_sizes(Phase::prefill)) {
    for (const sa::methods::MethodInfo& m : methods) {
      if (m.needs_user_mask) continue;  // below, with its own layout
      for (double cr : sweep_crs(m.name)) add_method(m.name, n, cr);
    }
    for (double cr : sweep_crs(sa::methods::UserMask::name)) add_user_mask(n, cr);
  }
}

}  // namespace sa_bench
