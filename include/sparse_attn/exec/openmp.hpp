/// @file
/// The default executor when the includer compiles with OpenMP: one `omp parallel for` with dynamic
/// scheduling per run(). The only header of the library that includes <omp.h>. Without OpenMP
/// (_OPENMP undefined) this header declares nothing.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/exec/executor.hpp"

#if defined(_OPENMP)
#include <omp.h>

SPARSE_ATTN_NAMESPACE_BEGIN

/// Runs items on an OpenMP team of `threads` threads (0: OpenMP's default, omp_get_max_threads()
/// at construction). Called from inside an engine's own parallel region, the nested team follows
/// the engine's OpenMP settings (with nesting off: the calling thread alone).
///
/// Holds only the thread count, so one instance may be used from several threads at once.
class OpenMPExecutor final : public Executor {
 public:
  /// @param threads team size; values <= 0 take omp_get_max_threads() now. Never throws.
  explicit OpenMPExecutor(int threads = 0) noexcept
      : threads_(threads > 0 ? threads : omp_get_max_threads()) {}
  /// @return the team size fixed at construction (worker ids are OpenMP thread numbers).
  int concurrency() const noexcept override { return threads_; }
  /// One `omp parallel for schedule(dynamic, 1)` over the items; a single item or a team of one
  /// runs on the calling thread without opening a region.
  /// @param n number of items.
  /// @param body the item function.
  void run(index_t n, ItemFunction body) override {
    if (n == 1 || threads_ == 1) {  // no team for a single item or thread
      for (index_t i = 0; i < n; ++i) body(i, 0);
      return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_)
    for (index_t i = 0; i < n; ++i) body(i, omp_get_thread_num());
  }

 private:
  int threads_;
};

SPARSE_ATTN_NAMESPACE_END
#endif
