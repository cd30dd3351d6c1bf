/// @file
/// The executor a call uses when the caller passes none: OpenMP when the includer compiles with
/// it, else the calling thread. Without OpenMP, the library runs single-threaded unless the caller
/// provides an Executor (documented in docs/DESIGN.md).
///
/// SPARSE_ATTN_DEFAULT_EXECUTOR, if defined, names the default instead (it wins over OpenMP): a
/// class derived from Executor, constructible from the call's num_threads (0: its own default) and
/// declared before this header is included (e.g. with -include). The ThreadSanitizer tests use it
/// to run on std::threads, which TSan sees, instead of OpenMP's uninstrumented runtime
/// (cmake/RunTsanTests.cmake).
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/exec/executor.hpp"
#include "sparse_attn/exec/openmp.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Which executor a call runs on: the caller's, or a default one built for `num_threads`.
/// The default executor is constructed per call and destroyed when the call returns.
struct ExecutorChoice {
  Executor* executor = nullptr;  ///< The caller's (not owned); nullptr: the default.
  int num_threads = 0;  ///< Threads of the default executor (0: OpenMP's default); must be >= 0
                        ///< (sparse_attn::invalid_argument otherwise), checked even when
                        ///< `executor` is set.
};

namespace detail {
/// Calls f(Executor&) with the caller's executor, or with a default one that lives for the call.
template <class F>
decltype(auto) with_executor(const ExecutorChoice& choice, F&& f) {
  require(choice.num_threads >= 0, "options", "num_threads must be >= 0 (0: default), got ",
          choice.num_threads);
  if (choice.executor != nullptr) return f(*choice.executor);
#if defined(SPARSE_ATTN_DEFAULT_EXECUTOR)
  SPARSE_ATTN_DEFAULT_EXECUTOR fallback(choice.num_threads);
  return f(static_cast<Executor&>(fallback));
#elif defined(_OPENMP)
  OpenMPExecutor omp(choice.num_threads);
  return f(static_cast<Executor&>(omp));
#else
  SerialExecutor serial;
  return f(static_cast<Executor&>(serial));
#endif
}
}  // namespace detail

SPARSE_ATTN_NAMESPACE_END
