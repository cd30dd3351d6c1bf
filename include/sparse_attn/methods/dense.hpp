// Method 1 (METHODS.md): dense attention, the reference and baseline. Selection is the closed-form
// causal or non-causal pattern; execution is the common prefill / decode kernel.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/mask/patterns.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct DenseOptions {
  bool causal = true;
  index_t block = 64;  // kernel tile (query and key block) size
};

/// Dense mask over Hq query heads, n_q queries (suffix of n_k keys).
inline IntervalMask dense(index_t heads, index_t n_q, index_t n_k, const DenseOptions& opt = {}) {
  return opt.causal ? masks::causal(heads, n_q, n_k, opt.block)
                    : masks::full(heads, n_q, n_k, opt.block);
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
