// The methods the evaluator knows, as a table of small adapters: each maps (problem, target CR) to
// what the common kernels execute. Adding a method is one adapter function plus one table entry.
//
// Prefill adapters return a PrefillSelection: the selected mask behind a type-erased run()
// (the common prefill kernel on that mask) and keeps(h, i, j) (does the mask compute pair (i, j) of
// query head h). Decode adapters return a DecodePolicy: hooks the decode loop (evaluate.hpp) calls
// on a kv::Cache - after the prompt was appended (eviction at the end of prefill), before each
// step's kernel (selection or eviction; returns the KeySelection the kernel reads) and after it
// (H2O's score update and eviction).
//
// Target CR conventions (METHODS.md 0): the budget is the smallest one whose achieved CR does not
// exceed the target; CR 1 is dense for every method. Decode budgets are relative to the whole
// sequence n_k (prompt + decode steps), so CR 1 never evicts.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "sparse_attn/eval/problem.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/decode.hpp"
#include "sparse_attn/kernel/prefill.hpp"
#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/decode.hpp"
#include "sparse_attn/kv/eviction.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/mask/patterns.hpp"
#include "sparse_attn/methods/ada_snapkv.hpp"
#include "sparse_attn/methods/block_sparse.hpp"
#include "sparse_attn/methods/dense.hpp"
#include "sparse_attn/methods/flex_prefill.hpp"
#include "sparse_attn/methods/h2o.hpp"
#include "sparse_attn/methods/quest.hpp"
#include "sparse_attn/methods/sliding_window.hpp"
#include "sparse_attn/methods/snapkv.hpp"
#include "sparse_attn/methods/streaming.hpp"
#include "sparse_attn/methods/vertical_slash.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace eval {

/// Settings every adapter may read.
struct AdapterContext {
  int num_threads = 0;  // threads of the default executor (0: OpenMP default)
  // H2O prompt queries that seed its scores: -1 = every prompt query up to kH2OExactTokens
  // tokens, the last kH2OSeedQueries above (the exact column sums cost O(n^2 d) per target CR);
  // 0 = always every query; k > 0 = the last k.
  index_t h2o_prefill_queries = -1;
  Executor* executor = nullptr;  // the caller's executor, not owned; nullptr: the default for
                                 // num_threads
};
inline constexpr index_t kH2OExactTokens = 8192;
inline constexpr index_t kH2OSeedQueries = 2048;

// ---------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------

/// A selected prefill pattern, type-erased.
struct PrefillSelection {
  index_t pairs = 0, dense_pairs = 0;  // computed pairs and dense causal pairs, all heads
  bool reachable = true;               // false: the target CR was clamped to the sparsest budget
  std::string detail;                  // the budget used, e.g. "W=412" or "k=5 blocks"
  std::function<void(const TensorView<float>& out, const AttentionOptions& opt)> run;
  std::function<bool(index_t h, index_t qi, index_t kj)> keeps;
  double compression() const { return compression_ratio(dense_pairs, pairs); }
};

/// Does `mask` compute pair (qi, kj) for query head h: its key block is listed for the query's
/// block, and the block is full or the element test passes.
template <class Mask>
bool mask_keeps(const Mask& m, index_t h, index_t qi, index_t kj) {
  const MaskShape& s = m.shape();
  const index_t hh = m.head_shared() ? 0 : h, target = kj / s.block_k;
  bool listed = false, full = false;
  m.for_each_block(hh, qi / s.block_q, [&](index_t kb, bool f) {
    if (kb == target) {
      listed = true;
      full = f;
    }
  });
  return listed && (full || m.allowed(hh, qi, kj));
}

/// Wraps any mask of the common interface.
template <class Mask>
PrefillSelection wrap_mask(Mask mask, const Problem& p, bool reachable, std::string detail) {
  auto m = std::make_shared<const Mask>(std::move(mask));
  PrefillSelection s;
  s.pairs = m->pairs();
  s.dense_pairs = m->shape().dense_pairs();
  s.reachable = reachable;
  s.detail = std::move(detail);
  const TensorView<const float> q = p.q, k = p.k, v = p.v;
  s.run = [m, q, k, v](const TensorView<float>& out, const AttentionOptions& opt) {
    prefill(q, k, v, out, *m, opt);
  };
  s.keeps = [m](index_t h, index_t qi, index_t kj) { return mask_keeps(*m, h, qi, kj); };
  return s;
}

namespace detail_reg {
template <class... A>
std::string str(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}
}  // namespace detail_reg

using PrefillAdapter = PrefillSelection (*)(const Problem&, double target_cr, const AdapterContext&);

namespace adapters {

inline PrefillSelection dense_prefill(const Problem& p, double, const AdapterContext&) {
  return wrap_mask(methods::dense(p.q.heads, p.q.tokens, p.k.tokens), p, true, "");
}

// Sliding window + 4 sinks ("A-shape"): the smallest W whose pairs reach dense / target.
inline PrefillSelection sliding_window_prefill(const Problem& p, double cr, const AdapterContext&) {
  const index_t hq = p.q.heads, nq = p.q.tokens, nk = p.k.tokens, sinks = 4;
  auto mask_for = [&](index_t w) {
    return methods::sliding_window(hq, nq, nk, methods::SlidingWindowOptions{w, sinks, 64});
  };
  const double want = static_cast<double>(mask_for(nk).shape().dense_pairs()) / cr;
  index_t lo = 1, hi = nk;
  const bool reachable = static_cast<double>(mask_for(1).pairs()) <= want + 1e-9;
  while (lo < hi) {
    const index_t mid = lo + (hi - lo) / 2;
    if (static_cast<double>(mask_for(mid).pairs()) >= want) hi = mid;
    else lo = mid + 1;
  }
  return wrap_mask(mask_for(lo), p, reachable, detail_reg::str("S=4 W=", lo));
}

inline PrefillSelection block_sparse_prefill(const Problem& p, double cr, const AdapterContext& c) {
  methods::BlockSparseOptions o;
  o.compression = cr;
  o.num_threads = c.num_threads;
  o.executor = c.executor;
  auto m = methods::block_sparse::select(p.q, p.k, o);
  const bool ok = m.reachable;
  const std::string det = detail_reg::str("k=", m.top_k, " blocks");
  return wrap_mask(std::move(m), p, ok, det);
}

template <bool Tiled>
PrefillSelection vertical_slash_prefill(const Problem& p, double cr, const AdapterContext& c) {
  methods::VerticalSlashOptions o;
  o.compression = cr;
  o.scale = p.scale;
  o.num_threads = c.num_threads;
  o.executor = c.executor;
  if constexpr (Tiled) {
    auto t = methods::vertical_slash::select_tiled(p.q, p.k, o);
    const bool ok = t.reachable;
    const std::string det = detail_reg::str("V=", t.vertical, " S=", t.slash);
    return wrap_mask(std::move(t), p, ok, det);
  } else {
    auto e = methods::vertical_slash::select_exact(p.q, p.k, o);
    const bool ok = e.reachable;
    const std::string det = detail_reg::str("V=", e.vertical, " S=", e.slash);
    return wrap_mask(std::move(e), p, ok, det);
  }
}

// FlexPrefill sets no CR: gamma (mass to cover) is searched so that the measured CR is the largest
// not above the target (bisection on x = -log10(1 - gamma), 12 steps, gamma in [0.045, 0.9999];
// the CR is monotone in gamma up to the per-head query-aware decisions).
// min_budget = min(512, n / (3 CR)) tokens (the default 512 alone caps CR near n / 1536), and the
// original block size 128 and last 128 queries.
inline PrefillSelection flex_prefill_prefill(const Problem& p, double cr, const AdapterContext& c) {
  methods::FlexPrefillOptions o;
  o.scale = p.scale;
  o.num_threads = c.num_threads;
  o.executor = c.executor;
  if (cr <= 1.0) {
    o.gamma = 1.0;
    return wrap_mask(methods::flex_prefill::select(p.q, p.k, o), p, true, "gamma=1");
  }
  o.min_budget = std::clamp<index_t>(
      static_cast<index_t>(static_cast<double>(p.k.tokens) / (3.0 * cr)), 1, 512);
  auto at = [&](double x) {
    o.gamma = 1.0 - std::pow(10.0, -x);
    return methods::flex_prefill::select(p.q, p.k, o);
  };
  double lo = 0.02, hi = 4.0;  // CR(lo) high, CR(hi) near dense
  auto sparsest = at(lo);
  const bool reachable = sparsest.compression() >= cr;
  double best_x = lo;
  methods::FlexPrefillMask best;
  if (!reachable) {
    best = std::move(sparsest);
  } else {
    best = at(hi);
    best_x = hi;
    for (int it = 0; it < 12; ++it) {  // invariant: CR(lo) >= target > CR(hi) (or hi = start)
      const double mid = 0.5 * (lo + hi);
      auto m = at(mid);
      if (m.compression() > cr) {
        lo = mid;
      } else {
        hi = mid;
        best = std::move(m);
        best_x = mid;
      }
    }
  }
  const double gamma = 1.0 - std::pow(10.0, -best_x);
  index_t aware = 0;
  for (auto a : best.query_aware) aware += a;
  const std::string det = detail_reg::str("gamma=", gamma, " min_budget=", o.min_budget,
                                          " query-aware heads=", aware);
  return wrap_mask(std::move(best), p, reachable, det);
}

}  // namespace adapters

struct PrefillMethod {
  const char* name;
  PrefillAdapter select;
  const char* summary;
};

/// Every prefill method, dense first.
inline const std::vector<PrefillMethod>& prefill_methods() {
  static const std::vector<PrefillMethod> table = {
      {"dense", adapters::dense_prefill, "dense causal attention (the reference)"},
      {"sliding_window", adapters::sliding_window_prefill, "4 sinks + window W (A-shape)"},
      {"block_sparse", adapters::block_sparse_prefill, "MInference block top-k, b = 64"},
      {"vertical_slash", adapters::vertical_slash_prefill<false>, "MInference V/S, exact"},
      {"vertical_slash_tiled", adapters::vertical_slash_prefill<true>, "MInference V/S, whole blocks"},
      {"flex_prefill", adapters::flex_prefill_prefill, "FlexPrefill, gamma searched for the CR"},
  };
  return table;
}

// ---------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------

using EvalCache = kv::Cache<float>;

/// Hooks of one decode method at one target CR (state lives in the captured objects).
struct DecodePolicy {
  bool key_bounds = false;  // the cache keeps per-page key min/max (Quest)
  index_t page_size = 16;
  /// Once, after the prompt's keys [0, n_k - R) were appended; q_prompt = the prompt's queries.
  std::function<void(const TensorView<const float>& q_prompt, EvalCache& cache)> after_prompt;
  /// Each step, after the step's token was appended: may evict; returns the keys the kernel reads.
  std::function<KeySelection(const TensorView<const float>& q, EvalCache& cache)> before_step;
  /// Each step, after the kernel.
  std::function<void(const TensorView<const float>& q, EvalCache& cache)> after_step;
  /// Shared status the hooks update.
  struct Status {
    bool reachable = true;
    std::string detail;
  };
  std::shared_ptr<Status> status = std::make_shared<Status>();
};

/// What a decode adapter knows of the run: R decode steps after a prompt of n_k - R tokens.
struct DecodeSetup {
  index_t steps = 0;
  index_t tokens = 0;  // n_k: prompt + steps
};

using DecodeAdapter = DecodePolicy (*)(const Problem&, const DecodeSetup&, double target_cr,
                                       const AdapterContext&);

namespace adapters {

inline index_t decode_budget(const DecodeSetup& s, double cr) {
  return std::max<index_t>(1, static_cast<index_t>(std::ceil(static_cast<double>(s.tokens) / cr - 1e-9)));
}

inline DecodePolicy dense_decode(const Problem&, const DecodeSetup&, double, const AdapterContext&) {
  return DecodePolicy{};
}

// StreamingLLM: S = 4 sinks + W recent, S + W = ceil(n_k / CR); evicted after the prompt and
// whenever a step's token grows the cache past S + W (before the step attends).
inline DecodePolicy streaming_decode(const Problem&, const DecodeSetup& s, double cr,
                                     const AdapterContext&) {
  DecodePolicy pol;
  const index_t budget = decode_budget(s, cr), sinks = std::min<index_t>(4, budget - 1);
  const index_t window = std::max<index_t>(1, budget - sinks);
  pol.status->detail = detail_reg::str("S=", sinks, " W=", window);
  pol.after_prompt = [=](const TensorView<const float>&, EvalCache& cache) {
    methods::streaming::evict(cache, sinks, window);
  };
  pol.before_step = [=](const TensorView<const float>&, EvalCache& cache) {
    methods::streaming::evict(cache, sinks, window);
    return KeySelection::all();
  };
  return pol;
}

// Quest: full cache, pages of 16, top-B pages by the group-summed upper bound + the current page.
inline DecodePolicy quest_decode(const Problem& p, const DecodeSetup&, double cr,
                                 const AdapterContext& c) {
  DecodePolicy pol;
  pol.key_bounds = true;
  pol.page_size = 16;
  auto plan = std::make_shared<methods::QuestPlan>();
  methods::QuestOptions o;
  o.compression = cr;
  o.scale = p.scale;
  o.num_threads = c.num_threads;
  o.executor = c.executor;
  auto st = pol.status;
  st->detail = "P=16";
  pol.before_step = [=](const TensorView<const float>& q, EvalCache& cache) {
    methods::quest::select(q, cache, o, *plan);
    st->reachable = st->reachable && plan->reachable;
    if (!plan->budget_pages.empty()) st->detail = detail_reg::str("P=16 B=", plan->budget_pages[0], " pages");
    return plan->keys;
  };
  return pol;
}

// SnapKV / Ada-SnapKV: evict once at the end of the prompt, c = ceil(n_k / CR) tokens per KV head
// (Ada: c * Hkv per layer) with observation window 32, pool 7, 4 sinks; decode tokens are appended
// and never evicted.
template <bool Ada>
DecodePolicy snapkv_decode(const Problem& p, const DecodeSetup& s, double cr, const AdapterContext& c) {
  DecodePolicy pol;
  const index_t budget = decode_budget(s, cr);
  auto st = pol.status;
  st->detail = detail_reg::str("c=", budget, Ada ? " per head on average" : " per head");
  pol.after_prompt = [=](const TensorView<const float>& qp, EvalCache& cache) {
    if (budget >= cache.max_length()) return;  // nothing to evict (CR ~ 1)
    std::conditional_t<Ada, methods::AdaSnapKVOptions, methods::SnapKVOptions> o;
    o.budget = budget;
    o.scale = p.scale;
    o.num_threads = c.num_threads;
    o.executor = c.executor;
    if constexpr (Ada) st->reachable = methods::ada_snapkv::evict(qp, cache, o).reachable;
    else st->reachable = methods::snapkv::evict(qp, cache, o).reachable;
  };
  return pol;
}

// H2O: H + R = ceil(n_k / CR) (R the larger half); scores seeded by the prompt queries (exact
// column sums, O(n^2 d); see AdapterContext::h2o_prefill_queries above 8192 tokens), evicted after
// the prompt and after every step's kernel.
inline DecodePolicy h2o_decode(const Problem& p, const DecodeSetup& s, double cr,
                               const AdapterContext& c) {
  DecodePolicy pol;
  const index_t budget = decode_budget(s, cr);
  auto state = std::make_shared<methods::h2o::State>();
  auto st = pol.status;
  methods::H2OOptions o;
  o.budget = budget;
  o.scale = p.scale;
  o.num_threads = c.num_threads;
  o.executor = c.executor;
  o.prefill_queries = c.h2o_prefill_queries >= 0 ? c.h2o_prefill_queries
                      : s.tokens > kH2OExactTokens ? kH2OSeedQueries : 0;
  st->detail = detail_reg::str("H+R=", budget);
  if (o.prefill_queries > 0) st->detail += detail_reg::str(" seeded by last ", o.prefill_queries, " queries");
  pol.after_prompt = [=](const TensorView<const float>& qp, EvalCache& cache) {
    state->reset(cache, o);
    if (budget >= s.tokens) return;  // never evicts: skip the O(n^2) scores
    state->observe(qp, cache, true);
    state->apply(state->select(cache), cache);
  };
  pol.after_step = [=](const TensorView<const float>& q, EvalCache& cache) {
    if (budget >= s.tokens) return;
    state->step(q, cache);
  };
  return pol;
}

}  // namespace adapters

struct DecodeMethod {
  const char* name;
  DecodeAdapter select;
  const char* summary;
};

/// Every decode method, dense first.
inline const std::vector<DecodeMethod>& decode_methods() {
  static const std::vector<DecodeMethod> table = {
      {"dense", adapters::dense_decode, "full cache (the reference)"},
      {"streaming", adapters::streaming_decode, "StreamingLLM: 4 sinks + recent window"},
      {"quest", adapters::quest_decode, "Quest: top pages by key-bound, full cache kept"},
      {"snapkv", adapters::snapkv_decode<false>, "SnapKV eviction after prefill"},
      {"ada_snapkv", adapters::snapkv_decode<true>, "Ada-SnapKV: adaptive per-head budgets"},
      {"h2o", adapters::h2o_decode, "H2O heavy hitters + recent, evicts every step"},
  };
  return table;
}

}  // namespace eval
SPARSE_ATTN_NAMESPACE_END
