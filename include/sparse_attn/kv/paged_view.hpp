// A read-only view of a paged KV store as logical [heads, tokens, dim]: token t of head h lives in
// physical page table[h * table_stride_head + t / P], at row t % P. It exposes the accessors the
// kernels use (value_type, heads, tokens, dim, stride_dim, row(h, t)), so decode() and prefill()
// read a paged cache in place, one pointer computation per key row and no copy.
//
// Physical page layout: page_stride elements per page; inside a page, head h starts at
// h * head_stride (0 when every head has its own page table) and row s at s * row_stride.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <type_traits>

#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kv {

template <class T>
struct PagedView {
  using value_type = std::remove_const_t<T>;
  T* pool = nullptr;               // physical pages
  const index_t* table = nullptr;  // logical page -> physical page
  index_t heads = 0, tokens = 0, dim = 0;
  index_t page_size = 1;          // P: tokens per page
  index_t table_stride_head = 0;  // 0: one page table shared by every head
  index_t page_stride = 0;        // elements per physical page
  index_t head_stride = 0;        // offset of head h inside a shared page = h * head_stride
  index_t row_stride = 0;         // elements between consecutive tokens of a page
  static constexpr index_t stride_dim = 1;

  T* row(index_t h, index_t t) const {
    const index_t p = t / page_size;
    return pool + table[h * table_stride_head + p] * page_stride + h * head_stride +
           (t - p * page_size) * row_stride;
  }
  T& operator()(index_t h, index_t t, index_t c) const { return row(h, t)[c]; }
  bool empty() const { return heads == 0 || tokens == 0 || dim == 0; }
};

}  // namespace kv
SPARSE_ATTN_NAMESPACE_END
