/// @file
/// The decode side of the common interface: which keys a decode step reads. A selection is a list
/// of sorted, disjoint key ranges per unit, where a unit is every head (scope all: one list for
/// all), a KV head (the G query heads of its group share the list: GQA-packed decode), or a query
/// head. Quest produces page lists; eviction methods instead shrink the cache (dense decode).
/// See docs/DESIGN.md, section "The mask interface", and docs/METHODS.md, section "quest".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// A half-open range of key slots [begin, end) of the K/V view.
struct KeyRange {
  index_t begin = 0,  ///< First key slot.
      end = 0;        ///< One past the last key slot.
};

/// The keys each unit of a decode call reads: an immutable value (two vectors, CSR by unit) that
/// any number of threads may read at once.
class KeySelection {
 public:
  /// Which heads share one range list.
  enum class Scope {
    all,          ///< Every head reads every key (no lists).
    per_kv_head,  ///< One list per KV head, shared by its G query heads (GQA-packed decode).
    per_q_head    ///< One list per query head.
  };

  /// Every key of the cache (dense decode).
  /// @return a selection of scope all (allocates one offset; std::bad_alloc only).
  static KeySelection all() { return KeySelection(); }

  /// One range list per unit (KV head or query head): non-empty, sorted, disjoint, begin >= 0 (the upper bound, n_k, is
  /// checked by the call that uses the selection). Scope::all takes no lists.
  /// A unit's list may be empty (that unit reads no key).
  /// @param scope the units the lists belong to.
  /// @param lists one list of ranges per unit (none for Scope::all).
  /// @return the selection (copies the ranges; O(total ranges)).
  /// @throws sparse_attn::invalid_argument when scope all gets lists, scope is not an enum value,
  ///         or a range is empty, negative, unsorted or overlaps the previous one; std::bad_alloc.
  static KeySelection from_ranges(Scope scope, const std::vector<std::vector<KeyRange>>& lists) {
    constexpr const char* where = "KeySelection::from_ranges";
    require(scope != Scope::all || lists.empty(), where, ": scope all takes no lists, got ",
            lists.size());
    require(scope == Scope::all || scope == Scope::per_kv_head || scope == Scope::per_q_head,
            where, ": unknown scope ", static_cast<int>(scope));
    for (std::size_t u = 0; u < lists.size(); ++u) {
      index_t prev_end = 0;
      for (const KeyRange& r : lists[u]) {
        require(r.begin >= prev_end && r.begin < r.end, where, ": unit ", u, " has range [",
                r.begin, ", ", r.end, "); ranges must be non-empty, sorted, disjoint and >= 0");
        prev_end = r.end;
      }
    }
    KeySelection s;
    s.scope_ = scope;
    s.offsets_.assign(1, 0);
    for (const auto& l : lists) {
      s.ranges_.insert(s.ranges_.end(), l.begin(), l.end());
      s.offsets_.push_back(static_cast<index_t>(s.ranges_.size()));
    }
    return s;
  }
  /// Token index lists per unit (sorted ascending, unique); consecutive tokens are coalesced.
  /// @param scope the units the lists belong to.
  /// @param lists one list of key slots per unit (none for Scope::all).
  /// @return the selection.
  /// @throws sparse_attn::invalid_argument when a token is outside [0, 2^63 - 1) or not strictly
  ///         greater than the previous one, or as from_ranges(); std::bad_alloc.
  static KeySelection from_tokens(Scope scope, const std::vector<std::vector<index_t>>& lists) {
    std::vector<std::vector<KeyRange>> r(lists.size());
    for (std::size_t u = 0; u < lists.size(); ++u) {
      for (std::size_t e = 0; e < lists[u].size(); ++e) {
        const index_t t = lists[u][e];
        require(t >= 0 && t < std::numeric_limits<index_t>::max(), "KeySelection::from_tokens",
                "unit ", u, ": token ", t, " out of range; tokens must be in [0, 2^63 - 1)");
        require(e == 0 || lists[u][e - 1] < t, "KeySelection::from_tokens", "unit ", u,
                ": tokens must be strictly increasing (got ", e ? lists[u][e - 1] : 0, " then ", t, ")");
        if (!r[u].empty() && r[u].back().end == t) ++r[u].back().end;
        else r[u].push_back({t, t + 1});
      }
    }
    return from_ranges(scope, r);
  }
  /// Page index lists per unit (sorted ascending, unique); page p covers tokens
  /// [p * page_size, min((p + 1) * page_size, n_k)).
  /// @param scope the units the lists belong to.
  /// @param pages one list of page indices per unit (none for Scope::all).
  /// @param page_size tokens per page, >= 1.
  /// @param n_k keys in the cache (the last page may be partial).
  /// @return the selection, adjacent pages coalesced into one range.
  /// @throws sparse_attn::invalid_argument when page_size < 1, a page is outside
  ///         [0, ceil(n_k / page_size)) or not strictly greater than the previous one, or as
  ///         from_ranges(); std::bad_alloc.
  static KeySelection from_pages(Scope scope, const std::vector<std::vector<index_t>>& pages,
                                 index_t page_size, index_t n_k) {
    require(page_size >= 1, "KeySelection::from_pages", "page_size must be >= 1, got ", page_size);
    std::vector<std::vector<KeyRange>> r(pages.size());
    for (std::size_t u = 0; u < pages.size(); ++u)
      for (std::size_t e = 0; e < pages[u].size(); ++e) {
        const index_t p = pages[u][e];
        // p < ceil(n_k / P), not p * P < n_k: a huge p would overflow the product.
        const index_t pages_in_cache = n_k <= 0 ? 0 : (n_k - 1) / page_size + 1;
        require(p >= 0 && p < pages_in_cache, "KeySelection::from_pages", "unit ", u, ": page ",
                p, " out of range [0, ", pages_in_cache, ")");
        require(e == 0 || pages[u][e - 1] < p, "KeySelection::from_pages", "unit ", u,
                ": pages must be strictly increasing");
        const KeyRange kr{p * page_size, std::min(n_k, (p + 1) * page_size)};
        if (!r[u].empty() && r[u].back().end == kr.begin) r[u].back().end = kr.end;
        else r[u].push_back(kr);
      }
    return from_ranges(scope, r);
  }

  /// @return the scope.
  Scope scope() const { return scope_; }
  /// @return the number of range lists (1 for scope all).
  index_t units() const { return scope_ == Scope::all ? 1 : static_cast<index_t>(offsets_.size()) - 1; }
  /// Ranges of unit u (for scope all, the caller substitutes [0, n_k)).
  /// @param u unit in [0, units()), unchecked; not for scope all (it has no lists).
  /// @return the first range of unit u.
  const KeyRange* ranges_begin(index_t u) const { return ranges_.data() + offsets_[static_cast<std::size_t>(u)]; }
  /// @param u unit in [0, units()), unchecked; not for scope all.
  /// @return one past the last range of unit u.
  const KeyRange* ranges_end(index_t u) const { return ranges_.data() + offsets_[static_cast<std::size_t>(u) + 1]; }
  /// Keys unit u reads from a cache of n_k keys.
  /// @param u unit in [0, units()), unchecked.
  /// @param n_k keys in the cache.
  /// @return n_k for scope all, else the total length of unit u's ranges. O(ranges of u).
  index_t keys(index_t u, index_t n_k) const {
    if (scope_ == Scope::all) return n_k;
    index_t n = 0;
    for (auto* r = ranges_begin(u); r != ranges_end(u); ++r) n += r->end - r->begin;
    return n;
  }

  /// Checks ranges against the cache and the head counts of the call. from_ranges() already made
  /// every unit's ranges non-empty, sorted, disjoint and >= 0, so only a unit's last range can
  /// reach past n_k.
  /// @param n_k key slots of the call's K/V view.
  /// @param hq query heads of the call.
  /// @param hkv KV heads of the call.
  /// @param where entry point, for the message.
  /// @throws sparse_attn::invalid_argument when the number of lists is not hkv (per_kv_head) or
  ///         hq (per_q_head), or a range ends past n_k. O(units).
  void validate(index_t n_k, index_t hq, index_t hkv, const char* where) const {
    if (scope_ == Scope::all) return;
    const index_t want = scope_ == Scope::per_kv_head ? hkv : hq;
    require(units() == want, where, ": key selection has ", units(), " lists but the call needs ",
            want, " (one per ", scope_ == Scope::per_kv_head ? "KV head" : "query head", ")");
    for (index_t u = 0; u < units(); ++u) {
      if (ranges_begin(u) == ranges_end(u)) continue;
      const KeyRange& last = *(ranges_end(u) - 1);
      require(last.end <= n_k, where, ": key selection unit ", u, " has range [", last.begin,
              ", ", last.end, "); ranges must be within [0, ", n_k, ")");
    }
  }

 private:
  Scope scope_ = Scope::all;
  std::vector<index_t> offsets_{0};
  std::vector<KeyRange> ranges_;
};

SPARSE_ATTN_NAMESPACE_END
