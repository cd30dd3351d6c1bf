/// @file
/// The zig-zag token layout of context-parallel prefill: n tokens cut into 2P chunks of whole
/// blocks, rank r holding chunks r and 2P-1-r.
///
/// Why zig-zag: under a causal mask the work of a query chunk grows with its position (chunk c
/// sees c + 1 chunks of keys). Pairing an early chunk with its mirror image gives every rank
/// (r + 1) + (2P - r) = 2P + 1 chunk-pairs of causal work, whatever r: the ranks are balanced
/// without any knowledge of the mask. (A plain split into P pieces would give the last rank
/// 2P - 1 times the first rank's work.)
///
/// Chunk sizes: the sequence is cut into nb = ceil(n / b) blocks of b tokens (b = the least
/// common multiple of the mask's block_q and block_k, so every chunk holds whole query and key
/// blocks); chunk c gets floor(nb / 2P) blocks, plus one for c < nb mod 2P. Chunk sizes thus
/// differ by at most one block, the earlier chunks being the larger; the global last block,
/// shorter than b when b does not divide n, lies in the last non-empty chunk. When nb < 2P
/// (tiny n) chunks nb .. 2P-1 are empty and the ranks holding only such chunks hold no token;
/// they still take part in every collective. P = 1 gives one rank chunks 0 and 1, i.e. the whole
/// sequence in order.
///
/// Placement: a rank's local tensors hold its two chunks one after the other, chunk r first
/// ([chunk r tokens; chunk 2P-1-r tokens], token order kept within each chunk).
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/dist/token_range.hpp"

#include <array>
#include <numeric>

SPARSE_ATTN_NAMESPACE_BEGIN
namespace dist {

/// Where every token of an n-token sequence lives over P ranks (see the file comment). A plain
/// value of four integers: O(1) accessors, no allocation; const members are safe to call from any
/// thread.
class ZigZagLayout {
 public:
  /// The layout of one rank (P = 1) over an empty sequence.
  ZigZagLayout() = default;
  /// The layout of n tokens over `ranks` ranks in chunks of whole `block`-token blocks.
  /// @param n sequence length in tokens, >= 0.
  /// @param ranks P, the number of ranks, >= 1.
  /// @param block the alignment b in tokens, >= 1 (prefill uses lcm(block_q, block_k)).
  /// @throws sparse_attn::invalid_argument when n < 0, ranks < 1, block < 1, or n >= 2^62.
  /// O(1), allocates nothing.
  ZigZagLayout(index_t n, int ranks, index_t block) : n_(n), ranks_(ranks), block_(block) {
    constexpr const char* where = "dist::ZigZagLayout";
    require(n >= 0 && n < (index_t{1} << 62), where, ": n must be in [0, 2^62), got ", n);
    require(ranks >= 1, where, ": ranks must be >= 1, got ", ranks);
    require(block >= 1 && block < (index_t{1} << 31), where, ": block must be in [1, 2^31), got ", block);
    const index_t nb = n == 0 ? 0 : (n - 1) / block + 1;
    base_ = nb / num_chunks();
    extra_ = nb % num_chunks();
  }
  /// @return the sequence length n.
  index_t tokens() const { return n_; }
  /// @return the number of ranks P.
  int ranks() const { return ranks_; }
  /// @return the alignment b of chunk boundaries, in tokens.
  index_t block() const { return block_; }
  /// @return the number of chunks, 2P.
  index_t num_chunks() const { return 2 * static_cast<index_t>(ranks_); }
  /// Global token range of chunk c (empty for the trailing chunks of a tiny sequence).
  /// @param c chunk index in [0, 2P); not checked.
  /// @return [first block of c x b, min(n, end block x b)).
  TokenRange chunk(index_t c) const {
    return {std::min(n_, block_start(c) * block_), std::min(n_, block_start(c + 1) * block_)};
  }
  /// The rank holding chunk c: c for c < P, 2P-1-c otherwise.
  /// @param c chunk index in [0, 2P); not checked.
  /// @return the owner rank.
  int owner(index_t c) const { return static_cast<int>(c < ranks_ ? c : num_chunks() - 1 - c); }
  /// The chunk holding a global position (for an empty chunk's boundary, the next non-empty one).
  /// @param pos a position in [0, n); not checked.
  /// @return its chunk index in [0, 2P).
  index_t chunk_of(index_t pos) const {
    const index_t blk = pos / block_, big = extra_ * (base_ + 1);  // blocks in the larger chunks
    // base_ == 0 means every block lies in the first extra_ chunks, so no division by zero.
    return blk < big ? blk / (base_ + 1) : extra_ + (blk - big) / base_;
  }
  /// The two chunks of a rank, in local order: {r, 2P-1-r}.
  /// @param rank r in [0, P); not checked.
  /// @return the chunk indices, the early one first.
  std::array<index_t, 2> chunks_of(int rank) const { return {rank, num_chunks() - 1 - rank}; }
  /// The global token ranges a rank holds, in local order (its local tensors are the first range's
  /// tokens followed by the second's).
  /// @param rank r in [0, P); not checked.
  /// @return {chunk(r), chunk(2P-1-r)}.
  std::array<TokenRange, 2> ranges_of(int rank) const {
    return {chunk(chunks_of(rank)[0]), chunk(chunks_of(rank)[1])};
  }
  /// The number of tokens a rank holds: the `tokens` extent of its local Q, K, V and output.
  /// @param rank r in [0, P); not checked.
  /// @return the sizes of its two chunks, summed.
  index_t local_tokens(int rank) const { return ranges_of(rank)[0].size() + ranges_of(rank)[1].size(); }
  /// Global position of a rank's local token.
  /// @param rank r in [0, P); not checked.
  /// @param local index in [0, local_tokens(rank)); not checked.
  /// @return its position in [0, n).
  index_t global_position(int rank, index_t local) const {
    const std::array<TokenRange, 2> r = ranges_of(rank);
    return local < r[0].size() ? r[0].begin + local : r[1].begin + (local - r[0].size());
  }

 private:
  // First block of chunk c: the extra blocks go to the first `extra_` chunks.
  index_t block_start(index_t c) const { return c * base_ + std::min(c, extra_); }
  index_t n_ = 0;
  int ranks_ = 1;
  index_t block_ = 1;
  index_t base_ = 0, extra_ = 0;
};

/// The layout context-parallel prefill uses for a mask geometry: n = n_k, b = lcm(block_q,
/// block_k) (so chunks hold whole query and key blocks).
/// @param n sequence length (the mask's n_q = n_k).
/// @param ranks P, the communicator's size.
/// @param block_q the mask's query block size, >= 1.
/// @param block_k the mask's key block size, >= 1.
/// @return the layout.
/// @throws sparse_attn::invalid_argument as ZigZagLayout's constructor, or when a block size is
///         < 1 or their lcm exceeds 2^31 - 1.
inline ZigZagLayout zigzag_layout(index_t n, int ranks, index_t block_q, index_t block_k) {
  require(block_q >= 1 && block_k >= 1 && block_q < (index_t{1} << 31) && block_k < (index_t{1} << 31),
          "dist::zigzag_layout", ": block sizes must be in [1, 2^31), got block_q=", block_q,
          ", block_k=", block_k);
  const index_t g = std::gcd(block_q, block_k), l = block_q / g * block_k;
  require(l < (index_t{1} << 31), "dist::zigzag_layout", ": lcm(block_q, block_k) = ", l,
          " exceeds 2^31 - 1; use equal or dividing block sizes");
  return ZigZagLayout(n, ranks, l);
}

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
