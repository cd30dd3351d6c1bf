/// @file
/// Tiled flash-attention prefill over any mask of the common interface (mask/block_mask.hpp), as
/// plan + run.
///
/// Work item = (KV head, query block): the G query heads of a GQA group are processed together so a
/// K/V block is converted once and reused by every head of the group (when the mask is the same for
/// all heads). For each visited key block: S = Q K^T * scale (micro-kernel), masked on partial
/// blocks, online softmax (kernel/softmax_state.hpp), O += P V. The plan sorts the items by their
/// block count, heaviest first, so causal and sparse rows of unequal work stay balanced on any
/// executor. Each item is computed by one worker in a fixed order, so the output bits do not
/// depend on the executor or its thread count.
///
/// Plan / run: plan_prefill(shape, mask, options) walks the mask once (O(listed blocks)), picks
/// the CPU target, and sizes the workspace: concurrency x one item's scratch (G x (d + dv + 2) x
/// block_q + block_k x (block_q + d + 2 dv) floats), plus, for masks whose allowed_in_block() may throw, the
/// partial blocks' element bits. run allocates nothing, and writes nothing before every check and
/// every call of the mask's predicate has passed: a predicate that is not noexcept is evaluated
/// into the workspace first, so an exception from it leaves out and LSE untouched.
/// A plan stays valid for any call with the same shape, the same mask (or one with the same block
/// lists, e.g. the same pattern in another layer), executor concurrency <= the plan's, and the same
/// target; rebuild it when any of those changes.
///
/// Key mass (options.key_mass, optional): an item whose query block holds rows >= row_begin also
/// keeps those rows' logits (per worker: G x n_k x min(block_q, n_q - row_begin) floats, sized by
/// the plan only when requested); when the item is done, their probabilities e^{s - m} / l are
/// summed per key and added to per-(KV head, key) sums in fixed point (2^-shift units, shift from
/// G x rows), so the result does not depend on which worker finished first; a last pass converts
/// them into key_mass [Hkv][n_k]. No K re-read.
/// Output: out[h, i] = softmax over allowed keys, or 0 for a row with no allowed key.
/// LSE (optional): lse[h, i] = log sum_{allowed j} exp(scale * q_i . k_j) (natural log), -inf for an
/// empty row.
/// Non-finite inputs (docs/ROBUSTNESS.md): a NaN in q_i or in the K row of a key row i may see makes
/// row i NaN (and its LSE); a non-finite V element reaches only the rows allowed to see its key.
/// See docs/DESIGN.md, sections "Plan / run, workspace, executor", "Key mass output" and
/// "Precision and the bf16 products".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <numeric>
#include <utility>
#include <vector>

#include "sparse_attn/arch/dispatch.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/kernel/workspace.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/mask/line_mask.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN

/// Options of a prefill call (the common AttentionOptions).
using PrefillOptions = AttentionOptions;

class PrefillPlan;
template <class Mask>
PrefillPlan plan_prefill(const AttentionShape& shape, const Mask& mask, const AttentionOptions& opt = {});
template <class QV, class KV, class VV, class OV, class Mask>
void prefill(const PrefillPlan& plan, const QV& q, const KV& k, const VV& v, const OV& out,
             const Mask& mask, Workspace workspace, const AttentionOptions& opt = {});

/// What plan_prefill() decided: the work items in execution order, the CPU target, and the
/// workspace size. Cheap to copy; holds O(items + partial blocks) indices.
/// Immutable once made: one plan may serve concurrent runs (each with its own workspace and
/// output).
class PrefillPlan {
 public:
  /// @return the shape the plan was made for.
  const AttentionShape& shape() const { return shape_; }
  /// @return the mask geometry the plan was made for.
  const MaskShape& mask_shape() const { return mask_shape_; }
  /// @return the CPU target the runs use (cpu_target() at plan time).
  CpuTarget target() const { return target_; }
  /// Workers the workspace is sized for (the executor's concurrency at plan time).
  /// @return the worker count, >= 1.
  int workers() const { return workers_; }
  /// @return the number of work items (KV head x query-block group); 0 when nothing to compute.
  index_t num_items() const { return static_cast<index_t>(order_.size()); }
  /// Bytes of workspace a run needs (64-byte aligned).
  /// @return the size, at most kMaxBytes.
  std::size_t workspace_bytes() const {
    return bits_bytes_ + pack_bytes_ + scratch_bytes_ * static_cast<std::size_t>(workers_) + mass_bytes_ +
           line_bytes_;
  }
  /// Whether Q K^T and P V use bf16 products (AttentionOptions::precision and the element types).
  /// @return true for bf16 products.
  bool bf16_products() const { return bf16_; }
  /// Whether the plan was made with a key-mass output (AttentionOptions::key_mass).
  /// @return true when runs may request key mass.
  bool key_mass() const { return key_mass_; }

 private:
  template <class Mask>
  friend PrefillPlan plan_prefill(const AttentionShape&, const Mask&, const AttentionOptions&);
  template <class QV, class KV, class VV, class OV, class Mask>
  friend void prefill(const PrefillPlan&, const QV&, const KV&, const VV&, const OV&, const Mask&,
                      Workspace, const AttentionOptions&);
  template <class Mask>
  friend class PrecomputedMask;

  AttentionShape shape_;
  MaskShape mask_shape_;
  bool head_shared_ = false;
  CpuTarget target_ = CpuTarget::generic;
  int workers_ = 1;
  index_t ldq_ = 0, bk_ = 0;
  index_t tiles_ = 1;  // query blocks per work item (see plan_prefill)
  bool key_mass_ = false;
  Precision precision_ = Precision::automatic;
  bool bf16_ = false;
  // bf16 products with native dot products: V packed as pairs once per call, per (KV head, key
  // block): pack_words_ 32-bit words each, then one non-finite flag byte per block.
  index_t pack_words_ = 0;
  std::size_t pack_bytes_ = 0;
  index_t mass_row_begin_ = 0, mass_ld_ = 0;  // key mass: first row counted, kept rows per tile (padded)
  std::size_t mass_bytes_ = 0;                // key mass: the fixed-point sums [Hkv][n_k]
  std::vector<index_t> order_;  // items (hk * groups + query block group), heaviest first
  std::size_t scratch_bytes_ = 0, bits_bytes_ = 0;
  // Masks whose predicate may throw: partial key blocks of each mask row (h * nqb + qb), whose
  // element bits run() evaluates into the workspace before any output is written.
  bool precompute_ = false;
  index_t bit_words_ = 0;  // 64-bit words per partial block (block_q x block_k bits)
  std::vector<index_t> partial_offsets_;
  std::vector<std::int32_t> partial_blocks_;
  // Line masks (LineMask): items are (query head, kLineTiles tiles of kMaxTileQ queries),
  // grouped by KV head; the workspace ends with kernel::LineRegions (one KV head's transposed
  // K/V in line_tiles_ tiles, then the gathered column rows of its G heads: line_columns_ rows).
  index_t line_columns_ = 0, line_tiles_ = 0;
  std::size_t line_bytes_ = 0;
};

namespace kernel {
/// Lays out one worker's scratch for items of `tiles` query blocks of the G heads.
/// Used twice with the same arguments: by the plan with a sizing Carver (no memory), and by the run
/// over the worker's slice of the workspace. Allocates nothing, never throws.
/// @param c the carver that hands out 64-byte aligned parts.
/// @param G query heads per KV head.
/// @param tiles query blocks per work item.
/// @param d head dimension of Q and K.
/// @param dv head dimension of V.
/// @param ldq query rows of a tile, padded to the micro-kernel's tile height.
/// @param bk key block size used (block_k clipped to n_k).
/// @param nkb number of key blocks.
/// @param mass_ld kept logit rows per tile for key mass (0: no key mass).
/// @param n_k keys (key-mass scratch only).
/// @return the scratch pointers (all null from a sizing carver).
inline arch::PrefillScratch carve_prefill_scratch(arch::Carver& c, index_t G, index_t tiles, index_t d,
                                                  index_t dv, index_t ldq, index_t bk, index_t nkb,
                                                  index_t mass_ld = 0, index_t n_k = 0) {
  arch::PrefillScratch w;
  const index_t T = G * tiles;
  w.ldq = ldq;
  w.qt = c.take<float>(T * d * ldq);
  w.ot = c.take<float>(T * dv * ldq);
  w.m = c.take<float>(T * ldq);
  w.l = c.take<float>(T * ldq);
  if (tiles > 1) w.tile_blocks = c.take<index_t>(tiles * (nkb + 2));
  w.dp = (d + 31) / 32 * 32;
  w.dvp = (dv + 15) / 16 * 16;
  w.bkp = (bk + 31) / 32 * 32;
  w.s = c.take<float>(w.bkp * ldq);
  w.kbuf = c.take<float>(bk * d);
  w.vbuf = c.take<float>(bk * dv);
  w.vfix = c.take<float>(bk * dv);
  w.row = c.take<float>(std::max(d, dv));
  w.qp = c.take<std::uint32_t>(T * w.dp / 2 * ldq);
  w.pp = c.take<std::uint32_t>(w.bkp / 2 * ldq);
  w.kb = c.take<bf16>(w.bkp * w.dp);
  w.vp = c.take<std::uint32_t>(w.bkp / 2 * w.dvp);
  w.vt = c.take<std::uint32_t>(w.dvp * w.bkp / 2);
  w.vrow = c.take<bf16>(2 * w.dvp);
  if (mass_ld > 0) {  // key mass
    w.ks_ld = mass_ld;
    w.ks_nk = n_k;
    w.ks = c.take<float>(G * n_k * mass_ld);
    w.ks_blocks = c.take<index_t>(G * nkb);
    w.ks_state = c.take<index_t>(2 * G);
    w.ks_col = c.take<float>(2 * mass_ld);
    w.ks_sum = c.take<float>(bk);
  }
  return w;
}

/// True for masks the kernel executes as lines (LineMask: gathered columns and diagonals)
/// instead of key blocks.
template <class Mask>
inline constexpr bool kIsLineMask = std::is_same_v<Mask, LineMask>;

/// Lays out the line-mask part of the workspace (see PrefillPlan): one KV head's transposed K
/// and V tiles (arch::LineOperands), their non-finite flags, the gathered rows, and the band plan
/// of each of its G heads (arch::LineOperands: offset bits, dense windows, residual diagonals).
/// Used by the plan (sizing carver) and the run.
struct LineRegions {
  float* kt = nullptr;          ///< [tiles][d][kLineTileKeys] transposed K tiles of one KV head
  float* vt = nullptr;          ///< [tiles][dv][kLineTileKeys] the same for V
  std::uint8_t* bad = nullptr;  ///< [tiles]: the tile's V holds an inf or NaN
  float* kg = nullptr;          ///< [columns][d] gathered K rows of one KV head's group
  float* vg = nullptr;          ///< [columns][dv] gathered V rows of one KV head's group
  index_t keys = 0;                    ///< n_k
  index_t words = 0;                   ///< 64-bit words of one head's offset bits
  index_t windows = 0;                 ///< band windows of one head
  std::uint64_t* off_bits = nullptr;   ///< [G][words] offset bits (bit delta + kLineWindow)
  std::int32_t* use = nullptr;         ///< [G][windows] offset pairs of each window
  std::uint8_t* dense = nullptr;       ///< [G][windows] 1 = the window runs dense
  std::int32_t* res_offs = nullptr;    ///< [G][n_k] residual offsets
  std::uint64_t* res_lanes = nullptr;  ///< [G][n_k] their lanes outside dense windows
  index_t* nres = nullptr;             ///< [G] residual offsets of each head
  /// Carves the regions.
  /// @param c the carver.
  /// @param d K head dim.
  /// @param dv V head dim.
  /// @param tiles transposed tiles: n_k / kLineStep + 3.
  /// @param columns gathered rows: the most columns of one KV head's G heads.
  /// @param G query heads per KV head.
  /// @param n_k keys.
  LineRegions(arch::Carver& c, index_t d, index_t dv, index_t tiles, index_t columns, index_t G,
              index_t n_k) {
    kt = c.take<float>(tiles * d * arch::kLineTileKeys);
    vt = c.take<float>(tiles * dv * arch::kLineTileKeys);
    bad = c.take<std::uint8_t>(tiles);
    kg = c.take<float>(columns * d);
    vg = c.take<float>(columns * dv);
    // Offset bits up to delta + W <= n_k - 1 + W, read two words at bit p0 - j + W <= n_k + W - 1;
    // windows m <= (p0 + W - 1) / W <= n_k / W + 1.
    keys = n_k;
    words = n_k / 64 + 3;
    windows = n_k / arch::kLineWindow + 3;
    off_bits = c.take<std::uint64_t>(G * words);
    use = c.take<std::int32_t>(G * windows);
    dense = c.take<std::uint8_t>(G * windows);
    res_offs = c.take<std::int32_t>(G * n_k);
    res_lanes = c.take<std::uint64_t>(G * n_k);
    nres = c.take<index_t>(G);
  }
};

/// Fills head g's band plan in `reg` from its offsets (ascending, n_offs of them): the offset
/// bits; per window m the offset pairs it holds, sum over offsets delta with |delta - m W| < W of
/// W - |delta - m W| (lane i of offset delta lies in window ceil((delta - i) / W)); the dense
/// windows (kLineDenseNum / kLineDenseDen of W x W pairs or more); the residual offsets, those
/// with a lane in a window that is not dense, and those lanes. O(n_k / 64 + n_offs x W).
/// @param reg the regions.
/// @param g the head within its KV head's group.
/// @param offs the head's offsets, ascending, in [0, n_k).
/// @param n_offs their count.
inline void plan_line_band(const LineRegions& reg, index_t g, const std::int32_t* offs, index_t n_offs) {
  constexpr index_t W = arch::kLineWindow;
  std::uint64_t* bits = reg.off_bits + g * reg.words;
  std::int32_t* use = reg.use + g * reg.windows;
  std::uint8_t* dense = reg.dense + g * reg.windows;
  std::fill(bits, bits + reg.words, std::uint64_t{0});
  std::fill(use, use + reg.windows, 0);
  for (index_t t = 0; t < n_offs; ++t) {
    const index_t o = offs[t], m = o / W, r = o - m * W;
    bits[(o + W) / 64] |= std::uint64_t{1} << ((o + W) % 64);
    use[m] += static_cast<std::int32_t>(W - r);  // lanes i <= r lie in window m
    if (r > 0) use[m + 1] += static_cast<std::int32_t>(r);  // lanes i > r in window m + 1
  }
  for (index_t m = 0; m < reg.windows; ++m)
    dense[m] = use[m] * arch::kLineDenseDen >= arch::kLineDenseNum * W * W ? 1 : 0;
  std::int32_t* ro = reg.res_offs + g * reg.keys;
  std::uint64_t* rl = reg.res_lanes + g * reg.keys;
  index_t nres = 0;
  for (index_t t = 0; t < n_offs; ++t) {
    const index_t o = offs[t];
    std::uint64_t lanes = 0;
    for (index_t i = 0; i < W; ++i)
      if (dense[(o - i + W - 1) / W] == 0) lanes |= std::uint64_t{1} << i;
    if (lanes == 0) continue;  // every lane in dense windows
    ro[nres] = static_cast<std::int32_t>(o);
    rl[nres++] = lanes;
  }
  reg.nres[g] = nres;
}

/// True when Mask::allowed_in_block is noexcept: the run then calls it inline; otherwise the plan
/// reserves bits and the run evaluates the partial blocks first (exception safety).
template <class Mask>
inline constexpr bool kPredicateNoexcept =
    noexcept(std::declval<const Mask&>().allowed_in_block(index_t{}, index_t{}, index_t{}));
}  // namespace kernel

/// A mask whose element predicate was evaluated into bits (PrefillPlan's partial blocks): the
/// kernel reads bits instead of calling a predicate that may throw. Made by prefill() itself;
/// holds references only (to the mask, the plan and the workspace bits).
/// @tparam Mask the wrapped mask type.
template <class Mask>
class PrecomputedMask {
 public:
  /// @param inner the mask; its block lists must be the plan's.
  /// @param plan the plan whose partial-block lists index the bits.
  /// @param bits block_q x block_k bits per partial block, in the plan's order.
  PrecomputedMask(const Mask& inner, const PrefillPlan& plan, const std::uint64_t* bits)
      : inner_(inner), plan_(plan), bits_(bits) {}
  /// @return the inner mask's geometry.
  const MaskShape& shape() const { return inner_.shape(); }
  /// @return the inner mask's head_shared().
  bool head_shared() const { return inner_.head_shared(); }
  /// The inner mask's block list of row (h, qb).
  /// @param h query head.
  /// @param qb query block.
  /// @param f called as f(index_t kb, bool full).
  template <class F>
  void for_each_block(index_t h, index_t qb, F&& f) const {
    inner_.for_each_block(h, qb, std::forward<F>(f));
  }
  /// The precomputed element test, O(log partial blocks of the row); only valid for elements of
  /// the row's listed partial blocks.
  /// @param h query head.
  /// @param qi query index.
  /// @param kj key index.
  /// @return the inner predicate's answer, as evaluated before the run.
  bool allowed_in_block(index_t h, index_t qi, index_t kj) const noexcept {
    const MaskShape& s = plan_.mask_shape_;
    const index_t row = (plan_.head_shared_ ? 0 : h) * s.num_q_blocks() + qi / s.block_q;
    const auto kb = static_cast<std::int32_t>(kj / s.block_k);
    const std::int32_t* b = plan_.partial_blocks_.data();
    const std::int32_t* p = std::lower_bound(b + plan_.partial_offsets_[static_cast<std::size_t>(row)],
                                             b + plan_.partial_offsets_[static_cast<std::size_t>(row) + 1], kb);
    const index_t bit = (qi % s.block_q) * s.block_k + kj % s.block_k;
    return (bits_[(p - b) * plan_.bit_words_ + bit / 64] >> (bit % 64)) & 1u;
  }

 private:
  const Mask& inner_;
  const PrefillPlan& plan_;
  const std::uint64_t* bits_;
};

/// Plans a prefill of `shape` under `mask` (see the file comment). Throws invalid_argument on
/// inconsistent shapes, mask geometry or options, or when the CPU target is unusable.
/// Complexity O(Hkv x query blocks x listed blocks per row); allocates the plan's index arrays.
/// @tparam Mask any type of the mask interface (mask/block_mask.hpp).
/// @param shape the call's shape (attention_shape(q, k, v)).
/// @param mask the mask; its geometry must be [Hq, n_q, n_k]. Only its block lists are read (and,
///        for a predicate that may throw, which blocks are partial).
/// @param opt executor (its concurrency sizes the workspace), precision, key_mass (data and
///        row_begin; the memory is not touched); scale and lse are not used by the plan.
/// @return the plan.
/// @throws sparse_attn::invalid_argument when validate_shape() fails, the mask geometry differs
///         from the shape, num_threads < 0, the key-mass view is invalid, the precision is not
///         possible for the element types, the executor's concurrency < 1, the workspace would
///         exceed kMaxBytes, or SPARSE_ATTN_TARGET names an unusable target; std::bad_alloc.
/// Thread safety: safe to call concurrently (mask and options are only read).
template <class Mask>
PrefillPlan plan_prefill(const AttentionShape& shape, const Mask& mask, const AttentionOptions& opt) {
  constexpr const char* where = "prefill";
  const index_t G = kernel::validate_shape(shape, where);
  const MaskShape& ms = mask.shape();
  require(ms.heads == shape.heads_q && ms.n_q == shape.n_q && ms.n_k == shape.n_k, where,
          ": mask geometry (heads=", ms.heads, ", n_q=", ms.n_q, ", n_k=", ms.n_k,
          ") does not match Q/K (heads=", shape.heads_q, ", n_q=", shape.n_q, ", n_k=", shape.n_k, ")");
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: OpenMP default), got ",
          opt.num_threads);  // checked even when there is nothing to compute
  kernel::validate_key_mass(opt.key_mass, shape.n_q, shape.n_k, where);
  PrefillPlan plan;
  plan.shape_ = shape;
  plan.key_mass_ = opt.key_mass.data != nullptr;
  plan.mass_row_begin_ = opt.key_mass.row_begin;
  plan.mask_shape_ = ms;
  plan.head_shared_ = mask.head_shared();
  plan.target_ = cpu_target();
  plan.precision_ = opt.precision;
  plan.bf16_ = kernel::bf16_products(opt.precision, shape, where);
  plan.workers_ = detail::with_executor(opt.executor_choice(), [](Executor& e) { return e.concurrency(); });
  require(plan.workers_ >= 1, where, ": executor concurrency() must be >= 1, got ", plan.workers_);
  if (shape.n_q == 0 || shape.heads_q == 0) return plan;
  if constexpr (kernel::kIsLineMask<Mask>) {
    // Items (query head, group of kLineTiles tiles of kMaxTileQ queries), the mask's block size
    // aside; items of one KV head are contiguous (the run transposes one KV head at a time),
    // heaviest first within it (cost: the slots, columns and offsets up to each tile's end).
    require(!plan.key_mass_, where, ": key_mass is not available with a LineMask");
    const index_t tq = arch::kMaxTileQ, span = tq * arch::kLineTiles;
    const index_t ngroups = (shape.n_q + span - 1) / span;
    std::vector<index_t> cost(static_cast<std::size_t>(shape.heads_q * ngroups), 0);
    for (index_t h = 0; h < shape.heads_q; ++h)
      for (index_t t = 0; t * tq < shape.n_q; ++t) {
        const index_t p1 = std::min(shape.n_q, (t + 1) * tq) - 1 + ms.q_offset();
        cost[static_cast<std::size_t>(h * ngroups + t / arch::kLineTiles)] +=
            LineMask::count_in(mask.columns(h), mask.num_columns(h), 0, p1 + 1) +
            LineMask::count_in(mask.offsets(h), mask.num_offsets(h), 0, p1 + 1);
      }
    plan.order_.resize(cost.size());
    std::iota(plan.order_.begin(), plan.order_.end(), index_t{0});
    const auto per_kv = static_cast<std::ptrdiff_t>(G * ngroups);
    for (auto it = plan.order_.begin(); it != plan.order_.end(); it += per_kv)
      std::stable_sort(it, it + per_kv, [&](index_t a, index_t b) {
        return cost[static_cast<std::size_t>(a)] > cost[static_cast<std::size_t>(b)];
      });
    plan.ldq_ = tq;
    plan.tiles_ = arch::kLineTiles;
    plan.bk_ = std::min(tq, std::max<index_t>(shape.n_k, 1));
    arch::Carver sizer;
    // (the run carves every worker's scratch alike: G x kLineTiles head tiles; an item uses
    // kLineTiles)
    kernel::carve_prefill_scratch(sizer, G, plan.tiles_, shape.head_dim, shape.head_dim_v, plan.ldq_,
                                  plan.bk_, ms.num_k_blocks());
    plan.scratch_bytes_ = sizer.bytes();
    for (index_t hk = 0; hk < shape.heads_kv; ++hk)  // the most columns of one KV head's group
      plan.line_columns_ = std::max(plan.line_columns_, mask.first_column((hk + 1) * G - 1) +
                                                             mask.num_columns((hk + 1) * G - 1) -
                                                             mask.first_column(hk * G));
    plan.line_tiles_ = shape.n_k / arch::kLineStep + 3;  // keys -kLineStep .. n_k + kMaxTileQ
    const index_t kv_floats = detail::bounded_product(
        kMaxBytes / 4, {shape.head_dim + shape.head_dim_v, plan.line_tiles_, arch::kLineTileKeys});
    const index_t g_floats = detail::bounded_product(
        kMaxBytes / 4, {plan.line_columns_, shape.head_dim + shape.head_dim_v});
    // The band plans: under 16 bytes per key and head of the group (kernel::LineRegions).
    const index_t band_bytes = detail::bounded_product(kMaxBytes, {G, shape.n_k + 4 * arch::kLineWindow, 16});
    if (kv_floats < 0 || g_floats < 0 || band_bytes < 0) {
      plan.line_bytes_ = SIZE_MAX;
    } else {
      arch::Carver lines;
      kernel::LineRegions(lines, shape.head_dim, shape.head_dim_v, plan.line_tiles_, plan.line_columns_, G,
                          shape.n_k);
      plan.line_bytes_ = lines.bytes();
    }
    kernel::require_workspace_fits({plan.line_bytes_}, plan.scratch_bytes_, plan.workers_, shape, where);
    return plan;
  }
  const index_t Hkv = shape.heads_kv, nqb = ms.num_q_blocks();
  const bool shared = mask.head_shared();

  // Query blocks per work item: a head-shared mask lets one item run several consecutive query
  // blocks over one merged pass of their key blocks, so each K/V block is read (and converted)
  // once for up to 8 head tiles of up to 256 queries instead of once per query block: the
  // K/V traffic of long prefills drops by that factor. Kept at 1 for key mass (per-tile logits)
  // and per-head masks, and lowered while there are fewer than 4 items per worker.
  if (shared && !plan.key_mass_) {
    plan.tiles_ = std::max<index_t>(1, std::min<index_t>({256 / std::max<index_t>(ms.block_q, 1), 8 / G, nqb}));
    while (plan.tiles_ > 1 && Hkv * ((nqb + plan.tiles_ - 1) / plan.tiles_) < 4 * plan.workers_) --plan.tiles_;
  }
  const index_t tiles = plan.tiles_, groups = (nqb + tiles - 1) / tiles;

  // Work items (KV head, query block group), heaviest first; ties keep index order.
  const index_t n_items = Hkv * groups;
  std::vector<index_t> cost(static_cast<std::size_t>(n_items), 0);
  for (index_t it = 0; it < n_items; ++it) {
    const index_t hk = it / groups;
    index_t c = 0;
    for (index_t qb = it % groups * tiles; qb < std::min(nqb, (it % groups + 1) * tiles); ++qb)
      for (index_t g = 0; g < (shared ? 1 : G); ++g)
        mask.for_each_block(shared ? 0 : hk * G + g, qb, [&](index_t, bool) { ++c; });
    cost[static_cast<std::size_t>(it)] = shared ? c * G : c;
  }
  plan.order_.resize(static_cast<std::size_t>(n_items));
  std::iota(plan.order_.begin(), plan.order_.end(), index_t{0});
  std::stable_sort(plan.order_.begin(), plan.order_.end(), [&](index_t a, index_t b) {
    return cost[static_cast<std::size_t>(a)] > cost[static_cast<std::size_t>(b)];
  });

  if constexpr (!kernel::kPredicateNoexcept<Mask>) {
    plan.precompute_ = true;
    const index_t rows = (shared ? 1 : shape.heads_q) * nqb;
    plan.partial_offsets_.assign(1, 0);
    for (index_t r = 0; r < rows; ++r) {
      mask.for_each_block(r / nqb, r % nqb, [&](index_t kb, bool full) {
        if (!full) plan.partial_blocks_.push_back(static_cast<std::int32_t>(kb));
      });
      plan.partial_offsets_.push_back(static_cast<index_t>(plan.partial_blocks_.size()));
    }
    plan.bit_words_ = (ms.block_q * ms.block_k + 63) / 64;
    const index_t bits = detail::bounded_product(
        kMaxBytes - 64, {static_cast<index_t>(plan.partial_blocks_.size()), plan.bit_words_, 8});
    plan.bits_bytes_ = bits < 0 ? SIZE_MAX : static_cast<std::size_t>(bits + 63) / 64 * 64;
  }
  // Tiles never exceed the sequence, whatever the block sizes.
  plan.ldq_ = (std::min(ms.block_q, shape.n_q) + arch::kMaxTileQ - 1) / arch::kMaxTileQ * arch::kMaxTileQ;
  plan.bk_ = std::min(ms.block_k, std::max<index_t>(shape.n_k, 1));
  if (plan.key_mass_ && shape.n_q > opt.key_mass.row_begin) {
    plan.mass_ld_ = (std::min(ms.block_q, shape.n_q - opt.key_mass.row_begin) + arch::kMaxLanes - 1) /
                    arch::kMaxLanes * arch::kMaxLanes;
    arch::Carver mass;
    mass.take<std::atomic<std::int64_t>>(shape.heads_kv * shape.n_k);
    plan.mass_bytes_ = mass.bytes();
  }
  arch::Carver sizer;
  const arch::PrefillScratch ws = kernel::carve_prefill_scratch(
      sizer, G, tiles, shape.head_dim, shape.head_dim_v, plan.ldq_, plan.bk_, ms.num_k_blocks(),
      plan.mass_ld_, shape.n_k);
  plan.scratch_bytes_ = sizer.bytes();
  if (plan.bf16_ && arch::dispatch(plan.target_, [](auto t) { return decltype(t)::bf16_dot(); })) {
    plan.pack_words_ = ws.bkp / 2 * ws.dvp;
    arch::Carver pack;
    pack.take<std::uint32_t>(Hkv * ms.num_k_blocks() * plan.pack_words_);
    pack.take<std::uint8_t>(Hkv * ms.num_k_blocks());
    plan.pack_bytes_ = pack.bytes();
  }
  kernel::require_workspace_fits({plan.bits_bytes_, plan.pack_bytes_, plan.mass_bytes_},
                                 plan.scratch_bytes_, plan.workers_, shape, where);
  return plan;
}

/// Runs a planned prefill: attention of q [Hq, n_q, d] against k, v [Hkv, n_k, d|dv] under
/// `mask` (the plan's), written to out [Hq, n_q, dv]; Q, K, V, out element types float, bf16 or
/// fp16 (accumulation in fp32); queries are the last n_q positions of the n_k keys. Allocates
/// nothing; `workspace` holds plan.workspace_bytes() bytes, 64-byte aligned. Thread safety:
/// concurrent runs need distinct workspaces and outputs. Throws invalid_argument (views, options,
/// workspace or executor not matching the plan) before writing anything, and rethrows an
/// exception of the mask's predicate or of the executor with out and LSE untouched.
/// @param plan from plan_prefill() for this shape, mask block lists, options and target.
/// @param q [Hq, n_q, d] TensorView, any strides, fp32/bf16/fp16.
/// @param k [Hkv, n_k, d] TensorView or kv::PagedView, fp32/bf16/fp16.
/// @param v [Hkv, n_k, dv] same kind as k.
/// @param out [Hq, n_q, dv] TensorView, any non-aliasing strides, fp32/bf16/fp16 (rounded once).
/// @param mask the mask the plan was made with (or one with identical block lists); only its
///        geometry and head sharing are checked against the plan.
/// @param workspace at least plan.workspace_bytes() bytes, 64-byte aligned, not shared with a
///        concurrent run.
/// @param opt the plan's options: precision must match, key_mass.row_begin must be >= the plan's
///        (and key_mass needs a plan made with it), executor concurrency <= plan.workers(); scale
///        and lse may differ from plan time.
/// @throws sparse_attn::invalid_argument when a view is invalid, the views' shape or the mask's
///         geometry differs from the plan's, the precision differs, scale is not NaN and not
///         finite and > 0, key_mass is invalid or not planned, the workspace is too small,
///         misaligned or null, or the executor's concurrency exceeds the plan's; what the
///         predicate or the executor throws.
/// @par Complexity
/// O(Hq x (listed blocks x block_q x block_k x (d + dv))) flops over the executor; key mass adds
/// O(Hkv x n_k).
template <class QV, class KV, class VV, class OV, class Mask>
void prefill(const PrefillPlan& plan, const QV& q, const KV& k, const VV& v, const OV& out,
             const Mask& mask, Workspace workspace, const AttentionOptions& opt) {
  constexpr const char* where = "prefill";
  const index_t G = kernel::validate_qkvo(q, k, v, out, where);
  if (attention_shape(q, k, v) != plan.shape_)  // (the message is built only on failure)
    raise_invalid_argument(std::string(where) + ": the views have shape " + describe(attention_shape(q, k, v)) +
                           " but the plan was made for " + describe(plan.shape_));
  require(opt.precision == plan.precision_, where, ": precision ", precision_name(opt.precision),
          " differs from the plan's (", precision_name(plan.precision_), "); plan with the same options");
  const MaskShape& ms = mask.shape();
  require(ms.heads == plan.mask_shape_.heads && ms.n_q == plan.mask_shape_.n_q &&
              ms.n_k == plan.mask_shape_.n_k && ms.block_q == plan.mask_shape_.block_q &&
              ms.block_k == plan.mask_shape_.block_k && mask.head_shared() == plan.head_shared_,
          where, ": the mask's geometry differs from the plan's");
  const float scale = kernel::resolve_scale(opt.scale, q.dim, where);
  kernel::validate_key_mass(opt.key_mass, q.tokens, k.tokens, where);
  const KeyMassView& kmv = opt.key_mass;
  const bool want_mass = kmv.data != nullptr;
  require(!want_mass || (plan.key_mass_ && kmv.row_begin >= plan.mass_row_begin_), where,
          ": key_mass is set but the plan was made without it or for an earlier row_begin (",
          plan.mass_row_begin_, "); plan with the same options");
  detail::check_workspace(workspace, plan.workspace_bytes(), where);
  // No counted row (no query, or row_begin = n_q): every key gets 0.
  const index_t mass_rows = want_mass ? q.heads * (q.tokens - kmv.row_begin) : 0;
  auto zero_mass = [&] {
    if (want_mass && mass_rows == 0)
      for (index_t hk = 0; hk < k.heads; ++hk)
        std::fill(kmv.data + hk * kmv.stride, kmv.data + hk * kmv.stride + k.tokens, 0.0f);
  };
  if (q.tokens == 0 || q.heads == 0) return zero_mass();
  detail::with_executor(opt.executor_choice(), [&](Executor& exec) {
    require(exec.concurrency() <= plan.workers_, where, ": executor concurrency ",
            exec.concurrency(), " exceeds the plan's ", plan.workers_, " workers");
    zero_mass();
    auto* base = static_cast<unsigned char*>(workspace.data);
    const index_t nqb = ms.num_q_blocks(), groups = (nqb + plan.tiles_ - 1) / plan.tiles_;
    arch::PrefillKeyMass km;  // fixed point: value x 2^shift, with rows x 2^shift < 2^62
    if (mass_rows > 0) {
      int bits = 0;
      while (bits < 62 && (index_t{1} << bits) <= mass_rows) ++bits;
      km.scale = std::ldexp(1.0, 62 - bits);
      km.row_begin = kmv.row_begin;
      km.acc = reinterpret_cast<std::atomic<std::int64_t>*>(
          base + plan.bits_bytes_ + plan.pack_bytes_ + plan.scratch_bytes_ * static_cast<std::size_t>(plan.workers_));
      run_items(exec, k.heads, [&](index_t hk, int) {
        for (index_t j = 0; j < k.tokens; ++j) new (km.acc + hk * k.tokens + j) std::atomic<std::int64_t>(0);
      });
    }
    // bf16 products: V of every (KV head, key block) as pairs, once for all heads and query
    // blocks that read it.
    const index_t nkb = ms.num_k_blocks();
    auto* pack = reinterpret_cast<std::uint32_t*>(base + plan.bits_bytes_);
    auto* pack_bad = reinterpret_cast<std::uint8_t*>(pack + k.heads * nkb * plan.pack_words_);
    auto carve = [&](int worker) {
      arch::Carver c(base + plan.bits_bytes_ + plan.pack_bytes_ +
                     plan.scratch_bytes_ * static_cast<std::size_t>(worker));
      arch::PrefillScratch ws = kernel::carve_prefill_scratch(
          c, G, plan.tiles_, q.dim, v.dim, plan.ldq_, plan.bk_, nkb, km.acc != nullptr ? plan.mass_ld_ : 0,
          k.tokens);
      if (plan.pack_bytes_ > 0) {
        ws.vpack = pack;
        ws.vpack_bad = pack_bad;
        ws.vpack_words = plan.pack_words_;
        ws.vpack_nkb = nkb;
      }
      return ws;
    };
    if (plan.pack_bytes_ > 0)
      run_items(exec, k.heads * nkb, [&](index_t b, int worker) {
        const arch::PrefillScratch ws = carve(worker);
        const index_t k0 = ms.k_begin(b % nkb), nk = ms.k_end(b % nkb) - k0;
        arch::dispatch(plan.target_, [&](auto target) {
          pack_bad[b] = decltype(target)::pack_v_pairs(v, q.dim, b / nkb, k0, nk, ws, pack + b * plan.pack_words_);
        });
      });
    if constexpr (kernel::kIsLineMask<Mask>) {
      index_t group_columns = 0;  // the most columns of one KV head's group
      for (index_t hk = 0; hk < k.heads; ++hk)
        group_columns = std::max(group_columns, mask.first_column((hk + 1) * G - 1) +
                                                    mask.num_columns((hk + 1) * G - 1) - mask.first_column(hk * G));
      require(group_columns <= plan.line_columns_, where, ": the mask has ", group_columns,
              " columns in one KV head's group, more than the plan's ", plan.line_columns_,
              "; plan with this mask");
      const index_t d = q.dim, dv = v.dim, tq = plan.ldq_, ntl = plan.line_tiles_;
      const index_t step = arch::kLineStep, tl = arch::kLineTileKeys;
      arch::Carver lc(base + plan.bits_bytes_ + plan.pack_bytes_ +
                      plan.scratch_bytes_ * static_cast<std::size_t>(plan.workers_) + plan.mass_bytes_);
      const kernel::LineRegions reg(lc, d, dv, ntl, group_columns, G, k.tokens);
      const index_t span = tq * plan.tiles_, ngroups = (q.tokens + span - 1) / span, per_kv = G * ngroups;
      for (index_t hk = 0; hk < k.heads; ++hk) {
        // K and V of KV head hk transposed into overlapping tiles (arch::LineOperands), each tile
        // from its keys' rows converted to fp32 through the worker's block buffers: shared by
        // the items of the G heads that follow.
        run_items(exec, ntl, [&](index_t T, int worker) {
          const arch::PrefillScratch ws = carve(worker);
          float* kt = reg.kt + T * d * tl;
          float* vt = reg.vt + T * dv * tl;
          bool bad = false;
          for (index_t o0 = 0; o0 < tl; o0 += plan.bk_) {  // columns o0 .. o0 + no of the tile
            const index_t no = std::min(plan.bk_, tl - o0), j0 = T * step - step + o0;
            const index_t a = std::clamp<index_t>(-j0, 0, no), b = std::clamp<index_t>(k.tokens - j0, a, no);
            for (index_t x = a; x < b; ++x) {
              load_row(k.row(hk, j0 + x), k.stride_dim, ws.kbuf + x * d, d);
              load_row(v.row(hk, j0 + x), v.stride_dim, ws.vbuf + x * dv, dv);
            }
            for (index_t c = 0; c < d; ++c)
              for (index_t x = 0; x < no; ++x) kt[c * tl + o0 + x] = x >= a && x < b ? ws.kbuf[x * d + c] : 0.0f;
            for (index_t c = 0; c < dv; ++c)
              for (index_t x = 0; x < no; ++x) {
                const float y = x >= a && x < b ? ws.vbuf[x * dv + c] : 0.0f;
                bad = bad || !std::isfinite(y);
                vt[c * tl + o0 + x] = y;
              }
          }
          reg.bad[T] = bad ? 1 : 0;
        });
        const bool v_finite = std::none_of(reg.bad, reg.bad + ntl, [](std::uint8_t x) { return x != 0; });
        // The columns of the group's heads gathered: K and V rows as fp32, in column order.
        const index_t group_first = mask.first_column(hk * G);
        run_items(exec, G, [&](index_t g, int) {
          const index_t h = hk * G + g, first = mask.first_column(h) - group_first;
          kernel::plan_line_band(reg, g, mask.offsets(h), mask.num_offsets(h));
          const std::int32_t* cols = mask.columns(h);
          for (index_t t = 0; t < mask.num_columns(h); ++t) {
            load_row(k.row(hk, cols[t]), k.stride_dim, reg.kg + (first + t) * d, d);
            load_row(v.row(hk, cols[t]), v.stride_dim, reg.vg + (first + t) * dv, dv);
          }
        });
        run_items(exec, per_kv, [&](index_t oi, int worker) {
          const arch::PrefillScratch ws = carve(worker);
          const index_t it = plan.order_[static_cast<std::size_t>(hk * per_kv + oi)];
          const index_t h = it / ngroups, q0 = it % ngroups * span;
          arch::LineOperands lo;
          lo.cols = mask.columns(h);
          lo.ncols = mask.num_columns(h);
          lo.kg = reg.kg + (mask.first_column(h) - group_first) * d;
          lo.vg = reg.vg + (mask.first_column(h) - group_first) * dv;
          lo.offs = mask.offsets(h);
          lo.noffs = mask.num_offsets(h);
          lo.col_flags = mask.column_flags(h);
          lo.off_flags = mask.offset_flags(h);
          lo.hk = hk;
          lo.ktiles = reg.kt;
          lo.vtiles = reg.vt;
          lo.v_finite = v_finite;
          lo.n_k = k.tokens;
          lo.q_offset = ms.q_offset();
          const index_t g = h - hk * G;
          lo.off_bits = reg.off_bits + g * reg.words;
          lo.dense = reg.dense + g * reg.windows;
          lo.windows = reg.windows;
          lo.res_offs = reg.res_offs + g * reg.keys;
          lo.res_lanes = reg.res_lanes + g * reg.keys;
          lo.nres = reg.nres[g];
          arch::dispatch(plan.target_, [&](auto target) {
            decltype(target)::prefill_lines_item(lo, plan.bk_, q, k, v, out, opt.lse, scale, plan.bf16_, h,
                                                 q0, std::min(span, q.tokens - q0), ws);
          });
        });
      }
      return;
    }
    auto run_all = [&](const auto& m) {
      run_items(exec, plan.num_items(), [&](index_t oi, int worker) {
        const arch::PrefillScratch ws = carve(worker);
        const index_t it = plan.order_[static_cast<std::size_t>(oi)];
        arch::dispatch(plan.target_, [&](auto target) {
          decltype(target)::prefill_item(m, q, k, v, out, opt.lse, scale, plan.bf16_, G, it / groups,
                                         it % groups * plan.tiles_, plan.tiles_, ws, km);
        });
      });
    };
    if constexpr (kernel::kPredicateNoexcept<Mask>) {
      run_all(mask);
    } else {
      // Evaluate every partial block's predicate first: an exception leaves out untouched.
      auto* bits = reinterpret_cast<std::uint64_t*>(base);
      const index_t rows = static_cast<index_t>(plan.partial_offsets_.size()) - 1;
      run_items(exec, rows, [&](index_t r, int) {
        const index_t h = r / nqb, qb = r % nqb, q0 = ms.q_begin(qb), q1 = ms.q_end(qb);
        for (index_t p = plan.partial_offsets_[static_cast<std::size_t>(r)];
             p < plan.partial_offsets_[static_cast<std::size_t>(r) + 1]; ++p) {
          const index_t kb = plan.partial_blocks_[static_cast<std::size_t>(p)];
          std::uint64_t* w = bits + p * plan.bit_words_;
          std::fill(w, w + plan.bit_words_, std::uint64_t{0});
          for (index_t i = q0; i < q1; ++i)
            for (index_t j = ms.k_begin(kb); j < ms.k_end(kb); ++j)
              if (mask.allowed_in_block(h, i, j)) {
                const index_t bit = (i - q0) * ms.block_k + (j - ms.k_begin(kb));
                w[bit / 64] |= std::uint64_t{1} << (bit % 64);
              }
        }
      });
      run_all(PrecomputedMask<Mask>(mask, plan, bits));
    }
    if (km.acc == nullptr) return;
    run_items(exec, k.heads, [&](index_t hk, int) {  // fixed point -> fp32 (bit 63: NaN)
      const std::atomic<std::int64_t>* acc = km.acc + hk * k.tokens;
      float* row = kmv.data + hk * kmv.stride;
      for (index_t j = 0; j < k.tokens; ++j) {
        const std::int64_t x = acc[j].load(std::memory_order_relaxed);
        row[j] = x < 0 ? std::numeric_limits<float>::quiet_NaN()
                       : static_cast<float>(static_cast<double>(x) / km.scale);
      }
    });
  });
}

/// One-call prefill: plan_prefill + a workspace allocated for this call + run (see both).
/// @param q [Hq, n_q, d] TensorView, any strides, fp32/bf16/fp16.
/// @param k [Hkv, n_k, d] TensorView or kv::PagedView.
/// @param v [Hkv, n_k, dv] same kind as k.
/// @param out [Hq, n_q, dv] TensorView, non-aliasing.
/// @param mask the mask, geometry [Hq, n_q, n_k].
/// @param opt options.
/// @throws as plan_prefill() and prefill(const PrefillPlan&, ...); std::bad_alloc for the plan and
///         the workspace (the only allocations). Safe to call concurrently on distinct outputs.
template <class QV, class KV, class VV, class OV, class Mask>
void prefill(const QV& q, const KV& k, const VV& v, const OV& out, const Mask& mask,
             const AttentionOptions& opt = {}) {
  kernel::validate_qkvo(q, k, v, out, "prefill");
  const PrefillPlan plan = plan_prefill(attention_shape(q, k, v), mask, opt);
  const WorkspaceBuffer workspace(plan.workspace_bytes());
  prefill(plan, q, k, v, out, mask, workspace.view(), opt);
}

SPARSE_ATTN_NAMESPACE_END
