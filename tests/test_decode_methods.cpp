// KV cache (contiguous, paged), Quest, SnapKV, Ada-SnapKV, H2O, StreamingLLM and the decode
// pipeline, against the double-precision oracle (reference.hpp) on exactly the keys each method
// keeps or selects, plus every invariant docs/METHODS.md states for them.

// GCC < 13 (PR 105593): with many kernel instantiations Eigen's pexp is emitted out of line and
// warns inside its AVX-512 intrinsics; the pragma has to cover Eigen's own lines.
#include <sparse_attn/core/diagnostics.hpp>
SPARSE_ATTN_DIAGNOSTICS_PUSH
#include <Eigen/Core>
SPARSE_ATTN_DIAGNOSTICS_POP

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <sparse_attn/pipeline.hpp>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <tuple>
#include <vector>

using namespace sparse_attn;
using kv::PageTable;
using methods::Budget;

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

// Positions of the tokens a session's cache holds for its policy: the live slots of a lazily
// evicting H2O (its dead slots wait for a batched compaction), else every slot.
template <class Cache>
std::vector<std::vector<index_t>> held_positions(const DecodeSession<Cache>& s) {
  if (s.num_policies() == 1) {
    if (const auto* h = dynamic_cast<const methods::H2OPolicy<Cache, float>*>(&s.policy()))
      return selected_positions(h->live_selection(s.cache()), s.cache());
  }
  return cache_positions(s.cache());
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
  decode(D.qs(t0, m), c, TensorView<float>(o.data(), D.hq, m, D.d), keys);
  return o;
}

// Quest's selection and page bounds for q on c.
template <class Cache>
std::pair<methods::DecodeSelection, methods::QuestPages> quest_select(
    const TensorView<const float>& q, const Cache& c, const Budget& b, bool per_q = false) {
  methods::Quest m;
  m.per_query_head = per_q;
  std::pair<methods::DecodeSelection, methods::QuestPages> r;
  m.select(q, c, b, {}, r.first, &r.second);
  return r;
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
  const Budget qb = Budget::compression(4);
  for (const bool quest : {false, true}) {
    const KeySelection keys =
        quest ? methods::Quest{}.select(D.qs(250, 1), c, qb).keys : KeySelection::all();
    const auto oc = run_decode(D, c, 250, 1, keys);
    EXPECT_EQ(oc, run_decode(D, ph, 250, 1, keys)) << "per-head page table, quest=" << quest;
    EXPECT_EQ(oc, run_decode(D, ps, 250, 1, keys)) << "shared page table, quest=" << quest;
    if (quest) {
      EXPECT_EQ(quest_select(D.qs(250, 1), ph, qb).second.bounds,
                quest_select(D.qs(250, 1), c, qb).second.bounds);
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
    const methods::QuestPages plan =
        quest_select(D.qs(332, 1), c, Budget::compression(10), per_q).second;
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
      const auto plan = methods::Quest{}.select(D.qs(200 - n_q, n_q), c, Budget::count(budget));
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
  const auto [sel, pages] = quest_select(D.qs(159, 1), c, Budget::count(3 * 16));
  const KeySelection& keys = sel.keys;
  for (index_t u = 0; u < 2; ++u) {
    const float* U = pages.bounds.data() + u * pages.bound_stride;
    // Expected: the three best of pages 0..8 (ties by index) among 0..8 vs page 9's bound.
    std::vector<index_t> order(9);
    std::iota(order.begin(), order.end(), index_t{0});
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return U[a] > U[b]; });
    std::vector<index_t> want(order.begin(), order.begin() + 3);
    std::sort(want.begin(), want.end());
    EXPECT_EQ(want, (std::vector<index_t>{0, 1, 2})) << "equal bounds keep the lowest pages";
    std::vector<index_t> got;
    for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
      for (index_t p = r->begin / 16; p * 16 < r->end; ++p) got.push_back(p);
    EXPECT_EQ(got, (std::vector<index_t>{0, 1, 2, 9}));
  }
}

TEST(Quest, CompressionOneIsDense) {
  const Data D(8, 2, 500, 64, 41);
  auto c = make_cache<kv::PagedCache<bf16>>(D, 500);
  c.append(D.ks(0, 500), D.vs(0, 500));
  const auto dense = run_decode(D, c, 499, 1);
  const auto [plan, pages] = quest_select(D.qs(499, 1), c, Budget::compression(1.0));
  EXPECT_TRUE(pages.dense);
  EXPECT_EQ(plan.keys.scope(), KeySelection::Scope::all);
  EXPECT_DOUBLE_EQ(plan.stats.compression(), 1.0);
  EXPECT_TRUE(plan.stats.reachable);
  EXPECT_LE(rel_err(run_decode(D, c, 499, 1, plan.keys), dense), 1e-5);
  // A budget covering the cache is dense as well.
  EXPECT_TRUE(quest_select(D.qs(499, 1), c, Budget::count(10000)).second.dense);
  EXPECT_TRUE(quest_select(D.qs(499, 1), c, Budget::mass(1.0)).second.dense);
  EXPECT_LE(rel_err(dense, oracle<bf16>(D, 499, 1, all_positions(2, 500))), kTol);
}

TEST(Quest, OutputEqualsOracleOnSelectedPagesForBothScopes) {
  const Data D(8, 2, 400, 64, 43);
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  for (const bool per_q : {false, true}) {
    const auto plan = quest_select(D.qs(399, 1), c, Budget::compression(5), per_q).first;
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
    const auto [plan, pages] = quest_select(D.qs(999, 1), c, Budget::compression(target));
    index_t keys = 0;
    for (index_t u = 0; u < 2; ++u) keys += plan.keys.keys(u, 1000);
    EXPECT_EQ(kv::decode_stats(plan.keys, c, 8, 1).kv_rows, keys);
    EXPECT_EQ(plan.stats.pairs, 4 * keys);  // G = 4 query heads share each list
    EXPECT_EQ(plan.stats.dense_pairs, 8 * 1000);
    const index_t B = pages.budget_pages[0], cur = 1000 - 62 * 16;
    EXPECT_EQ(keys / 2, B * 16 + cur);
    // The fewest pages not sparser than the target (count_for_compression, then whole pages).
    EXPECT_LE(plan.stats.compression(), target);
    EXPECT_GT(1000.0 / static_cast<double>((B - 1) * 16 + cur), target);
    EXPECT_TRUE(plan.stats.reachable) << "CR " << plan.stats.compression() << " for " << target;
    EXPECT_EQ(plan.stats.target.target_compression(), target);
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
      methods::AdaSnapKV a;
      a.window = w;
      methods::SnapKV sk;
      sk.window = w;
      const Budget b = Budget::compression(10);
      const kv::EvictionPlan plan =
          ada ? a.select(D.qs(250, 50), c, b) : sk.select(D.qs(250, 50), c, b);
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
    methods::SnapKV sk;
    sk.window = 32;
    const auto plan = methods::evict(sk, D.qs(300, 100), c, Budget::count(budget));
    EXPECT_TRUE(plan.stats.reachable);  // 36 forced tokens fit every budget
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
    const auto plan = methods::evict(methods::SnapKV{}, D.qs(368, 32), c, Budget::compression(cr));
    const index_t want = static_cast<index_t>(std::ceil(400.0 / cr));
    EXPECT_EQ(plan.stats.detail, "c=" + std::to_string(want) + " per head");
    EXPECT_EQ(plan.stats.pairs, 2 * want);
    EXPECT_EQ(plan.stats.dense_pairs, 2 * 400);
    EXPECT_TRUE(plan.stats.reachable) << "CR " << cr;
    for (index_t h = 0; h < 2; ++h) EXPECT_EQ(c.length(h), want) << "CR " << cr << " head " << h;
  }
  // A budget below the forced tokens is raised to them and flagged unreachable.
  auto c = make_cache<kv::ContiguousCache<bf16>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  const auto plan = methods::evict(methods::SnapKV{}, D.qs(368, 32), c, Budget::count(10));
  EXPECT_FALSE(plan.stats.reachable);
  EXPECT_EQ(c.length(0), 36);
}

TEST(SnapKV, KeepsTheTopScoredTokensInPositionOrder) {
  const Data D(8, 2, 400, 32, 67);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  const auto plan = methods::SnapKV{}.select(D.qs(368, 32), c, Budget::compression(5));
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
  const auto plan = methods::evict(methods::SnapKV{}, D.qs(267, 32), c, Budget::compression(1.0));
  EXPECT_TRUE(plan.dense);
  EXPECT_EQ(c.length(0), 299);
  c.append(D.ks(299, 1), D.vs(299, 1));
  EXPECT_LE(rel_err(run_decode(D, c, 299, 1), oracle<bf16>(D, 299, 1, all_positions(2, 300))),
            kTol);
}

// The mass rule in float64 on the oracle's scores: per head the forced tokens (sinks, window)
// plus the fewest others, best first, whose share of the head's total score reaches p; the
// smallest c and, when the running sum at c - 1 is within 1e-5 of the target (a tie the fp32
// scores may resolve either way), c - 1 too.
std::pair<index_t, index_t> snapkv_mass_oracle(const std::vector<double>& scores, index_t h,
                                               index_t n, index_t w, index_t sinks, double p) {
  const double* s = scores.data() + h * n;
  double total = 0.0, have = 0.0;
  std::vector<double> rest;
  for (index_t j = 0; j < n; ++j) {
    total += s[j];
    if (j < sinks || j >= n - w)
      have += s[j];
    else
      rest.push_back(s[j]);
  }
  std::sort(rest.begin(), rest.end(), std::greater<double>());
  const double want = p * total;
  index_t take = 0;
  double before = have;
  while (take < static_cast<index_t>(rest.size()) && have < want) {
    before = have;
    have += rest[static_cast<std::size_t>(take++)];
  }
  const index_t c = sinks + w + take;
  const bool tie = take > 0 && std::fabs(before - want) <= 1e-5 * total;
  return {tie ? c - 1 : c, c};
}

TEST(SnapKV, MassBudgetKeepsEachHeadsFewestTokensReachingP) {
  Data D(8, 2, 400, 32, 83);
  // The window queries of KV head 0's group share a component along e_0, and its keys
  // 100..109 lie along e_0 (logit ~ 4 x 10 / sqrt(32) = 7): its window attention concentrates
  // there, KV head 1's stays diffuse.
  for (index_t h = 0; h < 4; ++h)
    for (index_t i = 368; i < 400; ++i) D.q[static_cast<std::size_t>((h * 400 + i) * 32)] += 4.0f;
  for (index_t t = 100; t < 110; ++t)
    for (index_t c = 0; c < 32; ++c) D.kat(0, t, c) = c == 0 ? 10.0f : 0.0f;
  const auto want_scores = window_scores_oracle(D, 400, 32, false);
  for (const double p : {0.3, 0.6, 0.9, 0.99}) {
    auto c = make_cache<kv::ContiguousCache<float>>(D, 400);
    c.append(D.ks(0, 400), D.vs(0, 400));
    const auto plan = methods::SnapKV{}.select(D.qs(368, 32), c, Budget::mass(p));
    EXPECT_TRUE(plan.stats.reachable);
    EXPECT_EQ(plan.stats.target.str(), Budget::mass(p).str());
    index_t total = 0;
    for (index_t h = 0; h < 2; ++h) {
      const auto& keep = plan.keep[static_cast<std::size_t>(h)];
      const auto [lo, hi] = snapkv_mass_oracle(want_scores, h, 400, 32, 4, p);
      const auto kept = static_cast<index_t>(keep.size());
      EXPECT_GE(kept, lo) << "p " << p << " head " << h;
      EXPECT_LE(kept, hi) << "p " << p << " head " << h;
      // The kept set is the forced tokens plus the best-scored others (count rule at c).
      EXPECT_EQ(keep, kv::detail::keep_top(plan.head_scores(h), 400, kept, [](index_t j) {
                  return j < 4 || j >= 368;
                })) << "p " << p << " head " << h;
      total += kept;
    }
    EXPECT_EQ(plan.stats.pairs, total);
  }
  // Heads differ: a mass target gives each head its own c (the concentrated head 0 fewer).
  auto c = make_cache<kv::ContiguousCache<float>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  const auto plan = methods::SnapKV{}.select(D.qs(368, 32), c, Budget::mass(0.6));
  EXPECT_LT(plan.keep[0].size() + 20, plan.keep[1].size()) << plan.stats.detail;
  EXPECT_EQ(plan.stats.detail, "c=" + std::to_string(plan.keep[0].size()) + "-" +
                                   std::to_string(plan.keep[1].size()) + " per head");
}

TEST(SnapKV, MassBudgetFloorCapAndEdges) {
  const Data D(8, 2, 400, 32, 89);
  auto cache = [&] {
    auto c = make_cache<kv::ContiguousCache<float>>(D, 400);
    c.append(D.ks(0, 400), D.vs(0, 400));
    return c;
  };
  const auto c = cache();
  const auto q = D.qs(368, 32);
  const auto free = methods::SnapKV{}.select(q, c, Budget::mass(0.5));
  const auto n0 = static_cast<index_t>(free.keep[0].size()),
             n1 = static_cast<index_t>(free.keep[1].size());
  // A floor above both heads' counts raises them to it; a cap below lowers them to it; each
  // keeps the count rule's tokens at that c.
  for (const auto& [b, want0, want1] :
       {std::tuple<Budget, index_t, index_t>{Budget::mass(0.5, std::max(n0, n1) + 7),
                                             std::max(n0, n1) + 7, std::max(n0, n1) + 7},
        {Budget::mass(0.5, 0, std::min(n0, n1) - 3), std::min(n0, n1) - 3,
         std::min(n0, n1) - 3},
        {Budget::mass(0.5, 0, Budget::kNoCap), n0, n1}}) {
    const auto plan = methods::SnapKV{}.select(q, c, b);
    EXPECT_TRUE(plan.stats.reachable) << b.str();
    EXPECT_EQ(static_cast<index_t>(plan.keep[0].size()), want0) << b.str();
    EXPECT_EQ(static_cast<index_t>(plan.keep[1].size()), want1) << b.str();
    for (index_t h = 0; h < 2; ++h)
      EXPECT_EQ(plan.keep[static_cast<std::size_t>(h)],
                methods::SnapKV{}.select(q, c, Budget::count(h == 0 ? want0 : want1))
                    .keep[static_cast<std::size_t>(h)]);
  }
  // A cap below the 36 forced tokens keeps them and is not reachable.
  const auto tight = methods::SnapKV{}.select(q, c, Budget::mass(0.5, 0, 10));
  EXPECT_FALSE(tight.stats.reachable);
  EXPECT_EQ(tight.keep[0].size(), 36u);
  // p = 1 keeps every token with mass (every one here): dense.
  auto d = cache();
  const auto all = methods::evict(methods::SnapKV{}, q, d, Budget::mass(1.0));
  EXPECT_TRUE(all.dense);
  EXPECT_EQ(d.length(0), 400);
  EXPECT_EQ(d.length(1), 400);
  // Evicting with a mass budget leaves heads of different lengths that decode attends in full.
  auto e = cache();
  methods::evict(methods::SnapKV{}, q, e, Budget::mass(0.8));
  EXPECT_NE(e.length(0), e.length(1));
  expect_rows_match_positions(D, e, "snapkv mass");
  // Bad limits are refused by the budget itself.
  for (auto bad : {std::function<void()>([] { (void)Budget::mass(0.5, -1); }),
                   std::function<void()>([] { (void)Budget::mass(0.5, 10, 9); }),
                   std::function<void()>([] { (void)Budget::mass(0.5, 0, 0); })})
    EXPECT_THROW(bad(), sparse_attn::invalid_argument);
  EXPECT_EQ(Budget::mass(0.9, 64, 1024).str(), "mass=0.9,floor=64,cap=1024");
  EXPECT_EQ(Budget::mass(0.9).str(), "mass=0.9");
}

TEST(Quest, MassBudgetFloorAndCapBoundEveryUnitsPages) {
  Data D(4, 2, 640, 32, 97);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 640, 16);
  c.append(D.ks(0, 640), D.vs(0, 640));
  const index_t first_cur = 639 / 16;
  const auto [free, free_pages] = quest_select(D.qs(639, 1), c, Budget::mass(0.6));
  index_t bmin = first_cur, bmax = 0;
  for (index_t b : free_pages.budget_pages) bmin = std::min(bmin, b), bmax = std::max(bmax, b);
  ASSERT_GT(bmin, 2);
  ASSERT_LT(bmax, first_cur - 2);
  // floor / cap in tokens: B in [floor / P, cap / P]; the unbounded mass choice is clamped.
  for (const auto& [floor, cap] : {std::pair<index_t, index_t>{(bmax + 2) * 16, Budget::kNoCap},
                                   {0, (bmin - 1) * 16 + 5},
                                   {(bmin + 1) * 16, (bmin + 1) * 16}}) {
    const Budget b = Budget::mass(0.6, floor, cap);
    const auto [sel, pages] = quest_select(D.qs(639, 1), c, b);
    EXPECT_TRUE(sel.stats.reachable) << b.str();
    for (std::size_t u = 0; u < pages.budget_pages.size(); ++u) {
      const index_t want = std::clamp(free_pages.budget_pages[u], floor / 16,
                                      cap == Budget::kNoCap ? first_cur : cap / 16);
      EXPECT_EQ(pages.budget_pages[u], want) << b.str() << " unit " << u;
    }
    // The pages kept are the unit's best by bound: the same as a count budget of B pages.
    if (floor == cap) {
      const auto [cnt, cnt_pages] = quest_select(D.qs(639, 1), c, Budget::count(floor));
      EXPECT_EQ(selected_positions(sel.keys, c), selected_positions(cnt.keys, c));
    }
  }
}

TEST(AdaSnapKV, TotalKeptIsExactlyCTimesHkv) {
  const Data D(8, 4, 300, 32, 73);
  bool some_uneven = false;
  for (const index_t c_tok : {30, 45, 77, 150, 299}) {
    auto c = make_cache<kv::PagedCache<bf16>>(D, 300);
    c.append(D.ks(0, 300), D.vs(0, 300));
    methods::AdaSnapKV a;
    a.window = 16;
    const auto plan = methods::evict(a, D.qs(284, 16), c, Budget::count(c_tok));
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
  methods::AdaSnapKV a;
  a.window = 16;
  methods::evict(a, D.qs(284, 16), c, Budget::compression(8));
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
  methods::evict(methods::AdaSnapKV{}, D.qs(268, 32), c, Budget::compression(6));
  ASSERT_FALSE(c.uniform());
  c.append(D.ks(300, 1), D.vs(300, 1));  // one token
  EXPECT_LE(rel_err(run_decode(D, c, 300, 1), oracle<bf16>(D, 300, 1, cache_positions(c))), kTol);
  c.append(D.ks(301, 3), D.vs(301, 3));  // three tokens at once: each sees its own causal prefix
  EXPECT_LE(rel_err(run_decode(D, c, 301, 3), oracle<bf16>(D, 301, 3, cache_positions(c))), kTol);
  // Quest over the uneven cache, too.
  const auto plan = methods::Quest{}.select(D.qs(301, 3), c, Budget::compression(3));
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
  methods::H2O::State st;
  st.reset(c, Budget::count(1008));  // no eviction: compare every score
  st.observe(D.qs(0, 200), c, {}, true);
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
  methods::H2O::State st;
  st.reset(c, Budget::count(30));
  st.observe(D.qs(0, 200), c, {}, true);
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
  methods::H2O::State st;
  st.reset(c, Budget::count(20));
  ASSERT_EQ(st.heavy(), 10);  // H + R = 20, R the larger half
  ASSERT_EQ(st.recent(), 10);
  const index_t R = st.recent();
  st.observe(D.qs(0, 250), c, {}, true);
  for (index_t t = 250; t <= 280; ++t) {
    if (t > 250) {
      c.append(D.ks(t - 1, 1), D.vs(t - 1, 1));
      st.observe(D.qs(t - 1, 1), c);
    }
    const kv::EvictionPlan plan = st.select(c);
    EXPECT_TRUE(plan.stats.reachable);
    EXPECT_EQ(plan.stats.pairs, 2 * 20);
    for (index_t h = 0; h < 2; ++h) {
      const index_t n = c.length(h);
      const std::set<index_t> kept(plan.keep[static_cast<std::size_t>(h)].begin(),
                                   plan.keep[static_cast<std::size_t>(h)].end());
      ASSERT_EQ(static_cast<index_t>(kept.size()), 20);
      for (index_t s = n - R; s < n; ++s) ASSERT_TRUE(kept.count(s)) << "recent slot " << s;
      float worst_kept = INFINITY, best_dropped = -INFINITY;
      for (index_t s = 0; s < n - R; ++s) {
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
      for (index_t s = 20 - R; s < 20; ++s)
        ASSERT_EQ(c.position(h, s), c.sequence_length() - 20 + s);
  }
}

// The decode kernel's key mass (AttentionOptions::key_mass) is what the second pass computes:
// the State fed either way holds the same scores, and the pipeline's H2O (kernel mass) keeps
// the same tokens as a State stepping with its own pass.
TEST(H2O, KernelKeyMassMatchesTheSecondPass) {
  using Cache = kv::ContiguousCache<float>;
  const Data D(8, 2, 260, 32, 109);
  auto c = make_cache<Cache>(D, 260);
  auto ref = make_cache<Cache>(D, 260);
  const Budget b = Budget::count(48);
  DecodeSession<Cache> s(c, methods::make_policy<Cache, float>(methods::H2O{}, b));
  ASSERT_TRUE(s.policy().wants_key_mass());
  s.ingest(D.qs(0, 200), D.ks(0, 200), D.vs(0, 200));
  ref.append(D.ks(0, 200), D.vs(0, 200));
  methods::H2O::State st;
  st.reset(ref, b);
  st.observe(D.qs(0, 200), ref, {}, true);
  st.apply(st.select(ref), ref);
  std::vector<float> o(static_cast<std::size_t>(8 * 32)), mass;
  for (index_t t = 200; t < 260; ++t) {
    // The mass alone, against the second pass on the same cache.
    ref.append(D.ks(t, 1), D.vs(t, 1));
    const index_t n = ref.max_length();
    mass.assign(static_cast<std::size_t>(2 * n), -1.0f);
    DecodeOptions mo;
    mo.key_mass = {mass.data(), n, 0};
    decode(D.qs(t, 1), ref, TensorView<float>(o.data(), 8, 1, 32), KeySelection::all(), mo);
    std::vector<float> pass(mass.size());
    kv::detail::attention_column_scores(D.qs(t, 1), 0, ref.keys(), static_cast<float>(D.scale()),
                                        kv::detail::Reduce::sum, 1.0f, pass.data(), n,
                                        ExecutorChoice{});
    for (std::size_t i = 0; i < mass.size(); ++i)
      ASSERT_NEAR(mass[i], pass[i], 1e-6 + 1e-5 * pass[i]) << "step " << t << " slot " << i;
    st.step(D.qs(t, 1), ref, {});
    s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(o.data(), 8, 1, 32));
    // The policy evicts lazily: its live slots hold the eager cache's tokens and scores.
    ASSERT_EQ(held_positions(s), cache_positions(ref)) << "step " << t;
    const auto* h2o =
        dynamic_cast<const methods::H2OPolicy<Cache, float>*>(&s.policy());
    ASSERT_NE(h2o, nullptr);
    const KeySelection live = h2o->live_selection(c);
    for (index_t h = 0; h < 2; ++h) {
      std::vector<index_t> slots;
      if (live.scope() == KeySelection::Scope::all)
        for (index_t j = 0; j < c.length(h); ++j) slots.push_back(j);
      else
        for (const KeyRange* r = live.ranges_begin(h); r != live.ranges_end(h); ++r)
          for (index_t j = r->begin; j < r->end; ++j) slots.push_back(j);
      ASSERT_EQ(static_cast<index_t>(slots.size()), ref.length(h));
      for (std::size_t i = 0; i < slots.size(); ++i)
        ASSERT_NEAR(h2o->state().scores(h)[slots[i]], st.scores(h)[i],
                    1e-5 * (1 + st.scores(h)[i]));
    }
  }
  EXPECT_EQ(s.policy().live_tokens(c), 2 * 48);
}

// keep_heavy_recent's linear path (a few drops) against its general path (nth_element + sort)
// and a full sort in the ranking order, on scores with many ties, NaN and infinities.
TEST(H2O, LinearSelectEqualsTheGeneralSelect) {
  std::mt19937 rng(151);
  auto uni = [&](index_t lo, index_t hi) {
    return std::uniform_int_distribution<index_t>(lo, hi)(rng);
  };
  index_t linear = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    const index_t n = uni(1, 150);
    std::vector<float> score(static_cast<std::size_t>(n));
    for (float& x : score) {
      const index_t r = uni(0, 11);
      x = r == 0   ? NAN
          : r == 1 ? -INFINITY
          : r == 2 ? INFINITY
                   : static_cast<float>(uni(-3, 3)) * 0.25f;  // few values: many ties
    }
    std::vector<index_t> slots;  // an ascending subset, like a live list
    const double p = std::uniform_real_distribution<double>(0.3, 1.0)(rng);
    for (index_t j = 0; j < n; ++j)
      if (std::bernoulli_distribution(p)(rng)) slots.push_back(j);
    const index_t m = static_cast<index_t>(slots.size());
    const index_t recent = uni(0, m);
    const index_t drops = trial % 4 == 0 ? uni(0, m) : uni(1, 10);
    const index_t heavy = std::max<index_t>(0, m - recent - drops);
    // The oracle: the old slots fully sorted in the ranking order, the first `heavy` kept.
    std::vector<index_t> want(slots.begin(), slots.begin() + std::max<index_t>(0, m - recent));
    if (m > heavy + recent) {
      std::sort(want.begin(), want.end(), methods::detail::ScoreOrder{score.data()});
      want.resize(static_cast<std::size_t>(heavy));
      std::sort(want.begin(), want.end());
      want.insert(want.end(), slots.end() - recent, slots.end());
    } else {
      want = slots;
    }
    std::vector<index_t> fast = slots, general = slots;
    const index_t dropped = m > heavy + recent ? m - heavy - recent : 0;
    EXPECT_EQ(methods::H2O::State::keep_heavy_recent(score.data(), fast, heavy, recent), dropped);
    EXPECT_EQ(methods::H2O::State::keep_heavy_recent(score.data(), general, heavy, recent, 0),
              dropped);
    ASSERT_EQ(fast, want) << "trial " << trial << " m=" << m << " H=" << heavy << " R=" << recent;
    ASSERT_EQ(general, want) << "trial " << trial;
    linear += dropped >= 1 && dropped <= methods::H2O::State::kLinearDrops ? 1 : 0;
  }
  EXPECT_GT(linear, 1000);  // the linear path ran
}

// The policy evicts lazily (dead slots skipped by its selection, compacted in batches); an
// eager State stepping on its own cache with the same kernel key mass is the reference: the
// kept positions are identical every step and the outputs agree, across slack- and
// capacity-triggered compactions, for fp32 and bf16, G = 1 and 4.
template <class Cache>
void lazy_policy_matches_eager(index_t G, const Budget& b, index_t prompt, index_t steps,
                               index_t capacity, unsigned seed, bool by_capacity) {
  using Policy = methods::H2OPolicy<Cache, float>;
  const std::string what = std::string(dtype_name<typename Cache::value_type>()) +
                           " G=" + std::to_string(G) + " " + b.str();
  const index_t hkv = 2, hq = hkv * G, d = 32;
  const Data D(hq, hkv, prompt + steps, d, seed);
  auto c = make_cache<Cache>(D, capacity);
  auto ref = make_cache<Cache>(D, capacity);
  auto pol = methods::make_policy<Cache, float>(methods::H2O{}, b);
  const auto* h2o = dynamic_cast<const Policy*>(pol.get());
  ASSERT_NE(h2o, nullptr);
  c.append(D.ks(0, prompt), D.vs(0, prompt));
  pol->after_prefill(D.qs(0, prompt), c, {});
  ref.append(D.ks(0, prompt), D.vs(0, prompt));
  methods::H2O::State st;
  st.reset(ref, b);
  st.observe(D.qs(0, prompt), ref, {}, true);
  st.apply(st.select(ref), ref);
  ASSERT_EQ(cache_positions(c), cache_positions(ref)) << what;
  std::vector<float> o(static_cast<std::size_t>(hq * d)), o_ref(o.size()), mass, mass_ref;
  index_t compactions = 0, capacity_compactions = 0, most_dead = 0;
  for (index_t t = prompt; t < prompt + steps; ++t) {
    const index_t dead_before = c.max_length() - pol->live_tokens(c) / hkv;
    if (t % 7 == 0) {  // a step that failed after before_step: its append is taken back
      c.append(D.ks(t, 1), D.vs(t, 1));
      (void)pol->before_step(D.qs(t, 1), c, {});
      c.undo_append(1);
      ASSERT_EQ(pol->live_tokens(c), ref.total_length()) << what;
    }
    c.append(D.ks(t, 1), D.vs(t, 1));
    const KeySelection keys = pol->before_step(D.qs(t, 1), c, {});
    mass.assign(static_cast<std::size_t>(hkv * c.max_length()), -1.0f);
    DecodeOptions mo;
    mo.key_mass = {mass.data(), c.max_length(), 0};
    decode(D.qs(t, 1), c, TensorView<float>(o.data(), hq, 1, d), keys, mo);
    pol->after_step(D.qs(t, 1), c, {}, mass.data());

    ref.append(D.ks(t, 1), D.vs(t, 1));
    mass_ref.assign(static_cast<std::size_t>(hkv * ref.max_length()), -1.0f);
    mo.key_mass = {mass_ref.data(), ref.max_length(), 0};
    decode(D.qs(t, 1), ref, TensorView<float>(o_ref.data(), hq, 1, d), KeySelection::all(), mo);
    st.step_mass(mass_ref.data(), ref.max_length(), ref);

    ASSERT_LE(rel_err(o, o_ref), 1e-6) << what << " step " << t;
    ASSERT_EQ(selected_positions(h2o->live_selection(c), c), cache_positions(ref))
        << what << " step " << t;
    ASSERT_EQ(pol->live_tokens(c), ref.total_length()) << what;
    ASSERT_EQ(pol->last_eviction()->stats.pairs, ref.total_length()) << what;
    ASSERT_LE(c.max_length(), capacity) << what;
    const index_t live = ref.length(0), dead = c.max_length() - live;
    most_dead = std::max(most_dead, dead);
    ASSERT_LE(dead, Policy::dead_slack(live)) << what << " step " << t;
    if (dead == 0 && dead_before > 0) {
      ++compactions;
      if (dead_before + 1 <= Policy::dead_slack(live)) ++capacity_compactions;
    }
  }
  EXPECT_GE(compactions, 2) << what;
  EXPECT_GT(most_dead, 0) << what;  // it did evict lazily
  if (by_capacity) {
    EXPECT_GE(capacity_compactions, 1) << what;
  }
}

TEST(H2O, LazyPolicyKeepsWhatEagerSteppingKeeps) {
  // Slack-triggered compactions (dead > max(16, live / 8)); a budget that grows with the
  // sequence (compression 5).
  lazy_policy_matches_eager<kv::ContiguousCache<float>>(1, Budget::count(40), 200, 120, 400,
                                                        211, false);
  lazy_policy_matches_eager<kv::ContiguousCache<float>>(4, Budget::compression(5), 200, 120, 400,
                                                        212, false);
  lazy_policy_matches_eager<kv::ContiguousCache<bf16>>(4, Budget::count(40), 200, 120, 400, 213,
                                                       false);
  lazy_policy_matches_eager<kv::ContiguousCache<bf16>>(1, Budget::compression(5), 200, 120, 400,
                                                       214, false);
  // Capacity-triggered: 24 live slots in a cache of 40 (or 35) fill it before the slack.
  lazy_policy_matches_eager<kv::ContiguousCache<float>>(4, Budget::count(24), 30, 100, 40, 215,
                                                        true);
  lazy_policy_matches_eager<kv::PagedCache<bf16>>(1, Budget::count(24), 30, 100, 35, 216, true);
}

// DecodeSession reports live tokens (the dead slots H2O has not compacted yet do not count).
TEST(H2O, SessionReportsLiveTokens) {
  using Cache = kv::ContiguousCache<float>;
  const Data D(8, 2, 300, 32, 217);
  auto c = make_cache<Cache>(D, 300);
  DecodeSession<Cache> s(c, methods::make_policy<Cache, float>(methods::H2O{}, Budget::count(40)));
  const PrefillReport pr = s.ingest(D.qs(0, 200), D.ks(0, 200), D.vs(0, 200));
  EXPECT_EQ(pr.cache_tokens, 2 * 40);
  std::vector<float> o(static_cast<std::size_t>(8 * 32));
  bool saw_dead = false;
  for (index_t t = 200; t < 260; ++t) {
    const StepReport r =
        s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(o.data(), 8, 1, 32));
    EXPECT_EQ(r.cache_tokens, 2 * 40) << "step " << t;
    EXPECT_EQ(r.evicted, 2) << "step " << t;
    EXPECT_EQ(r.stats.pairs, 8 * 41) << "the step read its live keys only (8 query heads)";
    EXPECT_EQ(s.policy().stats().pairs, 2 * 40);
    saw_dead = saw_dead || c.total_length() > r.cache_tokens;
  }
  EXPECT_TRUE(saw_dead);
}

TEST(StreamingLLM, KeepsSinksAndRecentWindowThroughDecode) {
  using Cache = kv::ContiguousCache<bf16>;
  const Data D(4, 2, 300, 32, 103);
  auto c = make_cache<Cache>(D, 300);
  methods::StreamingLLM m;
  m.sinks = 4;
  DecodeSession<Cache> s(c, methods::make_policy<Cache, float>(m, Budget::count(44)));
  const auto pr = s.ingest(D.qs(0, 200), D.ks(0, 200), D.vs(0, 200));
  EXPECT_NEAR(pr.cache_compression(2), 200.0 / 44.0, 1e-12);
  EXPECT_EQ(pr.eviction.stats.detail, "S=4 W=40");
  std::vector<float> o(static_cast<std::size_t>(4 * 32));
  for (index_t t = 200; t < 230; ++t) {
    for (index_t h = 0; h < 2; ++h) {
      std::vector<index_t> want{0, 1, 2, 3};
      for (index_t j = t - 40; j < t; ++j) want.push_back(j);
      ASSERT_EQ(cache_positions(c)[static_cast<std::size_t>(h)], want) << "before step " << t;
    }
    const StepReport r =
        s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(o.data(), 4, 1, 32));
    // The step's token grows the cache past S + W: the oldest window token goes before the
    // kernel, which reads exactly S + W = 44 keys (the new token among them).
    EXPECT_EQ(r.stats.pairs, 4 * 44);
    EXPECT_EQ(r.evicted, 2);
    EXPECT_NEAR(r.compression(), static_cast<double>(t + 1) / 44.0, 1e-12);
    EXPECT_EQ(c.position(0, c.length(0) - 1), t);
  }
}

TEST(StreamingLLM, CompressionFollowsTheSequenceAndReportsReachability) {
  const Data D(4, 2, 400, 32, 104);
  methods::StreamingLLM m;
  // CR 10 on 400 tokens: S + W = 40, CR exactly 10.
  auto c = make_cache<kv::ContiguousCache<float>>(D, 400);
  c.append(D.ks(0, 400), D.vs(0, 400));
  const auto plan = methods::evict(m, TensorView<const float>(), c, Budget::compression(10));
  EXPECT_EQ(c.length(0), 40);
  EXPECT_DOUBLE_EQ(plan.stats.compression(), 10.0);
  EXPECT_TRUE(plan.stats.reachable);
  EXPECT_EQ(plan.stats.detail, "S=4 W=36");
  // CR 10 on a 5-token cache keeps the newest token: CR 5, not within 10% of 10.
  auto s5 = make_cache<kv::ContiguousCache<float>>(D, 400);
  s5.append(D.ks(0, 5), D.vs(0, 5));
  const auto short_plan = methods::evict(m, TensorView<const float>(), s5, Budget::compression(10));
  EXPECT_EQ(s5.length(0), 1);
  EXPECT_EQ(s5.position(0, 0), 4);
  EXPECT_DOUBLE_EQ(short_plan.stats.compression(), 5.0);
  EXPECT_FALSE(short_plan.stats.reachable);
  // A count budget is always honoured.
  EXPECT_TRUE(m.select(c, Budget::count(7)).stats.reachable);
  EXPECT_THROW(m.select(c, Budget::mass(0.9)), sparse_attn::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Eviction through the pipeline, against the oracle on the kept set

// Every step's output against the oracle on the tokens it attended: the cache before the step
// plus the step's token, or (a method evicting before the step attends, StreamingLLM) the cache
// after the step.
template <class Cache, class Method>
void check_session_against_oracle(const Method& m, const Budget& b, const std::string& what,
                                  index_t prompt = 256, index_t steps = 6) {
  using T = typename Cache::value_type;
  const bool evicts_before_step = std::is_same_v<Method, methods::StreamingLLM>;
  const Data D(8, 2, prompt + steps, 64, 107);
  auto c = make_cache<Cache>(D, prompt + steps);
  DecodeSession<Cache> s(c, methods::make_policy<Cache, float>(m, b));
  s.ingest(D.qs(0, prompt), D.ks(0, prompt), D.vs(0, prompt));
  std::vector<float> o(static_cast<std::size_t>(8 * 64));
  for (index_t t = prompt; t < prompt + steps; ++t) {
    auto keep = held_positions(s);
    for (auto& k : keep) k.push_back(t);  // the step attends the cache plus its own token
    const StepReport r =
        s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(o.data(), 8, 1, 64));
    if (evicts_before_step) keep = cache_positions(c);
    index_t kept = 0;
    for (const auto& k : keep) kept += static_cast<index_t>(k.size());
    ASSERT_LE(rel_err(o, oracle<T>(D, t, 1, keep)), kTol) << what << " step " << t;
    EXPECT_EQ(r.stats.pairs, 4 * kept) << what;
    EXPECT_EQ(r.stats.dense_pairs, 8 * (t + 1)) << what;
  }
}

template <class Method>
void check_session_both_caches(const Method& m, const Budget& b) {
  const std::string name = std::string(Method::name) + " " + b.str();
  check_session_against_oracle<kv::ContiguousCache<float>>(m, b, name + " contiguous fp32");
  check_session_against_oracle<kv::PagedCache<bf16>>(m, b, name + " paged bf16");
}

TEST(Eviction, DecodeOverEvictedCacheEqualsOracleOnKeptTokens) {
  const Budget cr4 = Budget::compression(4);
  check_session_both_caches(methods::SnapKV{}, cr4);
  check_session_both_caches(methods::AdaSnapKV{}, cr4);
  check_session_both_caches(methods::H2O{}, cr4);
  check_session_both_caches(methods::StreamingLLM{}, Budget::count(54));
  check_session_both_caches(methods::StreamingLLM{}, cr4);
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
      if (std::bernoulli_distribution(0.5)(rng))
        keys = methods::Quest{}
                   .select(D.qs(at - nq, nq), pc,
                           Budget::count(std::uniform_int_distribution<index_t>(1, 64)(rng)))
                   .keys;
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
  const IntervalMask mask = masks::causal(8, 64, 200);  // the last 64 queries (chunked prefill)
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
  EXPECT_THROW(Budget::compression(0.5), sparse_attn::invalid_argument);
  kv::CacheOptions co;
  co.kv_heads = 2;
  co.head_dim = 32;
  co.capacity = 100;
  co.key_bounds = false;
  kv::ContiguousCache<float> nb(co);
  nb.append(D.ks(0, 10), D.vs(0, 10));
  EXPECT_THROW(methods::Quest{}.select(D.qs(9, 1), nb, Budget::compression(10)),
               sparse_attn::invalid_argument);
  {
    DecodeSession<kv::ContiguousCache<float>> s(nb);  // Quest needs key bounds
    EXPECT_THROW(s.set_policy(methods::make_policy<kv::ContiguousCache<float>, float>(
                     methods::Quest{}, Budget::compression(10))),
                 sparse_attn::invalid_argument);
  }
  const std::vector<std::vector<index_t>> keep{{0, 1, 2}, {0, 1}};
  auto ragged = c;
  ragged.retain(keep);
  EXPECT_THROW(methods::SnapKV{}.select(D.qs(99, 1), ragged, Budget::compression(10)),
               sparse_attn::invalid_argument);
  methods::SnapKV sk;
  sk.pool_kernel = 4;
  EXPECT_THROW(sk.select(D.qs(68, 32), c, Budget::compression(10)),
               sparse_attn::invalid_argument);
  // Budget kinds a method does not take.
  EXPECT_THROW(methods::AdaSnapKV{}.select(D.qs(68, 32), c, Budget::mass(0.9)),
               sparse_attn::invalid_argument);
  EXPECT_THROW((methods::make_policy<kv::ContiguousCache<float>, float>(methods::H2O{},
                                                                         Budget::mass(0.9))),
               sparse_attn::invalid_argument);
  EXPECT_THROW(c.retain(std::vector<std::vector<index_t>>{{3, 2}, {0}}),
               sparse_attn::invalid_argument);
  EXPECT_THROW(c.retain(std::vector<std::vector<index_t>>{{0}}), sparse_attn::invalid_argument);
  co.kv_heads = 0;
  EXPECT_THROW(kv::ContiguousCache<float>{co}, sparse_attn::invalid_argument);
  methods::H2O::State st;
  EXPECT_THROW(st.observe(D.qs(99, 1), c), sparse_attn::invalid_argument);  // reset() first
}

// ---------------------------------------------------------------------------------------------
// Reachability: every decode method says false for a target it cannot reach, true for one it can

TEST(DecodeMethods, EveryMethodReportsWhetherItsTargetIsReachable) {
  const Data D(8, 2, 400, 32, 151);
  auto full = make_cache<kv::ContiguousCache<float>>(D, 400);
  full.append(D.ks(0, 400), D.vs(0, 400));
  auto tiny = make_cache<kv::ContiguousCache<float>>(D, 400);
  tiny.append(D.ks(0, 20), D.vs(0, 20));
  const Budget cr10 = Budget::compression(10);
  // Quest: CR 5 at n = 400 reads 80 keys (4 pages + the current 16); CR 10 on 20 tokens: the
  // current page alone is 4 keys of 20, CR 5.
  EXPECT_TRUE(
      methods::Quest{}.select(D.qs(399, 1), full, Budget::compression(5)).stats.reachable);
  const auto qs = methods::Quest{}.select(D.qs(19, 1), tiny, cr10).stats;
  EXPECT_DOUBLE_EQ(qs.compression(), 5.0);
  EXPECT_FALSE(qs.reachable);
  // SnapKV / Ada-SnapKV: window 32 + 4 sinks are forced; a count of 20 cannot be honoured, and
  // neither can CR 40 (10 tokens); CR 10 (40 tokens) can.
  for (const bool ada : {false, true}) {
    auto sel = [&](const Budget& b) {
      return ada ? methods::AdaSnapKV{}.select(D.qs(368, 32), full, b)
                 : methods::SnapKV{}.select(D.qs(368, 32), full, b);
    };
    EXPECT_TRUE(sel(cr10).stats.reachable) << ada;
    EXPECT_DOUBLE_EQ(sel(cr10).stats.compression(), 10.0) << ada;
    EXPECT_TRUE(sel(Budget::count(100)).stats.reachable) << ada;
    EXPECT_FALSE(sel(Budget::count(20)).stats.reachable) << ada;
    EXPECT_FALSE(sel(Budget::compression(40)).stats.reachable) << ada;
  }
  // H2O: CR 10 on 400 tokens keeps 40; on 5 tokens it keeps 1 (CR 5).
  EXPECT_TRUE(methods::H2O{}.select(D.qs(0, 400), full, cr10).stats.reachable);
  auto five = make_cache<kv::ContiguousCache<float>>(D, 400);
  five.append(D.ks(0, 5), D.vs(0, 5));
  const auto h5 = methods::H2O{}.select(D.qs(0, 5), five, cr10).stats;
  EXPECT_DOUBLE_EQ(h5.compression(), 5.0);
  EXPECT_FALSE(h5.reachable);
  EXPECT_TRUE(methods::H2O{}.select(D.qs(0, 5), five, Budget::count(1)).stats.reachable);
  // StreamingLLM: see StreamingLLM.CompressionFollowsTheSequenceAndReportsReachability; through
  // the policy, per step.
  {
    using Cache = kv::ContiguousCache<float>;
    auto sc = make_cache<Cache>(D, 400);
    DecodeSession<Cache> s(sc, methods::make_policy<Cache, float>(methods::StreamingLLM{}, cr10));
    s.ingest(D.qs(0, 5), D.ks(0, 5), D.vs(0, 5));
    EXPECT_FALSE(s.policy().stats().reachable);
    std::vector<float> o(static_cast<std::size_t>(8 * 32));
    for (index_t t = 5; t < 300; ++t)
      s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1), TensorView<float>(o.data(), 8, 1, 32));
    EXPECT_TRUE(s.policy().stats().reachable);  // 300 tokens: S + W = 30
    EXPECT_DOUBLE_EQ(s.policy().stats().compression(), 10.0);
  }
}

// ---------------------------------------------------------------------------------------------
// Quest's mass budget

TEST(Quest, MassBudgetKeepsTheFewestPagesReachingTheEstimatedMass) {
  const Data D(8, 2, 640, 32, 157);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 640);
  c.append(D.ks(0, 640), D.vs(0, 640));
  const index_t P = 16, pages = 40, G = 4;
  std::vector<index_t> prev(2, 0);
  for (const double p : {0.3, 0.6, 0.9, 0.99}) {
    const auto [sel, pg] = quest_select(D.qs(639, 1), c, Budget::mass(p));
    EXPECT_TRUE(sel.stats.reachable);
    for (index_t u = 0; u < 2; ++u) {
      // The estimate from the bounds: softmax of U / G + log 16 over the 40 pages (all full).
      const float* U = pg.bounds.data() + u * pg.bound_stride;
      std::vector<double> e(static_cast<std::size_t>(pages));
      double mx = -INFINITY, total = 0.0;
      for (index_t q = 0; q < pages; ++q) mx = std::max(mx, double{U[q]} / G);
      for (index_t q = 0; q < pages; ++q)
        total += (e[static_cast<std::size_t>(q)] = std::exp(double{U[q]} / G - mx));
      std::vector<index_t> chosen;
      for (const KeyRange* r = sel.keys.ranges_begin(u); r != sel.keys.ranges_end(u); ++r)
        for (index_t q = r->begin / P; q * P < r->end; ++q) chosen.push_back(q);
      ASSERT_EQ(chosen.back(), pages - 1) << "the current page is always read";
      double have = 0.0, worst = INFINITY;
      for (index_t q : chosen) {
        have += e[static_cast<std::size_t>(q)];
        if (q != pages - 1) worst = std::min(worst, e[static_cast<std::size_t>(q)]);
      }
      EXPECT_GE(have / total, p * (1 - 1e-9)) << "p " << p << " unit " << u;
      const index_t B = static_cast<index_t>(chosen.size()) - 1;
      EXPECT_EQ(B, pg.budget_pages[static_cast<std::size_t>(u)]);
      if (B > 0) {  // the fewest: without the weakest chosen page the mass falls short
        EXPECT_LT((have - worst) / total, p) << "p " << p << " unit " << u;
        for (index_t q = 0; q < pages - 1; ++q) {  // and the chosen pages are the top-B
          if (std::find(chosen.begin(), chosen.end(), q) == chosen.end()) {
            EXPECT_LE(e[static_cast<std::size_t>(q)], worst);
          }
        }
      }
      EXPECT_GE(B, prev[static_cast<std::size_t>(u)]) << "a larger p keeps at least as many";
      prev[static_cast<std::size_t>(u)] = B;
    }
    EXPECT_LE(rel_err(run_decode(D, c, 639, 1, sel.keys),
                      oracle<float>(D, 639, 1, selected_positions(sel.keys, c))),
              kTol);
  }
}

// ---------------------------------------------------------------------------------------------
// quest_head: Quest per query head with one mass threshold shared by the heads

// quest_head's selection and page bounds for q on c (shared: its default shared_mass; floor:
// shared_floor, 0 here so the threshold's own rule is what the tests below check).
template <class Cache>
std::pair<methods::DecodeSelection, methods::QuestPages> quest_head_select(
    const TensorView<const float>& q, const Cache& c, const Budget& b, bool shared = true,
    double floor = 0.0) {
  methods::QuestHead m;
  m.shared_mass = shared;
  m.shared_floor = floor;
  std::pair<methods::DecodeSelection, methods::QuestPages> r;
  m.select(q, c, b, {}, r.first, &r.second);
  return r;
}

// The pages (of P = 16) a unit's key ranges read.
std::vector<index_t> unit_pages(const KeySelection& keys, index_t u) {
  std::vector<index_t> pages;
  for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
    for (index_t q = r->begin / 16; q * 16 < r->end; ++q) pages.push_back(q);
  return pages;
}

TEST(QuestHead, SharedMassKeepsTheHighestEstimatedPagesOfAllHeadsUntilPTimesHeads) {
  const Data D(8, 2, 640, 32, 163);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 640);
  c.append(D.ks(0, 640), D.vs(0, 640));
  const index_t H = 8, G = 4, pages = 40, cur = pages - 1;
  // The per-query-head bounds in float64 from the stored keys: U_h(page) = scale * sum_d
  // max(q_hd min_d, q_hd max_d), min / max over the page's 16 keys.
  const auto q = D.qs(639, 1);
  std::vector<double> U(static_cast<std::size_t>(H * pages));
  for (index_t h = 0; h < H; ++h)
    for (index_t pg = 0; pg < pages; ++pg) {
      double u = 0.0;
      for (index_t dd = 0; dd < D.d; ++dd) {
        double mn = INFINITY, mx = -INFINITY;
        for (index_t t = pg * 16; t < pg * 16 + 16; ++t) {
          mn = std::min(mn, double{D.k[static_cast<std::size_t>(((h / G) * D.n + t) * D.d + dd)]});
          mx = std::max(mx, double{D.k[static_cast<std::size_t>(((h / G) * D.n + t) * D.d + dd)]});
        }
        const double x = double{q(h, 0, dd)};
        u += std::max(x * mn, x * mx);
      }
      U[static_cast<std::size_t>(h * pages + pg)] = u * D.scale();
    }
  index_t prev_total = 0;
  bool uneven = false;
  for (const double p : {0.3, 0.6, 0.9, 0.99}) {
    // Named, not a structured binding: the kernel check's lambda captures the selection (C++17).
    const auto result = quest_head_select(q, c, Budget::mass(p));
    const methods::DecodeSelection& sel = result.first;
    const methods::QuestPages& pg = result.second;
    EXPECT_TRUE(sel.stats.reachable);
    ASSERT_EQ(sel.keys.scope(), KeySelection::Scope::per_q_head);
    // The estimate: per head, softmax over its 40 (full) pages of U + log 16.
    std::vector<double> e(static_cast<std::size_t>(H * pages));
    for (index_t h = 0; h < H; ++h) {
      double mx = -INFINITY, total = 0.0;
      for (index_t q2 = 0; q2 < pages; ++q2) {
        const double u = pg.bounds[static_cast<std::size_t>(h * pg.bound_stride + q2)];
        EXPECT_NEAR(u, U[static_cast<std::size_t>(h * pages + q2)], 1e-4 * (1.0 + std::abs(u)));
        mx = std::max(mx, u);
      }
      for (index_t q2 = 0; q2 < pages; ++q2)
        total += e[static_cast<std::size_t>(h * pages + q2)] =
            std::exp(double{pg.bounds[static_cast<std::size_t>(h * pg.bound_stride + q2)]} - mx);
      for (index_t q2 = 0; q2 < pages; ++q2) e[static_cast<std::size_t>(h * pages + q2)] /= total;
    }
    double have = 0.0, weakest = INFINITY, strongest_left = 0.0;
    index_t total_B = 0, bmin = pages, bmax = 0;
    for (index_t h = 0; h < H; ++h) {
      const std::vector<index_t> chosen = unit_pages(sel.keys, h);
      ASSERT_FALSE(chosen.empty());
      EXPECT_EQ(chosen.back(), cur) << "every head reads its current page";
      const index_t B = static_cast<index_t>(chosen.size()) - 1;
      EXPECT_EQ(B, pg.budget_pages[static_cast<std::size_t>(h)]);
      total_B += B;
      bmin = std::min(bmin, B), bmax = std::max(bmax, B);
      for (index_t q2 = 0; q2 < pages; ++q2) {
        const double m = e[static_cast<std::size_t>(h * pages + q2)];
        const bool in = std::find(chosen.begin(), chosen.end(), q2) != chosen.end();
        if (in) have += m;
        if (in && q2 != cur) weakest = std::min(weakest, m);
        if (!in) strongest_left = std::max(strongest_left, m);
      }
    }
    // One threshold over every (head, page): what is kept outweighs what is left, in any head.
    EXPECT_LE(strongest_left, weakest) << "p " << p;
    // The mass summed over the heads reaches p x H, and with the weakest kept page it did not.
    EXPECT_GE(have, p * H * (1 - 1e-9)) << "p " << p;
    if (total_B > 0) {
      EXPECT_LT(have - weakest, p * H) << "p " << p;
    }
    EXPECT_GE(total_B, prev_total) << "a larger p keeps at least as many pages";
    prev_total = total_B;
    uneven = uneven || bmin < bmax;
    EXPECT_LE(rel_err(run_decode(D, c, 639, 1, sel.keys),
                      reference::attention(
                          q, D.kv(), D.vv(), D.scale(),
                          [&](index_t h, index_t, index_t j) {
                            for (const KeyRange* r = sel.keys.ranges_begin(h);
                                 r != sel.keys.ranges_end(h); ++r)
                              if (j >= r->begin && j < r->end) return true;
                            return false;
                          })),
              kTol);
  }
  EXPECT_TRUE(uneven) << "the heads' budgets follow their estimated mass";
}

TEST(QuestHead, SharedMassOnOneUnitIsTheUnitsOwnMassRule) {
  // One query head (per query head), or one KV head (per KV head): the shared threshold over one
  // unit's pages is that unit's fewest pages reaching p.
  const Data D(4, 1, 640, 32, 167);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 640);
  c.append(D.ks(0, 640), D.vs(0, 640));
  const Data D1(1, 1, 640, 32, 167);
  auto c1 = make_cache<kv::ContiguousCache<float>>(D1, 640);
  c1.append(D1.ks(0, 640), D1.vs(0, 640));
  for (const double p : {0.2, 0.5, 0.8, 0.95}) {
    const auto shared = quest_head_select(D1.qs(639, 1), c1, Budget::mass(p));
    const auto own = quest_head_select(D1.qs(639, 1), c1, Budget::mass(p), false);
    EXPECT_EQ(shared.second.budget_pages, own.second.budget_pages) << "p " << p;
    EXPECT_EQ(unit_pages(shared.first.keys, 0), unit_pages(own.first.keys, 0)) << "p " << p;
    methods::Quest per_kv;
    per_kv.shared_mass = true;
    methods::DecodeSelection s;
    methods::QuestPages sp;
    per_kv.select(D.qs(639, 1), c, Budget::mass(p), {}, s, &sp);
    const auto [o, op] = quest_select(D.qs(639, 1), c, Budget::mass(p));
    EXPECT_EQ(sp.budget_pages, op.budget_pages) << "p " << p;
    EXPECT_EQ(unit_pages(s.keys, 0), unit_pages(o.keys, 0)) << "p " << p;
  }
}

TEST(QuestHead, SharedMassFloorAndCapBoundEachHeadAndAMassOfOneIsDense) {
  const Data D(8, 2, 640, 32, 173);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 640);
  c.append(D.ks(0, 640), D.vs(0, 640));
  const index_t first_cur = 639 / 16;
  const auto [free, free_pages] = quest_head_select(D.qs(639, 1), c, Budget::mass(0.7));
  index_t bmin = first_cur, bmax = 0;
  for (index_t b : free_pages.budget_pages) bmin = std::min(bmin, b), bmax = std::max(bmax, b);
  ASSERT_GT(bmin, 1);
  ASSERT_LT(bmin, bmax);
  ASSERT_LT(bmax, first_cur - 1);
  // floor / cap in tokens: each head's B from the shared threshold, clamped to [floor/P, cap/P].
  for (const auto& [floor, cap] : {std::pair<index_t, index_t>{(bmax + 1) * 16, Budget::kNoCap},
                                   {0, bmin * 16 + 5},
                                   {0, 1},
                                   {(bmin + 1) * 16, (bmin + 1) * 16}}) {
    const Budget b = Budget::mass(0.7, floor, cap);
    const auto [sel, pages] = quest_head_select(D.qs(639, 1), c, b);
    EXPECT_TRUE(sel.stats.reachable) << b.str() << ": the current pages are outside the cap";
    for (std::size_t u = 0; u < pages.budget_pages.size(); ++u)
      EXPECT_EQ(pages.budget_pages[u],
                std::clamp(free_pages.budget_pages[u], floor / 16,
                           cap == Budget::kNoCap ? first_cur : cap / 16))
          << b.str() << " head " << u;
  }
  const auto [all, all_pages] = quest_head_select(D.qs(639, 1), c, Budget::mass(1.0));
  EXPECT_TRUE(all_pages.dense);
  EXPECT_EQ(all.keys.scope(), KeySelection::Scope::all);
  EXPECT_DOUBLE_EQ(all.stats.compression(), 1.0);
  EXPECT_TRUE(all.stats.reachable);
}

TEST(QuestHead, SharedFloorRaisesEveryHeadToAFractionOfTheMeanPages) {
  // Ada-KV's safeguard on the shared threshold: with B0_h the threshold's pages of head h,
  // B_h = max(B0_h, min(floor(f x sum_h B0_h / H), first_cur)), each head's top B_h by its own
  // estimate (a prefix of its rank order), and the rest of the rule unchanged.
  const Data D(8, 2, 640, 32, 179);
  auto c = make_cache<kv::ContiguousCache<float>>(D, 640);
  c.append(D.ks(0, 640), D.vs(0, 640));
  const index_t H = 8, first_cur = 639 / 16;
  const auto q = D.qs(639, 1);
  bool raised = false;
  for (const double p : {0.3, 0.6, 0.9}) {
    const auto [free, free_pages] = quest_head_select(q, c, Budget::mass(p));
    index_t total = 0;
    for (index_t b : free_pages.budget_pages) total += b;
    for (const double f : {0.2, 0.5, 1.0}) {
      const auto [sel, pages] = quest_head_select(q, c, Budget::mass(p), true, f);
      const auto least = static_cast<index_t>(std::floor(f * static_cast<double>(total) / H));
      for (index_t h = 0; h < H; ++h) {
        const index_t b0 = free_pages.budget_pages[static_cast<std::size_t>(h)];
        const index_t want = std::max(b0, std::min(least, first_cur));
        EXPECT_EQ(pages.budget_pages[static_cast<std::size_t>(h)], want) << "p " << p << " f " << f << " head " << h;
        raised = raised || want > b0;
        // The head's kept earlier pages are its want highest bounds (full pages: the estimate
        // is monotone in the bound).
        const std::vector<index_t> chosen = unit_pages(sel.keys, h);
        ASSERT_EQ(static_cast<index_t>(chosen.size()), want + 1);
        double weakest = INFINITY, strongest_left = -INFINITY;
        for (index_t q2 = 0; q2 < first_cur; ++q2) {
          const double u = pages.bounds[static_cast<std::size_t>(h * pages.bound_stride + q2)];
          if (std::find(chosen.begin(), chosen.end(), q2) != chosen.end()) weakest = std::min(weakest, u);
          else strongest_left = std::max(strongest_left, u);
        }
        EXPECT_LE(strongest_left, weakest) << "p " << p << " f " << f << " head " << h;
      }
    }
  }
  EXPECT_TRUE(raised) << "the floor must bite for some (p, f, head)";
  methods::QuestHead m;
  for (const double bad : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    m.shared_floor = bad;
    methods::DecodeSelection sel;
    EXPECT_THROW(m.select(q, c, Budget::mass(0.5), {}, sel), sparse_attn::invalid_argument) << bad;
  }
}

// ---------------------------------------------------------------------------------------------
// Every method at compression 1 is dense

TEST(DecodeMethods, CompressionOneEqualsDenseForEveryMethod) {
  using Cache = kv::PagedCache<bf16>;
  const Data D(8, 2, 300, 64, 127);
  auto run = [&](std::unique_ptr<methods::DecodePolicy<Cache, float>> policy) {
    auto c = make_cache<Cache>(D, 300);
    DecodeSession<Cache> s(c, std::move(policy));
    s.ingest(D.qs(0, 296), D.ks(0, 296), D.vs(0, 296));
    std::vector<float> o(static_cast<std::size_t>(8 * 4 * 64));
    for (index_t t = 296; t < 300; ++t) {
      const StepReport r =
          s.step(D.qs(t, 1), D.ks(t, 1), D.vs(t, 1),
                 TensorView<float>(o.data() + (t - 296) * 64, 8, 1, 64, 4 * 64, 64, 1));
      EXPECT_DOUBLE_EQ(r.compression(), 1.0);
      if (s.num_policies() > 0) {
        EXPECT_TRUE(s.policy().stats().reachable);
      }
    }
    return o;
  };
  const auto dense = run(nullptr);
  const Budget one = Budget::compression(1);
  EXPECT_LE(rel_err(run(methods::make_policy<Cache, float>(methods::Quest{}, one)), dense), 1e-5)
      << "quest";
  EXPECT_LE(rel_err(run(methods::make_policy<Cache, float>(methods::SnapKV{}, one)), dense), 1e-5)
      << "snapkv";
  EXPECT_LE(rel_err(run(methods::make_policy<Cache, float>(methods::AdaSnapKV{}, one)), dense),
            1e-5)
      << "ada_snapkv";
  EXPECT_LE(rel_err(run(methods::make_policy<Cache, float>(methods::H2O{}, one)), dense), 1e-5)
      << "h2o";
  EXPECT_LE(rel_err(run(methods::make_policy<Cache, float>(methods::StreamingLLM{}, one)), dense),
            1e-5)
      << "streaming";
}

// ---------------------------------------------------------------------------------------------
// Pipeline

TEST(Pipeline, PrefillAcceptsAMaskOrAMaskFactory) {
  const Data D(8, 2, 200, 32, 131);
  std::vector<float> direct(static_cast<std::size_t>(8 * 200 * 32)), a(direct.size()),
      b(direct.size());
  const IntervalMask mask = masks::sliding_window(8, 200, 200, 48, 4, 32);
  prefill(D.qv(), D.kv(), D.vv(), TensorView<float>(direct.data(), 8, 200, 32), mask);
  auto c1 = make_cache<kv::ContiguousCache<bf16>>(D, 220);
  auto c2 = make_cache<kv::ContiguousCache<bf16>>(D, 220);
  DecodeSession<kv::ContiguousCache<bf16>> s1(c1), s2(c2);
  const PrefillReport r1 =
      s1.prefill(D.qv(), D.kv(), D.vv(), TensorView<float>(a.data(), 8, 200, 32), mask);
  const PrefillReport r2 =
      s2.prefill(D.qv(), D.kv(), D.vv(), TensorView<float>(b.data(), 8, 200, 32),
                 [](const TensorView<const float>& q, const TensorView<const float>& k) {
                   return masks::sliding_window(q.heads, q.tokens, k.tokens, 48, 4, 32);
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
  using Cache = kv::PagedCache<bf16>;
  auto c1 = make_cache<Cache>(D, 300);
  auto c2 = make_cache<Cache>(D, 300);
  DecodeSession<Cache> s1(c1), s2(c2);
  for (auto* s : {&s1, &s2}) {  // SnapKV's eviction after the prompt, Quest's selection per step
    s->add_policy(methods::make_policy<Cache, float>(methods::SnapKV{}, Budget::compression(2)));
    s->add_policy(methods::make_policy<Cache, float>(methods::Quest{}, Budget::compression(6)));
  }
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
