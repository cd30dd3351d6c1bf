/// @file
/// A read-only view of a paged KV store as logical [heads, tokens, dim]: token t of head h lives in
/// physical page table[h * table_stride_head + t / P], at row t % P. It exposes the accessors the
/// kernels use (value_type, heads, tokens, dim, stride_dim, row(h, t)), so decode() and prefill()
/// read a paged cache in place, one pointer computation per key row and no copy.
///
/// Physical page layout: page_stride elements per page; inside a page, head h starts at
/// h * head_stride (0 when every head has its own page table) and row s at s * row_stride.
///
/// Every kernel validates a PagedView it is given (validate_view below): extents, pointers,
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

template <class T>
struct PagedView {
  using value_type = std::remove_const_t<T>;
  T* pool = nullptr;               ///< physical pages
  const index_t* table = nullptr;  ///< logical page -> physical page
  index_t heads = 0, tokens = 0, dim = 0;
  index_t page_size = 1;          ///< P: tokens per page
  index_t table_stride_head = 0;  ///< 0: one page table shared by every head
  index_t page_stride = 0;        ///< elements per physical page
  index_t head_stride = 0;        ///< offset of head h inside a shared page = h * head_stride
  index_t row_stride = 0;         ///< elements between consecutive tokens of a page
  index_t pool_pages = 0;         ///< physical pages in the pool: table entries are in [0, pool_pages)
  static constexpr index_t stride_dim = 1;

  T* row(index_t h, index_t t) const {
    const index_t p = t / page_size;
    return pool + table[h * table_stride_head + p] * page_stride + h * head_stride +
           (t - p * page_size) * row_stride;
  }
  T& operator()(index_t h, index_t t, index_t c) const { return row(h, t)[c]; }
  bool empty() const { return heads == 0 || tokens == 0 || dim == 0; }
};

/// The checks every kernel makes on a paged K or V view (`name`: "k", "v"); throws
/// sparse_attn::invalid_argument.
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
