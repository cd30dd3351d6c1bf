/// @file
/// The selection contract every method implements (one calling convention, one result shape).
///
/// A method is a small struct of its own parameters (with defaults) plus
/// @code{.unparsed}
///   static constexpr const char* name, summary;   the registry name and a one-line description
///   static constexpr BudgetUnit unit;              what Budget::count counts
///   template <class V> void visit_params(V&& v);  v(name, member&, help) for every parameter,
///                                                 so the registry can list and set them by name
/// @endcode
/// and one or both of
/// @code{.unparsed}
///   Prefill selector: select(q [Hq, n_q, d], k [Hkv, n_k, d], Budget, AttentionOptions)
///                     -> PrefillSelection<Mask>   (a mask of the common interface; run it with
///                                                  prefill(q, k, v, out, sel.mask, opt))
///   Decode selector:  select(q [Hq, n_q, d], cache, Budget, AttentionOptions)
///                     -> DecodeSelection          (the keys the decode kernel reads) or
///                     -> kv::EvictionPlan          (the slots each KV head keeps)
/// @endcode
/// The AttentionOptions are the same ones the kernel is called with: the softmax scale (NaN =
/// 1/sqrt(d)) and the executor are given once per call, never per method. Every result carries a
/// SelectionStats. See docs/METHODS.md, sections "Entry points" and "Selection statistics".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <chrono>
#include <string>
#include <utility>

#include "sparse_attn/mask/key_selection.hpp"
#include "sparse_attn/methods/budget.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// What a selection kept, what was asked, and whether it was met: the one statistics record of
/// every method's result. A plain value (copying allocates only `detail`).
struct SelectionStats {
  /// Prefill: (query, key) pairs the kernel computes, all query heads. Decode selection: (query
  /// row, key) pairs the kernel reads. Eviction: tokens kept, summed over KV heads.
  index_t pairs = 0;
  index_t dense_pairs = 0;  ///< the same count for dense attention (eviction: tokens before)
  Budget target;            ///< what was asked
  bool reachable = true;    ///< the target was met, by is_reachable() (budget.hpp)
  double select_ms = 0.0;   ///< wall time of the selection, milliseconds
  std::string detail;       ///< the resolved budget in the method's terms: "W=412", "k=5 blocks"
  /// @return the achieved compression ratio dense_pairs / pairs (compression_of()).
  double compression() const { return compression_of(dense_pairs, pairs); }
};

/// Sets s.reachable from s.target and the achieved CR by the one rule (is_reachable()); every
/// select() ends with it.
/// @param s         statistics with pairs, dense_pairs and target filled in.
/// @param honoured  count and mass budgets: the method kept what was asked.
inline void finish_stats(SelectionStats& s, bool honoured = true) {
  s.reachable = is_reachable(s.target, s.compression(), honoured);
}

/// A prefill selection: the mask to execute and its statistics.
/// @tparam Mask  a mask of the common interface (IntervalMask, BlockListMask<Pred>): run it with
///               prefill(q, k, v, out, sel.mask, opt).
template <class Mask>
struct PrefillSelection {
  Mask mask;             ///< the selected mask, for the query/key shapes it was selected for
  SelectionStats stats;  ///< pairs, target, reachability, time, resolved budget
};

/// A decode selection (Quest, dense): the keys the decode kernel reads this step.
struct DecodeSelection {
  KeySelection keys;     ///< the keys to read; run with decode(q, cache, out, sel.keys, opt)
  SelectionStats stats;  ///< pairs = (query row, key) pairs read, target, reachability, time
};

/// Measures a selection's wall time into stats.select_ms when it goes out of scope (RAII; a
/// select() that throws still records its time). Not copyable.
class SelectionTimer {
 public:
  /// Starts the clock (std::chrono::steady_clock).
  /// @param s  the statistics whose select_ms the destructor sets; must outlive the timer.
  explicit SelectionTimer(SelectionStats& s) : s_(s), t0_(std::chrono::steady_clock::now()) {}
  SelectionTimer(const SelectionTimer&) = delete;             ///< not copyable
  SelectionTimer& operator=(const SelectionTimer&) = delete;  ///< not copyable
  /// Writes the elapsed wall time, in milliseconds, to select_ms.
  ~SelectionTimer() {
    s_.select_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  SelectionStats& s_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
