// "A call that throws has changed nothing" (docs/ROBUSTNESS.md), checked for every mutating API:
// each test snapshots all observable state, makes the call fail at each of its checks in turn
// (EXPECT_THROW sparse_attn::invalid_argument), compares the snapshot bit for bit, then makes one
// successful call and compares it with an object that never saw the failures. Also: size
// computations of caches and H2O states never wrap, never throw std::length_error.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "sparse_attn/sparse_attn.hpp"

namespace {
using namespace sparse_attn;
using Bytes = std::vector<std::uint8_t>;

template <class T>
void put(Bytes& b, const T& x) {
  const auto* p = reinterpret_cast<const std::uint8_t*>(&x);
  b.insert(b.end(), p, p + sizeof(T));
}

struct Data {  // deterministic [H, n, d] floats
  std::vector<float> x;
  index_t h, n, d;
  Data(index_t h_, index_t n_, index_t d_, unsigned seed) : x(h_ * n_ * d_), h(h_), n(n_), d(d_) {
    std::uint32_t s = seed * 2654435761u + 1;
    for (float& f : x) f = static_cast<float>((s = s * 1664525u + 1013904223u) >> 8) / 8388608.0f - 1.0f;
  }
  TensorView<const float> tok(index_t t0, index_t m) const {
    return TensorView<const float>(x.data(), h, n, d).slice_tokens(t0, m);
  }
};

// Everything a cache shows: lengths, positions, K/V rows and key bounds of every held slot/page,
// the page table and the free-page count.
template <class C>
Bytes cache_state(const C& c) {
  Bytes b;
  put(b, c.sequence_length());
  if constexpr (C::paged) {
    put(b, c.free_pages());
    const auto kv = c.keys();
    const index_t pages = (c.capacity() + c.page_size() - 1) / c.page_size();
    const index_t tables = kv.table_stride_head == 0 ? 1 : c.kv_heads();
    for (index_t i = 0; i < tables * pages; ++i) put(b, kv.table[i]);
  }
  for (index_t h = 0; h < c.kv_heads(); ++h) {
    put(b, c.length(h));
    for (index_t t = 0; t < c.length(h); ++t) {
      put(b, c.position(h, t));
      for (index_t x = 0; x < c.head_dim(); ++x) put(b, c.keys()(h, t, x));
      for (index_t x = 0; x < c.value_dim(); ++x) put(b, c.values()(h, t, x));
    }
    if (c.has_key_bounds())
      for (index_t p = 0; p < c.num_pages(h); ++p)
        for (index_t x = 0; x < 2 * c.head_dim(); ++x) put(b, c.key_bounds(h, p)[x]);
  }
  return b;
}

kv::CacheOptions opts(index_t cap = 64, index_t H = 2, index_t d = 8, index_t P = 4) {
  kv::CacheOptions o;
  o.kv_heads = H, o.head_dim = d, o.capacity = cap, o.page_size = P;
  return o;
}

template <class C>
class CacheTxn : public ::testing::Test {};
using CacheTypes = ::testing::Types<kv::ContiguousCache<float>, kv::ContiguousCache<bf16>,
                                    kv::PagedCache<float>, kv::PagedCache<bf16>>;
TYPED_TEST_SUITE(CacheTxn, CacheTypes, ::testing::internal::DefaultNameGenerator);

TYPED_TEST(CacheTxn, AppendRetainUndoThatThrowChangeNothing) {
  using C = TypeParam;
  const Data k(2, 80, 8, 1), v(2, 80, 8, 2), k3(3, 4, 8, 3), k9(2, 4, 9, 4);
  C c(opts()), twin(opts());
  for (C* x : {&c, &twin}) {
    x->append(k.tok(0, 21), v.tok(0, 21));
    x->retain({{0, 1, 5, 7, 8, 12, 20}, {2, 3, 4, 9, 10, 11, 13, 20}});  // uneven heads
    x->append(k.tok(21, 6), v.tok(21, 6));
  }
  const Bytes before = cache_state(c);
  auto same = [&](const char* what) { EXPECT_EQ(cache_state(c), before) << what; };
  const TensorView<const float> null_view(nullptr, 2, 4, 8);
  ExecutorChoice bad_threads;
  bad_threads.num_threads = -1;
  // append: each check in its order.
  EXPECT_THROW(c.append(null_view, v.tok(27, 4)), invalid_argument); same("k view");
  EXPECT_THROW(c.append(k.tok(27, 4), null_view), invalid_argument); same("v view");
  EXPECT_THROW(c.append(k3.tok(0, 4), v.tok(27, 4)), invalid_argument); same("heads");
  EXPECT_THROW(c.append(k9.tok(0, 4), v.tok(27, 4)), invalid_argument); same("dims");
  EXPECT_THROW(c.append(k.tok(27, 4), v.tok(27, 5)), invalid_argument); same("tokens");
  EXPECT_THROW(c.append(k.tok(27, 4), v.tok(27, 4), bad_threads), invalid_argument); same("threads");
  EXPECT_THROW(c.append(k.tok(27, 53), v.tok(27, 53)), invalid_argument); same("capacity");
  // retain(h, slots, count).
  const index_t ok[] = {0, 2, 3}, unsorted[] = {0, 3, 2}, dup[] = {0, 2, 2}, past[] = {0, 2, 15};
  EXPECT_THROW(c.retain(0, nullptr, 2), invalid_argument); same("null slots");
  EXPECT_THROW(c.retain(2, ok, 3), invalid_argument); same("head");
  EXPECT_THROW(c.retain(0, ok, 14), invalid_argument); same("count > length");
  EXPECT_THROW(c.retain(0, unsorted, 3), invalid_argument); same("unsorted");
  EXPECT_THROW(c.retain(0, dup, 3), invalid_argument); same("duplicate");
  EXPECT_THROW(c.retain(0, past, 3), invalid_argument); same("slot past length");
  // retain(keep): list count, then a bad list for the last head (the first is valid).
  EXPECT_THROW(c.retain({{0, 1}}), invalid_argument); same("lists");
  EXPECT_THROW(c.retain({{0, 1}, {3, 1}}), invalid_argument); same("later list");
  // undo_append: m range, then an append that was evicted since.
  EXPECT_THROW(c.undo_append(-1), invalid_argument); same("undo m < 0");
  EXPECT_THROW(c.undo_append(28), invalid_argument); same("undo m > seq");
  EXPECT_THROW(c.undo_append(8), invalid_argument); same("undo evicted");
  // Still usable, and like the cache that never saw the failures (pages included).
  for (C* x : {&c, &twin}) {
    x->append(k.tok(27, 9), v.tok(27, 9));
    x->retain(1, ok, 3);
    x->undo_append(0);
  }
  EXPECT_EQ(cache_state(c), cache_state(twin));
  // An undone append leaves exactly the state before it (free-page order included).
  const Bytes mid = cache_state(c);
  c.append(k.tok(36, 30), v.tok(36, 30));
  c.undo_append(30);
  EXPECT_EQ(cache_state(c), mid);
  c.append(k.tok(36, 5), v.tok(36, 5));
  twin.append(k.tok(36, 5), v.tok(36, 5));
  EXPECT_EQ(cache_state(c), cache_state(twin));
}

// Sanitizer runtimes (ASan, TSan) end the process, by design, when a throwing operator new cannot
// allocate, instead of throwing std::bad_alloc: the cases that must reach bad_alloc run only in
// builds without them (the invalid_argument cases run everywhere).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SPARSE_ATTN_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SPARSE_ATTN_TEST_SANITIZED 1
#endif
#endif
#ifndef SPARSE_ATTN_TEST_SANITIZED
#define SPARSE_ATTN_TEST_SANITIZED 0
#endif

// Sizes: overflow -> invalid_argument naming them; fits but too large -> std::bad_alloc.
template <class C>
void expect_size_error(const kv::CacheOptions& o, bool overflow) {
  SCOPED_TRACE(testing::Message() << "H=" << o.kv_heads << " cap=" << o.capacity << " d=" << o.head_dim);
  try {
    C c(o);
    ADD_FAILURE() << "constructed, reserved " << c.reserved_bytes() << " bytes";
  } catch (const invalid_argument& e) {
    EXPECT_TRUE(overflow) << e.what();
    EXPECT_NE(std::string(e.what()).find("capacity"), std::string::npos) << e.what();
  } catch (const std::bad_alloc&) {
    EXPECT_FALSE(overflow);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception: " << e.what();
  }
}

TEST(SizeChecks, HugeCachesAndStatesNeverWrapNorThrowLengthError) {
  constexpr index_t kMax = std::numeric_limits<index_t>::max();
  for (index_t H : {1, 8, 32})
    for (index_t d : {1, 128}) {
      auto o = opts(kMax / H / d, H, d);  // the product fits int64, its bytes do not
      expect_size_error<kv::ContiguousCache<float>>(o, true);
      expect_size_error<kv::PagedCache<bf16>>(o, true);
      if (H * d > 1) {
        o.capacity = kMax / H / d + 1;  // the product wraps
        expect_size_error<kv::ContiguousCache<float>>(o, true);
      }
      o.capacity = kMax;
      expect_size_error<kv::PagedCache<float>>(o, true);
    }
  expect_size_error<kv::ContiguousCache<float>>(opts(index_t{1} << 62, 1, 1), true);
  expect_size_error<kv::ContiguousCache<bf16>>(opts(index_t{1} << 62, 4, 128), true);
  // 2^40 tokens x 128 floats = 512 TiB: valid sizes, not allocatable.
  if (!SPARSE_ATTN_TEST_SANITIZED) {
    expect_size_error<kv::ContiguousCache<float>>(opts(index_t{1} << 40, 1, 128), false);
    expect_size_error<kv::PagedCache<float>>(opts(index_t{1} << 40, 1, 128, 16), false);
    auto shared = opts(index_t{1} << 40, 8, 128, 16);
    shared.page_table = kv::PageTable::shared;
    expect_size_error<kv::PagedCache<bf16>>(shared, false);
  }
  // H2O state of a (fake) cache of any capacity: checked before it allocates.
  struct Fake {
    index_t H, cap;
    index_t kv_heads() const { return H; }
    index_t capacity() const { return cap; }
    index_t sequence_length() const { return 0; }
  };
  methods::H2O::State st;
  EXPECT_THROW(st.reset(Fake{8, kMax / 4}, methods::Budget::count(8)), invalid_argument);
  EXPECT_THROW(st.reset(Fake{3, index_t{1} << 62}, methods::Budget::count(8)), invalid_argument);
  if (!SPARSE_ATTN_TEST_SANITIZED) {
    EXPECT_THROW(st.reset(Fake{1, index_t{1} << 45}, methods::Budget::count(8)), std::bad_alloc);
    EXPECT_FALSE(st.bound_to(Fake{1, index_t{1} << 45}));
  }
}

// H2O::State: scores, H, R; the cache with it.
using Cache = kv::ContiguousCache<float>;
Bytes h2o_state(const methods::H2O::State& s, const Cache& c) {
  Bytes b = cache_state(c);
  put(b, s.heavy()), put(b, s.recent());
  if (s.bound_to(c))
    for (index_t h = 0; h < c.kv_heads(); ++h)
      for (index_t j = 0; j < c.length(h); ++j) put(b, s.scores(h)[j]);
  return b;
}

TEST(StateTxn, H2OStateCallsThatThrowChangeNothing) {
  const Data q(4, 60, 8, 5), k(2, 60, 8, 6), v(2, 60, 8, 7), q5(5, 60, 8, 8), q9(4, 60, 9, 9);
  Cache c(opts()), twin(opts());
  methods::H2O::State s, t;
  for (auto [x, st] : {std::pair{&c, &s}, std::pair{&twin, &t}}) {
    x->append(k.tok(0, 30), v.tok(0, 30));
    st->reset(*x, methods::Budget::count(20));
    st->observe(q.tok(0, 30), *x, {}, true);
    st->apply(st->select(*x), *x);
    x->append(k.tok(30, 1), v.tok(30, 1));
  }
  const Bytes before = h2o_state(s, c);
  auto same = [&](const char* what) { EXPECT_EQ(h2o_state(s, c), before) << what; };
  AttentionOptions bad_threads, bad_scale;
  bad_threads.num_threads = -1;
  bad_scale.scale = -1.0f;
  const TensorView<const float> null_q(nullptr, 4, 1, 8);
  // reset: budget kind, prefill_queries.
  EXPECT_THROW(s.reset(c, methods::Budget::mass(0.5)), invalid_argument); same("reset budget");
  EXPECT_THROW(s.reset(c, methods::Budget::count(8), -2), invalid_argument); same("reset seed");
  // observe and step: view, binding, shapes, threads, tokens, then the scale (the last check).
  for (bool step : {false, true}) {
    auto call = [&](const TensorView<const float>& qq, const AttentionOptions& o) {
      if (step) s.step(qq, c, o); else s.observe(qq, c, o);
    };
    EXPECT_THROW(call(null_q, {}), invalid_argument); same("q view");
    EXPECT_THROW(call(q5.tok(30, 1), {}), invalid_argument); same("q heads");
    EXPECT_THROW(call(q9.tok(30, 1), {}), invalid_argument); same("q dim");
    EXPECT_THROW(call(q.tok(30, 1), bad_threads), invalid_argument); same("threads");
    EXPECT_THROW(call(q.tok(0, 22), {}), invalid_argument); same("q tokens > cache");
    EXPECT_THROW(call(q.tok(30, 1), bad_scale), invalid_argument); same("scale");
  }
  std::vector<float> mass(2 * 64, 0.25f);
  EXPECT_THROW(s.observe_mass(nullptr, 21, c), invalid_argument); same("mass null");
  EXPECT_THROW(s.observe_mass(mass.data(), 20, c), invalid_argument); same("mass stride");
  EXPECT_THROW(s.step_mass(mass.data(), 20, c), invalid_argument); same("step_mass stride");
  kv::EvictionPlan bad = s.select(c);
  bad.keep.pop_back();
  bad.dense = false;
  EXPECT_THROW(s.apply(bad, c), invalid_argument); same("apply plan");
  methods::H2O::State unbound;
  kv::EvictionPlan plan = s.select(c);
  EXPECT_THROW(unbound.apply(plan, c), invalid_argument); same("apply unbound");
  EXPECT_THROW(unbound.observe(q.tok(30, 1), c), invalid_argument); same("observe unbound");
  // Uneven heads behind the State's back: rejected before anything changes.
  Cache uneven = c;
  const index_t keep0[] = {0, 1};
  uneven.retain(0, keep0, 2);
  const Bytes ub = h2o_state(s, uneven);
  EXPECT_THROW(s.observe(q.tok(30, 1), uneven), invalid_argument);
  EXPECT_THROW(s.step(q.tok(30, 1), uneven), invalid_argument);
  EXPECT_EQ(h2o_state(s, uneven), ub);
  same("uneven cache");
  // Usable, and like the State that never failed.
  s.step(q.tok(30, 1), c);
  t.step(q.tok(30, 1), twin);
  EXPECT_EQ(h2o_state(s, c), h2o_state(t, twin));
}

TEST(StateTxn, PrefillEvictionPoliciesThatThrowChangeNothing) {
  const Data q(4, 40, 8, 10), k(2, 40, 8, 11), v(2, 40, 8, 12), q9(4, 40, 9, 13);
  AttentionOptions bad_threads, bad_scale;
  bad_threads.num_threads = -1;
  bad_scale.scale = 0.0f;
  methods::SnapKV w0, even;
  w0.window = 0, even.pool_kernel = 4;
  methods::AdaSnapKV ada, floor2;
  floor2.floor_fraction = 2.0;
  methods::H2O h2o;
  const auto b = methods::Budget::count(12);
  using P = std::unique_ptr<methods::DecodePolicy<Cache, float>>;
  struct Case { P p; TensorView<const float> q; AttentionOptions o; const char* what; };
  std::vector<Case> cases;
  cases.push_back({methods::make_policy<Cache, float>(w0, b), q.tok(24, 8), {}, "window"});
  cases.push_back({methods::make_policy<Cache, float>(even, b), q.tok(24, 8), {}, "pool"});
  cases.push_back({methods::make_policy<Cache, float>(floor2, b), q.tok(24, 8), {}, "floor"});
  cases.push_back({methods::make_policy<Cache, float>(ada, b), q9.tok(24, 8), {}, "q dim"});
  cases.push_back({methods::make_policy<Cache, float>(ada, b), q.tok(0, 0), {}, "no query"});
  cases.push_back({methods::make_policy<Cache, float>(ada, b), q.tok(24, 8), bad_threads, "threads"});
  cases.push_back({methods::make_policy<Cache, float>(methods::SnapKV{}, b), q.tok(24, 8), bad_scale, "scale"});
  cases.push_back({methods::make_policy<Cache, float>(h2o, b), q.tok(24, 8), bad_scale, "h2o scale"});
  cases.push_back({methods::make_policy<Cache, float>(h2o, b), q9.tok(24, 8), {}, "h2o q dim"});
  for (auto& cs : cases) {
    Cache c(opts());
    c.append(k.tok(0, 32), v.tok(0, 32));
    const Bytes before = cache_state(c);
    EXPECT_THROW(cs.p->after_prefill(cs.q, c, cs.o), invalid_argument) << cs.what;
    EXPECT_EQ(cache_state(c), before) << cs.what;
    EXPECT_EQ(cs.p->last_eviction(), nullptr) << cs.what;
  }
}

// DecodeSession::step: each check, including the kernel's options (checked after the append
// and a StreamingLLM eviction before this round) and the policies' own.
Bytes session_state(const DecodeSession<Cache>& s, const std::vector<float>& out) {
  Bytes b = cache_state(s.cache());
  for (index_t i = 0; i < s.num_policies(); ++i) {
    put(b, s.policy(i).stats().pairs), put(b, s.policy(i).stats().dense_pairs);
    if (const kv::EvictionPlan* e = s.policy(i).last_eviction())
      for (const auto& l : e->keep) for (index_t j : l) put(b, j);
  }
  for (float x : out) put(b, x);
  return b;
}

TEST(SessionTxn, StepThatThrowsChangesNothing) {
  const Data q(4, 80, 8, 20), k(2, 80, 8, 21), v(2, 80, 8, 22), q9(4, 80, 9, 23), k3(3, 80, 8, 24);
  Cache c(opts(40)), twin(opts(40));
  SessionOptions so;
  auto make = [&](Cache& x, const SessionOptions& o) {
    auto s = std::make_unique<DecodeSession<Cache>>(x, o);
    s->add_policy(methods::make_policy<Cache, float>(methods::StreamingLLM{}, methods::Budget::count(24)));
    s->add_policy(methods::make_policy<Cache, float>(methods::H2O{}, methods::Budget::count(20)));
    return s;
  };
  auto s = make(c, so), t = make(twin, so);
  std::vector<float> out(4 * 8, 7.0f), tout(out);
  for (auto* x : {s.get(), t.get()}) {
    x->ingest(q.tok(6, 24), k.tok(0, 30), v.tok(0, 30));
    for (index_t i = 30; i < 33; ++i)
      x->step(q.tok(i, 1), k.tok(i, 1), v.tok(i, 1), TensorView<float>(out.data(), 4, 1, 8));
  }
  const Bytes before = session_state(*s, out);
  auto same = [&](const char* what) { EXPECT_EQ(session_state(*s, out), before) << what; };
  const TensorView<float> o(out.data(), 4, 1, 8), o_alias(out.data(), 4, 1, 8, 0, 8, 1);
  const TensorView<const float> null_q(nullptr, 4, 1, 8);
  auto step = [&](DecodeSession<Cache>& x, TensorView<const float> qq, TensorView<const float> kk,
                  TensorView<const float> vv, TensorView<float> oo) { x.step(qq, kk, vv, oo); };
  const index_t i = 33;
  EXPECT_THROW(step(*s, q.tok(i, 1), k.tok(i, 1), v.tok(i, 1), o_alias), invalid_argument); same("out aliases");
  EXPECT_THROW(step(*s, null_q, k.tok(i, 1), v.tok(i, 1), o), invalid_argument); same("q view");
  EXPECT_THROW(step(*s, q9.tok(i, 1), k.tok(i, 1), v.tok(i, 1), o), invalid_argument); same("q dim");
  EXPECT_THROW(step(*s, q.tok(i, 1), k.tok(i, 2), v.tok(i, 2), o), invalid_argument); same("tokens");
  EXPECT_THROW(step(*s, q.tok(i, 1), k3.tok(i, 1), v.tok(i, 1), o), invalid_argument); same("k heads");
  EXPECT_THROW(step(*s, q.tok(i, 1), k.tok(i, 1), v.tok(i, 2), o), invalid_argument); same("v tokens");
  // Options: each in a session over the same cache whose policies were seeded alike.
  for (int bad = 0; bad < 3; ++bad) {
    SessionOptions bo;
    if (bad == 0) bo.scale = -1.0f;
    if (bad == 1) bo.num_threads = -1;
    if (bad == 2) bo.split = 8;
    DecodeSession<Cache> b(c, bo);  // StreamingLLM would evict before the kernel checks
    b.add_policy(methods::make_policy<Cache, float>(methods::StreamingLLM{}, methods::Budget::count(8)));
    const Bytes cb = cache_state(c);
    EXPECT_THROW(step(b, q.tok(i, 1), k.tok(i, 1), v.tok(i, 1), o), invalid_argument) << bad;
    EXPECT_EQ(cache_state(c), cb) << "option " << bad;
  }
  same("options");
  // A policy's own check (H2O not seeded: after_prefill never ran), before the append.
  DecodeSession<Cache> unseeded(c, so);
  unseeded.add_policy(methods::make_policy<Cache, float>(methods::H2O{}, methods::Budget::count(20)));
  EXPECT_THROW(step(unseeded, q.tok(i, 1), k.tok(i, 1), v.tok(i, 1), o), invalid_argument);
  same("policy check");
  // Capacity: a step of more tokens than fit.
  std::vector<float> big(4 * 21 * 8);
  EXPECT_THROW(step(*s, q.tok(i, 21), k.tok(i, 21), v.tok(i, 21), TensorView<float>(big.data(), 4, 21, 8)),
               invalid_argument);
  same("capacity");
  // Policies in an order the session cannot run: refused when added.
  DecodeSession<Cache> sel(c, so);
  sel.add_policy(methods::make_policy<Cache, float>(methods::Quest{}, methods::Budget::compression(2)));
  EXPECT_THROW(sel.add_policy(methods::make_policy<Cache, float>(methods::Quest{}, methods::Budget::compression(2))),
               invalid_argument);
  EXPECT_THROW(sel.add_policy(methods::make_policy<Cache, float>(methods::StreamingLLM{}, methods::Budget::count(8))),
               invalid_argument);
  EXPECT_EQ(sel.num_policies(), 1);
  same("add_policy");
  // Usable, and like the session that never failed.
  s->step(q.tok(i, 1), k.tok(i, 1), v.tok(i, 1), o);
  t->step(q.tok(i, 1), k.tok(i, 1), v.tok(i, 1), TensorView<float>(tout.data(), 4, 1, 8));
  EXPECT_EQ(out, tout);
  EXPECT_EQ(cache_state(c), cache_state(twin));
}

}  // namespace
