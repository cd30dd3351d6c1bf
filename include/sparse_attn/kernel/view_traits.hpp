/// @file
/// Traits of the K/V view types the kernels accept (TensorView, kv::PagedView, ...).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <type_traits>

#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace kernel {

/// True (std::true_type) when V is a TensorView, whose rows may be read in place; false for the
/// other K/V view types (kv::PagedView).
/// @tparam V a K/V view type.
template <class V>
struct is_tensor_view : std::false_type {};
template <class T>
struct is_tensor_view<TensorView<T>> : std::true_type {};

}  // namespace kernel
SPARSE_ATTN_NAMESPACE_END
