// KV cache (contiguous, paged), Quest, SnapKV, Ada-SnapKV, H2O, StreamingLLM and the decode
// pipeline, against the double-precision oracle (reference.hpp) on exactly the keys each method
// keeps or selects, plus every invariant METHODS.md states for them.

// GCC < 13 (PR 105593): with many kernel instantiations Eigen's pexp is emitted out of line and
// warns inside its AVX-512 intrinsics; the pragma has to cover Eigen's own lines.
#include <sparse_attn/core/diagnostics.hpp>
SPARSE_ATTN_DIAGNOSTICS_PUSH
#include <Eigen/Core>
SPARSE_ATTN_DIAGNOSTICS_POP

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <sparse_attn/pipeline.hpp>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <vector>

using namespace sparse_attn;
using kv::PageTable;

namespace {

// Q [hq, n, d], K/V [hkv, n, d] in fp32. Keys get a random offset per block of 16 tokens so pages
// differ (Quest has something to rank).
struct Data {
  index_t hq, hkv, n, d;
  std::vector<float> q, k, v;
  Data(index_t hq_, index_t hkv_, index_t n_, index_t d_, unsigned seed)
      : hq(hq_), hkv(hkv_), n(n_), d(d_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    q.resize(static_cast<std::size_t>(hq * n * d));
    k.resize(static_cast<std::size_t>(hkv * n * d));
    v.resize(k.size());
    for (float& x : q) x = nd(rng);
    for (float& x : v) x = nd(rng);
    for (index_t h = 0; h < hkv; ++h)
      for (index_t b = 0; b * 16 < n; ++b) {
        std::vector<float> mu(static_cast<std::size_t>(d));
        for (float& x : mu) x = 0.7f * nd(rng);
        for (index_t t = b * 16; t < std::min(n, b * 16 + 16); ++t)
          for (index_t c = 0; c < d; ++c) kat(h, t, c) = mu[static_cast<std::size_t>(c)] + nd(rng);
      }
  }
  float& kat(index_t h, index_t t, index_t c) {
    return k[static_cast<std::size_t>((h * n + t) * d + c)];
  }
  TensorView<const float> qv() const { return {q.data(), hq, n, d}; }
  TensorView<const float> kv() const { return {k.data(), hkv, n, d}; }
  TensorView<const float> vv() const { return {v.data(), hkv, n, d}; }
  TensorView<const float> qs(index_t t0, index_t m) const { return qv().slice_tokens(t0, m); }
  TensorView<const float> ks(index_t t0, index_t m) const { return kv().slice_tokens(t0, m); }
  TensorView<const float> vs(index_t t0, index_t m) const { return vv().slice_tokens(t0, m); }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(d)); }
};

template <class T>
std::vector<T> rounded(const std::vector<float>& x) {
  std::vector<T> r(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) r[i] = from_float<T>(x[i]);
  return r;
}

template <class Cache>
Cache make_cache(const Data& D, index_t capacity, index_t page = 16,
                 PageTable table = PageTable::per_kv_head) {
  kv::CacheOptions o;
  o.kv_heads = D.hkv;
  o.head_dim = D.d;
  o.capacity = capacity;
  o.page_size = page;
  o.page_table = table;
  return Cache(o);
}

// Oracle: q rows [q0, q0 + nq) (position q0 + i) over the keys at `keep[h / G]` positions of the
// full K/V (rounded to T like the cache), causal.
template <class T>
reference::Result oracle(const Data& D, index_t q0, index_t nq,
                         const std::vector<std::vector<index_t>>& keep) {
  const std::vector<T> kr = rounded<T>(D.k), vr = rounded<T>(D.v);
  TensorView<const T> kv(kr.data(), D.hkv, D.n, D.d), vv(vr.data(), D.hkv, D.n, D.d);
  std::vector<std::vector<char>> allowed(static_cast<std::size_t>(D.hkv),
                                         std::vector<char>(static_cast<std::size_t>(D.n), 0));
  for (index_t h = 0; h < D.hkv; ++h)
    for (index_t p : keep[static_cast<std::size_t>(h)])
      allowed[static_cast<std::size_t>(h)][static_cast<std::size_t>(p)] = 1;
  const index_t G = D.hq / D.hkv;
  return reference::attention(
      D.qs(q0, nq), kv, vv, D.scale(), [&](index_t h, index_t i, index_t j) {
        return j <= q0 + i &&
               allowed[static_cast<std::size_t>(h / G)][static_cast<std::size_t>(j)] != 0;
      });
}

std::vector<std::vector<index_t>> all_positions(index_t hkv, index_t n) {
  std::vector<index_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), index_t{0});
  return std::vector<std::vector<index_t>>(static_cast<std::size_t>(hkv), p);
}

template <class Cache>
std::vector<std::vector<index_t>> cache_positions(const Cache& c) {
  std::vector<std::vector<index_t>> r(static_cast<std::size_t>(c.kv_heads()));
  for (index_t h = 0; h < c.kv_heads(); ++h)
    r[static_cast<std::size_t>(h)].assign(c.positions(h), c.positions(h) + c.length(h));
  return r;
}

// Positions a per-KV-head (or dense) selection reads from each head of the cache.
template <class Cache>
std::vector<std::vector<index_t>> selected_positions(const KeySelection& keys, const Cache& c) {
  if (keys.scope() == KeySelection::Scope::all) return cache_positions(c);
  std::vector<std::vector<index_t>> sel(static_cast<std::size_t>(c.kv_heads()));
  for (index_t u = 0; u < c.kv_heads(); ++u)
    for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
      for (index_t j = r->begin; j < r->end; ++j)
        sel[static_cast<std::size_t>(u)].push_back(c.position(u, j));
  return sel;
}

// max |got - want| / max(1, max |want|).
double rel_err(const std::vector<float>& got, const reference::Result& want) {
  double scale = 1.0, err = 0.0;
  for (double x : want.out) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return 1e9;
    err = std::max(err, std::abs(got[i] - want.out[i]));
  }
  return err / scale;
}
double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 1.0, err = 0.0;
  for (float x : want) scale = std::max(scale, static_cast<double>(std::abs(x)));
  for (std::size_t i = 0; i < got.size(); ++i)
    err = std::max(err, static_cast<double>(std::abs(got[i] - want[i])));
  return err / scale;
}

constexpr double kTol = 2e-5;  // fp32 accumulation vs the double oracle on the same stored values

// Decode of q rows [t0, t0 + m) of D over `keys` of the cache (whose newest m tokens they are).
template <class Cache>
std::vector<float> run_decode(const Data& D, const Cache& c, index_t t0, index_t m,
                              const KeySelection& keys = KeySelection::all()) {
  std::vector<float> o(static_cast<std::size_t>(D.hq * m * D.d), -7.0f);
  kv::decode(D.qs(t0, m), c, TensorView<float>(o.data(), D.hq, m, D.d), keys);
  return o;
}

// Per-page key min/max of a cache equals the min/max of the rows it stores.
template <class Cache>
void expect_bounds_exact(const Cache& c, const std::string& what) {
  const auto kv = c.keys();
  for (index_t h = 0; h < c.kv_heads(); ++h)
    for (index_t p = 0; p < c.num_pages(h); ++p)
      for (index_t dd = 0; dd < c.head_dim(); ++dd) {
        float mn = INFINITY, mx = -INFINITY;
        for (index_t t = p * c.page_size(); t < std::min(c.length(h), (p + 1) * c.page_size());
             ++t) {
          mn = std::min(mn, to_float(kv(h, t, dd)));
          mx = std::max(mx, to_float(kv(h, t, dd)));
        }
        ASSERT_EQ(to_float(c.key_min(h, p)[dd]), mn) << what << " head " << h << " page " << p;
        ASSERT_EQ(to_float(c.key_max(h, p)[dd]), mx) << what << " head " << h << " page " << p;
      }
}

// Stored rows of every head equal the (rounded) data at the recorded positions.
template <class Cache>
void expect_rows_match_positions(const Data& D, const Cache& c, const std::string& what) {
  using T = typename Cache::value_type;
  const auto kv = c.keys();
  const auto vv = c.values();
  for (index_t h = 0; h < c.kv_heads(); ++h)
    for (index_t t = 0; t < c.length(h); ++t) {
      const index_t p = c.position(h, t);
      for (index_t dd = 0; dd < D.d; ++dd) {
        const std::size_t src = static_cast<std::size_t>((h * D.n + p) * D.d + dd);
        ASSERT_EQ(to_float(kv(h, t, dd)), to_float(from_float<T>(D.k[src])))
            << what << " K h" << h << " slot " << t;
        ASSERT_EQ(to_float(vv(h, t, dd)), to_float(from_float<T>(D.v[src])))
            << what << " V h" << h << " slot " << t;
      }
    }
}

// ---------------------------------------------------------------------------------------------
// KV cache

template <class Cache>
void check_append_bounds(PageTable table, const std::string& what) {
  const Data D(4, 2, 120, 32, 11);
  Cache c = make_cache<Cache>(D, 130, 16, table);
  index_t at = 0;
  for (index_t m : {1, 3, 16, 5, 40, 1, 7, 15, 32}) {
    c.append(D.ks(at, m), D.vs(at, m));
    at += m;
    ASSERT_EQ(c.length(0), at);
    expect_bounds_exact(c, what + " after " + std::to_string(at) + " tokens");
    expect_rows_match_positions(D, c, what);
  }
}

TEST(KvCache, AppendMaintainsPerPageKeyMinMaxIncludingPartialLastPage) {
  check_append_bounds<kv::ContiguousCache<float>>(PageTable::per_kv_head, "contiguous fp32");
  check_append_bounds<kv::ContiguousCache<bf16>>(PageTable::per_kv_head, "contiguous bf16");
  check_append_bounds<kv::PagedCache<bf16>>(PageTable::per_kv_head, "paged bf16 per-head table");
  check_append_bounds<kv::PagedCache<bf16>>(PageTable::shared, "paged bf16 shared table");
  check_append_bounds<kv::PagedCache<fp16>>(PageTable::per_kv_head, "paged fp16");
}

TEST(KvCache, AppendBeyondCapacityThrowsAndLeavesTheCacheUnchanged) {
  const Data D(4, 2, 40, 16, 3);
  auto c = make_cache<kv::PagedCache<bf16>>(D, 32);
  c.append(D.ks(0, 30), D.vs(0, 30));
  EXPECT_THROW(c.append(D.ks(30, 3), D.vs(30, 3)), sparse_attn::invalid_argument);
  EXPECT_EQ(c.length(0), 30);
  EXPECT_EQ(c.sequence_length(), 30);
  EXPECT_THROW(c.append(D.ks(0, 2), D.vs(0, 3)),
               sparse_attn::invalid_argument);  // k/v tokens differ
  c.append(D.ks(30, 2), D.vs(30, 2));
  EXPECT_EQ(c.length(1), 32);
}

TEST(KvCache, StorageIsReservedOnceAndNeverMoves) {
  const Data D(4, 2, 200, 16, 5);
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 200);
  auto p = make_cache<kv::PagedCache<bf16>>(D, 200);
  const std::size_t bytes_c = c.reserved_bytes(), bytes_p = p.reserved_bytes();
  c.append(D.ks(0, 1), D.vs(0, 1));
  p.append(D.ks(0, 1), D.vs(0, 1));
  const bf16* base_c = c.keys().data;
  const bf16* base_p = p.keys().pool;
  const std::vector<index_t> keep{0};
  for (index_t t = 1; t < 200; ++t) {
    c.append(D.ks(t, 1), D.vs(t, 1));
    p.append(D.ks(t, 1), D.vs(t, 1));
    if (t % 50 == 0) {
      c.retain(0, keep.data(), 1);
      p.retain(1, keep.data(), 1);
    }
    ASSERT_EQ(c.keys().data, base_c);
    ASSERT_EQ(p.keys().pool, base_p);
  }
  EXPECT_EQ(c.reserved_bytes(), bytes_c);
  EXPECT_EQ(p.reserved_bytes(), bytes_p);
}

template <class Cache>
void check_retain(PageTable table, const std::string& what) {
  const Data D(4, 2, 150, 32, 17);
  Cache c = make_cache<Cache>(D, 150, 8, table);
  c.append(D.ks(0, 100), D.vs(0, 100));
  std::mt19937 rng(9);
  std::vector<std::vector<index_t>> keep(2);
  for (index_t h = 0; h < 2; ++h)
    for (index_t t = 0; t < 100; ++t)
      if (std::bernoulli_distribution(h == 0 ? 0.3 : 0.7)(rng))
        keep[static_cast<std::size_t>(h)].push_back(t);
  c.retain(keep);
  EXPECT_FALSE(c.uniform()) << what;
  EXPECT_EQ(cache_positions(c), keep) << what << ": kept tokens stay in position order";
  expect_rows_match_positions(D, c, what);
  expect_bounds_exact(c, what + " after retain");
  c.append(D.ks(100, 20), D.vs(100, 20));  // new tokens land after each head's own length
  for (index_t h = 0; h < 2; ++h) {
    ASSERT_EQ(c.length(h), static_cast<index_t>(keep[static_cast<std::size_t>(h)].size()) + 20);
    EXPECT_EQ(c.position(h, c.length(h) - 1), 119) << what;
  }
  expect_rows_match_positions(D, c, what + " after re-append");
  expect_bounds_exact(c, what + " after re-append");
}

TEST(KvCache, RetainCompactsInPlaceInPositionOrderAndRecomputesBounds) {
  check_retain<kv::ContiguousCache<float>>(PageTable::per_kv_head, "contiguous fp32");
  check_retain<kv::PagedCache<bf16>>(PageTable::per_kv_head, "paged per-head");
  check_retain<kv::PagedCache<bf16>>(PageTable::shared, "paged shared");
}

TEST(KvCache, PagedEvictionReturnsPagesToTheFreeList) {
  const Data D(4, 2, 128, 16, 21);
  auto c = make_cache<kv::PagedCache<bf16>>(D, 128, 16);
  const index_t all_free = c.free_pages();
  EXPECT_EQ(all_free, 2 * 8);
  c.append(D.ks(0, 100), D.vs(0, 100));  // 7 pages per head
  EXPECT_EQ(c.free_pages(), all_free - 14);
  std::vector<index_t> keep(20);
  std::iota(keep.begin(), keep.end(), index_t{50});
  c.retain(0, keep.data(), 20);  // head 0: 2 pages
  EXPECT_EQ(c.free_pages(), all_free - 9);
  c.append(D.ks(100, 28), D.vs(100, 28));  // head 0: 48 tokens = 3 pages, head 1: 128 = 8 pages
  EXPECT_EQ(c.free_pages(), all_free - 11);
  expect_rows_match_positions(D, c, "after page reuse");
  c.clear();
  EXPECT_EQ(c.free_pages(), all_free);
}

TEST(KvCache, PagedAndContiguousCachesGiveIdenticalOutputs) {
  const Data D(8, 2, 300, 64, 23);
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 300);
  auto ph = make_cache<kv::PagedCache<bf16>>(D, 300, 16, PageTable::per_kv_head);
  auto ps = make_cache<kv::PagedCache<bf16>>(D, 300, 16, PageTable::shared);
  auto fill = [&](auto& cache) {
    cache.append(D.ks(0, 250), D.vs(0, 250));
    cache.append(D.ks(250, 1), D.vs(250, 1));
  };
  fill(c);
  fill(ph);
  fill(ps);
  methods::QuestOptions qo;
  qo.compression = 4;
  for (const bool quest : {false, true}) {
    const KeySelection keys =
        quest ? methods::quest::select(D.qs(250, 1), c, qo).keys : KeySelection::all();
    const auto oc = run_decode(D, c, 250, 1, keys);
    EXPECT_EQ(oc, run_decode(D, ph, 250, 1, keys)) << "per-head page table, quest=" << quest;
    EXPECT_EQ(oc, run_decode(D, ps, 250, 1, keys)) << "shared page table, quest=" << quest;
    if (quest) {
      EXPECT_EQ(methods::quest::select(D.qs(250, 1), ph, qo).bounds,
                methods::quest::select(D.qs(250, 1), c, qo).bounds);
    }
  }
  // Ragged (after an uneven eviction) and several new tokens.
  std::vector<std::vector<index_t>> keep{{0, 1, 2, 40, 41, 99, 200, 249, 250}, {}};
  for (index_t t = 0; t < 251; t += 2) keep[1].push_back(t);
  c.retain(keep);
  ph.retain(keep);
  ps.retain(keep);
  c.append(D.ks(251, 3), D.vs(251, 3));
  ph.append(D.ks(251, 3), D.vs(251, 3));
  ps.append(D.ks(251, 3), D.vs(251, 3));
  const auto oc = run_decode(D, c, 251, 3);
  EXPECT_EQ(oc, run_decode(D, ph, 251, 3));
  EXPECT_EQ(oc, run_decode(D, ps, 251, 3));
}

// ---------------------------------------------------------------------------------------------
// Quest

TEST(Quest, PageBoundIsAtLeastEveryLogitInItsPage) {
  const Data D(8, 2, 333, 64, 29);  // 333: a partial last page
  auto c = make_cache<kv::PagedCache<bf16>>(D, 333, 16);
  c.append(D.ks(0, 333), D.vs(0, 333));
  const index_t G = 4;
  const auto kv = c.keys();
  for (const bool per_q : {false, true}) {
    methods::QuestOptions o;
    o.per_query_head = per_q;
    const methods::QuestPlan plan = methods::quest::select(D.qs(332, 1), c, o);
    for (index_t u = 0; u < (per_q ? 8 : 2); ++u)
      for (index_t p = 0; p < c.num_pages(u / (per_q ? G : 1)); ++p) {
        const double U = plan.bounds[static_cast<std::size_t>(u * plan.bound_stride + p)];
        for (index_t t = p * 16; t < std::min<index_t>(333, (p + 1) * 16); ++t) {
          double logit = 0.0, mag = 0.0;
          for (index_t h = per_q ? u : u * G; h < (per_q ? u + 1 : (u + 1) * G); ++h)
            for (index_t dd = 0; dd < 64; ++dd) {
              const double x = D.q[static_cast<std::size_t>((h * 333 + 332) * 64 + dd)] * D.scale();
              logit += x * to_float(kv(per_q ? u / G : u, t, dd));
              mag += std::abs(x * to_float(kv(per_q ? u / G : u, t, dd)));
            }
          ASSERT_GE(U, logit - 1e-6 * mag) << "unit " << u << " page " << p << " key " << t
                                           << (per_q ? " (per query head)" : " (group sum)");
        }
      }
  }
}

TEST(Quest, CurrentPageIsAlwaysAttended) {
  Data D(4, 2, 200, 32, 31);
  // The current page's keys point away from the query: its bound ranks last.
  for (index_t h = 0; h < 2; ++h)
    for (index_t t = 192; t < 200; ++t)
      for (index_t dd = 0; dd < 32; ++dd)
        D.kat(h, t, dd) = -8.0f * D.q[static_cast<std::size_t>((2 * h * 200 + 199) * 32 + dd)];
  for (const index_t n_q : {1, 3, 12}) {  // 12 new tokens straddle pages 11 and 12
    auto c = make_cache<kv::ContiguousCache<float>>(D, 200, 16);
    c.append(D.ks(0, 200), D.vs(0, 200));
    for (const index_t budget : {1, 16, 48}) {
      methods::QuestOptions o;
      o.budget = budget;
      const auto plan = methods::quest::select(D.qs(200 - n_q, n_q), c, o);
      const index_t first_cur = (200 - n_q) / 16;
      const auto sel = selected_positions(plan.keys, c);
      for (index_t u = 0; u < 2; ++u) {
        const std::set<index_t> keys(sel[static_cast<std::size_t>(u)].begin(),
                                     sel[static_cast<std::size_t>(u)].end());
        for (index_t j = first_cur * 16; j < 200; ++j)
          ASSERT_TRUE(keys.count(j)) << "n_q " << n_q << " budget " << budget << " key " << j;
        EXPECT_EQ(static_cast<index_t>(keys.size()), budget / 16 * 16 + 200 - first_cur * 16);
      }
      EXPECT_LT(rel_err(run_decode(D, c, 200 - n_q, n_q, plan.keys),
                        oracle<float>(D, 200 - n_q, n_q, sel)),
                kTol);
    }
  }
}

TEST(Quest, SelectsTopBoundPagesWithTiesTowardTheLowerPage) {
  Data D(4, 2, 160, 32, 37);
  for (index_t h = 0; h < 2; ++h)  // pages 0..8 identical: equal bounds
    for (index_t t = 16; t < 144; ++t)
      for (index_t dd = 0; dd < 32; ++dd) D.kat(h, t, dd) = D.kat(h, t % 16, dd);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 160, 16);
  c.append(D.ks(0, 160), D.vs(0, 160));
  methods::QuestOptions o;
  o.budget = 3 * 16;
  const auto plan = methods::quest::select(D.qs(159, 1), c, o);
  for (index_t u = 0; u < 2; ++u) {
    const float* U = plan.bounds.data() + u * plan.bound_stride;
    // Expected: the three best of pages 0..8 (ties by index) among 0..8 vs page 9's bound.
    std::vector<index_t> order(9);
    std::iota(order.begin(), order.end(), index_t{0});
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return U[a] > U[b]; });
    std::vector<index_t> want(order.begin(), order.begin() + 3);
    std::sort(want.begin(), want.end());
    EXPECT_EQ(want, (std::vector<index_t>{0, 1, 2})) << "equal bounds keep the lowest pages";
    std::vector<index_t> got;
    for (const KeyRange* r = plan.keys.ranges_begin(u); r != plan.keys.ranges_end(u); ++r)
      for (index_t p = r->begin / 16; p * 16 < r->end; ++p) got.push_back(p);
    EXPECT_EQ(got, (std::vector<index_t>{0, 1, 2, 9}));
  }
}

TEST(Quest, CompressionOneIsDense) {
  const Data D(8, 2, 500, 64, 41);
  auto c = make_cache<kv::PagedCache<bf16>>(D, 500);
  c.append(D.ks(0, 500), D.vs(0, 500));
  const auto dense = run_decode(D, c, 499, 1);
  methods::QuestOptions o;
  o.compression = 1.0;
  const auto plan = methods::quest::select(D.qs(499, 1), c, o);
  EXPECT_TRUE(plan.dense);
  EXPECT_EQ(plan.keys.scope(), KeySelection::Scope::all);
  EXPECT_DOUBLE_EQ(plan.compression(), 1.0);
  EXPECT_LE(rel_err(run_decode(D, c, 499, 1, plan.keys), dense), 1e-5);
  o.budget = 10000;  // a budget covering the cache is dense as well
  EXPECT_TRUE(methods::quest::select(D.qs(499, 1), c, o).dense);
  EXPECT_LE(rel_err(dense, oracle<bf16>(D, 499, 1, all_positions(2, 500))), kTol);
}

TEST(Quest, OutputEqualsOracleOnSelectedPagesForBothScopes) {
  const Data D(8, 2, 400, 64, 43);
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  for (const bool per_q : {false, true}) {
    methods::QuestOptions o;
    o.compression = 5;
    o.per_query_head = per_q;
    const auto plan = methods::quest::select(D.qs(399, 1), c, o);
    EXPECT_EQ(plan.keys.scope(),
              per_q ? KeySelection::Scope::per_q_head : KeySelection::Scope::per_kv_head);
    EXPECT_EQ(plan.keys.units(), per_q ? 8 : 2);
    const auto got = run_decode(D, c, 399, 1, plan.keys);
    const std::vector<bf16> kr = rounded<bf16>(D.k), vr = rounded<bf16>(D.v);
    const auto want = reference::attention(
        D.qs(399, 1), TensorView<const bf16>(kr.data(), 2, 400, 64),
        TensorView<const bf16>(vr.data(), 2, 400, 64), D.scale(),
        [&](index_t h, index_t, index_t j) {
          const index_t u = per_q ? h : h / 4;
          for (const KeyRange* r = plan.keys.ranges_begin(u); r != plan.keys.ranges_end(u); ++r)
            if (j >= r->begin && j < r->end) return true;
          return false;
        });
    EXPECT_LE(rel_err(got, want), kTol) << (per_q ? "per query head" : "per KV head");
  }
}

TEST(Quest, ReportsKeysReadAndAchievedCompression) {
  const Data D(8, 2, 1000, 32, 47);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 1000);
  c.append(D.ks(0, 1000), D.vs(0, 1000));
  for (const double target : {2.0, 4.0, 10.0}) {
    methods::QuestOptions o;
    o.compression = target;
    const auto plan = methods::quest::select(D.qs(999, 1), c, o);
    index_t keys = 0;
    for (index_t u = 0; u < 2; ++u) keys += plan.keys.keys(u, 1000);
    EXPECT_EQ(plan.stats.kv_rows, keys);
    EXPECT_EQ(plan.stats.pairs, 4 * keys);  // G = 4 query heads share each list
    EXPECT_EQ(plan.stats.dense_pairs, 8 * 1000);
    const index_t B = plan.budget_pages[0], cur = 1000 - 62 * 16;
    EXPECT_EQ(keys / 2, B * 16 + cur);
    EXPECT_LE(plan.compression(), target);  // the smallest B reaching the target from below
    EXPECT_GT(1000.0 / static_cast<double>((B - 1) * 16 + cur), target);
  }
}

// ---------------------------------------------------------------------------------------------
// SnapKV / Ada-SnapKV

// Window scores from the oracle: per KV head, reduce over the last w queries and the group of
// softmax probabilities (sum of group means, or max), prefix pooled with kernel 7.
std::vector<double> window_scores_oracle(const Data& D, index_t n, index_t w, bool use_max) {
  const index_t G = D.hq / D.hkv;
  std::vector<double> raw(static_cast<std::size_t>(D.hkv * n), 0.0), out(raw.size(), 0.0);
  for (index_t h = 0; h < D.hq; ++h)
    for (index_t i = n - w; i < n; ++i) {
      std::vector<double> s(static_cast<std::size_t>(i + 1));
      double mx = -INFINITY, sum = 0.0;
      for (index_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (index_t c = 0; c < D.d; ++c)
          dot += double{D.q[static_cast<std::size_t>((h * D.n + i) * D.d + c)]} *
                 D.k[static_cast<std::size_t>(((h / G) * D.n + j) * D.d + c)];
        s[static_cast<std::size_t>(j)] = dot * D.scale();
        mx = std::max(mx, s[static_cast<std::size_t>(j)]);
      }
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (index_t j = 0; j <= i; ++j) {
        double& r = raw[static_cast<std::size_t>((h / G) * n + j)];
        const double p = s[static_cast<std::size_t>(j)] / sum;
        r = use_max ? std::max(r, p) : r + p / static_cast<double>(G);
      }
    }
  for (index_t h = 0; h < D.hkv; ++h)
    for (index_t j = 0; j < n; ++j) {
      if (j >= n - w) {
        out[static_cast<std::size_t>(h * n + j)] = raw[static_cast<std::size_t>(h * n + j)];
        continue;
      }
      double acc = 0.0;
      for (index_t t = j - 3; t <= j + 3; ++t)
        if (t >= 0 && t < n - w) acc += raw[static_cast<std::size_t>(h * n + t)];
      out[static_cast<std::size_t>(h * n + j)] = acc / 7.0;
    }
  return out;
}

TEST(SnapKV, ScoresArePooledObservationWindowAttention) {
  const Data D(8, 2, 300, 32, 53);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 300);
  c.append(D.ks(0, 300), D.vs(0, 300));
  for (const index_t w : {24, 3})  // 3 x G = 12 rows take the direct (untiled) score path
    for (const bool ada : {false, true}) {
      methods::AdaSnapKVOptions o;
      o.window = w;
      const kv::EvictionPlan plan = ada ? methods::ada_snapkv::select(D.qs(250, 50), c, o)
                                        : methods::snapkv::select(D.qs(250, 50), c, o);
      const auto want = window_scores_oracle(D, 300, w, ada);
      ASSERT_EQ(plan.scores.size(), want.size());
      for (std::size_t i = 0; i < want.size(); ++i)
        ASSERT_NEAR(plan.scores[i], want[i], 1e-6 + 1e-5 * want[i])
            << (ada ? "ada " : "snapkv ") << i << " w " << w;
    }
}

TEST(SnapKV, KeepsSinksAndObservationWindow) {
  const Data D(8, 2, 400, 32, 59);
  for (const index_t budget : {40, 60, 100}) {
    auto c = make_cache<kv::PagedCache<bf16>>(D, 400);
    c.append(D.ks(0, 400), D.vs(0, 400));
    methods::SnapKVOptions o;
    o.budget = budget;
    o.window = 32;
    const auto plan = methods::snapkv::evict(D.qs(300, 100), c, o);
    for (index_t h = 0; h < 2; ++h) {
      const std::set<index_t> kept(c.positions(h), c.positions(h) + c.length(h));
      for (index_t j = 0; j < 4; ++j) EXPECT_TRUE(kept.count(j)) << "sink " << j;
      for (index_t j = 368; j < 400; ++j) EXPECT_TRUE(kept.count(j)) << "window " << j;
    }
    expect_rows_match_positions(D, c, "snapkv budget " + std::to_string(budget));
  }
}

TEST(SnapKV, EveryHeadKeepsExactlyC) {
  const Data D(8, 2, 400, 32, 61);
  for (const double cr : {1.5, 4.0, 10.0}) {
    auto c = make_cache<kv::ContiguousCache<bf16>>(D, 400);
    c.append(D.ks(0, 400), D.vs(0, 400));
    methods::SnapKVOptions o;
    o.compression = cr;
    const auto plan = methods::snapkv::evict(D.qs(368, 32), c, o);
    const index_t want = static_cast<index_t>(std::ceil(400.0 / cr));
    EXPECT_EQ(plan.budget, want);
    for (index_t h = 0; h < 2; ++h) EXPECT_EQ(c.length(h), want) << "CR " << cr << " head " << h;
  }
  // A budget below the forced tokens is raised to them and flagged unreachable.
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  methods::SnapKVOptions o;
  o.budget = 10;
  const auto plan = methods::snapkv::evict(D.qs(368, 32), c, o);
  EXPECT_FALSE(plan.reachable);
  EXPECT_EQ(c.length(0), 36);
}

TEST(SnapKV, KeepsTheTopScoredTokensInPositionOrder) {
  const Data D(8, 2, 400, 32, 67);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  methods::SnapKVOptions o;
  o.compression = 5;
  const auto plan = methods::snapkv::select(D.qs(368, 32), c, o);
  for (index_t h = 0; h < 2; ++h) {
    const auto& keep = plan.keep[static_cast<std::size_t>(h)];
    EXPECT_TRUE(std::is_sorted(keep.begin(), keep.end()));
    const std::set<index_t> kept(keep.begin(), keep.end());
    float worst_kept = INFINITY, best_dropped = -INFINITY;
    for (index_t j = 4; j < 368; ++j) {
      if (kept.count(j))
        worst_kept = std::min(worst_kept, plan.head_scores(h)[j]);
      else
        best_dropped = std::max(best_dropped, plan.head_scores(h)[j]);
    }
    EXPECT_GE(worst_kept, best_dropped);
  }
}

TEST(SnapKV, CompressionOneIsDense) {
  const Data D(8, 2, 300, 32, 71);
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 310);
  c.append(D.ks(0, 299), D.vs(0, 299));
  methods::SnapKVOptions o;
  o.compression = 1.0;
  const auto plan = methods::snapkv::evict(D.qs(267, 32), c, o);
  EXPECT_TRUE(plan.dense);
  EXPECT_EQ(c.length(0), 299);
  c.append(D.ks(299, 1), D.vs(299, 1));
  EXPECT_LE(rel_err(run_decode(D, c, 299, 1), oracle<bf16>(D, 299, 1, all_positions(2, 300))),
            kTol);
}

TEST(AdaSnapKV, TotalKeptIsExactlyCTimesHkv) {
  const Data D(8, 4, 300, 32, 73);
  bool some_uneven = false;
  for (const index_t c_tok : {30, 45, 77, 150, 299}) {
    auto c = make_cache<kv::PagedCache<bf16>>(D, 300);
    c.append(D.ks(0, 300), D.vs(0, 300));
    methods::AdaSnapKVOptions o;
    o.budget = c_tok;
    o.window = 16;
    const auto plan = methods::ada_snapkv::evict(D.qs(284, 16), c, o);
    EXPECT_EQ(c.total_length(), c_tok * 4) << "c " << c_tok;
    EXPECT_EQ(plan.total_kept(), c_tok * 4);
    for (index_t h = 0; h < 4; ++h)
      EXPECT_GE(c.length(h), std::max<index_t>(c_tok / 5, 20)) << "per-head floor, c " << c_tok;
    some_uneven = some_uneven || !c.uniform();
    expect_rows_match_positions(D, c, "ada c " + std::to_string(c_tok));
  }
  EXPECT_TRUE(some_uneven) << "heads should receive different budgets";
}

TEST(AdaSnapKV, KeepsForcedTokensInEveryHead) {
  const Data D(8, 4, 300, 32, 79);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 300);
  c.append(D.ks(0, 300), D.vs(0, 300));
  methods::AdaSnapKVOptions o;
  o.compression = 8;
  o.window = 16;
  methods::ada_snapkv::evict(D.qs(284, 16), c, o);
  for (index_t h = 0; h < 4; ++h) {
    const std::set<index_t> kept(c.positions(h), c.positions(h) + c.length(h));
    for (index_t j : {0, 1, 2, 3}) EXPECT_TRUE(kept.count(j)) << "head " << h << " sink " << j;
    for (index_t j = 284; j < 300; ++j)
      EXPECT_TRUE(kept.count(j)) << "head " << h << " window " << j;
  }
}

TEST(AdaSnapKV, DecodeAttendsEachHeadsOwnLength) {
  const Data D(8, 2, 320, 64, 83);
  auto c = make_cache<kv::PagedCache<bf16>>(D, 320);
  c.append(D.ks(0, 300), D.vs(0, 300));
  methods::AdaSnapKVOptions o;
  o.compression = 6;
  methods::ada_snapkv::evict(D.qs(268, 32), c, o);
  ASSERT_FALSE(c.uniform());
  c.append(D.ks(300, 1), D.vs(300, 1));  // one token
  EXPECT_LE(rel_err(run_decode(D, c, 300, 1), oracle<bf16>(D, 300, 1, cache_positions(c))), kTol);
  c.append(D.ks(301, 3), D.vs(301, 3));  // three tokens at once: each sees its own causal prefix
  EXPECT_LE(rel_err(run_decode(D, c, 301, 3), oracle<bf16>(D, 301, 3, cache_positions(c))), kTol);
  // Quest over the uneven cache, too.
  methods::QuestOptions qo;
  qo.compression = 3;
  const auto plan = methods::quest::select(D.qs(301, 3), c, qo);
  ASSERT_NE(plan.keys.scope(), KeySelection::Scope::all);
  EXPECT_LE(rel_err(run_decode(D, c, 301, 3, plan.keys),
                    oracle<bf16>(D, 301, 3, selected_positions(plan.keys, c))),
            kTol);
}

// ---------------------------------------------------------------------------------------------
// H2O and StreamingLLM

// Column sums of causal attention of q rows [r0, r1) (positions r0..), summed over the group.
std::vector<double> column_sums_oracle(const Data& D, index_t r0, index_t r1,
                                       const std::vector<std::vector<index_t>>& keys) {
  const index_t G = D.hq / D.hkv;
  std::vector<double> out(static_cast<std::size_t>(D.hkv * D.n), 0.0);
  for (index_t h = 0; h < D.hq; ++h)
    for (index_t i = r0; i < r1; ++i) {
      const auto& ks = keys[static_cast<std::size_t>(h / G)];
      std::vector<double> s;
      double mx = -INFINITY, sum = 0.0;
      for (index_t j : ks) {
        if (j > i) break;
        double dot = 0.0;
        for (index_t c = 0; c < D.d; ++c)
          dot += double{D.q[static_cast<std::size_t>((h * D.n + i) * D.d + c)]} *
                 D.k[static_cast<std::size_t>(((h / G) * D.n + j) * D.d + c)];
        s.push_back(dot * D.scale());
        mx = std::max(mx, s.back());
      }
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (std::size_t e = 0; e < s.size(); ++e)
        out[static_cast<std::size_t>((h / G) * D.n + ks[e])] += s[e] / sum;
    }
  return out;
}

TEST(H2O, PrefillScoresAreCausalAttentionColumnSums) {
  const Data D(4, 2, 200, 32, 89);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 200);
  c.append(D.ks(0, 200), D.vs(0, 200));
  methods::H2OOptions o;
  o.heavy = 1000;  // no eviction: compare every score
  o.recent = 8;
  methods::h2o::State st;
  st.reset(c, o);
  st.observe(D.qs(0, 200), c, true);
  const auto want = column_sums_oracle(D, 0, 200, all_positions(2, 200));
  for (index_t h = 0; h < 2; ++h)
    for (index_t j = 0; j < 200; ++j)
      ASSERT_NEAR(st.scores(h)[j], want[static_cast<std::size_t>(h * 200 + j)],
                  1e-5 * (1 + want[static_cast<std::size_t>(h * 200 + j)]))
          << "head " << h << " key " << j;
}

TEST(H2O, StepAddsTheStepsAttentionProbabilitiesAndDropsEvictedScores) {
  const Data D(4, 2, 260, 32, 97);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 260);
  c.append(D.ks(0, 200), D.vs(0, 200));
  methods::H2OOptions o;
  o.heavy = 20;
  o.recent = 10;
  methods::h2o::State st;
  st.reset(c, o);
  st.observe(D.qs(0, 200), c, true);
  st.apply(st.select(c), c);
  for (index_t t = 200; t < 210; ++t) {
    const auto before_pos = cache_positions(c);
    std::vector<std::vector<float>> before(2);
    for (index_t h = 0; h < 2; ++h)
      before[static_cast<std::size_t>(h)].assign(st.scores(h), st.scores(h) + c.length(h));
    c.append(D.ks(t, 1), D.vs(t, 1));
    st.observe(D.qs(t, 1), c);
    const auto probs = column_sums_oracle(D, t, t + 1, cache_positions(c));
    for (index_t h = 0; h < 2; ++h)
      for (index_t s = 0; s < c.length(h); ++s) {
        const double prev = s < static_cast<index_t>(before[static_cast<std::size_t>(h)].size())
                                ? before[static_cast<std::size_t>(h)][static_cast<std::size_t>(s)]
                                : 0.0;
        ASSERT_NEAR(st.scores(h)[s],
                    prev + probs[static_cast<std::size_t>(h * D.n + c.position(h, s))],
                    1e-5 * (1 + prev))
            << "step " << t << " head " << h << " slot " << s;
      }
    const auto plan = st.select(c);
    std::vector<float> kept_scores;
    for (index_t s : plan.keep[0]) kept_scores.push_back(st.scores(0)[s]);
    st.apply(plan, c);
    for (std::size_t i = 0; i < kept_scores.size(); ++i) ASSERT_EQ(st.scores(0)[i], kept_scores[i]);
  }
}

TEST(H2O, KeepsRecentWindowAndHeavyHittersEveryStep) {
  const Data D(8, 2, 300, 32, 101);
  auto c = make_cache<kv::PagedCache<bf16>>(D, 300);
  c.append(D.ks(0, 250), D.vs(0, 250));
  methods::H2OOptions o;
  o.heavy = 12;
  o.recent = 8;
  methods::h2o::State st;
  st.reset(c, o);
  st.observe(D.qs(0, 250), c, true);
  for (index_t t = 250; t <= 280; ++t) {
    if (t > 250) {
      c.append(D.ks(t - 1, 1), D.vs(t - 1, 1));
      st.observe(D.qs(t - 1, 1), c);
    }
    const kv::EvictionPlan plan = st.select(c);
    for (index_t h = 0; h < 2; ++h) {
      const index_t n = c.length(h);
      const std::set<index_t> kept(plan.keep[static_cast<std::size_t>(h)].begin(),
                                   plan.keep[static_cast<std::size_t>(h)].end());
      ASSERT_EQ(static_cast<index_t>(kept.size()), 20);
      for (index_t s = n - 8; s < n; ++s) ASSERT_TRUE(kept.count(s)) << "recent slot " << s;
      float worst_kept = INFINITY, best_dropped = -INFINITY;
      for (index_t s = 0; s < n - 8; ++s) {
        if (kept.count(s))
          worst_kept = std::min(worst_kept, st.scores(h)[s]);
        else
          best_dropped = std::max(best_dropped, st.scores(h)[s]);
      }
      ASSERT_GE(worst_kept, best_dropped) << "heavy hitters are the best-scored older tokens";
    }
    st.apply(plan, c);
    ASSERT_EQ(c.length(0), 20);
    ASSERT_EQ(c.length(1), 20);
    for (index_t h = 0; h < 2; ++h)
      for (index_t s = 12; s < 20; ++s) ASSERT_EQ(c.position(h, s), c.sequence_length() - 20 + s);
  }
}

TEST(StreamingLLM, KeepsSinksAndRecentWindowThroughDecode) {
  const Data D(4, 2, 300, 32, 103);
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 300);
  SessionOptions so;
  so.eviction = Eviction::streaming;
  so.streaming.sinks = 4;
  so.streaming.window = 40;
  DecodeSession<kv::ContiguousCache<bf16>> s(c, so);
  const auto pr = s.ingest(D.qs(0, 200), D.ks(0, 200), D.vs(0, 200));
  EXPECT_NEAR(pr.cache_compression(2), 200.0 / 44.0, 1e-12);
  std::vector<float> o(static_cast<std::size_t>(4 * 32));
  for (index_t t = 200; t < 230; ++t) {
    for (index_t h = 0; h < 2; ++h) {
      std::vector<index_t> want{0, 1, 2, 3};
      for (index_t j = t - 40; j < t; ++j) want.push_back(j);
      ASSERT_EQ(cache_positions(c)[static_cast<std::size_t>(h)], want) << "before step " << t;
    }
    const StepReport r =
        s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(o.data(), 4, 1, 32));
    EXPECT_EQ(r.stats.pairs, 4 * 45);  // sinks + window + the new token
    EXPECT_NEAR(r.compression(), static_cast<double>(t + 1) / 45.0, 1e-12);
  }
}

// ---------------------------------------------------------------------------------------------
// Eviction through the pipeline, against the oracle on the kept set

template <class Cache>
void check_session_against_oracle(const SessionOptions& so, const std::string& what,
                                  index_t prompt = 256, index_t steps = 6) {
  using T = typename Cache::value_type;
  const Data D(8, 2, prompt + steps, 64, 107);
  auto c = make_cache<Cache>(D, prompt + steps);
  DecodeSession<Cache> s(c, so);
  s.ingest(D.qs(0, prompt), D.ks(0, prompt), D.vs(0, prompt));
  std::vector<float> o(static_cast<std::size_t>(8 * 64));
  for (index_t t = prompt; t < prompt + steps; ++t) {
    auto keep = cache_positions(c);
    for (auto& k : keep) k.push_back(t);  // the step attends the cache plus its own token
    const StepReport r =
        s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(o.data(), 8, 1, 64));
    index_t kept = 0;
    for (const auto& k : keep) kept += static_cast<index_t>(k.size());
    if (so.decode == DecodeMethod::dense) {
      ASSERT_LE(rel_err(o, oracle<T>(D, t, 1, keep)), kTol) << what << " step " << t;
      EXPECT_EQ(r.stats.pairs, 4 * kept) << what;
    }
    EXPECT_EQ(r.stats.dense_pairs, 8 * (t + 1)) << what;
  }
}

TEST(Eviction, DecodeOverEvictedCacheEqualsOracleOnKeptTokens) {
  SessionOptions so;
  so.snapkv.compression = 4;
  so.ada_snapkv.compression = 4;
  so.h2o.compression = 4;
  so.streaming.window = 50;
  for (const Eviction e :
       {Eviction::snapkv, Eviction::ada_snapkv, Eviction::h2o, Eviction::streaming}) {
    so.eviction = e;
    const std::string name = "eviction " + std::to_string(static_cast<int>(e));
    check_session_against_oracle<kv::ContiguousCache<float>>(so, name + " contiguous fp32");
    check_session_against_oracle<kv::PagedCache<bf16>>(so, name + " paged bf16");
  }
}

// Random appends (1..40 tokens), random per-head evictions and dense or Quest decodes of the newest
// 1..3 tokens, on a paged and a contiguous cache in lock step, checked against the oracle.
template <class T>
void randomized_sequences(unsigned seed, int trials) {
  std::mt19937 rng(seed);
  for (int trial = 0; trial < trials; ++trial) {
    const index_t n = 400;
    const Data D(4, 2, n, 32, seed + static_cast<unsigned>(trial));
    auto pc = make_cache<kv::PagedCache<T>>(D, n, 8,
                                            trial % 2 ? PageTable::shared : PageTable::per_kv_head);
    auto cc = make_cache<kv::ContiguousCache<T>>(D, n, 8);
    index_t at = 0;
    while (at < n) {
      const index_t m =
          std::min<index_t>(n - at, std::uniform_int_distribution<index_t>(1, 40)(rng));
      pc.append(D.ks(at, m), D.vs(at, m));
      cc.append(D.ks(at, m), D.vs(at, m));
      at += m;
      const index_t nq = std::min<index_t>(m, std::uniform_int_distribution<index_t>(1, 3)(rng));
      KeySelection keys = KeySelection::all();
      if (std::bernoulli_distribution(0.5)(rng)) {
        methods::QuestOptions qo;
        qo.budget = std::uniform_int_distribution<index_t>(1, 64)(rng);
        keys = methods::quest::select(D.qs(at - nq, nq), pc, qo).keys;
      }
      const auto got = run_decode(D, pc, at - nq, nq, keys);
      ASSERT_LE(rel_err(got, oracle<T>(D, at - nq, nq, selected_positions(keys, pc))), kTol)
          << dtype_name<T>() << " trial " << trial << " at " << at;
      ASSERT_EQ(got, run_decode(D, cc, at - nq, nq, keys))
          << "paged vs contiguous, trial " << trial;
      expect_bounds_exact(pc, "randomized");
      if (std::bernoulli_distribution(0.4)(rng)) {  // evict a random subset, never the newest token
        std::vector<std::vector<index_t>> keep(2);
        for (index_t h = 0; h < 2; ++h) {
          const double p = std::uniform_real_distribution<double>(0.3, 1.0)(rng);
          for (index_t s = 0; s < pc.length(h); ++s)
            if (s == pc.length(h) - 1 || std::bernoulli_distribution(p)(rng))
              keep[static_cast<std::size_t>(h)].push_back(s);
        }
        pc.retain(keep);
        cc.retain(keep);
        ASSERT_EQ(cache_positions(pc), cache_positions(cc));
        expect_rows_match_positions(D, pc, "randomized after retain");
      }
    }
  }
}

TEST(Eviction, RandomizedAppendEvictDecodeSequencesMatchOracle) {
  randomized_sequences<bf16>(113, 16);
  randomized_sequences<fp16>(331, 8);
}

TEST(KvCache, PrefillKernelReadsPagedViewsInPlace) {
  const Data D(8, 2, 200, 64, 139);
  auto pc = make_cache<kv::PagedCache<bf16>>(D, 256, 16, PageTable::shared);
  pc.append(D.ks(0, 200), D.vs(0, 200));
  const std::vector<bf16> kr = rounded<bf16>(D.k), vr = rounded<bf16>(D.v);
  const IntervalMask mask = methods::dense(8, 64, 200);  // the last 64 queries (chunked prefill)
  std::vector<float> a(static_cast<std::size_t>(8 * 64 * 64)), b(a.size());
  prefill(D.qs(136, 64), pc.keys(), pc.values(), TensorView<float>(a.data(), 8, 64, 64), mask);
  prefill(D.qs(136, 64), TensorView<const bf16>(kr.data(), 2, 200, 64),
          TensorView<const bf16>(vr.data(), 2, 200, 64), TensorView<float>(b.data(), 8, 64, 64),
          mask);
  EXPECT_EQ(a, b);
}

TEST(DecodeMethods, RejectBadArgumentsWithInvalidArgument) {
  const Data D(8, 2, 100, 32, 149);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 100);
  c.append(D.ks(0, 100), D.vs(0, 100));
  methods::QuestOptions qo;
  qo.compression = 0.5;
  EXPECT_THROW(methods::quest::select(D.qs(99, 1), c, qo), sparse_attn::invalid_argument);
  kv::CacheOptions co;
  co.kv_heads = 2;
  co.head_dim = 32;
  co.capacity = 100;
  co.key_bounds = false;
  kv::ContiguousCache<float> nb(co);
  nb.append(D.ks(0, 10), D.vs(0, 10));
  EXPECT_THROW(methods::quest::select(D.qs(9, 1), nb, methods::QuestOptions{}),
               sparse_attn::invalid_argument);
  const std::vector<std::vector<index_t>> keep{{0, 1, 2}, {0, 1}};
  auto ragged = c;
  ragged.retain(keep);
  EXPECT_THROW(methods::snapkv::select(D.qs(99, 1), ragged), sparse_attn::invalid_argument);
  methods::SnapKVOptions so;
  so.pool_kernel = 4;
  EXPECT_THROW(methods::snapkv::select(D.qs(68, 32), c, so), sparse_attn::invalid_argument);
  EXPECT_THROW(c.retain(std::vector<std::vector<index_t>>{{3, 2}, {0}}),
               sparse_attn::invalid_argument);
  EXPECT_THROW(c.retain(std::vector<std::vector<index_t>>{{0}}), sparse_attn::invalid_argument);
  co.kv_heads = 0;
  EXPECT_THROW(kv::ContiguousCache<float>{co}, sparse_attn::invalid_argument);
  methods::h2o::State st;
  EXPECT_THROW(st.observe(D.qs(99, 1), c), sparse_attn::invalid_argument);  // reset() first
}

// ---------------------------------------------------------------------------------------------
// Every method at compression 1 is dense

TEST(DecodeMethods, CompressionOneEqualsDenseForEveryMethod) {
  const Data D(8, 2, 300, 64, 127);
  auto run = [&](const SessionOptions& so) {
    auto c = make_cache<kv::PagedCache<bf16>>(D, 300);
    DecodeSession<kv::PagedCache<bf16>> s(c, so);
    s.ingest(D.qs(0, 296), D.ks(0, 296), D.vs(0, 296));
    std::vector<float> o(static_cast<std::size_t>(8 * 4 * 64));
    for (index_t t = 296; t < 300; ++t) {
      const StepReport r =
          s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1),
                 TensorView<float>(o.data() + (t - 296) * 64, 8, 1, 64, 4 * 64, 64, 1));
      EXPECT_DOUBLE_EQ(r.compression(), 1.0);
    }
    return o;
  };
  const auto dense = run(SessionOptions{});
  SessionOptions so;
  so.decode = DecodeMethod::quest;
  so.quest.compression = 1;
  EXPECT_LE(rel_err(run(so), dense), 1e-5) << "quest";
  so = SessionOptions{};
  so.snapkv.compression = so.ada_snapkv.compression = so.h2o.compression =
      so.streaming.compression = 1;
  for (const Eviction e : {Eviction::snapkv, Eviction::ada_snapkv, Eviction::h2o}) {
    so.eviction = e;
    EXPECT_LE(rel_err(run(so), dense), 1e-5) << "eviction " << static_cast<int>(e);
  }
  so.eviction = Eviction::streaming;
  EXPECT_LE(rel_err(run(so), dense), 1e-5) << "streaming";
}

// ---------------------------------------------------------------------------------------------
// Pipeline

TEST(Pipeline, PrefillAcceptsAMaskOrAMaskFactory) {
  const Data D(8, 2, 200, 32, 131);
  std::vector<float> direct(static_cast<std::size_t>(8 * 200 * 32)), a(direct.size()),
      b(direct.size());
  const IntervalMask mask = methods::sliding_window(8, 200, 200, {48, 4, 32});
  prefill(D.qv(), D.kv(), D.vv(), TensorView<float>(direct.data(), 8, 200, 32), mask);
  auto c1 = make_cache<kv::ContiguousCache<bf16>>(D, 220);
  auto c2 = make_cache<kv::ContiguousCache<bf16>>(D, 220);
  DecodeSession<kv::ContiguousCache<bf16>> s1(c1), s2(c2);
  const PrefillReport r1 =
      s1.prefill(D.qv(), D.kv(), D.vv(), TensorView<float>(a.data(), 8, 200, 32), mask);
  const PrefillReport r2 =
      s2.prefill(D.qv(), D.kv(), D.vv(), TensorView<float>(b.data(), 8, 200, 32),
                 [](const TensorView<const float>& q, const TensorView<const float>& k) {
                   return methods::sliding_window(q.heads, q.tokens, k.tokens, {48, 4, 32});
                 });
  EXPECT_EQ(a, direct);
  EXPECT_EQ(b, direct);
  EXPECT_EQ(r1.pairs, mask.pairs());
  EXPECT_DOUBLE_EQ(r2.compression(), mask.compression());
  EXPECT_EQ(c1.length(0), 200);
  EXPECT_THROW(s1.prefill(D.qv(), D.kv(), D.vv(), TensorView<float>(a.data(), 8, 200, 32), mask),
               sparse_attn::invalid_argument);  // prefill starts a sequence
}

TEST(Pipeline, SelectThenAttendEqualsStep) {
  const Data D(8, 2, 300, 64, 137);
  SessionOptions so;
  so.decode = DecodeMethod::quest;
  so.quest.compression = 6;
  so.eviction = Eviction::snapkv;
  so.snapkv.compression = 2;
  auto c1 = make_cache<kv::PagedCache<bf16>>(D, 300);
  auto c2 = make_cache<kv::PagedCache<bf16>>(D, 300);
  DecodeSession<kv::PagedCache<bf16>> s1(c1, so), s2(c2, so);
  s1.ingest(D.qs(0, 290), D.ks(0, 290), D.vs(0, 290));
  s2.ingest(D.qs(0, 290), D.ks(0, 290), D.vs(0, 290));
  std::vector<float> a(static_cast<std::size_t>(8 * 64)), b(a.size());
  for (index_t t = 290; t < 300; ++t) {
    const StepReport r =
        s1.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(a.data(), 8, 1, 64));
    c2.append(D.ks(t, 1), D.vs(t, 1));
    kv::DecodeStats st;
    const KeySelection keys = s2.select(D.qs(t, 1), &st);                // the plan: time it alone
    s2.attend(D.qs(t, 1), keys, TensorView<float>(b.data(), 8, 1, 64));  // the kernel alone
    ASSERT_EQ(a, b) << "step " << t;
    EXPECT_EQ(r.stats.pairs, st.pairs);
    EXPECT_GT(r.compression(),
              6.0);  // Quest's CR x SnapKV's cache compression, per the full sequence
  }
}

}  // namespace
