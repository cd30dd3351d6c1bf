// Prefill benchmarks: prefill/<method>/n:<N>/cr:<CR>/<dtype>, H = 8 query and KV heads, d = 128,
// Q fp32, K/V fp32 or bf16, output fp32, causal. One registration function per method; methods
// whose header is not there yet are compiled out (__has_include), so the bench always builds.
//
// Counters: GFLOPs (useful FLOP/s: 4 * mask.pairs() * d over the iteration time, selection
// included), achieved_cr (mask.compression()), select_ms (selection step per iteration; methods
// with one), speedup_vs_dense (the dense benchmark of the same n and dtype, run earlier).
#include <algorithm>
#include <cmath>
#include <memory>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <vector>

#include "bench_common.hpp"

#if __has_include(<sparse_attn/methods/block_sparse.hpp>)
#include <sparse_attn/methods/block_sparse.hpp>
#define SA_BENCH_BLOCK_SPARSE 1
#endif
#if __has_include(<sparse_attn/methods/vertical_slash.hpp>)
#include <sparse_attn/methods/vertical_slash.hpp>
#define SA_BENCH_VERTICAL_SLASH 1
#endif
#if __has_include(<sparse_attn/methods/flex_prefill.hpp>)
#include <sparse_attn/methods/flex_prefill.hpp>
#define SA_BENCH_FLEX_PREFILL 1
#endif
#if __has_include(<sparse_attn/methods/user_mask.hpp>)
#include <sparse_attn/methods/user_mask.hpp>
#define SA_BENCH_USER_MASK 1
#endif

namespace sa_bench {
namespace {

namespace sa = sparse_attn;
using sa::bf16;

constexpr index_t kHeads = 8, kDim = 128;
constexpr index_t kSinks = 4;

// ---------------------------------------------------------------------------------------------
// Inputs: one set per n (the previous n's set is freed), bf16 K/V converted on first use
// ---------------------------------------------------------------------------------------------

struct PrefillData {
  index_t n = 0;
  std::vector<float> q, k, v, out;
  std::vector<bf16> k16, v16;
};

PrefillData& prefill_data(index_t n, bool bf16_kv) {
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
const KT* kv_ptr(const PrefillData& d, bool key) {
  if constexpr (std::is_same_v<KT, float>)
    return key ? d.k.data() : d.v.data();
  else
    return key ? d.k16.data() : d.v16.data();
}

// ---------------------------------------------------------------------------------------------
// The common runner
// ---------------------------------------------------------------------------------------------

struct Case {
  std::string method;
  index_t n = 0;
  std::string dtype;
};

/// Runs select(q, k, label) -> mask (timed every iteration when data_dependent, else once) and the
/// prefill kernel over that mask; sets the counters.
template <class KT, class Select>
void run_prefill(benchmark::State& st, const Case& c, bool data_dependent, Select select) {
  PrefillData& D = prefill_data(c.n, std::is_same_v<KT, bf16>);
  const sa::TensorView<const float> q(D.q.data(), kHeads, c.n, kDim);
  const sa::TensorView<const KT> k(kv_ptr<KT>(D, true), kHeads, c.n, kDim);
  const sa::TensorView<const KT> v(kv_ptr<KT>(D, false), kHeads, c.n, kDim);
  const sa::TensorView<float> out(D.out.data(), kHeads, c.n, kDim);
  sa::PrefillOptions opt;
  opt.num_threads = config().threads;

  std::string label;
  auto mask = select(q, k, label);  // validates and gives the pair count before timing
  IterationTimer t;
  for (auto _ : st) {
    Stopwatch sw;
    double sel = 0.0;
    if (data_dependent) {
      mask = select(q, k, label);
      sel = sw.seconds();
    }
    sa::prefill(q, k, v, out, mask, opt);
    t.add(sel, sw.seconds());
  }
  benchmark::DoNotOptimize(D.out.data());

  const double iters = static_cast<double>(t.iters);
  const double flops = 4.0 * static_cast<double>(mask.pairs()) * static_cast<double>(kDim);
  st.counters["GFLOPs"] = flops * iters / t.total / 1e9;
  st.counters["achieved_cr"] = mask.compression();
  if (data_dependent) st.counters["select_ms"] = t.select / iters * 1e3;
  const std::string key = dense_key("prefill", c.n, c.dtype);
  Results& r = results();
  if (c.method == "dense") {
    r.dense_seconds[key] = t.per_iter();
    r.prefill_dense[key] = {c.n, c.dtype, t.per_iter(), flops * iters / t.total / 1e9, 0.0, flops};
  }
  if (auto it = r.dense_seconds.find(key); it != r.dense_seconds.end())
    st.counters["speedup_vs_dense"] = it->second / t.per_iter();
  if (!label.empty()) st.SetLabel(label);
}

/// Registers the fp32 and bf16 K/V variants of one (method, n, tag) benchmark. `tag` is
/// "cr:<CR>" or another knob ("gamma:0.9"); make_select() builds the selection callable.
template <class MakeSelect>
void add_both_dtypes(const std::string& method, index_t n, const std::string& tag,
                     bool data_dependent, MakeSelect make_select) {
  for (const std::string dtype : {"fp32", "bf16"}) {
    const std::string name =
        "prefill/" + method + "/n:" + std::to_string(n) + "/" + tag + "/" + dtype;
    const Case c{method, n, dtype};
    add(name, [c, data_dependent, make_select](benchmark::State& st) {
      if (c.dtype == "fp32")
        run_prefill<float>(st, c, data_dependent, make_select());
      else
        run_prefill<bf16>(st, c, data_dependent, make_select());
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Sweeps per preset
// ---------------------------------------------------------------------------------------------

std::vector<index_t> sizes() {
  switch (config().preset) {
    case Preset::quick:
      return {1024};
    case Preset::core:
      return {4096, 16384};
    case Preset::full:
      return {1024, 2048, 4096, 8192, 16384, 32768, 65536};
  }
  return {};
}
/// CR targets of sliding window (the closed-form baseline of every sparse method).
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
/// CR targets of the data-dependent methods.
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

// ---------------------------------------------------------------------------------------------
// dense (METHODS.md 1): the baseline every speedup_vs_dense divides
// ---------------------------------------------------------------------------------------------

void add_dense(index_t n) {
  add_both_dtypes("dense", n, "cr:1", false, [n] {
    return [n](const auto&, const auto&, std::string&) { return sa::methods::dense(kHeads, n, n); };
  });
}

// ---------------------------------------------------------------------------------------------
// sliding_window (METHODS.md 2): W solved so the pair count gives the target CR, 4 sinks
// ---------------------------------------------------------------------------------------------

/// The window whose sliding-window mask (4 sinks) has the pair count closest to dense / cr.
index_t window_for_cr(index_t n, double cr) {
  auto pairs = [n](index_t w) { return sa::masks::sliding_window(1, n, n, w, kSinks).pairs(); };
  const double target = static_cast<double>(sa::methods::dense(1, n, n).pairs()) / cr;
  index_t lo = 1, hi = n;  // pairs(w) is non-decreasing in w
  while (lo < hi) {
    const index_t mid = lo + (hi - lo) / 2;
    if (static_cast<double>(pairs(mid)) < target)
      lo = mid + 1;
    else
      hi = mid;
  }
  if (lo > 1 && std::abs(static_cast<double>(pairs(lo - 1)) - target) <
                    std::abs(static_cast<double>(pairs(lo)) - target))
    --lo;
  return lo;
}

void add_sliding_window(index_t n, double cr) {
  add_both_dtypes("sliding_window", n, "cr:" + fmt_num(cr), false, [n, cr] {
    return [n, cr](const auto&, const auto&, std::string& label) {
      sa::methods::SlidingWindowOptions o;
      o.window = window_for_cr(n, cr);
      o.sinks = kSinks;
      label = "W=" + std::to_string(o.window) + " S=" + std::to_string(o.sinks);
      return sa::methods::sliding_window(kHeads, n, n, o);
    };
  });
}

// ---------------------------------------------------------------------------------------------
// block_sparse (METHODS.md 3)
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_BLOCK_SPARSE)
void add_block_sparse(index_t n, double cr) {
  add_both_dtypes("block_sparse", n, "cr:" + fmt_num(cr), true, [cr] {
    return [cr](const auto& q, const auto& k, std::string& label) {
      sa::methods::BlockSparseOptions o;
      o.compression = cr;
      o.num_threads = config().threads;
      auto m = sa::methods::block_sparse::select(q, k, o);
      label =
          "k=" + std::to_string(m.top_k) + (m.reachable ? "" : ", target unreachable (clamped)");
      return m;
    };
  });
}
#endif

// ---------------------------------------------------------------------------------------------
// vertical_slash (METHODS.md 4): exact (element predicate) and tiled (whole blocks) execution
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_VERTICAL_SLASH)
template <bool Tiled>
void add_vertical_slash(index_t n, double cr) {
  add_both_dtypes(Tiled ? "vertical_slash_tiled" : "vertical_slash", n, "cr:" + fmt_num(cr), true,
                  [cr] {
                    return [cr](const auto& q, const auto& k, std::string& label) {
                      sa::methods::VerticalSlashOptions o;
                      o.compression = cr;
                      o.num_threads = config().threads;
                      auto m = [&] {
                        if constexpr (Tiled)
                          return sa::methods::vertical_slash::select_tiled(q, k, o);
                        else
                          return sa::methods::vertical_slash::select_exact(q, k, o);
                      }();
                      label = "V=S=" + std::to_string(m.vertical) +
                              (m.reachable ? "" : ", target unreachable (clamped)");
                      return m;
                    };
                  });
}
#endif

// ---------------------------------------------------------------------------------------------
// flex_prefill (METHODS.md 5): no CR knob; gamma is swept and the CR is measured
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_FLEX_PREFILL)
std::vector<double> flex_gammas() {
  switch (config().preset) {
    case Preset::quick:
      return {0.9};
    case Preset::core:
      return {0.9};
    case Preset::full:
      return {0.8, 0.9, 0.95};
  }
  return {};
}

void add_flex_prefill(index_t n, double gamma) {
  add_both_dtypes("flex_prefill", n, "gamma:" + fmt_num(gamma), true, [gamma] {
    return [gamma](const auto& q, const auto& k, std::string& label) {
      sa::methods::FlexPrefillOptions o;
      o.gamma = gamma;
      o.num_threads = config().threads;
      auto m = sa::methods::flex_prefill::select(q, k, o);
      index_t aware = 0;
      for (auto a : m.query_aware) aware += a ? 1 : 0;
      label = "query-aware heads " + std::to_string(aware) + "/" + std::to_string(kHeads);
      return m;
    };
  });
}
#endif

// ---------------------------------------------------------------------------------------------
// user_mask: an engine's own block layout (block CSR) turned into the common mask. The layout is
// random but deterministic: per query block the sink block, the diagonal and random earlier blocks,
// k per row (block-causal), k chosen for the target CR. select_ms = from_bsr's validation + copy.
// ---------------------------------------------------------------------------------------------

#if defined(SA_BENCH_USER_MASK)
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
  add_both_dtypes("user_mask", n, "cr:" + fmt_num(cr), true, [n, cr] {
    auto layout = std::make_shared<RandomLayout>(random_layout(n, cr));
    return [layout](const auto&, const auto&, std::string& label) {
      label = "random block CSR, k=" + std::to_string(layout->k);
      return sa::methods::user_mask::from_bsr(layout->shape, false, layout->offsets, layout->cols);
    };
  });
}
#endif

}  // namespace

void register_prefill() {
  for (index_t n : sizes()) {
    add_dense(n);  // first: the speedup_vs_dense baseline of this n
    for (double cr : window_crs()) add_sliding_window(n, cr);
    for (double cr : method_crs()) {
#if defined(SA_BENCH_BLOCK_SPARSE)
      add_block_sparse(n, cr);
#endif
#if defined(SA_BENCH_VERTICAL_SLASH)
      add_vertical_slash<false>(n, cr);
      add_vertical_slash<true>(n, cr);
#endif
#if defined(SA_BENCH_USER_MASK)
      add_user_mask(n, cr);
#endif
    }
#if defined(SA_BENCH_FLEX_PREFILL)
    for (double g : flex_gammas()) add_flex_prefill(n, g);
#endif
  }
}

}  // namespace sa_bench
