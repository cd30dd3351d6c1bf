/// @file
/// Closed-form patterns: no index memory; block lists and element tests come from arithmetic.
/// One family covers dense causal, dense non-causal and sliding window with S sink tokens: each
/// query row at absolute position p allows the union of a sink prefix [0, S) and a band around p,
/// cut by causality (j <= p); tri-shape adds the last L query rows dense (docs/METHODS.md,
/// section "tri_shape"). See docs/METHODS.md, sections "dense" and "sliding_window and
/// streaming".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <limits>

#include "sparse_attn/mask/block_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Row-interval pattern. window == 0 means unlimited (dense). Causal band: p - W < j <= p.
/// Non-causal band: |p - j| < W. Sinks are the first `sinks` keys (cut by causality too).
///
/// Head-shared, a few words, no allocation; every member is const and never throws after
/// construction, so one mask may be read by any number of threads.
class IntervalMask {
 public:
  /// An empty mask (default MaskShape, dense, 0 pairs).
  IntervalMask() = default;
  /// A window of `window` keys plus `sinks` sink keys; a window of 0 or >= n_k is stored as plain
  /// dense (window() and sinks() then read 0). The last `dense_last_rows` query rows see every key
  /// (tri-shape: the rows that produce the first decoded token attend densely; 0 = none).
  /// @param shape the geometry (validated).
  /// @param window band width in keys, >= 0 (0: unlimited).
  /// @param sinks number of leading keys every query sees, >= 0.
  /// @param dense_last_rows L >= 0 last query rows computed densely (clamped to n_q).
  /// @throws sparse_attn::invalid_argument when shape.validate() fails or window, sinks or
  ///         dense_last_rows < 0.
  /// O(n_q) (the pair count), allocates nothing.
  IntervalMask(MaskShape shape, index_t window, index_t sinks, index_t dense_last_rows = 0)
      : shape_(shape), window_(window), sinks_(sinks) {
    shape_.validate("IntervalMask");
    require(window >= 0, "IntervalMask", "window must be >= 0 (0 = unlimited), got ", window);
    require(sinks >= 0, "IntervalMask", "sinks must be >= 0, got ", sinks);
    require(dense_last_rows >= 0, "IntervalMask", "dense_last_rows must be >= 0, got ",
            dense_last_rows);
    if (window_ == 0 || window_ >= shape_.n_k) {  // the band covers everything: plain dense
      window_ = 0;
      sinks_ = 0;
    } else {
      dense_from_ = shape_.n_q - std::min(dense_last_rows, shape_.n_q);
    }
    for (index_t i = 0; i < shape_.n_q; ++i) pairs_ += row_count(i);
    pairs_ *= shape_.heads;
  }

  /// @return the geometry.
  const MaskShape& shape() const { return shape_; }
  /// @return true: the pattern is the same for every head.
  bool head_shared() const { return true; }
  /// @return the band width in keys (0: dense).
  index_t window() const { return window_; }
  /// @return the number of sink keys (0 when dense).
  index_t sinks() const { return sinks_; }
  /// Query rows computed densely at the end (tri-shape; 0 for a plain window or dense).
  /// @return L, clamped to n_q
  index_t dense_last_rows() const {
    return dense_from_ < shape_.n_q ? shape_.n_q - dense_from_ : 0;
  }
  /// @return the allowed (query, key) pairs over all heads.
  index_t pairs() const { return pairs_; }
  /// @return compression_ratio(shape().dense_pairs(), pairs()).
  double compression() const { return compression_ratio(shape_.dense_pairs(), pairs_); }

  /// The allowed keys of query qi: [0, a_end) and [b_begin, b_end) (a may be empty, may overlap).
  struct Row {
    index_t a_end,  ///< End of the sink prefix [0, a_end).
        b_begin,    ///< First key of the band.
        b_end;      ///< One past the last key of the band.
  };
  /// @param qi query index in [0, n_q) (unchecked).
  /// @return query qi's allowed key intervals.
  Row row(index_t qi) const {
    const index_t p = qi + shape_.q_offset();
    const index_t hi = shape_.causal ? std::min(p + 1, shape_.n_k) : shape_.n_k;
    if (window_ == 0 || qi >= dense_from_) return {0, 0, hi};
    const index_t b0 = std::max<index_t>(0, p - window_ + 1);
    const index_t b1 = shape_.causal ? hi : std::min(shape_.n_k, p + window_);
    return {std::min(sinks_, hi), b0, b1};
  }
  /// @param qi query index in [0, n_q) (unchecked).
  /// @return the number of keys query qi attends.
  index_t row_count(index_t qi) const {
    const Row r = row(qi);
    const index_t band = std::max<index_t>(0, r.b_end - r.b_begin);
    const index_t overlap = std::max<index_t>(0, std::min(r.a_end, r.b_end) - r.b_begin);
    return r.a_end + band - overlap;
  }
  /// Exact (closed form): the kernel computes exactly these pairs. False outside the geometry.
  /// @param h query head.
  /// @param qi query index.
  /// @param kj key index.
  /// @return whether the pair is allowed.
  bool allowed(index_t h, index_t qi, index_t kj) const noexcept {
    if (h < 0 || h >= shape_.heads || qi < 0 || qi >= shape_.n_q || kj < 0) return false;
    const Row r = row(qi);
    return kj < r.a_end || (kj >= r.b_begin && kj < r.b_end);
  }
  /// The element test of a partial block: the same as allowed().
  /// @param h query head.
  /// @param qi query index.
  /// @param kj key index.
  /// @return whether the pair is allowed.
  bool allowed_in_block(index_t h, index_t qi, index_t kj) const noexcept {
    return allowed(h, qi, kj);
  }

  /// Visits query block qb's blocks; a row outside the geometry lists nothing.
  /// @param h query head (any head gives the same blocks).
  /// @param qb query block.
  /// @param f called as f(index_t kb, bool full) for each key block some query of the block
  ///        attends, kb ascending; full when every query of the block attends all its keys.
  /// O(candidate blocks x block_q), no allocation.
  template <class F>
  void for_each_block(index_t h, index_t qb, F&& f) const {
    if (h < 0 || h >= shape_.heads || qb < 0 || qb >= shape_.num_q_blocks()) return;
    const index_t q0 = shape_.q_begin(qb), q1 = shape_.q_end(qb);
    if (q0 >= q1) return;
    const index_t bk = shape_.block_k;
    const Row first = row(q0), last = row(q1 - 1);
    // Candidate blocks: those touching the sink prefix, then those touching the band's sweep.
    const index_t sink_end = std::max(first.a_end, last.a_end);
    const index_t sink_blocks = (sink_end + bk - 1) / bk;
    // (A dense last row of a tri-shape block starts its band at key 0.)
    const index_t band_b0 = std::min(first.b_begin, last.b_begin) / bk;
    const index_t band_b1 = (std::max(first.b_end, last.b_end) + bk - 1) / bk;
    auto visit = [&](index_t kb) {
      const index_t k0 = shape_.k_begin(kb), k1 = shape_.k_end(kb);
      bool any = false, all = true;
      for (index_t i = q0; i < q1; ++i) {
        const Row r = row(i);
        const index_t covered = cover(r, k0, k1);
        any = any || covered > 0;
        all = all && covered == k1 - k0;
      }
      if (any) f(kb, all);
    };
    for (index_t kb = 0; kb < std::min(sink_blocks, band_b0); ++kb) visit(kb);
    for (index_t kb = std::max(band_b0, index_t{0}); kb < band_b1; ++kb) visit(kb);
    for (index_t kb = std::max(band_b1, band_b0); kb < sink_blocks; ++kb) visit(kb);
  }

 private:
  // Number of keys of [k0, k1) the row allows.
  static index_t cover(const Row& r, index_t k0, index_t k1) {
    auto len = [](index_t a, index_t b) { return std::max<index_t>(0, b - a); };
    const index_t a = len(k0, std::min(k1, r.a_end));
    const index_t b = len(std::max(k0, r.b_begin), std::min(k1, r.b_end));
    const index_t ab = len(std::max({k0, r.b_begin}), std::min({k1, r.a_end, r.b_end}));
    return a + b - ab;
  }
  MaskShape shape_;
  index_t window_ = 0, sinks_ = 0;
  index_t dense_from_ = std::numeric_limits<index_t>::max();  // first dense query row (tri-shape)
  index_t pairs_ = 0;
};

/// Ready-made IntervalMask patterns, with one block size for queries and keys.
namespace masks {
/// Dense causal attention over [n_q queries (suffix) x n_k keys].
/// @param heads query heads.
/// @param n_q queries, the last n_q of the n_k positions.
/// @param n_k keys.
/// @param block block_q and block_k, in tokens.
/// @return the mask.
/// @throws sparse_attn::invalid_argument as MaskShape::validate().
inline IntervalMask causal(index_t heads, index_t n_q, index_t n_k, index_t block = 64) {
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, true}, 0, 0);
}
/// Dense non-causal attention (encoders, cross-attention).
/// @param heads query heads.
/// @param n_q queries.
/// @param n_k keys.
/// @param block block_q and block_k, in tokens.
/// @return the mask.
/// @throws sparse_attn::invalid_argument as MaskShape::validate().
inline IntervalMask full(index_t heads, index_t n_q, index_t n_k, index_t block = 64) {
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, false}, 0, 0);
}
/// Causal sliding window of `window` keys (p - W < j <= p) plus the first `sinks` keys.
/// @param heads query heads.
/// @param n_q queries, the last n_q of the n_k positions.
/// @param n_k keys.
/// @param window band width in keys, >= 1 (a window >= n_k gives dense causal).
/// @param sinks leading keys every query sees, >= 0.
/// @param block block_q and block_k, in tokens.
/// @return the mask.
/// @throws sparse_attn::invalid_argument when window < 1, or as IntervalMask's constructor.
inline IntervalMask sliding_window(index_t heads, index_t n_q, index_t n_k, index_t window,
                                   index_t sinks, index_t block = 64) {
  require(window >= 1, "masks::sliding_window", "window must be >= 1, got ", window);
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, true}, window, sinks);
}
/// Tri-shape: the causal sliding window of `window` keys plus `sinks` sink keys, and the last
/// `last_rows` query rows dense (causal).
/// @param heads query heads Hq.
/// @param n_q queries (the last n_q of the n_k positions).
/// @param n_k keys.
/// @param window band width W >= 1.
/// @param sinks leading keys every query sees, >= 0.
/// @param last_rows L >= 0 last query rows computed densely.
/// @param block query and key block size.
/// @return the closed-form mask.
/// @throws sparse_attn::invalid_argument when window < 1 or as IntervalMask's constructor.
inline IntervalMask tri_shape(index_t heads, index_t n_q, index_t n_k, index_t window,
                              index_t sinks, index_t last_rows, index_t block = 64) {
  require(window >= 1, "masks::tri_shape", "window must be >= 1, got ", window);
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, true}, window, sinks, last_rows);
}
}  // namespace masks

SPARSE_ATTN_NAMESPACE_END
