/// @file
/// LineMask: a causal mask made of lines. Per query head h, a set C_h of key columns (vertical
/// lines) and a set D_h of diagonal offsets (slash lines); the query at position p sees key j iff
///
///   j <= p  and  (j in C_h  or  p - j in D_h).
///
/// It implements the mask interface (block_mask.hpp: the blocks holding an allowed element, all
/// partial, and the element test), so generic code (to_dense, count_pairs, the float64 oracle)
/// reads it like any mask; the prefill kernel recognises it (kernel::is_line_mask) and executes
/// it without an element test in its hot loops: the columns of C_h gathered into dense K/V tiles
/// (a causal cut on the last tile only); the diagonals of D_h as banded dense blocks: for a
/// query tile at positions [p0, p0 + 64) and window m the keys [p0 - 64 m, p0 - 64 m + 64) hold
/// the diagonals p0 - j in (64 m - 64, 64 m + 64), so a window whose diagonals hold >= 30% of its
/// pairs runs through the dense micro-kernel with a 64-bit lane mask per key (one shifted read of
/// the offset bits); the other diagonals' lanes as dot products against a transposed K/V. A key
/// that is a column of C_h is skipped by both, so a pair covered by both counts once. See kernel/prefill.hpp and docs/DESIGN.md, section "The mask interface".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/mask/block_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Causal mask of vertical lines (key columns) and diagonal lines (offsets p - j) per query head.
/// Immutable after construction: const members may be called from any number of threads.
/// Memory: 2 x heads x n_k flag bytes, plus one int32 per column and per offset.
class LineMask {
 public:
  /// An empty mask (default MaskShape, no lines, 0 pairs).
  LineMask() = default;
  /// Takes per-head flags: column_flags[h * n_k + j] != 0 makes key column j a line of head h,
  /// offset_flags[h * n_k + delta] != 0 makes diagonal delta (query position minus key index)
  /// one. O(heads x n_k).
  /// @param shape the geometry; must be causal. Its block sizes only set the blocks that
  ///        for_each_block lists (the kernel's query tile is block_q).
  /// @param column_flags heads x n_k bytes.
  /// @param offset_flags heads x n_k bytes.
  /// @throws sparse_attn::invalid_argument when the shape is invalid or not causal, n_k >= 2^31,
  ///         or a flag array does not hold heads x n_k entries; std::bad_alloc.
  LineMask(MaskShape shape, std::vector<std::uint8_t> column_flags,
           std::vector<std::uint8_t> offset_flags)
      : shape_(shape), col_flags_(std::move(column_flags)), off_flags_(std::move(offset_flags)) {
    constexpr const char* where = "LineMask";
    shape_.validate(where);
    require(shape_.causal, where, ": a line mask is causal (shape.causal must be true)");
    require(shape_.n_k <= std::numeric_limits<std::int32_t>::max(), where,
            ": n_k must be < 2^31 (columns and offsets are int32), got ", shape_.n_k);
    const auto cells = static_cast<std::size_t>(shape_.heads * shape_.n_k);
    require(col_flags_.size() == cells && off_flags_.size() == cells, where,
            ": flag arrays must hold heads x n_k = ", shape_.heads * shape_.n_k,
            " entries, got ", col_flags_.size(), " and ", off_flags_.size());
    const index_t n = shape_.n_k, off = shape_.q_offset();
    col_begin_.assign(1, 0);
    off_begin_.assign(1, 0);
    std::vector<index_t> off_prefix(static_cast<std::size_t>(n + 1));
    for (index_t h = 0; h < shape_.heads; ++h) {
      const std::uint8_t* cf = col_flags_.data() + h * n;
      const std::uint8_t* of = off_flags_.data() + h * n;
      off_prefix[0] = 0;
      for (index_t j = 0; j < n; ++j) {
        if (cf[j]) cols_.push_back(static_cast<std::int32_t>(j));
        if (of[j]) offs_.push_back(static_cast<std::int32_t>(j));
        off_prefix[static_cast<std::size_t>(j + 1)] = off_prefix[static_cast<std::size_t>(j)] + (of[j] ? 1 : 0);
      }
      col_begin_.push_back(static_cast<index_t>(cols_.size()));
      off_begin_.push_back(static_cast<index_t>(offs_.size()));
      // Pairs: a line at index t (column j = t, or offset delta = t) is seen by the queries at
      // positions p in [max(t, off), n); a column's queries whose offset p - j is a line too
      // were counted twice.
      for (index_t t = 0; t < n; ++t) {
        if (of[t]) pairs_ += n - std::max(t, off);
        if (cf[t]) {
          pairs_ += n - std::max(t, off);
          const index_t a = std::max(t, off) - t, b = n - t;  // offsets of those queries
          pairs_ -= off_prefix[static_cast<std::size_t>(b)] - off_prefix[static_cast<std::size_t>(a)];
        }
      }
    }
  }

  /// @return the geometry.
  const MaskShape& shape() const { return shape_; }
  /// @return false: every head has its own lines.
  bool head_shared() const { return false; }

  /// Visits the key blocks of row (h, qb) that hold an allowed element (all partial); a row
  /// outside the geometry lists nothing. O(key blocks x log lines).
  /// @param h query head.
  /// @param qb query block.
  /// @param f called as f(index_t kb, bool full = false), kb ascending.
  template <class F>
  void for_each_block(index_t h, index_t qb, F&& f) const {
    if (h < 0 || h >= shape_.heads || qb < 0 || qb >= shape_.num_q_blocks()) return;
    const index_t p0 = shape_.q_begin(qb) + shape_.q_offset();
    const index_t p1 = shape_.q_end(qb) - 1 + shape_.q_offset();
    const index_t last = std::min(shape_.num_k_blocks() - 1, p1 / shape_.block_k);
    for (index_t kb = 0; kb <= last; ++kb) {
      const index_t k0 = shape_.k_begin(kb), k1 = shape_.k_end(kb);
      // A column j in the block with j <= p1, or an offset p - j with p in [p0, p1], j in block.
      if (count_in(columns(h), num_columns(h), k0, std::min(k1, p1 + 1)) > 0 ||
          count_in(offsets(h), num_offsets(h), std::max<index_t>(0, p0 - k1 + 1), p1 - k0 + 1) > 0)
        f(kb, false);
    }
  }
  /// The element test (causality, then the lines). O(1), noexcept.
  /// @param h query head.
  /// @param qi query index in [0, n_q).
  /// @param kj key index in [0, n_k).
  /// @return whether the pair is allowed.
  bool allowed_in_block(index_t h, index_t qi, index_t kj) const noexcept {
    const index_t delta = qi + shape_.q_offset() - kj;
    return delta >= 0 && (is_column(h, kj) || is_offset(h, delta));
  }
  /// Does the kernel compute pair (qi, kj) of head h; false outside the geometry.
  /// @param h query head.
  /// @param qi query index.
  /// @param kj key index.
  /// @return whether the pair is allowed.
  bool allowed(index_t h, index_t qi, index_t kj) const noexcept {
    if (h < 0 || h >= shape_.heads || qi < 0 || qi >= shape_.n_q || kj < 0 || kj >= shape_.n_k) return false;
    return allowed_in_block(h, qi, kj);
  }
  /// @return the allowed (query, key) pairs over all heads (exact, counted at construction).
  index_t pairs() const { return pairs_; }
  /// @return compression_ratio(shape().dense_pairs(), pairs()).
  double compression() const { return compression_ratio(shape_.dense_pairs(), pairs_); }

  /// @param h query head (unchecked).
  /// @param j key index in [0, n_k) (unchecked).
  /// @return whether key column j is a line of head h.
  bool is_column(index_t h, index_t j) const noexcept {
    return col_flags_[static_cast<std::size_t>(h * shape_.n_k + j)] != 0;
  }
  /// @param h query head (unchecked).
  /// @param delta offset in [0, n_k) (unchecked).
  /// @return whether diagonal delta is a line of head h.
  bool is_offset(index_t h, index_t delta) const noexcept {
    return off_flags_[static_cast<std::size_t>(h * shape_.n_k + delta)] != 0;
  }
  /// @param h query head (unchecked).
  /// @return head h's column flags, n_k bytes.
  const std::uint8_t* column_flags(index_t h) const { return col_flags_.data() + h * shape_.n_k; }
  /// @param h query head (unchecked).
  /// @return head h's offset flags, n_k bytes.
  const std::uint8_t* offset_flags(index_t h) const { return off_flags_.data() + h * shape_.n_k; }
  /// @param h query head (unchecked).
  /// @return head h's columns, ascending (num_columns(h) of them).
  const std::int32_t* columns(index_t h) const { return cols_.data() + col_begin_[static_cast<std::size_t>(h)]; }
  /// @param h query head (unchecked).
  /// @return how many columns head h has.
  index_t num_columns(index_t h) const {
    return col_begin_[static_cast<std::size_t>(h) + 1] - col_begin_[static_cast<std::size_t>(h)];
  }
  /// @param h query head (unchecked).
  /// @return head h's offsets, ascending (num_offsets(h) of them).
  const std::int32_t* offsets(index_t h) const { return offs_.data() + off_begin_[static_cast<std::size_t>(h)]; }
  /// @param h query head (unchecked).
  /// @return how many offsets head h has.
  index_t num_offsets(index_t h) const {
    return off_begin_[static_cast<std::size_t>(h) + 1] - off_begin_[static_cast<std::size_t>(h)];
  }
  /// @return the columns of every head together (the kernel's gathered K/V rows).
  index_t total_columns() const { return static_cast<index_t>(cols_.size()); }
  /// @param h query head (unchecked).
  /// @return the index of head h's first column among total_columns().
  index_t first_column(index_t h) const { return col_begin_[static_cast<std::size_t>(h)]; }

  /// Lines in [a, b) of a sorted list (0 when b <= a). O(log n).
  /// @param list sorted values.
  /// @param n their count.
  /// @param a first value counted.
  /// @param b one past the last value counted.
  /// @return how many values of the list lie in [a, b).
  static index_t count_in(const std::int32_t* list, index_t n, index_t a, index_t b) {
    if (b <= a) return 0;
    return static_cast<index_t>(std::lower_bound(list, list + n, b) - std::lower_bound(list, list + n, a));
  }

 private:
  MaskShape shape_;
  std::vector<std::uint8_t> col_flags_, off_flags_;  // [heads][n_k]
  std::vector<std::int32_t> cols_, offs_;           // per head, ascending
  std::vector<index_t> col_begin_{0}, off_begin_{0};
  index_t pairs_ = 0;
};

SPARSE_ATTN_NAMESPACE_END
