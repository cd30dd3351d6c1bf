/// @file
/// A block mask supplied by the caller (an inference engine's own block-sparse layout), validated
/// and turned into the common BlockListMask so the common prefill kernel executes it. As a method
/// (UserMask) it holds that mask; select() checks the Q/K shapes against it and returns it with
/// its statistics. It takes compression budgets only (the mask is fixed): reachable iff the mask's
/// CR is within the target's tolerance.
///
/// Layout: block CSR over rows r = h * num_q_blocks + qb (a single head's rows when head_shared):
/// key blocks of row r are col_indices[row_offsets[r] .. row_offsets[r + 1]), strictly increasing.
/// Optional flags, one per entry: 1 = every element allowed (no element test beyond causality),
/// 0 = partial (the predicate `pred(h, qi, kj)` decides, as FlexAttention's mask_mod on partial
/// blocks). Without flags every block is full when the predicate is trivial (AllowAll) and partial
/// otherwise. Causality cuts are applied by the mask itself: a full block that crosses the diagonal
/// is downgraded to partial.
///
/// Validated (sparse_attn::invalid_argument naming the argument and the allowed range) by the one
/// block-CSR check of mask/block_mask.hpp (detail::validate_block_csr, which BlockListMask's own
/// constructor also runs): geometry, row_offsets size = rows + 1, starting at 0, non-decreasing,
/// ending at col_indices' size; flags empty or one per entry; key blocks in [0, num_k_blocks),
/// strictly increasing per row (sorted, no duplicates) and, when causal, not after the query
/// block's last position. Null arrays of non-zero size are refused.
///
/// Memory: a copy of the arrays (8 bytes per row, 5 bytes per entry); nothing per token.
/// Registry name "user_mask" (prefill; MethodInfo::needs_user_mask: the caller supplies the
/// mask). See docs/METHODS.md, section "user_mask".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/detail/selection.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// Non-owning (pointer, length) view of a caller array; implicit from std::vector.
/// The caller's array must outlive every use of the view; nothing is copied or checked here.
template <class T>
struct ArrayRef {
  const T* data = nullptr;  ///< first element (may be null when size is 0)
  index_t size = 0;         ///< number of elements
  ArrayRef() = default;
  /// @param p  first element.
  /// @param n  number of elements.
  ArrayRef(const T* p, index_t n) : data(p), size(n) {}
  /// Views a vector's elements (implicit).
  /// @param v  the vector; must outlive the view and not be resized meanwhile.
  ArrayRef(const std::vector<T>& v)  // NOLINT(google-explicit-constructor)
      : data(v.data()), size(static_cast<index_t>(v.size())) {}
  /// @param i  index, in [0, size) (unchecked).
  /// @return the element.
  const T& operator[](index_t i) const { return data[i]; }
};

/// Block-CSR layout handed in by an engine (any integer types for offsets and indices).
/// Rows are r = h * num_q_blocks + qb (qb alone when head_shared). Non-owning: the arrays must
/// live until the UserMask is built (it copies them).
/// @tparam Offset  integer type of row_offsets.
/// @tparam Index   integer type of col_indices.
template <class Offset = index_t, class Index = std::int32_t>
struct BlockCsr {
  ArrayRef<Offset> row_offsets;  ///< [rows + 1]; rows = num_q_blocks x (head_shared ? 1 : heads)
  ArrayRef<Index> col_indices;   ///< [row_offsets[rows]] key blocks, strictly increasing per row
  ArrayRef<std::uint8_t> full;   ///< empty, or one flag per entry: 1 = full block, 0 = partial
  bool head_shared = false;      ///< one layout for every query head
};

/// @cond SPARSE_ATTN_INTERNAL
namespace detail_um {
template <class P, class = void>
struct is_trivial_pred : std::false_type {};
template <class P>
struct is_trivial_pred<P, std::void_t<decltype(P::trivial)>> : std::bool_constant<P::trivial> {};

/// Validates `csr` against `shape` and returns it as a BlockListMask<Pred> (the predicate decides
/// elements of partial blocks); the pairs are counted on `exec` (the predicate is called there;
/// an exception of it reaches the caller).
template <class Pred, class Offset, class Index>
BlockListMask<Pred> from_bsr(const MaskShape& shape, const BlockCsr<Offset, Index>& csr, Pred pred,
                             const ExecutorChoice& exec, const char* where) {
  static_assert(std::is_integral_v<Offset> && std::is_integral_v<Index>,
                "row_offsets and col_indices must hold integers");
  const auto& off = csr.row_offsets;
  const auto& col = csr.col_indices;
  require(off.size == 0 || off.data != nullptr, where, "row_offsets is null but has size ",
          off.size);
  require(col.size <= 0 || col.data != nullptr, where, "col_indices is null but has size ",
          col.size);
  require(csr.full.size <= 0 || csr.full.data != nullptr, where, "full is null but has size ",
          csr.full.size);
  sparse_attn::detail::validate_block_csr(shape, csr.head_shared, off, off.size, col, col.size,
                                          csr.full.size, true, where, "col_indices");
  // Validated: offsets fit the arrays and every key block is in [0, num_k_blocks) (fits int32).
  const std::size_t rows = static_cast<std::size_t>(off.size) - 1;
  std::vector<index_t> offsets(rows + 1);
  for (std::size_t r = 0; r <= rows; ++r)
    offsets[r] = static_cast<index_t>(off[static_cast<index_t>(r)]);
  std::vector<std::int32_t> blocks(static_cast<std::size_t>(col.size));
  std::vector<std::uint8_t> full(static_cast<std::size_t>(col.size));
  constexpr bool default_full = is_trivial_pred<Pred>::value;
  for (index_t e = 0; e < col.size; ++e) {
    blocks[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(col[e]);
    full[static_cast<std::size_t>(e)] = (csr.full.size > 0 ? csr.full[e] != 0 : default_full) ? 1 : 0;
  }
  return BlockListMask<Pred>(shape, csr.head_shared, std::move(offsets), std::move(blocks),
                             std::move(full), std::move(pred), -1, exec);
}
}  // namespace detail_um
/// @endcond

/// A caller-supplied block mask as a method; Pred decides the elements of partial blocks (UserMask:
/// none, every listed element allowed up to causality). Throws sparse_attn::invalid_argument
/// (prefixed "methods::UserMask") on any inconsistency of the layout. Once built it is immutable:
/// select() is const and may be called concurrently.
/// @tparam Pred  element predicate pred(h, qi, kj) of partial blocks (AllowAll: none).
template <class Pred = AllowAll>
struct BasicUserMask {
  static constexpr const char* name = "user_mask";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "a caller-supplied block mask (block CSR)";
  static constexpr BudgetUnit unit = BudgetUnit::none;  ///< takes no count budget
  static constexpr bool takes_user_mask = true;  ///< selects from the caller's mask, not from Q/K

  BlockListMask<Pred> mask;  ///< the validated mask

  /// An empty method (a default-constructed mask); the registry's instance, before a mask is set.
  BasicUserMask() = default;
  /// An already built mask (BlockListBuilder validated it).
  /// @param m  the mask; moved in.
  explicit BasicUserMask(BlockListMask<Pred> m) : mask(std::move(m)) {}
  /// Validates `csr` against `shape` and copies it; the pairs are counted on `exec`.
  /// @param shape  the geometry: heads, n_q, n_k, block sizes, causal.
  /// @param csr    the caller's layout (any integer types); copied.
  /// @param pred   the element predicate of partial blocks (called while counting pairs).
  /// @param exec   executor (or thread count) of the pair count.
  /// @throws sparse_attn::invalid_argument (prefixed "methods::UserMask") if an array is null
  ///         with a non-zero size or the layout fails the block-CSR check (see the file
  ///         comment); whatever pred throws.
  /// Complexity O(rows + entries) plus the pair count (the predicate on every element of the
  /// partial blocks); allocates the copy (8 bytes per row, 5 per entry).
  template <class Offset, class Index>
  BasicUserMask(const MaskShape& shape, const BlockCsr<Offset, Index>& csr, Pred pred = {},
           const ExecutorChoice& exec = {})
      : mask(detail_um::from_bsr(shape, csr, std::move(pred), exec, "methods::UserMask")) {}
  /// Convenience: std::vector arrays (index_t offsets, int32 key blocks).
  /// @param shape        the geometry.
  /// @param head_shared  one layout for every query head.
  /// @param row_offsets  [rows + 1] offsets into col_indices.
  /// @param col_indices  key blocks, strictly increasing per row.
  /// @param full         empty, or one flag per entry (1 = full, 0 = partial).
  /// @param pred         the element predicate of partial blocks.
  /// @param exec         executor (or thread count) of the pair count.
  /// @throws sparse_attn::invalid_argument as the BlockCsr constructor.
  BasicUserMask(const MaskShape& shape, bool head_shared, const std::vector<index_t>& row_offsets,
                const std::vector<std::int32_t>& col_indices,
                const std::vector<std::uint8_t>& full = {}, Pred pred = {},
                const ExecutorChoice& exec = {})
      : BasicUserMask(shape, csr_of(head_shared, row_offsets, col_indices, full), std::move(pred),
                 exec) {}

  /// No parameters: the mask is the method (the visitor is never called).
  template <class V>
  void visit_params(V&&) {}  // no parameters: the mask is the method

  /// The held mask for q over k, whose shapes must match it. Budget: compression only;
  /// reachable iff the mask's CR is within the target's tolerance.
  /// @param q       queries, [Hq, n_q, d] view; Hq and n_q must equal the mask's.
  /// @param k       keys, [Hkv, n_k, d] view; n_k must equal the mask's.
  /// @param budget  compression only (the mask is fixed).
  /// @param opt     the kernel's options; only opt.scale is validated.
  /// @return a copy of the mask and its statistics (detail "... listed blocks").
  /// @throws sparse_attn::invalid_argument if the budget is not a valid compression budget, the
  ///         views are invalid or inconsistent (head_dim, Hq % Hkv, n_q > n_k), opt.scale is
  ///         neither NaN nor finite > 0, or the shapes differ from the mask's.
  /// Complexity O(rows + entries) (the copy, which it allocates); q and k are not read.
  template <class QT, class KT>
  PrefillSelection<BlockListMask<Pred>> select(const TensorView<QT>& q, const TensorView<KT>& k,
                                               const Budget& budget = {},
                                               const AttentionOptions& opt = {}) const {
    constexpr const char* where = "methods::UserMask::select";
    PrefillSelection<BlockListMask<Pred>> r;
    SelectionTimer timer(r.stats);
    require_budget_kind(budget, true, false, false, where);
    detail::validate_qk(q, k, where);
    (void)kernel::resolve_scale(opt.scale, q.dim, where);
    const MaskShape& s = mask.shape();
    require(q.heads == s.heads && q.tokens == s.n_q && k.tokens == s.n_k, where,
            "q [Hq=", q.heads, ", n_q=", q.tokens, "] and k [n_k=", k.tokens,
            "] do not match the mask's shape (heads=", s.heads, ", n_q=", s.n_q, ", n_k=", s.n_k,
            ")");
    r.mask = mask;
    detail::finish_prefill(r.stats, r.mask, budget, true,
                           sparse_attn::detail::concat(r.mask.block_indices().size(),
                                                       " listed blocks"));
    return r;
  }

 private:
  static BlockCsr<index_t, std::int32_t> csr_of(bool head_shared, const std::vector<index_t>& off,
                                                const std::vector<std::int32_t>& col,
                                                const std::vector<std::uint8_t>& full) {
    BlockCsr<index_t, std::int32_t> csr;
    csr.row_offsets = off;
    csr.col_indices = col;
    csr.full = full;
    csr.head_shared = head_shared;
    return csr;
  }
};

/// The user mask without an element predicate (the registry's "user_mask").
using UserMask = BasicUserMask<>;

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
