// Plain data the kernel drivers (kernel/) hand to the per-target bodies (arch/detail/bodies-inl.hpp):
// per-worker scratch carved from the caller's workspace, and decode partial states.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch {

/// Largest lane count of any target: buffers padded to it suit every target.
inline constexpr index_t kMaxLanes = 16;
/// Queries of the widest prefill micro-tile of any target (4 x 16).
inline constexpr index_t kMaxTileQ = 64;

/// One worker's prefill scratch (T = tiles x G head tiles: G heads x the item's query tiles),
/// 64-byte aligned arrays.
struct PrefillScratch {
  index_t ldq = 0;      // padded tile width, a multiple of kMaxTileQ
  float* qt = nullptr;  // [T][d][ldq]   scaled, transposed queries
  float* ot = nullptr;  // [T][dv][ldq]  transposed unnormalised output
  float* m = nullptr;   // [T][ldq]      running max of logits
  float* l = nullptr;   // [T][ldq]      running sum of e^{s - m}
  index_t* tile_blocks = nullptr;  // tiles > 1: [tiles][key blocks] lists, [tiles] counts, [tiles] positions
  float* s = nullptr;   // [bkp][ldq]    logits, then probabilities
  float* kbuf = nullptr;  // [bk][d]     K block as fp32 (when not read in place)
  float* vbuf = nullptr;  // [bk][dv]    V block as fp32
  float* vfix = nullptr;  // [bk][dv]    V block with non-finite elements zeroed (corrupt data)
  float* row = nullptr;   // [max(d, dv)]
  // bf16 products (Precision::bfloat16) on targets with bf16 dot products; dp = d and bkp = bk padded
  // to 32, dvp = dv padded to 16 (the AMX tile shapes).
  index_t dp = 0, dvp = 0, bkp = 0;
  std::uint32_t* qp = nullptr;  // [T][dp / 2][ldq] queries as bf16 pairs (Q[i][2c], Q[i][2c+1])
  std::uint32_t* pp = nullptr;  // [bkp / 2][ldq]   probabilities as bf16 pairs (P[2j][i], P[2j+1][i])
  bf16* kb = nullptr;           // [bkp][dp]        K block as bf16 (when not read in place)
  std::uint32_t* vp = nullptr;  // [bkp / 2][dvp]   V block as pairs (V[2j][c], V[2j+1][c])
  std::uint32_t* vt = nullptr;  // [dvp][bkp / 2]   the pairs transposed (AMX's A operand)
  bf16* vrow = nullptr;         // [2][dvp]         V rows with non-finite elements zeroed
  // V of every (KV head, key block) packed once per call by the plan's pass (shared, read-only):
  // block (hk, kb) at vpack + (hk * vpack_nkb + kb) * vpack_words, laid out like vp;
  // vpack_bad[hk * vpack_nkb + kb] != 0 when the block's V holds a NaN or inf.
  const std::uint32_t* vpack = nullptr;
  const std::uint8_t* vpack_bad = nullptr;
  index_t vpack_words = 0, vpack_nkb = 0;
  // Key mass (AttentionOptions::key_mass) only; null otherwise. The logits of the item's
  // key-mass rows (those >= row_begin), per head g of the group, in the order the key blocks
  // are visited: ks[(g * ks_nk + pos) * ks_ld + i].
  float* ks = nullptr;           // [G][n_k][ks_ld]
  index_t ks_ld = 0, ks_nk = 0;  // ks_ld: a multiple of kMaxLanes
  index_t* ks_blocks = nullptr;  // [G][key blocks] visited key blocks, in visit order
  index_t* ks_state = nullptr;   // [G][2] blocks visited, keys stored
  float* ks_col = nullptr;       // [2][ks_ld] per row: final max, 1 / sum (0: not counted)
  float* ks_sum = nullptr;       // [block_k] mass of one key block
};

/// One line-mask prefill item's operands (kernel/prefill.hpp, LineMask): query head h's lines
/// and the K/V copies the run prepared. The vertical lines: head h's columns (ascending) with
/// their K and V rows gathered as fp32 ([ncols][d], [ncols][dv]). The diagonals: head h's
/// offsets (ascending) read from its KV head's K and V transposed as fp32 in overlapping key
/// tiles (see kLineTileKeys): any kMaxLanes consecutive keys from key -kLineStep on lie in one
/// tile, contiguous per dim, and a window of keys touches few pages.
struct LineOperands {
  const std::int32_t* cols = nullptr;  // [ncols] columns, ascending
  index_t ncols = 0;
  const float* kg = nullptr;  // [ncols][d]  gathered K rows
  const float* vg = nullptr;  // [ncols][dv] gathered V rows
  const std::int32_t* offs = nullptr;  // [noffs] offsets, ascending
  index_t noffs = 0;
  const std::uint8_t* col_flags = nullptr;  // [n_k] 1 = a column (its diagonal pairs are skipped)
  const std::uint8_t* off_flags = nullptr;  // [n_k] 1 = an offset (the key-block fallback's test)
  index_t hk = 0;                           // the KV head
  const float* ktiles = nullptr;  // [tiles][d][kLineTileKeys]  transposed K tiles
  const float* vtiles = nullptr;  // [tiles][dv][kLineTileKeys] transposed V tiles
  bool v_finite = true;  // the KV head's V holds no inf or NaN
  index_t n_k = 0, q_offset = 0;
  // The band plan of head h (kernel/prefill.hpp, LineRegions): window m of a query tile starting
  // at position p0 is the keys [p0 - m kLineWindow, p0 - m kLineWindow + kLineWindow); lane i
  // of offset delta falls in window ceil((delta - i) / kLineWindow), whatever p0 is.
  const std::uint64_t* off_bits = nullptr;  // bit delta + kLineWindow set iff delta is an offset
  const std::uint8_t* dense = nullptr;      // [windows] 1 = the window runs as a dense block
  index_t windows = 0;                      // entries of dense
  const std::int32_t* res_offs = nullptr;   // [nres] offsets with a lane outside dense windows
  const std::uint64_t* res_lanes = nullptr; // [nres] those lanes (bit i: lane i)
  index_t nres = 0;
};

/// Keys between the starts of consecutive transposed tiles of LineOperands.
inline constexpr index_t kLineStep = 64;
/// Keys in one transposed tile: tile T holds keys T kLineStep - kLineStep + x for x <
/// kLineTileKeys (zero outside [0, n_k)); the kMaxLanes of overlap keep every packet of
/// consecutive keys inside one tile.
inline constexpr index_t kLineTileKeys = kLineStep + kMaxLanes;

/// Query tiles (of kMaxTileQ queries) of one line-mask work item: each diagonal is computed for
/// all of them before the next, so the keys the tiles share (adjacent windows of one diagonal,
/// overlapping windows of nearby diagonals) are read from the caches once.
inline constexpr index_t kLineTiles = 4;
/// Diagonals per online-softmax step of a line-mask tile.
inline constexpr index_t kLineSlots = 16;
/// Keys of one band window of a line-mask tile (see LineOperands): a window whose diagonals
/// hold enough pairs runs as one dense block with a bit mask, so it equals the query tile.
inline constexpr index_t kLineWindow = kMaxTileQ;
static_assert(kLineWindow == 64, "a window's lane masks are 64-bit words");
/// A window runs dense when its diagonals' pairs are at least kLineDenseNum / kLineDenseDen of
/// its kLineWindow x kLineWindow pairs: a diagonal pair costs about 3 dense pairs (it reads
/// its own K and V row), so above about 1/3 the dense block is cheaper.
inline constexpr index_t kLineDenseNum = 3, kLineDenseDen = 10;

/// Where a prefill item adds its key mass: fixed-point sums (value x 2^shift, bit 63 marks NaN),
/// so the total does not depend on the order in which items finish.
struct PrefillKeyMass {
  std::atomic<std::int64_t>* acc = nullptr;  // [Hkv][n_k]; null: no key mass
  double scale = 0.0;                        // 2^shift
  index_t row_begin = 0;
};

/// Partial online-softmax state of one decode (row group, chunk) item.
struct DecodePartial {
  float* o;  // [Rp][dvp] unnormalised, in the runner's output dim order (see out_dim)
  float* m;  // [Rp] running max of logits
  float* l;  // [Rp] running sum of e^{s - m}
  float* logits = nullptr;  // key mass only: [R][ld] the logits of the item's keys (-inf masked)
  index_t ld = 0;
};

}  // namespace arch
SPARSE_ATTN_NAMESPACE_END

SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch {

/// Cuts 64-byte aligned arrays out of a byte buffer in a fixed order; with a null base it only
/// counts, so the same code sizes a workspace (plan) and carves it (run).
class Carver {
 public:
  explicit Carver(unsigned char* base = nullptr) : base_(base) {}
  // Sizing never wraps: a request beyond kMaxBytes in all (or a negative count) marks the carver
  // exhausted, bytes() then reports SIZE_MAX and plans refuse the shape. Carving real memory
  // repeats the takes of a sizing that succeeded, so it never gets there.
  template <class T>
  T* take(index_t count) {
    offset_ = (offset_ + 63) / 64 * 64;
    T* p = base_ != nullptr && !exhausted_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    const auto room = static_cast<std::size_t>(kMaxBytes) - std::min(offset_, static_cast<std::size_t>(kMaxBytes));
    if (count < 0 || static_cast<std::size_t>(count) > room / sizeof(T)) exhausted_ = true;
    else offset_ += static_cast<std::size_t>(count) * sizeof(T);
    return p;
  }
  std::size_t bytes() const { return exhausted_ ? SIZE_MAX : (offset_ + 63) / 64 * 64; }

 private:
  unsigned char* base_;
  std::size_t offset_ = 0;
  bool exhausted_ = false;
};

/// One worker's decode scratch; element types of K and V are erased to bytes.
struct DecodeScratch {
  float* qs = nullptr;              // [Rp][dp] scaled queries (key dim order)
  void* qb = nullptr;               // [Rp][d] bf16 queries (dot path)
  float* kbuf = nullptr;            // [block][dp] converted key rows (non-direct layouts)
  float* vbuf = nullptr;            // [block][dvp] converted value rows
  float* s = nullptr;               // [Rp / KR][block][KR] logits, then probabilities
  std::uint32_t* pt = nullptr;      // [Rp][block / 2] bf16 probability pairs (dot path)
  void* kzero = nullptr;            // [dp] zero key row (padding keys)
  void* vzero = nullptr;            // [dvp] zero value row
  float* tmp = nullptr;             // [max(dp, dvp)]
  void* vfix = nullptr;             // [block][dvp] V rows with non-finite elements zeroed
  float* merge = nullptr;           // [dvp] merge accumulator

  /// Lays out the arrays for Rp rows, key head dim d (padded dp), value dim padded dvp, K and V
  /// element sizes.
  static DecodeScratch carve(Carver& c, index_t Rp, index_t d, index_t dp, index_t dvp,
                             std::size_t k_size, std::size_t v_size, index_t block) {
    DecodeScratch w;
    w.qs = c.take<float>(Rp * dp);
    w.qb = c.take<std::uint16_t>(Rp * d);
    w.kbuf = c.take<float>(block * dp);
    w.vbuf = c.take<float>(block * dvp);
    w.s = c.take<float>(Rp * block);
    w.pt = c.take<std::uint32_t>(Rp * block / 2);
    w.kzero = c.take<unsigned char>(dp * static_cast<index_t>(k_size));
    w.vzero = c.take<unsigned char>(dvp * static_cast<index_t>(v_size));
    w.tmp = c.take<float>(dp > dvp ? dp : dvp);
    w.vfix = c.take<unsigned char>(block * dvp * static_cast<index_t>(v_size));
    w.merge = c.take<float>(dvp);
    return w;
  }
};

}  // namespace arch
SPARSE_ATTN_NAMESPACE_END
