// Fidelity of every registered method on real attention (the bundled TinyLlama-1.1B subset,
// data/tinyllama) and on the synthetic generator: exactness at CR 1, error growing with CR,
// attention-mass recall at CR 2, needles retrieved under dense, and the metrics themselves.
// Reads only the repository's copy of the data (SPARSE_ATTN_DATA_DIR from CMake).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <sparse_attn/eval/evaluate.hpp>
#include <string>
#include <vector>

#ifndef SPARSE_ATTN_DATA_DIR
#error "SPARSE_ATTN_DATA_DIR must point at the repository's data/ folder (tests/CMakeLists.txt)"
#endif

using namespace sparse_attn;
using namespace sparse_attn::eval;

namespace {

const std::string kData = std::string(SPARSE_ATTN_DATA_DIR) + "/tinyllama/";

// Layer L's problem (8 query heads of KV group 0, 2048 tokens), loaded once.
const Problem& layer(int L) {
  static std::map<int, Problem> cache;
  auto it = cache.find(L);
  if (it == cache.end()) {
    const std::string b = kData + "A_L" + std::to_string(L);
    it = cache.emplace(L, load_npy_problem("tinyllama/L" + std::to_string(L), b + "_q.npy",
                                           b + "_k.npy", b + "_v.npy")).first;
  }
  return it->second;
}

// Every method on every layer at CR 1, 2, 5, 10 (prefill and decode of the last 32 rows), once.
const std::vector<Record>& sweep() {
  static const std::vector<Record> recs = [] {
    EvalOptions o;
    o.compressions = {1, 2, 5, 10};
    o.last_rows = 32;
    o.min_time_ms = 0;  // timing is not under test
    o.adaptive = {};    // the adaptive records have a test of their own
    std::vector<Record> all;
    for (int L : {0, 3, 11, 21}) {
      auto r = evaluate(layer(L), o);
      all.insert(all.end(), r.begin(), r.end());
    }
    return all;
  }();
  return recs;
}

std::vector<Record> records(const std::string& dataset, const std::string& phase,
                            const std::string& method) {
  std::vector<Record> out;
  for (const Record& r : sweep())
    if (r.dataset == dataset && r.phase == phase && r.method == method) out.push_back(r);
  std::sort(out.begin(), out.end(), [](const Record& a, const Record& b) { return a.target_cr < b.target_cr; });
  return out;
}

std::vector<std::pair<std::string, std::string>> all_methods() {
  std::vector<std::pair<std::string, std::string>> m;
  for (const auto& p : methods::prefill_methods())
    if (p.name != "dense" && !p.needs_user_mask) m.push_back({"prefill", p.name});
  for (const auto& d : methods::decode_methods())
    if (d.name != "dense") m.push_back({"decode", d.name});
  return m;
}

}  // namespace

TEST(FidelityData, BundledSubsetHasTheDocumentedShapes) {
  for (int L : {0, 3, 11, 21}) {
    const Problem& p = layer(L);
    EXPECT_EQ(p.q.heads, 8);
    EXPECT_EQ(p.k.heads, 1);
    EXPECT_EQ(p.q.tokens, 2048);
    EXPECT_EQ(p.k.tokens, 2048);
    EXPECT_EQ(p.q.dim, 64);
  }
}

TEST(Fidelity, EveryMethodIsExactAtCompressionOne) {
  std::size_t seen = 0;
  for (const auto& [phase, method] : all_methods())
    for (int L : {0, 3, 11, 21}) {
      const auto rs = records("tinyllama/L" + std::to_string(L), phase, method);
      ASSERT_FALSE(rs.empty()) << phase << " " << method;
      const Record& r = rs.front();
      ASSERT_EQ(r.target_cr, 1.0);
      ++seen;
      EXPECT_NEAR(r.achieved_cr, 1.0, 1e-12) << phase << " " << method << " L" << L;
      EXPECT_LE(r.err_layer, 1e-5) << phase << " " << method << " L" << L;
      EXPECT_LE(r.err_worst_head, 1e-5) << phase << " " << method << " L" << L;
      EXPECT_GE(r.mass_min, 1.0 - 1e-5) << phase << " " << method << " L" << L;
      EXPECT_EQ(r.top1, 1.0) << phase << " " << method << " L" << L;
    }
  EXPECT_EQ(seen, all_methods().size() * 4);
}

// Layers 3-21 only: layer 0 is near-uniform, where Vertical-Slash's error may fall as CR grows
// (docs/METHODS.md, section "Evaluation"). A method whose target is unreachable is clamped to one
// mask, so points with the same achieved CR may tie; error must not fall between sweep points
// that compress more.
TEST(Fidelity, ErrorGrowsWithCompressionOnLayers3To21) {
  for (const auto& [phase, method] : all_methods())
    for (int L : {3, 11, 21}) {
      const auto rs = records("tinyllama/L" + std::to_string(L), phase, method);
      for (std::size_t i = 1; i < rs.size(); ++i) {
        if (rs[i].achieved_cr <= rs[i - 1].achieved_cr * (1 + 1e-9)) continue;  // clamped: same mask
        EXPECT_GT(rs[i].err_layer, rs[i - 1].err_layer)
            << phase << " " << method << " L" << L << ": CR " << rs[i - 1].achieved_cr << " -> "
            << rs[i].achieved_cr;
      }
      ASSERT_GE(rs.size(), 3u);
      EXPECT_GT(rs.back().err_layer, rs[1].err_layer) << phase << " " << method << " L" << L;
    }
}

// Bound on the mean attention-mass recall at CR 2, layers 3-21. These layers put most of each row's
// mass on a few keys (the README's table: >= 0.94 of the last rows' mass in the top 10% of keys;
// 0.33-0.81 on token 0 alone). At CR 2 every method keeps the sink and the local band, so on this
// data each one recalls >= 0.97 of the mass on average except the window-only prefill methods on
// layer 11 (sliding window 0.85: the first newline, token 15, holds ~0.3 of late rows' mass and
// falls out of the window; FlexPrefill 0.97) and StreamingLLM decode on layer 11 (0.78, same
// token). The bound 0.75 sits below every measured value with margin and far above what a
// selection ignoring the sinks would reach (layer 3: 0.81 of the mass is on token 0 alone).
TEST(Fidelity, MassRecallAtCompressionTwoIsHighOnLayers3To21) {
  constexpr double kBound = 0.75;
  for (const auto& [phase, method] : all_methods())
    for (int L : {3, 11, 21}) {
      const auto rs = records("tinyllama/L" + std::to_string(L), phase, method);
      const auto it = std::find_if(rs.begin(), rs.end(), [](const Record& r) { return r.target_cr == 2.0; });
      ASSERT_NE(it, rs.end());
      EXPECT_GT(it->mass_mean, kBound) << phase << " " << method << " L" << L;
      EXPECT_LE(it->mass_mean, 1.0);
      // Searches pick the budget nearest to the target (methods/budget.hpp), so the achieved CR
      // may sit on either side of 2; past the 10% tolerance the point would be unreachable.
      EXPECT_GE(it->achieved_cr, 1.5) << phase << " " << method << " L" << L;
      EXPECT_LE(it->achieved_cr, 2.0 * 1.1 + 1e-9) << phase << " " << method << " L" << L;
    }
}

// The needles the synthetic generator plants are what its late query attends to under dense: the
// needle keys are the top keys of the last query row of every head and hold most of its mass
// (both presets).
TEST(FidelitySynthetic, LateQueryRetrievesTheNeedlesUnderDense) {
  for (SyntheticPreset preset : {SyntheticPreset::calibrated, SyntheticPreset::stress}) {
    SCOPED_TRACE(synthetic_preset_name(preset));
    SyntheticOptions so;
    so.preset = preset;
    so.tokens = 8192;
    so.q_heads = 4;
    so.kv_heads = 1;
    const Problem p = synthetic_problem(so);
    ASSERT_EQ(p.needles.size(), 4u);
    const index_t n = p.k.tokens, d = p.q.dim, nn = static_cast<index_t>(p.needles.size());
    const float scale = p.resolved_scale();
    for (index_t h = 0; h < p.q.heads; ++h) {
      std::vector<double> s(static_cast<std::size_t>(n));
      for (index_t j = 0; j < n; ++j) {
        double acc = 0;
        for (index_t c = 0; c < d; ++c) acc += static_cast<double>(p.q(h, n - 1, c)) * p.k(0, j, c);
        s[static_cast<std::size_t>(j)] = acc * scale;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double total = 0, on_needles = 0;
      for (index_t j = 0; j < n; ++j) total += std::exp(s[static_cast<std::size_t>(j)] - mx);
      for (index_t j : p.needles) on_needles += std::exp(s[static_cast<std::size_t>(j)] - mx);
      EXPECT_GT(on_needles / total, 0.5) << "head " << h;
      std::vector<index_t> order(static_cast<std::size_t>(n));
      for (index_t j = 0; j < n; ++j) order[static_cast<std::size_t>(j)] = j;
      std::partial_sort(order.begin(), order.begin() + nn, order.end(), [&](index_t a, index_t b) {
        return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)];
      });
      std::vector<index_t> top(order.begin(), order.begin() + nn);
      std::sort(top.begin(), top.end());
      EXPECT_EQ(top, p.needles) << "head " << h;
      // An early query does not look for them: its logits on the needles stay at the structural
      // level (positional tails and noise), far below the late query's 12-14.
      double early = 0;
      for (index_t j : p.needles) {
        double acc = 0;
        for (index_t c = 0; c < d; ++c) acc += static_cast<double>(p.q(h, n / 2 + 7, c)) * p.k(0, j, c);
        early = std::max(early, acc * scale);
      }
      EXPECT_LT(early, 7.0) << "head " << h;
    }
  }
}

TEST(FidelitySynthetic, EvaluatorReportsNeedlesKeptPerMethod) {
  SyntheticOptions so;
  so.tokens = 4096;
  so.q_heads = 4;
  so.kv_heads = 1;
  const Problem p = synthetic_problem(so);
  EvalOptions o;
  o.compressions = {10};
  o.last_rows = 16;
  o.min_time_ms = 0;
  o.prefill_methods = {"sliding_window", "vertical_slash"};
  o.decode_methods = {"streaming", "quest"};
  std::map<std::string, Record> by;
  for (const Record& r : evaluate(p, o)) by[r.phase + "/" + r.method] = r;
  for (const auto& [k, r] : by) EXPECT_EQ(r.needles_total, 16) << k;
  EXPECT_EQ(by["prefill/dense"].needles_kept, 16);
  EXPECT_EQ(by["decode/dense"].needles_kept, 16);
  // A window of n/10 keys cannot reach needles planted in [0.1 n, 0.85 n) from the last row...
  EXPECT_EQ(by["prefill/sliding_window"].needles_kept, 0);
  EXPECT_EQ(by["decode/streaming"].needles_kept, 0);
  // ...while query-aware selections find them.
  EXPECT_EQ(by["prefill/vertical_slash"].needles_kept, 16);
  EXPECT_EQ(by["decode/quest"].needles_kept, 16);
}

TEST(FidelityAdaptive, MassBudgetSearchedForTheTargetCompression) {
  // Layer 11, the last 32 rows as decode steps: each adaptive record runs at the mass target the
  // search found, reaches the target CR (where the fixed budget does), and is that selection.
  EvalOptions o;
  o.compressions = {3, 8};
  o.last_rows = 32;
  o.min_time_ms = 0;
  o.prefill_methods = {"vertical_slash", "block_sparse"};
  o.decode_methods = {"quest", "snapkv"};
  o.adaptive = {"vertical_slash", "quest", "snapkv"};
  const Problem& p = layer(11);
  const std::vector<Record> recs = evaluate(p, o);
  int adaptive = 0;
  for (const Record& r : recs) {
    EXPECT_EQ(r.label(), r.adaptive ? r.method + "+mass" : r.method);
    if (!r.adaptive) {
      if (r.method != "dense") {
        EXPECT_EQ(r.budget, methods::Budget::compression(r.target_cr).str());
      }
      continue;
    }
    ++adaptive;
    EXPECT_NE(std::find(o.adaptive.begin(), o.adaptive.end(), r.method), o.adaptive.end());
    ASSERT_EQ(r.budget.rfind("mass=", 0), 0u) << r.budget;
    const double mass = std::stod(r.budget.substr(5));
    EXPECT_GT(mass, 0.0);
    EXPECT_LE(mass, 1.0);
    EXPECT_TRUE(r.reachable) << r.label() << " CR " << r.target_cr << " -> " << r.achieved_cr;
    EXPECT_LT(std::fabs(std::log(r.achieved_cr / r.target_cr)), 0.1) << r.label();
    if (r.phase == "prefill") {  // the record is the selection at that mass target
      AttentionOptions so;
      so.scale = p.scale;
      const auto sel = select_prefill(r.method, {}, p, methods::Budget::mass(mass), so);
      EXPECT_DOUBLE_EQ(sel.stats.compression(), r.achieved_cr) << r.label();
      EXPECT_EQ(sel.stats.detail, r.detail);
    }
  }
  EXPECT_EQ(adaptive, 2 * 3);  // block_sparse is not in the adaptive list
  // A method that takes no mass budget cannot run adaptively.
  o.adaptive = {"sliding_window"};
  EXPECT_THROW(evaluate(p, o), sparse_attn::invalid_argument);
}

TEST(FidelityAdaptive, PerLayerSchedulesSplitOneTotalBudget) {
  // Layers 3 and 21 (upper layers concentrate more): the uniform schedule runs every layer at
  // the total CR (the same records as evaluate() at that CR); every schedule's layer targets
  // keep the total, and the totals it reports follow from the per-layer records.
  const std::vector<Problem> layers{prefix(layer(3), 1024), prefix(layer(21), 1024)};
  EvalOptions o;
  o.compressions = {5};
  o.last_rows = 16;
  o.min_time_ms = 0;
  o.prefill_methods = {"vertical_slash"};
  o.decode_methods = {"quest"};
  const std::vector<ScheduleRecord> recs = evaluate_schedules(layers, o);
  ASSERT_EQ(recs.size(), 2u * 3u);  // (prefill, decode) x (uniform, pyramid, mass)
  for (const ScheduleRecord& r : recs) {
    ASSERT_EQ(r.layer_target.size(), 2u);
    // Equal dense units per layer: sum_l 1 / c_l = 2 / c.
    EXPECT_NEAR(1 / r.layer_target[0] + 1 / r.layer_target[1], 2.0 / 5, 1e-9) << r.schedule;
    EXPECT_NEAR(r.achieved_cr, 2.0 / (1 / r.layer_achieved[0] + 1 / r.layer_achieved[1]), 1e-9);
    EXPECT_NEAR(r.err_mean, (r.layer_err[0] + r.layer_err[1]) / 2, 1e-12);
    if (r.schedule == "uniform") {
      EXPECT_DOUBLE_EQ(r.layer_target[0], 5.0);
      EvalOptions one = o;
      one.adaptive = {};
      const auto direct = r.phase == "prefill" ? evaluate_prefill(layers[1], one)
                                               : evaluate_decode(layers[1], one);
      EXPECT_DOUBLE_EQ(direct.back().err_layer, r.layer_err[1]) << r.phase;
    }
    if (r.schedule == "pyramid") {  // layer 0 of two keeps more: a lower CR
      EXPECT_LT(r.layer_target[0], r.layer_target[1]);
    }
    if (r.schedule == "mass") {  // layer 3 is more concentrated than 21: it keeps less
      EXPECT_LT(r.layer_weight[0], r.layer_weight[1]);
      EXPECT_GT(r.layer_target[0], r.layer_target[1]);
    }
  }
}

TEST(FidelitySynthetic, GeneratorIsDeterministicBySeedAndScalesTo128k) {
  SyntheticOptions so;
  so.tokens = 4096;
  const SyntheticData a = make_synthetic(so), b = make_synthetic(so);
  EXPECT_EQ(a.q, b.q);
  EXPECT_EQ(a.k, b.k);
  EXPECT_EQ(a.v, b.v);
  EXPECT_EQ(a.needles, b.needles);
  so.seed = 8;
  EXPECT_NE(make_synthetic(so).k, a.k);
  SyntheticOptions big;
  big.tokens = 131072;
  big.q_heads = 1;
  const SyntheticData c = make_synthetic(big);
  EXPECT_EQ(c.k.size(), static_cast<std::size_t>(131072 * 64));
  for (float x : c.q) ASSERT_TRUE(std::isfinite(x));
  for (index_t j : c.needles) {
    EXPECT_GE(j, 131072 / 10);
    EXPECT_LT(j, 131072 * 85 / 100);
  }
}

TEST(FidelityMetrics, MassRecallFromLseAndFit) {
  const std::vector<float> dense{0.0f, 1.0f, -std::numeric_limits<float>::infinity()};
  const std::vector<float> kept{std::log(0.5f), 1.0f, -std::numeric_limits<float>::infinity()};
  const MassRecall m = mass_recall(kept, dense);
  EXPECT_NEAR(m.min, 0.5, 1e-6);
  EXPECT_NEAR(m.mean, (0.5 + 1.0 + 1.0) / 3.0, 1e-6);  // an empty dense row counts as recalled
  // Exact log-linear data is fitted exactly.
  std::vector<FitPoint> pts;
  for (double n : {512.0, 1024.0, 2048.0})
    for (double cr : {2.0, 5.0, 10.0}) pts.push_back({std::exp(-1.0 + 0.7 * std::log(cr) - 0.2 * std::log(n)), cr, n});
  const LogLinearFit f = fit_log_linear(pts);
  EXPECT_NEAR(f.a, -1.0, 1e-9);
  EXPECT_NEAR(f.b, 0.7, 1e-9);
  EXPECT_NEAR(f.c, -0.2, 1e-9);
  EXPECT_NEAR(f.r2, 1.0, 1e-9);
  EXPECT_TRUE(f.length_term);
  const Crossing c = crossing_compression({{2.0, 0.005}, {4.0, 0.02}}, 0.01);
  EXPECT_EQ(c.kind, Crossing::bracketed);
  EXPECT_NEAR(c.cr, std::sqrt(8.0), 1e-9);  // log-log midpoint
}

TEST(FidelityMetrics, MaskKeepsMatchesTheDenseExport) {
  const Problem& p = layer(3);
  const Problem small = prefix(p, 256);
  AttentionOptions opt;
  opt.scale = small.scale;
  for (const auto& m : methods::prefill_methods()) {
    if (m.needs_user_mask) continue;
    const PrefillRun sel = select_prefill(m.name, {}, small, methods::Budget::compression(4.0), opt);
    // Pairs counted through keeps() equal the mask's own count.
    index_t pairs = 0;
    for (index_t h = 0; h < small.q.heads; ++h)
      for (index_t i = 0; i < small.q.tokens; ++i)
        for (index_t j = 0; j <= i; ++j) pairs += sel.keeps(h, i, j) ? 1 : 0;
    EXPECT_EQ(pairs, sel.stats.pairs) << m.name;
  }
}
