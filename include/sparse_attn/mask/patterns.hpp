/// @file
/// Closed-form patterns: no index memory; block lists and element tests come from arithmetic.
/// One family covers dense causal, dense non-causal and sliding window with S sink tokens: each
/// query row at absolute position p allows the union of a sink prefix [0, S) and a band around p,
/// cut by causality (j <= p); tri-shape adds the last L query rows dense (every key j <= p).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <limits>

#include "sparse_attn/mask/block_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Row-interval pattern. window == 0 means unlimited (dense). Causal band: p - W < j <= p.
/// Non-causal band: |p - j| < W. Sinks are the first `sinks` keys (cut by causality too).
class IntervalMask {
 public:
  IntervalMask() = default;
  /// The pattern over `shape` with a band of `window` keys (0: unlimited) and `sinks` sink keys;
  /// the last `dense_last_rows` query rows see every key (tri-shape: the rows that produce the
  /// first decoded token attend densely; 0 = none).
  /// @param shape           geometry (heads, n_q, n_k, blocks, causal); validated
  /// @param window          W >= 0 keys of the band (0 or >= n_k: dense)
  /// @param sinks           S >= 0 sink keys
  /// @param dense_last_rows L >= 0 last query rows computed densely (clamped to n_q)
  /// @throws sparse_attn::invalid_argument on a bad shape or a negative parameter
  /// Counts its pairs once: O(n_q).
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

  const MaskShape& shape() const { return shape_; }
  bool head_shared() const { return true; }
  index_t window() const { return window_; }
  index_t sinks() const { return sinks_; }
  /// Query rows computed densely at the end (tri-shape; 0 for a plain window or dense).
  index_t dense_last_rows() const {
    return dense_from_ < shape_.n_q ? shape_.n_q - dense_from_ : 0;
  }
  index_t pairs() const { return pairs_; }
  double compression() const { return compression_ratio(shape_.dense_pairs(), pairs_); }

  /// The allowed keys of query qi: [0, a_end) and [b_begin, b_end) (a may be empty, may overlap).
  struct Row {
    index_t a_end, b_begin, b_end;
  };
  Row row(index_t qi) const {
    const index_t p = qi + shape_.q_offset();
    const index_t hi = shape_.causal ? std::min(p + 1, shape_.n_k) : shape_.n_k;
    if (window_ == 0 || qi >= dense_from_) return {0, 0, hi};
    const index_t b0 = std::max<index_t>(0, p - window_ + 1);
    const index_t b1 = shape_.causal ? hi : std::min(shape_.n_k, p + window_);
    return {std::min(sinks_, hi), b0, b1};
  }
  index_t row_count(index_t qi) const {
    const Row r = row(qi);
    const index_t band = std::max<index_t>(0, r.b_end - r.b_begin);
    const index_t overlap = std::max<index_t>(0, std::min(r.a_end, r.b_end) - r.b_begin);
    return r.a_end + band - overlap;
  }
  /// Exact (closed form): the kernel computes exactly these pairs. False outside the geometry.
  bool allowed(index_t h, index_t qi, index_t kj) const noexcept {
    if (h < 0 || h >= shape_.heads || qi < 0 || qi >= shape_.n_q || kj < 0) return false;
    const Row r = row(qi);
    return kj < r.a_end || (kj >= r.b_begin && kj < r.b_end);
  }
  bool allowed_in_block(index_t h, index_t qi, index_t kj) const noexcept {
    return allowed(h, qi, kj);
  }

  /// Visits query block qb's blocks; a row outside the geometry lists nothing.
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
  /// Number of keys of [k0, k1) the row allows.
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

namespace masks {
/// Dense causal attention over [n_q queries (suffix) x n_k keys].
inline IntervalMask causal(index_t heads, index_t n_q, index_t n_k, index_t block = 64) {
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, true}, 0, 0);
}
/// Dense non-causal attention (encoders, cross-attention).
inline IntervalMask full(index_t heads, index_t n_q, index_t n_k, index_t block = 64) {
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, false}, 0, 0);
}
/// Causal sliding window of `window` keys (p - W < j <= p) plus the first `sinks` keys.
inline IntervalMask sliding_window(index_t heads, index_t n_q, index_t n_k, index_t window,
                                   index_t sinks, index_t block = 64) {
  require(window >= 1, "masks::sliding_window", "window must be >= 1, got ", window);
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, true}, window, sinks);
}
/// Tri-shape: the causal sliding window of `window` keys plus `sinks` sink keys, and the last
/// `last_rows` query rows dense (causal).
inline IntervalMask tri_shape(index_t heads, index_t n_q, index_t n_k, index_t window,
                              index_t sinks, index_t last_rows, index_t block = 64) {
  require(window >= 1, "masks::tri_shape", "window must be >= 1, got ", window);
  return IntervalMask(MaskShape{heads, n_q, n_k, block, block, true}, window, sinks, last_rows);
}
}  // namespace masks

SPARSE_ATTN_NAMESPACE_END
