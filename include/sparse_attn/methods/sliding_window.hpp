// Method 2 (METHODS.md), prefill form ("A-shape"): query at position p sees key j iff j <= p and
// (j < S or p - j < W). Closed-form: no index memory. S + W >= n gives exactly the dense pattern.
// The decode/eviction form (keep the first S and the last W tokens) is methods/streaming.hpp.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/mask/patterns.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct SlidingWindowOptions {
  index_t window = 1024;  // W: keys p - W < j <= p
  index_t sinks = 4;      // S: first S keys always visible
  index_t block = 64;     // kernel tile size
};

inline IntervalMask sliding_window(index_t heads, index_t n_q, index_t n_k,
                                   const SlidingWindowOptions& opt = {}) {
  require(opt.window >= 1, "methods::sliding_window", "window must be >= 1, got ", opt.window);
  require(opt.sinks >= 0, "methods::sliding_window", "sinks must be >= 0, got ", opt.sinks);
  return masks::sliding_window(heads, n_q, n_k, opt.window, opt.sinks, opt.block);
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
