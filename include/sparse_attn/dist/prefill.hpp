/// @file
/// Context-parallel prefill over MPI: one causal (or any) self-attention prefill of n tokens split
/// over the P ranks of a communicator in the zig-zag layout (dist/zigzag.hpp), K/V blocks passed
/// around a ring, exact to the single-process prefill up to fp32 rounding.
///
/// Schedule. At shift s = 0 .. P-1 rank r computes its queries against the K/V chunks of rank
/// (r - s) mod P, received at that shift, and sends its own K/V to rank (r + s) mod P. The
/// nonblocking receives and sends of shift s + 1 are posted before shift s is computed, and the
/// computation tests them between kernel calls (MPI_Testall) so the transfer progresses while the
/// kernel runs: with one message in flight per direction, communication hides behind compute as
/// long as a chunk-pair's kernel time exceeds its transfer time.
///
/// Exactness. Each (query chunk, key chunk) pair is one call of the prefill kernel
/// (kernel/prefill.hpp) with its LSE output, on the global mask restricted to the pair
/// (detail::PairMask: rows of the query chunk, the received key blocks, element tests on global
/// positions). Its result is the softmax over a subset K_j of the row's allowed keys; the subsets
/// of the pairs are disjoint and cover the row, so merging the partials with merge_states
/// (o = sum_j e^{lse_j - lse} o_j, lse = log sum_j e^{lse_j}) gives exactly the row's attention
/// over all its keys, up to fp32 rounding of the merge.
///
/// Skipping. Every rank walks the whole global mask once (O(listed blocks)) and derives, for
/// every rank b and key block kb, whether some query block of b lists kb. Since every rank holds
/// the same mask (checked by a fingerprint), sender and receiver agree on which messages exist
/// and on their contents without any extra communication: rank a sends to b only the key blocks
/// of its chunks that b needs, packed in ascending order (no message when none), and b calls the
/// kernel only for pairs with at least one listed block. A sliding window therefore moves about
/// one window of K/V per neighbouring chunk instead of whole chunks, and a block-sparse mask moves
/// only its listed blocks.
///
/// Cost at one rank. Next to the kernel's own work, a pair costs: the key map of its partial
/// blocks (one addition when its key blocks are consecutive, the usual case; an IntervalMask
/// masks a whole logit block from each row's two intervals), its plan, and for a chunk's later
/// pairs the fp32 partial and its merge. This rank's own K/V are read in place (no copy), an
/// fp32 output is the accumulator itself, a pair runs only the query rows from its first to
/// its last listed query block, and merged pairs run in slabs of query blocks so the partial
/// stays small: fresh buffers pay a page fault per page on every call, which for a window costs
/// about as much as the attention itself.
///
/// See docs/DISTRIBUTED.md, section "Prefill", for the byte counts and the compute balance.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/dist/communicator.hpp"
#include "sparse_attn/dist/zigzag.hpp"
#include "sparse_attn/kernel/prefill.hpp"
#include "sparse_attn/kernel/softmax_state.hpp"
#include "sparse_attn/mask/block_mask.hpp"
#include "sparse_attn/mask/patterns.hpp"

#include <mpi.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

SPARSE_ATTN_NAMESPACE_BEGIN
namespace dist {

/// What one rank did in a dist::prefill call: traffic and work, for tests and benchmarks (e.g.
/// to show that a sparse mask moves fewer bytes). A plain value.
struct PrefillStats {
  index_t bytes_sent = 0;          ///< K/V payload bytes this rank sent (MPI message bytes).
  index_t bytes_received = 0;      ///< K/V payload bytes this rank received.
  index_t messages_sent = 0;       ///< Point-to-point messages sent (one for K, one for V per chunk).
  index_t messages_received = 0;   ///< Point-to-point messages received.
  index_t key_blocks_received = 0; ///< Key blocks (of block_k tokens, all K/V heads) received.
  index_t chunk_pairs_computed = 0;  ///< (query chunk, key chunk) pairs computed by the kernel.
  index_t chunk_pairs_skipped = 0;   ///< Pairs of non-empty chunks skipped: no listed block.
  /// Listed (query head, query block, key block) triples of this rank's queries, i.e. the
  /// blocks the kernel computed here (a head-shared mask counts each head).
  index_t blocks_computed = 0;
};

namespace detail {

// Tags of the prefill's messages: base + 2 x (slot of the key chunk at its owner) + (0 K, 1 V).
// Between two ranks messages flow at one shift only, so the tag needs no shift.
inline constexpr int kPrefillTagBase = 0x5A70;

// Most bytes of one merged pair's fp32 partial output (prefill() runs larger pairs in slabs of
// query blocks): 4 MiB, a few calls' worth of kernel setup against 32 MiB of first-touch page
// faults per call for a 2048-row, 32-head, d = 128 chunk.
inline constexpr index_t kPartBytes = index_t{4} << 20;

// The mask's kind and parameters, so that ranks disagreeing on them get a message naming them
// (the block-list fingerprint would catch most differences too, but only as a hash).
struct MaskParams {
  index_t kind = 0, window = 0, sinks = 0, dense_last_rows = 0;
};
template <class Mask>
MaskParams mask_params(const Mask&) { return {0, 0, 0, 0}; }
template <class Pred>
MaskParams mask_params(const BlockListMask<Pred>&) { return {2, 0, 0, 0}; }
inline MaskParams mask_params(const IntervalMask& m) {
  return {1, m.window(), m.sinks(), m.dense_last_rows()};
}

// FNV-1a over 64-bit words: a cheap fingerprint of the block lists every rank walks anyway.
struct Fnv {
  std::uint64_t h = 1469598103934665603ull;
  void add(std::uint64_t x) {
    for (int b = 0; b < 8; ++b) {
      h ^= (x >> (8 * b)) & 0xFFu;
      h *= 1099511628211ull;
    }
  }
};

// What every rank derives from the global mask, identically: which key blocks each rank needs,
// how many blocks each (query chunk, key chunk) pair lists, and the mask's fingerprint.
struct PrefillSchedule {
  ZigZagLayout layout;
  index_t nkb = 0;
  std::vector<std::uint8_t> need;  // [P][nkb]: some query block of rank b lists key block kb
  std::vector<index_t> pair_blocks;  // [2P][2P]: listed (head, q block, k block) of the pair
  // [2P][2P]: first and last global query block listing a block of the pair: the kernel runs
  // only these rows (the others get nothing from the pair), so a window's pair of distant
  // chunks computes, stores and merges a few blocks of rows instead of the whole chunk.
  std::vector<std::array<index_t, 2>> pair_qblocks;
  std::uint64_t fingerprint = 0;
  bool needs(int rank, index_t kb) const { return need[static_cast<std::size_t>(rank * nkb + kb)] != 0; }
  index_t blocks(index_t qc, index_t kc) const {
    return pair_blocks[static_cast<std::size_t>(qc * layout.num_chunks() + kc)];
  }
  // The key blocks of chunk c that rank b needs, ascending (the contents of the message from
  // c's owner to b, or of b's own pack).
  std::vector<std::int32_t> blocks_for(int rank, index_t c, index_t block_k) const {
    std::vector<std::int32_t> out;
    const TokenRange r = layout.chunk(c);
    if (r.size() == 0) return out;
    for (index_t kb = r.begin / block_k; kb < (r.end - 1) / block_k + 1; ++kb)
      if (needs(rank, kb)) out.push_back(static_cast<std::int32_t>(kb));
    return out;
  }
};

// One walk over the global mask: O(listed blocks) plus what the mask's for_each_block costs.
template <class Mask>
PrefillSchedule make_schedule(const Mask& mask, int ranks) {
  const MaskShape& s = mask.shape();
  PrefillSchedule sch;
  sch.layout = zigzag_layout(s.n_k, ranks, s.block_q, s.block_k);
  sch.nkb = s.num_k_blocks();
  const index_t C = sch.layout.num_chunks();
  sch.need.assign(static_cast<std::size_t>(ranks * sch.nkb), 0);
  sch.pair_blocks.assign(static_cast<std::size_t>(C * C), 0);
  sch.pair_qblocks.assign(static_cast<std::size_t>(C * C), {std::numeric_limits<index_t>::max(), -1});
  Fnv f;
  const bool shared = mask.head_shared();
  const index_t nh = shared ? 1 : s.heads, weight = shared ? s.heads : 1;
  for (index_t h = 0; h < nh; ++h)
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
      const index_t qc = sch.layout.chunk_of(s.q_begin(qb));
      const int b = sch.layout.owner(qc);
      f.add(static_cast<std::uint64_t>(h * s.num_q_blocks() + qb) | (std::uint64_t{1} << 63));
      mask.for_each_block(h, qb, [&](index_t kb, bool full) {
        const index_t kc = sch.layout.chunk_of(s.k_begin(kb));
        sch.need[static_cast<std::size_t>(b * sch.nkb + kb)] = 1;
        sch.pair_blocks[static_cast<std::size_t>(qc * C + kc)] += weight;
        std::array<index_t, 2>& qr = sch.pair_qblocks[static_cast<std::size_t>(qc * C + kc)];
        qr[0] = std::min(qr[0], qb);
        qr[1] = std::max(qr[1], qb);
        f.add(static_cast<std::uint64_t>(kb) * 2 + (full ? 1 : 0));
      });
    }
  sch.fingerprint = f.h;
  return sch;
}

// The global mask restricted to one (query chunk, key blocks) pair, in the kernel's local
// coordinates: query i of the pair is global position q0 + i (query blocks align, since chunks
// hold whole blocks). The pair's key blocks are global blocks kb_first .. kb_first + count - 1;
// local key block t0 + i holds global block kb_first + i (contiguous mode: the caller's own K/V
// views, or a received pack of consecutive blocks), or, in table mode (a received pack of
// scattered blocks), local block i holds global block blocks[i]. The contiguous mode maps a key
// by one addition, where the table mode needs a division (and a lower_bound per listed block):
// partial blocks test every element, so the map's cost counts (windows: about half of the
// blocks are partial). The local shape is non-causal with n_k >= n_q (the K/V view is padded or
// widened): the kernel's own suffix convention (q_offset = n_k - n_q) is thus never used,
// causality comes from the global mask's element test on global positions, which is exact on
// the diagonal. A global block shorter than block_k (the sequence's last) is listed as partial,
// so that the element test cuts the padding rows that may follow it.
template <class Mask>
class PairMask {
 public:
  // Contiguous mode: local block t0 + i is global block kb_first + i, i < count.
  PairMask(const Mask& global, index_t n_q, index_t n_k, index_t q0, index_t kb_first, index_t count, index_t t0)
      : g_(global), q0_(q0), qb0_(q0 / global.shape().block_q), first_(kb_first), last_(kb_first + count - 1) {
    const MaskShape& s = global.shape();
    shape_ = MaskShape{s.heads, n_q, n_k, s.block_q, s.block_k, false};
    t0_ = t0;
    k_lo_ = t0 * s.block_k;
    k_hi_ = (t0 + count) * s.block_k;
    k_shift_ = (kb_first - t0) * s.block_k;
  }
  // Table mode: local block i is global block blocks[i] (ascending, non-empty).
  PairMask(const Mask& global, index_t n_q, index_t n_k, index_t q0, const std::vector<std::int32_t>& blocks)
      : PairMask(global, n_q, n_k, q0, blocks.front(), blocks.back() - blocks.front() + 1, 0) {
    if (!is_contiguous(blocks)) table_ = &blocks;
  }
  // Whether blocks (ascending, distinct) are consecutive: then the contiguous mode applies.
  static bool is_contiguous(const std::vector<std::int32_t>& blocks) {
    return blocks.empty() || blocks.back() - blocks.front() + 1 == static_cast<std::int32_t>(blocks.size());
  }
  const MaskShape& shape() const { return shape_; }
  bool head_shared() const { return g_.head_shared(); }
  template <class F>
  void for_each_block(index_t h, index_t qb, F&& f) const {
    const MaskShape& s = g_.shape();
    g_.for_each_block(h, qb0_ + qb, [&](index_t kb, bool full) {
      if (kb < first_ || kb > last_) return;
      index_t t = kb - first_ + t0_;
      if (table_ != nullptr) {
        const auto it = std::lower_bound(table_->begin(), table_->end(), static_cast<std::int32_t>(kb));
        if (it == table_->end() || *it != kb) return;  // (cannot happen: every listed block is sent)
        t = static_cast<index_t>(it - table_->begin());
      }
      f(t, full && s.k_end(kb) - s.k_begin(kb) == s.block_k);
    });
  }
  bool allowed_in_block(index_t h, index_t qi, index_t kj) const
      noexcept(noexcept(std::declval<const Mask&>().allowed_in_block(index_t{}, index_t{}, index_t{}))) {
    const index_t j = global_key(kj);
    if (j < 0) return false;
    return g_.allowed_in_block(h, q0_ + qi, j);
  }
  // The whole logit block at once (the kernel's mask_block hook, arch::masks_blocks), for an
  // IntervalMask only (its pattern is the same for every head, the hook has no head): each row's
  // allowed keys are two intervals, so the block costs one row() per query instead of one
  // element test (with the key map) per element. s is [key j][query i] with leading dimension
  // ldq; the block is local keys k0 .. k0 + nk - 1 of one key block.
  template <class M = Mask, std::enable_if_t<std::is_same_v<M, IntervalMask>, int> = 0>
  void mask_block(float* s, index_t ldq, index_t q0, index_t rows, index_t k0, index_t nk) const noexcept {
    const index_t j0 = global_key(k0);
    // Keys past the sequence's end (the padding of a short last block) are never allowed.
    const index_t valid = j0 < 0 ? 0 : std::min(nk, g_.shape().n_k - j0);
    for (index_t i = 0; i < rows; ++i) {
      const IntervalMask::Row r = g_.row(q0_ + q0 + i);
      for (index_t j = 0; j < nk; ++j) {
        const index_t kj = j0 + j;
        const bool ok = j < valid && (kj < r.a_end || (kj >= r.b_begin && kj < r.b_end));
        if (!ok) s[j * ldq + i] = -std::numeric_limits<float>::infinity();
      }
    }
  }

 private:
  // Global key position of local key kj, or -1 outside the pair's blocks and the sequence.
  index_t global_key(index_t kj) const noexcept {
    index_t j;
    if (table_ == nullptr) {
      if (kj < k_lo_ || kj >= k_hi_) return -1;
      j = kj + k_shift_;
    } else {
      const index_t bk = shape_.block_k, t = kj / bk;
      if (t >= static_cast<index_t>(table_->size())) return -1;
      j = index_t{(*table_)[static_cast<std::size_t>(t)]} * bk + kj % bk;
    }
    return j < g_.shape().n_k ? j : -1;  // padding after the sequence's short last block
  }

  const Mask& g_;
  MaskShape shape_;
  index_t q0_, qb0_, first_, last_, t0_ = 0, k_lo_ = 0, k_hi_ = 0, k_shift_ = 0;
  const std::vector<std::int32_t>* table_ = nullptr;
};

// K/V rows of some key blocks, head-major [Hkv][rows][d] and [Hkv][rows][dv] (the caller's
// layout, so that a run of consecutive rows is sent straight from the caller's views with a
// strided datatype, no pack): per head the first `tokens` rows are real (the blocks, in
// order), the rest zero padding (receive side only).
template <class KT, class VT>
struct KvPack {
  std::vector<std::int32_t> blocks;
  index_t tokens = 0, rows = 0;
  std::vector<KT> k;
  std::vector<VT> v;
  // Sizes the pack, reusing its memory from the previous shift of the same parity: only the
  // padding rows are zeroed (the real rows are received or copied over in full), so a shift
  // does not rewrite its whole buffer twice.
  void allocate(index_t tok, index_t nrows, index_t hkv, index_t d, index_t dv) {
    tokens = tok;
    rows = nrows;
    k.resize(static_cast<std::size_t>(rows * hkv * d));
    v.resize(static_cast<std::size_t>(rows * hkv * dv));
    for (index_t h = 0; h < hkv; ++h) {
      std::fill(k.begin() + static_cast<std::ptrdiff_t>((h * rows + tokens) * d),
                k.begin() + static_cast<std::ptrdiff_t>((h + 1) * rows * d), from_float<KT>(0.0f));
      std::fill(v.begin() + static_cast<std::ptrdiff_t>((h * rows + tokens) * dv),
                v.begin() + static_cast<std::ptrdiff_t>((h + 1) * rows * dv), from_float<VT>(0.0f));
    }
  }
};

// A datatype of `blocks` runs of `len` elements, `stride` elements apart (committed; the caller
// frees it once the operation is posted, which MPI allows), or the plain type for one run.
struct StridedType {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  int count = 0;
  bool owned = false;
  StridedType(MPI_Datatype base, index_t blocks, index_t len, index_t stride) {
    if (blocks <= 1 || stride == len) {
      type = base;
      count = static_cast<int>(blocks * len);
    } else {
      MPI_Type_vector(static_cast<int>(blocks), static_cast<int>(len), static_cast<int>(stride), base, &type);
      MPI_Type_commit(&type);
      count = 1;
      owned = true;
    }
  }
  StridedType(const StridedType&) = delete;
  StridedType& operator=(const StridedType&) = delete;
  ~StridedType() {
    if (owned) MPI_Type_free(&type);
  }
};

// Real tokens of a list of key blocks (every block full but the sequence's last).
inline index_t block_tokens(const std::vector<std::int32_t>& blocks, const MaskShape& s) {
  index_t t = 0;
  for (std::int32_t kb : blocks) t += s.k_end(kb) - s.k_begin(kb);
  return t;
}

// Copies the listed key blocks of this rank's chunk (local tokens from `local0`, chunk starting
// at global position `chunk0`) from the caller's views into the pack's first rows.
template <class KV, class VV, class KT, class VT>
void fill_pack(KvPack<KT, VT>& p, const KV& k, const VV& v, const MaskShape& s, index_t chunk0,
               index_t local0) {
  const index_t hkv = k.heads, d = k.dim, dv = v.dim;
  // Rows with unit channel stride are copied whole (memcpy); other strides element by element.
  const bool rows_k = k.stride_dim == 1, rows_v = v.stride_dim == 1;
  index_t row = 0;
  for (std::int32_t kb : p.blocks)
    for (index_t j = s.k_begin(kb); j < s.k_end(kb); ++j, ++row) {
      const index_t t = local0 + (j - chunk0);
      for (index_t h = 0; h < hkv; ++h) {
        KT* kd = p.k.data() + (h * p.rows + row) * d;
        VT* vd = p.v.data() + (h * p.rows + row) * dv;
        if (rows_k) std::memcpy(kd, k.row(h, t), static_cast<std::size_t>(d) * sizeof(KT));
        else for (index_t c = 0; c < d; ++c) kd[c] = k(h, t, c);
        if (rows_v) std::memcpy(vd, v.row(h, t), static_cast<std::size_t>(dv) * sizeof(VT));
        else for (index_t c = 0; c < dv; ++c) vd[c] = v(h, t, c);
      }
    }
}

// Requests still in flight; completes them on destruction (an exception between posting and
// waiting must not free buffers MPI still writes or reads).
struct PendingRequests {
  std::vector<MPI_Request> reqs;
  MPI_Request* add2() {  // two more slots (K and V of one chunk)
    reqs.resize(reqs.size() + 2, MPI_REQUEST_NULL);
    return reqs.data() + reqs.size() - 2;
  }
  void test() {
    if (reqs.empty()) return;
    int done = 0;
    MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE);
  }
  void wait() {
    if (!reqs.empty()) MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE);
    reqs.clear();
  }
  PendingRequests() = default;
  PendingRequests(const PendingRequests&) = delete;
  PendingRequests& operator=(const PendingRequests&) = delete;
  ~PendingRequests() { wait(); }
};

}  // namespace detail

/// Context-parallel prefill: rank r holds the queries, keys and values of its two zig-zag chunks
/// (zigzag_layout(n, P, block_q, block_k).ranges_of(r), chunk r first) and receives their output
/// rows (and LSE): out[h, i] = softmax over the keys the global mask allows to query i, over the
/// whole sequence, as sparse_attn::prefill computes it in one process, up to fp32 rounding.
/// Every rank of `comm` must call it with the same mask (n = n_q = n_k), head counts, dims,
/// element types and options.
///
/// Order of work: local validation of this rank's views; one walk over the mask (schedule and
/// fingerprint); check_collectively (so bad or disagreeing arguments raise the same
/// invalid_argument on every rank and nobody waits in a collective); then the ring of P shifts
/// (file comment). Nothing is written to out or opt.lse before the check has passed.
/// @tparam Mask a block mask of the common interface (IntervalMask, BlockListMask, ...; not a
///         LineMask), with n_q == n_k.
/// @param comm the communicator (all ranks call).
/// @param q [Hq, L_r, d] this rank's queries, L_r = layout.local_tokens(r); any strides;
///        fp32/bf16/fp16.
/// @param k [Hkv, L_r, d] this rank's keys.
/// @param v [Hkv, L_r, dv] this rank's values.
/// @param out [Hq, L_r, dv] receives this rank's output rows (fp32/bf16/fp16, rounded once).
/// @param mask the global mask [Hq, n, n], identical on every rank.
/// @param opt kernel options (scale, threads, precision); opt.lse, when set, receives this
///        rank's [Hq, L_r] LSE; opt.key_mass must be empty (not supported here).
/// @return this rank's traffic and work counters.
/// @throws sparse_attn::invalid_argument on every rank, with the same message
///         ("dist::prefill: rank R: ..." for a rank's bad view, "dist::prefill: ranks disagree on
///         NAME: ..." for a disagreement), before any message is exchanged. After the check only
///         std::bad_alloc (or an exception of the mask's predicate) can escape; the communicator
///         is then left with unmatched messages on other ranks (abort the job).
/// @par Complexity
/// Compute: the listed blocks of this rank's query rows, O(blocks x block_q x block_k x (d + dv))
/// over the executor, plus O(listed blocks of the whole mask) for the schedule walk (on every
/// rank). Communication: P - 1 shifts, at most 4 messages each way per shift (K and V of the
/// source's two chunks), only the needed key blocks.
/// @par Allocation
/// Two receive buffers of at most two chunks of K/V each (double buffering, reused from shift to
/// shift), send buffers only for messages that cannot be sent from the views as they are
/// (scattered key blocks, or rows not packed per head), fp32 accumulators of the local output and LSE plus one pair's partial,
/// the schedule (P x key blocks bytes), each kernel call's plan, and one workspace (the largest
/// call's). This rank's own K and V TensorViews are read in place (no copy); other view types
/// are copied once into a receive buffer.
/// @par Thread safety
/// MPI calls are made from the calling thread only (MPI_THREAD_FUNNELED suffices); the kernel's
/// worker threads never call MPI. Concurrent calls on the same communicator are not allowed
/// (they would share message tags).
template <class QV, class KV, class VV, class OV, class Mask>
PrefillStats prefill(const Communicator& comm, const QV& q, const KV& k, const VV& v, const OV& out,
                     const Mask& mask, const AttentionOptions& opt = {}) {
  static_assert(!kernel::kIsLineMask<Mask>, "dist::prefill: a LineMask is not supported; use a block mask");
  constexpr const char* where = "dist::prefill";
  using KT = typename KV::value_type;
  using VT = typename VV::value_type;
  const int P = comm.size(), me = comm.rank();
  const MaskShape& ms = mask.shape();

  // Local validation and the schedule (no MPI): a failure becomes this rank's local error.
  detail::PrefillSchedule sch;
  const std::string local_error = local_error_of([&] {
    require(ms.n_q == ms.n_k, where, ": the mask has n_q=", ms.n_q, " and n_k=", ms.n_k,
            "; context-parallel prefill is self-attention, n_q must equal n_k");
    sch = detail::make_schedule(mask, P);
    kernel::validate_qkvo(q, k, v, out, where);
    const index_t L = sch.layout.local_tokens(me);
    require(q.tokens == L && k.tokens == L, where, ": q has ", q.tokens, " and k ", k.tokens,
            " tokens; this rank's zig-zag chunks hold ", L, " (ZigZagLayout::local_tokens)");
    require(q.heads == ms.heads, where, ": q has ", q.heads, " heads, the mask ", ms.heads);
    require(opt.key_mass.data == nullptr, where, ": key_mass is not supported by context-parallel prefill");
    // MPI counts are int: the largest message is one chunk of K (or V) rows.
    const index_t chunk_max = sch.layout.chunk(0).size();
    require(sparse_attn::detail::bounded_product(INT_MAX, {chunk_max, k.heads, std::max(k.dim, v.dim)}) >= 0,
            where, ": a chunk of ", chunk_max, " tokens x ", k.heads, " heads x ", std::max(k.dim, v.dim),
            " channels exceeds an MPI message's 2^31 - 1 elements; use more ranks");
  });
  const detail::MaskParams mp = detail::mask_params(mask);
  check_collectively(comm, where,
                     {{"n", ms.n_k},
                      {"mask heads", ms.heads},
                      {"block_q", ms.block_q},
                      {"block_k", ms.block_k},
                      {"causal", ms.causal ? 1 : 0},
                      {"head_shared", mask.head_shared() ? 1 : 0},
                      {"mask kind", mp.kind},
                      {"window", mp.window},
                      {"sinks", mp.sinks},
                      {"dense_last_rows", mp.dense_last_rows},
                      {"heads_q", q.heads},
                      {"heads_kv", k.heads},
                      {"head_dim", q.dim},
                      {"head_dim_v", v.dim},
                      {"q dtype", static_cast<index_t>(dtype_of<typename QV::value_type>())},
                      {"k dtype", static_cast<index_t>(dtype_of<KT>())},
                      {"v dtype", static_cast<index_t>(dtype_of<VT>())},
                      {"precision", static_cast<index_t>(opt.precision)},
                      agreed_double("scale", static_cast<double>(opt.scale)),
                      {"mask fingerprint", static_cast<std::int64_t>(sch.fingerprint)}},
                     local_error);

  PrefillStats st;
  const ZigZagLayout& lay = sch.layout;
  const index_t hq = q.heads, hkv = k.heads, d = q.dim, dv = v.dim;
  const std::array<index_t, 2> mine = lay.chunks_of(me);
  const std::array<TokenRange, 2> my_range = lay.ranges_of(me);
  const std::array<index_t, 2> my_local0{0, my_range[0].size()};
  for (index_t c : mine)
    for (index_t kc = 0; kc < lay.num_chunks(); ++kc) st.blocks_computed += sch.blocks(c, kc);

  // fp32 accumulators of the two query chunks: out and LSE, merged pair by pair. An fp32
  // TensorView output is its own accumulator (its rows of chunk u): no second copy of the
  // output to allocate, fault in, and copy back at the end; other outputs get fp32 buffers,
  // rounded once at the end. Rows are cleared to the empty state (0, -inf) when the chunk's
  // first pair is stored (the rows it does not cover) or at the end (no pair).
  constexpr bool out_direct = std::is_same_v<OV, TensorView<float>>;
  std::array<std::vector<float>, 2> acc, acc_lse;
  std::array<TensorView<float>, 2> accv;
  for (std::size_t u = 0; u < 2; ++u) {
    const index_t nu = my_range[u].size();
    if constexpr (out_direct) {
      accv[u] = out.slice_tokens(my_local0[u], nu);
    } else {
      acc[u].resize(static_cast<std::size_t>(hq * nu * dv));
      accv[u] = TensorView<float>(acc[u].data(), hq, nu, dv);
    }
    acc_lse[u].resize(static_cast<std::size_t>(hq * nu));
  }
  auto clear_rows = [&](std::size_t u, index_t r0, index_t r1) {
    const index_t nu = my_range[u].size();
    for (index_t h = 0; h < hq; ++h)
      for (index_t i = r0; i < r1; ++i) {
        float* o = accv[u].row(h, i);
        for (index_t c = 0; c < dv; ++c) o[c * accv[u].stride_dim] = 0.0f;
        acc_lse[u][static_cast<std::size_t>(h * nu + i)] = kNegInf;
      }
  };
  std::vector<float> part, part_lse;  // one pair's result (after a query chunk's first pair)
  std::array<bool, 2> started{false, false};  // the chunk's first pair was stored in accv

  // Buffers by shift parity: [slot][key chunk of the source].
  std::array<std::array<detail::KvPack<KT, VT>, 2>, 2> in, out_pack;
  std::array<detail::PendingRequests, 2> reqs;

  // Local query rows [r0, r1) of the pair (query chunk qc, key chunk kc): from its first to its
  // last query block that lists a key block ({0, 0} for a pair without blocks).
  auto pair_rows = [&](index_t qc, index_t kc) -> std::array<index_t, 2> {
    if (sch.blocks(qc, kc) == 0) return {0, 0};
    const std::array<index_t, 2> qbr = sch.pair_qblocks[static_cast<std::size_t>(qc * lay.num_chunks() + kc)];
    return {ms.q_begin(qbr[0]) - lay.chunk(qc).begin, std::min(ms.q_end(qbr[1]), lay.chunk(qc).end) - lay.chunk(qc).begin};
  };
  // The receive side of a pack: the blocks this rank needs from chunk c, padded to at least the
  // query rows of the pairs that read it (the kernel wants n_k >= n_q; a far chunk of a window
  // is read by a few blocks of rows, so its padding stays small) and to whole blocks (a short
  // last block's padding is cut by PairMask).
  auto prepare_in = [&](detail::KvPack<KT, VT>& p, index_t c) {
    p.blocks = sch.blocks_for(me, c, ms.block_k);
    const index_t tok = detail::block_tokens(p.blocks, ms);
    index_t nq_max = 0;
    for (index_t qc : mine) {
      const std::array<index_t, 2> r = pair_rows(qc, c);
      nq_max = std::max(nq_max, r[1] - r[0]);
    }
    p.allocate(tok, std::max(static_cast<index_t>(p.blocks.size()) * ms.block_k, nq_max), hkv, d, dv);
  };
  const int tag0 = detail::kPrefillTagBase;
  // Tensor views (not paged ones) are read in place: the own K/V at shift 0, and the rows sent.
  constexpr bool direct = kernel::is_tensor_view<KV>::value && kernel::is_tensor_view<VV>::value;
  // Whether a message of these blocks can be sent from the caller's K/V views as they are: the
  // blocks are consecutive and each head's rows are packed (row stride = dim, unit channel
  // stride), so a message is one strided datatype over the views, in the pack's order.
  // (Generic in the views so that only tensor views instantiate it.)
  auto in_place_send = [&](const std::vector<std::int32_t>& blocks, const auto& kk, const auto& vv) {
    return detail::PairMask<Mask>::is_contiguous(blocks) && kk.stride_dim == 1 && vv.stride_dim == 1 &&
           kk.stride_token == d && vv.stride_token == dv && kk.stride_head >= 0 && vv.stride_head >= 0 &&
           kk.stride_head <= INT_MAX && vv.stride_head <= INT_MAX;
  };
  auto post = [&](int s) {
    const auto slot = static_cast<std::size_t>(s % 2);
    const int src = (me - s + P) % P, dst = (me + s) % P;
    const std::array<index_t, 2> theirs = lay.chunks_of(src);
    for (std::size_t u = 0; u < 2; ++u) {
      detail::KvPack<KT, VT>& p = in[slot][u];
      prepare_in(p, theirs[u]);
      if (p.tokens == 0) continue;
      MPI_Request* r = reqs[slot].add2();
      const detail::StridedType tk(mpi_type<KT>(), hkv, p.tokens * d, p.rows * d);
      const detail::StridedType tv(mpi_type<VT>(), hkv, p.tokens * dv, p.rows * dv);
      MPI_Irecv(p.k.data(), tk.count, tk.type, src, tag0 + 2 * static_cast<int>(u), comm.handle(), r);
      MPI_Irecv(p.v.data(), tv.count, tv.type, src, tag0 + 2 * static_cast<int>(u) + 1, comm.handle(), r + 1);
      st.messages_received += 2;
      st.bytes_received += p.tokens * hkv * (d * static_cast<index_t>(sizeof(KT)) + dv * static_cast<index_t>(sizeof(VT)));
      st.key_blocks_received += static_cast<index_t>(p.blocks.size());
    }
    for (std::size_t u = 0; u < 2; ++u) {
      detail::KvPack<KT, VT>& p = out_pack[slot][u];
      p.blocks = sch.blocks_for(dst, mine[u], ms.block_k);
      const index_t tok = detail::block_tokens(p.blocks, ms);
      if (tok == 0) continue;
      MPI_Request* r = reqs[slot].add2();
      const int tag = tag0 + 2 * static_cast<int>(u);
      const index_t t0 = my_local0[u] + ms.k_begin(p.blocks.front()) - my_range[u].begin;
      bool sent = false;
      if constexpr (direct) {
        if (in_place_send(p.blocks, k, v)) {  // consecutive rows of each head: straight from the views
          const detail::StridedType tk(mpi_type<KT>(), hkv, tok * d, k.stride_head);
          const detail::StridedType tv(mpi_type<VT>(), hkv, tok * dv, v.stride_head);
          MPI_Isend(k.row(0, t0), tk.count, tk.type, dst, tag, comm.handle(), r);
          MPI_Isend(v.row(0, t0), tv.count, tv.type, dst, tag + 1, comm.handle(), r + 1);
          sent = true;
        }
      }
      if (!sent) {
        p.allocate(tok, tok, hkv, d, dv);
        detail::fill_pack(p, k, v, ms, my_range[u].begin, my_local0[u]);
        MPI_Isend(p.k.data(), static_cast<int>(tok * hkv * d), mpi_type<KT>(), dst, tag, comm.handle(), r);
        MPI_Isend(p.v.data(), static_cast<int>(tok * hkv * dv), mpi_type<VT>(), dst, tag + 1, comm.handle(), r + 1);
      }
      st.messages_sent += 2;
      st.bytes_sent += tok * hkv * (d * static_cast<index_t>(sizeof(KT)) + dv * static_cast<index_t>(sizeof(VT)));
    }
  };

  // Shift 0: this rank's own blocks. Tensor views are read in place (detail::PairMask's
  // contiguous mode over a slice of the caller's rows, no copy); other views are copied into
  // slot 0 (no message).
  std::array<std::vector<std::int32_t>, 2> own_blocks;
  for (std::size_t u = 0; u < 2; ++u) {
    if constexpr (direct) {
      own_blocks[u] = sch.blocks_for(me, mine[u], ms.block_k);
    } else {
      detail::KvPack<KT, VT>& p = in[0][u];
      prepare_in(p, mine[u]);
      detail::fill_pack(p, k, v, ms, my_range[u].begin, my_local0[u]);
    }
  }

  AttentionOptions kopt = opt;
  kopt.key_mass = {};
  // One workspace for every pair (the largest plan's), instead of one allocation per call.
  WorkspaceBuffer wsbuf;
  // One pair on query rows r0 .. r0 + nq of chunk qu (qv): a plan on the pair's mask, the kernel
  // into accv (the chunk's first pair: the accumulator is the empty state, so the pair's result
  // is the merge) or into part, then merged.
  auto run_pair = [&](std::size_t qu, index_t r0, const auto& qv, const auto& pm, const auto& kv, const auto& vv) {
    const index_t nq = qv.tokens, nu = my_range[qu].size();
    const PrefillPlan plan = plan_prefill(attention_shape(qv, kv, vv), pm, kopt);
    if (plan.workspace_bytes() > wsbuf.bytes()) wsbuf = WorkspaceBuffer(plan.workspace_bytes());
    const LseView acc_lse_rows(acc_lse[qu].data() + r0, nu, 1);
    if (!started[qu]) {
      kopt.lse = acc_lse_rows;
      sparse_attn::prefill(plan, qv, kv, vv, accv[qu].slice_tokens(r0, nq), pm, wsbuf.view(), kopt);
      clear_rows(qu, 0, r0);
      clear_rows(qu, r0 + nq, nu);
      started[qu] = true;
      return;
    }
    // (every row of part is written by the kernel: rows without a key get 0 and -inf)
    part.resize(static_cast<std::size_t>(hq * nq * dv));
    part_lse.resize(static_cast<std::size_t>(hq * nq));
    kopt.lse = LseView(part_lse.data(), nq);
    sparse_attn::prefill(plan, qv, kv, vv, TensorView<float>(part.data(), hq, nq, dv), pm, wsbuf.view(), kopt);
    merge_states(accv[qu].slice_tokens(r0, nq), acc_lse_rows, TensorView<const float>(part.data(), hq, nq, dv),
                 LseView(part_lse.data(), nq), opt.executor_choice());
  };

  for (int s = 0; s < P; ++s) {
    const auto slot = static_cast<std::size_t>(s % 2);
    const int src = (me - s + P) % P;
    if (s + 1 < P) post(s + 1);  // overlap: the next shift's transfers run during this compute
    reqs[slot].wait();  // this shift's receives (and its sends' buffers)
    const std::array<index_t, 2> theirs = lay.chunks_of(src);
    for (std::size_t qu = 0; qu < 2; ++qu) {
      const index_t qc = mine[qu], nq = my_range[qu].size();
      if (nq == 0) continue;
      // The pairs' query rows: from the first to the last query block listing a key block.
      const std::array<std::array<index_t, 2>, 2> rows{pair_rows(qc, theirs[0]), pair_rows(qc, theirs[1])};
      // The pair with more rows first: a chunk's first pair is stored in accv directly, the
      // later ones go through part (window: the near chunk's pair covers every row, the far
      // one's a window of rows).
      const bool swap = rows[1][1] - rows[1][0] > rows[0][1] - rows[0][0];
      for (std::size_t u0 = 0; u0 < 2; ++u0) {
        const std::size_t u = swap ? 1 - u0 : u0;
        const index_t kc = theirs[u];
        if (sch.blocks(qc, kc) == 0) {
          if (lay.chunk(kc).size() > 0) ++st.chunk_pairs_skipped;
          continue;
        }
        // A pair merged through part runs in slabs of at most kPartBytes of output (whole query
        // blocks), so part stays small: a new buffer's pages cost their first touch on every
        // call, about as much as the kernel's work on them for a window.
        const index_t slab = started[qu] ? std::max<index_t>(1, detail::kPartBytes / std::max<index_t>(1, hq * dv * 4) / ms.block_q) * ms.block_q
                                         : rows[u][1] - rows[u][0];
        for (index_t r0 = rows[u][0]; r0 < rows[u][1]; r0 += slab) {
          const index_t nr = std::min(slab, rows[u][1] - r0), q0 = lay.chunk(qc).begin + r0;
          const auto qv = q.slice_tokens(my_local0[qu] + r0, nr);
          bool done = false;
          if constexpr (direct) {
            if (s == 0) {
              // The caller's rows of chunk u from its first to its last needed block, widened to
              // at least nr rows (the kernel wants n_k >= n_q) by rows before them (or after: any
              // other rows are never listed); every offset stays a whole number of key blocks,
              // since chunks start on blocks.
              const std::vector<std::int32_t>& nb = own_blocks[u];
              const index_t bk = ms.block_k, L = my_range[0].size() + my_range[1].size();
              const index_t base = my_local0[u] - my_range[u].begin;  // local token of global 0
              const index_t a = base + index_t{nb.front()} * bk;
              const index_t b = std::min(base + (index_t{nb.back()} + 1) * bk, my_local0[u] + my_range[u].size());
              const index_t start = std::min(a, (L - nr) / bk * bk), end = std::max(b, start + nr);
              const detail::PairMask<Mask> pm(mask, nr, end - start, q0, nb.front(),
                                              index_t{nb.back()} - nb.front() + 1, (a - start) / bk);
              run_pair(qu, r0, qv, pm, k.slice_tokens(start, end - start), v.slice_tokens(start, end - start));
              done = true;
            }
          }
          if (!done) {
            const detail::KvPack<KT, VT>& p = in[slot][u];
            const detail::PairMask<Mask> pm(mask, nr, p.rows, q0, p.blocks);
            run_pair(qu, r0, qv, pm, TensorView<const KT>(p.k.data(), hkv, p.rows, d),
                     TensorView<const VT>(p.v.data(), hkv, p.rows, dv));
          }
          if (s + 1 < P) reqs[1 - slot].test();  // let MPI progress
        }
        ++st.chunk_pairs_computed;
      }
    }
  }
  reqs[0].wait();
  reqs[1].wait();

  // The rows to the caller's views, rounded once (an fp32 TensorView output holds them already).
  for (std::size_t u = 0; u < 2; ++u) {
    const index_t nq = my_range[u].size(), t0 = my_local0[u];
    if (!started[u]) clear_rows(u, 0, nq);  // no pair: every row is empty
    for (index_t h = 0; h < hq; ++h)
      for (index_t i = 0; i < nq; ++i) {
        if constexpr (!out_direct) store_row(acc[u].data() + (h * nq + i) * dv, out.row(h, t0 + i), out.stride_dim, dv);
        if (opt.lse) opt.lse(h, t0 + i) = acc_lse[u][static_cast<std::size_t>(h * nq + i)];
      }
  }
  return st;
}

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
