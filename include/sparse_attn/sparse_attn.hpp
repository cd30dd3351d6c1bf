/// @file
/// sparse_attn: CPU sparse-attention kernels. Umbrella header: includes every public header
/// (directly or through another) except io/npy.hpp (file I/O), reference.hpp (the test oracle)
/// and the evaluation harness of eval/.
#pragma once

/// @namespace sparse_attn
/// Everything the library defines. Declarations live in an inline namespace named after the
/// includer's ISA (core/config.hpp), so `sparse_attn::x` names them; see docs/DESIGN.md, section
/// "Layers", for how the parts fit together.
#include "sparse_attn/arch/target.hpp"
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/exec/executor.hpp"
#include "sparse_attn/kernel/decode.hpp"
#include "sparse_attn/kernel/prefill.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/kernel/workspace.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/mask/key_selection.hpp"
#include "sparse_attn/mask/line_mask.hpp"
#include "sparse_attn/mask/patterns.hpp"
#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/decode.hpp"
#include "sparse_attn/kv/eviction.hpp"
#include "sparse_attn/kv/paged_view.hpp"
#include "sparse_attn/methods/ada_snapkv.hpp"
#include "sparse_attn/methods/block_sparse.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/decode_policy.hpp"
#include "sparse_attn/methods/dense.hpp"
#include "sparse_attn/methods/flex_prefill.hpp"
#include "sparse_attn/methods/h2o.hpp"
#include "sparse_attn/methods/layer_budget.hpp"
#include "sparse_attn/methods/quest.hpp"
#include "sparse_attn/methods/registry.hpp"
#include "sparse_attn/methods/selector.hpp"
#include "sparse_attn/methods/sliding_window.hpp"
#include "sparse_attn/methods/snapkv.hpp"
#include "sparse_attn/methods/streaming.hpp"
#include "sparse_attn/methods/user_mask.hpp"
#include "sparse_attn/methods/vertical_slash.hpp"
#include "sparse_attn/pipeline.hpp"
