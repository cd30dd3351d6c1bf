/// @file
/// dist::ShardedCache: one sequence's KV cache (one layer) split by token ranges over the ranks
/// of a communicator, for context-parallel decode (docs/DISTRIBUTED.md, section "Decode").
///
/// Layout: rank r holds the contiguous global slot range [offset_r(h), offset_r(h) + length_r(h))
/// of every KV head h, ranks in ascending token order, as a local kv::ContiguousCache (its slot 0
/// is the rank's first token). Before any eviction, slots are positions and the ranges are the
/// prompt's token ranges [begin_r, end_r) each rank was given; an eviction (dist::evict_snapkv)
/// keeps each rank's survivors in place, so the global slot order (the concatenation of the
/// shards) is still position order, exactly the slot order of a single-process cache after the
/// same eviction.
///
/// Decode appends go to the tail shard (the last rank): the global sequence grows at its end, and
/// only the tail shard's keys can be "the newest n_q tokens" that the causal mask refers to. The
/// balance consequence: every generated token lands on the last rank, so after g generated tokens
/// it holds g more than its prompt share (and reads them every step). For generations short
/// against the prompt this is negligible; for long ones, give the last rank a smaller prompt share
/// (shard_range() takes any split) or re-shard.
///
/// Quest metadata: the per-page key min/max are kept per *global* page of P slots (page g of head
/// h covers global slots [gP, (g+1)P)), for every page that intersects this rank's slots. A page
/// that straddles a shard boundary (after an eviction, or with a split that is not a multiple of P)
/// holds the elementwise min/max over all its slots on all ranks: the ranks exchange the partial
/// bounds of their first and last page at construction and after each eviction (one Allgather of
/// Hkv x 2 x (2d) elements per rank). So the bounds of every page are exactly those a single
/// process computes on the whole cache, and Quest's page scores are bit-identical. Decode appends
/// extend the tail shard's last page only; a straddling page is scored by the rank holding its last
/// slot (the tail, for a page that grows), whose bounds are always current.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cstdint>
#include <vector>

#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/dist/communicator.hpp"
#include "sparse_attn/dist/token_range.hpp"
#include "sparse_attn/kv/cache.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace dist {

/// The balanced page-aligned split of `total` prompt tokens over `size` ranks: rank r gets whole
/// pages [r x pages / size, (r + 1) x pages / size) (pages = ceil(total / P)), the last rank's
/// range ending at `total` (its last page may be partial). A split along pages keeps every page on
/// one rank (no page straddles a boundary); any other contiguous split is exact too.
/// @param total prompt tokens, >= 0.
/// @param page_size P, >= 1.
/// @param rank the rank, in [0, size).
/// @param size the rank count, >= 1.
/// @return the rank's range (empty when there are fewer pages than ranks).
/// O(1), never throws.
inline TokenRange shard_range(index_t total, index_t page_size, int rank, int size) {
  const index_t pages = (total + page_size - 1) / page_size;
  const index_t b = pages * rank / size * page_size, e = pages * (rank + 1) / size * page_size;
  return {std::min(b, total), std::min(e, total)};
}

/// Shape of a ShardedCache, equal on every rank (checked collectively).
struct ShardedCacheOptions {
  index_t kv_heads = 0;   ///< Hkv, >= 1
  index_t head_dim = 0;   ///< d, >= 1
  index_t value_dim = 0;  ///< dv; 0: same as head_dim
  index_t page_size = 16;  ///< P: the Quest pages, global (page g = slots [gP, (g+1)P))
  /// Tokens the tail shard (last rank) reserves for decode appends, >= 0.
  index_t decode_capacity = 0;
};

template <class T>
class ShardedCache;

/// @cond SPARSE_ATTN_INTERNAL
namespace detail {
struct CacheAccess;
}
/// @endcond

/// @brief One layer's KV cache of one sequence, split by token ranges over a communicator's ranks
/// (see the file comment for the layout and the page bounds).
///
/// Every member that communicates is collective: all ranks of the communicator call it, in the
/// same order. Const accessors are local and O(1) unless stated.
/// Thread safety: as kv::Cache (one mutating thread; the communicator from one thread at a time).
/// Allocation: the constructor reserves everything (the local cache, the replicated per-rank
/// lengths, the page bounds); appends grow the tail's page-bound list by one page per P tokens.
/// @tparam T storage type of keys and values: float, bf16 or fp16.
template <class T>
class ShardedCache {
 public:
  using value_type = T;                          ///< element type of the stored keys and values
  using local_type = kv::ContiguousCache<T>;     ///< the shard's own cache

  /// Builds the shard of this rank from its prompt tokens (collective).
  ///
  /// Rank r passes the K/V of its global token range [begin, begin + k.tokens); the ranges must
  /// be contiguous and ascending in rank order, starting at 0 (shard_range() gives a balanced
  /// one). The local cache reserves k.tokens (+ decode_capacity on the last rank) tokens.
  /// @param comm the communicator (kept by value; the MPI communicator must outlive the cache).
  /// @param opt the shape, equal on every rank.
  /// @param begin global position of this rank's first prompt token.
  /// @param k this rank's keys, [Hkv, n_r, d] (any storage type and strides; n_r may be 0).
  /// @param v this rank's values, [Hkv, n_r, dv].
  /// @throws sparse_attn::invalid_argument on every rank, with the same message, when some rank's
  ///         views or options are invalid, the options differ across ranks, or the ranges are not
  ///         contiguous from 0 in rank order. Checked before the cache is built.
  /// @throws std::bad_alloc when the local storage cannot be allocated.
  /// Cost: the local append (O(n_r (d + dv))), the page bounds (O(n_r d)), three small
  /// collectives.
  template <class UK, class UV>
  ShardedCache(const Communicator& comm, const ShardedCacheOptions& opt, index_t begin,
               const TensorView<UK>& k, const TensorView<UV>& v)
      : comm_(comm), opt_(resolved(opt)), local_(local_options(comm, opt, k.tokens)) {
    constexpr const char* where = "dist::ShardedCache";
    const std::string local_error = local_error_of([&] {
      validate_view(k, "dist::ShardedCache: k");
      validate_view(v, "dist::ShardedCache: v");
      require(k.heads == opt_.kv_heads && v.heads == opt_.kv_heads, where, ": k and v have ",
              k.heads, " and ", v.heads, " heads, the options say kv_heads=", opt_.kv_heads);
      require(k.dim == opt_.head_dim && v.dim == opt_.value_dim, where, ": k and v have dims ",
              k.dim, " and ", v.dim, ", the options say ", opt_.head_dim, " and ", opt_.value_dim);
      require(k.tokens == v.tokens, where, ": k has ", k.tokens, " tokens but v has ", v.tokens,
              ", they must be equal");
      require(begin >= 0, where, ": begin must be >= 0, got ", begin);
      require(opt_.decode_capacity >= 0, where, ": decode_capacity must be >= 0, got ",
              opt_.decode_capacity);
    });
    check_collectively(comm_, where,
                       {{"kv_heads", opt_.kv_heads},
                        {"head_dim", opt_.head_dim},
                        {"value_dim", opt_.value_dim},
                        {"page_size", opt_.page_size},
                        {"decode_capacity", opt_.decode_capacity},
                        {"sizeof(T)", static_cast<std::int64_t>(sizeof(T))}},
                       local_error);
    // The ranges: every rank sees every (begin, tokens) and raises the same error if needed.
    const int p = comm_.size();
    std::int64_t mine[2] = {begin, k.tokens};
    std::vector<std::int64_t> all(static_cast<std::size_t>(2 * p));
    MPI_Allgather(mine, 2, MPI_INT64_T, all.data(), 2, MPI_INT64_T, comm_.handle());
    index_t expect = 0;
    for (int r = 0; r < p; ++r) {
      require(all[static_cast<std::size_t>(2 * r)] == expect, where, ": rank ", r,
              " begins at token ", all[static_cast<std::size_t>(2 * r)], ", expected ", expect,
              "; the ranges must be contiguous from 0 in rank order");
      expect += all[static_cast<std::size_t>(2 * r + 1)];
    }
    begin_ = begin;
    if (k.tokens > 0) local_.append(k, v);
    lengths_.assign(static_cast<std::size_t>(p * opt_.kv_heads), 0);
    seq_ = expect;
    refresh();
  }

  /// @return the communicator.
  const Communicator& comm() const { return comm_; }
  /// @return the options (value_dim resolved).
  const ShardedCacheOptions& options() const { return opt_; }
  /// @return this rank's shard, a kv::ContiguousCache holding its slots in global order (slot 0 =
  ///         global slot slot_offset(h) of head h). Read only: mutate through the dist/ calls,
  ///         which keep the replicated lengths and page bounds in step.
  const local_type& local() const { return local_; }
  /// @return Hkv.
  index_t kv_heads() const { return opt_.kv_heads; }
  /// @return d.
  index_t head_dim() const { return opt_.head_dim; }
  /// @return dv.
  index_t value_dim() const { return opt_.value_dim; }
  /// @return P, tokens per global page.
  index_t page_size() const { return opt_.page_size; }
  /// @return whether this rank holds the tail (the last rank): decode appends land here.
  bool owns_tail() const { return comm_.rank() == comm_.size() - 1; }
  /// @return global position of this shard's first prompt token.
  index_t begin() const { return begin_; }
  /// Tokens ever appended to the sequence (prompt + decode), over all ranks; unchanged by
  /// eviction. The next token's position.
  /// @return the global sequence length.
  index_t sequence_length() const { return seq_; }
  /// Tokens rank r holds of head h (replicated on every rank).
  /// @param r a rank, in [0, comm().size()).
  /// @param h a KV head, in [0, Hkv).
  /// @return the count. Unchecked.
  index_t shard_length(int r, index_t h) const {
    return lengths_[static_cast<std::size_t>(r * opt_.kv_heads + h)];
  }
  /// Global slot of this rank's local slot 0 of head h: the tokens of head h on lower ranks.
  /// @param h a KV head, in [0, Hkv).
  /// @return the offset. O(rank).
  index_t slot_offset(index_t h) const {
    index_t o = 0;
    for (int r = 0; r < comm_.rank(); ++r) o += shard_length(r, h);
    return o;
  }
  /// Tokens head h holds over all ranks: the single-process cache's length(h).
  /// @param h a KV head, in [0, Hkv).
  /// @return the global length. O(ranks).
  index_t length(index_t h) const {
    index_t o = 0;
    for (int r = 0; r < comm_.size(); ++r) o += shard_length(r, h);
    return o;
  }
  /// Absolute position of local slot `slot` of head h (positions survive eviction).
  /// @param h a KV head, in [0, Hkv).
  /// @param slot a local slot, in [0, local().length(h)).
  /// @return the token's position in the sequence. Unchecked.
  index_t global_position(index_t h, index_t slot) const { return begin_ + local_.position(h, slot); }

 private:
  friend struct detail::CacheAccess;

  static ShardedCacheOptions resolved(ShardedCacheOptions o) {
    if (o.value_dim == 0) o.value_dim = o.head_dim;
    return o;
  }
  // The local cache's options; invalid shapes are clamped to 1 so that the collective check
  // (which reports them) runs on every rank before anything throws.
  static kv::CacheOptions local_options(const Communicator& comm, const ShardedCacheOptions& o,
                                        index_t tokens) {
    kv::CacheOptions c;
    c.kv_heads = std::max<index_t>(1, o.kv_heads);
    c.head_dim = std::max<index_t>(1, o.head_dim);
    c.value_dim = std::max<index_t>(1, o.value_dim == 0 ? o.head_dim : o.value_dim);
    c.page_size = std::clamp<index_t>(o.page_size, 1, (index_t{1} << 31) - 1);
    const bool tail = comm.rank() == comm.size() - 1;
    c.capacity = std::max<index_t>(1, std::max<index_t>(0, tokens) +
                                          (tail ? std::max<index_t>(0, o.decode_capacity) : 0));
    c.key_bounds = false;  // global-page bounds are kept here instead
    return c;
  }

  // After the construction or an eviction (collective): every rank's lengths, then the bounds of
  // every page intersecting this shard, straddling pages combined over the ranks.
  void refresh() {
    const int p = comm_.size();
    const index_t H = opt_.kv_heads, d = opt_.head_dim, P = opt_.page_size;
    std::vector<std::int64_t> mine(local_.lengths().begin(), local_.lengths().end());
    MPI_Allgather(mine.data(), static_cast<int>(H), MPI_INT64_T, lengths_.data(), static_cast<int>(H),
                  MPI_INT64_T, comm_.handle());
    first_page_.assign(static_cast<std::size_t>(H), 0);
    bounds_.assign(static_cast<std::size_t>(H), {});
    std::vector<float> row(static_cast<std::size_t>(d)), mn(row.size()), mx(row.size());
    const auto kview = local_.keys();
    for (index_t h = 0; h < H; ++h) {
      const index_t off = slot_offset(h), len = local_.length(h);
      if (len == 0) continue;
      const index_t g0 = off / P, g1 = (off + len - 1) / P + 1;
      first_page_[static_cast<std::size_t>(h)] = g0;
      auto& b = bounds_[static_cast<std::size_t>(h)];
      b.assign(static_cast<std::size_t>((g1 - g0) * 2 * d), T(0.0f));
      for (index_t g = g0; g < g1; ++g) {
        const index_t s0 = std::max(g * P, off) - off, s1 = std::min((g + 1) * P, off + len) - off;
        load_row(kview.row(h, s0), kview.stride_dim, mn.data(), d);
        mx = mn;
        for (index_t s = s0 + 1; s < s1; ++s) {
          load_row(kview.row(h, s), kview.stride_dim, row.data(), d);
          for (index_t c = 0; c < d; ++c) {
            mn[static_cast<std::size_t>(c)] = std::min(mn[static_cast<std::size_t>(c)], row[static_cast<std::size_t>(c)]);
            mx[static_cast<std::size_t>(c)] = std::max(mx[static_cast<std::size_t>(c)], row[static_cast<std::size_t>(c)]);
          }
        }
        T* dst = b.data() + (g - g0) * 2 * d;
        store_row(mn.data(), dst, 1, d);
        store_row(mx.data(), dst + d, 1, d);
      }
    }
    // Straddling pages: every rank's first and last page partial bounds, combined into ours.
    // Record per head: [first page id, last page id] (-1: empty) and 2 x 2d bound values.
    std::vector<std::int64_t> ids(static_cast<std::size_t>(2 * H), -1), all_ids(ids.size() * p);
    std::vector<T> edge(static_cast<std::size_t>(H * 4 * d), T(0.0f)), all_edge(edge.size() * p);
    for (index_t h = 0; h < H; ++h) {
      const auto& b = bounds_[static_cast<std::size_t>(h)];
      if (b.empty()) continue;
      const index_t n = static_cast<index_t>(b.size()) / (2 * d), g0 = first_page_[static_cast<std::size_t>(h)];
      ids[static_cast<std::size_t>(2 * h)] = g0;
      ids[static_cast<std::size_t>(2 * h + 1)] = g0 + n - 1;
      std::copy(b.begin(), b.begin() + 2 * d, edge.begin() + h * 4 * d);
      std::copy(b.end() - 2 * d, b.end(), edge.begin() + h * 4 * d + 2 * d);
    }
    MPI_Allgather(ids.data(), static_cast<int>(ids.size()), MPI_INT64_T, all_ids.data(),
                  static_cast<int>(ids.size()), MPI_INT64_T, comm_.handle());
    MPI_Allgather(edge.data(), static_cast<int>(edge.size()), mpi_type<T>(), all_edge.data(),
                  static_cast<int>(edge.size()), mpi_type<T>(), comm_.handle());
    std::vector<float> other(static_cast<std::size_t>(2 * d));
    for (index_t h = 0; h < H; ++h) {
      auto& b = bounds_[static_cast<std::size_t>(h)];
      if (b.empty()) continue;
      const index_t n = static_cast<index_t>(b.size()) / (2 * d), g0 = first_page_[static_cast<std::size_t>(h)];
      for (const index_t mine_page : {g0, g0 + n - 1}) {
        T* dst = b.data() + (mine_page - g0) * 2 * d;
        load_row(dst, 1, mn.data(), d);
        load_row(dst + d, 1, mx.data(), d);
        for (int r = 0; r < p; ++r) {
          if (r == comm_.rank()) continue;
          for (int e = 0; e < 2; ++e) {
            if (all_ids[static_cast<std::size_t>(r) * ids.size() + static_cast<std::size_t>(2 * h + e)] != mine_page)
              continue;
            const T* src = all_edge.data() + static_cast<std::size_t>(r) * edge.size() +
                           static_cast<std::size_t>(h * 4 * d + e * 2 * d);
            load_row(src, 1, other.data(), 2 * d);
            for (index_t c = 0; c < d; ++c) {
              mn[static_cast<std::size_t>(c)] = std::min(mn[static_cast<std::size_t>(c)], other[static_cast<std::size_t>(c)]);
              mx[static_cast<std::size_t>(c)] = std::max(mx[static_cast<std::size_t>(c)], other[static_cast<std::size_t>(d + c)]);
            }
            break;  // a rank's first and last page are the same page when it holds one page
          }
        }
        store_row(mn.data(), dst, 1, d);
        store_row(mx.data(), dst + d, 1, d);
      }
    }
  }

  // The tail's append of m tokens already in the local cache's last m slots: lengths of the
  // last rank grow on every rank; the tail extends its page bounds (no communication).
  void appended(index_t m) {
    const int last = comm_.size() - 1;
    const index_t H = opt_.kv_heads, d = opt_.head_dim, P = opt_.page_size;
    for (index_t h = 0; h < H; ++h) lengths_[static_cast<std::size_t>(last * H + h)] += m;
    seq_ += m;
    if (!owns_tail()) return;
    std::vector<float> row(static_cast<std::size_t>(d)), mn(row.size()), mx(row.size());
    const auto kview = local_.keys();
    for (index_t h = 0; h < H; ++h) {
      const index_t off = slot_offset(h), len = local_.length(h);
      auto& b = bounds_[static_cast<std::size_t>(h)];
      if (b.empty()) first_page_[static_cast<std::size_t>(h)] = (off + len - m) / P;
      const index_t g0 = first_page_[static_cast<std::size_t>(h)];
      for (index_t s = len - m; s < len; ++s) {
        const index_t g = (off + s) / P;
        load_row(kview.row(h, s), kview.stride_dim, row.data(), d);
        if (g - g0 == static_cast<index_t>(b.size()) / (2 * d)) {  // a new page
          b.resize(b.size() + static_cast<std::size_t>(2 * d));
          T* dst = b.data() + (g - g0) * 2 * d;
          store_row(row.data(), dst, 1, d);
          store_row(row.data(), dst + d, 1, d);
          continue;
        }
        T* dst = b.data() + (g - g0) * 2 * d;
        load_row(dst, 1, mn.data(), d);
        load_row(dst + d, 1, mx.data(), d);
        for (index_t c = 0; c < d; ++c) {
          mn[static_cast<std::size_t>(c)] = std::min(mn[static_cast<std::size_t>(c)], row[static_cast<std::size_t>(c)]);
          mx[static_cast<std::size_t>(c)] = std::max(mx[static_cast<std::size_t>(c)], row[static_cast<std::size_t>(c)]);
        }
        store_row(mn.data(), dst, 1, d);
        store_row(mx.data(), dst + d, 1, d);
      }
    }
  }

  Communicator comm_;
  ShardedCacheOptions opt_;
  local_type local_;
  index_t begin_ = 0, seq_ = 0;
  std::vector<std::int64_t> lengths_;           // [ranks][Hkv]
  std::vector<index_t> first_page_;             // [Hkv] first global page intersecting the shard
  std::vector<std::vector<T>> bounds_;          // [Hkv][pages][2][d] min then max
};

/// @cond SPARSE_ATTN_INTERNAL
namespace detail {
// The dist/ entry points' access to a ShardedCache's internals.
struct CacheAccess {
  template <class T>
  static typename ShardedCache<T>::local_type& local(ShardedCache<T>& c) { return c.local_; }
  template <class T>
  static void appended(ShardedCache<T>& c, index_t m) { c.appended(m); }
  template <class T>
  static void refresh(ShardedCache<T>& c) { c.refresh(); }
  template <class T>
  static index_t first_page(const ShardedCache<T>& c, index_t h) {
    return c.first_page_[static_cast<std::size_t>(h)];
  }
  template <class T>
  static index_t num_pages(const ShardedCache<T>& c, index_t h) {
    return static_cast<index_t>(c.bounds_[static_cast<std::size_t>(h)].size()) / (2 * c.opt_.head_dim);
  }
  template <class T>
  static const T* page_bounds(const ShardedCache<T>& c, index_t h, index_t g) {
    return c.bounds_[static_cast<std::size_t>(h)].data() +
           (g - c.first_page_[static_cast<std::size_t>(h)]) * 2 * c.opt_.head_dim;
  }
};
}  // namespace detail
/// @endcond

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
