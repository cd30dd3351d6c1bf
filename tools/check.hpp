// check(): the tool's one-line validation helper (throws sparse_attn::invalid_argument).
#pragma once
#include "sparse_attn/core/error.hpp"

namespace sparse_attn::cli {

/// Throws sparse_attn::invalid_argument("<message>") when cond is false.
template <class... Args>
void check(bool cond, const Args&... what) {
  if (!cond) throw invalid_argument(sparse_attn::detail::concat(what...));
}

}  // namespace sparse_attn::cli
