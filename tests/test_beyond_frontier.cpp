// Methods beyond the fixed-budget frontier (docs/METHODS.md, sections "xattention" and
// "tri_shape"): each selector against a brute-force float64 version of its own rule on small
// inputs, its budgets (reachable and not), and the common kernel on its mask against the
// double-precision oracle.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <sparse_attn/kernel/prefill.hpp>
#include <sparse_attn/methods/layer_budget.hpp>
#include <sparse_attn/methods/sliding_window.hpp>
#include <sparse_attn/methods/xattention.hpp>
#include <sparse_attn/reference.hpp>
#include <vector>

namespace sa = sparse_attn;
namespace sm = sparse_attn::methods;
using sa::index_t;
using sm::Budget;

namespace {

struct Qkv {
  index_t hq, hkv, n_q, n_k, d;
  std::vector<float> q, k, v;
  Qkv(index_t hq_, index_t hkv_, index_t n_q_, index_t n_k_, index_t d_, unsigned seed)
      : hq(hq_), hkv(hkv_), n_q(n_q_), n_k(n_k_), d(d_) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    q.resize(static_cast<std::size_t>(hq * n_q * d));
    k.resize(static_cast<std::size_t>(hkv * n_k * d));
    v.resize(k.size());
    for (auto& x : q) x = nd(gen);
    for (auto& x : k) x = nd(gen);
    for (auto& x : v) x = nd(gen);
  }
  sa::TensorView<const float> qv() const { return {q.data(), hq, n_q, d}; }
  sa::TensorView<const float> kv() const { return {k.data(), hkv, n_k, d}; }
  sa::TensorView<const float> vv() const { return {v.data(), hkv, n_k, d}; }
  double qa(index_t h, index_t i, index_t c) const {
    return q[static_cast<std::size_t>((h * n_q + i) * d + c)];
  }
  double ka(index_t h, index_t j, index_t c) const {
    return k[static_cast<std::size_t>((h * n_k + j) * d + c)];
  }
};

// The XAttention rule in float64, written from its definition (docs/METHODS.md): entry
// threshold of every (h, qb, kb): -1 forced, +inf illegal, else mass taken before it / row total.
std::vector<double> xattention_oracle(const Qkv& p, index_t B, index_t S) {
  const index_t off = p.n_k - p.n_q, nqb = (p.n_q + B - 1) / B, nkb = (p.n_k + B - 1) / B;
  const index_t G = p.hq / p.hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(p.d)) / static_cast<double>(S);
  std::vector<double> e(static_cast<std::size_t>(p.hq * nqb * nkb),
                        std::numeric_limits<double>::infinity());
  for (index_t h = 0; h < p.hq; ++h) {
    std::vector<double> mass(static_cast<std::size_t>(nqb * nkb), 0.0);
    for (index_t g = 0; g * S < p.n_q; ++g) {
      const index_t last = std::min(g * S + S, p.n_q) - 1 + off;
      std::vector<double> z;
      for (index_t c = 0; c * S <= last; ++c) {
        double acc = 0;
        bool any = false;
        for (index_t t = 0; t < S; ++t) {
          const index_t i = g * S + S - 1 - t, j = c * S + t;
          if (i >= p.n_q || j >= p.n_k || j > i + off) continue;
          for (index_t x = 0; x < p.d; ++x) acc += p.qa(h, i, x) * p.ka(h / G, j, x);
          any = true;
        }
        z.push_back(any ? acc * scale : -std::numeric_limits<double>::infinity());
      }
      double mx = -std::numeric_limits<double>::infinity(), sum = 0;
      for (double x : z) mx = std::max(mx, x);
      for (double& x : z) sum += (x = std::exp(x - mx));
      const index_t qb = g * S / B;
      for (std::size_t c = 0; c < z.size(); ++c)
        mass[static_cast<std::size_t>(qb * nkb + static_cast<index_t>(c) * S / B)] += z[c] / sum;
    }
    for (index_t qb = 0; qb < nqb; ++qb) {
      const double* m = mass.data() + qb * nkb;
      double* eh = e.data() + (h * nqb + qb) * nkb;
      const index_t d0 = (qb * B + off) / B, d1 = (std::min(qb * B + B, p.n_q) - 1 + off) / B;
      double taken = m[0], total = m[0];
      eh[0] = -1;
      for (index_t kb = std::max<index_t>(1, d0); kb <= d1; ++kb) {
        eh[kb] = -1;
        taken += m[kb];
        total += m[kb];
      }
      std::vector<index_t> order;
      for (index_t kb = 1; kb < d0; ++kb) {
        order.push_back(kb);
        total += m[kb];
      }
      std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return m[a] > m[b]; });
      for (index_t kb : order) {
        eh[kb] = taken / total;
        taken += m[kb];
      }
    }
  }
  return e;
}

bool oracle_keeps(double e, double tau) {
  if (e < 0) return true;
  if (!(e <= 1.0 + 1e-12)) return false;
  return tau >= 1.0 || e < tau;
}

// The selected mask equals the oracle's rule at tau, except blocks whose threshold lies within
// float rounding of tau (the selector accumulates in float where the oracle uses double).
void expect_rule(const Qkv& p, const sm::XAttention& m, const sm::XAttentionSelection& sel,
                 const std::vector<double>& e) {
  const index_t nqb = sel.mask.shape().num_q_blocks(), nkb = sel.mask.shape().num_k_blocks();
  int borderline = 0;
  for (index_t h = 0; h < p.hq; ++h)
    for (index_t qb = 0; qb < nqb; ++qb) {
      std::vector<bool> listed(static_cast<std::size_t>(nkb), false);
      sel.mask.for_each_block(h, qb, [&](index_t kb, bool) { listed[static_cast<std::size_t>(kb)] = true; });
      for (index_t kb = 0; kb < nkb; ++kb) {
        const double ek = e[static_cast<std::size_t>((h * nqb + qb) * nkb + kb)];
        const bool want = oracle_keeps(ek, sel.tau);
        if (want != listed[static_cast<std::size_t>(kb)]) {
          ++borderline;
          EXPECT_LT(std::fabs(ek - sel.tau), 1e-5)
              << "h " << h << " qb " << qb << " kb " << kb << " e " << ek << " tau " << sel.tau
              << " B " << m.block << " S " << m.stride;
        }
      }
    }
  EXPECT_LE(borderline, 1);
}

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  double r = 0;
  for (std::size_t i = 0; i < a.size(); ++i) r = std::max(r, std::fabs(a[i] - b[i]));
  return r;
}

}  // namespace

TEST(XAttention, MaskIsTheAntidiagonalMassRuleAtEveryThreshold) {
  struct Case {
    index_t hq, hkv, n_q, n_k, d, B, S;
  };
  for (const Case c : {Case{4, 2, 300, 300, 16, 32, 4}, Case{2, 1, 157, 300, 8, 32, 8},
                       Case{3, 3, 129, 200, 16, 16, 1}, Case{2, 2, 96, 161, 8, 16, 16},
                       Case{2, 1, 1, 77, 8, 8, 2}}) {
    const Qkv p(c.hq, c.hkv, c.n_q, c.n_k, c.d, 7u + static_cast<unsigned>(c.n_q));
    sm::XAttention m;
    m.block = c.B;
    m.stride = c.S;
    const auto e = xattention_oracle(p, c.B, c.S);
    for (double tau : {0.0, 0.3, 0.6, 0.9, 0.99, 1.0}) {
      const auto sel = m.select(p.qv(), p.kv(), Budget::mass(tau > 0 ? tau : 1e-9));
      expect_rule(p, m, sel, e);
      EXPECT_TRUE(sel.stats.reachable);
    }
    // tau = 1 is exactly dense causal.
    const auto all = m.select(p.qv(), p.kv(), Budget::mass(1.0));
    EXPECT_EQ(all.stats.pairs, all.stats.dense_pairs);
  }
}

TEST(XAttention, KernelOnItsMaskMatchesTheOracle) {
  const Qkv p(4, 2, 200, 333, 16, 3u);
  sm::XAttention m;
  m.block = 32;
  m.stride = 8;
  for (const Budget b : {Budget::mass(0.5), Budget::compression(2.0)}) {
    const auto sel = m.select(p.qv(), p.kv(), b);
    std::vector<float> out(static_cast<std::size_t>(p.hq * p.n_q * p.d), -1.0f);
    sa::AttentionOptions opt;
    opt.precision = sa::Precision::float32;
    sa::prefill(p.qv(), p.kv(), p.vv(), sa::TensorView<float>(out.data(), p.hq, p.n_q, p.d),
                sel.mask, opt);
    const auto ref = sa::reference::attention_masked(
        p.qv(), p.kv(), p.vv(), 1.0 / std::sqrt(static_cast<double>(p.d)), sel.mask);
    EXPECT_LT(max_abs_diff(out, ref.out), 2e-5);
  }
}

TEST(XAttention, CompressionBudgetFindsTheNearestThreshold) {
  const Qkv p(4, 2, 512, 512, 16, 11u);
  sm::XAttention m;
  m.block = 32;
  m.stride = 4;
  const auto e = xattention_oracle(p, m.block, m.stride);
  for (double cr : {1.5, 2.0, 3.0, 4.0}) {
    const auto sel = m.select(p.qv(), p.kv(), Budget::compression(cr));
    EXPECT_TRUE(sel.stats.reachable) << cr << " -> " << sel.stats.compression();
    // Its mask is the mass rule at the tau it reports.
    const auto again = m.select(p.qv(), p.kv(), Budget::mass(std::max(sel.tau, 1e-9)));
    if (sel.tau > 0) {
      EXPECT_EQ(again.stats.pairs, sel.stats.pairs) << cr;
    }
    // No other threshold's mask is nearer to the target (the candidates: each distinct oracle
    // threshold, and 1); a tolerance covers masks that differ by a borderline block.
    const double dense = static_cast<double>(sel.stats.dense_pairs);
    auto pairs_at = [&](double tau) {
      double pairs = 0;
      const index_t nqb = 16, nkb = 16;
      for (index_t h = 0; h < p.hq; ++h)
        for (index_t qb = 0; qb < nqb; ++qb)
          for (index_t kb = 0; kb < nkb; ++kb)
            if (oracle_keeps(e[static_cast<std::size_t>((h * nqb + qb) * nkb + kb)], tau))
              pairs += kb < qb ? 32.0 * 32.0 : (kb == qb ? 32.0 * 33.0 / 2.0 : 0.0);
      return pairs;
    };
    double best = std::numeric_limits<double>::infinity();
    std::vector<double> taus(e.begin(), e.end());
    taus.push_back(1.0);
    for (double t : taus)
      if (t >= 0 && t <= 1) best = std::min(best, std::fabs(std::log(dense / pairs_at(t) / cr)));
    EXPECT_LE(std::fabs(std::log(sel.stats.compression() / cr)), best + 0.02) << cr;
  }
}

TEST(XAttention, UnreachableTargetsSayCountBudgetsAndBadParametersThrow) {
  const Qkv p(2, 1, 256, 256, 8, 5u);
  sm::XAttention m;
  m.block = 64;
  m.stride = 8;
  // Forced sink + diagonal blocks: at most ~ n / (2 B) / ... far below 100.
  const auto sel = m.select(p.qv(), p.kv(), Budget::compression(100));
  EXPECT_FALSE(sel.stats.reachable);
  EXPECT_EQ(sel.tau, 0.0);  // the sparsest mask: only forced blocks
  EXPECT_THROW(m.select(p.qv(), p.kv(), Budget::count(3)), sa::invalid_argument);
  m.stride = 7;  // does not divide 64
  EXPECT_THROW(m.select(p.qv(), p.kv(), Budget::mass(0.9)), sa::invalid_argument);
  m.stride = 0;
  EXPECT_THROW(m.select(p.qv(), p.kv(), Budget::mass(0.9)), sa::invalid_argument);
  m.stride = 8;
  m.block = 0;
  EXPECT_THROW(m.select(p.qv(), p.kv(), Budget::mass(0.9)), sa::invalid_argument);
  // Empty queries: an empty mask, every target met.
  const Qkv empty(2, 1, 0, 40, 8, 1u);
  m.block = 16;
  const auto none = m.select(empty.qv(), empty.kv(), Budget::compression(5));
  EXPECT_EQ(none.stats.pairs, 0);
}

TEST(XAttention, KeepsAPlantedHeavyKeyBlock) {
  // Every query gets a common direction u; keys 40..47 (block 2 of 16-token blocks) point along
  // it, so at tau 0.5 each later query block keeps block 2, and a CR 2 selection keeps it too.
  Qkv p(2, 1, 256, 256, 16, 9u);
  const float u = 3.0f;
  for (index_t i = 0; i < p.hq * p.n_q; ++i) p.q[static_cast<std::size_t>(i * p.d)] += u;
  for (index_t j = 40; j < 48; ++j) p.k[static_cast<std::size_t>(j * p.d)] = 4.0f * u;
  sm::XAttention m;
  m.block = 16;
  m.stride = 4;
  for (const Budget b : {Budget::mass(0.5), Budget::compression(2.0)}) {
    const auto sel = m.select(p.qv(), p.kv(), b);
    for (index_t h = 0; h < p.hq; ++h)
      for (index_t qb = 4; qb < 16; ++qb) EXPECT_TRUE(sel.mask.allowed(h, qb * 16, 40)) << qb;
  }
}

// ---------------------------------------------------------------------------------------------
// Tri-shape (docs/METHODS.md, section "tri_shape")
// ---------------------------------------------------------------------------------------------

TEST(TriShape, MaskIsSinksWindowAndDenseLastRows) {
  struct Case {
    index_t n_q, n_k, window, sinks, last, block;
  };
  for (const Case c : {Case{300, 300, 37, 4, 50, 32}, Case{157, 300, 20, 0, 64, 64},
                       Case{129, 129, 1, 3, 1, 16}, Case{64, 200, 10, 2, 500, 32},
                       Case{90, 90, 200, 4, 10, 16}, Case{77, 140, 9, 5, 0, 8}}) {
    const Qkv p(2, 1, c.n_q, c.n_k, 8, 3u);
    sm::TriShape m;
    m.sinks = c.sinks;
    m.last_rows = c.last;
    m.block = c.block;
    const auto sel = m.select(p.qv(), p.kv(), Budget::count(c.window));
    const index_t off = c.n_k - c.n_q;
    index_t pairs = 0;
    for (index_t h = 0; h < 2; ++h) {
      const auto dm = sa::to_dense(sel.mask, h);
      for (index_t i = 0; i < c.n_q; ++i)
        for (index_t j = 0; j < c.n_k; ++j) {
          const index_t pos = i + off;
          const bool want = j <= pos && (i >= c.n_q - c.last || j < c.sinks ||
                                         pos - j < c.window || c.window >= c.n_k);
          ASSERT_EQ(dm(i, j), want) << "i " << i << " j " << j;
          ASSERT_EQ(sel.mask.allowed(h, i, j), want);
          pairs += want;
        }
    }
    EXPECT_EQ(sel.stats.pairs, pairs);
    // L = 0 is the sliding window.
    if (c.last == 0) {
      sm::SlidingWindow sw;
      sw.sinks = c.sinks;
      sw.block = c.block;
      EXPECT_EQ(sw.select(p.qv(), p.kv(), Budget::count(c.window)).stats.pairs, pairs);
    }
  }
}

TEST(TriShape, KernelOnItsMaskMatchesTheOracle) {
  const Qkv p(4, 2, 150, 260, 16, 5u);
  sm::TriShape m;
  m.last_rows = 40;
  m.block = 32;
  const auto sel = m.select(p.qv(), p.kv(), Budget::compression(2.0));
  std::vector<float> out(static_cast<std::size_t>(p.hq * p.n_q * p.d), -1.0f);
  sa::AttentionOptions opt;
  opt.precision = sa::Precision::float32;
  sa::prefill(p.qv(), p.kv(), p.vv(), sa::TensorView<float>(out.data(), p.hq, p.n_q, p.d),
              sel.mask, opt);
  const auto ref = sa::reference::attention_masked(
      p.qv(), p.kv(), p.vv(), 1.0 / std::sqrt(static_cast<double>(p.d)), sel.mask);
  EXPECT_LT(max_abs_diff(out, ref.out), 2e-5);
}

TEST(TriShape, BudgetsReachableAndNotAndBadParameters) {
  const Qkv p(2, 1, 1024, 1024, 8, 1u);
  sm::TriShape m;  // S = 4, L = 64
  for (double cr : {2.0, 4.0, 6.0}) {
    const auto sel = m.select(p.qv(), p.kv(), Budget::compression(cr));
    EXPECT_TRUE(sel.stats.reachable) << cr << " -> " << sel.stats.compression();
  }
  // The dense last rows alone cost 64 of ~512 rows' worth: CR 20 cannot be reached.
  const auto far = m.select(p.qv(), p.kv(), Budget::compression(20));
  EXPECT_FALSE(far.stats.reachable);
  EXPECT_LT(far.stats.compression(), 20.0);
  EXPECT_THROW(m.select(p.qv(), p.kv(), Budget::mass(0.9)), sa::invalid_argument);
  m.last_rows = -1;
  EXPECT_THROW(m.select(p.qv(), p.kv(), Budget::count(8)), sa::invalid_argument);
  m.last_rows = 8;
  m.sinks = -1;
  EXPECT_THROW(m.select(p.qv(), p.kv(), Budget::count(8)), sa::invalid_argument);
  EXPECT_THROW(sa::masks::tri_shape(2, 10, 10, 0, 1, 1), sa::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Per-layer budgets (docs/METHODS.md, section "Per-layer budgets")
// ---------------------------------------------------------------------------------------------

TEST(LayerBudgets, SplitKeepsTheTotalAndFollowsTheWeights) {
  const std::vector<double> D{1000, 1000, 2000, 500};
  const double total = 4500;
  for (const double c : {1.0, 2.0, 5.0, 10.0}) {
    // Uniform: every layer at c.
    for (double cl : sm::layer_compressions(c, D, {1, 1, 1, 1})) EXPECT_NEAR(cl, c, 1e-12);
    // Any weights: the kept units sum to total / c, and k_l / (w_l D_l) is one constant for the
    // layers not clamped to dense.
    const std::vector<double> w{4, 3, 2, 1};
    const auto cr = sm::layer_compressions(c, D, w);
    double kept = 0;
    std::vector<double> ratio;
    for (std::size_t l = 0; l < D.size(); ++l) {
      EXPECT_GE(cr[l], 1.0);
      kept += D[l] / cr[l];
      if (cr[l] > 1.0) ratio.push_back(D[l] / cr[l] / (w[l] * D[l]));
    }
    EXPECT_NEAR(kept, total / c, 1e-9 * total) << "c " << c;
    for (double r : ratio) EXPECT_NEAR(r, ratio.front(), 1e-12 * ratio.front());
  }
  // Water filling: at c = 1.25 the heavy layer 0 would need more than dense; it is clamped to
  // CR 1 and the others share the rest in proportion to w_l D_l.
  const auto cr = sm::layer_compressions(1.25, {100, 100}, {9, 1});
  EXPECT_EQ(cr[0], 1.0);
  EXPECT_NEAR(100.0 / cr[1], 200.0 / 1.25 - 100.0, 1e-9);
  // A layer with no dense units gets +inf; bad arguments are refused.
  EXPECT_TRUE(std::isinf(sm::layer_compressions(2, {0, 100}, {1, 1})[0]));
  EXPECT_THROW(sm::layer_compressions(0.5, D, {1, 1, 1, 1}), sparse_attn::invalid_argument);
  EXPECT_THROW(sm::layer_compressions(2, D, {1, 1, 1}), sparse_attn::invalid_argument);
  EXPECT_THROW(sm::layer_compressions(2, D, {1, 0, 1, 1}), sparse_attn::invalid_argument);
  EXPECT_THROW(sm::layer_compressions(2, {0, 0}, {1, 1}), sparse_attn::invalid_argument);
}

TEST(LayerBudgets, PyramidWeightsFallLinearly) {
  EXPECT_EQ(sm::pyramid_weights(1, 5), std::vector<double>{1.0});
  const auto w = sm::pyramid_weights(4, 4);
  ASSERT_EQ(w.size(), 4u);
  for (std::size_t l = 0; l < 4; ++l) EXPECT_NEAR(w[l], 4.0 - static_cast<double>(l), 1e-12);
  EXPECT_THROW(sm::pyramid_weights(0, 2), sparse_attn::invalid_argument);
  EXPECT_THROW(sm::pyramid_weights(3, 0.5), sparse_attn::invalid_argument);
}

TEST(LayerBudgets, MassWeightsAreTheNeedsOverTheirGeometricMeanBounded) {
  // Inside the bound: n_l / g exactly (g = 2 for needs 1 and 4).
  const auto w = sm::mass_weights({1.0, 4.0}, 4.0);
  EXPECT_NEAR(w[0], 0.5, 1e-12);
  EXPECT_NEAR(w[1], 2.0, 1e-12);
  // Needs spanning 10^4 (a sink-dominated layer next to a near-uniform one), spread 3: the
  // extremes clamp to 1/sqrt(3) and sqrt(3), the order is kept, a mid need stays between.
  const auto b = sm::mass_weights({1e-4, 0.3, 1.0, 0.02}, 3.0);
  EXPECT_NEAR(b[0], 1 / std::sqrt(3.0), 1e-12);
  EXPECT_NEAR(b[2], std::sqrt(3.0), 1e-12);
  const double g = std::pow(1e-4 * 0.3 * 1.0 * 0.02, 0.25);
  EXPECT_NEAR(b[3], std::clamp(0.02 / g, 1 / std::sqrt(3.0), std::sqrt(3.0)), 1e-12);
  EXPECT_LE(b[0], b[3]);
  EXPECT_LE(b[3], b[1]);
  EXPECT_LE(b[1], b[2]);
  // Spread 1 is the uniform schedule.
  for (double x : sm::mass_weights({0.1, 0.5, 0.9}, 1.0)) EXPECT_DOUBLE_EQ(x, 1.0);
  EXPECT_THROW(sm::mass_weights({}, 3.0), sparse_attn::invalid_argument);
  EXPECT_THROW(sm::mass_weights({0.1, 0.0}, 3.0), sparse_attn::invalid_argument);
  EXPECT_THROW(sm::mass_weights({0.1, 0.2}, 0.5), sparse_attn::invalid_argument);
}

TEST(LayerBudgets, MassNeedIsTheMedianKeyShareHoldingTheMass) {
  // float64 oracle: per (head, last-w row) the fewest keys holding p of the row's softmax, over
  // the keys it sees; the median of those shares (the upper median for an even count).
  Qkv p(4, 2, 90, 130, 16, 77);
  for (const double mass : {0.5, 0.9}) {
    std::vector<double> shares;
    const index_t w = 40, off = p.n_k - p.n_q, G = p.hq / p.hkv;
    for (index_t h = 0; h < p.hq; ++h)
      for (index_t i = p.n_q - w; i < p.n_q; ++i) {
        const index_t seen = off + i + 1;
        std::vector<double> z(static_cast<std::size_t>(seen));
        double mx = -INFINITY, sum = 0;
        for (index_t j = 0; j < seen; ++j) {
          double dot = 0;
          for (index_t c = 0; c < p.d; ++c) dot += p.qa(h, i, c) * p.ka(h / G, j, c);
          z[static_cast<std::size_t>(j)] = dot / 4.0;  // scale 1 / sqrt(16)
          mx = std::max(mx, z[static_cast<std::size_t>(j)]);
        }
        for (double& x : z) sum += (x = std::exp(x - mx));
        std::sort(z.begin(), z.end(), std::greater<double>());
        double have = 0;
        index_t taken = 0;
        while (have < mass * sum * (1 - 1e-9)) have += z[static_cast<std::size_t>(taken++)];
        shares.push_back(static_cast<double>(taken) / static_cast<double>(seen));
      }
    std::nth_element(shares.begin(), shares.begin() + static_cast<std::ptrdiff_t>(shares.size() / 2),
                     shares.end());
    const double want = shares[shares.size() / 2];
    const double got = sm::mass_need(p.qv(), p.kv(), mass, NAN, w);
    EXPECT_NEAR(got, want, 1.5 / 130.0) << "p " << mass;  // one key either way at a tie
  }
  EXPECT_THROW((void)sm::mass_need(p.qv(), p.kv(), 0.0), sparse_attn::invalid_argument);
  EXPECT_THROW((void)sm::mass_need(p.qv(), p.kv(), 0.5, NAN, 0), sparse_attn::invalid_argument);
}
