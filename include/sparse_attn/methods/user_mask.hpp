// A block mask supplied by the caller (an inference engine's own block-sparse layout), validated
// and turned into the common BlockListMask so the common prefill kernel executes it.
//
// Layout: block CSR over rows r = h * num_q_blocks + qb (a single head's rows when head_shared):
// key blocks of row r are col_indices[row_offsets[r] .. row_offsets[r + 1]), strictly increasing.
// Optional flags, one per entry: 1 = every element allowed (no element test beyond causality),
// 0 = partial (the predicate `pred(h, qi, kj)` decides, as FlexAttention's mask_mod on partial
// blocks). Without flags every block is full when the predicate is trivial (AllowAll) and partial
// otherwise. Causality cuts are applied by the mask itself: a full block that crosses the diagonal
// is downgraded to partial.
//
// Validated (sparse_attn::invalid_argument naming the argument and the allowed range): geometry,
// row_offsets size = rows + 1, starting at 0, non-decreasing, ending at col_indices' size; flags
// empty or one per entry; key blocks in [0, num_k_blocks), strictly increasing per row (sorted, no
// duplicates) and, when causal, not after the query block's last position.
//
// Memory: a copy of the arrays (8 bytes per row, 5 bytes per entry); nothing per token.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/mask/block_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// Non-owning (pointer, length) view of a caller array; implicit from std::vector.
template <class T>
struct ArrayRef {
  const T* data = nullptr;
  index_t size = 0;
  ArrayRef() = default;
  ArrayRef(const T* p, index_t n) : data(p), size(n) {}
  ArrayRef(const std::vector<T>& v)  // NOLINT(google-explicit-constructor)
      : data(v.data()), size(static_cast<index_t>(v.size())) {}
  const T& operator[](index_t i) const { return data[i]; }
};

/// Block-CSR layout handed in by an engine (any integer types for offsets and indices).
template <class Offset = index_t, class Index = std::int32_t>
struct BlockCsr {
  ArrayRef<Offset> row_offsets;  // [rows + 1]; rows = num_q_blocks x (head_shared ? 1 : heads)
  ArrayRef<Index> col_indices;   // [row_offsets[rows]] key blocks, strictly increasing per row
  ArrayRef<std::uint8_t> full;   // empty, or one flag per entry: 1 = full block, 0 = partial
  bool head_shared = false;      // one layout for every query head
};

namespace user_mask {
namespace detail_um {
template <class P, class = void>
struct is_trivial_pred : std::false_type {};
template <class P>
struct is_trivial_pred<P, std::void_t<decltype(P::trivial)>> : std::bool_constant<P::trivial> {};
}  // namespace detail_um

/// Validates `csr` against `shape` and returns it as a BlockListMask<Pred> (the predicate decides
/// elements of partial blocks). Throws sparse_attn::invalid_argument on any inconsistency. The
/// pairs are counted on `exec` (the predicate is called there; an exception of it reaches the
/// caller).
template <class Pred = AllowAll, class Offset, class Index>
BlockListMask<Pred> from_bsr(const MaskShape& shape, const BlockCsr<Offset, Index>& csr,
                             Pred pred = {}, const ExecutorChoice& exec = {}) {
  static_assert(std::is_integral_v<Offset> && std::is_integral_v<Index>,
                "row_offsets and col_indices must hold integers");
  constexpr const char* where = "methods::user_mask::from_bsr";
  require(shape.heads >= 1, where, "shape.heads must be >= 1, got ", shape.heads);
  require(shape.n_q >= 0 && shape.n_k >= 0 && shape.n_q <= shape.n_k, where,
          "shape needs 0 <= n_q <= n_k (queries are a suffix of the keys), got n_q=", shape.n_q,
          ", n_k=", shape.n_k);
  require(shape.block_q >= 1 && shape.block_k >= 1, where,
          "shape block sizes must be >= 1, got block_q=", shape.block_q,
          ", block_k=", shape.block_k);
  const index_t nqb = shape.num_q_blocks(), nkb = shape.num_k_blocks();
  const index_t layout_heads = csr.head_shared ? 1 : shape.heads;
  const index_t rows = layout_heads * nqb;
  const auto& off = csr.row_offsets;
  const auto& col = csr.col_indices;
  require(off.size == rows + 1, where, "row_offsets has ", off.size,
          " entries; expected rows + 1 = ", rows + 1, " (", layout_heads,
          csr.head_shared ? " shared head" : " heads", " x ", nqb, " query blocks of ",
          shape.block_q, " + 1)");
  require(off.data != nullptr, where, "row_offsets is null");
  require(col.size >= 0 && (col.size == 0 || col.data != nullptr), where,
          "col_indices is null but has size ", col.size);
  require(static_cast<index_t>(off[0]) == 0, where, "row_offsets[0] must be 0, got ",
          static_cast<index_t>(off[0]));
  for (index_t r = 0; r < rows; ++r)
    require(static_cast<index_t>(off[r + 1]) >= static_cast<index_t>(off[r]), where,
            "row_offsets must be non-decreasing, but row_offsets[", r + 1,
            "] = ", static_cast<index_t>(off[r + 1]), " < row_offsets[", r,
            "] = ", static_cast<index_t>(off[r]));
  require(static_cast<index_t>(off[rows]) == col.size, where, "row_offsets[", rows,
          "] = ", static_cast<index_t>(off[rows]), " must equal the size of col_indices (",
          col.size, ")");
  require(csr.full.size == 0 || csr.full.size == col.size, where, "full has ", csr.full.size,
          " flags; expected none or one per col_indices entry (", col.size, ")");
  require(csr.full.size == 0 || csr.full.data != nullptr, where, "full is null but has size ",
          csr.full.size);

  std::vector<index_t> offsets(static_cast<std::size_t>(rows + 1));
  std::vector<std::int32_t> blocks(static_cast<std::size_t>(col.size));
  std::vector<std::uint8_t> full(static_cast<std::size_t>(col.size));
  constexpr bool default_full = detail_um::is_trivial_pred<Pred>::value;
  for (index_t r = 0; r < rows; ++r) {
    const index_t h = r / nqb, qb = r % nqb;
    const index_t first_pos = shape.q_begin(qb) + shape.q_offset();
    const index_t last_pos = shape.q_end(qb) - 1 + shape.q_offset();
    offsets[static_cast<std::size_t>(r + 1)] = static_cast<index_t>(off[r + 1]);
    for (index_t e = static_cast<index_t>(off[r]); e < static_cast<index_t>(off[r + 1]); ++e) {
      const index_t kb = static_cast<index_t>(col[e]);  // huge unsigned values wrap negative
      require(kb >= 0 && kb < nkb, where, "col_indices[", e, "] = ", kb, " (head ", h,
              ", query block ", qb, ") is out of range; key blocks are [0, ", nkb, ")");
      if (e > static_cast<index_t>(off[r])) {
        const index_t prev = static_cast<index_t>(col[e - 1]);
        require(prev != kb, where, "col_indices[", e, "] = ", kb, " repeats col_indices[", e - 1,
                "] (head ", h, ", query block ", qb, "); key blocks of a row must be unique");
        require(prev < kb, where, "col_indices[", e, "] = ", kb, " follows col_indices[", e - 1,
                "] = ", prev, " (head ", h, ", query block ", qb,
                "); key blocks of a row must be sorted ascending");
      }
      if (shape.causal)
        require(shape.k_begin(kb) <= last_pos, where, "col_indices[", e, "] = ", kb, " (head ", h,
                ", query block ", qb, ") starts at key ", shape.k_begin(kb),
                " after the block's last query position ", last_pos,
                "; a causal mask allows key blocks [0, ", last_pos / shape.block_k, "]");
      bool is_full = csr.full.size > 0 ? csr.full[e] != 0 : default_full;
      if (shape.causal && shape.k_end(kb) - 1 > first_pos) is_full = false;  // causality cuts it
      blocks[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(kb);
      full[static_cast<std::size_t>(e)] = is_full ? 1 : 0;
    }
  }
  return BlockListMask<Pred>(shape, csr.head_shared, std::move(offsets), std::move(blocks),
                             std::move(full), std::move(pred), -1, exec);
}

/// Convenience: std::vector arrays (index_t offsets, int32 key blocks).
template <class Pred = AllowAll>
BlockListMask<Pred> from_bsr(const MaskShape& shape, bool head_shared,
                             const std::vector<index_t>& row_offsets,
                             const std::vector<std::int32_t>& col_indices,
                             const std::vector<std::uint8_t>& full = {}, Pred pred = {},
                             const ExecutorChoice& exec = {}) {
  BlockCsr<index_t, std::int32_t> csr;
  csr.row_offsets = row_offsets;
  csr.col_indices = col_indices;
  csr.full = full;
  csr.head_shared = head_shared;
  return from_bsr(shape, csr, std::move(pred), exec);
}

}  // namespace user_mask
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
