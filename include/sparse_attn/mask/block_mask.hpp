/// @file
/// THE common sparsity interface. A prefill mask answers, per query head h and query block qb:
/// which key blocks to visit (ascending), and for each whether every element is allowed (full) or
/// an element predicate must be evaluated (partial). Kernels are templated on the mask type, so
/// closed-form patterns (patterns.hpp) compile to arithmetic and index-list masks (BlockListMask,
/// below) pay one indirection per block, never per element.
///
/// A mask type M provides:
/// @code
///   const MaskShape& shape() const;
///   bool head_shared() const;                  // same pattern for every query head
///   template <class F> void for_each_block(index_t h, index_t qb, F&& f) const;
///                                              // f(index_t kb, bool full), kb ascending
///   bool allowed_in_block(index_t h, index_t qi, index_t kj) const;
///                                              // element test the kernel evaluates inside a
///                                              // listed partial block (only asked there)
///   bool allowed(index_t h, index_t qi, index_t kj) const;
///                                              // exact query: does the kernel compute the pair
///                                              // (listed block, and full or allowed_in_block)
///   index_t pairs() const;                     // allowed (query, key) pairs over all heads
/// @endcode
/// allowed() answers for exactly the pairs the kernel computes (so a mask dumped through it, or
/// through to_dense, is the mask that runs); allowed_in_block() may answer true for pairs of
/// blocks that are not listed, it is never asked about them.
/// Query index qi is in [0, n_q); its absolute position is qi + n_k - n_q (queries are a suffix of
/// the keys, as in chunked prefill). Query blocks tile [0, n_q); key blocks tile [0, n_k).
/// See docs/DESIGN.md, section "The mask interface".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Geometry every mask shares. A plain value; the accessors are O(1), unchecked and never throw
/// (call validate() first).
struct MaskShape {
  index_t heads = 1;      ///< Query heads the mask is defined for.
  index_t n_q = 0;        ///< Queries (a suffix of the keys).
  index_t n_k = 0;        ///< Keys.
  index_t block_q = 64;   ///< Query block (kernel tile) size, in tokens.
  index_t block_k = 64;   ///< Key block size, in tokens.
  bool causal = true;     ///< Key j visible to query i only if j <= position(i).

  /// @return the absolute position of query 0, n_k - n_q.
  index_t q_offset() const { return n_k - n_q; }  // absolute position of query 0
  // ceil(n / b) without forming n + b - 1, which overflows for a huge block size.
  /// @return ceil(n_q / block_q).
  index_t num_q_blocks() const { return n_q == 0 ? 0 : (n_q - 1) / block_q + 1; }
  /// @return ceil(n_k / block_k).
  index_t num_k_blocks() const { return n_k == 0 ? 0 : (n_k - 1) / block_k + 1; }
  /// @param qb query block.
  /// @return its first query index, qb x block_q.
  index_t q_begin(index_t qb) const { return qb * block_q; }
  /// @param qb query block.
  /// @return one past its last query index (clipped to n_q).
  index_t q_end(index_t qb) const { return std::min(n_q, (qb + 1) * block_q); }
  /// @param kb key block.
  /// @return its first key index, kb x block_k.
  index_t k_begin(index_t kb) const { return kb * block_k; }
  /// @param kb key block.
  /// @return one past its last key index (clipped to n_k).
  index_t k_end(index_t kb) const { return std::min(n_k, (kb + 1) * block_k); }
  /// Pairs dense attention of this causality computes, over all heads (the CR reference).
  /// @return heads x n_q x n_k, or for causal heads x (n_q (off + 1) + n_q (n_q - 1) / 2) with
  ///         off = q_offset(); exact in int64 for validated shapes.
  index_t dense_pairs() const {
    if (!causal) return heads * n_q * n_k;
    // query i sees min(i + off + 1, n_k) = i + off + 1 keys (off >= 0).
    const index_t off = q_offset();
    return heads * (n_q * (off + 1) + n_q * (n_q - 1) / 2);
  }

  /// Checks the geometry.
  /// @param where entry point, prefix of the message.
  /// @throws sparse_attn::invalid_argument when heads < 1, n_q or n_k < 0, n_q > n_k, a block
  ///         size is outside [1, 2^31 - 1], or heads x n_q x n_k exceeds 2^63 - 1.
  void validate(const char* where) const {
    require(heads >= 1, where, ": heads must be >= 1, got ", heads);
    require(n_q >= 0 && n_k >= 0, where, ": n_q and n_k must be >= 0, got n_q=", n_q, ", n_k=", n_k);
    require(n_q <= n_k, where, ": n_q=", n_q, " > n_k=", n_k,
            "; queries must be a suffix of the keys (n_q <= n_k)");
    // The caps keep n + block - 1 (ceil divisions) and p + 1 far from int64 overflow.
    require(n_k < (index_t{1} << 62), where, ": n_k must be < 2^62 (block arithmetic), got ", n_k);
    constexpr index_t kMaxBlock = (index_t{1} << 31) - 1;
    require(block_q >= 1 && block_k >= 1 && block_q <= kMaxBlock && block_k <= kMaxBlock, where,
            ": block sizes must be in [1, 2^31 - 1], got block_q=", block_q, ", block_k=", block_k);
    // pairs() and dense_pairs() are int64: heads x n_q x n_k must not wrap.
    require(detail::bounded_product(std::numeric_limits<index_t>::max(), {heads, n_q, n_k}) >= 0,
            where, ": heads x n_q x n_k = ", heads, " x ", n_q, " x ", n_k,
            " pairs exceed 2^63 - 1 (pair counts are int64)");
  }
};

/// Compression ratio: dense pairs of the same causality / allowed pairs (inf when none allowed).
/// @param dense_pairs pairs of dense attention (MaskShape::dense_pairs()).
/// @param pairs pairs the sparse mask computes.
/// @return dense_pairs / pairs; 1 when both are 0, +inf when only pairs is 0. Never throws.
inline double compression_ratio(index_t dense_pairs, index_t pairs) {
  if (pairs == 0) return dense_pairs == 0 ? 1.0 : std::numeric_limits<double>::infinity();
  return static_cast<double>(dense_pairs) / static_cast<double>(pairs);
}

/// Counts allowed pairs of any mask by walking its blocks (partial blocks element by element), on
/// `executor`. An exception of the mask's predicate reaches the caller (after the loop).
/// @tparam Mask any type of the mask interface.
/// @param m the mask.
/// @param executor runs groups of 4 (head, query block) rows in parallel.
/// @return the allowed pairs over all heads (a head-shared mask counts one head x heads).
/// @throws sparse_attn::invalid_argument on executor faults (run_items()); what the predicate
///         throws; std::bad_alloc (one index_t per item of scratch).
/// O(listed full blocks + elements of listed partial blocks) for the counted heads.
template <class Mask>
index_t count_pairs(const Mask& m, Executor& executor) {
  const MaskShape& s = m.shape();
  const index_t nh = m.head_shared() ? 1 : s.heads;
  const index_t nqb = s.num_q_blocks(), rows = nh * nqb;
  // 4 rows (head, query block) per item: a row may be one cheap full block or many partial ones.
  constexpr index_t kRowsPerItem = 4;
  const index_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  std::vector<index_t> partial(static_cast<std::size_t>(items), 0);  // pairs of each item
  run_chunks(executor, rows, kRowsPerItem, [&](index_t r0, index_t r1, int) {
    index_t total = 0;
    for (index_t row = r0; row < r1; ++row) {
      const index_t h = row / nqb, qb = row % nqb;
      const index_t q0 = s.q_begin(qb), q1 = s.q_end(qb);
      m.for_each_block(h, qb, [&](index_t kb, bool full) {
        const index_t k0 = s.k_begin(kb), k1 = s.k_end(kb);
        if (full) {
          total += (q1 - q0) * (k1 - k0);
          return;
        }
        for (index_t i = q0; i < q1; ++i)
          for (index_t j = k0; j < k1; ++j) total += m.allowed_in_block(h, i, j) ? 1 : 0;
      });
    }
    partial[static_cast<std::size_t>(r0 / kRowsPerItem)] = total;
  });
  index_t total = 0;
  for (index_t p : partial) total += p;
  return m.head_shared() ? total * s.heads : total;
}

/// count_pairs() on the caller's executor, or the default one for `exec.num_threads`.
/// @param m the mask.
/// @param exec executor choice.
/// @return the allowed pairs over all heads.
/// @throws as count_pairs(const Mask&, Executor&), and sparse_attn::invalid_argument when
///         exec.num_threads < 0.
template <class Mask>
index_t count_pairs(const Mask& m, const ExecutorChoice& exec = {}) {
  return sparse_attn::detail::with_executor(exec, [&](Executor& e) { return count_pairs(m, e); });
}

/// Element predicate that allows everything (block lists whose partial blocks differ from full
/// ones only by causality).
///
/// A predicate of BlockListMask is callable as pred(h, qi, kj) -> bool and has a static constexpr
/// bool `trivial` (BlockListBuilder::build keeps full flags only for trivial predicates).
struct AllowAll {
  static constexpr bool trivial = true;  ///< Allows every element: full blocks need no test.
  /// @return true for every (head, query, key).
  bool operator()(index_t, index_t, index_t) const noexcept { return true; }
};

namespace detail {
/// The one check of a block-CSR entry (BlockListBuilder::build and methods::UserMask both call it):
/// key block kb, at entry e of row (h, qb) whose previous key block is prev (-1: first entry),
/// must be in [0, num_k_blocks), above prev (rows are strictly increasing: sorted, no duplicates)
/// and, when causal, not start after the query block's last position. `array` names the caller's
/// array in the message ("col_indices"), nullptr for none.
inline void check_block_entry(const MaskShape& s, const char* where, const char* array, index_t e,
                              index_t h, index_t qb, index_t prev, index_t kb) {
  auto fail = [&](const auto&... what) {
    raise_invalid_argument(detail::concat(where, ": ",
                                          array != nullptr
                                              ? detail::concat(array, "[", e, "] = ", kb, ", ")
                                              : std::string(),
                                          "head ", h, ", query block ", qb, ": ", what...));
  };
  const index_t nkb = s.num_k_blocks();
  if (kb < 0 || kb >= nkb) fail("key block ", kb, " out of range [0, ", nkb, ")");
  if (prev == kb)
    fail("key block ", kb, " repeats the previous entry; key blocks of a row must be unique, ",
         "strictly increasing (got ", prev, " then ", kb, ")");
  if (prev > kb)
    fail("key blocks of a row must be sorted ascending, strictly increasing (got ", prev, " then ",
         kb, ")");
  if (s.causal) {
    const index_t last_pos = s.q_end(qb) - 1 + s.q_offset();
    if (s.k_begin(kb) > last_pos)
      fail("key block ", kb, " starts at key ", s.k_begin(kb),
           " after the block's last query position ", last_pos,
           "; a causal mask allows key blocks [0, ", last_pos / s.block_k,
           "] and may not list future blocks");
  }
}

/// The one check of a whole block-CSR layout (BlockListMask's constructor and methods::UserMask
/// call it before they read an entry): row_offsets has rows + 1 entries (rows = num_q_blocks x
/// (head_shared ? 1 : heads)), starts at 0, never decreases and ends at the number of key-block
/// entries; `full_size` is 0 or one flag per entry (`full_optional`; else exactly one per entry);
/// every entry passes check_block_entry. `off` and `col` are indexable by index_t (pointers, ArrayRef) of
/// any integer type; a value beyond int64 wraps negative and is rejected as such.
template <class Off, class Col>
void validate_block_csr(const MaskShape& s, bool head_shared, const Off& off, index_t off_size,
                        const Col& col, index_t col_size, index_t full_size, bool full_optional,
                        const char* where, const char* col_name) {
  s.validate(where);
  const index_t nqb = s.num_q_blocks(), layout_heads = head_shared ? 1 : s.heads;
  // rows + 1 cannot overflow: nqb <= n_q < 2^63 and the product is checked by division.
  require(nqb == 0 || layout_heads <= (std::numeric_limits<index_t>::max() - 1) / nqb, where,
          ": ", layout_heads, " heads x ", nqb, " query blocks overflow int64");
  const index_t rows = layout_heads * nqb;
  require(off_size == rows + 1, where, ": row_offsets has ", off_size,
          " entries; expected rows + 1 = ", rows + 1, " (", layout_heads,
          head_shared ? " shared head" : " heads", " x ", nqb, " query blocks of ", s.block_q,
          " + 1)");
  require(col_size >= 0, where, ": ", col_name, " has negative size ", col_size);
  require(static_cast<index_t>(off[0]) == 0, where, ": row_offsets[0] must be 0, got ",
          static_cast<index_t>(off[0]));
  for (index_t r = 0; r < rows; ++r)
    require(static_cast<index_t>(off[r + 1]) >= static_cast<index_t>(off[r]), where,
            ": row_offsets must be non-decreasing, but row_offsets[", r + 1, "] = ",
            static_cast<index_t>(off[r + 1]), " < row_offsets[", r, "] = ",
            static_cast<index_t>(off[r]));
  require(static_cast<index_t>(off[rows]) == col_size, where, ": row_offsets[", rows, "] = ",
          static_cast<index_t>(off[rows]), " must equal the size of ", col_name, " (", col_size,
          ")");
  require(full_size == col_size || (full_optional && full_size == 0), where, ": full has ",
          full_size, " flags; expected ", full_optional ? "none or " : "", "one per ", col_name,
          " entry (", col_size, ")");
  for (index_t r = 0; r < rows; ++r) {
    index_t prev = -1;
    for (index_t e = static_cast<index_t>(off[r]); e < static_cast<index_t>(off[r + 1]); ++e) {
      const index_t kb = static_cast<index_t>(col[e]);  // huge unsigned values wrap negative
      check_block_entry(s, where, col_name, e, r / nqb, r % nqb, prev, kb);
      prev = kb;
    }
  }
}
}  // namespace detail

/// Index-list mask in block-CSR form: for each (head, query block) a sorted list of key blocks,
/// each flagged full or partial; partial blocks test causality (if causal) and `pred`.
///
/// Owns its arrays (3 vectors: rows + 1 offsets, one int32 block index and one flag byte per
/// listed block). Immutable after construction: const members may be called from any number of
/// threads at once (if the predicate's operator() allows it).
/// @tparam Pred element predicate of the partial blocks (see AllowAll).
template <class Pred = AllowAll>
class BlockListMask {
 public:
  /// An empty mask (default MaskShape, no blocks, 0 pairs).
  BlockListMask() = default;
  /// Takes block-CSR arrays (row r = h * num_q_blocks + qb; one head's rows when head_shared):
  /// key blocks of row r are blocks[row_offsets[r] .. row_offsets[r + 1]), strictly increasing,
  /// with one flag per entry (1 = full: every element computed, no element test). Everything is
  /// validated (detail::validate_block_csr; sparse_attn::invalid_argument prefixed
  /// "BlockListMask"); a full flag on a block that causality cuts is downgraded to partial (the
  /// kernel then tests causality and the predicate), as BlockListBuilder does.
  /// known_pairs >= 0: the caller's exact pair count (skips the O(listed blocks x b^2) count;
  /// checked against count_pairs in debug builds); < 0: counted here, on `exec`.
  /// @param shape the geometry (validated).
  /// @param head_shared one head's rows serve every query head.
  /// @param row_offsets rows + 1 non-decreasing offsets into blocks, starting at 0 and ending at
  ///        blocks.size(); rows = num_q_blocks x (head_shared ? 1 : heads).
  /// @param blocks key-block indices, each row strictly increasing, in [0, num_k_blocks), and when
  ///        causal not starting after the query block's last position.
  /// @param full one flag per entry of blocks (nonzero: full).
  /// @param pred the element predicate.
  /// @param known_pairs the exact pair count, or -1 to count.
  /// @param exec executor for the count.
  /// @throws sparse_attn::invalid_argument when the arrays break the rules above, known_pairs <
  ///         -1, or (debug builds) known_pairs differs from the count; what the predicate throws
  ///         while counting; std::bad_alloc.
  BlockListMask(MaskShape shape, bool head_shared, std::vector<index_t> row_offsets,
                std::vector<std::int32_t> blocks, std::vector<std::uint8_t> full, Pred pred = {},
                index_t known_pairs = -1, const ExecutorChoice& exec = {})
      : shape_(shape), shared_(head_shared), offsets_(std::move(row_offsets)),
        blocks_(std::move(blocks)), full_(std::move(full)), pred_(std::move(pred)) {
    detail::validate_block_csr(shape_, shared_, offsets_.data(), static_cast<index_t>(offsets_.size()),
                               blocks_.data(), static_cast<index_t>(blocks_.size()),
                               static_cast<index_t>(full_.size()), false, "BlockListMask",
                               "blocks");
    if (shape_.causal) {
      const index_t nqb = shape_.num_q_blocks();
      for (std::size_t r = 0; r + 1 < offsets_.size(); ++r) {
        const index_t first_pos = shape_.q_begin(static_cast<index_t>(r) % nqb) + shape_.q_offset();
        for (auto e = static_cast<std::size_t>(offsets_[r]); e < static_cast<std::size_t>(offsets_[r + 1]); ++e)
          if (shape_.k_end(blocks_[e]) - 1 > first_pos) full_[e] = 0;  // causality cuts the block
      }
    }
    require(known_pairs >= -1, "BlockListMask", ": known_pairs must be >= 0 (or -1 = count), got ",
            known_pairs);
    if (known_pairs >= 0) {
      pairs_ = known_pairs;
#ifndef NDEBUG
      const index_t counted = count_pairs(*this, exec);
      require(pairs_ == counted, "BlockListMask", "known_pairs ", known_pairs,
              " differs from the mask's own count ", counted);
#endif
    } else {
      pairs_ = count_pairs(*this, exec);
    }
  }

  /// @return the geometry the mask was built for.
  const MaskShape& shape() const { return shape_; }
  /// @return true when one set of rows serves every query head.
  bool head_shared() const { return shared_; }
  /// @return the element predicate.
  const Pred& predicate() const { return pred_; }

  /// Visits row (h, qb)'s listed blocks; a row outside the geometry (h not in [0, heads), qb
  /// not in [0, num_q_blocks)) lists nothing.
  /// @param h query head.
  /// @param qb query block.
  /// @param f called as f(index_t kb, bool full) for each listed key block, kb ascending.
  template <class F>
  void for_each_block(index_t h, index_t qb, F&& f) const {
    if (!in_geometry(h, qb)) return;
    const auto row = static_cast<std::size_t>((shared_ ? 0 : h) * shape_.num_q_blocks() + qb);
    for (auto e = static_cast<std::size_t>(offsets_[row]); e < static_cast<std::size_t>(offsets_[row + 1]); ++e)
      f(index_t{blocks_[e]}, full_[e] != 0);
  }
  /// @param h query head.
  /// @param qb query block.
  /// @return the number of key blocks listed for row (h, qb); 0 outside the geometry.
  index_t num_blocks(index_t h, index_t qb) const {
    if (!in_geometry(h, qb)) return 0;
    const auto row = static_cast<std::size_t>((shared_ ? 0 : h) * shape_.num_q_blocks() + qb);
    return offsets_[row + 1] - offsets_[row];
  }
  /// The element test of a listed partial block: causality, then the predicate. noexcept when
  /// the predicate is: the prefill kernel then calls it inline, else it evaluates the partial
  /// blocks first so a throw leaves the outputs untouched.
  /// @param h query head.
  /// @param qi query index in [0, n_q).
  /// @param kj key index in [0, n_k).
  /// @return whether the element is computed, given that its block is listed as partial.
  bool allowed_in_block(index_t h, index_t qi, index_t kj) const
      noexcept(noexcept(std::declval<const Pred&>()(index_t{}, index_t{}, index_t{}))) {
    if (shape_.causal && kj > qi + shape_.q_offset()) return false;
    return pred_(h, qi, kj);
  }
  /// Does the kernel compute pair (qi, kj) of query head h: kj's key block is listed for qi's
  /// query block (binary search, O(log listed blocks)) and is full or passes allowed_in_block.
  /// false for indices outside the mask's geometry.
  /// @param h query head.
  /// @param qi query index.
  /// @param kj key index.
  /// @return whether the kernel computes the pair.
  bool allowed(index_t h, index_t qi, index_t kj) const
      noexcept(noexcept(std::declval<const Pred&>()(index_t{}, index_t{}, index_t{}))) {
    if (!in_geometry(h, qi < 0 ? -1 : qi / shape_.block_q) || qi >= shape_.n_q || kj < 0 ||
        kj >= shape_.n_k)
      return false;
    const auto row = static_cast<std::size_t>((shared_ ? 0 : h) * shape_.num_q_blocks() +
                                              qi / shape_.block_q);
    const std::int32_t* b = blocks_.data();
    const std::int32_t* first = b + offsets_[row];
    const std::int32_t* last = b + offsets_[row + 1];
    const auto kb = static_cast<std::int32_t>(kj / shape_.block_k);
    const std::int32_t* p = std::lower_bound(first, last, kb);
    if (p == last || *p != kb) return false;
    return full_[static_cast<std::size_t>(p - b)] != 0 || allowed_in_block(h, qi, kj);
  }
  /// @return the allowed (query, key) pairs over all heads (counted or given at construction).
  index_t pairs() const { return pairs_; }
  /// @return compression_ratio(shape().dense_pairs(), pairs()).
  double compression() const { return compression_ratio(shape_.dense_pairs(), pairs_); }
  /// Raw CSR arrays (row = head * num_q_blocks + qb; a single head when head_shared).
  /// @return the rows + 1 offsets into block_indices().
  const std::vector<index_t>& row_offsets() const { return offsets_; }
  /// @return the key-block index of each entry.
  const std::vector<std::int32_t>& block_indices() const { return blocks_; }
  /// @return the full flag of each entry (after the causal downgrade).
  const std::vector<std::uint8_t>& full_flags() const { return full_; }

 private:
  bool in_geometry(index_t h, index_t qb) const noexcept {
    return h >= 0 && h < shape_.heads && qb >= 0 && qb < shape_.num_q_blocks();
  }
  MaskShape shape_;
  bool shared_ = false;
  std::vector<index_t> offsets_{0};
  std::vector<std::int32_t> blocks_;
  std::vector<std::uint8_t> full_;
  Pred pred_;
  index_t pairs_ = 0;
};

/// Builds a BlockListMask row by row. Rows may be filled in parallel (each row by one thread);
/// build() validates (sorted, unique, in range, block-causal when causal) and packs to CSR.
/// Not thread-safe otherwise: add() and set_row() on distinct rows may run concurrently, nothing
/// may run concurrently with build().
class BlockListBuilder {
 public:
  /// One empty row per (head, query block), or per query block when head_shared.
  /// @param shape the geometry.
  /// @param head_shared rows of head 0 serve every query head.
  /// @throws sparse_attn::invalid_argument when shape.validate() fails; std::bad_alloc.
  BlockListBuilder(MaskShape shape, bool head_shared) : shape_(shape), shared_(head_shared) {
    shape_.validate("BlockListBuilder");
    rows_.resize(static_cast<std::size_t>((shared_ ? 1 : shape_.heads) * shape_.num_q_blocks()));
  }
  /// @return the geometry.
  const MaskShape& shape() const { return shape_; }
  /// Key block kb of (h, qb); `full` = every element allowed without testing the predicate
  /// (the mask downgrades a full flag to partial where causality cuts the block).
  /// Blocks must be added in ascending order; build() checks it.
  /// @param h query head (0 when head_shared).
  /// @param qb query block.
  /// @param kb key block (checked by build()).
  /// @param full the block's full flag (kept only for a trivial predicate, see build()).
  /// @throws sparse_attn::invalid_argument when h or qb is out of range; std::bad_alloc.
  void add(index_t h, index_t qb, index_t kb, bool full = true) {
    rows_[static_cast<std::size_t>(row(h, qb))].push_back({kb, full});
  }
  /// Replaces the row with blocks (sorted ascending), all flagged `full`.
  /// @param h query head (0 when head_shared).
  /// @param qb query block.
  /// @param kbs the row's key blocks, ascending (checked by build()).
  /// @param full the flag of every block.
  /// @throws sparse_attn::invalid_argument when h or qb is out of range; std::bad_alloc.
  void set_row(index_t h, index_t qb, const std::vector<index_t>& kbs, bool full = true) {
    auto& r = rows_[static_cast<std::size_t>(row(h, qb))];
    r.clear();
    for (index_t kb : kbs) r.push_back({kb, full});
  }

  /// known_pairs: see BlockListMask's constructor (< 0: count the pairs, on `exec`).
  /// Full flags are kept only when Pred::trivial; with any other predicate every block is partial,
  /// so the predicate is evaluated on all of them. The builder keeps its rows (it may build again).
  /// @tparam Pred element predicate (see AllowAll).
  /// @param pred the predicate.
  /// @param known_pairs the exact pair count, or -1 to count.
  /// @param exec executor for the count.
  /// @return the mask.
  /// @throws sparse_attn::invalid_argument when a row is not strictly increasing, a block is out
  ///         of range or (causal) in the future of its query block, or as BlockListMask's
  ///         constructor; std::bad_alloc.
  template <class Pred = AllowAll>
  BlockListMask<Pred> build(Pred pred = {}, index_t known_pairs = -1,
                            const ExecutorChoice& exec = {}) {
    const index_t nqb = shape_.num_q_blocks();
    std::vector<index_t> offsets(rows_.size() + 1, 0);
    for (std::size_t r = 0; r < rows_.size(); ++r) {
      const index_t qb = static_cast<index_t>(r) % nqb, h = static_cast<index_t>(r) / nqb;
      const auto& blocks = rows_[r];
      for (std::size_t e = 0; e < blocks.size(); ++e)  // (before the int32 packing below)
        detail::check_block_entry(shape_, "BlockListBuilder::build", nullptr,
                                  static_cast<index_t>(e), h, qb, e > 0 ? blocks[e - 1].kb : -1,
                                  blocks[e].kb);
      offsets[r + 1] = offsets[r] + static_cast<index_t>(blocks.size());
    }
    std::vector<std::int32_t> idx(static_cast<std::size_t>(offsets.back()));
    std::vector<std::uint8_t> full(idx.size());
    for (std::size_t r = 0; r < rows_.size(); ++r)
      for (std::size_t e = 0; e < rows_[r].size(); ++e) {
        idx[static_cast<std::size_t>(offsets[r]) + e] = static_cast<std::int32_t>(rows_[r][e].kb);
        full[static_cast<std::size_t>(offsets[r]) + e] =
            (rows_[r][e].full && Pred::trivial) ? 1 : 0;
      }
    return BlockListMask<Pred>(shape_, shared_, std::move(offsets), std::move(idx), std::move(full),
                               std::move(pred), known_pairs, exec);
  }

 private:
  struct Entry {
    index_t kb;  // validated by build() before it is packed to int32
    bool full;
  };
  index_t row(index_t h, index_t qb) const {
    require(qb >= 0 && qb < shape_.num_q_blocks(), "BlockListBuilder::add", "query block ", qb,
            " out of range [0, ", shape_.num_q_blocks(), ")");
    require(shared_ ? h == 0 : (h >= 0 && h < shape_.heads), "BlockListBuilder::add", "head ", h,
            " out of range (", shared_ ? "head-shared mask: only head 0" : "heads ", shape_.heads,
            ")");
    return h * shape_.num_q_blocks() + qb;
  }
  MaskShape shape_;
  bool shared_;
  std::vector<std::vector<Entry>> rows_;
};

/// Materialises head h of any mask as a dense [n_q x n_k] boolean matrix (tests, debugging).
/// @param m the mask.
/// @param h query head.
/// @return true where the kernel computes the pair; allocates n_q x n_k bytes.
/// @throws sparse_attn::invalid_argument when h is outside [0, heads); what the predicate throws;
///         std::bad_alloc. Serial, O(n_q x n_k + elements of listed blocks).
template <class Mask>
Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> to_dense(const Mask& m, index_t h) {
  const MaskShape& s = m.shape();
  require(h >= 0 && h < s.heads, "to_dense", ": head ", h, " out of range [0, ", s.heads, ")");
  Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic> d =
      Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>::Constant(s.n_q, s.n_k, false);
  const index_t hh = m.head_shared() ? 0 : h;
  for (index_t qb = 0; qb < s.num_q_blocks(); ++qb)
    m.for_each_block(hh, qb, [&](index_t kb, bool full) {
      for (index_t i = s.q_begin(qb); i < s.q_end(qb); ++i)
        for (index_t j = s.k_begin(kb); j < s.k_end(kb); ++j)
          d(i, j) = full || m.allowed_in_block(hh, i, j);
    });
  return d;
}

SPARSE_ATTN_NAMESPACE_END
