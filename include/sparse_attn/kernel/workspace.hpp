/// @file
/// Caller-provided memory for a kernel run, and the shape a plan is made for.
/// See docs/DESIGN.md, section "Plan / run, workspace, executor".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// A byte range the caller owns: the scratch of one kernel run (plan.workspace_bytes() bytes,
/// 64-byte aligned). The run uses it and nothing else; it may be reused by the next run once this
/// one has returned, but not shared by two runs at the same time.
struct Workspace {
  void* data = nullptr;   ///< Start of the range, 64-byte aligned; may be null when bytes is 0.
  std::size_t bytes = 0;  ///< Size of the range in bytes, >= the plan's workspace_bytes().
};

/// An owned, 64-byte aligned workspace (for callers that do not manage their own memory).
/// Move-only. The memory is not initialised; the runs need none.
class WorkspaceBuffer {
 public:
  /// No memory (a valid workspace for plans that need 0 bytes).
  WorkspaceBuffer() = default;
  /// Allocates `bytes` (throws std::bad_alloc on failure).
  /// @param bytes size in bytes, typically plan.workspace_bytes(); 0 allocates nothing.
  /// @throws std::bad_alloc when the memory is not available.
  explicit WorkspaceBuffer(std::size_t bytes)
      : data_(bytes > 0 ? static_cast<unsigned char*>(::operator new(bytes, std::align_val_t{64}))
                        : nullptr),
        bytes_(bytes) {}
  /// @return a non-owning Workspace over the buffer, valid while the buffer lives.
  Workspace view() const { return {data_.get(), bytes_}; }
  /// Same as view(), so a buffer can be passed where a Workspace is expected.
  operator Workspace() const { return view(); }  // NOLINT(google-explicit-constructor)
  /// @return the size in bytes.
  std::size_t bytes() const { return bytes_; }

 private:
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<unsigned char, Free> data_;
  std::size_t bytes_ = 0;
};

/// Shapes a plan is made for: Hq query heads of n_q tokens against Hkv K/V heads of n_k tokens,
/// head dims d (Q, K) and dv (V, out), and the element types of Q, K and V (they decide the
/// precision mode and what the plan packs, see Precision).
struct AttentionShape {
  index_t heads_q = 0,   ///< Hq, query (and output) heads.
      heads_kv = 0,      ///< Hkv, K/V heads; Hq is a multiple of it (GQA group G = Hq / Hkv).
      n_q = 0,           ///< Query tokens, the last n_q of the n_k key positions.
      n_k = 0,           ///< Key tokens (K/V view slots).
      head_dim = 0,      ///< d, channels of Q and K.
      head_dim_v = 0;    ///< dv, channels of V and the output.
  DType q_type = DType::float32,  ///< Element type of Q.
      k_type = DType::float32,    ///< Element type of K.
      v_type = DType::float32;    ///< Element type of V.
  /// @param o the other shape.
  /// @return true when every extent and element type is equal.
  bool operator==(const AttentionShape& o) const {
    return heads_q == o.heads_q && heads_kv == o.heads_kv && n_q == o.n_q && n_k == o.n_k &&
           head_dim == o.head_dim && head_dim_v == o.head_dim_v && q_type == o.q_type &&
           k_type == o.k_type && v_type == o.v_type;
  }
  /// @param o the other shape.
  /// @return !(*this == o).
  bool operator!=(const AttentionShape& o) const { return !(*this == o); }
};

/// The shape of q [Hq, n_q, d] against k [Hkv, n_k, d], v [Hkv, n_k, dv].
/// @param q query view (TensorView).
/// @param k key view (TensorView or kv::PagedView).
/// @param v value view.
/// @return the extents and element types; nothing is validated, never throws.
template <class QV, class KV, class VV>
AttentionShape attention_shape(const QV& q, const KV& k, const VV& v) {
  return {q.heads,
          k.heads,
          q.tokens,
          k.tokens,
          q.dim,
          v.dim,
          dtype_of<typename QV::value_type>(),
          dtype_of<typename KV::value_type>(),
          dtype_of<typename VV::value_type>()};
}

/// "[Hq=.., Hkv=.., n_q=.., n_k=.., d=.., dv=.., q fp32, k bf16, v bf16]" for error messages.
/// @param s the shape.
/// @return the description (allocates; may throw std::bad_alloc).
inline std::string describe(const AttentionShape& s) {
  return "[Hq=" + std::to_string(s.heads_q) + ", Hkv=" + std::to_string(s.heads_kv) +
         ", n_q=" + std::to_string(s.n_q) + ", n_k=" + std::to_string(s.n_k) +
         ", d=" + std::to_string(s.head_dim) + ", dv=" + std::to_string(s.head_dim_v) + ", q " +
         dtype_name(s.q_type) + ", k " + dtype_name(s.k_type) + ", v " + dtype_name(s.v_type) + "]";
}

namespace detail {
inline void check_workspace(const Workspace& ws, std::size_t needed, const char* where) {
  require(ws.bytes >= needed, where, ": workspace holds ", ws.bytes, " bytes, the plan needs ",
          needed, " (plan.workspace_bytes())");
  require(needed == 0 || ws.data != nullptr, where, ": workspace data is null");
  require(reinterpret_cast<std::uintptr_t>(ws.data) % 64 == 0, where,
          ": workspace data must be 64-byte aligned");
}
}  // namespace detail

SPARSE_ATTN_NAMESPACE_END
