// The default executor of the ThreadSanitizer test build (cmake/RunTsanTests.cmake): force-included
// into every translation unit (-include) and named by -DSPARSE_ATTN_DEFAULT_EXECUTOR=
// ::TsanDefaultExecutor (exec/default.hpp). That build compiles without -fopenmp: OpenMP's runtime
// is not TSan-instrumented (its barriers look like races), so every call that passes no executor
// runs on std::threads instead, which TSan sees.
//
// Each calling thread keeps one ThreadPoolExecutor (examples/) per thread count: created when the
// executor is constructed (a plan asks the default executor for its concurrency, so the pool
// exists before the run, and runs stay allocation-free as tests/test_embedding.cpp checks), reused
// by later calls and joined when that thread exits. num_threads = 0 gets kDefaultThreads. A call
// made while the thread's pool of that size is running (a library call from inside an item run on
// the calling thread) gets a pool of its own for the call.
#pragma once
#if __has_include(<sparse_attn/exec/executor.hpp>)  // CMake's compiler checks have no -I for it

#include <map>
#include <memory>

#include "../examples/thread_pool_executor.hpp"

class TsanDefaultExecutor final : public sparse_attn::Executor {
 public:
  static constexpr int kDefaultThreads = 4;

  explicit TsanDefaultExecutor(int threads) : slot_(slot(threads > 0 ? threads : kDefaultThreads)) {}
  int concurrency() const noexcept override { return slot_.pool.concurrency(); }
  void run(sparse_attn::index_t n, sparse_attn::ItemFunction body) override {
    if (slot_.busy) {
      ThreadPoolExecutor own(slot_.pool.concurrency());
      own.run(n, body);
      return;
    }
    slot_.busy = true;
    slot_.pool.run(n, body);  // the body never throws (run_items catches)
    slot_.busy = false;
  }

 private:
  struct Slot {
    explicit Slot(int threads) : pool(threads) {}
    ThreadPoolExecutor pool;
    bool busy = false;
  };
  static Slot& slot(int threads) {
    thread_local std::map<int, std::unique_ptr<Slot>> slots;
    std::unique_ptr<Slot>& s = slots[threads];
    if (!s) s = std::make_unique<Slot>(threads);
    return *s;
  }
  Slot& slot_;
};

#endif
