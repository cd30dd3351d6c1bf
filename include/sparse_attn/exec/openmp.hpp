/// @file
/// The default executor when the includer compiles with OpenMP: one `omp parallel for` with dynamic
/// scheduling per run(). The only header of the library that includes <omp.h>.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/exec/executor.hpp"

#if defined(_OPENMP)
#include <omp.h>

SPARSE_ATTN_NAMESPACE_BEGIN

/// Runs items on an OpenMP team of `threads` threads (0: OpenMP's default, omp_get_max_threads()
/// at construction). Called from inside an engine's own parallel region, the nested team follows
/// the engine's OpenMP settings (with nesting off: the calling thread alone).
class OpenMPExecutor final : public Executor {
 public:
  explicit OpenMPExecutor(int threads = 0) noexcept
      : threads_(threads > 0 ? threads : omp_get_max_threads()) {}
  int concurrency() const noexcept override { return threads_; }
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
