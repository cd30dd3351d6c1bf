/// @file
/// @brief Decode against a kv::Cache with the core kernel, and the step's measured density
/// (kv::DecodeStats, kv::decode_stats).
///
/// decode(q, cache, out, keys, opt) is the cache form of the kernel's decode(q, k, v, out, keys,
/// opt) (kernel/decode.hpp): the newest n_q tokens (already appended) attend to the cache
/// restricted to a KeySelection. With equal head lengths this is one kernel call over the cache's
/// views, and every option (the LSE, the per-key mass output) passes through unchanged. After
/// an uneven eviction (Ada-SnapKV) head h holds length(h) tokens and its newest token sits at slot
/// length(h) - 1; a single token attends to [0, length(h)) of its head (cache.selection()), and
/// several tokens are run one at a time so each sees exactly its own head's causal prefix.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparse_attn/kernel/decode.hpp"
#include "sparse_attn/kv/cache.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kv {

/// @brief Density of one decode call.
///
/// CR = dense_pairs / pairs, where dense_pairs is what dense causal attention over the whole
/// (uncompressed) sequence computes, so eviction counts as sparsity.
struct DecodeStats {
  /// (query row, key) pairs computed, summed over query heads and rows.
  index_t pairs = 0;
  /// Pairs of dense causal attention over sequence_length() keys: sum over the n_q new rows t of
  /// Hq x (sequence_length() - n_q + t + 1).
  index_t dense_pairs = 0;
  /// K (and V) rows read, once per selection unit (KV head, or query head for a per-query-head
  /// selection): what the step costs in memory traffic.
  index_t kv_rows = 0;
  /// @return the achieved compression ratio dense_pairs / pairs; 1 when both are 0, +infinity
  /// when only pairs is.
  double compression() const {
    if (pairs == 0) return dense_pairs == 0 ? 1.0 : std::numeric_limits<double>::infinity();
    return static_cast<double>(dense_pairs) / static_cast<double>(pairs);
  }
  /// Keys each query row reads on average: pairs / (hq x n_q).
  /// @param hq query heads of the call.
  /// @param n_q new tokens (query rows per head) of the call.
  /// @return the mean keys per row; 0 when hq x n_q <= 0.
  double keys_per_query(index_t hq, index_t n_q) const {
    return hq * n_q > 0 ? static_cast<double>(pairs) / static_cast<double>(hq * n_q) : 0.0;
  }
};

namespace detail {
// Unit u's ranges clipped to [0, limit). `all` stands for [0, length) of the unit's head.
inline void clip_ranges(const KeySelection& keys, index_t u, index_t length, index_t limit,
                        std::vector<KeyRange>& outr) {
  outr.clear();
  if (keys.scope() == KeySelection::Scope::all) {
    if (std::min(length, limit) > 0) outr.push_back({0, std::min(length, limit)});
    return;
  }
  for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r) {
    const index_t e = std::min({r->end, limit, length});
    if (r->begin < e) outr.push_back({r->begin, e});
  }
}
inline index_t count_keys(const std::vector<KeyRange>& r) {
  index_t n = 0;
  for (const KeyRange& x : r) n += x.end - x.begin;
  return n;
}
}  // namespace detail

/// @brief Pairs a decode of n_q new tokens of hq query heads computes under `keys` on this cache.
///
/// Counts exactly what decode(q, cache, out, keys) computes: each new row t of a unit with head
/// length len sees the unit's ranges clipped to its causal prefix [0, len - n_q + t + 1).
/// Validates like the decode call it describes. O(units x n_q x ranges per unit); allocates one
/// small range buffer. Reads the cache only: may run concurrently with other readers.
/// @tparam Cache a kv::Cache.
/// @param keys the step's selection: KeySelection::all(), or ranges of slots (not positions) per
/// KV head or per query head.
/// @param cache the cache after the step's append (and any eviction).
/// @param hq query heads, a positive multiple of cache.kv_heads().
/// @param n_q new tokens, in [0, sequence_length()].
/// @return pairs, dense pairs and K/V rows of the call.
/// @throws sparse_attn::invalid_argument when hq is not a positive multiple of the KV heads,
/// n_q is out of range, or `keys` is not one valid list per unit within [0, max_length()).
/// @throws std::bad_alloc when the range buffer cannot be allocated.
template <class Cache>
DecodeStats decode_stats(const KeySelection& keys, const Cache& cache, index_t hq, index_t n_q) {
  constexpr const char* where = "kv::decode_stats";
  const index_t hkv = cache.kv_heads(), seq = cache.sequence_length();
  require(hq >= 1 && hq % hkv == 0, where, ": Hq=", hq, " is not a positive multiple of Hkv=",
          hkv, " (GQA needs Hq % Hkv == 0)");
  require(n_q >= 0 && n_q <= seq, where, ": n_q=", n_q, " new tokens, but the cache holds ", seq,
          "; need 0 <= n_q <= sequence length");
  keys.validate(cache.max_length(), hq, hkv, where);  // ranges index slots, not positions
  DecodeStats st;
  const index_t G = hq / hkv;
  for (index_t t = 0; t < n_q; ++t) st.dense_pairs += hq * (seq - n_q + t + 1);
  const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
  const index_t units = per_q ? hq : hkv;
  std::vector<KeyRange> r;
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u, len = cache.length(hk);
    const index_t rows_heads = per_q ? 1 : G;
    detail::clip_ranges(keys, u, len, len, r);
    st.kv_rows += detail::count_keys(r);
    for (index_t t = 0; t < n_q; ++t) {
      detail::clip_ranges(keys, u, len, len - n_q + t + 1, r);
      st.pairs += rows_heads * detail::count_keys(r);
    }
  }
  return st;
}

namespace detail {
template <class C, class = void>
struct is_cache : std::false_type {};
template <class C>
struct is_cache<C, std::void_t<decltype(std::declval<const C&>().kv_heads()),
                               decltype(std::declval<const C&>().keys()),
                               decltype(std::declval<const C&>().values()),
                               decltype(std::declval<const C&>().length(index_t{0}))>>
    : std::true_type {};
}  // namespace detail

/// Does C look like a kv::Cache (has kv_heads(), keys(), values() and length(h))? Selects the
/// cache overload of decode().
/// @tparam C the type to test.
template <class C>
inline constexpr bool is_cache_v = detail::is_cache<C>::value;

}  // namespace kv

/// @brief Decode attention of the newest n_q tokens over a kv::Cache.
///
/// Attention of q [Hq, n_q, d] (the newest n_q tokens, already appended to the cache) over
/// `keys` (KeySelection::all() = every head's [0, length(h))), written to out [Hq, n_q, dv].
/// With equal head lengths this is one call of the kernel's decode() on cache.keys() and
/// cache.values(): its checks, cost, allocation (one workspace per call) and threading apply, and
/// opt passes through unchanged. With uneven head lengths the n_q tokens run as n_q kernel calls
/// with opt.causal replaced by per-head ranges clipped to each token's own causal prefix; the
/// range lists, and a second Hkv x key_mass.stride mass buffer when the key mass output is set
/// and n_q > 1, are allocated per call.
///
/// The key mass output (when set) covers the K view's max_length() slots per KV head; with
/// uneven head lengths and several new tokens the per-token calls add their masses up (rows
/// t >= key_mass.row_begin count; none counted: zeros). The cache is only read, so several
/// decodes may read one cache concurrently, but not while it is appended to or evicted from.
/// Arguments are validated before anything is written; a later failure (a failing executor,
/// std::bad_alloc) may leave out partly written.
/// @param q queries, [Hq, n_q, d] token rows, Hq a multiple of Hkv.
/// @param cache the cache holding the n_q new tokens as each head's last slots.
/// @param out output, [Hq, n_q, dv] token rows (validated whole before anything is written; opt.lse,
/// a view without extents, must hold [Hq, n_q] as for the kernel's decode()).
/// @param keys slots each unit reads (ranges index slots, not positions); all(): every head's
/// [0, length(h)).
/// @param opt the kernel's options (scale, threads or executor, split, precision, LSE, key mass).
/// @throws sparse_attn::invalid_argument as the kernel's decode(); with uneven head lengths also
/// when Hq is not a multiple of Hkv, out is not [Hq, n_q, dv], `keys` is invalid for the cache,
/// or a head holds fewer than n_q tokens.
/// @throws std::bad_alloc when a workspace or buffer cannot be allocated.
template <class TQ, class Cache, class TO, class = std::enable_if_t<kv::is_cache_v<Cache>>>
void decode(const TensorView<TQ>& q, const Cache& cache, const TensorView<TO>& out,
            const KeySelection& keys = KeySelection::all(), const DecodeOptions& opt = {}) {
  const auto k = cache.keys();
  const auto v = cache.values();
  if (cache.uniform()) {
    sparse_attn::decode(q, k, v, out, keys, opt);
    return;
  }
  require(q.heads % cache.kv_heads() == 0, "decode(q, cache)", ": Hq=", q.heads,
          " is not a multiple of Hkv=", cache.kv_heads());
  const index_t G = q.heads / cache.kv_heads(), n_q = q.tokens;
  // Each per-token call checks only its own row of out: check the whole view here, before any
  // write (an out of fewer than n_q tokens would otherwise be written past its end).
  validate_view(out, "out");
  require(out.heads == q.heads && out.tokens == n_q && out.dim == v.dim, "decode(q, cache)",
          ": out is [", out.heads, ", ", out.tokens, ", ", out.dim, "]; expected [Hq=", q.heads,
          ", n_q=", n_q, ", dv=", v.dim, "]");
  const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
  const index_t units = per_q ? q.heads : cache.kv_heads();
  if (keys.scope() != KeySelection::Scope::all)
    keys.validate(k.tokens, q.heads, k.heads, "decode(q, cache)");
  for (index_t h = 0; h < cache.kv_heads(); ++h)
    require(cache.length(h) >= n_q, "decode(q, cache)", ": KV head ", h, " holds ", cache.length(h),
            " tokens, fewer than the ", n_q, " new queries");
  std::vector<std::vector<KeyRange>> lists(static_cast<std::size_t>(units));
  float* const mass = opt.key_mass.data;
  const index_t mass_stride = opt.key_mass.stride;
  std::vector<float> more(mass != nullptr && n_q > 1
                              ? static_cast<std::size_t>(cache.kv_heads() * mass_stride)
                              : 0);
  bool wrote = false;
  for (index_t t = 0; t < n_q; ++t) {
    for (index_t u = 0; u < units; ++u) {
      const index_t len = cache.length(per_q ? u / G : u);
      kv::detail::clip_ranges(keys, u, len, len - n_q + t + 1,
                              lists[static_cast<std::size_t>(u)]);
    }
    DecodeOptions o = opt;
    o.causal = false;  // causality is in the clipped ranges
    if (opt.lse) o.lse = LseView(&opt.lse(0, t), opt.lse.stride_head, opt.lse.stride_token);
    // Key mass: token t counts iff t >= row_begin; the first counted call writes the caller's
    // buffer, later ones write `more` and are added (the kernel overwrites what it is given).
    const bool counted = mass != nullptr && t >= opt.key_mass.row_begin;
    if (mass != nullptr)
      o.key_mass = {counted ? (wrote ? more.data() : mass) : nullptr, mass_stride, 0};
    sparse_attn::decode(
        q.slice_tokens(t, 1), k, v, out.slice_tokens(t, 1),
        KeySelection::from_ranges(
            per_q ? KeySelection::Scope::per_q_head : KeySelection::Scope::per_kv_head, lists),
        o);
    if (counted && wrote)
      for (index_t h = 0; h < cache.kv_heads(); ++h)
        for (index_t j = 0; j < k.tokens; ++j)
          mass[h * mass_stride + j] += more[static_cast<std::size_t>(h * mass_stride + j)];
    wrote = wrote || counted;
  }
  if (mass != nullptr && !wrote)  // no token counted: every key received 0
    for (index_t h = 0; h < cache.kv_heads(); ++h)
      std::fill(mass + h * mass_stride, mass + h * mass_stride + k.tokens, 0.0f);
}

SPARSE_ATTN_NAMESPACE_END
