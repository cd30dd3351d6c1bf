/// @file
/// Split-KV flash decoding: a few new query tokens against a long KV cache, over any key subset,
/// as plan + run.
///
/// Rows sharing a key list are packed: with a per-KV-head (or dense) selection the G query heads of
/// a group x the n_q new tokens form one row group, so every K/V byte is read once per group. The
/// group's key list is cut into chunks of `split` keys (independent of the thread count, so results
/// are bit-identical for any executor); each (group, chunk) item computes a partial online-softmax
/// state (o, m, l) into the workspace, and the partials of a row are merged exactly, in chunk order
/// (OnlineSoftmax::merge).
///
/// Plan / run: plan_decode(shape, keys, options) validates the selection, cuts the items and sizes
/// the workspace: items x padded rows x (dv + 2) floats of partial states, plus concurrency x one
/// item's scratch (~(rows + 64) x (d + dv) floats). run allocates nothing and writes out and LSE
/// only in its last phase, after every item has succeeded. A plan stays valid while the shape
/// (n_k included: it grows with every decoded token), the key selection's per-unit lengths, the
/// options and the executor's concurrency (<= the plan's) stay the same; a decode loop plans each
/// step (O(units + items), no K/V access) and may keep one workspace of the largest size.
///
/// Key mass (options.key_mass, optional): each item also keeps its rows' logits (R x its keys,
/// sized by the plan only when requested); after the merge, a pass over them gives each key's
/// probability e^{s - m} / l summed over the rows of the unit, and the units of a KV head are
/// scattered in a fixed order into key_mass [Hkv][n_k] (0 for keys no counted row reads). No K
/// re-read; O(R x keys) exps.
///
/// Products (AttentionOptions::precision, kernel/common.hpp): fp32, or bf16 (the default when q, K
/// and V are all bf16): q and P rounded to bf16, the scale applied to the fp32 sum q . k; vdpbf16ps
/// on AVX512-BF16 for contiguous rows with head dims a multiple of 32, the same roundings emulated
/// with fp32 FMAs elsewhere (arch/detail/decode_body-inl.hpp). The plan records the precision.
///
/// Causality: new token t sits at position n_k - n_q + t and sees keys j <= that position.
/// Non-finite inputs (docs/ROBUSTNESS.md): a NaN in a row's query or in the K row of a key it reads
/// makes the row NaN (and its LSE); a non-finite V element reaches only the rows that read its key.
/// See docs/DESIGN.md, sections "Plan / run, workspace, executor" and "Key mass output".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstdint>
#include <vector>

#include "sparse_attn/arch/dispatch.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/kernel/workspace.hpp"
#include "sparse_attn/mask/key_selection.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Decode options; AttentionOptions::precision picks the products (bf16 ones by default when q, K
/// and V are all bf16: vdpbf16ps on AVX512-BF16 CPUs, the same roundings emulated elsewhere).
struct DecodeOptions : AttentionOptions {
  bool causal = true;   ///< New token t sees only keys j <= n_k - n_q + t.
  index_t split = 512;  ///< Keys per split-KV chunk (>= 16); fixes the result bits, not threads.
};

class DecodePlan;
template <class QV, class KV, class VV, class OV>
void decode(const DecodePlan& plan, const QV& q, const KV& k, const VV& v, const OV& out,
            const KeySelection& keys, Workspace workspace, const DecodeOptions& opt = {});

/// What plan_decode() decided: the (row group, chunk) items, the CPU target, the workspace size.
/// Holds O(units + items) indices; immutable once made, so one plan may serve concurrent runs
/// (each with its own workspace and output).
class DecodePlan {
 public:
  /// @return the shape the plan was made for.
  const AttentionShape& shape() const { return shape_; }
  /// @return the CPU target the runs use (cpu_target() at plan time).
  CpuTarget target() const { return target_; }
  /// @return the workers the workspace is sized for (the executor's concurrency at plan time).
  int workers() const { return workers_; }
  /// @return the number of (unit, chunk) work items.
  index_t num_items() const { return static_cast<index_t>(items_.size()); }
  /// Bytes of workspace a run needs (64-byte aligned).
  /// @return the size, at most kMaxBytes.
  std::size_t workspace_bytes() const {
    return partial_bytes_ + map_bytes_ + scratch_bytes_ * static_cast<std::size_t>(workers_) + mass_bytes_;
  }
  /// Whether the plan was made with a key-mass output (AttentionOptions::key_mass).
  /// @return true when runs may request key mass.
  bool key_mass() const { return key_mass_; }
  /// Whether q.k and p.v use bf16 products (AttentionOptions::precision and the element types).
  /// @return true for bf16 products.
  bool bf16_products() const { return bf16_; }

 private:
  template <class QV, class KV, class VV, class OV>
  friend void decode(const DecodePlan&, const QV&, const KV&, const VV&, const OV&,
                     const KeySelection&, Workspace, const DecodeOptions&);
  friend DecodePlan plan_decode(const AttentionShape&, const KeySelection&, const DecodeOptions&);

  struct Item {
    index_t unit, skip, count;
  };
  AttentionShape shape_;
  CpuTarget target_ = CpuTarget::generic;
  int workers_ = 1;
  KeySelection::Scope scope_ = KeySelection::Scope::all;
  bool causal_ = true, key_mass_ = false;
  Precision precision_ = Precision::automatic;
  bool bf16_ = false;
  index_t split_ = 512;
  index_t units_ = 0, R_ = 0, Rp_ = 0, dp_ = 0, dvp_ = 0;
  std::vector<Item> items_;
  std::vector<index_t> first_item_;  // items of unit u: [first_item[u], first_item[u + 1])
  std::vector<index_t> unit_keys_;   // keys read by each unit
  std::vector<index_t> item_logits_;  // key mass: offset (floats) of each item's [R][ld] logits
  index_t mass_logits_ = 0;           // key mass: floats of all items' logits
  std::size_t partial_bytes_ = 0, map_bytes_ = 0, scratch_bytes_ = 0, mass_bytes_ = 0;
};

namespace kernel {
/// @param x a count, >= 0.
/// @param m the multiple, >= 1.
/// @return x rounded up to a multiple of m (unchecked for overflow).
inline index_t pad_to(index_t x, index_t m) { return (x + m - 1) / m * m; }
/// Lays out one worker's decode scratch (sizing carver in the plan, the worker's workspace slice in
/// the run). Allocates nothing, never throws.
/// @param c the carver.
/// @param Rp padded rows of a row group.
/// @param d head dimension of Q and K.
/// @param dv head dimension of V.
/// @return the scratch pointers (all null from a sizing carver).
inline arch::DecodeScratch carve_decode_scratch(arch::Carver& c, index_t Rp, index_t d, index_t dv) {
  // Padded to the widest target's lanes and sized for 4-byte K/V: fits every target and dtype.
  return arch::DecodeScratch::carve(c, Rp, d, pad_to(d, arch::kMaxLanes),
                                    pad_to(dv, arch::kMaxLanes), 4, 4, arch::generic::body::kDecodeBlock);
}
}  // namespace kernel

/// Plans a decode of `shape` over `keys` (see the file comment). Throws invalid_argument on
/// inconsistent shapes, selection or options, or when the CPU target is unusable.
/// @param shape the call's shape (attention_shape(q, k, v)); n_k is the cache length now.
/// @param keys the selection; validated against n_k and the head counts.
/// @param opt split, causal, precision, executor (its concurrency sizes the workspace), key_mass
///        (data only decides whether to size for it); scale and lse are not used by the plan.
/// @return the plan.
/// @throws sparse_attn::invalid_argument when validate_shape() fails, split < 16, the selection
///         does not fit (KeySelection::validate), num_threads < 0, the key-mass view is invalid,
///         the precision is not possible for the element types, the executor's concurrency < 1,
///         the workspace would exceed kMaxBytes, or SPARSE_ATTN_TARGET names an unusable target;
///         std::bad_alloc.
/// O(units + items + ranges); no K/V access. Safe to call concurrently.
inline DecodePlan plan_decode(const AttentionShape& shape, const KeySelection& keys = KeySelection::all(),
                              const DecodeOptions& opt = {}) {
  constexpr const char* where = "decode";
  const index_t G = kernel::validate_shape(shape, where);
  require(opt.split >= 16, where, ": split must be >= 16, got ", opt.split);
  keys.validate(shape.n_k, shape.heads_q, shape.heads_kv, where);
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: OpenMP default), got ",
          opt.num_threads);  // checked even when there is nothing to compute
  kernel::validate_key_mass(opt.key_mass, shape.n_q, shape.n_k, where);
  DecodePlan plan;
  plan.shape_ = shape;
  plan.target_ = cpu_target();
  plan.workers_ = detail::with_executor(opt.executor_choice(), [](Executor& e) { return e.concurrency(); });
  require(plan.workers_ >= 1, where, ": executor concurrency() must be >= 1, got ", plan.workers_);
  plan.scope_ = keys.scope();
  plan.causal_ = opt.causal;
  plan.precision_ = opt.precision;
  plan.bf16_ = kernel::bf16_products(opt.precision, shape, where);
  plan.split_ = opt.split;
  plan.key_mass_ = opt.key_mass.data != nullptr;
  if (shape.n_q == 0 || shape.heads_q == 0) return plan;
  const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
  plan.units_ = per_q ? shape.heads_q : shape.heads_kv;
  plan.R_ = (per_q ? 1 : G) * shape.n_q;
  plan.Rp_ = arch::generic::body::decode_padded_rows(plan.R_);
  const index_t lanes = arch::dispatch(plan.target_, [](auto t) { return decltype(t)::lanes(); });
  plan.dp_ = kernel::pad_to(shape.head_dim, lanes);
  plan.dvp_ = kernel::pad_to(shape.head_dim_v, lanes);
  plan.first_item_.assign(1, 0);
  for (index_t u = 0; u < plan.units_; ++u) {
    const index_t L = keys.scope() == KeySelection::Scope::all ? shape.n_k : keys.keys(u, shape.n_k);
    plan.unit_keys_.push_back(L);
    for (index_t s0 = 0; s0 < L; s0 += opt.split)
      plan.items_.push_back({u, s0, std::min(opt.split, L - s0)});
    plan.first_item_.push_back(static_cast<index_t>(plan.items_.size()));
  }
  arch::Carver partials;  // the same takes as run()'s: o, m, l of every item (-1: too large)
  partials.take<float>(detail::bounded_product(kMaxBytes, {plan.num_items(), plan.Rp_, plan.dvp_}));
  partials.take<float>(detail::bounded_product(kMaxBytes, {plan.num_items(), plan.Rp_}));
  partials.take<float>(detail::bounded_product(kMaxBytes, {plan.num_items(), plan.Rp_}));
  plan.partial_bytes_ = partials.bytes();
  arch::Carver map;
  map.take<index_t>(plan.dvp_);
  plan.map_bytes_ = map.bytes();
  arch::Carver sizer;
  kernel::carve_decode_scratch(sizer, plan.Rp_, shape.head_dim, shape.head_dim_v);
  plan.scratch_bytes_ = sizer.bytes();
  if (plan.key_mass_) {  // every item's logits [R][ld], then each row's final max and 1 / sum
    index_t& total = plan.mass_logits_;
    for (const auto& it : plan.items_) {
      plan.item_logits_.push_back(total);
      const index_t n = detail::bounded_product(kMaxBytes, {plan.R_, kernel::pad_to(it.count, arch::kMaxLanes)});
      total = n < 0 || total > kMaxBytes - n ? -1 : total + n;
      if (total < 0) break;
    }
    arch::Carver mass;
    mass.take<float>(total);
    mass.take<float>(detail::bounded_product(kMaxBytes, {plan.units_, plan.R_}));
    mass.take<float>(detail::bounded_product(kMaxBytes, {plan.units_, plan.R_}));
    plan.mass_bytes_ = mass.bytes();
  }
  kernel::require_workspace_fits({plan.partial_bytes_, plan.map_bytes_, plan.mass_bytes_},
                                 plan.scratch_bytes_, plan.workers_, shape, where);
  return plan;
}

/// Runs a planned decode: attention of q [Hq, n_q, d] (the newest n_q tokens) against the cache
/// k, v [Hkv, n_k, d|dv] restricted to `keys` (the plan's), written to out [Hq, n_q, dv]. K/V may
/// be any view type with TensorView's accessors (row(h, t), stride_dim, heads, tokens, dim), e.g.
/// a paged cache. Allocates nothing; `workspace` holds plan.workspace_bytes() bytes, 64-byte
/// aligned. Throws invalid_argument before writing anything when the views, selection, options,
/// workspace or executor do not match the plan; an executor's exception leaves out untouched.
/// @param plan from plan_decode() for this shape, selection lengths, options and target.
/// @param q [Hq, n_q, d] TensorView, any strides, fp32/bf16/fp16.
/// @param k [Hkv, n_k, d] TensorView or kv::PagedView, fp32/bf16/fp16.
/// @param v [Hkv, n_k, dv] same kind as k.
/// @param out [Hq, n_q, dv] TensorView, non-aliasing, fp32/bf16/fp16.
/// @param keys the selection: the plan's scope and per-unit key counts. Its ranges are not
///        re-validated here (plan_decode() validated the plan's selection): pass the one the
///        plan was made with, or one that passes keys.validate(n_k, Hq, Hkv, ...).
/// @param workspace at least plan.workspace_bytes() bytes, 64-byte aligned, not shared with a
///        concurrent run.
/// @param opt the plan's options (causal, split, precision equal; key_mass only if planned;
///        executor concurrency <= plan.workers()); scale and lse may differ from plan time.
/// @throws sparse_attn::invalid_argument when a view is invalid, the shape, causal, split,
///         precision or selection scope or lengths differ from the plan's, scale is not NaN and
///         not finite and > 0, key_mass is invalid or not planned, the workspace is too small,
///         misaligned or null, or the executor's concurrency exceeds the plan's.
/// @par Complexity
/// O(Hq x n_q x selected keys x (d + dv)) flops over the executor, plus O(rows x items x dv) for
/// the merge.
template <class QV, class KV, class VV, class OV>
void decode(const DecodePlan& plan, const QV& q, const KV& k, const VV& v, const OV& out,
            const KeySelection& keys, Workspace workspace, const DecodeOptions& opt) {
  constexpr const char* where = "decode";
  const index_t G = kernel::validate_qkvo(q, k, v, out, where);
  require(attention_shape(q, k, v) == plan.shape_, where,
          ": the views do not have the shape the plan was made for");
  const float scale = kernel::resolve_scale(opt.scale, q.dim, where);
  require(opt.causal == plan.causal_ && opt.split == plan.split_, where,
          ": options (causal, split) differ from the plan's");
  require(opt.precision == plan.precision_, where, ": precision ", precision_name(opt.precision),
          " differs from the plan's (", precision_name(plan.precision_), "); plan with the same options");
  const bool bf16_mode = plan.bf16_;
  require(keys.scope() == plan.scope_, where, ": the key selection's scope differs from the plan's");
  kernel::validate_key_mass(opt.key_mass, q.tokens, k.tokens, where);
  const bool want_mass = opt.key_mass.data != nullptr;
  require(!want_mass || plan.key_mass_, where,
          ": key_mass is set but the plan was made without it (plan with the same options)");
  for (index_t u = 0; u < plan.units_; ++u)
    require((keys.scope() == KeySelection::Scope::all ? k.tokens : keys.keys(u, k.tokens)) ==
                plan.unit_keys_[static_cast<std::size_t>(u)],
            where, ": the key selection of unit ", u, " differs in length from the plan's");
  detail::check_workspace(workspace, plan.workspace_bytes(), where);
  if (q.tokens == 0 || q.heads == 0) {
    if (want_mass)  // no query rows: no key receives mass
      for (index_t hk = 0; hk < k.heads; ++hk)
        std::fill(opt.key_mass.data + hk * opt.key_mass.stride, opt.key_mass.data + hk * opt.key_mass.stride + k.tokens, 0.0f);
    return;
  }
  detail::with_executor(opt.executor_choice(), [&](Executor& exec) {
    require(exec.concurrency() <= plan.workers_, where, ": executor concurrency ",
            exec.concurrency(), " exceeds the plan's ", plan.workers_, " workers");
    const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
    const index_t n_q = q.tokens, dv = v.dim, R = plan.R_, Rp = plan.Rp_, dvp = plan.dvp_;
    const KeyRange everything{0, k.tokens};
    auto* base = static_cast<unsigned char*>(workspace.data);
    arch::Carver pc(base);
    float* po = pc.take<float>(plan.num_items() * Rp * dvp);
    float* pm = pc.take<float>(plan.num_items() * Rp);
    float* pl = pc.take<float>(plan.num_items() * Rp);
    auto* dims = reinterpret_cast<index_t*>(base + plan.partial_bytes_);
    auto scratch = [&](int worker) {
      arch::Carver c(base + plan.partial_bytes_ + plan.map_bytes_ +
                     plan.scratch_bytes_ * static_cast<std::size_t>(worker));
      return kernel::carve_decode_scratch(c, Rp, q.dim, dv);
    };
    float *ml = nullptr, *mm = nullptr, *minv = nullptr;  // key mass: logits, row max, row 1 / sum
    if (want_mass) {
      arch::Carver mc(base + plan.partial_bytes_ + plan.map_bytes_ +
                      plan.scratch_bytes_ * static_cast<std::size_t>(plan.workers_));
      ml = mc.take<float>(plan.mass_logits_);
      mm = mc.take<float>(plan.units_ * R);
      minv = mc.take<float>(plan.units_ * R);
    }
    arch::dispatch(plan.target_, [&](auto target) {
      decltype(target)::decode_out_dims(q, k, v, bf16_mode, scratch(0), dims);
    });
    run_items(exec, plan.num_items(), [&](index_t i, int worker) {
      const auto& it = plan.items_[static_cast<std::size_t>(i)];
      const index_t hk = per_q ? it.unit / G : it.unit;
      const index_t h0 = per_q ? it.unit : it.unit * G;
      const bool all = keys.scope() == KeySelection::Scope::all;
      const KeyRange* rb = all ? &everything : keys.ranges_begin(it.unit);
      const KeyRange* re = all ? &everything + 1 : keys.ranges_end(it.unit);
      arch::DecodePartial part{po + i * Rp * dvp, pm + i * Rp, pl + i * Rp};
      if (want_mass) {
        part.logits = ml + plan.item_logits_[static_cast<std::size_t>(i)];
        part.ld = kernel::pad_to(it.count, arch::kMaxLanes);
      }
      arch::dispatch(plan.target_, [&](auto target) {
        decltype(target)::decode_item(q, k, v, scale, opt.causal, R, bf16_mode, scratch(worker),
                                      hk, h0, rb, re, it.skip, it.count, part);
      });
    });
    // Merge the chunks of each row in chunk order, then normalise: the only writes to out.
    run_chunks(exec, plan.units_ * R, 16, [&](index_t b, index_t e, int worker) {
      float* acc = scratch(worker).merge;
      for (index_t ur = b; ur < e; ++ur) {
        const index_t u = ur / R, r = ur % R;
        const index_t h = (per_q ? u : u * G) + r / n_q, t = r % n_q;
        const index_t i0 = plan.first_item_[static_cast<std::size_t>(u)];
        const index_t i1 = plan.first_item_[static_cast<std::size_t>(u) + 1];
        OnlineSoftmax state;
        std::fill(acc, acc + dv, 0.0f);
        for (index_t i = i0; i < i1; ++i) {
          const auto [w_acc, w_chunk] = state.merge({pm[i * Rp + r], pl[i * Rp + r]});
          if (w_chunk == 0.0f && w_acc == 1.0f) continue;  // no key of this chunk
          const float* o = po + (i * Rp + r) * dvp;
          for (index_t c = 0; c < dv; ++c) acc[c] *= w_acc;
          for (index_t c = 0; c < dvp; ++c)
            if (dims[c] < dv) acc[dims[c]] += w_chunk * o[c];
        }
        const float inv = state.inv_sum();  // 0: empty row; NaN: poisoned row
        for (index_t c = 0; c < dv; ++c) acc[c] *= inv;
        store_row(acc, out.row(h, t), out.stride_dim, dv);
        if (opt.lse) opt.lse(h, t) = state.lse();
        if (want_mass) {
          mm[ur] = state.m;
          minv[ur] = t >= opt.key_mass.row_begin ? state.inv_sum() : 0.0f;
        }
      }
    });
    if (!want_mass) return;
    // Key mass: each item's per-key sum over its rows (into its row 0), then per KV head the
    // items of its units scattered in unit and chunk order (fixed: the bits do not depend on the
    // executor).
    run_items(exec, plan.num_items(), [&](index_t i, int) {
      const auto& it = plan.items_[static_cast<std::size_t>(i)];
      float* s = ml + plan.item_logits_[static_cast<std::size_t>(i)];
      const index_t ld = kernel::pad_to(it.count, arch::kMaxLanes);
      arch::dispatch(plan.target_, [&](auto target) {
        decltype(target)::key_mass_rows(s, ld, R, ld, mm + it.unit * R, minv + it.unit * R, s);
      });
    });
    run_items(exec, k.heads, [&](index_t hk, int) {
      float* row = opt.key_mass.data + hk * opt.key_mass.stride;
      std::fill(row, row + k.tokens, 0.0f);
      const index_t u0 = per_q ? hk * G : hk, u1 = per_q ? u0 + G : hk + 1;
      for (index_t u = u0; u < u1; ++u) {
        const bool all = keys.scope() == KeySelection::Scope::all;
        const KeyRange* rg = all ? &everything : keys.ranges_begin(u);
        const KeyRange* re = all ? &everything + 1 : keys.ranges_end(u);
        index_t pos = rg != re ? rg->begin : 0;
        for (index_t i = plan.first_item_[static_cast<std::size_t>(u)];
             i < plan.first_item_[static_cast<std::size_t>(u) + 1]; ++i) {
          const float* sum = ml + plan.item_logits_[static_cast<std::size_t>(i)];
          for (index_t x = 0; x < plan.items_[static_cast<std::size_t>(i)].count; ++x) {
            row[pos++] += sum[x];
            if (pos == rg->end && ++rg != re) pos = rg->begin;
          }
        }
      }
    });
  });
}

/// One-call decode: plan_decode + a workspace allocated for this call + run (see both).
/// @param q [Hq, n_q, d] TensorView, any strides.
/// @param k [Hkv, n_k, d] TensorView or kv::PagedView.
/// @param v [Hkv, n_k, dv] same kind as k.
/// @param out [Hq, n_q, dv] TensorView, non-aliasing.
/// @param keys the selection (default: every key).
/// @param opt options.
/// @throws as plan_decode() and decode(const DecodePlan&, ...); std::bad_alloc for the plan and the
///         workspace (the only allocations). Safe to call concurrently on distinct outputs.
template <class QV, class KV, class VV, class OV>
void decode(const QV& q, const KV& k, const VV& v, const OV& out,
            const KeySelection& keys = KeySelection::all(), const DecodeOptions& opt = {}) {
  kernel::validate_qkvo(q, k, v, out, "decode");
  const DecodePlan plan = plan_decode(attention_shape(q, k, v), keys, opt);
  const WorkspaceBuffer workspace(plan.workspace_bytes());
  decode(plan, q, k, v, out, keys, workspace.view(), opt);
}

SPARSE_ATTN_NAMESPACE_END
