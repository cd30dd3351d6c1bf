/// @file
/// Pieces shared by the prefill and decode kernels: options, argument validation, and (for the
/// selections) K/V row access for any KV view type and aligned scratch.
#pragma once
#include "sparse_attn/core/config.hpp"

#include "sparse_attn/core/dtype.hpp"  // includes Eigen/Core inside the PR 105593 guard
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/view_traits.hpp"
#include "sparse_attn/kernel/workspace.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Optional per-key attention mass: for KV head hk and key slot j of the K view,
/// data[hk * stride + j] = sum over the query heads h of group hk (h / G == hk) and the query rows
/// i >= row_begin of the final softmax probability P[h][i][j] (fp32); 0 for keys no selected row reads.
/// See docs/DESIGN.md, section "Key mass output".
struct KeyMassView {
  float* data = nullptr;  ///< [Hkv, n_k] floats, row hk at data + hk * stride; null: not wanted.
  index_t stride = 0;     ///< Floats between KV heads, >= n_k (number of K view slots).
  index_t row_begin = 0;  ///< First query row counted, in [0, n_q] (n_q: none; e.g. the last
                          ///< window of a prompt for SnapKV/H2O-style scoring).
};

/// Precision of the products in Q K^T and P V; accumulation and the softmax statistics (running
/// max, sum, LSE) are fp32 in every mode.
enum class Precision {
  /// bf16 products when Q, K and V are all bf16 (what engines serving bf16 models and PyTorch's
  /// bf16 SDPA compute), fp32 products otherwise.
  automatic,
  /// fp32 products: bf16 and fp16 inputs are widened to fp32 exactly, so only the fp32
  /// accumulation rounds (error ~1e-6 relative). fp16 inputs always take this mode: the product
  /// of two fp16 values is exact in fp32, so it is fp16 products with fp32 accumulation.
  float32,
  /// bf16 products, fp32 accumulation (needs bf16 K and V): an fp32 Q and the probabilities P are
  /// rounded to bf16 (nearest even) before the products, and the softmax scale multiplies the
  /// fp32 sum q . k, as PyTorch and FlashAttention do. Each rounding is within 2^-8 relative;
  /// docs/PRECISION.md gives the measured error of each mode. Computed with vdpbf16ps (AVX512-BF16)
  /// or AMX tiles where the CPU has them, else emulated with the same roundings and fp32 FMAs.
  bfloat16,
};

/// Name of a precision mode for messages and reports.
/// @param p the mode.
/// @return "automatic", "float32" or "bfloat16" ("unknown" outside the enum); a static string.
inline const char* precision_name(Precision p) {
  switch (p) {
    case Precision::automatic: return "automatic";
    case Precision::float32: return "float32";
    case Precision::bfloat16: return "bfloat16";
  }
  return "unknown";
}

/// Options common to every kernel call.
struct AttentionOptions {
  /// Softmax scale multiplying q . k; NaN (the default): 1 / sqrt(head_dim). Otherwise it must be
  /// finite and > 0 (sparse_attn::invalid_argument).
  float scale = std::numeric_limits<float>::quiet_NaN();
  /// Threads of the default executor (0: OpenMP's default; must be >= 0); unused when `executor`
  /// is set.
  int num_threads = 0;
  Executor* executor = nullptr;  ///< The caller's executor (not owned); nullptr: the default.
  /// Optional [Hq, n_q] log-sum-exp of the scaled logits (natural log), written by the run.
  LseView lse{};
  /// Optional [Hkv, n_k] attention mass per key (KeyMassView), computed in the same pass over K:
  /// the plan sizes extra workspace for it only when data != nullptr (see docs/DESIGN.md).
  KeyMassView key_mass{};
  Precision precision = Precision::automatic;  ///< Of the Q K^T and P V products (see Precision).

  /// @return the executor fields as an ExecutorChoice.
  ExecutorChoice executor_choice() const { return {executor, num_threads}; }
};

/// Building blocks the kernels, selections and caches share (scratch allocation, validation, row
/// access). Public but low-level: applications normally need only the plan / run entry points.
namespace kernel {

/// Allocates on 64-byte boundaries whatever the includer's -march: the dispatched AVX-512 code
/// uses aligned 64-byte loads even in a portable build, where Eigen's aligned_allocator only
/// guarantees 16 bytes. Stateless: all instances compare equal.
/// @tparam T the element type.
template <class T>
struct CacheLineAllocator {
  using value_type = T;  ///< The element type (std::allocator_traits).
  /// Stateless default construction.
  CacheLineAllocator() = default;
  /// Rebinding copy (stateless, nothing to copy).
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  /// @param n number of elements.
  /// @return 64-byte aligned storage for n elements (uninitialised).
  /// @throws std::bad_alloc when the memory is not available. (n * sizeof(T) is not checked for
  ///         overflow; std::vector keeps n below max_size().)
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  /// Frees storage from allocate(). Never throws.
  /// @param p the pointer allocate() returned.
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
  /// @return true: any instance frees what another allocated.
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
  /// @return false (see operator==).
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};

/// A std::vector whose data is 64-byte aligned (scratch the dispatched kernels load aligned).
template <class T>
using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

/// Resolves and validates the softmax scale.
/// @param scale the option's value; NaN selects the default.
/// @param d head dimension of Q and K.
/// @param where entry point, for the message.
/// @return 1 / sqrt(d) for NaN, else scale.
/// @throws sparse_attn::invalid_argument when scale is not NaN and not finite and > 0.
inline float resolve_scale(float scale, index_t d, const char* where) {
  if (std::isnan(scale)) return 1.0f / std::sqrt(static_cast<float>(d));
  require(std::isfinite(scale) && scale > 0.0f, where, ": scale must be finite and > 0, got ",
          scale);
  return scale;
}

/// Validates the shapes a plan is made for; returns the GQA group size Hq / Hkv.
/// Bounds (kMaxElements, pair counts < 2^63) keep every product a plan forms inside int64.
/// @param s the shape.
/// @param where entry point, for the message.
/// @return G = Hq / Hkv, the query heads per KV head.
/// @throws sparse_attn::invalid_argument when Hkv < 1, d or dv < 1, a count is negative,
///         Hq x n_q x max(d, dv) or Hkv x n_k x max(d, dv) exceeds kMaxElements, Hq x n_q x n_k
///         exceeds 2^63 - 1, Hq is not a multiple of Hkv, or n_q > n_k (queries are the last n_q
///         of the keys' positions).
/// O(1); allocates only for an error message.
inline index_t validate_shape(const AttentionShape& s, const char* where) {
  require(s.heads_kv >= 1, where, ": K and V need >= 1 head, got ", s.heads_kv);
  require(s.head_dim >= 1 && s.head_dim_v >= 1, where, ": head_dim must be >= 1");
  require(s.heads_q >= 0 && s.n_q >= 0 && s.n_k >= 0, where, ": extents must be >= 0, got Hq=",
          s.heads_q, ", n_q=", s.n_q, ", n_k=", s.n_k);
  const index_t dmax = std::max(s.head_dim, s.head_dim_v);
  require(detail::bounded_product(kMaxElements, {s.heads_q, s.n_q, dmax}) >= 0 &&
              detail::bounded_product(kMaxElements, {s.heads_kv, s.n_k, dmax}) >= 0,
          where, ": Hq=", s.heads_q, ", Hkv=", s.heads_kv, ", n_q=", s.n_q, ", n_k=", s.n_k,
          ", d=", s.head_dim, ", dv=", s.head_dim_v,
          " gives a tensor of more than 2^56 elements (the limit)");
  require(detail::bounded_product(std::numeric_limits<index_t>::max(), {s.heads_q, s.n_q, s.n_k}) >= 0,
          where, ": Hq x n_q x n_k = ", s.heads_q, " x ", s.n_q, " x ", s.n_k,
          " pairs exceed 2^63 - 1 (pair counts are int64)");
  require(s.heads_q % s.heads_kv == 0, where, ": Hq=", s.heads_q, " is not a multiple of Hkv=",
          s.heads_kv, " (GQA needs Hq % Hkv == 0)");
  require(s.n_q <= s.n_k, where, ": n_q=", s.n_q, " > n_k=", s.n_k,
          "; queries must be a suffix of the keys");
  return s.heads_q / s.heads_kv;
}

/// Refuses a plan whose workspace, `shared` bytes plus `per_worker` bytes for each of `workers`,
/// would exceed kMaxBytes (parts are sized by Carvers, which report SIZE_MAX instead of wrapping).
/// @param shared bytes of the parts every worker shares.
/// @param per_worker bytes of one worker's scratch.
/// @param workers number of workers (values < 1 are counted as 1).
/// @param s the plan's shape, for the message.
/// @param where entry point, for the message.
/// @throws sparse_attn::invalid_argument when the total exceeds kMaxBytes.
inline void require_workspace_fits(std::initializer_list<std::size_t> shared, std::size_t per_worker,
                                   int workers, const AttentionShape& s, const char* where) {
  constexpr auto kMax = static_cast<std::size_t>(kMaxBytes);
  std::size_t total = 0;
  bool fits = per_worker <= kMax && per_worker <= kMax / static_cast<std::size_t>(std::max(workers, 1));
  if (fits) total = per_worker * static_cast<std::size_t>(std::max(workers, 1));
  for (std::size_t part : shared) {
    fits = fits && part <= kMax - total;
    if (fits) total += part;
  }
  if (!fits)  // (describe() allocates: only on the failure path)
    raise_invalid_argument(detail::concat(where, ": the workspace for ", describe(s), " on ", workers,
                                          " workers would exceed 2^62 bytes; use smaller blocks or "
                                          "fewer tokens per call"));
}

/// Validates Q/K/V/out views shared by prefill and decode; returns the GQA group size.
/// @param q [Hq, n_q, d] query view.
/// @param k [Hkv, n_k, d] key view (TensorView or kv::PagedView).
/// @param v [Hkv, n_k, dv] value view, same kind as k.
/// @param out [Hq, n_q, dv] output view; must not alias itself.
/// @param where entry point, for the message.
/// @return G = Hq / Hkv.
/// @throws sparse_attn::invalid_argument when a view is invalid (validate_view), K and V differ
///         in heads or tokens, Q and K differ in d, out is not [Hq, n_q, dv], or the shape fails
///         validate_shape(). Overlap of out with q, k or v is not checked.
template <class QV, class KV, class VV, class OV>
index_t validate_qkvo(const QV& q, const KV& k, const VV& v, const OV& out, const char* where) {
  validate_view(q, "q");
  validate_view(out, "out", true);
  // Every K/V view type has its validate_view (found by argument-dependent lookup):
  // TensorView (core/tensor.hpp), kv::PagedView (kv/paged_view.hpp).
  validate_view(k, "k");
  validate_view(v, "v");
  require(k.heads >= 1 && v.heads >= 1, where, ": K and V need >= 1 head, got K ", k.heads,
          ", V ", v.heads);
  require(k.heads == v.heads && k.tokens == v.tokens, where, ": K is [", k.heads, ", ", k.tokens,
          ", ", k.dim, "] but V is [", v.heads, ", ", v.tokens, ", ", v.dim,
          "]; K and V must have the same heads and tokens");
  require(q.dim == k.dim, where, ": head_dim of Q (", q.dim, ") differs from K (", k.dim,
          "); they must be equal");
  const index_t G = validate_shape(attention_shape(q, k, v), where);
  require(out.heads == q.heads && out.tokens == q.tokens && out.dim == v.dim, where,
          ": out is [", out.heads, ", ", out.tokens, ", ", out.dim, "], expected [", q.heads,
          ", ", q.tokens, ", ", v.dim, "]");
  return G;
}

/// Whether a call with element types Q, K, V under `precision` uses bf16 products (see
/// Precision). Throws invalid_argument for Precision::bfloat16 with K or V not bf16.
/// @param precision the requested mode.
/// @param q element type of Q.
/// @param k element type of K.
/// @param v element type of V.
/// @param where entry point, for the message.
/// @return true for bf16 products.
/// @throws sparse_attn::invalid_argument for bfloat16 without bf16 K and V, or a precision value
///         outside the enum.
inline bool bf16_products(Precision precision, DType q, DType k, DType v, const char* where) {
  const bool kv_bf16 = k == DType::bfloat16 && v == DType::bfloat16;
  switch (precision) {
    case Precision::float32: return false;
    case Precision::automatic: return kv_bf16 && q == DType::bfloat16;
    case Precision::bfloat16:
      require(kv_bf16, where, ": precision bfloat16 needs bf16 K and V, got K ", dtype_name(k), ", V ",
              dtype_name(v), "; use precision float32 or automatic for other types");
      return true;
  }
  raise_invalid_argument(std::string(where) + ": unknown precision value " +
                         std::to_string(static_cast<int>(precision)) + "; allowed: automatic, float32, bfloat16");
}
/// bf16_products() for the element types recorded in a shape.
/// @param precision the requested mode.
/// @param s the shape (q_type, k_type, v_type are used).
/// @param where entry point, for the message.
/// @return true for bf16 products.
/// @throws sparse_attn::invalid_argument as the overload above.
inline bool bf16_products(Precision precision, const AttentionShape& s, const char* where) {
  return bf16_products(precision, s.q_type, s.k_type, s.v_type, where);
}

/// Validates an optional key-mass view for a call of n_q query rows against n_k keys.
/// @param km the view; nothing is checked when its data is null.
/// @param n_q query rows of the call.
/// @param n_k key slots of the K view.
/// @param where entry point, for the message.
/// @throws sparse_attn::invalid_argument when stride < n_k or row_begin is outside [0, n_q].
inline void validate_key_mass(const KeyMassView& km, index_t n_q, index_t n_k, const char* where) {
  if (km.data == nullptr) return;
  require(km.stride >= n_k, where, ": key_mass.stride=", km.stride, " is less than n_k=", n_k,
          "; each KV head's row needs n_k floats");
  require(km.row_begin >= 0 && km.row_begin <= n_q, where, ": key_mass.row_begin=", km.row_begin,
          " must be in [0, n_q=", n_q, "]");
}

/// Rows [t0, t0 + n) of head h of a K or V view as fp32 rows with stride *ld. Returns a pointer
/// into the view itself when it already holds contiguous fp32 rows, else converts into buf.
/// @tparam View TensorView or kv::PagedView (anything with value_type, dim, stride_dim, row()).
/// @param view the K or V view.
/// @param h head of the view.
/// @param t0 first token; [t0, t0 + n) must lie in the view (unchecked).
/// @param n number of rows.
/// @param buf scratch of n x view.dim floats (unused on the zero-copy path).
/// @param ld set to the stride in floats between the returned rows.
/// @return the first row. Never throws, allocates nothing.
template <class View>
const float* fp32_rows(const View& view, index_t h, index_t t0, index_t n, float* buf,
                       index_t& ld) {
  using T = std::remove_const_t<typename View::value_type>;
  if constexpr (std::is_same_v<T, float> && is_tensor_view<View>::value) {
    if (view.stride_dim == 1) {
      ld = view.stride_token;
      return view.row(h, t0);
    }
  }
  ld = view.dim;
  for (index_t j = 0; j < n; ++j) load_row(view.row(h, t0 + j), view.stride_dim, buf + j * ld, view.dim);
  return buf;
}

}  // namespace kernel
SPARSE_ATTN_NAMESPACE_END
