// Embedding in an engine: plan/run with the caller's workspace (no allocation during run, plans
// reused across layers), the caller's executor (bit-identical results), and the exception
// guarantee (a throwing predicate or a failed allocation leaves every output untouched).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>
#include <random>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <stdexcept>
#include <vector>

#include "../examples/thread_pool_executor.hpp"

// Counting (and, on request, failing) global allocation for this test binary: the counters only
// move while a test arms them. GCC's -Wmismatched-new-delete does not know that these replace the
// global operators (it sees free() on memory from operator new).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocations{0};
std::atomic<long> g_fail_at_least{0};  // > 0: an allocation of at least this many bytes throws

void* counted_alloc(std::size_t n, std::size_t align) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
  const long fail = g_fail_at_least.load(std::memory_order_relaxed);
  if (fail > 0 && n >= static_cast<std::size_t>(fail)) throw std::bad_alloc();
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                              : std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n, 0); }
void* operator new[](std::size_t n) { return counted_alloc(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
// The nothrow forms too, so every delete below frees memory from counted_alloc (std's temporary
// buffers use them).
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, static_cast<std::size_t>(a));
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, static_cast<std::size_t>(a));
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace sparse_attn;

namespace {

template <class T>
std::vector<T> random_values(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = T(nd(rng));
  return v;
}

struct Layer {  // one layer's Q, K, V (bf16 K/V, GQA 4:1)
  static constexpr index_t Hq = 8, Hkv = 2, n = 257, d = 64;
  std::vector<float> q;
  std::vector<bf16> k, v;
  explicit Layer(unsigned seed)
      : q(random_values<float>(Hq * n * d, seed)), k(random_values<bf16>(Hkv * n * d, seed + 1)),
        v(random_values<bf16>(Hkv * n * d, seed + 2)) {}
  TensorView<const float> qv() const { return {q.data(), Hq, n, d}; }
  TensorView<const bf16> kv() const { return {k.data(), Hkv, n, d}; }
  TensorView<const bf16> vv() const { return {v.data(), Hkv, n, d}; }
  TensorView<const float> last_q(index_t t) const { return qv().slice_tokens(n - t, t); }
};

struct Output {
  std::vector<float> o, lse;
  index_t h, n, d;
  Output(index_t h_, index_t n_, index_t d_)
      : o(static_cast<std::size_t>(h_ * n_ * d_), -7.0f), lse(static_cast<std::size_t>(h_ * n_), -7.0f), h(h_), n(n_), d(d_) {}
  TensorView<float> view() { return {o.data(), h, n, d}; }
  LseView lse_view() { return {lse.data(), n}; }
  bool untouched() const {
    for (float x : o)
      if (x != -7.0f) return false;
    for (float x : lse)
      if (x != -7.0f) return false;
    return true;
  }
};

}  // namespace

TEST(PlanRun, RunAllocatesNothingAndMatchesTheOneCallApi) {
  const Layer L(1);
  const IntervalMask mask = masks::sliding_window(Layer::Hq, Layer::n, Layer::n, 100, 4, 64);
  SerialExecutor serial;
  ThreadPoolExecutor pool(3);
  for (Executor* exec : {static_cast<Executor*>(&serial), static_cast<Executor*>(&pool), static_cast<Executor*>(nullptr)}) {
    AttentionOptions opt;
    opt.executor = exec;
    const PrefillPlan plan = plan_prefill(attention_shape(L.qv(), L.kv(), L.vv()), mask, opt);
    WorkspaceBuffer ws(plan.workspace_bytes());
    Output out(Layer::Hq, Layer::n, Layer::d), want(Layer::Hq, Layer::n, Layer::d);
    opt.lse = out.lse_view();
    g_allocations = 0;
    g_counting = true;
    prefill(plan, L.qv(), L.kv(), L.vv(), out.view(), mask, ws.view(), opt);
    g_counting = false;
    EXPECT_EQ(g_allocations.load(), 0) << "prefill run allocated";
    AttentionOptions one = opt;
    one.lse = want.lse_view();
    prefill(L.qv(), L.kv(), L.vv(), want.view(), mask, one);
    EXPECT_EQ(out.o, want.o);
    EXPECT_EQ(out.lse, want.lse);

    // Decode of the last 2 tokens over a per-KV-head token subset.
    std::vector<std::vector<index_t>> lists(Layer::Hkv);
    for (index_t j = 0; j < Layer::n; j += 3) lists[0].push_back(j);
    for (index_t j = 0; j < Layer::n; ++j) lists[1].push_back(j);
    const KeySelection keys = KeySelection::from_tokens(KeySelection::Scope::per_kv_head, lists);
    DecodeOptions dopt;
    dopt.executor = exec;
    dopt.split = 64;
    const DecodePlan dplan = plan_decode(attention_shape(L.last_q(2), L.kv(), L.vv()), keys, dopt);
    WorkspaceBuffer dws(dplan.workspace_bytes());
    Output dout(Layer::Hq, 2, Layer::d), dwant(Layer::Hq, 2, Layer::d);
    dopt.lse = dout.lse_view();
    g_allocations = 0;
    g_counting = true;
    decode(dplan, L.last_q(2), L.kv(), L.vv(), dout.view(), keys, dws.view(), dopt);
    g_counting = false;
    EXPECT_EQ(g_allocations.load(), 0) << "decode run allocated";
    DecodeOptions done = dopt;
    done.lse = dwant.lse_view();
    decode(L.last_q(2), L.kv(), L.vv(), dwant.view(), keys, done);
    EXPECT_EQ(dout.o, dwant.o);
    EXPECT_EQ(dout.lse, dwant.lse);

    // The per-key attention mass output (H2O's scores) keeps both runs allocation-free too.
    std::vector<float> pmass(static_cast<std::size_t>(Layer::Hkv * Layer::n));
    std::vector<float> dmass(pmass.size());
    opt.key_mass = KeyMassView{pmass.data(), Layer::n, Layer::n - 32};
    dopt.key_mass = KeyMassView{dmass.data(), Layer::n, 0};
    const PrefillPlan mplan = plan_prefill(attention_shape(L.qv(), L.kv(), L.vv()), mask, opt);
    const DecodePlan mdplan =
        plan_decode(attention_shape(L.last_q(2), L.kv(), L.vv()), keys, dopt);
    WorkspaceBuffer mws(std::max(mplan.workspace_bytes(), mdplan.workspace_bytes()));
    g_allocations = 0;
    g_counting = true;
    prefill(mplan, L.qv(), L.kv(), L.vv(), out.view(), mask, mws.view(), opt);
    decode(mdplan, L.last_q(2), L.kv(), L.vv(), dout.view(), keys, mws.view(), dopt);
    g_counting = false;
    EXPECT_EQ(g_allocations.load(), 0) << "a run with key_mass allocated";
    EXPECT_EQ(out.o, want.o);  // the mass output changes nothing else
    EXPECT_EQ(dout.o, dwant.o);
  }
}

TEST(PlanRun, OnePlanAndWorkspaceServeEveryLayer) {
  const IntervalMask mask = masks::causal(Layer::Hq, Layer::n, Layer::n);
  const Layer first(10);
  const PrefillPlan plan = plan_prefill(attention_shape(first.qv(), first.kv(), first.vv()), mask);
  const DecodePlan dplan = plan_decode(attention_shape(first.last_q(1), first.kv(), first.vv()));
  WorkspaceBuffer ws(std::max(plan.workspace_bytes(), dplan.workspace_bytes()));
  for (unsigned layer = 0; layer < 3; ++layer) {
    const Layer L(10 + 7 * layer);
    Output out(Layer::Hq, Layer::n, Layer::d), want(Layer::Hq, Layer::n, Layer::d);
    prefill(plan, L.qv(), L.kv(), L.vv(), out.view(), mask, ws.view());
    prefill(L.qv(), L.kv(), L.vv(), want.view(), mask);
    EXPECT_EQ(out.o, want.o) << "layer " << layer;
    const auto oracle = reference::attention_masked(L.qv(), L.kv(), L.vv(), 1.0 / std::sqrt(double(Layer::d)), mask);
    double err = 0.0;
    for (std::size_t i = 0; i < out.o.size(); ++i) err = std::max(err, std::abs(out.o[i] - oracle.out[i]));
    EXPECT_LE(err, 2e-5) << "layer " << layer;
    Output dout(Layer::Hq, 1, Layer::d), dwant(Layer::Hq, 1, Layer::d);
    decode(dplan, L.last_q(1), L.kv(), L.vv(), dout.view(), KeySelection::all(), ws.view());
    decode(L.last_q(1), L.kv(), L.vv(), dwant.view());
    EXPECT_EQ(dout.o, dwant.o) << "layer " << layer;
  }
}

TEST(PlanRun, WorkspaceShapeAndExecutorMismatchesAreRejectedBeforeAnyWrite) {
  const Layer L(20);
  const IntervalMask mask = masks::causal(Layer::Hq, Layer::n, Layer::n);
  SerialExecutor serial;
  AttentionOptions opt;
  opt.executor = &serial;
  const PrefillPlan plan = plan_prefill(attention_shape(L.qv(), L.kv(), L.vv()), mask, opt);
  WorkspaceBuffer ws(plan.workspace_bytes());
  Output out(Layer::Hq, Layer::n, Layer::d);
  EXPECT_THROW(prefill(plan, L.qv(), L.kv(), L.vv(), out.view(), mask, Workspace{ws.view().data, plan.workspace_bytes() - 64}, opt),
               sparse_attn::invalid_argument);
  EXPECT_THROW(prefill(plan, L.qv(), L.kv(), L.vv(), out.view(), mask,
                       Workspace{static_cast<char*>(ws.view().data) + 4, plan.workspace_bytes() - 64}, opt),
               sparse_attn::invalid_argument);
  ThreadPoolExecutor wider(4);  // more workers than the plan's workspace holds
  AttentionOptions wide = opt;
  wide.executor = &wider;
  EXPECT_THROW(prefill(plan, L.qv(), L.kv(), L.vv(), out.view(), mask, ws.view(), wide), sparse_attn::invalid_argument);
  const IntervalMask other = masks::causal(Layer::Hq, Layer::n - 1, Layer::n - 1);
  EXPECT_THROW(prefill(plan, L.qv().slice_tokens(1, Layer::n - 1), L.kv().slice_tokens(1, Layer::n - 1),
                       L.vv().slice_tokens(1, Layer::n - 1), out.view().slice_tokens(1, Layer::n - 1), other, ws.view(), opt),
               sparse_attn::invalid_argument);
  EXPECT_TRUE(out.untouched());
}

TEST(Executors, ThreadPoolAndSerialGiveTheBitsOfTheDefault) {
  const Layer L(30);
  const IntervalMask mask = masks::sliding_window(Layer::Hq, Layer::n, Layer::n, 64, 4, 32);
  Output base(Layer::Hq, Layer::n, Layer::d), dbase(Layer::Hq, 1, Layer::d);
  prefill(L.qv(), L.kv(), L.vv(), base.view(), mask);
  decode(L.last_q(1), L.kv(), L.vv(), dbase.view());
  SerialExecutor serial;
  ThreadPoolExecutor pool2(2), pool5(5);
  for (Executor* e : {static_cast<Executor*>(&serial), static_cast<Executor*>(&pool2), static_cast<Executor*>(&pool5)}) {
    Output out(Layer::Hq, Layer::n, Layer::d), dout(Layer::Hq, 1, Layer::d);
    AttentionOptions opt;
    opt.executor = e;
    prefill(L.qv(), L.kv(), L.vv(), out.view(), mask, opt);
    DecodeOptions dopt;
    dopt.executor = e;
    decode(L.last_q(1), L.kv(), L.vv(), dout.view(), KeySelection::all(), dopt);
    EXPECT_EQ(out.o, base.o) << "concurrency " << e->concurrency();
    EXPECT_EQ(dout.o, dbase.o) << "concurrency " << e->concurrency();
  }
}

namespace {
struct ThrowingPredicate {  // not noexcept: the kernel evaluates it before writing anything
  static constexpr bool trivial = false;
  index_t bad_row;
  const bool* armed;  // throws only once armed (debug builds count pairs with it on construction)
  bool operator()(index_t, index_t qi, index_t kj) const {
    if (*armed && qi == bad_row) throw std::runtime_error("predicate failed");
    return (qi + kj) % 3 != 0;
  }
};
}  // namespace

TEST(Exceptions, ThrowingMaskPredicateLeavesOutputAndLseUntouched) {
  const Layer L(40);
  const MaskShape shape{Layer::Hq, Layer::n, Layer::n, 64, 64, true};
  BlockListBuilder b(shape, true);
  for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb)
    for (index_t kb = 0; kb <= qb; ++kb) b.add(0, qb, kb, false);
  bool armed = false;
  const auto good = b.build(ThrowingPredicate{-1, &armed});
  Output ok(Layer::Hq, Layer::n, Layer::d);
  AttentionOptions oko;
  oko.lse = ok.lse_view();
  prefill(L.qv(), L.kv(), L.vv(), ok.view(), good, oko);  // the precomputed-bits path is exact
  const auto oracle = reference::attention_masked(L.qv(), L.kv(), L.vv(), 1.0 / std::sqrt(double(Layer::d)), good);
  double err = 0.0;
  for (std::size_t i = 0; i < ok.o.size(); ++i) err = std::max(err, std::abs(ok.o[i] - oracle.out[i]));
  EXPECT_LE(err, 2e-5);

  const auto bad = BlockListMask<ThrowingPredicate>(shape, true, good.row_offsets(), good.block_indices(),
                                                    good.full_flags(), ThrowingPredicate{200, &armed}, good.pairs());
  armed = true;
  for (int threads : {1, 3}) {
    Output out(Layer::Hq, Layer::n, Layer::d);
    AttentionOptions opt;
    opt.lse = out.lse_view();
    opt.num_threads = threads;
    EXPECT_THROW(prefill(L.qv(), L.kv(), L.vv(), out.view(), bad, opt), std::runtime_error);
    EXPECT_TRUE(out.untouched());
  }
}

TEST(Exceptions, FailedWorkspaceAllocationLeavesOutputsUntouched) {
  const Layer L(50);
  const IntervalMask mask = masks::causal(Layer::Hq, Layer::n, Layer::n);
  const PrefillPlan plan = plan_prefill(attention_shape(L.qv(), L.kv(), L.vv()), mask);
  const DecodePlan dplan = plan_decode(attention_shape(L.last_q(1), L.kv(), L.vv()));
  Output out(Layer::Hq, Layer::n, Layer::d), dout(Layer::Hq, 1, Layer::d);
  AttentionOptions opt;
  opt.lse = out.lse_view();
  DecodeOptions dopt;
  dopt.lse = dout.lse_view();
  g_fail_at_least = static_cast<long>(std::min(plan.workspace_bytes(), dplan.workspace_bytes()));
  EXPECT_THROW(prefill(L.qv(), L.kv(), L.vv(), out.view(), mask, opt), std::bad_alloc);
  EXPECT_THROW(decode(L.last_q(1), L.kv(), L.vv(), dout.view(), KeySelection::all(), dopt), std::bad_alloc);
  g_fail_at_least = 0;
  EXPECT_TRUE(out.untouched());
  EXPECT_TRUE(dout.untouched());
}

TEST(Exceptions, AnItemThatThrowsIsRethrownAfterTheLoopAndLaterItemsAreSkipped) {
  // In order on one thread: items after the failing one are skipped.
  SerialExecutor serial;
  int ran = 0;
  EXPECT_THROW(run_items(serial, 10000,
                         [&](index_t i, int) {
                           ++ran;
                           if (i == 3) throw std::runtime_error("item 3");
                         }),
               std::runtime_error);
  EXPECT_EQ(ran, 4);
  // On a pool: the exception still reaches the caller, once, after every started item returned.
  ThreadPoolExecutor pool(4);
  std::atomic<int> running{0}, max_after{0};
  try {
    run_items(pool, 1000, [&](index_t i, int) {
      running.fetch_add(1);
      if (i % 7 == 3) {
        running.fetch_sub(1);
        throw std::runtime_error("item");
      }
      running.fetch_sub(1);
    });
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error&) {
    max_after = running.load();
  }
  EXPECT_EQ(max_after.load(), 0);  // no item still running when the caller sees the exception
}

TEST(OnlineSoftmax, BlockUpdatesAndMergesMatchTheDoubleSoftmax) {
  std::mt19937 rng(60);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::vector<float> s(300);
  for (auto& x : s) x = nd(rng);
  s[5] = -INFINITY;
  double m = -INFINITY, l = 0.0;
  for (float x : s) m = std::max(m, double(x));
  for (float x : s) l += std::exp(double(x) - m);
  // One stream in blocks of 64, and two halves merged.
  OnlineSoftmax all, a, b;
  std::vector<float> w = s;
  for (index_t j0 = 0; j0 < 300; j0 += 64) all.update(w.data() + j0, std::min<index_t>(64, 300 - j0));
  std::vector<float> wa(s.begin(), s.begin() + 150), wb(s.begin() + 150, s.end());
  a.update(wa.data(), 150);
  b.update(wb.data(), 150);
  a.merge(b);
  for (const OnlineSoftmax& st : {all, a}) {
    EXPECT_NEAR(st.lse(), m + std::log(l), 1e-5 * std::abs(m + std::log(l)));
  }
  OnlineSoftmax empty;
  std::vector<float> masked(10, -INFINITY);
  EXPECT_FALSE(empty.update(masked.data(), 10).live);
  EXPECT_EQ(empty.lse(), -INFINITY);
  EXPECT_EQ(empty.inv_sum(), 0.0f);
}

// The dispatched AVX-512 bodies use aligned 64-byte loads on the selections' scratch: the scratch
// allocator must give 64-byte alignment in every build (Eigen's gives 16 under -march=x86-64-v2;
// SnapKV scoring with 16 threads crashed on that before).
TEST(PlanRun, ScratchVectorsAreCacheLineAligned) {
  for (std::size_t n : {1u, 3u, 17u, 1000u, 100000u, 3000000u}) {
    const kernel::aligned_vector<float> v(n);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(v.data()) % 64, 0u) << n;
  }
}
