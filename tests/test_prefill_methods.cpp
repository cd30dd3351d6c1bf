// Data-dependent prefill selections (METHODS.md 3-5) and caller-supplied block masks: invariants of
// each selected mask, CR bookkeeping, and the common kernel against the double-precision oracle on
// each method's own mask.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sparse_attn/kernel/prefill.hpp>
#include <sparse_attn/methods/block_sparse.hpp>
#include <sparse_attn/methods/dense.hpp>
#include <sparse_attn/methods/flex_prefill.hpp>
#include <sparse_attn/methods/user_mask.hpp>
#include <sparse_attn/methods/vertical_slash.hpp>
#include <sparse_attn/reference.hpp>
#include <string>
#include <vector>

namespace sa = sparse_attn;
namespace sm = sparse_attn::methods;
using sa::index_t;

namespace {

// Q [Hq, n_q, d], K and V [Hkv, n_k, d], standard normal, stored as T.
template <class T>
struct Problem {
  index_t hq, hkv, n_q, n_k, d;
  std::vector<T> q, k, v;
  Problem(index_t hq_, index_t hkv_, index_t n_q_, index_t n_k_, index_t d_, unsigned seed)
      : hq(hq_), hkv(hkv_), n_q(n_q_), n_k(n_k_), d(d_) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    q.resize(static_cast<std::size_t>(hq * n_q * d));
    k.resize(static_cast<std::size_t>(hkv * n_k * d));
    v.resize(k.size());
    for (auto& x : q) x = static_cast<T>(nd(gen));
    for (auto& x : k) x = static_cast<T>(nd(gen));
    for (auto& x : v) x = static_cast<T>(nd(gen));
  }
  sa::TensorView<const T> qv() const { return {q.data(), hq, n_q, d}; }
  sa::TensorView<const T> kv() const { return {k.data(), hkv, n_k, d}; }
  sa::TensorView<const T> vv() const { return {v.data(), hkv, n_k, d}; }
  // Plants a heavy column: every query gains a common unit component u and key j becomes gain * u,
  // so q . k_j = gain * (1 + N(0, 1)) for every query.
  void plant_column(index_t j, float gain) {
    const float u = 1.0f / std::sqrt(static_cast<float>(d));
    for (auto& x : q) x = static_cast<T>(static_cast<float>(x) + u);
    for (index_t hk = 0; hk < hkv; ++hk)
      for (index_t c = 0; c < d; ++c)
        k[static_cast<std::size_t>((hk * n_k + j) * d + c)] = static_cast<T>(gain * u);
  }
};

template <class T, class Mask>
std::vector<float> run_kernel(const Problem<T>& p, const Mask& mask) {
  std::vector<float> out(static_cast<std::size_t>(p.hq * p.n_q * p.d), -1.0f);
  sa::prefill(p.qv(), p.kv(), p.vv(), sa::TensorView<float>(out.data(), p.hq, p.n_q, p.d), mask);
  return out;
}

double rel_l2(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  return rel_l2(a, std::vector<double>(b.begin(), b.end()));
}

// The kernel on the method's own mask equals the oracle on the same (materialised) mask.
template <class T, class Mask>
void expect_matches_oracle(const Problem<T>& p, const Mask& mask) {
  const auto out = run_kernel(p, mask);
  const auto ref = sa::reference::attention_masked(p.qv(), p.kv(), p.vv(),
                                                   1.0 / std::sqrt(static_cast<double>(p.d)), mask);
  EXPECT_LT(rel_l2(out, ref.out), 2e-6);
  double max_err = 0;
  for (std::size_t i = 0; i < out.size(); ++i)
    max_err = std::max(max_err, std::abs(out[i] - ref.out[i]));
  EXPECT_LT(max_err, 2e-5);
}

// Listed key blocks of (h, qb) as a vector.
template <class Mask>
std::vector<index_t> blocks_of(const Mask& m, index_t h, index_t qb) {
  std::vector<index_t> r;
  m.for_each_block(h, qb, [&](index_t kb, bool) { r.push_back(kb); });
  return r;
}

bool contains(const std::vector<index_t>& v, index_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

template <class F>
void expect_invalid(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected sparse_attn::invalid_argument";
  } catch (const sa::invalid_argument& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message: " << msg;
  }
}

// Both lists of every (head, query block) and the pair counts are identical.
template <class A, class B>
void expect_same_mask(const A& a, const B& b) {
  ASSERT_EQ(a.pairs(), b.pairs());
  ASSERT_EQ(a.shape().heads, b.shape().heads);
  for (index_t h = 0; h < a.shape().heads; ++h)
    for (index_t qb = 0; qb < a.shape().num_q_blocks(); ++qb)
      ASSERT_EQ(blocks_of(a, h, qb), blocks_of(b, h, qb)) << "head " << h << " query block " << qb;
}

}  // namespace

// ===============================================================================================
// Shared selection helpers
// ===============================================================================================

TEST(Selection, TopKBreaksTiesTowardLowerIndex) {
  const std::vector<float> s = {1, 3, 3, 2, 3, 0};
  std::vector<std::int32_t> cand = {0, 1, 2, 3, 4, 5};
  sm::detail::keep_top_k(s.data(), cand, 2);
  EXPECT_EQ(cand, (std::vector<std::int32_t>{1, 2}));
  std::vector<std::int32_t> order;
  sm::detail::order_by_score(s.data(), 6, order);
  EXPECT_EQ(order, (std::vector<std::int32_t>{1, 2, 4, 3, 0, 5}));
}

TEST(Selection, MeanPoolAveragesOnlyRealRows) {
  // 5 tokens, block 3: blocks {0,1,2} and the partial {3,4}.
  std::vector<float> x = {1, 10, 2, 20, 3, 30, 7, 70, 9, 90};
  sa::TensorView<const float> v(x.data(), 1, 5, 2);
  std::vector<float> out(4), row;
  sm::detail::mean_pool(v, 0, 3, out.data(), row);
  EXPECT_FLOAT_EQ(out[0], 2.0f);
  EXPECT_FLOAT_EQ(out[1], 20.0f);
  EXPECT_FLOAT_EQ(out[2], 8.0f);
  EXPECT_FLOAT_EQ(out[3], 80.0f);
}

TEST(Selection, CausalPairsMatchesBruteForce) {
  for (index_t p0 = 0; p0 < 12; ++p0)
    for (index_t p1 = p0; p1 < 14; ++p1)
      for (index_t k0 = 0; k0 < 10; ++k0)
        for (index_t k1 = k0; k1 < 16; ++k1) {
          index_t brute = 0;
          for (index_t p = p0; p <= p1; ++p)
            for (index_t j = k0; j < k1; ++j) brute += j <= p;
          ASSERT_EQ(sm::detail::causal_pairs(p0, p1, k0, k1), brute);
        }
}

TEST(Selection, BudgetSearchPicksSmallestBudgetReachingTarget) {
  // pairs(x) = 10 x, dense = 1000: CR 4 needs 250 pairs -> x = 25; CR 3 -> 334 -> x = 34.
  auto pairs = [](index_t x) { return 10 * x; };
  bool reachable = false;
  EXPECT_EQ(sm::detail::budget_for_compression(1, 100, 1000, 4.0, pairs, reachable), 25);
  EXPECT_TRUE(reachable);
  EXPECT_EQ(sm::detail::budget_for_compression(1, 100, 1000, 3.0, pairs, reachable), 34);
  EXPECT_EQ(sm::detail::budget_for_compression(20, 100, 1000, 8.0, pairs, reachable), 20);
  EXPECT_FALSE(reachable);  // CR(20) = 5 < 8
}

// ===============================================================================================
// Block-sparse (METHODS.md 3)
// ===============================================================================================

TEST(BlockSparse, AlwaysKeepsSinkDiagonalAndPreviousBlocks) {
  Problem<float> p(2, 2, 1000, 1000, 16, 1);
  sm::BlockSparseOptions opt;
  opt.top_k = 1;  // forced blocks only
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  for (index_t h = 0; h < 2; ++h)
    for (index_t qb = 0; qb < m.shape().num_q_blocks(); ++qb) {
      const auto b = blocks_of(m, h, qb);
      EXPECT_TRUE(contains(b, 0));
      EXPECT_TRUE(contains(b, qb));
      if (qb >= 1) {
        EXPECT_TRUE(contains(b, qb - 1));
      }
      EXPECT_EQ(static_cast<index_t>(b.size()), std::min<index_t>(qb + 1, 3));
    }
}

TEST(BlockSparse, IsBlockCausalAndTokenCausal) {
  Problem<float> p(2, 1, 450, 450, 16, 2);
  sm::BlockSparseOptions opt;
  opt.compression = 2.0;
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  for (index_t h = 0; h < 2; ++h) {
    for (index_t qb = 0; qb < m.shape().num_q_blocks(); ++qb)
      for (index_t kb : blocks_of(m, h, qb)) EXPECT_LE(kb, qb);
    const auto dense = sa::to_dense(m, h);
    for (index_t i = 0; i < 450; ++i)
      for (index_t j = i + 1; j < 450; ++j) ASSERT_FALSE(dense(i, j));
  }
}

TEST(BlockSparse, KeepsKBlocksPerQueryBlockWithEarlyRowsDense) {
  Problem<float> p(3, 3, 64 * 12, 64 * 12, 16, 3);
  sm::BlockSparseOptions opt;
  opt.top_k = 5;
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  EXPECT_EQ(m.top_k, 5);
  for (index_t h = 0; h < 3; ++h)
    for (index_t qb = 0; qb < 12; ++qb)
      EXPECT_EQ(m.num_blocks(h, qb), std::min<index_t>(qb + 1, 5)) << "qb " << qb;
  EXPECT_EQ(m.pairs(), sm::block_sparse::pairs_for_k(m.shape(), 5));
}

TEST(BlockSparse, SelectsTheHighestScoringBlock) {
  Problem<float> p(1, 1, 64 * 10, 64 * 10, 16, 4);
  // Key block 4 aligned with every query: its pooled score dominates for query blocks >= 6.
  for (index_t j = 4 * 64; j < 5 * 64; ++j) {
    for (index_t c = 0; c < 16; ++c) {
      float mean = 0;
      for (index_t i = 0; i < p.n_q; ++i) mean += p.q[static_cast<std::size_t>(i * 16 + c)];
      p.k[static_cast<std::size_t>(j * 16 + c)] = 50.0f * mean / static_cast<float>(p.n_q);
    }
  }
  sm::BlockSparseOptions opt;
  opt.top_k = 4;
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  for (index_t qb = 6; qb < 10; ++qb) EXPECT_TRUE(contains(blocks_of(m, 0, qb), 4)) << qb;
}

TEST(BlockSparse, PairCountMatchesFormulaIncludingUnalignedSuffix) {
  Problem<float> p(2, 1, 300, 777, 16, 5);  // queries start at position 477 (not block-aligned)
  for (index_t k : {1, 2, 3, 4, 6, 13}) {
    sm::BlockSparseOptions opt;
    opt.top_k = k;
    const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
    EXPECT_EQ(m.pairs(), sm::block_sparse::pairs_for_k(m.shape(), k)) << "k " << k;
    EXPECT_EQ(m.pairs(), sa::count_pairs(m));
  }
}

TEST(BlockSparse, TopKAtLeastBlockCountIsDense) {
  Problem<float> p(2, 2, 500, 500, 16, 6);
  sm::BlockSparseOptions opt;
  opt.top_k = 8;  // ceil(500 / 64) = 8
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  EXPECT_EQ(m.pairs(), m.shape().dense_pairs());
  EXPECT_DOUBLE_EQ(m.compression(), 1.0);
}

TEST(BlockSparse, CompressionOneMatchesDenseKernel) {
  Problem<float> p(4, 2, 333, 333, 32, 7);
  sm::BlockSparseOptions opt;
  opt.compression = 1.0;
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  EXPECT_EQ(m.pairs(), m.shape().dense_pairs());
  EXPECT_TRUE(m.reachable);
  const auto dense = run_kernel(p, sm::dense(4, 333, 333));
  EXPECT_LT(rel_l2(run_kernel(p, m), dense), 1e-5);
}

TEST(BlockSparse, AchievedCompressionWithinTenPercentOfTarget) {
  Problem<float> p(2, 2, 4096, 4096, 16, 8);
  for (double target : {8.0, 10.0}) {
    sm::BlockSparseOptions opt;
    opt.compression = target;
    const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
    EXPECT_TRUE(m.reachable);
    EXPECT_DOUBLE_EQ(m.target_compression, target);
    EXPECT_NEAR(m.compression() / target, 1.0, 0.1) << "target " << target;
    EXPECT_LE(m.compression(), target);
    EXPECT_DOUBLE_EQ(m.compression(), sa::compression_ratio(m.shape().dense_pairs(), m.pairs()));
  }
}

TEST(BlockSparse, UnreachableTargetClampsToSparsestAndSaysSo) {
  Problem<float> p(1, 1, 2048, 2048, 16, 9);
  sm::BlockSparseOptions opt;
  opt.compression = 20.0;
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  EXPECT_FALSE(m.reachable);
  EXPECT_EQ(m.top_k, 3);
  EXPECT_NEAR(m.compression(), 6.6, 0.1);  // METHODS.md: n = 2048, b = 64 caps at 6.6x
  EXPECT_DOUBLE_EQ(m.target_compression, 20.0);
}

TEST(BlockSparse, SelectionIsDeterministic) {
  Problem<sa::bf16> p(4, 2, 900, 900, 32, 10);
  sm::BlockSparseOptions opt;
  opt.compression = 3.0;
  const auto a = sm::block_sparse::select(p.qv(), p.kv(), opt);
  opt.num_threads = 1;
  const auto b = sm::block_sparse::select(p.qv(), p.kv(), opt);
  expect_same_mask(a, b);
}

TEST(BlockSparse, KernelMatchesOracleFp32Bf16Fp16WithGqa) {
  {
    Problem<float> p(4, 4, 517, 517, 32, 11);
    sm::BlockSparseOptions opt;
    opt.compression = 2.0;
    expect_matches_oracle(p, sm::block_sparse::select(p.qv(), p.kv(), opt));
  }
  {
    Problem<sa::bf16> p(4, 1, 389, 389, 32, 12);
    sm::BlockSparseOptions opt;
    opt.top_k = 3;
    opt.block = 32;
    expect_matches_oracle(p, sm::block_sparse::select(p.qv(), p.kv(), opt));
  }
  {
    Problem<sa::fp16> p(4, 2, 271, 271, 32, 17);
    sm::BlockSparseOptions opt;
    opt.top_k = 3;
    expect_matches_oracle(p, sm::block_sparse::select(p.qv(), p.kv(), opt));
  }
}

TEST(BlockSparse, SuffixQueriesMatchOracle) {
  Problem<float> p(4, 1, 211, 603, 32, 13);
  sm::BlockSparseOptions opt;
  opt.top_k = 4;
  const auto m = sm::block_sparse::select(p.qv(), p.kv(), opt);
  expect_matches_oracle(p, m);
}

TEST(BlockSparse, AcceptsStridedTokenMajorViews) {
  // The same data viewed token-major ([n, H, d]) selects the same mask.
  Problem<float> p(2, 2, 300, 300, 16, 14);
  std::vector<float> qt(p.q.size()), kt(p.k.size());
  for (index_t h = 0; h < 2; ++h)
    for (index_t t = 0; t < 300; ++t)
      for (index_t c = 0; c < 16; ++c) {
        qt[static_cast<std::size_t>((t * 2 + h) * 16 + c)] =
            p.q[static_cast<std::size_t>((h * 300 + t) * 16 + c)];
        kt[static_cast<std::size_t>((t * 2 + h) * 16 + c)] =
            p.k[static_cast<std::size_t>((h * 300 + t) * 16 + c)];
      }
  sm::BlockSparseOptions opt;
  opt.top_k = 3;
  const auto a = sm::block_sparse::select(p.qv(), p.kv(), opt);
  const auto b = sm::block_sparse::select(
      sa::TensorView<const float>::token_major(qt.data(), 2, 300, 16),
      sa::TensorView<const float>::token_major(kt.data(), 2, 300, 16), opt);
  expect_same_mask(a, b);
}

TEST(BlockSparse, RejectsInvalidOptions) {
  Problem<float> p(1, 1, 100, 100, 8, 15);
  auto sel = [&](sm::BlockSparseOptions o) { (void)sm::block_sparse::select(p.qv(), p.kv(), o); };
  sm::BlockSparseOptions o;
  o.compression = 0.5;
  expect_invalid([&] { sel(o); }, {"compression", ">= 1", "0.5"});
  o.compression = std::nan("");
  expect_invalid([&] { sel(o); }, {"compression", "finite"});
  o = {};
  o.block = 0;
  expect_invalid([&] { sel(o); }, {"block", ">= 1"});
  o = {};
  o.top_k = -2;
  expect_invalid([&] { sel(o); }, {"top_k", ">= 0"});
  Problem<float> bad(3, 2, 10, 10, 8, 16);  // Hq % Hkv != 0
  expect_invalid([&] { (void)sm::block_sparse::select(bad.qv(), bad.kv()); }, {"Hq=3", "Hkv=2"});
}

// ===============================================================================================
// Vertical-Slash (METHODS.md 4)
// ===============================================================================================

namespace {
sm::VerticalSlashOptions vs_options(index_t v, index_t s) {
  sm::VerticalSlashOptions o;
  o.vertical = v;
  o.slash = s;
  return o;
}
}  // namespace

TEST(VerticalSlash, AlwaysKeepsSinksAndLocalBand) {
  Problem<float> p(2, 1, 700, 700, 16, 20);
  const auto m = sm::vertical_slash::select_exact(p.qv(), p.kv(), vs_options(4, 64));
  for (index_t h = 0; h < 2; ++h) {
    const auto d = sa::to_dense(m, h);
    for (index_t i = 0; i < 700; ++i) {
      for (index_t j = std::max<index_t>(0, i - 63); j <= i; ++j)
        ASSERT_TRUE(d(i, j)) << i << "," << j;
      for (index_t j = 0; j < std::min<index_t>(4, i + 1); ++j)
        ASSERT_TRUE(d(i, j)) << i << "," << j;
      ASSERT_EQ(d.row(i).count(),
                std::min<index_t>(i + 1, 64 + std::max<index_t>(0, std::min<index_t>(4, i - 63))));
    }
  }
}

TEST(VerticalSlash, ExactMaskFollowsDefinitionAndListsOnlyUsedBlocks) {
  Problem<float> p(2, 2, 455, 455, 16, 21);
  const auto m = sm::vertical_slash::select_exact(p.qv(), p.kv(), vs_options(37, 90));
  const auto& pred = m.predicate();
  for (index_t h = 0; h < 2; ++h) {
    index_t cols = 0, offs = 0;
    for (index_t j = 0; j < 455; ++j) {
      cols += pred.is_column(h, j);
      offs += pred.is_offset(h, j);
    }
    EXPECT_EQ(cols, 37);
    EXPECT_EQ(offs, 90);
    const auto d = sa::to_dense(m, h);
    for (index_t i = 0; i < 455; ++i)
      for (index_t j = 0; j < 455; ++j)
        ASSERT_EQ(d(i, j), j <= i && (pred.is_column(h, j) || pred.is_offset(h, i - j)));
    for (index_t qb = 0; qb < m.shape().num_q_blocks(); ++qb)
      for (index_t kb : blocks_of(m, h, qb)) {
        bool any = false;
        for (index_t i = qb * 64; i < std::min<index_t>(455, qb * 64 + 64); ++i)
          for (index_t j = kb * 64; j < std::min<index_t>(455, kb * 64 + 64); ++j)
            any = any || d(i, j);
        EXPECT_TRUE(any) << "listed block without an allowed element: " << qb << "," << kb;
      }
  }
}

TEST(VerticalSlash, TiledContainsExact) {
  Problem<float> p(4, 2, 611, 611, 16, 22);
  const auto opt = vs_options(40, 100);
  const auto exact = sm::vertical_slash::select_exact(p.qv(), p.kv(), opt);
  const auto tiled = sm::vertical_slash::select_tiled(p.qv(), p.kv(), opt);
  EXPECT_GE(tiled.pairs(), exact.pairs());
  for (index_t h = 0; h < 4; ++h) {
    const auto de = sa::to_dense(exact, h), dt = sa::to_dense(tiled, h);
    for (index_t i = 0; i < 611; ++i)
      for (index_t j = 0; j <= i; ++j)
        ASSERT_TRUE(!de(i, j) || dt(i, j)) << h << ":" << i << "," << j;
    for (index_t qb = 0; qb < exact.shape().num_q_blocks(); ++qb)
      EXPECT_EQ(blocks_of(exact, h, qb), blocks_of(tiled, h, qb));
  }
}

TEST(VerticalSlash, FullBudgetIsDense) {
  Problem<float> p(2, 1, 300, 300, 16, 23);
  const auto e = sm::vertical_slash::select_exact(p.qv(), p.kv(), vs_options(300, 300));
  const auto t = sm::vertical_slash::select_tiled(p.qv(), p.kv(), vs_options(5000, 9000));
  EXPECT_EQ(e.pairs(), e.shape().dense_pairs());
  EXPECT_EQ(t.pairs(), t.shape().dense_pairs());
  EXPECT_EQ(t.vertical, 300);
}

TEST(VerticalSlash, PicksPlantedHeavyColumn) {
  Problem<float> p(2, 2, 800, 800, 16, 24);
  p.plant_column(333, 40.0f);
  const auto m = sm::vertical_slash::select_exact(p.qv(), p.kv(), vs_options(5, 64));
  for (index_t h = 0; h < 2; ++h) EXPECT_TRUE(m.predicate().is_column(h, 333));
}

TEST(VerticalSlash, CompressionOneMatchesDenseKernel) {
  Problem<float> p(4, 1, 321, 321, 32, 25);
  sm::VerticalSlashOptions opt;
  opt.compression = 1.0;
  const auto dense = run_kernel(p, sm::dense(4, 321, 321));
  const auto e = sm::vertical_slash::select_exact(p.qv(), p.kv(), opt);
  const auto t = sm::vertical_slash::select_tiled(p.qv(), p.kv(), opt);
  EXPECT_EQ(e.pairs(), e.shape().dense_pairs());
  EXPECT_EQ(t.pairs(), t.shape().dense_pairs());
  EXPECT_LT(rel_l2(run_kernel(p, e), dense), 1e-5);
  EXPECT_LT(rel_l2(run_kernel(p, t), dense), 1e-5);
}

TEST(VerticalSlash, AchievedCompressionWithinTenPercentOfTarget) {
  {
    Problem<float> p(2, 1, 4096, 4096, 16, 26);
    for (double target : {4.0, 10.0}) {
      sm::VerticalSlashOptions opt;
      opt.compression = target;
      const auto m = sm::vertical_slash::select_exact(p.qv(), p.kv(), opt);
      EXPECT_TRUE(m.reachable);
      EXPECT_TRUE(m.vertical == m.slash ||
                  (m.slash == 64 && m.vertical < 64));  // V = max(4, x), S = max(64, x)
      EXPECT_NEAR(m.compression() / target, 1.0, 0.1) << "exact, target " << target;
    }
  }
  {
    // Tiled steps are whole blocks per query tile: n = 8192 keeps one step under 10% at CR 10.
    Problem<float> p(2, 1, 8192, 8192, 16, 27);
    sm::VerticalSlashOptions opt;
    opt.compression = 10.0;
    const auto m = sm::vertical_slash::select_tiled(p.qv(), p.kv(), opt);
    EXPECT_TRUE(m.reachable);
    EXPECT_NEAR(m.compression() / 10.0, 1.0, 0.1) << "tiled";
  }
}

TEST(VerticalSlash, UnreachableTargetClampsToForcedSetsAndSaysSo) {
  Problem<float> p(1, 1, 2048, 2048, 16, 28);
  sm::VerticalSlashOptions opt;
  opt.compression = 30.0;  // the forced band alone is ~n / 128 = 16x
  const auto m = sm::vertical_slash::select_exact(p.qv(), p.kv(), opt);
  EXPECT_FALSE(m.reachable);
  EXPECT_EQ(m.vertical, 4);
  EXPECT_EQ(m.slash, 64);
  EXPECT_LT(m.compression(), 30.0);
  EXPECT_GT(m.compression(), 10.0);
}

TEST(VerticalSlash, SelectionIsDeterministic) {
  Problem<sa::bf16> p(4, 2, 777, 777, 32, 29);
  sm::VerticalSlashOptions opt;
  opt.compression = 2.0;
  const auto a = sm::vertical_slash::select_exact(p.qv(), p.kv(), opt);
  opt.num_threads = 1;
  const auto b = sm::vertical_slash::select_exact(p.qv(), p.kv(), opt);
  expect_same_mask(a, b);
  EXPECT_EQ(a.predicate().columns, b.predicate().columns);
  EXPECT_EQ(a.predicate().offsets, b.predicate().offsets);
}

TEST(VerticalSlash, KernelMatchesOracleExactAndTiled) {
  {
    Problem<float> p(4, 4, 389, 389, 32, 30);
    const auto opt = vs_options(20, 80);
    expect_matches_oracle(p, sm::vertical_slash::select_exact(p.qv(), p.kv(), opt));
    expect_matches_oracle(p, sm::vertical_slash::select_tiled(p.qv(), p.kv(), opt));
  }
  {
    Problem<sa::bf16> p(4, 1, 555, 555, 32, 31);
    sm::VerticalSlashOptions opt;
    opt.compression = 2.0;
    expect_matches_oracle(p, sm::vertical_slash::select_exact(p.qv(), p.kv(), opt));
    expect_matches_oracle(p, sm::vertical_slash::select_tiled(p.qv(), p.kv(), opt));
  }
  {
    Problem<float> p(4, 2, 150, 431, 32, 32);  // suffix queries
    const auto opt = vs_options(10, 70);
    expect_matches_oracle(p, sm::vertical_slash::select_exact(p.qv(), p.kv(), opt));
  }
}

TEST(VerticalSlash, RejectsInvalidOptions) {
  Problem<float> p(1, 1, 100, 100, 8, 33);
  auto sel = [&](sm::VerticalSlashOptions o) {
    (void)sm::vertical_slash::select_exact(p.qv(), p.kv(), o);
  };
  expect_invalid([&] { sel(vs_options(3, 100)); }, {"vertical", "sink_columns"});
  expect_invalid([&] { sel(vs_options(10, 63)); }, {"slash", "local_offsets"});
  sm::VerticalSlashOptions o;
  o.compression = 0.9;
  expect_invalid([&] { sel(o); }, {"compression", ">= 1"});
  o = {};
  o.compression = INFINITY;
  expect_invalid([&] { sel(o); }, {"compression", "finite"});
  o = {};
  o.last_queries = 0;
  expect_invalid([&] { sel(o); }, {"last_queries"});
  o = {};
  o.scale = -1.0f;
  expect_invalid([&] { sel(o); }, {"scale"});
}

// ===============================================================================================
// FlexPrefill (METHODS.md 5)
// ===============================================================================================

namespace {
sm::FlexPrefillOptions flex_options(double gamma, double tau, index_t block, index_t min_budget) {
  sm::FlexPrefillOptions o;
  o.gamma = gamma;
  o.tau = tau;
  o.block = block;
  o.last_queries = block;
  o.min_budget = min_budget;
  return o;
}
}  // namespace

TEST(FlexPrefill, GammaOneIsDense) {
  Problem<float> p(2, 1, 700, 700, 16, 40);
  const auto m = sm::flex_prefill::select(p.qv(), p.kv(), flex_options(1.0, 0.1, 64, 64));
  EXPECT_EQ(m.pairs(), m.shape().dense_pairs());
  EXPECT_TRUE(std::isnan(m.target_compression));
  EXPECT_LT(rel_l2(run_kernel(p, m), run_kernel(p, sm::dense(2, 700, 700))), 1e-5);
}

TEST(FlexPrefill, KeepsFirstColumnBlockAndDiagonalAndIsBlockCausal) {
  Problem<float> p(4, 2, 1000, 1000, 16, 41);
  p.plant_column(500, 30.0f);
  for (double tau : {0.0, 1.0}) {
    const auto m = sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.5, tau, 64, 64));
    for (index_t h = 0; h < 4; ++h)
      for (index_t qb = 0; qb < m.shape().num_q_blocks(); ++qb) {
        const auto b = blocks_of(m, h, qb);
        EXPECT_TRUE(contains(b, 0));
        EXPECT_TRUE(contains(b, qb));
        for (index_t kb : b) EXPECT_LE(kb, qb);
      }
    EXPECT_LT(m.pairs(), m.shape().dense_pairs());
  }
}

TEST(FlexPrefill, TauDecidesQueryAwareHeads) {
  Problem<float> p(4, 2, 900, 900, 16, 42);
  const auto none = sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.9, 0.0, 64, 64));
  const auto all = sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.9, 1.0, 64, 64));
  for (index_t h = 0; h < 4; ++h) {
    EXPECT_EQ(none.query_aware[static_cast<std::size_t>(h)], 0);
    EXPECT_EQ(all.query_aware[static_cast<std::size_t>(h)], 1);  // sqrt(JS) <= sqrt(ln 2) < 1
    EXPECT_EQ(all.vertical_blocks[static_cast<std::size_t>(h)], 1);
    EXPECT_GE(none.js_distance[static_cast<std::size_t>(h)], 0.0f);
    EXPECT_LE(none.js_distance[static_cast<std::size_t>(h)], 0.833f);
  }
}

TEST(FlexPrefill, VerticalSlashHeadsKeepPlantedColumnBlock) {
  Problem<float> p(2, 2, 1024, 1024, 16, 43);
  p.plant_column(300, 60.0f);  // key block 4 of 64
  // The column holds most of the mass, so the budget is floor(1 / 64) + 1 = 1 block, which forced
  // block 0 takes (as in the original); min_budget = 2 blocks leaves room for block 4.
  const auto m = sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.5, 0.0, 64, 128));
  EXPECT_EQ(m.vertical_blocks[0], 2);
  for (index_t h = 0; h < 2; ++h)
    for (index_t qb = 5; qb < 16; ++qb)
      EXPECT_TRUE(contains(blocks_of(m, h, qb), 4)) << h << "," << qb;
}

TEST(FlexPrefill, BudgetsClampToSequenceLength) {
  // n < min_budget and n < w (the reference crashes here): every budget clamps to the blocks.
  Problem<float> p(2, 1, 100, 100, 16, 44);
  const auto m = sm::flex_prefill::select(p.qv(), p.kv());  // defaults: B = 128, min_budget 512
  EXPECT_EQ(m.vertical_blocks[0], 1);
  EXPECT_EQ(m.pairs(), m.shape().dense_pairs());
  Problem<float> q(2, 2, 300, 300, 16, 45);
  const auto m2 = sm::flex_prefill::select(q.qv(), q.kv(), flex_options(0.9, 0.1, 64, 100000));
  for (index_t h = 0; h < 2; ++h) EXPECT_EQ(m2.vertical_blocks[static_cast<std::size_t>(h)], 5);
  EXPECT_EQ(m2.pairs(), m2.shape().dense_pairs());
}

TEST(FlexPrefill, SelectionIsDeterministic) {
  Problem<sa::bf16> p(4, 1, 1100, 1100, 32, 46);
  p.plant_column(10, 20.0f);
  const auto opt = flex_options(0.7, 0.1, 64, 64);
  const auto a = sm::flex_prefill::select(p.qv(), p.kv(), opt);
  auto opt1 = opt;
  opt1.num_threads = 1;
  const auto b = sm::flex_prefill::select(p.qv(), p.kv(), opt1);
  expect_same_mask(a, b);
  EXPECT_EQ(a.query_aware, b.query_aware);
}

TEST(FlexPrefill, KernelMatchesOracle) {
  {
    Problem<float> p(4, 4, 601, 601, 32, 47);
    p.plant_column(77, 20.0f);
    expect_matches_oracle(p,
                          sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.6, 0.0, 64, 64)));
    expect_matches_oracle(p,
                          sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.6, 1.0, 64, 64)));
  }
  {
    Problem<sa::bf16> p(4, 1, 513, 513, 32, 48);
    expect_matches_oracle(
        p, sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.5, 0.1, 128, 128)));
  }
  {
    Problem<float> p(4, 2, 230, 650, 32, 52);  // suffix queries, not block-aligned
    p.plant_column(400, 20.0f);
    expect_matches_oracle(p,
                          sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.5, 0.0, 64, 64)));
    expect_matches_oracle(p,
                          sm::flex_prefill::select(p.qv(), p.kv(), flex_options(0.5, 1.0, 64, 64)));
  }
}

TEST(FlexPrefill, RejectsInvalidOptions) {
  Problem<float> p(1, 1, 100, 100, 8, 49);
  auto sel = [&](sm::FlexPrefillOptions o) { (void)sm::flex_prefill::select(p.qv(), p.kv(), o); };
  expect_invalid([&] { sel(flex_options(0.0, 0.1, 64, 64)); }, {"gamma", "> 0"});
  expect_invalid([&] { sel(flex_options(std::nan(""), 0.1, 64, 64)); }, {"gamma"});
  expect_invalid([&] { sel(flex_options(0.9, -0.1, 64, 64)); }, {"tau", ">= 0"});
  expect_invalid([&] { sel(flex_options(0.9, 0.1, 0, 64)); }, {"block", ">= 1"});
  expect_invalid([&] { sel(flex_options(0.9, 0.1, 64, -1)); }, {"min_budget", ">= 0"});
}

TEST(PrefillMethods, EmptyQueriesGiveEmptyMasks) {
  Problem<float> p(2, 1, 0, 100, 8, 53);
  sm::BlockSparseOptions bo;
  const auto b = sm::block_sparse::select(p.qv(), p.kv(), bo);
  sm::VerticalSlashOptions vo;
  vo.compression = 10.0;
  const auto v = sm::vertical_slash::select_tiled(p.qv(), p.kv(), vo);
  const auto f = sm::flex_prefill::select(p.qv(), p.kv());
  EXPECT_EQ(b.pairs(), 0);
  EXPECT_EQ(v.pairs(), 0);
  EXPECT_EQ(f.pairs(), 0);
  EXPECT_TRUE(b.reachable);
  EXPECT_TRUE(v.reachable);
}

// ===============================================================================================
// User block masks
// ===============================================================================================

namespace {
// 2 heads, 200 queries and keys, blocks of 64: 4 query blocks, 4 key blocks.
sa::MaskShape user_shape(bool causal = true) { return sa::MaskShape{2, 200, 200, 64, 64, causal}; }
// Head-shared rows: qb0 {0}, qb1 {0, 1}, qb2 {0, 2}, qb3 {1, 3}.
std::vector<index_t> shared_offsets() { return {0, 1, 3, 5, 7}; }
std::vector<std::int32_t> shared_cols() { return {0, 0, 1, 0, 2, 1, 3}; }
}  // namespace

TEST(UserMask, AcceptsSharedLayoutAndMatchesItsBlocks) {
  const auto m = sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), shared_cols());
  EXPECT_TRUE(m.head_shared());
  EXPECT_EQ(blocks_of(m, 0, 3), (std::vector<index_t>{1, 3}));
  const auto d = sa::to_dense(m, 1);
  EXPECT_TRUE(d(199, 64));
  EXPECT_FALSE(d(199, 0));
  EXPECT_TRUE(d(150, 150));
  EXPECT_FALSE(d(150, 151));
  EXPECT_EQ(m.pairs(), sa::count_pairs(m));
}

TEST(UserMask, AcceptsPerHeadLayoutWithInt32Offsets) {
  std::vector<std::int32_t> off = {0, 1, 2, 3, 4, 5, 7, 9, 12};
  std::vector<std::int32_t> col = {0, 1, 2, 3, 0, 0, 1, 1, 2, 0, 1, 3};
  sm::BlockCsr<std::int32_t, std::int32_t> csr;
  csr.row_offsets = off;
  csr.col_indices = col;
  const auto m = sm::user_mask::from_bsr(user_shape(), csr);
  EXPECT_FALSE(m.head_shared());
  EXPECT_EQ(blocks_of(m, 0, 2), (std::vector<index_t>{2}));
  EXPECT_EQ(blocks_of(m, 1, 3), (std::vector<index_t>{0, 1, 3}));
}

TEST(UserMask, RejectsUnsortedColumns) {
  auto cols = shared_cols();
  std::swap(cols[5], cols[6]);  // qb3: {3, 1}
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), cols); },
                 {"col_indices[6] = 1", "sorted ascending", "query block 3"});
}

TEST(UserMask, RejectsDuplicateColumns) {
  auto cols = shared_cols();
  cols[4] = 0;  // qb2: {0, 0}
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), cols); },
                 {"col_indices[4] = 0", "unique"});
}

TEST(UserMask, RejectsOutOfRangeColumn) {
  auto cols = shared_cols();
  cols[6] = 4;
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), cols); },
                 {"col_indices[6] = 4", "[0, 4)"});
  cols[6] = -1;
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), cols); },
                 {"col_indices[6] = -1", "out of range"});
}

TEST(UserMask, RejectsFutureBlockWhenCausalAcceptsItWhenNot) {
  auto cols = shared_cols();
  cols[2] = 2;  // qb1: {0, 2}
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), cols); },
                 {"col_indices[2] = 2", "causal", "[0, 1]"});
  const auto m = sm::user_mask::from_bsr(user_shape(false), true, shared_offsets(), cols);
  EXPECT_EQ(blocks_of(m, 0, 1), (std::vector<index_t>{0, 2}));
}

TEST(UserMask, RejectsNonMonotoneOffsets) {
  std::vector<index_t> off = {0, 3, 1, 5, 7};
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, off, shared_cols()); },
                 {"row_offsets", "non-decreasing", "row_offsets[2] = 1"});
}

TEST(UserMask, RejectsWrongOffsetCount) {
  expect_invalid(
      [&] { (void)sm::user_mask::from_bsr(user_shape(), false, shared_offsets(), shared_cols()); },
      {"row_offsets has 5 entries", "expected rows + 1 = 9"});
}

TEST(UserMask, RejectsOffsetsInconsistentWithIndices) {
  std::vector<index_t> off = {0, 1, 3, 5, 6};
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, off, shared_cols()); },
                 {"row_offsets[4] = 6", "size of col_indices (7)"});
  std::vector<index_t> off2 = {1, 1, 3, 5, 7};
  expect_invalid([&] { (void)sm::user_mask::from_bsr(user_shape(), true, off2, shared_cols()); },
                 {"row_offsets[0] must be 0"});
}

TEST(UserMask, RejectsFlagCountMismatch) {
  expect_invalid(
      [&] {
        (void)sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), shared_cols(),
                                      std::vector<std::uint8_t>(3, 1));
      },
      {"full has 3 flags", "one per col_indices entry (7)"});
}

namespace {
// Allows even keys only (an engine's element mask for partial blocks).
struct EvenKeys {
  bool operator()(index_t, index_t, index_t kj) const { return kj % 2 == 0; }
};
}  // namespace

TEST(UserMask, PartialBlocksUsePredicateFullBlocksSkipIt) {
  // qb3 {1 (full), 3 (partial)}; other rows partial.
  std::vector<std::uint8_t> full = {0, 0, 0, 0, 0, 1, 0};
  const auto m = sm::user_mask::from_bsr(user_shape(), true, shared_offsets(), shared_cols(), full,
                                         EvenKeys{});
  const auto d = sa::to_dense(m, 0);
  EXPECT_TRUE(d(199, 65));    // block 1 is full: odd key allowed
  EXPECT_FALSE(d(199, 193));  // block 3 is partial: odd key rejected
  EXPECT_TRUE(d(199, 192));
  EXPECT_FALSE(d(10, 1));
  EXPECT_EQ(m.pairs(), sa::count_pairs(m));
  Problem<float> p(2, 1, 200, 200, 16, 50);
  expect_matches_oracle(p, m);
}

TEST(UserMask, KernelMatchesOracle) {
  std::vector<std::int32_t> off = {0, 1, 2, 3, 4, 5, 7, 9, 12};
  std::vector<std::int32_t> col = {0, 1, 2, 3, 0, 0, 1, 1, 2, 0, 1, 3};
  sm::BlockCsr<std::int32_t, std::int32_t> csr;
  csr.row_offsets = off;
  csr.col_indices = col;
  Problem<sa::bf16> p(2, 2, 200, 200, 32, 51);
  expect_matches_oracle(p, sm::user_mask::from_bsr(user_shape(), csr));
}
