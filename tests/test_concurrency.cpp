// Concurrent callers: engines call the kernels from several threads at once (one sequence per
// thread) or from inside their own parallel regions. Eight threads, each on its own data (its own
// shapes, seed and K/V type), run prefill (dense causal, sliding window with plan/run and key mass,
// block-sparse, Vertical-Slash, a user mask) and decode (dense over a kv::Cache, Quest, a
// DecodeSession with an eviction method and Quest) a few times over; every result must be bit for
// bit what the same calls gave on one thread beforehand, for each executor: one thread per call,
// the default executor, an engine's std::thread pool, and nested inside an outer parallel region.
// Under ThreadSanitizer (cmake/RunTsanTests.cmake) the default executor is a std::thread pool
// (tests/tsan_default_executor.hpp), so these tests are also the race check of docs/ROBUSTNESS.md.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sparse_attn/pipeline.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../examples/thread_pool_executor.hpp"

using namespace sparse_attn;
namespace sm = sparse_attn::methods;
using methods::Budget;

namespace {

constexpr int kThreads = 8;     // concurrent callers
constexpr int kIterations = 2;  // each caller repeats its calls, so races get more chances

template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = T(nd(rng));
  return v;
}

// How a caller runs the library: num_threads for the default executor, or its own executor.
struct Exec {
  int num_threads = 1;
  Executor* executor = nullptr;
  template <class Options>
  Options apply(Options o) const {
    o.num_threads = num_threads;
    o.executor = executor;
    return o;
  }
  ExecutorChoice choice() const { return {executor, num_threads}; }
};

// Caller c's problem: its own GQA layout, length, head dim and seed; bf16 K/V for odd c.
struct Shape {
  index_t hkv, hq, n, d;
  explicit Shape(int c)
      : hkv(1 + c % 2), hq((1 + c % 2) * (1 + (c / 2) % 2)), n(130 + 37 * c), d(c % 3 == 0 ? 64 : 32) {}
};

// Appends the bits of `x` (floats as they are, integers converted exactly).
void append(std::vector<float>& bits, const std::vector<float>& x) { bits.insert(bits.end(), x.begin(), x.end()); }
template <class Mask>
void append_csr(std::vector<float>& bits, const Mask& m) {
  for (auto x : m.row_offsets()) bits.push_back(static_cast<float>(x));
  for (auto x : m.block_indices()) bits.push_back(static_cast<float>(x));
  for (auto x : m.full_flags()) bits.push_back(static_cast<float>(x));
  bits.push_back(static_cast<float>(m.pairs()));
}
// A line mask: every head's columns, then offsets, and the pair count.
void append_csr(std::vector<float>& bits, const LineMask& m) {
  for (index_t h = 0; h < m.shape().heads; ++h) {
    for (index_t t = 0; t < m.num_columns(h); ++t) bits.push_back(static_cast<float>(m.columns(h)[t]));
    for (index_t t = 0; t < m.num_offsets(h); ++t) bits.push_back(static_cast<float>(m.offsets(h)[t]));
  }
  bits.push_back(static_cast<float>(m.pairs()));
}

template <class TKV>
std::vector<float> workload(int c, const Exec& ex) {
  const Shape s(c);
  std::mt19937 rng(1000u + static_cast<unsigned>(c));
  const std::vector<float> qd = random_values<float>(static_cast<std::size_t>(s.hq * s.n * s.d), rng);
  std::vector<float> kf = random_values<float>(static_cast<std::size_t>(s.hkv * s.n * s.d), rng);
  for (index_t h = 0; h < s.hkv; ++h)  // a planted column: something for the selections to find
    for (index_t i = 0; i < s.d; ++i) kf[static_cast<std::size_t>((h * s.n + 37) * s.d + i)] += 2.0f * qd[static_cast<std::size_t>(((h * (s.hq / s.hkv)) * s.n + s.n - 1) * s.d + i)];
  const std::vector<TKV> kd(kf.begin(), kf.end());
  const std::vector<TKV> vd = random_values<TKV>(kd.size(), rng);
  const TensorView<const float> q(qd.data(), s.hq, s.n, s.d);
  const TensorView<const TKV> k(kd.data(), s.hkv, s.n, s.d), v(vd.data(), s.hkv, s.n, s.d);
  std::vector<float> bits;

  const auto run_prefill = [&](const auto& mask, AttentionOptions opt) {
    std::vector<float> o(static_cast<std::size_t>(s.hq * s.n * s.d), -7.0f), lse(static_cast<std::size_t>(s.hq * s.n), -7.0f);
    opt.lse = LseView(lse.data(), s.n);
    prefill(q, k, v, TensorView<float>(o.data(), s.hq, s.n, s.d), mask, opt);
    append(bits, o);
    append(bits, lse);
  };
  const AttentionOptions opt = ex.apply(AttentionOptions{});

  // Dense causal (bf16 K/V: bf16 products too), then a sliding window through plan/run with the
  // caller's workspace and the per-key mass output.
  AttentionOptions dense = opt;
  if (std::is_same_v<TKV, bf16>) dense.precision = Precision::bfloat16;
  run_prefill(masks::causal(s.hq, s.n, s.n), dense);
  {
    const IntervalMask window = masks::sliding_window(s.hq, s.n, s.n, 48, 4, 32);
    std::vector<float> o(static_cast<std::size_t>(s.hq * s.n * s.d), -7.0f), mass(static_cast<std::size_t>(s.hkv * s.n), -7.0f);
    AttentionOptions wo = opt;
    wo.key_mass = KeyMassView{mass.data(), s.n, s.n / 2};
    const PrefillPlan plan = plan_prefill(attention_shape(q, k, v), window, wo);
    WorkspaceBuffer ws(plan.workspace_bytes());
    prefill(plan, q, k, v, TensorView<float>(o.data(), s.hq, s.n, s.d), window, ws.view(), wo);
    append(bits, o);
    append(bits, mass);
  }
  // Data-dependent selections, then the kernel on their masks.
  {
    const auto sel = sm::BlockSparse{32}.select(q, k, Budget::compression(3), opt);
    append_csr(bits, sel.mask);
    run_prefill(sel.mask, opt);
  }
  {
    sm::VerticalSlash vs;
    vs.block = 32;
    vs.local_offsets = 16;
    const auto sel = vs.select(q, k, Budget::compression(3), opt);
    append_csr(bits, sel.mask);
    run_prefill(sel.mask, opt);
  }
  {  // a user block-CSR: the diagonal and a pseudo-random subset of the earlier blocks per row
    const index_t nb = (s.n + 31) / 32;
    std::vector<index_t> off{0};
    std::vector<std::int32_t> col;
    std::vector<std::uint8_t> full;
    std::uint32_t state = 12345u + static_cast<std::uint32_t>(c);
    for (index_t h = 0; h < s.hq; ++h)
      for (index_t qb = 0; qb < nb; ++qb) {
        for (index_t kb = 0; kb <= qb; ++kb) {
          state = state * 1664525u + 1013904223u;
          if (kb == qb || (state >> 28) < 7) {
            col.push_back(static_cast<std::int32_t>(kb));
            full.push_back(h % 2 == 0 && kb < qb ? 1 : 0);
          }
        }
        off.push_back(static_cast<index_t>(col.size()));
      }
    const sm::UserMask um(MaskShape{s.hq, s.n, s.n, 32, 32, true}, false, off, col, full, {}, ex.choice());
    append_csr(bits, um.mask);
    run_prefill(um.mask, opt);
  }

  // Decode over a kv::Cache: the prompt, then 4 single-token steps, each dense and with Quest.
  {
    kv::CacheOptions co;
    co.kv_heads = s.hkv;
    co.head_dim = s.d;
    co.capacity = s.n;
    co.page_size = 16;
    kv::ContiguousCache<TKV> cache(co);
    const index_t prompt = s.n - 4;
    cache.append(k.slice_tokens(0, prompt), v.slice_tokens(0, prompt), ex.choice());
    DecodeOptions dopt = ex.apply(DecodeOptions{});
    dopt.split = 64;  // several chunks to merge
    sm::Quest quest;
    quest.per_query_head = c % 4 >= 2;
    sm::DecodeSelection sel;  // reused across steps, as an engine does
    sm::QuestPages pages;
    for (index_t t = prompt; t < s.n; ++t) {
      cache.append(k.slice_tokens(t, 1), v.slice_tokens(t, 1), ex.choice());
      const auto qt = q.slice_tokens(t, 1);
      std::vector<float> o(static_cast<std::size_t>(s.hq * s.d), -7.0f);
      decode(qt, cache, TensorView<float>(o.data(), s.hq, 1, s.d), KeySelection::all(), dopt);
      append(bits, o);
      // Quest with the caller's pages on even steps, its thread_local ones on odd steps.
      quest.select(qt, cache, Budget::compression(3), opt, sel, t % 2 == 0 ? &pages : nullptr);
      decode(qt, cache, TensorView<float>(o.data(), s.hq, 1, s.d), sel.keys, dopt);
      append(bits, o);
    }
  }

  // A decode session: eviction after the prompt (SnapKV or H2O), Quest at every step.
  {
    using SessionCache = kv::PagedCache<TKV>;
    kv::CacheOptions co;
    co.kv_heads = s.hkv;
    co.head_dim = s.d;
    co.capacity = s.n;
    co.page_size = 16;
    SessionCache cache(co);
    SessionOptions so = ex.apply(SessionOptions{});
    so.split = 32;
    DecodeSession<SessionCache> session(cache, so);
    if (c % 4 < 2)
      session.add_policy(sm::make_policy<SessionCache, float>(sm::SnapKV{}, Budget::compression(3)));
    else
      session.add_policy(sm::make_policy<SessionCache, float>(sm::H2O{}, Budget::compression(3)));
    session.add_policy(sm::make_policy<SessionCache, float>(sm::Quest{}, Budget::compression(2)));
    const index_t prompt = s.n - 3;
    std::vector<float> po(static_cast<std::size_t>(s.hq * prompt * s.d), -7.0f);
    session.prefill(q.slice_tokens(0, prompt), k.slice_tokens(0, prompt), v.slice_tokens(0, prompt),
                    TensorView<float>(po.data(), s.hq, prompt, s.d), masks::causal(s.hq, prompt, prompt));
    append(bits, po);
    for (index_t t = prompt; t < s.n; ++t) {
      std::vector<float> o(static_cast<std::size_t>(s.hq * s.d), -7.0f);
      session.step(q.slice_tokens(t, 1), k.slice_tokens(t, 1), v.slice_tokens(t, 1),
                   TensorView<float>(o.data(), s.hq, 1, s.d));
      append(bits, o);
      for (index_t h = 0; h < s.hkv; ++h)
        for (index_t i = 0; i < cache.length(h); ++i) bits.push_back(static_cast<float>(cache.position(h, i)));
    }
  }
  return bits;
}

std::vector<float> run_caller(int c, const Exec& ex) {
  return c % 2 == 1 ? workload<bf16>(c, ex) : workload<float>(c, ex);
}

// Every caller's results on one thread, computed once (before any concurrent run).
const std::vector<std::vector<float>>& serial_results() {
  static const std::vector<std::vector<float>> r = [] {
    std::vector<std::vector<float>> x;
    for (int c = 0; c < kThreads; ++c) x.push_back(run_caller(c, Exec{1, nullptr}));
    return x;
  }();
  return r;
}

// What one concurrent caller got: every iteration's results, or the exception it threw.
struct CallerResult {
  std::vector<std::vector<float>> runs;
  std::string error;
};

void record(CallerResult& r, int c, const Exec& ex) {
  try {
    for (int it = 0; it < kIterations; ++it) r.runs.push_back(run_caller(c, ex));
  } catch (const std::exception& e) {
    r.error = e.what();
  }
}

void expect_serial_bits(const std::vector<CallerResult>& got, const std::string& what) {
  const auto& want = serial_results();
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t c = 0; c < got.size(); ++c) {
    EXPECT_EQ(got[c].error, "") << what << ", caller " << c;
    ASSERT_EQ(got[c].runs.size(), static_cast<std::size_t>(kIterations)) << what << ", caller " << c;
    for (std::size_t it = 0; it < got[c].runs.size(); ++it) {
      const std::vector<float>& bits = got[c].runs[it];
      ASSERT_EQ(bits.size(), want[c].size()) << what << ", caller " << c << ", iteration " << it;
      EXPECT_EQ(std::memcmp(bits.data(), want[c].data(), bits.size() * sizeof(float)), 0)
          << what << ", caller " << c << ", iteration " << it << ": bits differ from the serial run";
    }
  }
}

// kThreads std::threads at once, caller c on its own data with executor exec_of(c).
template <class ExecOf>
std::vector<CallerResult> run_concurrently(ExecOf&& exec_of) {
  std::vector<CallerResult> r(kThreads);
  std::vector<std::thread> callers;
  for (int c = 0; c < kThreads; ++c)
    callers.emplace_back([&r, &exec_of, c] { record(r[static_cast<std::size_t>(c)], c, exec_of(c)); });
  for (std::thread& t : callers) t.join();
  return r;
}

}  // namespace

// The default executor runs items on several threads when asked for several (OpenMP, or the
// std::thread pool of the TSan build): otherwise the tests below would test nothing concurrent.
TEST(Concurrency, DefaultExecutorRunsItemsOnSeveralThreads) {
#if defined(SPARSE_ATTN_DEFAULT_EXECUTOR)
  RecordProperty("default_executor", "SPARSE_ATTN_DEFAULT_EXECUTOR");
#elif defined(_OPENMP)
  RecordProperty("default_executor", "OpenMP");
#else
  GTEST_SKIP() << "no OpenMP and no SPARSE_ATTN_DEFAULT_EXECUTOR: the default is the calling thread";
#endif
  std::mutex m;
  std::set<std::thread::id> seen;
  int concurrency = 0;
  sparse_attn::detail::with_executor(ExecutorChoice{nullptr, 3}, [&](Executor& e) {
    concurrency = e.concurrency();
    run_items(e, 64, [&](index_t, int) {
      {
        std::lock_guard<std::mutex> lock(m);
        seen.insert(std::this_thread::get_id());
      }
      // Hold the item until a second thread has taken one (or 2 s pass), so one fast thread
      // cannot take them all.
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (std::chrono::steady_clock::now() < until) {
        {
          std::lock_guard<std::mutex> lock(m);
          if (seen.size() >= 2) break;
        }
        std::this_thread::yield();
      }
    });
  });
  EXPECT_EQ(concurrency, 3);
  EXPECT_GE(seen.size(), 2u) << "the default executor ran every item on one thread";
}

TEST(Concurrency, EightCallersGetTheSerialBitsWithOneThreadEach) {
  (void)serial_results();
  expect_serial_bits(run_concurrently([](int) { return Exec{1, nullptr}; }), "num_threads 1");
}

TEST(Concurrency, EightCallersGetTheSerialBitsOnTheDefaultExecutor) {
  (void)serial_results();
  expect_serial_bits(run_concurrently([](int) { return Exec{0, nullptr}; }), "num_threads 0");
  expect_serial_bits(run_concurrently([](int c) { return Exec{1 + c % 3, nullptr}; }), "num_threads 1..3");
}

TEST(Concurrency, EightCallersGetTheSerialBitsOnTheirOwnThreadPools) {
  (void)serial_results();
  std::vector<std::unique_ptr<ThreadPoolExecutor>> pools;
  for (int c = 0; c < kThreads; ++c) pools.push_back(std::make_unique<ThreadPoolExecutor>(2 + c % 3));
  expect_serial_bits(run_concurrently([&](int c) { return Exec{0, pools[static_cast<std::size_t>(c)].get()}; }),
                     "std::thread pools");
}

// Nested: each thread of an engine's parallel region calls the library, whose default executor
// then runs inside that region (OpenMP: a nested team if nesting is on, else the calling thread).
TEST(Concurrency, CallersInsideAnOuterParallelRegionGetTheSerialBits) {
  (void)serial_results();
#if defined(_OPENMP)
  for (int inner : {0, 2}) {
    std::vector<CallerResult> r(kThreads);
#pragma omp parallel for schedule(static, 1) num_threads(kThreads)
    for (int c = 0; c < kThreads; ++c) record(r[static_cast<std::size_t>(c)], c, Exec{inner, nullptr});
    expect_serial_bits(r, "inside omp parallel, num_threads " + std::to_string(inner));
  }
#endif
  // An engine's own pool as the outer region: each of its items is a caller.
  ThreadPoolExecutor outer(4);
  for (int inner : {0, 2}) {
    std::vector<CallerResult> r(kThreads);
    run_items(outer, kThreads, [&](index_t c, int) {
      record(r[static_cast<std::size_t>(c)], static_cast<int>(c), Exec{inner, nullptr});
    });
    expect_serial_bits(r, "inside a std::thread pool's items, num_threads " + std::to_string(inner));
  }
}
