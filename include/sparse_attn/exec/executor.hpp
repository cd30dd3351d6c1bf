/// @file
/// The executor: how the library runs independent work items on the caller's threads.
///
/// Every parallel loop of the library (kernel work items, selections, scoring, cache compaction)
/// is "call body(i, worker) for i in [0, n)": the items are independent, each writes its own
/// outputs, and the result does not depend on which worker runs which item or in what order, so
/// outputs are bit-identical for any executor and any thread count. An engine with its own thread
/// pool implements Executor (two functions) and passes it in the options; the default is OpenMP
/// when the includer compiles with it (exec/openmp.hpp), else the calling thread
/// (SerialExecutor). The library never opens a thread or a parallel region of its own otherwise.
///
/// Exceptions: run_items() wraps the body, so an executor never sees one. The first exception
/// thrown by an item (a user mask predicate, a custom selector, std::bad_alloc) is kept, the items
/// not yet started are skipped, and it is rethrown on the calling thread after executor.run()
/// returns. See docs/DESIGN.md, section "Plan / run, workspace, executor".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <atomic>
#include <exception>
#include <mutex>
#include <type_traits>
#include <utility>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// A non-owning reference to a callable `void(index_t item, int worker)`: two pointers, no
/// allocation. Valid while the referenced callable lives (the duration of one Executor::run).
class ItemFunction {
 public:
  /// Refers to f (an lvalue; a temporary would dangle). Never throws.
  /// @tparam F callable as f(index_t item, int worker).
  /// @param f the callable; must outlive every call through this reference.
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, ItemFunction>>>
  ItemFunction(F& f) noexcept  // NOLINT(google-explicit-constructor)
      : object_(static_cast<void*>(&f)), call_([](void* o, index_t item, int worker) {
          (*static_cast<F*>(o))(item, worker);
        }) {}
  /// Calls f(item, worker). Bodies passed by run_items() never throw.
  /// @param item the work item, in [0, n) of the run.
  /// @param worker the calling worker's id, in [0, concurrency()).
  void operator()(index_t item, int worker) const { call_(object_, item, worker); }

 private:
  void* object_;
  void (*call_)(void*, index_t, int);
};

/// Runs n independent items on some threads. Thread safety: run() may be called from several
/// threads at once only if the implementation allows it (OpenMPExecutor and SerialExecutor do).
class Executor {
 public:
  virtual ~Executor() = default;
  /// Number of distinct worker ids run() passes to a body: ids are in [0, concurrency()), and one
  /// worker runs one item at a time. The library sizes per-worker scratch by it (>= 1).
  /// @return the worker count, >= 1 (run_items() throws sparse_attn::invalid_argument otherwise).
  virtual int concurrency() const noexcept = 0;
  /// Calls body(i, worker) exactly once for every i in [0, n), in any order and on any threads,
  /// and returns when every call has returned. Items are independent; the body never throws.
  /// @param n number of items (>= 1 when called by run_items()).
  /// @param body the item function; valid until run() returns.
  virtual void run(index_t n, ItemFunction body) = 0;
};

/// Runs every item on the calling thread, in index order. Stateless: one instance may serve any
/// number of threads at once.
class SerialExecutor final : public Executor {
 public:
  /// @return 1 (the only worker id is 0).
  int concurrency() const noexcept override { return 1; }
  /// Calls body(i, 0) for i = 0, 1, ..., n - 1 on the calling thread.
  /// @param n number of items.
  /// @param body the item function.
  void run(index_t n, ItemFunction body) override {
    for (index_t i = 0; i < n; ++i) body(i, 0);
  }
};

namespace detail {
/// The first exception thrown by any item of a parallel loop, kept until the loop has ended.
class ErrorCapture {
 public:
  bool failed() const noexcept { return failed_.load(std::memory_order_relaxed); }
  void capture(std::exception_ptr e) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_) error_ = std::move(e);
    failed_.store(true, std::memory_order_relaxed);
  }
  void rethrow_if_failed() {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};
}  // namespace detail

/// Runs f(i, worker) for i in [0, n) on `executor`; the first exception an item throws is
/// rethrown here after every started item has finished (items not started are skipped). Throws
/// invalid_argument if the executor reports concurrency() < 1 or passes a worker id outside
/// [0, concurrency()).
/// @tparam F callable as f(index_t i, int worker); may throw.
/// @param executor runs the items; its run() is called once (not at all when n <= 0).
/// @param n number of items; nothing happens when n <= 0.
/// @param f the body; items must be independent (each writes only its own outputs).
/// @throws sparse_attn::invalid_argument for the executor faults above; otherwise whatever the
///         first failing item threw (under -fno-exceptions the error handler is called instead).
/// Allocates nothing itself (one std::exception_ptr when an item throws). Thread safety: as safe
/// as the executor and f; concurrent calls on one executor are fine for the library's executors.
template <class F>
void run_items(Executor& executor, index_t n, F&& f) {
  if (n <= 0) return;
  const int workers = executor.concurrency();
  require(workers >= 1, "Executor", "concurrency() must be >= 1, got ", workers);
#if SPARSE_ATTN_EXCEPTIONS
  detail::ErrorCapture error;
  auto body = [&](index_t i, int worker) {
    if (error.failed()) return;
    try {
      require(worker >= 0 && worker < workers, "Executor",
              "run() passed worker id ", worker, " outside [0, concurrency() = ", workers, ")");
      f(i, worker);
    } catch (...) {
      error.capture(std::current_exception());
    }
  };
  executor.run(n, ItemFunction(body));
  error.rethrow_if_failed();
#else
  auto body = [&](index_t i, int worker) {
    require(worker >= 0 && worker < workers, "Executor",
            "run() passed worker id ", worker, " outside [0, concurrency() = ", workers, ")");
    f(i, worker);
  };
  executor.run(n, ItemFunction(body));
#endif
}

/// run_items() over [0, n) cut into chunks of `grain` consecutive indices: f(begin, end, worker).
/// For loops whose single items are too cheap to schedule one by one.
/// @tparam F callable as f(index_t begin, index_t end, int worker), the half-open range
///           [begin, end).
/// @param executor runs the ceil(n / grain) chunks.
/// @param n number of indices; nothing happens when n <= 0.
/// @param grain indices per chunk (the last chunk may be shorter); values < 1 are taken as 1.
/// @param f the body.
/// @throws as run_items().
template <class F>
void run_chunks(Executor& executor, index_t n, index_t grain, F&& f) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const index_t chunks = (n + grain - 1) / grain;
  run_items(executor, chunks, [&](index_t c, int worker) {
    const index_t b = c * grain;
    f(b, b + grain < n ? b + grain : n, worker);
  });
}

SPARSE_ATTN_NAMESPACE_END
