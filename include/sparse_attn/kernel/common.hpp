// Pieces shared by the prefill and decode kernels: argument validation, K/V row access for any
// KV view type, aligned scratch, and a masked exponential.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <omp.h>

#include "sparse_attn/core/dtype.hpp"  // includes Eigen/Core inside the PR 105593 guard
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/kernel/microkernels/packet.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Options common to every kernel call.
struct AttentionOptions {
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1 / sqrt(head_dim)
  int num_threads = 0;                                      // 0: OpenMP default
  LseView lse{};  // optional [Hq, n_q] log-sum-exp of the scaled logits (natural log)
};

namespace kernel {

template <class V>
struct is_tensor_view : std::false_type {};
template <class T>
struct is_tensor_view<TensorView<T>> : std::true_type {};

template <class T>
using aligned_vector = std::vector<T, Eigen::aligned_allocator<T>>;

/// Resolves and validates the softmax scale.
inline float resolve_scale(float scale, index_t d, const char* where) {
  if (std::isnan(scale)) return 1.0f / std::sqrt(static_cast<float>(d));
  require(std::isfinite(scale) && scale > 0.0f, where, ": scale must be finite and > 0, got ",
          scale);
  return scale;
}

/// Validates Q/K/V/out shapes shared by prefill and decode; returns the GQA group size.
template <class QV, class KV, class VV, class OV>
index_t validate_qkvo(const QV& q, const KV& k, const VV& v, const OV& out, const char* where) {
  validate_view(q, "q");
  validate_view(out, "out", true);
  // K/V of other view types (kv::PagedView) come from a kv::Cache, which keeps them consistent.
  if constexpr (is_tensor_view<KV>::value) validate_view(k, "k");
  if constexpr (is_tensor_view<VV>::value) validate_view(v, "v");
  require(k.heads >= 1 && v.heads >= 1, where, ": K and V need >= 1 head, got K ", k.heads,
          ", V ", v.heads);
  require(k.heads == v.heads && k.tokens == v.tokens, where, ": K is [", k.heads, ", ", k.tokens,
          ", ", k.dim, "] but V is [", v.heads, ", ", v.tokens, ", ", v.dim,
          "]; K and V must have the same heads and tokens");
  require(q.dim == k.dim, where, ": head_dim of Q (", q.dim, ") differs from K (", k.dim,
          "); they must be equal");
  require(q.dim >= 1 && v.dim >= 1, where, ": head_dim must be >= 1");
  require(q.heads % k.heads == 0, where, ": Hq=", q.heads, " is not a multiple of Hkv=", k.heads,
          " (GQA needs Hq % Hkv == 0)");
  require(q.tokens <= k.tokens, where, ": n_q=", q.tokens, " > n_k=", k.tokens,
          "; queries must be a suffix of the keys");
  require(out.heads == q.heads && out.tokens == q.tokens && out.dim == v.dim, where,
          ": out is [", out.heads, ", ", out.tokens, ", ", out.dim, "], expected [", q.heads,
          ", ", q.tokens, ", ", v.dim, "]");
  return q.heads / k.heads;
}

/// Rows [t0, t0 + n) of head h of a K or V view as fp32 rows with stride *ld. Returns a pointer
/// into the view itself when it already holds contiguous fp32 rows, else converts into buf.
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

/// e^x with e^x = 0 exactly for x <= -87 (and for -inf), so masked logits never leak weight. NaN
/// stays NaN: a corrupt logit poisons its row instead of vanishing (docs/ROBUSTNESS.md).
inline mk::Packet masked_exp(const mk::Packet& x) {
  using namespace Eigen::internal;
  const mk::Packet lo = pset1<mk::Packet>(-87.0f);
  return pandnot(pexp(pmax(x, lo)), pcmp_le(x, lo));  // pmax(NaN, lo) = NaN; NaN <= lo is false
}

/// True when n rows of w floats at p (row stride ld) are all finite: x * 0 is 0, or NaN for
/// +-inf and NaN.
inline bool all_finite(const float* p, index_t n, index_t w, index_t ld) {
  using namespace Eigen::internal;
  const mk::Packet zero = pset1<mk::Packet>(0.0f);
  mk::Packet acc = zero;
  float tail = 0.0f;
  for (index_t j = 0; j < n; ++j) {
    const float* r = p + j * ld;
    index_t c = 0;
    for (; c + mk::kLanes <= w; c += mk::kLanes)
      acc = padd(acc, pmul(ploadu<mk::Packet>(r + c), zero));
    for (; c < w; ++c) tail += r[c] * 0.0f;
  }
  return predux(acc) + tail == 0.0f;
}

/// Runs body() in an OpenMP parallel region with the requested thread count (0 = default).
template <class F>
void parallel_region(int num_threads, F&& body) {
  require(num_threads >= 0, "AttentionOptions", "num_threads must be >= 0, got ", num_threads);
  if (num_threads > 0) {
#pragma omp parallel num_threads(num_threads)
    body();
  } else {
#pragma omp parallel
    body();
  }
}

}  // namespace kernel
SPARSE_ATTN_NAMESPACE_END
