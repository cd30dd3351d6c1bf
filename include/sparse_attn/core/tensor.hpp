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

using index_t = std::int64_t;

/// Size limits every entry point enforces (sparse_attn::invalid_argument beyond them), so that no
/// count, offset or byte size the library forms can wrap: a tensor (view, cache) holds at most
/// 2^56 elements (2^58 bytes of fp32, beyond any machine's address space), a workspace or buffer
/// at most 2^62 bytes, and pair counts (heads x n_q x n_k) stay below 2^63.
inline constexpr index_t kMaxElements = index_t{1} << 56;
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
template <class T>
struct TensorView {
  using value_type = std::remove_const_t<T>;
  T* data = nullptr;
  index_t heads = 0, tokens = 0, dim = 0;
  index_t stride_head = 0, stride_token = 0, stride_dim = 1;

  TensorView() = default;
  /// Contiguous head-major [heads, tokens, dim].
  /// (n x d is formed modulo 2^64, never as signed overflow: a product that wraps belongs to a
  /// view of more than 2^56 elements, which every call refuses.)
  TensorView(T* p, index_t h, index_t n, index_t d)
      : data(p), heads(h), tokens(n), dim(d),
        stride_head(static_cast<index_t>(static_cast<std::uint64_t>(n) * static_cast<std::uint64_t>(d))),
        stride_token(d), stride_dim(1) {}
  /// Explicit strides, in elements.
  TensorView(T* p, index_t h, index_t n, index_t d, index_t sh, index_t st, index_t sd = 1)
      : data(p), heads(h), tokens(n), dim(d), stride_head(sh), stride_token(st), stride_dim(sd) {}
  /// Converting constructor: TensorView<float> -> TensorView<const float>.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U>& o)  // NOLINT(google-explicit-constructor)
      : data(o.data), heads(o.heads), tokens(o.tokens), dim(o.dim), stride_head(o.stride_head),
        stride_token(o.stride_token), stride_dim(o.stride_dim) {}

  /// A cache stored [tokens, heads, dim] (token-major), viewed as [heads, tokens, dim].
  static TensorView token_major(T* p, index_t h, index_t n, index_t d) {
    return TensorView(p, h, n, d, d, h * d, 1);
  }

  T* row(index_t h, index_t t) const { return data + h * stride_head + t * stride_token; }
  T& operator()(index_t h, index_t t, index_t c) const { return row(h, t)[c * stride_dim]; }
  bool empty() const { return heads == 0 || tokens == 0 || dim == 0; }
  index_t size() const { return heads * tokens * dim; }

  /// Tokens [begin, begin + count) of every head, same strides.
  TensorView slice_tokens(index_t begin, index_t count) const {
    TensorView r = *this;
    r.data = data + begin * stride_token;
    r.tokens = count;
    return r;
  }

  /// Head h as an Eigen map [tokens x dim] (requires stride_dim == 1).
  auto head_matrix(index_t h) const {
    using Mat = Eigen::Matrix<value_type, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using MapT = std::conditional_t<std::is_const_v<T>, const Mat, Mat>;
    require(stride_dim == 1, "TensorView::head_matrix", "needs stride_dim == 1, got ", stride_dim);
    return Eigen::Map<MapT, 0, Eigen::OuterStride<>>(row(h, 0), tokens, dim,
                                                      Eigen::OuterStride<>(stride_token));
  }

  /// True when no two (h, t, c) map to the same element (what an output view needs).
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
struct LseView {
  float* data = nullptr;
  index_t stride_head = 0, stride_token = 1;
  LseView() = default;
  LseView(float* p, index_t n_q) : data(p), stride_head(n_q), stride_token(1) {}
  LseView(float* p, index_t sh, index_t st) : data(p), stride_head(sh), stride_token(st) {}
  explicit operator bool() const { return data != nullptr; }
  float& operator()(index_t h, index_t i) const { return data[h * stride_head + i * stride_token]; }
};

SPARSE_ATTN_NAMESPACE_END
