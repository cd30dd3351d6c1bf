// Core kernels against the double-precision oracle (reference.hpp) on materialised masks, plus the
// stated invariants of the mask interface, merge_states and validation.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cmath>
#include <random>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <type_traits>
#include <vector>

using namespace sparse_attn;

namespace {

// Random tensor storage [heads, tokens, dim] in type T, optionally laid out token-major.
template <class T>
struct Tensor {
  index_t h, n, d;
  bool token_major;
  std::vector<T> data;
  Tensor(index_t h_, index_t n_, index_t d_, std::mt19937& rng, float sigma = 1.0f, bool tm = false)
      : h(h_), n(n_), d(d_), token_major(tm), data(static_cast<std::size_t>(h_ * n_ * d_)) {
    std::normal_distribution<float> nd(0.0f, sigma);
    for (auto& x : data) x = T(nd(rng));
  }
  TensorView<const T> view() const {
    return token_major ? TensorView<const T>::token_major(data.data(), h, n, d)
                       : TensorView<const T>(data.data(), h, n, d);
  }
};

struct Out {
  std::vector<float> o, lse;
  index_t h, n, d;
  Out(index_t h_, index_t n_, index_t d_)
      : o(static_cast<std::size_t>(h_ * n_ * d_), -7.0f), lse(static_cast<std::size_t>(h_ * n_), -7.0f), h(h_), n(n_), d(d_) {}
  TensorView<float> view() { return TensorView<float>(o.data(), h, n, d); }
  LseView lse_view() { return LseView(lse.data(), n); }
};

// Max |kernel - oracle| relative to the largest oracle magnitude (>= 1), and LSE agreement.
void expect_close(const Out& got, const reference::Result& want, double tol, const std::string& what) {
  double scale = 1.0, err = 0.0;
  for (double x : want.out) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < got.o.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got.o[i])) << what << " non-finite output at " << i;
    err = std::max(err, std::abs(got.o[i] - want.out[i]));
  }
  EXPECT_LE(err / scale, tol) << what;
  for (std::size_t i = 0; i < got.lse.size(); ++i) {
    if (std::isinf(want.lse[i])) {
      EXPECT_TRUE(std::isinf(got.lse[i]) && got.lse[i] < 0) << what << " lse row " << i;
    } else {
      EXPECT_NEAR(got.lse[i], want.lse[i], tol * std::max(1.0, std::abs(want.lse[i]))) << what << " lse row " << i;
    }
  }
}

template <class T>
double storage_tol() {
  return 2e-5;  // oracle reads the same stored values, so only fp32 accumulation differs
}

struct PrefillCase {
  index_t hq, hkv, n_q, n_k, d;
  bool causal;
  index_t window, sinks;
  bool token_major;
};

template <class TKV>
void check_prefill(const PrefillCase& c, index_t block = 64, int threads = 0) {
  std::mt19937 rng(static_cast<unsigned>(c.n_q * 131 + c.n_k * 7 + c.d + c.hq));
  Tensor<float> q(c.hq, c.n_q, c.d, rng);
  Tensor<TKV> k(c.hkv, c.n_k, c.d, rng, 1.0f, c.token_major), v(c.hkv, c.n_k, c.d, rng, 1.0f, c.token_major);
  const IntervalMask mask =
      c.window ? IntervalMask(MaskShape{c.hq, c.n_q, c.n_k, block, block, c.causal}, c.window, c.sinks)
               : (c.causal ? masks::causal(c.hq, c.n_q, c.n_k, block)
                          : masks::full(c.hq, c.n_q, c.n_k, block));
  Out out(c.hq, c.n_q, c.d);
  AttentionOptions opt;
  opt.lse = out.lse_view();
  opt.num_threads = threads;
  prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
  const auto want = reference::attention_masked(q.view(), k.view(), v.view(), 1.0 / std::sqrt(double(c.d)), mask);
  expect_close(out, want, storage_tol<TKV>(),
               std::string(dtype_name<TKV>()) + " hq=" + std::to_string(c.hq) + " hkv=" + std::to_string(c.hkv) +
                   " n_q=" + std::to_string(c.n_q) + " n_k=" + std::to_string(c.n_k) + " d=" + std::to_string(c.d) +
                   " causal=" + std::to_string(c.causal) + " window=" + std::to_string(c.window));
}

}  // namespace

// ---------------------------------------------------------------- masks

TEST(Mask, IntervalPairsMatchDenseExport) {
  for (bool causal : {true, false})
    for (index_t w : {0, 1, 5, 64, 100})
      for (auto [nq, nk] : std::vector<std::pair<index_t, index_t>>{{1, 1}, {63, 63}, {65, 130}, {200, 200}}) {
        const IntervalMask m(MaskShape{2, nq, nk, 32, 16, causal}, w, 3);
        const auto dense = to_dense(m, 0);
        EXPECT_EQ(m.pairs(), 2 * static_cast<index_t>(dense.count()));
        EXPECT_EQ(m.pairs(), count_pairs(m));
        for (index_t i = 0; i < nq; ++i)
          for (index_t j = 0; j < nk; ++j) ASSERT_EQ(dense(i, j), m.allowed(0, i, j)) << i << "," << j;
      }
}

TEST(Mask, CausalDenseHasCompressionOne) {
  const IntervalMask m = masks::causal(4, 100, 300);
  EXPECT_EQ(m.pairs(), 4 * (100 * 201 + 100 * 99 / 2));
  EXPECT_DOUBLE_EQ(m.compression(), 1.0);
}

TEST(Mask, SlidingWindowBeyondLengthIsDense) {
  const IntervalMask a = masks::sliding_window(1, 128, 128, 128, 4, 64);
  const IntervalMask b = masks::causal(1, 128, 128);
  EXPECT_EQ(a.pairs(), b.pairs());
}

TEST(Mask, PairCountsAre64BitAtLongContext) {
  // n = 131072: dense causal pairs = n(n+1)/2 ~ 8.6e9 > 2^31; sliding window counted per row.
  const index_t n = 131072;
  const IntervalMask dense = masks::causal(1, n, n);
  EXPECT_EQ(dense.pairs(), n * (n + 1) / 2);
  const IntervalMask sw = masks::sliding_window(32, n, n, 1024, 4);
  index_t want = 0;
  // band [p-1023, p] plus the sinks {0..3} not already in the band
  for (index_t p = 0; p < n; ++p) want += std::min<index_t>(p + 1, 1024) + std::min<index_t>(4, std::max<index_t>(0, p - 1023));
  EXPECT_EQ(sw.pairs(), 32 * want);
  EXPECT_GT(sw.pairs(), index_t{1} << 31);
}

TEST(Mask, BlockListBuilderRejectsBadLists) {
  const MaskShape s{2, 128, 128, 32, 32, true};
  {
    BlockListBuilder b(s, false);
    b.add(0, 1, 1);
    b.add(0, 1, 0);
    EXPECT_THROW(b.build(), sparse_attn::invalid_argument);  // unsorted
  }
  {
    BlockListBuilder b(s, false);
    b.add(0, 0, 4);
    EXPECT_THROW(b.build(), sparse_attn::invalid_argument);  // out of range
  }
  {
    BlockListBuilder b(s, false);
    b.add(1, 0, 2);
    EXPECT_THROW(b.build(), sparse_attn::invalid_argument);  // future block under causal
  }
  {
    BlockListBuilder b(s, false);
    EXPECT_THROW(b.add(2, 0, 0), sparse_attn::invalid_argument);  // head out of range
  }
  try {
    BlockListBuilder b(s, false);
    b.add(0, 1, 1);
    b.add(0, 1, 1);
    b.build();
    FAIL() << "duplicate accepted";
  } catch (const sparse_attn::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("strictly increasing"), std::string::npos) << e.what();
  }
}

TEST(Mask, BlockListDiagonalBlocksBecomePartial) {
  const MaskShape s{1, 64, 64, 32, 32, true};
  BlockListBuilder b(s, true);
  b.add(0, 1, 0, true);
  b.add(0, 1, 1, true);  // diagonal: causality cuts it
  const auto m = b.build();
  std::vector<std::pair<index_t, bool>> seen;
  m.for_each_block(0, 1, [&](index_t kb, bool full) { seen.push_back({kb, full}); });
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_TRUE(seen[0].second);
  EXPECT_FALSE(seen[1].second);
  EXPECT_EQ(m.pairs(), 32 * 32 + 32 * 33 / 2);
}

// ---------------------------------------------------------------- prefill

TEST(Prefill, MatchesOracleOddLengthsAllFastDims) {
  for (index_t d : {64, 96, 128, 256})
    for (index_t n : {1, 63, 65}) check_prefill<float>({4, 4, n, n, d, true, 0, 0, false});
  check_prefill<float>({2, 1, 1000, 1000, 64, true, 0, 0, false});
}

TEST(Prefill, AnyQueryBlockSizeGivesTheBitsOfFullTiles) {
  // Query blocks narrower than a micro-tile (64 queries with AVX-512, 8 with SSE) run narrower
  // tiles. With block_k fixed every row sees the same key blocks in the same order, and a lane's
  // arithmetic does not depend on the tile width, so the bits equal the block_q = 64 run; both
  // match the oracle. GQA 4:2, sliding window + sinks (partial blocks) and a causal suffix.
  std::mt19937 rng(77);
  Tensor<float> q(4, 150, 40, rng);
  Tensor<bf16> k(2, 190, 40, rng), v(2, 190, 40, rng);
  auto run = [&](index_t bq) {
    const IntervalMask mask(MaskShape{4, 150, 190, bq, 64, true}, 70, 3);
    Out out(4, 150, 40);
    AttentionOptions opt;
    opt.lse = out.lse_view();
    prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
    expect_close(out, reference::attention_masked(q.view(), k.view(), v.view(), 1.0 / std::sqrt(40.0), mask),
                 storage_tol<bf16>(), "block_q=" + std::to_string(bq));
    return out;
  };
  const Out base = run(64);
  for (index_t bq : {1, 3, 8, 16, 17, 31, 32, 33, 48, 49, 63, 65, 100, 150}) {
    const Out o = run(bq);
    EXPECT_EQ(std::memcmp(o.o.data(), base.o.data(), sizeof(float) * base.o.size()), 0) << "block_q=" << bq;
    EXPECT_EQ(std::memcmp(o.lse.data(), base.lse.data(), sizeof(float) * base.lse.size()), 0) << "block_q=" << bq;
  }
}

TEST(Prefill, MatchesOracleAnyHeadDim) {
  for (index_t d : {1, 7, 37, 80}) check_prefill<float>({2, 2, 70, 70, d, true, 0, 0, false});
}

TEST(Prefill, GqaGroupsOneFourEight) {
  for (index_t g : {1, 4, 8}) check_prefill<float>({g * 2, 2, 129, 129, 64, true, 0, 0, false});
}

TEST(Prefill, NonCausal) {
  check_prefill<float>({4, 2, 65, 65, 64, false, 0, 0, false});
  check_prefill<float>({4, 2, 30, 100, 96, false, 0, 0, false});  // cross-attention shape
}

TEST(Prefill, SuffixQueriesChunkedPrefill) {
  check_prefill<float>({4, 1, 65, 300, 128, true, 0, 0, false});
  check_prefill<float>({4, 1, 1, 257, 64, true, 0, 0, false});
  check_prefill<float>({2, 2, 100, 100 + 37, 64, true, 0, 0, false});
}

TEST(Prefill, StorageTypesBf16Fp16) {
  check_prefill<bf16>({8, 2, 130, 130, 128, true, 0, 0, false});
  check_prefill<fp16>({8, 2, 130, 130, 64, true, 0, 0, false});
  check_prefill<bf16>({4, 4, 63, 200, 37, true, 0, 0, false});
}

TEST(Prefill, TokenMajorStridedLayout) {
  check_prefill<float>({8, 2, 97, 97, 64, true, 0, 0, true});
  check_prefill<bf16>({8, 2, 97, 150, 128, true, 0, 0, true});
}

TEST(Prefill, SlidingWindowWithSinks) {
  check_prefill<float>({4, 2, 300, 300, 64, true, 50, 4, false});
  check_prefill<float>({4, 2, 100, 333, 64, true, 7, 3, false});
  check_prefill<bf16>({4, 1, 257, 257, 128, true, 64, 0, false});
  check_prefill<float>({2, 2, 150, 150, 64, false, 20, 2, false});  // symmetric non-causal band
}

TEST(Prefill, BlockSizesOtherThanTile) {
  check_prefill<float>({2, 2, 200, 200, 64, true, 0, 0, false}, 16);
  check_prefill<float>({2, 2, 200, 200, 64, true, 30, 4, false}, 48);
  check_prefill<float>({2, 1, 131, 131, 64, true, 0, 0, false}, 128);
}

TEST(Prefill, ThreadCountsGiveIdenticalBits) {
  std::mt19937 rng(5);
  const index_t n = 300, d = 64;
  Tensor<float> q(8, n, d, rng);
  Tensor<bf16> k(2, n, d, rng), v(2, n, d, rng);
  const IntervalMask mask = masks::sliding_window(8, n, n, 100, 4, 64);
  std::vector<std::vector<float>> outs;
  for (int t = 1; t <= 4; ++t) {
    Out out(8, n, d);
    AttentionOptions opt;
    opt.num_threads = t;
    prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
    outs.push_back(out.o);
  }
  for (int t = 1; t < 4; ++t) EXPECT_EQ(outs[0], outs[static_cast<std::size_t>(t)]) << "threads=" << t + 1;
}

TEST(Prefill, FullyMaskedRowsGiveZeroAndMinusInfLse) {
  std::mt19937 rng(6);
  const index_t n = 96, d = 64;
  Tensor<float> q(2, n, d, rng), k(1, n, d, rng), v(1, n, d, rng);
  // Query block 1 lists no key block at all; query block 0 is dense causal.
  BlockListBuilder b(MaskShape{2, n, n, 64, 64, true}, false);
  for (index_t h = 0; h < 2; ++h) b.add(h, 0, 0);
  const auto mask = b.build();
  Out out(2, n, d);
  AttentionOptions opt;
  opt.lse = out.lse_view();
  prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
  for (index_t h = 0; h < 2; ++h)
    for (index_t i = 64; i < n; ++i) {
      EXPECT_TRUE(std::isinf(out.lse[static_cast<std::size_t>(h * n + i)]));
      for (index_t c = 0; c < d; ++c) ASSERT_EQ(out.o[static_cast<std::size_t>((h * n + i) * d + c)], 0.0f);
    }
  expect_close(out, reference::attention_masked(q.view(), k.view(), v.view(), 0.125, mask), 2e-5, "masked rows");
}

TEST(Prefill, HugeLogitsDoNotOverflow) {
  // Logits near +-1e4: q . k * scale ~ 1e4 in magnitude; softmax must stay finite and exact.
  std::mt19937 rng(7);
  const index_t n = 130, d = 64;
  Tensor<float> q(2, n, d, rng, 30.0f), k(1, n, d, rng, 30.0f), v(1, n, d, rng);
  const IntervalMask mask = masks::causal(2, n, n);
  Out out(2, n, d);
  AttentionOptions opt;
  opt.lse = out.lse_view();
  prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
  const auto want = reference::attention_masked(q.view(), k.view(), v.view(), 0.125, mask);
  double max_lse = 0;
  for (double x : want.lse) max_lse = std::max(max_lse, std::abs(x));
  EXPECT_GT(max_lse, 3e3);
  expect_close(out, want, 1e-4, "huge logits");
}

TEST(Prefill, ExplicitScale) {
  std::mt19937 rng(8);
  Tensor<float> q(2, 40, 32, rng), k(2, 40, 32, rng), v(2, 40, 32, rng);
  const IntervalMask mask = masks::causal(2, 40, 40);
  Out out(2, 40, 32);
  AttentionOptions opt;
  opt.scale = 0.37f;
  opt.lse = out.lse_view();
  prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
  expect_close(out, reference::attention_masked(q.view(), k.view(), v.view(), 0.37, mask), 2e-5, "scale");
}

TEST(Prefill, RejectsBadArguments) {
  std::mt19937 rng(9);
  Tensor<float> q(6, 10, 16, rng), k(4, 10, 16, rng), v(4, 10, 16, rng), k8(2, 8, 16, rng), v8(2, 8, 16, rng);
  Out out(6, 10, 16);
  const IntervalMask m = masks::causal(6, 10, 10);
  EXPECT_THROW(prefill(q.view(), k.view(), v.view(), out.view(), m), sparse_attn::invalid_argument);  // 6 % 4
  Tensor<float> k2(2, 10, 16, rng), v2(2, 10, 16, rng), vbad(2, 9, 16, rng), kd(2, 10, 8, rng);
  EXPECT_THROW(prefill(q.view(), k8.view(), v8.view(), out.view(), m), sparse_attn::invalid_argument);  // n_q > n_k
  EXPECT_THROW(prefill(q.view(), k2.view(), vbad.view(), out.view(), m), sparse_attn::invalid_argument);
  EXPECT_THROW(prefill(q.view(), kd.view(), v2.view(), out.view(), m), sparse_attn::invalid_argument);
  const IntervalMask wrong = masks::causal(6, 9, 10);
  EXPECT_THROW(prefill(q.view(), k2.view(), v2.view(), out.view(), wrong), sparse_attn::invalid_argument);
  for (float s : {INFINITY, -1.0f, 0.0f}) {
    AttentionOptions opt;
    opt.scale = s;
    EXPECT_THROW(prefill(q.view(), k2.view(), v2.view(), out.view(), m, opt), sparse_attn::invalid_argument);
  }
  TensorView<float> overlapping(out.o.data(), 6, 10, 16, 16, 1, 1);
  EXPECT_THROW(prefill(q.view(), k2.view(), v2.view(), overlapping, m), sparse_attn::invalid_argument);
  try {
    prefill(q.view(), k.view(), v.view(), out.view(), m);
  } catch (const sparse_attn::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("Hq=6 is not a multiple of Hkv=4"), std::string::npos) << e.what();
  }
}

TEST(Prefill, EmptyQueriesAreANoOp) {
  std::mt19937 rng(10);
  Tensor<float> q(2, 0, 16, rng), k(2, 5, 16, rng), v(2, 5, 16, rng);
  Out out(2, 0, 16);
  EXPECT_NO_THROW(prefill(q.view(), k.view(), v.view(), out.view(), masks::causal(2, 0, 5)));
}

// ---------------------------------------------------------------- decode

namespace {

template <class TKV>
void check_decode(index_t hq, index_t hkv, index_t n_k, index_t n_q, index_t d, KeySelection::Scope scope,
                  int pattern, bool causal = true, bool token_major = false, index_t split = 64) {
  std::mt19937 rng(static_cast<unsigned>(n_k * 3 + d + hq + pattern));
  Tensor<float> q(hq, n_q, d, rng);
  Tensor<TKV> k(hkv, n_k, d, rng, 1.0f, token_major), v(hkv, n_k, d, rng, 1.0f, token_major);
  const index_t units = scope == KeySelection::Scope::per_q_head ? hq : hkv;
  std::vector<std::vector<index_t>> toks(static_cast<std::size_t>(units));
  KeySelection sel;
  if (scope != KeySelection::Scope::all) {
    for (index_t u = 0; u < units; ++u)
      for (index_t j = 0; j < n_k; ++j)
        if (pattern == 0 ? ((j * 7 + u) % 5 < 2 || j >= n_k - 3) : ((j / 16 + u) % 3 == 0)) toks[static_cast<std::size_t>(u)].push_back(j);
    sel = KeySelection::from_tokens(scope, toks);
  }
  Out out(hq, n_q, d);
  DecodeOptions opt;
  opt.lse = out.lse_view();
  opt.causal = causal;
  opt.split = split;
  decode(q.view(), k.view(), v.view(), out.view(), sel, opt);
  const index_t G = hq / hkv;
  const auto want = reference::attention(q.view(), k.view(), v.view(), 1.0 / std::sqrt(double(d)), [&](index_t h, index_t i, index_t j) {
    if (causal && j > n_k - n_q + i) return false;
    if (scope == KeySelection::Scope::all) return true;
    const auto& t = toks[static_cast<std::size_t>(scope == KeySelection::Scope::per_q_head ? h : h / G)];
    return std::binary_search(t.begin(), t.end(), j);
  });
  expect_close(out, want, 2e-5, std::string("decode ") + dtype_name<TKV>() + " n_k=" + std::to_string(n_k) + " d=" + std::to_string(d));
}

}  // namespace

TEST(Decode, DenseMatchesOracle) {
  for (index_t d : {64, 96, 128, 256}) check_decode<float>(8, 2, 1000, 1, d, KeySelection::Scope::all, 0);
  check_decode<float>(4, 4, 1, 1, 64, KeySelection::Scope::all, 0);
  check_decode<float>(2, 1, 77, 1, 37, KeySelection::Scope::all, 0);
}

TEST(Decode, StorageTypesBf16Fp16) {
  check_decode<bf16>(32, 8, 1500, 1, 128, KeySelection::Scope::all, 0);
  check_decode<bf16>(8, 2, 700, 2, 64, KeySelection::Scope::per_kv_head, 0);
  check_decode<fp16>(8, 2, 700, 1, 128, KeySelection::Scope::all, 0);
  check_decode<bf16>(4, 1, 99, 1, 40, KeySelection::Scope::all, 0);  // d not a multiple of 32
}

TEST(Decode, SeveralNewTokensAreCausal) {
  check_decode<float>(8, 2, 300, 5, 64, KeySelection::Scope::all, 0);
  check_decode<bf16>(8, 8, 300, 3, 128, KeySelection::Scope::per_kv_head, 1);
  check_decode<float>(8, 2, 300, 5, 64, KeySelection::Scope::all, 0, /*causal=*/false);
}

TEST(Decode, GqaGroupsOneFourEight) {
  for (index_t g : {1, 4, 8}) check_decode<float>(g * 2, 2, 513, 1, 64, KeySelection::Scope::all, 0);
}

TEST(Decode, TokenAndPageSubsets) {
  check_decode<float>(8, 2, 1000, 1, 128, KeySelection::Scope::per_kv_head, 0);
  check_decode<float>(8, 2, 1000, 1, 128, KeySelection::Scope::per_q_head, 1);
  check_decode<bf16>(8, 2, 1000, 1, 128, KeySelection::Scope::per_q_head, 0);
}

TEST(Decode, TokenMajorCache) {
  check_decode<bf16>(8, 2, 600, 1, 128, KeySelection::Scope::all, 0, true, true);
  check_decode<float>(8, 2, 600, 2, 64, KeySelection::Scope::per_kv_head, 1, true, true);
}

TEST(Decode, SplitSizesDoNotChangeTheResult) {
  for (index_t split : {16, 100, 4096}) check_decode<float>(8, 2, 1000, 1, 64, KeySelection::Scope::all, 0, true, false, split);
}

TEST(Decode, PagesCoverTheirTokens) {
  const KeySelection s = KeySelection::from_pages(KeySelection::Scope::per_kv_head, {{0, 2, 3}, {5}}, 16, 90);
  EXPECT_EQ(s.keys(0, 90), 16 + 32);
  EXPECT_EQ(s.keys(1, 90), 10);  // last page is partial
  EXPECT_THROW(KeySelection::from_pages(KeySelection::Scope::per_kv_head, {{6}}, 16, 90), sparse_attn::invalid_argument);
}

TEST(Decode, EmptySelectionGivesZeroAndMinusInfLse) {
  std::mt19937 rng(11);
  Tensor<float> q(4, 1, 64, rng), k(2, 50, 64, rng), v(2, 50, 64, rng);
  const KeySelection sel = KeySelection::from_tokens(KeySelection::Scope::per_kv_head, {{}, {3, 4}});
  Out out(4, 1, 64);
  DecodeOptions opt;
  opt.lse = out.lse_view();
  decode(q.view(), k.view(), v.view(), out.view(), sel, opt);
  for (index_t h = 0; h < 2; ++h) {
    EXPECT_TRUE(std::isinf(out.lse[static_cast<std::size_t>(h)]) && out.lse[static_cast<std::size_t>(h)] < 0);
    for (index_t c = 0; c < 64; ++c) EXPECT_EQ(out.o[static_cast<std::size_t>(h * 64 + c)], 0.0f);
  }
  EXPECT_TRUE(std::isfinite(out.lse[2]));
}

TEST(Decode, ThreadCountsGiveIdenticalBits) {
  std::mt19937 rng(12);
  Tensor<float> q(8, 1, 128, rng);
  Tensor<bf16> k(2, 3000, 128, rng), v(2, 3000, 128, rng);
  std::vector<std::vector<float>> outs;
  for (int t = 1; t <= 4; ++t) {
    Out out(8, 1, 128);
    DecodeOptions opt;
    opt.num_threads = t;
    decode(q.view(), k.view(), v.view(), out.view(), KeySelection::all(), opt);
    outs.push_back(out.o);
  }
  for (int t = 1; t < 4; ++t) EXPECT_EQ(outs[0], outs[static_cast<std::size_t>(t)]) << "threads=" << t + 1;
}

TEST(Decode, RejectsBadSelections) {
  std::mt19937 rng(13);
  Tensor<float> q(4, 1, 16, rng), k(2, 20, 16, rng), v(2, 20, 16, rng);
  Out out(4, 1, 16);
  const auto bad_units = KeySelection::from_tokens(KeySelection::Scope::per_kv_head, {{1}});
  EXPECT_THROW(decode(q.view(), k.view(), v.view(), out.view(), bad_units), sparse_attn::invalid_argument);
  const auto out_of_range = KeySelection::from_ranges(KeySelection::Scope::per_kv_head, {{{0, 21}}, {{0, 1}}});
  EXPECT_THROW(decode(q.view(), k.view(), v.view(), out.view(), out_of_range), sparse_attn::invalid_argument);
  // Overlapping, empty or negative ranges are refused when the selection is built.
  EXPECT_THROW(KeySelection::from_ranges(KeySelection::Scope::per_kv_head, {{{0, 5}, {3, 6}}, {{0, 1}}}),
               sparse_attn::invalid_argument);
  EXPECT_THROW(KeySelection::from_ranges(KeySelection::Scope::per_kv_head, {{{2, 2}}, {{0, 1}}}),
               sparse_attn::invalid_argument);
  EXPECT_THROW(KeySelection::from_ranges(KeySelection::Scope::per_kv_head, {{{-1, 2}}, {{0, 1}}}),
               sparse_attn::invalid_argument);
  EXPECT_THROW(KeySelection::from_ranges(KeySelection::Scope::all, {{{0, 1}}}), sparse_attn::invalid_argument);
  EXPECT_THROW(KeySelection::from_tokens(KeySelection::Scope::per_kv_head, {{3, 3}}), sparse_attn::invalid_argument);
  DecodeOptions opt;
  opt.split = 4;
  EXPECT_THROW(decode(q.view(), k.view(), v.view(), out.view(), KeySelection::all(), opt), sparse_attn::invalid_argument);
}

// ---------------------------------------------------------------- merge_states

TEST(MergeStates, DisjointHalvesMergeToTheWhole) {
  std::mt19937 rng(14);
  const index_t n = 400, d = 64;
  Tensor<float> q(4, 3, d, rng);
  Tensor<bf16> k(2, n, d, rng), v(2, n, d, rng);
  std::vector<index_t> a, b;
  for (index_t j = 0; j < n; ++j) ((j * 13) % 7 < 3 ? a : b).push_back(j);
  auto run = [&](const KeySelection& s, Out& out) {
    DecodeOptions opt;
    opt.lse = out.lse_view();
    decode(q.view(), k.view(), v.view(), out.view(), s, opt);
  };
  Out oa(4, 3, d), ob(4, 3, d), whole(4, 3, d);
  run(KeySelection::from_tokens(KeySelection::Scope::per_kv_head, {a, a}), oa);
  run(KeySelection::from_tokens(KeySelection::Scope::per_kv_head, {b, b}), ob);
  run(KeySelection::all(), whole);
  merge_states(oa.view(), oa.lse_view(), TensorView<const float>(ob.o.data(), 4, 3, d), ob.lse_view());
  for (std::size_t i = 0; i < whole.o.size(); ++i) EXPECT_NEAR(oa.o[i], whole.o[i], 1e-5);
  for (std::size_t i = 0; i < whole.lse.size(); ++i) EXPECT_NEAR(oa.lse[i], whole.lse[i], 1e-5);
}

TEST(MergeStates, EmptyPartsAreIdentity) {
  std::vector<float> oa{1, 2}, ob{3, 4};
  float la = kNegInf;
  merge_state(oa.data(), la, ob.data(), 0.5f, 2);
  EXPECT_EQ(oa, ob);
  EXPECT_EQ(la, 0.5f);
  merge_state(oa.data(), la, ob.data(), kNegInf, 2);
  EXPECT_EQ(oa, ob);
  std::vector<float> oc{9, 9};
  float lc = kNegInf;
  merge_state(oc.data(), lc, ob.data(), kNegInf, 2);
  EXPECT_EQ(oc, (std::vector<float>{0, 0}));
  EXPECT_EQ(lc, kNegInf);
}

TEST(Decode, RowGroupsOfOneTwoThreeFourRows) {
  // R = G * n_q rows share each key load in blocks of 4 (or 2 / 1 for tiny groups).
  for (auto [g, nq] : std::vector<std::pair<index_t, index_t>>{{1, 1}, {2, 1}, {1, 3}, {4, 1}, {2, 3}, {8, 2}}) {
    check_decode<bf16>(g * 2, 2, 300, nq, 128, KeySelection::Scope::all, 0);
    check_decode<float>(g * 2, 2, 300, nq, 64, KeySelection::Scope::per_kv_head, 1);
  }
}

namespace {

// Precision::bfloat16 decode against the float64 oracle on the unrounded inputs. The bound
// follows from the mode's roundings (u = 2^-8, the unit roundoff of bf16's 8-bit significand):
//  - logits: q is rounded to bf16 (exact when q is bf16) and the products q~_c k_c are exact in
//    fp32, summed in fp32 (error <= d 2^-24 of the sum of magnitudes, order-independent bound):
//    |s~_j - s_j| <= eps = (u_q + d 2^-24) * scale * max_j sum_c |q_c k_jc|, u_q = u or 0;
//  - the softmax weights a_j = e^{s_j} / sum_i e^{s_i} then move by a factor within
//    [e^{-2 eps}, e^{2 eps}];
//  - P is rounded to bf16 before P.V while the sum l uses the unrounded P: one more factor
//    within [1 - u, 1 + u] on each weight of the numerator;
//  - so |o~ - o| <= sum_j |a~_j - a_j| |v_j| <= ((1 + u) e^{2 eps} - 1) max_j |v_j| per row, plus
//    the fp32 P.V accumulation and final scaling (<= 64 * 2^-24 max|v| for these key counts: the
//    exact part of that term is below 1e-5 max|v|, which we add);
//  - LSE = m + log l with l unrounded: |dLSE| <= eps + 1e-6 |LSE|.
struct Bf16DecodeCase {
  index_t hq, hkv, n_q, d, n_k;
};

template <class TQ>
void check_bf16_decode(const Bf16DecodeCase& c, std::vector<float>* out_bits = nullptr) {
  std::mt19937 rng(static_cast<unsigned>(c.hq * 7 + c.n_q * 3 + c.d));
  Tensor<TQ> q(c.hq, c.n_q, c.d, rng);
  Tensor<bf16> k(c.hkv, c.n_k, c.d, rng, 0.5f), v(c.hkv, c.n_k, c.d, rng);
  Out out(c.hq, c.n_q, c.d);
  DecodeOptions opt;
  opt.precision = Precision::bfloat16;
  opt.lse = out.lse_view();
  opt.split = 256;  // several chunks per row
  decode(q.view(), k.view(), v.view(), out.view(), KeySelection::all(), opt);
  const double scale = 1.0 / std::sqrt(double(c.d));
  const auto allowed = [&](index_t, index_t i, index_t j) { return j <= c.n_k - c.n_q + i; };
  const auto want = reference::attention(q.view(), k.view(), v.view(), scale, allowed);
  const double u = std::ldexp(1.0, -8);
  const double u_q = std::is_same_v<TQ, bf16> ? 0.0 : u;
  const index_t G = c.hq / c.hkv;
  double max_v = 0.0;
  for (const bf16& x : v.data) max_v = std::max(max_v, std::abs(double(float(x))));
  const std::string what = std::string("q ") + dtype_name<TQ>() + " hq=" + std::to_string(c.hq) +
                           " hkv=" + std::to_string(c.hkv) + " n_q=" + std::to_string(c.n_q) +
                           " d=" + std::to_string(c.d);
  for (index_t h = 0; h < c.hq; ++h)
    for (index_t i = 0; i < c.n_q; ++i) {
      double mag = 0.0;  // max_j scale * sum_c |q_c k_jc| over the row's keys
      for (index_t j = 0; j < c.n_k; ++j) {
        if (!allowed(h, i, j)) continue;
        double a = 0.0;
        for (index_t cc = 0; cc < c.d; ++cc)
          a += std::abs(double(float(q.view()(h, i, cc))) * double(float(k.view()(h / G, j, cc))));
        mag = std::max(mag, a * scale);
      }
      const double eps = (u_q + double(c.d) * std::ldexp(1.0, -24)) * mag;
      const double bound = ((1.0 + u) * std::exp(2.0 * eps) - 1.0 + 1e-5) * max_v;
      double err = 0.0;
      for (index_t cc = 0; cc < c.d; ++cc)
        err = std::max(err, std::abs(double(out.o[static_cast<std::size_t>((h * c.n_q + i) * c.d + cc)]) - want(h, i, cc)));
      EXPECT_LE(err, bound) << what << " row " << h << "," << i << " eps=" << eps;
      const double lse = out.lse[static_cast<std::size_t>(h * c.n_q + i)];
      EXPECT_LE(std::abs(lse - want.lse_at(h, i)), eps + 1e-6 * std::abs(want.lse_at(h, i))) << what << " lse row " << h << "," << i;
    }
  if (out_bits != nullptr) *out_bits = out.o;
}

void check_bf16_decode_cases() {
  // GQA groups 1, 4 and 8 (two row groups of 4 rows), causal n_q > 1; d = 64 and 128 take
  // vdpbf16ps on AVX512-BF16, d = 80 (not a multiple of 32) the emulation on every target.
  const std::vector<Bf16DecodeCase> cases = {
      {4, 4, 1, 64, 700}, {8, 2, 1, 128, 900}, {8, 1, 1, 80, 600}, {8, 2, 3, 128, 700}, {4, 2, 2, 80, 333}};
  for (const Bf16DecodeCase& c : cases) {
    check_bf16_decode<float>(c);
    check_bf16_decode<bf16>(c);
  }
}

}  // namespace

TEST(Decode, Bf16ProductsWithinTheirRoundingBound) {
  // On every usable CPU target: vdpbf16ps where the target has it, the emulation elsewhere.
  for (CpuTarget t : usable_cpu_targets()) {
    set_cpu_target(t);
    SCOPED_TRACE(target_name(t));
    check_bf16_decode_cases();
  }
  reset_cpu_target();
}

TEST(Decode, Bf16ProductsAgreeAcrossTargets) {
  // Every target computes the same roundings: the results differ only through the order of the
  // fp32 sums (and a probability whose bf16 rounding that order flips), far inside the bound.
  const Bf16DecodeCase c{8, 2, 2, 128, 500};
  std::vector<float> first, got;
  for (CpuTarget t : usable_cpu_targets()) {
    set_cpu_target(t);
    SCOPED_TRACE(target_name(t));
    check_bf16_decode<float>(c, first.empty() ? &first : &got);
    if (got.empty()) continue;
    double err = 0.0;
    for (std::size_t i = 0; i < got.size(); ++i) err = std::max(err, double(std::abs(got[i] - first[i])));
    EXPECT_LE(err, 2e-3);
  }
  reset_cpu_target();
}

TEST(Decode, PrecisionModesAndTheirErrors) {
  std::mt19937 rng(15);
  Tensor<float> qf(8, 2, 64, rng);
  Tensor<bf16> qb(8, 2, 64, rng), kb(2, 300, 64, rng), vb(2, 300, 64, rng);
  Tensor<float> kf(2, 300, 64, rng), vf(2, 300, 64, rng);
  auto run = [](const auto& q, const auto& k, const auto& v, Precision p) {
    Out out(8, 2, 64);
    DecodeOptions opt;
    opt.precision = p;
    decode(q.view(), k.view(), v.view(), out.view(), KeySelection::all(), opt);
    return out.o;
  };
  // automatic: bf16 products iff q, K and V are all bf16.
  EXPECT_EQ(run(qb, kb, vb, Precision::automatic), run(qb, kb, vb, Precision::bfloat16));
  EXPECT_NE(run(qb, kb, vb, Precision::automatic), run(qb, kb, vb, Precision::float32));
  EXPECT_EQ(run(qf, kb, vb, Precision::automatic), run(qf, kb, vb, Precision::float32));
  EXPECT_EQ(run(qf, kf, vf, Precision::automatic), run(qf, kf, vf, Precision::float32));
  // bf16 products need bf16 K and V: the error names the types, at plan time and in the one call.
  for (bool one_call : {false, true}) {
    try {
      DecodeOptions opt;
      opt.precision = Precision::bfloat16;
      Out out(8, 2, 64);
      if (one_call)
        decode(qf.view(), kf.view(), vb.view(), out.view(), KeySelection::all(), opt);
      else
        plan_decode(attention_shape(qf.view(), kf.view(), vb.view()), KeySelection::all(), opt);
      ADD_FAILURE() << "precision bf16 with fp32 K accepted";
    } catch (const sparse_attn::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("got K fp32, V bf16"), std::string::npos) << msg;
    }
  }
  // The plan records the precision; a run with another one is refused before any write.
  DecodeOptions planned;
  planned.precision = Precision::float32;
  const DecodePlan plan = plan_decode(attention_shape(qb.view(), kb.view(), vb.view()), KeySelection::all(), planned);
  EXPECT_FALSE(plan.bf16_products());
  const WorkspaceBuffer ws(plan.workspace_bytes());
  Out out(8, 2, 64);
  DecodeOptions other = planned;
  other.precision = Precision::automatic;
  EXPECT_THROW(decode(plan, qb.view(), kb.view(), vb.view(), out.view(), KeySelection::all(), ws.view(), other),
               sparse_attn::invalid_argument);
  for (float x : out.o) EXPECT_EQ(x, -7.0f);
  EXPECT_TRUE(plan_decode(attention_shape(qb.view(), kb.view(), vb.view())).bf16_products());
}

// ---------------------------------------------------------------- CPU targets (arch/)

// Every target this program compiled and this CPU runs (all four in a portable x86-64-v2 build on
// an AVX-512 BF16 machine) computes the same cases as the default within the same tolerances.
TEST(Targets, EveryUsableTargetMatchesTheOracle) {
  const std::vector<CpuTarget> targets = usable_cpu_targets();
  ASSERT_FALSE(targets.empty());
  EXPECT_EQ(targets.front(), CpuTarget::generic);
  for (CpuTarget t : targets) {
    set_cpu_target(t);
    SCOPED_TRACE(target_name(t));
    EXPECT_EQ(cpu_target(), t);
    check_prefill<float>({4, 2, 131, 131, 64, true, 0, 0, false});
    check_prefill<bf16>({4, 1, 100, 260, 128, true, 40, 3, true});
    check_prefill<fp16>({2, 2, 77, 77, 37, false, 0, 0, false});
    check_prefill<float>({2, 2, 200, 200, 64, true, 30, 4, false}, 48);
    check_prefill<float>({2, 1, 131, 131, 64, true, 0, 0, false}, 128);
    check_prefill<float>({2, 2, 70, 70, 64, true, 0, 0, false}, 16);
    check_decode<float>(8, 2, 1000, 1, 128, KeySelection::Scope::all, 0);
    check_decode<float>(2, 1, 77, 1, 37, KeySelection::Scope::all, 0);
    check_decode<bf16>(8, 2, 700, 2, 64, KeySelection::Scope::per_kv_head, 0);
    check_decode<fp16>(8, 2, 300, 1, 128, KeySelection::Scope::per_q_head, 1);
    check_decode<bf16>(4, 1, 99, 3, 40, KeySelection::Scope::all, 0, true, true);
    check_decode<float>(8, 2, 300, 5, 64, KeySelection::Scope::all, 0, /*causal=*/false);
  }
  reset_cpu_target();
}

TEST(Targets, ForcingAnUnusableOrUnknownTargetIsAClearError) {
  for (int i = 0; i <= 3; ++i) {
    const auto t = static_cast<CpuTarget>(i);
    const bool usable = target_compiled(t) && cpu_supports(t);
    if (usable) {
      EXPECT_NO_THROW(set_cpu_target(t));
    } else {
      try {
        set_cpu_target(t);
        ADD_FAILURE() << target_name(t) << " accepted";
      } catch (const sparse_attn::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("usable here: generic"), std::string::npos) << e.what();
      }
    }
  }
  reset_cpu_target();
  EXPECT_THROW(parse_cpu_target("avx1024"), sparse_attn::invalid_argument);
  EXPECT_EQ(parse_cpu_target("avx512_bf16"), CpuTarget::avx512_bf16);
  EXPECT_EQ(parse_cpu_target("amx"), CpuTarget::amx);
  EXPECT_EQ(cpu_target(), std::getenv("SPARSE_ATTN_TARGET") ? parse_cpu_target(std::getenv("SPARSE_ATTN_TARGET"))
                                                             : best_cpu_target());
}
