/// @file
/// Non-owning views over caller memory. Attention tensors are logically [heads, tokens, dim] with
/// arbitrary element strides, so a cache stored token-major ([tokens, heads, dim]) is viewed
/// without a copy. The caller keeps the memory alive for as long as the view is used.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/dtype.hpp"  // includes Eigen/Core inside the PR 105593 guard
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>
#include <type_traits>

#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Signed 64-bit index and extent type of every shape, stride and count in the library.
using index_t = std::int64_t;

/// Size limits every entry point enforces (sparse_attn::invalid_argument beyond them), so that no
/// count, offset or byte size the library forms can wrap: a tensor (view, cache) holds at most
/// 2^56 elements (2^58 bytes of fp32, beyond any machine's address space), a workspace or buffer
/// at most 2^62 bytes, and pair counts (heads x n_q x n_k) stay below 2^63.
inline constexpr index_t kMaxElements = index_t{1} << 56;
/// Largest workspace or buffer, in bytes (2^62); also the farthest element offset, in elements,
/// that a view's strides may reach from its data pointer (see kMaxElements).
inline constexpr index_t kMaxBytes = index_t{1} << 62;

namespace detail {
/// The product of non-negative factors, or -1 when it exceeds `limit` (computed without
/// overflow: each step checks against limit / factor first).
inline index_t bounded_product(index_t limit, std::initializer_list<index_t> factors) {
  for (index_t f : factors)
    if (f < 0) return -1;
  for (index_t f : factors)
    if (f == 0) return 0;
  index_t p = 1;
  for (index_t f : factors) {
    if (p > limit / f) return -1;
    p *= f;
  }
  return p;
}
}  // namespace detail

/// A 3-D strided view: element (h, t, c) lives at data[h*stride_head + t*stride_token + c*stride_dim].
///
/// A plain aggregate of a pointer, three extents and three strides (all in elements, strides may
/// be negative). It owns nothing and checks nothing on construction: the entry points validate
/// views (validate_view) before use. Copying is free; a view may be shared read-only between
/// threads, and concurrent writes through views are safe when they touch disjoint elements.
/// @tparam T element type: float, bf16 or fp16, const-qualified for inputs.
template <class T>
struct TensorView {
  /// The element type without const.
  using value_type = std::remove_const_t<T>;
  T* data = nullptr;  ///< Element (0, 0, 0); may be null only when the view is empty.
  index_t heads = 0,   ///< Extent of the head axis.
      tokens = 0,      ///< Extent of the token axis.
      dim = 0;         ///< Extent of the channel axis (head dimension).
  index_t stride_head = 0,  ///< Elements between heads.
      stride_token = 0,     ///< Elements between tokens.
      stride_dim = 1;       ///< Elements between channels (1 for rows the kernels load fastest).

  /// The empty view (null data, all extents 0).
  TensorView() = default;
  /// Contiguous head-major [heads, tokens, dim].
  /// (n x d is formed modulo 2^64, never as signed overflow: a product that wraps belongs to a
  /// view of more than 2^56 elements, which every call refuses.)
  /// @param p element (0, 0, 0); the caller's memory, at least h x n x d elements.
  /// @param h heads.
  /// @param n tokens.
  /// @param d channels per token.
  TensorView(T* p, index_t h, index_t n, index_t d)
      : data(p), heads(h), tokens(n), dim(d),
        stride_head(static_cast<index_t>(static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(d))),
        stride_token(d), stride_dim(1) {}
  /// Explicit strides, in elements.
  /// @param p element (0, 0, 0).
  /// @param h heads.
  /// @param n tokens.
  /// @param d channels per token.
  /// @param sh elements between heads.
  /// @param st elements between tokens.
  /// @param sd elements between channels.
  TensorView(T* p, index_t h, index_t n, index_t d, index_t sh, index_t st, index_t sd = 1)
      : data(p), heads(h), tokens(n), dim(d), stride_head(sh), stride_token(st), stride_dim(sd) {}
  /// Converting constructor: TensorView<float> -> TensorView<const float>.
  /// @param o the mutable view; extents and strides are copied unchanged.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U>& o)  // NOLINT(google-explicit-constructor)
      : data(o.data), heads(o.heads), tokens(o.tokens), dim(o.dim), stride_head(o.stride_head),
        stride_token(o.stride_token), stride_dim(o.stride_dim) {}

  /// A cache stored [tokens, heads, dim] (token-major), viewed as [heads, tokens, dim].
  /// @param p element (token 0, head 0, channel 0) of the contiguous [n, h, d] buffer.
  /// @param h heads.
  /// @param n tokens.
  /// @param d channels per token.
  /// @return the view with strides (d, h x d, 1); no copy, never throws.
  static TensorView token_major(T* p, index_t h, index_t n, index_t d) {
    return TensorView(p, h, n, d, d, h * d, 1);
  }

  /// Pointer to channel 0 of token t of head h (unchecked); channel c is at [c * stride_dim].
  /// @param h head, in [0, heads).
  /// @param t token, in [0, tokens).
  /// @return the row pointer; never throws.
  T* row(index_t h, index_t t) const { return data + h * stride_head + t * stride_token; }
  /// Element (h, t, c), unchecked.
  /// @param h head, in [0, heads).
  /// @param t token, in [0, tokens).
  /// @param c channel, in [0, dim).
  /// @return a reference into the caller's memory.
  T& operator()(index_t h, index_t t, index_t c) const { return row(h, t)[c * stride_dim]; }
  /// @return true when any extent is 0 (the view has no elements).
  bool empty() const { return heads == 0 || tokens == 0 || dim == 0; }
  /// @return the number of elements, heads x tokens x dim (not the memory span; unchecked for
  ///         overflow, so call it on validated views).
  index_t size() const { return heads * tokens * dim; }

  /// Tokens [begin, begin + count) of every head, same strides.
  /// @param begin first token, in [0, tokens]; not checked.
  /// @param count tokens in the slice, begin + count <= tokens; not checked.
  /// @return the sub-view; no copy, never throws.
  TensorView slice_tokens(index_t begin, index_t count) const {
    TensorView r = *this;
    r.data = data + begin * stride_token;
    r.tokens = count;
    return r;
  }

  /// Head h as an Eigen map [tokens x dim] (requires stride_dim == 1).
  /// @param h head, in [0, heads); not checked.
  /// @return a row-major Eigen::Map with outer stride stride_token over the caller's memory
  ///         (read-only when T is const); allocates nothing.
  /// @throws sparse_attn::invalid_argument when stride_dim != 1.
  auto head_matrix(index_t h) const {
    using Mat = Eigen::Matrix<value_type, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using MapT = std::conditional_t<std::is_const_v<T>, const Mat, Mat>;
    require(stride_dim == 1, "TensorView::head_matrix", "needs stride_dim == 1, got ", stride_dim);
    return Eigen::Map<MapT, 0, Eigen::OuterStride<>>(row(h, 0), tokens, dim,
                                                      Eigen::OuterStride<>(stride_token));
  }

  /// True when no two (h, t, c) map to the same element (what an output view needs).
  /// Sorts the axes by |stride| and requires each stride to clear the span of the inner ones, so
  /// it is exact for nested layouts and conservative (may answer false) for interleaved ones.
  /// O(1), never throws; expects strides that validate_view accepts (no overflow).
  /// @return whether the view is free of aliasing.
  bool non_overlapping() const {
    std::array<std::pair<index_t, index_t>, 3> ax{{{std::abs(stride_head), heads},
                                                   {std::abs(stride_token), tokens},
                                                   {std::abs(stride_dim), dim}}};
    std::sort(ax.begin(), ax.end());
    index_t span = 1;  // elements covered by the inner axes so far
    for (auto [stride, extent] : ax) {
      if (extent <= 1) continue;
      if (stride < span) return false;
      span = stride * (extent - 1) + span;
    }
    return true;
  }
};

/// Checks that a view is usable: non-negative extents, non-null data when non-empty, and
/// (for outputs) no two elements aliasing. `name` appears in the error message.
/// @param v the view.
/// @param name argument name for the message (e.g. "prefill: q").
/// @param is_output also require non_overlapping().
/// @throws sparse_attn::invalid_argument when an extent is negative, the view holds more than
///         kMaxElements elements, its strides reach farther than kMaxBytes elements from data,
///         it is non-empty with null data or stride_dim 0, or (is_output) elements alias.
/// O(1), allocates nothing but the message of an error; safe to call concurrently.
template <class T>
void validate_view(const TensorView<T>& v, const char* name, bool is_output = false) {
  require(v.heads >= 0 && v.tokens >= 0 && v.dim >= 0, name,
          " has a negative extent (heads=", v.heads, ", tokens=", v.tokens, ", dim=", v.dim,
          "); extents must be >= 0");
  require(detail::bounded_product(kMaxElements, {v.heads, v.tokens, v.dim}) >= 0, name,
          " has ", v.heads, "x", v.tokens, "x", v.dim, " elements; a view holds at most 2^56");
  if (v.empty()) return;
  // The farthest element offset, sum |stride| x (extent - 1), must be addressable (no wrap).
  index_t reach = 0;
  for (auto [stride, extent] : {std::pair<index_t, index_t>{v.stride_head, v.heads},
                                {v.stride_token, v.tokens}, {v.stride_dim, v.dim}}) {
    const index_t r = stride == std::numeric_limits<index_t>::min()
                          ? -1
                          : detail::bounded_product(kMaxBytes, {std::abs(stride), extent - 1});
    require(r >= 0 && reach <= kMaxBytes - r, name, " has strides (head ", v.stride_head,
            ", token ", v.stride_token, ", dim ", v.stride_dim,
            ") reaching beyond 2^62 elements from its data pointer");
    reach += r;
  }
  require(v.data != nullptr, name, " is non-empty (", v.heads, "x", v.tokens, "x", v.dim,
          ") but its data pointer is null");
  require(v.stride_dim != 0, name, " has stride_dim 0; strides must be non-zero");
  if (is_output)
    require(v.non_overlapping(), name, " has overlapping strides (head ", v.stride_head,
            ", token ", v.stride_token, ", dim ", v.stride_dim,
            "); output elements must not alias each other");
}

/// Optional log-sum-exp output: lse(h, i) = data[h * stride_head + i * stride_token], natural log.
///
/// lse(h, i) = log sum_j exp(scale * q_i . k_j) over the keys query i attends (-inf when it
/// attends none). Non-owning; a null data pointer means "not requested".
struct LseView {
  float* data = nullptr;  ///< lse(0, 0), fp32; null when no LSE is wanted.
  index_t stride_head = 0,  ///< Floats between heads.
      stride_token = 1;     ///< Floats between queries.
  /// No LSE output.
  LseView() = default;
  /// Contiguous [heads, n_q] floats.
  /// @param p lse(0, 0).
  /// @param n_q queries per head (the head stride).
  LseView(float* p, index_t n_q) : data(p), stride_head(n_q), stride_token(1) {}
  /// Explicit strides, in floats.
  /// @param p lse(0, 0).
  /// @param sh floats between heads.
  /// @param st floats between queries.
  LseView(float* p, index_t sh, index_t st) : data(p), stride_head(sh), stride_token(st) {}
  /// True when an LSE output was given (non-null data).
  explicit operator bool() const { return data != nullptr; }
  /// lse(h, i), unchecked.
  /// @param h head.
  /// @param i query.
  /// @return a reference into the caller's buffer.
  float& operator()(index_t h, index_t i) const { return data[h * stride_head + i * stride_token]; }
};

SPARSE_ATTN_NAMESPACE_END
