/// @file
/// @brief kv::PagedView: a paged KV store seen as a logical [heads, tokens, dim] tensor.
///
/// Token t of head h lives in physical page table[h * table_stride_head + t / P], at row t % P.
/// The view exposes the accessors the kernels use (value_type, heads, tokens, dim, stride_dim,
/// row(h, t)), so decode() and prefill() read a paged cache in place, one pointer computation per
/// key row and no copy.
///
/// Physical page layout: page_stride elements per page; inside a page, head h starts at
/// h * head_stride (0 when every head has its own page table) and row s at s * row_stride.
///
/// Every kernel validates a PagedView it is given (kv::validate_view): extents, pointers,
/// strides, and every page-table entry a logical token [0, tokens) maps to must name one of the
/// pool's `pool_pages` pages. That is O(heads x tokens / P) per call, a small fraction of reading
/// the keys. What stays the caller's: the pool really holds pool_pages x page_stride elements.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <type_traits>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kv {

/// @brief Non-owning view of a paged K or V store as logical [heads, tokens, dim] rows.
///
/// A plain aggregate: it owns nothing, allocates nothing, and is invalidated by whatever moves
/// or frees the pool or the page table (for a kv::Cache: the next append(), retain() or clear()).
/// Elements of one row are contiguous (stride_dim = 1). Reading through a view from several
/// threads is safe while nobody writes the pool or the table.
/// @tparam T element type: float, bf16 or fp16, const-qualified for a read-only view.
template <class T>
struct PagedView {
  /// Element type without const (what the kernels dispatch on).
  using value_type = std::remove_const_t<T>;
  T* pool = nullptr;               ///< Physical pages, pool_pages x page_stride elements.
  const index_t* table = nullptr;  ///< Page tables: logical page -> physical page index.
  /// Logical heads (KV heads).
  index_t heads = 0, tokens = 0, dim = 0;
  /// @var tokens
  /// Logical tokens per head.
  /// @var dim
  /// Elements per token row (head_dim for K, value_dim for V).

  index_t page_size = 1;          ///< P: tokens per page, in [1, 2^31 - 1].
  /// Entries between the page tables of consecutive heads; 0: one page table shared by every head.
  index_t table_stride_head = 0;
  index_t page_stride = 0;        ///< Elements per physical page.
  /// Offset of head h's rows inside a page = h * head_stride elements (0 with per-head tables).
  index_t head_stride = 0;
  index_t row_stride = 0;         ///< Elements between consecutive tokens of a page.
  /// Physical pages in the pool: every table entry a token maps to must be in [0, pool_pages).
  index_t pool_pages = 0;
  /// Elements between consecutive entries of a row: rows are contiguous.
  static constexpr index_t stride_dim = 1;

  /// Pointer to the first element of token t of head h. No bounds check: h in [0, heads) and t in
  /// [0, tokens) are the caller's (the view must have passed validate_view()). O(1).
  /// @param h head index, in [0, heads).
  /// @param t logical token index, in [0, tokens).
  /// @return pointer to `dim` contiguous elements.
  T* row(index_t h, index_t t) const {
    const index_t p = t / page_size;
    return pool + table[h * table_stride_head + p] * page_stride + h * head_stride +
           (t - p * page_size) * row_stride;
  }
  /// Element c of token t of head h (row(h, t)[c]); unchecked, O(1).
  /// @param h head index, in [0, heads).
  /// @param t logical token index, in [0, tokens).
  /// @param c element index within the row, in [0, dim).
  /// @return reference to the element.
  T& operator()(index_t h, index_t t, index_t c) const { return row(h, t)[c]; }
  /// @return true when the view has no elements (heads, tokens or dim is 0); such a view needs no
  /// pool or table.
  bool empty() const { return heads == 0 || tokens == 0 || dim == 0; }
};

/// @brief The checks every kernel makes on a paged K or V view.
///
/// Checks, in order: extents >= 0 (an empty view passes here); non-null pool and table;
/// page_size in [1, 2^31 - 1]; table_stride_head >= 0, page_stride >= 1, head_stride >= 0,
/// row_stride >= 1; pool_pages >= 1; every table entry that a token of [0, tokens) maps to lies
/// in [0, pool_pages). Not checked (the caller's): that the pool really holds
/// pool_pages x page_stride elements, and that the table has the entries it is read at.
/// O(tables x ceil(tokens / P)), tables = 1 for a shared table else heads; allocates only the
/// message of an error. Reads the view only: safe to call concurrently.
/// @param v the view to check.
/// @param name the view's name in error messages, e.g. "k" or "v".
/// @throws sparse_attn::invalid_argument on the first failed check.
template <class T>
void validate_view(const PagedView<T>& v, const char* name) {
  require(v.heads >= 0 && v.tokens >= 0 && v.dim >= 0, name,
          ": paged view has a negative extent (heads=", v.heads, ", tokens=", v.tokens, ", dim=", v.dim,
          "); extents must be >= 0");
  if (v.empty()) return;
  require(v.pool != nullptr && v.table != nullptr, name, ": paged view is non-empty (", v.heads, "x",
          v.tokens, "x", v.dim, ") but its ", v.pool == nullptr ? "pool" : "page table",
          " pointer is null");
  constexpr index_t kMaxPage = (index_t{1} << 31) - 1;
  require(v.page_size >= 1 && v.page_size <= kMaxPage, name,
          ": paged view: page_size must be in [1, 2^31 - 1], got ", v.page_size);
  require(v.table_stride_head >= 0 && v.page_stride >= 1 && v.head_stride >= 0 &&
              v.row_stride >= 1,
          name, ": paged view: strides must be table_stride_head >= 0, page_stride >= 1, ",
          "head_stride >= 0, row_stride >= 1; got ", v.table_stride_head, ", ", v.page_stride,
          ", ", v.head_stride, ", ", v.row_stride);
  require(v.pool_pages >= 1, name, ": paged view: pool_pages must be >= 1 (the physical pages the ",
          "table may name), got ", v.pool_pages);
  const index_t pages = (v.tokens - 1) / v.page_size + 1;  // logical pages of [0, tokens)
  const index_t tables = v.table_stride_head == 0 ? 1 : v.heads;
  for (index_t h = 0; h < tables; ++h)
    for (index_t p = 0; p < pages; ++p) {
      const index_t e = v.table[h * v.table_stride_head + p];
      if (e < 0 || e >= v.pool_pages)
        raise_invalid_argument(sparse_attn::detail::concat(
            name, ": paged view: page table entry ", p, " of head ", h, " is ", e,
            "; physical pages must be in [0, ", v.pool_pages, ")"));
    }
}

}  // namespace kv
SPARSE_ATTN_NAMESPACE_END
