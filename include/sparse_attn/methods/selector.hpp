/// @file
/// The selection contract every method implements (one calling convention, one result shape).
///
/// A method is a small struct of its own parameters (with defaults) plus
///   static constexpr const char* name, summary;   the registry name and a one-line description
///   static constexpr BudgetUnit unit;              what Budget::count counts
///   template <class V> void visit_params(V&& v);  v(name, member&, help) for every parameter,
///                                                 so the registry can list and set them by name
/// and one or both of
///   Prefill selector: select(q [Hq, n_q, d], k [Hkv, n_k, d], Budget, AttentionOptions)
///                     -> PrefillSelection<Mask>   (a mask of the common interface; run it with
///                                                  prefill(q, k, v, out, sel.mask, opt))
///   Decode selector:  select(q [Hq, n_q, d], cache, Budget, AttentionOptions)
///                     -> DecodeSelection          (the keys the decode kernel reads) or
///                     -> kv::EvictionPlan          (the slots each KV head keeps)
/// The AttentionOptions are the same ones the kernel is called with: the softmax scale (NaN =
/// 1/sqrt(d)) and the executor are given once per call, never per method. Every result carries a
/// SelectionStats.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <chrono>
#include <string>
#include <utility>

#include "sparse_attn/mask/key_selection.hpp"
#include "sparse_attn/methods/budget.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// What a selection kept, what was asked, and whether it was met.
struct SelectionStats {
  /// Prefill: (query, key) pairs the kernel computes, all query heads. Decode selection: (query
  /// row, key) pairs the kernel reads. Eviction: tokens kept, summed over KV heads.
  index_t pairs = 0;
  index_t dense_pairs = 0;  ///< the same count for dense attention (eviction: tokens before)
  Budget target;            ///< what was asked
  bool reachable = true;    ///< see is_reachable() in budget.hpp
  double select_ms = 0.0;   ///< wall time of the selection
  std::string detail;       ///< the resolved budget in the method's terms: "W=412", "k=5 blocks"
  double compression() const { return compression_of(dense_pairs, pairs); }
};

/// Sets stats.reachable from the target and the achieved CR (`honoured`: see is_reachable).
inline void finish_stats(SelectionStats& s, bool honoured = true) {
  s.reachable = is_reachable(s.target, s.compression(), honoured);
}

/// A prefill selection: the mask to execute and its statistics.
template <class Mask>
struct PrefillSelection {
  Mask mask;
  SelectionStats stats;
};

/// A decode selection (Quest, dense): the keys the decode kernel reads this step.
struct DecodeSelection {
  KeySelection keys;
  SelectionStats stats;
};

/// Measures a selection's wall time into stats.select_ms when it goes out of scope.
class SelectionTimer {
 public:
  explicit SelectionTimer(SelectionStats& s) : s_(s), t0_(std::chrono::steady_clock::now()) {}
  SelectionTimer(const SelectionTimer&) = delete;
  SelectionTimer& operator=(const SelectionTimer&) = delete;
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
