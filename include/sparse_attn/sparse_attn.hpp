// sparse_attn: CPU sparse-attention kernels. Umbrella header: includes every public header.
#pragma once
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/kernel/decode.hpp"
#include "sparse_attn/kernel/prefill.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/mask/key_selection.hpp"
#include "sparse_attn/mask/patterns.hpp"
#include "sparse_attn/methods/dense.hpp"
#include "sparse_attn/methods/sliding_window.hpp"
