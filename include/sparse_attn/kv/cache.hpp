/// @file
/// @brief kv::Cache: a per-layer KV cache (contiguous or paged) with in-place eviction and the
/// per-page key bounds Quest reads.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kv/paged_view.hpp"
#include "sparse_attn/mask/key_selection.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
/// @brief KV caches for decoding: the cache itself (kv::Cache), its paged view (kv::PagedView),
/// eviction plans (kv::EvictionPlan) and the density of a decode over a cache (kv::DecodeStats).
namespace kv {

/// Storage layout of a kv::Cache.
enum class Layout {
  contiguous,  ///< One head-major array [Hkv][capacity][d]; views are TensorView.
  /// Fixed-size pages of P tokens from a pool, found through page tables; views are
  /// kv::PagedView.
  paged
};
/// Page tables of a paged kv::Cache.
enum class PageTable {
  /// One page table per KV head: a page holds P tokens of one head, and heads of different
  /// lengths use different numbers of pages.
  per_kv_head,
  /// One page table for all heads: a page holds P tokens of every head ([Hkv][P][d]); the page
  /// count follows max_length().
  shared
};

/// Shape and capacity of a kv::Cache, fixed at construction.
struct CacheOptions {
  index_t kv_heads = 0;   ///< Hkv: KV heads, >= 1.
  index_t head_dim = 0;   ///< d: elements per key row, >= 1.
  index_t value_dim = 0;  ///< dv: elements per value row; 0: same as head_dim.
  index_t capacity = 0;   ///< Tokens per KV head, >= 1, reserved up front (appends past it throw).
  /// P, tokens per page, in [1, 2^31 - 1]: the key-bounds pages, and the storage pages of a
  /// paged cache.
  index_t page_size = 16;
  /// Page tables of the paged layout (ignored by the contiguous one).
  PageTable page_table = PageTable::per_kv_head;
  /// Maintain the per-page key min/max (needed by Quest); false saves Hkv x ceil(capacity / P) x
  /// 2d elements and their upkeep on every append and eviction.
  bool key_bounds = true;
};

/// @brief Per-layer KV cache: logically K [Hkv, tokens, d] and V [Hkv, tokens, dv] in fp32, bf16
/// or fp16, read in place by the decode and prefill kernels.
///
/// - Storage: contiguous (head-major [Hkv][capacity][d]) or paged (pages of P tokens, one page
///   table per KV head or one shared by all heads). Capacity is reserved up front: appends and
///   evictions never reallocate; a paged cache takes pages from a free list and returns them on
///   eviction.
/// - keys() / values() are views the decode and prefill kernels read in place (TensorView for
///   contiguous storage, kv::PagedView for paged storage).
/// - Quest metadata: for every KV head and page of P tokens, the elementwise min and max of its
///   keys (stored in T: min/max of T values are exact in T), maintained on every append (the last
///   page may be partial) and recomputed for the pages an eviction rewrites.
/// - Eviction (retain()) compacts each head in place; kept tokens stay in position order. Heads
///   may then hold different lengths (Ada-SnapKV): length(h) is per head, the views span
///   max_length(), and selection() restricts each head to its own [0, length(h)).
/// - Positions are never re-indexed: keys are stored after RoPE, so slot i of head h keeps the
///   absolute position position(h, i) it was appended at; a new token gets position
///   sequence_length() (tokens ever appended), whatever was evicted before it.
/// - Failures: every mutating call is transactional. An append() or retain() that throws leaves
///   the cache as it was; undo_append(m) takes back the last append while nothing was evicted
///   after it (a decode step whose selection failed), pages included (the free list is as before
///   the append). Sizes are checked at construction: a cache whose arrays overflow int64 or a
///   std::vector throws sparse_attn::invalid_argument; one too large to allocate, std::bad_alloc.
/// - Allocation: everything is allocated by the constructor; afterwards only scratch buffers of
///   max(dv, 3d) floats (per worker for a parallel append) and the range lists of selection() are.
/// - Thread safety: a Cache must not be mutated (append(), undo_append(), retain(), clear()) from
///   two threads at once, nor read while it is mutated; const members, and the views they return,
///   may be used from any number of threads concurrently. append() itself may use several threads
///   through the executor it is given.
///
/// The class is copyable (a deep copy of the storage); views of one cache never see another.
/// @tparam T element type of the stored keys and values: float, bf16 or fp16.
/// @tparam L storage layout (Layout::contiguous or Layout::paged).
template <class T, Layout L = Layout::contiguous>
class Cache {
  static_assert(is_storage_type_v<T>, "KV cache element type must be float, bf16 or fp16");

 public:
  using value_type = T;  ///< Element type of the stored keys and values.
  static constexpr bool paged = L == Layout::paged;  ///< True for the paged layout.
  /// The type keys() and values() return: kv::PagedView<const T> (paged) or TensorView<const T>.
  using view_type = std::conditional_t<paged, PagedView<const T>, TensorView<const T>>;

  /// @brief Reserves a cache for `opt.capacity` tokens per KV head, empty.
  ///
  /// Allocates every array up front, largest first, and zero-fills it: K and V (contiguous:
  /// Hkv x capacity x (d + dv) elements; paged: Hkv x ceil(capacity / P) x P x (d + dv) elements,
  /// plus one all-zero page that unallocated table entries point to), positions (Hkv x capacity
  /// index_t), key bounds (Hkv x ceil(capacity / P) x 2d elements of T when opt.key_bounds) and,
  /// when paged, the page tables and the free list. O(the elements reserved).
  /// @param opt shape and capacity; value_dim 0 is replaced by head_dim (options() reports the
  /// resolved value).
  /// @throws sparse_attn::invalid_argument when kv_heads, head_dim, value_dim or capacity is < 1,
  /// page_size is outside [1, 2^31 - 1], or an array's element count or byte size overflows int64
  /// or exceeds what a std::vector can hold.
  /// @throws std::bad_alloc when the storage cannot be allocated.
  explicit Cache(const CacheOptions& opt) : opt_(opt) {
    constexpr const char* where = "kv::Cache";
    if (opt_.value_dim == 0) opt_.value_dim = opt_.head_dim;
    require(opt_.kv_heads >= 1, where, ": kv_heads must be >= 1, got ", opt_.kv_heads);
    require(opt_.head_dim >= 1 && opt_.value_dim >= 1, where,
            ": head_dim and value_dim must be >= 1, got ", opt_.head_dim, ", ", opt_.value_dim);
    require(opt_.capacity >= 1, where, ": capacity must be >= 1 token, got ", opt_.capacity);
    require(opt_.page_size >= 1 && opt_.page_size <= (index_t{1} << 31) - 1, where,
            ": page_size must be in [1, 2^31 - 1], got ", opt_.page_size);
    H_ = opt_.kv_heads;
    d_ = opt_.head_dim;
    dv_ = opt_.value_dim;
    cap_ = opt_.capacity;
    P_ = opt_.page_size;
    max_pages_ = (cap_ - 1) / P_ + 1;  // ceil(cap / P) without overflow
    // Every size in elements, checked before anything is allocated: a product that overflows
    // int64, or an array larger than a std::vector can hold, is an invalid argument (never a
    // wrapped size, never std::length_error); a size that fits but cannot be allocated throws
    // std::bad_alloc. The largest arrays are allocated first.
    shared_ = paged && opt_.page_table == PageTable::shared;
    const index_t tables = shared_ ? 1 : H_;
    std::size_t k_elems = 0, v_elems = 0, phys = 0;
    if constexpr (paged) {
      const index_t heads_per_page = shared_ ? H_ : 1;
      phys = size_of<index_t>({{"page tables", tables}, {"pages per table", max_pages_}});
      kpage_ = static_cast<index_t>(
          size_of<T>({{"heads per page", heads_per_page}, {"page_size", P_}, {"head_dim", d_}}));
      vpage_ = static_cast<index_t>(size_of<T>(
          {{"heads per page", heads_per_page}, {"page_size", P_}, {"value_dim", dv_}}));
      k_elems = size_of<T>({{"pages + 1", static_cast<index_t>(phys) + 1}, {"key page", kpage_}});
      v_elems = size_of<T>({{"pages + 1", static_cast<index_t>(phys) + 1}, {"value page", vpage_}});
    } else {
      k_elems = size_of<T>({{"kv_heads", H_}, {"capacity", cap_}, {"head_dim", d_}});
      v_elems = size_of<T>({{"kv_heads", H_}, {"capacity", cap_}, {"value_dim", dv_}});
    }
    const std::size_t pos_elems = size_of<index_t>({{"kv_heads", H_}, {"capacity", cap_}});
    const std::size_t meta_elems =
        opt_.key_bounds
            ? size_of<T>({{"kv_heads", H_}, {"pages", max_pages_}, {"2", 2}, {"head_dim", d_}})
            : 0;
    k_.assign(k_elems, T(0.0f));
    v_.assign(v_elems, T(0.0f));
    pos_.assign(pos_elems, 0);
    meta_.assign(meta_elems, T(0.0f));
    len_.assign(static_cast<std::size_t>(H_), 0);
    if constexpr (paged) {
      null_page_ = static_cast<index_t>(phys);  // an all-zero page: target of unallocated entries
      table_.assign(phys, null_page_);
      used_.assign(static_cast<std::size_t>(tables), 0);
      free_.reserve(phys);
      for (index_t p = null_page_ - 1; p >= 0; --p) free_.push_back(p);  // pop order 0, 1, 2, ...
    }
  }

  /// @return the options the cache was built with (value_dim resolved).
  const CacheOptions& options() const { return opt_; }
  /// @return Hkv, the number of KV heads.
  index_t kv_heads() const { return H_; }
  /// @return d, elements per key row.
  index_t head_dim() const { return d_; }
  /// @return dv, elements per value row.
  index_t value_dim() const { return dv_; }
  /// @return tokens each KV head can hold.
  index_t capacity() const { return cap_; }
  /// @return P, tokens per page (key-bounds pages; storage pages when paged).
  index_t page_size() const { return P_; }
  /// @return whether per-page key bounds are maintained (CacheOptions::key_bounds).
  bool has_key_bounds() const { return opt_.key_bounds; }

  /// Tokens head h holds now (slots [0, length(h))). O(1), unchecked.
  /// @param h KV head, in [0, kv_heads()).
  /// @return the head's length in tokens.
  index_t length(index_t h) const { return len_[static_cast<std::size_t>(h)]; }
  /// @return every head's length, [Hkv] tokens; the reference stays valid for the cache's
  /// lifetime, its values change with every append(), retain() and clear().
  const std::vector<index_t>& lengths() const { return len_; }
  /// @return the longest head's length in tokens: the token extent of keys() and values(). O(Hkv).
  index_t max_length() const { return *std::max_element(len_.begin(), len_.end()); }
  /// @return tokens held summed over KV heads. O(Hkv).
  index_t total_length() const {
    index_t s = 0;
    for (index_t l : len_) s += l;
    return s;
  }
  /// @return whether every head holds the same number of tokens (always, unless an eviction
  /// kept different counts per head). O(Hkv).
  bool uniform() const {
    return std::all_of(len_.begin(), len_.end(), [&](index_t l) { return l == len_[0]; });
  }
  /// Tokens ever appended (less those undone): the uncompressed sequence length and the next
  /// token's position. Eviction does not change it.
  /// @return the sequence length in tokens.
  index_t sequence_length() const { return seq_; }
  /// Absolute positions of head h's slots [0, length(h)), ascending. O(1), unchecked.
  /// @param h KV head, in [0, kv_heads()).
  /// @return pointer to length(h) positions; valid for the cache's lifetime, its values change
  /// with append() and retain().
  const index_t* positions(index_t h) const { return pos_.data() + h * cap_; }
  /// Absolute position of slot `slot` of head h (positions(h)[slot]). O(1), unchecked.
  /// @param h KV head, in [0, kv_heads()).
  /// @param slot slot of that head, in [0, length(h)).
  /// @return the token's position in the sequence.
  index_t position(index_t h, index_t slot) const { return positions(h)[slot]; }

  /// Keys as a view over [Hkv, max_length(), d] (head h at slots [0, length(h))), for the kernels
  /// to read in place. Rows of head h past length(h) are stale or zero: read them through
  /// selection() (or any selection within [0, length(h))). O(Hkv); no allocation, no copy. The
  /// view describes the cache as it is now: take a new one after append(), retain() or clear()
  /// (the storage never moves, but the extent and the contents change).
  /// @return a TensorView<const T> (contiguous) or kv::PagedView<const T> (paged).
  view_type keys() const { return view(k_.data(), d_, kpage_); }
  /// Values as a view over [Hkv, max_length(), dv]; as keys().
  /// @return a TensorView<const T> (contiguous) or kv::PagedView<const T> (paged).
  view_type values() const { return view(v_.data(), dv_, vpage_); }

  /// Every head's own [0, length(h)): KeySelection::all() when the lengths are equal, else one
  /// range per KV head (Scope::per_kv_head; a head holding nothing gets none). O(Hkv); allocates
  /// the range lists when the lengths differ.
  /// @return the selection of every live slot.
  /// @throws std::bad_alloc when the range lists cannot be allocated.
  KeySelection selection() const {
    if (uniform()) return KeySelection::all();
    std::vector<std::vector<KeyRange>> r(static_cast<std::size_t>(H_));
    for (index_t h = 0; h < H_; ++h)
      if (length(h) > 0) r[static_cast<std::size_t>(h)].push_back({0, length(h)});
    return KeySelection::from_ranges(KeySelection::Scope::per_kv_head, r);
  }

  /// Pages of head h: ceil(length(h) / P); the last one may be partial. O(1), unchecked.
  /// @param h KV head, in [0, kv_heads()).
  /// @return the head's page count.
  index_t num_pages(index_t h) const { return (length(h) + P_ - 1) / P_; }
  /// Key bounds of page p of head h: the elementwise min of its keys at [0, d), the max at
  /// [d, 2d), over the page's filled slots [p * P, min((p + 1) * P, length(h))). Exact in T.
  /// O(1), unchecked: requires has_key_bounds(), h in [0, kv_heads()) and p < num_pages(h).
  /// @param h KV head, in [0, kv_heads()).
  /// @param p page of that head, in [0, num_pages(h)).
  /// @return pointer to 2d elements; valid for the cache's lifetime, updated by append() and
  /// retain().
  const T* key_bounds(index_t h, index_t p) const {
    return meta_.data() + (h * max_pages_ + p) * 2 * d_;
  }
  /// Elementwise key minimum of page p of head h (key_bounds(h, p)); same preconditions.
  /// @param h KV head, in [0, kv_heads()).
  /// @param p page of that head, in [0, num_pages(h)).
  /// @return pointer to d elements.
  const T* key_min(index_t h, index_t p) const { return key_bounds(h, p); }
  /// Elementwise key maximum of page p of head h (key_bounds(h, p) + d); same preconditions.
  /// @param h KV head, in [0, kv_heads()).
  /// @param p page of that head, in [0, num_pages(h)).
  /// @return pointer to d elements.
  const T* key_max(index_t h, index_t p) const { return key_bounds(h, p) + d_; }

  /// @brief Appends m tokens to every head.
  ///
  /// Head h's new tokens go to slots [length(h), length(h) + m) with positions
  /// [sequence_length(), sequence_length() + m); keys and values are rounded to T (nearest
  /// even). A paged cache takes the pages it needs from its free list; the key bounds of the
  /// touched pages are extended with the new rows only. Cost O(Hkv x m x (d + dv)). Appends of at
  /// least 256 rows (m x Hkv) copy the heads in parallel on `exec`. Allocates one scratch row of
  /// max(dv, 3d) floats per worker, before anything changes; no storage is (re)allocated.
  ///
  /// Transactional: if it throws, the cache is as it was (lengths, positions, pages, contents,
  /// key bounds). m = 0 is a no-op after the checks. Views taken before the call describe the
  /// old extent.
  /// @param k new keys, [Hkv, m, d] token rows, any storage type and strides.
  /// @param v new values, [Hkv, m, dv] token rows, any storage type and strides.
  /// @param exec the caller's executor, or the default one for exec.num_threads (0: OpenMP's
  /// default).
  /// @throws sparse_attn::invalid_argument as check_append() (nothing changes).
  /// @throws std::bad_alloc when the scratch cannot be allocated (nothing changes).
  ///
  /// An exception from a failing executor propagates after the cache is restored.
  template <class UK, class UV>
  void append(const TensorView<UK>& k, const TensorView<UV>& v, const ExecutorChoice& exec = {}) {
    check_append(k, v, exec);
    const index_t m = k.tokens;
    if (m == 0) return;
    append_checked(k, v, exec);
  }

  /// The checks append(k, v, exec) makes, in its order, without changing anything: the views
  /// (validate_view), heads = Hkv, dims d and dv, equal token counts, exec.num_threads >= 0, then
  /// for m > 0: m <= capacity() - max_length() and no position overflow (sequence_length() + m
  /// <= 2^63 - 1). O(1); allocates nothing (but an error's message); safe to call concurrently
  /// with other const members.
  /// @param k keys to be appended, [Hkv, m, d].
  /// @param v values to be appended, [Hkv, m, dv].
  /// @param exec the executor choice append() would get.
  /// @throws sparse_attn::invalid_argument on the first failed check.
  template <class UK, class UV>
  void check_append(const TensorView<UK>& k, const TensorView<UV>& v,
                    const ExecutorChoice& exec = {}) const {
    constexpr const char* where = "kv::Cache::append";
    validate_view(k, "append: k");
    validate_view(v, "append: v");
    require(k.heads == H_ && v.heads == H_, where, ": k and v need ", H_, " heads, got ", k.heads,
            " and ", v.heads);
    require(k.dim == d_ && v.dim == dv_, where, ": k and v need dims ", d_, " and ", dv_, ", got ",
            k.dim, " and ", v.dim);
    require(k.tokens == v.tokens, where, ": k has ", k.tokens, " tokens but v has ", v.tokens);
    require(exec.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
            exec.num_threads);
    const index_t m = k.tokens;
    if (m == 0) return;
    require(m <= cap_ - max_length(), where, ": appending ", m, " tokens to a head holding ",
            max_length(), " exceeds the capacity of ", cap_,
            " tokens; reserve more capacity or evict first");
    require(m <= std::numeric_limits<index_t>::max() - seq_, where, ": appending ", m,
            " tokens after ", seq_, " overflows the positions; at most 2^63 - 1 tokens per sequence");
  }

 private:
  template <class UK, class UV>
  void append_checked(const TensorView<UK>& k, const TensorView<UV>& v, const ExecutorChoice& exec) {
    const index_t m = k.tokens;
    // Head h's new rows, converted through buf; then its key bounds (buf reused).
    auto copy_head = [&](index_t h, float* buf) {
      const index_t l0 = length(h);
      index_t* pos = pos_.data() + h * cap_;
      for (index_t t = 0; t < m; ++t) {
        load_row(v.row(h, t), v.stride_dim, buf, dv_);
        store_row(buf, vrow(h, l0 + t), 1, dv_);
        load_row(k.row(h, t), k.stride_dim, buf, d_);
        store_row(buf, krow(h, l0 + t), 1, d_);
        pos[l0 + t] = seq_ + t;
      }
      if (opt_.key_bounds) update_bounds(h, l0 / P_, (l0 + m + P_ - 1) / P_, l0 + m, buf);
    };
    sparse_attn::detail::with_executor(exec, [&](Executor& ex) {
      // Fewer rows than this copy faster on one thread than a team starts.
      constexpr index_t kParallelRows = 256;
      const bool parallel = m * H_ >= kParallelRows;
      const std::size_t per_worker = scratch_floats();
      // Every worker's buffer before anything changes (at least one: the rollback uses it).
      std::vector<float> scratch(
          per_worker * static_cast<std::size_t>(parallel ? std::max(ex.concurrency(), 1) : 1));
      if constexpr (paged) reserve_pages(m);
      if (!parallel) {
        for (index_t h = 0; h < H_; ++h) copy_head(h, scratch.data());
        return;
      }
      SPARSE_ATTN_TRY {
        run_items(ex, H_, [&](index_t h, int worker) {
          copy_head(h, scratch.data() + static_cast<std::size_t>(worker) * per_worker);
        });
      }
      SPARSE_ATTN_CATCH_ALL {  // a failing executor: lengths are not counted yet
        restore_tail(scratch.data());
        SPARSE_ATTN_RETHROW;
      }
    });
    for (auto& l : len_) l += m;
    seq_ += m;
  }

 public:
  /// @brief Drops the m tokens appended last, as if that append() had not happened.
  ///
  /// Lengths, the sequence length, pages (and the free list's order) and the key bounds of every
  /// head's pages are what they were before it. The tokens must still be the last m slots of
  /// every head (nothing evicted since; checked through their positions). Used to roll back a
  /// decode step whose selection or eviction threw. Recomputes the bounds of each head's last,
  /// partial page: O(Hkv x P x d). Allocates one scratch row of max(dv, 3d) floats before
  /// anything changes. Transactional: a throw changes nothing.
  /// @param m tokens to take back, in [0, sequence_length()]; 0 is a no-op.
  /// @throws sparse_attn::invalid_argument when m is out of range, or some head no longer ends
  /// with the last m appended tokens (they were evicted, or a head holds fewer than m).
  /// @throws std::bad_alloc when the scratch cannot be allocated.
  void undo_append(index_t m) {
    constexpr const char* where = "kv::Cache::undo_append";
    require(m >= 0 && m <= seq_, where, ": m must be in [0, sequence_length() = ", seq_,
            "], got ", m);
    if (m == 0) return;
    // Positions of a head ascend and are < sequence_length(): its last m slots are exactly the
    // last m tokens appended iff the first of them has position sequence_length() - m.
    for (index_t h = 0; h < H_; ++h)
      require(length(h) >= m && position(h, length(h) - m) == seq_ - m, where, ": head ", h,
              " no longer ends with the last ", m,
              " appended tokens (evicted since); only an append not followed by eviction can be "
              "undone");
    std::vector<float> scratch(scratch_floats());
    for (auto& l : len_) l -= m;
    seq_ -= m;
    restore_tail(scratch.data());
  }

  /// @brief Evicts from head h every slot but slots[0, count), compacting in place.
  ///
  /// Kept slot slots[i] moves to slot i, with its position; the head's length becomes count and
  /// the sequence length is unchanged. Key bounds of the rewritten pages are recomputed, and a
  /// paged cache returns the pages the head no longer needs to the free list. Cost O(moved rows x
  /// (d + dv)) plus O(rewritten rows x d) for the bounds; allocates one scratch row of
  /// max(dv, 3d) floats before anything changes. Transactional: every check runs first, a throw
  /// changes nothing. undo_append() of an earlier append is refused once its tokens are no longer
  /// the head's last slots.
  /// @param h KV head, in [0, kv_heads()).
  /// @param slots kept slots, strictly increasing, within [0, length(h)); may be null when
  /// count is 0.
  /// @param count number of kept slots, in [0, length(h)].
  /// @throws sparse_attn::invalid_argument when h or count is out of range, slots is null with
  /// count > 0, or the slots are not strictly increasing within [0, length(h)).
  /// @throws std::bad_alloc when the scratch cannot be allocated.
  void retain(index_t h, const index_t* slots, index_t count) {
    require(slots != nullptr || count <= 0, "kv::Cache::retain", ": head ", h, " keeps ", count,
            " slots but the slot list is null");
    check_retain(h, slots, count);
    std::vector<float> scratch(scratch_floats());  // before anything moves
    retain_head(h, slots, count, scratch.data());
  }
  /// retain() for every head: keep[h] lists head h's kept slots. Every list is checked before
  /// any head is compacted, so a bad list for a later head leaves every head as it was. Cost as
  /// retain(h, ...) summed over heads.
  /// @param keep [Hkv] lists of kept slots, each strictly increasing within [0, length(h)).
  /// @throws sparse_attn::invalid_argument when keep.size() != kv_heads() or a list is invalid
  /// (as retain(h, slots, count)); nothing changes.
  /// @throws std::bad_alloc when the scratch cannot be allocated (nothing changes).
  void retain(const std::vector<std::vector<index_t>>& keep) {
    require(static_cast<index_t>(keep.size()) == H_, "kv::Cache::retain", ": need ", H_,
            " keep lists (one per KV head), got ", keep.size());
    // Every list first: a bad list for a later head must not leave earlier heads compacted.
    for (index_t h = 0; h < H_; ++h)
      check_retain(h, keep[static_cast<std::size_t>(h)].data(),
                   static_cast<index_t>(keep[static_cast<std::size_t>(h)].size()));
    std::vector<float> scratch(scratch_floats());
    for (index_t h = 0; h < H_; ++h)
      retain_head(h, keep[static_cast<std::size_t>(h)].data(),
                  static_cast<index_t>(keep[static_cast<std::size_t>(h)].size()), scratch.data());
  }

  /// Drops every token and resets the sequence length to 0; capacity stays reserved and a paged
  /// cache returns every page to its free list. O(Hkv + pages in use); never throws, allocates
  /// nothing.
  void clear() {
    std::fill(len_.begin(), len_.end(), 0);
    seq_ = 0;
    if constexpr (paged) release_pages();
  }

  /// @return physical pages not in use (paged layout; always 0 for the contiguous one).
  index_t free_pages() const { return static_cast<index_t>(free_.size()); }
  /// @return bytes of K/V storage and key-bound metadata reserved (positions and page tables
  /// not counted).
  std::size_t reserved_bytes() const { return (k_.size() + v_.size() + meta_.size()) * sizeof(T); }

 private:
  // Elements of an array of `factors` (name, value; each >= 1), checked: the product must fit
  // int64, its bytes int64 too, and a std::vector of U must be able to hold it.
  struct Factor {
    const char* name;
    index_t value;
  };
  template <class U>
  static std::size_t size_of(std::initializer_list<Factor> factors) {
    constexpr index_t kMax = std::numeric_limits<index_t>::max();
    const index_t limit = static_cast<index_t>(std::min<std::size_t>(
        std::vector<U>().max_size(), static_cast<std::size_t>(kMax) / sizeof(U)));
    index_t n = 1;  // -1 once the product passes the limit (detail::bounded_product)
    for (const Factor& f : factors)
      if (n >= 0) n = sparse_attn::detail::bounded_product(limit, {n, f.value});
    if (n < 0) {
      std::string what;
      for (const Factor& f : factors)
        what += (what.empty() ? "" : " x ") + std::string(f.name) + " " + std::to_string(f.value);
      require(false, "kv::Cache", ": ", what, " elements of ", sizeof(U),
              " bytes exceed the largest array (", limit,
              " elements); reduce capacity, kv_heads, the dims or page_size");
    }
    return static_cast<std::size_t>(n);
  }

  // Floats of scratch a head's append, compaction or bounds update needs: one row of K or V, or
  // the row, min and max of update_bounds().
  std::size_t scratch_floats() const { return static_cast<std::size_t>(std::max(dv_, 3 * d_)); }

  // retain(h, ...) after its check; scratch: scratch_floats().
  void retain_head(index_t h, const index_t* slots, index_t count, float* scratch) {
    index_t first = count;  // first slot whose content changes
    for (index_t i = 0; i < count; ++i)
      if (slots[i] != i) {
        first = i;
        break;
      }
    index_t* pos = pos_.data() + h * cap_;
    for (index_t i = first; i < count;) {
      // A run of consecutive source slots moves as one block in contiguous storage.
      index_t run = 1;
      if constexpr (!paged)
        while (i + run < count && slots[i + run] == slots[i] + run) ++run;
      for (index_t r = 0; r < (paged ? 1 : run); ++r) pos[i + r] = pos[slots[i] + r];
      move_rows(h, slots[i], i, run);
      i += run;
    }
    len_[static_cast<std::size_t>(h)] = count;
    if (opt_.key_bounds && first < count)
      update_bounds(h, first / P_, (count + P_ - 1) / P_, count, scratch, true);
    else if (opt_.key_bounds && count % P_ != 0)
      update_bounds(h, count / P_, count / P_ + 1, count, scratch, true);
    if constexpr (paged) release_pages();
  }

  // After rows past every head's length were written (an append that failed, or one undone):
  // recomputes the key bounds of each head's last, partial page from its rows (min and max are
  // exact and taken in slot order, so they equal the bounds before those rows came) and returns
  // the pages no head needs. Rows and pages past the lengths are unreachable.
  void restore_tail(float* scratch) {
    if (opt_.key_bounds)
      for (index_t h = 0; h < H_; ++h)
        if (length(h) % P_ != 0)
          update_bounds(h, length(h) / P_, length(h) / P_ + 1, length(h), scratch, true);
    if constexpr (paged) release_pages(/*undo=*/true);
  }

  void check_retain(index_t h, const index_t* slots, index_t count) const {
    constexpr const char* where = "kv::Cache::retain";
    require(h >= 0 && h < H_, where, ": head ", h, " out of range [0, ", H_, ")");
    require(count >= 0 && count <= length(h), where, ": head ", h, " keeps ", count,
            " tokens but holds ", length(h));
    for (index_t i = 0; i < count; ++i)
      require(slots[i] >= 0 && slots[i] < length(h) && (i == 0 || slots[i - 1] < slots[i]), where,
              ": head ", h, ": kept slots must be strictly increasing within [0, ", length(h),
              "), got ", slots[i], " at ", i);
  }

  view_type view(const T* base, index_t dim, index_t page_elems) const {
    if constexpr (paged) {
      PagedView<const T> pv;
      pv.pool = base;
      pv.table = table_.data();
      pv.heads = H_;
      pv.tokens = max_length();
      pv.dim = dim;
      pv.page_size = P_;
      pv.table_stride_head = shared_ ? 0 : max_pages_;
      pv.page_stride = page_elems;
      pv.head_stride = shared_ ? P_ * dim : 0;
      pv.row_stride = dim;
      pv.pool_pages = null_page_ + 1;  // the allocatable pages and the all-zero page
      return pv;
    } else {
      (void)page_elems;
      return TensorView<const T>(base, H_, max_length(), dim, cap_ * dim, dim, 1);
    }
  }

  T* row_of(T* base, index_t dim, index_t page_elems, index_t h, index_t t) {
    if constexpr (paged) {
      const index_t p = t / P_;
      const index_t phys = table_[static_cast<std::size_t>((shared_ ? 0 : h) * max_pages_ + p)];
      return base + phys * page_elems + (shared_ ? h * P_ * dim : 0) + (t - p * P_) * dim;
    } else {
      (void)page_elems;
      return base + (h * cap_ + t) * dim;
    }
  }
  T* krow(index_t h, index_t t) { return row_of(k_.data(), d_, kpage_, h, t); }
  T* vrow(index_t h, index_t t) { return row_of(v_.data(), dv_, vpage_, h, t); }

  // Moves `run` consecutive rows of head h from slot src to slot dst <= src (K and V).
  void move_rows(index_t h, index_t src, index_t dst, index_t run) {
    if (src == dst) return;
    std::memmove(static_cast<void*>(krow(h, dst)), krow(h, src),
                 sizeof(T) * static_cast<std::size_t>(run * d_));
    std::memmove(static_cast<void*>(vrow(h, dst)), vrow(h, src),
                 sizeof(T) * static_cast<std::size_t>(run * dv_));
  }

  // Recomputes (or, for appends, extends) the key bounds of pages [p0, p1) of head h, whose
  // tokens are slots [p * P, min((p + 1) * P, len)). An append extends a partial first page from
  // its stored bounds; a rewrite recomputes every page from its rows. scratch: 3d floats.
  void update_bounds(index_t h, index_t p0, index_t p1, index_t len, float* scratch,
                     bool rewrite = false) {
    float* row = scratch;
    float* mn = scratch + d_;
    float* mx = scratch + 2 * d_;
    const index_t first_new = rewrite ? 0 : length(h);  // slots < first_new are already counted
    for (index_t p = p0; p < p1; ++p) {
      const index_t t0 = p * P_, t1 = std::min(len, t0 + P_);
      T* meta = meta_.data() + (h * max_pages_ + p) * 2 * d_;
      index_t t = std::max(t0, first_new);
      if (t > t0) {  // extend bounds of a partial page
        load_row(meta, 1, mn, d_);
        load_row(meta + d_, 1, mx, d_);
      } else {
        load_row(krow(h, t), 1, mn, d_);
        std::copy(mn, mn + d_, mx);
        ++t;
      }
      for (; t < t1; ++t) {
        load_row(krow(h, t), 1, row, d_);
        for (index_t c = 0; c < d_; ++c) {
          mn[c] = std::min(mn[c], row[c]);
          mx[c] = std::max(mx[c], row[c]);
        }
      }
      store_row(mn, meta, 1, d_);
      store_row(mx, meta + d_, 1, d_);
    }
  }

  // Paged: allocates the pages the next m tokens of every head need.
  void reserve_pages(index_t m) {
    for (index_t tb = 0; tb < static_cast<index_t>(used_.size()); ++tb) {
      const index_t need_tokens = shared_ ? max_length() + m : length(tb) + m;
      const index_t need = (need_tokens + P_ - 1) / P_;
      index_t& used = used_[static_cast<std::size_t>(tb)];
      for (; used < need; ++used) {
        table_[static_cast<std::size_t>(tb * max_pages_ + used)] = free_.back();
        free_.pop_back();
      }
    }
  }
  // Paged: returns pages no head needs any more to the free list (last page first). undo: tables
  // in reverse order, so that releasing what reserve_pages() just took leaves the free list (and
  // the pages the next append takes) exactly as they were.
  void release_pages(bool undo = false) {
    const index_t tables = static_cast<index_t>(used_.size());
    for (index_t i = 0; i < tables; ++i) {
      const index_t tb = undo ? tables - 1 - i : i;
      const index_t need = ((shared_ ? max_length() : length(tb)) + P_ - 1) / P_;
      index_t& used = used_[static_cast<std::size_t>(tb)];
      for (; used > need; --used) {
        index_t& e = table_[static_cast<std::size_t>(tb * max_pages_ + used - 1)];
        free_.push_back(e);
        e = null_page_;
      }
    }
  }

  CacheOptions opt_;
  index_t H_ = 0, d_ = 0, dv_ = 0, cap_ = 0, P_ = 1, max_pages_ = 0;
  std::vector<index_t> len_;
  index_t seq_ = 0;
  std::vector<index_t> pos_;         // [Hkv][capacity] absolute positions
  std::vector<T> meta_;              // [Hkv][max_pages][2][d] key min, key max
  kernel::aligned_vector<T> k_, v_;  // contiguous: [Hkv][capacity][d]; paged: pages
  // Paged layout only.
  bool shared_ = false;
  index_t kpage_ = 0, vpage_ = 0, null_page_ = 0;
  std::vector<index_t> table_;  // [tables][max_pages] physical page ids
  std::vector<index_t> used_;   // pages allocated per table
  std::vector<index_t> free_;   // free physical pages (a stack)
};

/// A kv::Cache with contiguous storage. @tparam T float, bf16 or fp16.
template <class T>
using ContiguousCache = Cache<T, Layout::contiguous>;
/// A kv::Cache with paged storage. @tparam T float, bf16 or fp16.
template <class T>
using PagedCache = Cache<T, Layout::paged>;

}  // namespace kv
SPARSE_ATTN_NAMESPACE_END
