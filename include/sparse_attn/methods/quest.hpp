/// @file
/// Quest, query-aware page selection over a full KV cache (docs/METHODS.md, section "quest").
///
/// Each decode step, for every page of P keys (the cache's page_size) and KV head, an upper bound
/// of the scaled logits in the page from the cache's per-page key min/max:
///   U_r(page) = scale * sum_d max(q_rd * min_d, q_rd * max_d)  >=  scale * q_r . k  for k in page.
/// Since max_d >= min_d, max(q * min, q * max) = q^+ * max + q^- * min (q^+ = max(q, 0),
/// q^- = min(q, 0)), so summing U over the G query heads of a group (the default, shared pages) is
/// U = Q^+ . max + Q^- . min with Q^+- = scale * sum_r q_r^+-: two dot products per page whatever
/// G.
/// Several new tokens (n_q > 1) share one selection: their bounds are summed too.
/// The top B pages among those before the current one (ties toward the lower page, NaN last:
/// methods/detail/ranking.hpp) plus the current page(s) (every page holding one of the n_q new
/// tokens) are attended by the core decode kernel. Per-query-head selection (per_query_head) ranks
/// each query head's own bound and yields a KeySelection of scope per_q_head.
///
/// Budget (unit tokens):
///   count(n)        B = n / P pages besides the current page(s) (always honoured).
///   compression(c)  the fewest pages not sparser than asked: keys = count_for_compression(len, c)
///                   and B = ceil((keys - current-page keys) / P); reachable iff the achieved CR
///                   (dense pairs / pairs read) is within the tolerance of c (the current page
///                   alone may already be denser than a high target on a short cache).
///   mass(p)         per unit, the fewest pages whose estimated attention mass reaches p, the
///                   current page(s) counted first. Estimate: softmax over the unit's pages of
///                   U / r + log(tokens in the page), r = the query rows the bound sums (G x n_q,
///                   or n_q per query head), i.e. each page as if all its keys reached the mean
///                   row's bound. The budget's floor and cap (tokens) bound B like count(n):
///                   B in [floor / P, cap / P]. Always honoured (the current pages are not
///                   counted against the cap).
///                   shared_mass (QuestHead's default): one threshold over every unit of the
///                   step instead of each unit its own p. With e_u(page) the estimate above
///                   (summing to 1 over unit u's pages), keep the (unit, earlier page) pairs in
///                   decreasing e (ties toward the lower unit, then the unit's rank order), the
///                   current pages of every unit counted first, until
///                     sum_u sum_{kept pages} e_u(page) >= p x units,
///                   i.e. the fewest pages reaching p per unit on average, all cut at one
///                   estimated mass tau (AdaKV's allocation, on pages): a sharp head keeps few
///                   pages, a diffuse one many. e_u is monotone in U over the full pages, so each
///                   unit keeps a prefix of its rank order. Then every unit keeps at least
///                   floor(shared_floor x mean B) pages (Ada-KV's safeguard, default 0.2), and
///                   the floor and cap bound each unit's B as above. With one unit it is that
///                   unit's own rule.
/// B >= the pages before the current one is dense (the selection is the whole cache). The cache
/// must have been built with key_bounds = true.
///
/// Cost per step: the bounds are streamed once (1/P of the keys' bytes per KV head: 1/16 of a
/// 16-token-page cache's K), one fp32 dot product of the page's 2d bound values (min, max) with
/// [Q^-, Q^+] per page, at memory speed; the top B is found in O(pages) (a radix select on the
/// bounds' order keys, then one pass in page order emits the ranges), never a sort (except for
/// the mass budget). With one thread each unit's bounds are ranked while they are in cache. The
/// step's scratch lives in the QuestPages passed (or the calling thread's own): no allocation per
/// step once grown, besides the KeySelection itself. Registry name "quest" (decode; make_policy()
/// gives a SelectionPolicy).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "sparse_attn/arch/dispatch.hpp"
#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/decode.hpp"
#include "sparse_attn/mask/key_selection.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/decode_policy.hpp"
#include "sparse_attn/methods/detail/ranking.hpp"
#include "sparse_attn/methods/selector.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// @cond SPARSE_ATTN_INTERNAL
namespace quest_detail {
/// Storage a Quest step reuses across steps (kept in QuestPages; see Quest::select).
struct Workspace {
  std::vector<float> qpn;                    // [units][2d]: Q^- then Q^+ (as min, max)
  std::vector<float> row;                    // one query row as fp32
  std::vector<std::vector<KeyRange>> lists;  // per unit: the selected key ranges
  std::vector<std::uint64_t> words;          // [workers][max_pages]: ranking scratch
  std::vector<std::uint32_t> keys;           // [workers][max_pages]: order_key of each bound
  std::vector<double> mass;                  // [units][max_pages]: estimated page masses
  std::vector<index_t> cand;                 // unit * max_pages + page: shared-mass candidates
  std::vector<index_t> shared_B;             // [units] B from the shared mass threshold
};
}  // namespace quest_detail
/// @endcond

/// What a Quest step computed besides its selection: the page bounds and the budget per unit.
/// Pass one to Quest::select to read them (or to reuse its storage across steps). A unit is a KV
/// head (default) or a query head (Quest::per_query_head). Not shared between concurrent calls.
struct QuestPages {
  index_t page_size = 0;              ///< P, tokens per page (the cache's page_size)
  std::vector<index_t> budget_pages;  ///< [units] B per unit (pages besides the current ones)
  std::vector<float> bounds;          ///< [units][bound_stride] U per page (scaled logits)
  index_t bound_stride = 0;           ///< row stride of bounds: the most pages of any KV head
  bool dense = false;                 ///< every page selected
  /// Scratch of the step (internal; no allocation once grown).
  quest_detail::Workspace work;
};

/// Quest as a method: per decode step, the top pages by an upper bound of the logits plus the
/// current page(s); the cache keeps every token. A value type of one parameter; select() is const
/// and keeps its scratch in the QuestPages given or in a thread_local one, so concurrent calls
/// from different threads are safe (each with its own `sel` and `pages`).
struct Quest {
  static constexpr const char* name = "quest";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary = "Quest: top pages by key-bound, full cache kept";
  /// Count budgets are tokens (B = tokens / page_size pages besides the current ones).
  static constexpr BudgetUnit unit = BudgetUnit::tokens;
  static constexpr bool takes_mass = true;  ///< takes Budget::mass (registry: MethodInfo)
  /// The cache must keep per-page key min/max (kv::CacheOptions::key_bounds).
  static constexpr bool needs_key_bounds = true;

  /// Rank pages per query head (a per_q_head KeySelection) instead of per KV head (the bounds
  /// summed over the GQA group; default false).
  bool per_query_head = false;
  /// Mass budgets: one threshold over the estimated page masses of every unit of the step
  /// instead of each unit its own p (see the file comment; default false).
  bool shared_mass = false;
  /// Shared mass threshold: each unit then keeps at least floor(shared_floor x the mean pages
  /// per unit the threshold kept) pages (Ada-KV's safeguard: a head whose pages all fall below
  /// the threshold would read nothing but its current page); in [0, 1], default 0.2.
  double shared_floor = 0.2;

  /// Hands the parameters to the registry: v(name, member, help) for "per_query_head",
  /// "shared_mass" and "shared_floor".
  /// @param v  visitor called as v(const char* name, T& member, const char* help).
  template <class V>
  void visit_params(V&& v) {
    v("per_query_head", per_query_head, "rank pages per query head instead of per KV head");
    v("shared_mass", shared_mass,
      "mass budgets: one mass threshold over every unit's pages (sum reaches p x units)");
    v("shared_floor", shared_floor,
      "shared mass: each unit keeps at least this fraction of the mean pages per unit");
  }

  /// The step's selection for q [Hq, n_q, d] (the newest n_q tokens, already appended) on
  /// `cache`; sel (and pages, when given) are reused as storage across steps. Without `pages`,
  /// the calling thread's own QuestPages (thread_local) is reused instead.
  /// @param q       the step's queries, [Hq, n_q, d] view (any strides; float, bf16 or fp16),
  ///                n_q >= 1: they share one selection (their bounds are summed).
  /// @param cache   the layer's cache, built with key_bounds = true; every head holds >= n_q
  ///                tokens (head lengths may differ).
  /// @param budget  count(n) tokens, compression(c) or mass(p) (see the file comment).
  /// @param opt     softmax scale (NaN: 1/sqrt(d)) and executor (bounds and ranking run on it
  ///                unless units x pages < 4096, or no executor is given and num_threads = 1).
  /// @param sel     out: keys (KeySelection::all() when every page is selected and the head
  ///                lengths are equal, else per-KV-head or per-query-head ranges) and stats
  ///                (pairs = (query row, key) pairs read); its storage is reused.
  /// @param pages   optional out: the step's bounds and budgets, and the scratch to reuse.
  /// @throws sparse_attn::invalid_argument if the budget is malformed, q is an invalid view, the
  ///         cache keeps no key bounds, Hq is not a positive multiple of Hkv, q's head_dim
  ///         differs from the cache's, n_q < 1, opt.num_threads < 0, opt.scale is neither NaN
  ///         nor finite > 0, a head holds fewer than n_q tokens, or a head has more than
  ///         2^32 - 1 pages. sel.stats is reset first; a failed check leaves sel.keys as it
  ///         was.
  /// Complexity per step: O(Hq x n_q x d) for the summed queries, O(units x pages x d) to read
  /// the bounds (1/P of K's bytes), O(units x pages) for the top B (radix select; mass budgets
  /// sort: O(units x pages log pages); shared_mass sorts the step's (unit, page) pairs together,
  /// O(units x pages log(units x pages)), after every unit's bounds). Allocation: none once the
  /// scratch has grown, besides the KeySelection's ranges; the thread_local scratch lives until
  /// the thread ends.
  template <class TQ, class Cache>
  void select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
              const AttentionOptions& opt, DecodeSelection& sel, QuestPages* pages = nullptr) const;

  /// The step's selection as a new DecodeSelection (see the other overload).
  /// @param q       the step's queries, [Hq, n_q, d] view.
  /// @param cache   the layer's cache (key_bounds = true).
  /// @param budget  count, compression or mass.
  /// @param opt     softmax scale and executor.
  /// @return the keys to read and the statistics.
  /// @throws sparse_attn::invalid_argument as the other overload.
  template <class TQ, class Cache>
  DecodeSelection select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                         const AttentionOptions& opt = {}) const {
    DecodeSelection sel;
    select(q, cache, budget, opt, sel);
    return sel;
  }
};

/// Quest per query head with the shared mass threshold (registry "quest_head"): Quest with
/// per_query_head = true and shared_mass = true by default, the same select(). Each query head
/// reads its own pages; a mass budget spends the step's pages where the estimated mass is, across
/// the heads (see the file comment), while count and compression budgets give every head B pages.
struct QuestHead : Quest {
  static constexpr const char* name = "quest_head";  ///< registry name
  /// One-line summary (the tool's method list).
  static constexpr const char* summary =
      "Quest per query head; a mass budget shares one threshold across heads";
  QuestHead() {
    per_query_head = true;
    shared_mass = true;
  }
};

/// @cond SPARSE_ATTN_INTERNAL
namespace quest_detail {

// U for pages [p0, p1) of KV head hk: out[p] = qpn . bounds(p) over the page's 2d bound values
// (min then max: qpn = [Q^-, Q^+], already scaled), one dot product per page on the CPU target
// (bounds widened from their storage type, fp32 products and sums).
template <class T, class Cache>
void page_bounds(const Cache& cache, index_t hk, const float* qpn, index_t p0, index_t p1,
                 float* out) {
  const index_t d2 = 2 * cache.head_dim();
  arch::dispatch(cpu_target(), [&](auto a) {
    using A = decltype(a);
    for (index_t p = p0; p < p1; ++p) out[p] = A::dot(qpn, cache.key_bounds(hk, p), d2);
  });
}

/// An unsigned key that orders bounds as the ranking does (methods/detail/ranking.hpp): larger
/// ranks first, NaN as -inf, -0 equal to +0. Branch-free (vectorises over pages).
inline std::uint32_t order_key(float s) {
  const float x = s + 0.0f;  // -0 -> +0
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  b = (b & 0x7FFFFFFFu) > 0x7F800000u ? 0xFF800000u : b;  // NaN -> -inf
  return b ^ (static_cast<std::uint32_t>(static_cast<std::int32_t>(b) >> 31) | 0x80000000u);
}

/// The rank of page p with key k as one word: a larger word ranks first, ties toward the lower
/// page (p < 2^32).
inline std::uint64_t rank_word(std::uint32_t k, index_t p) {
  return (std::uint64_t{k} << 32) | (0xFFFFFFFFu - static_cast<std::uint32_t>(p));
}

/// The page a rank word names.
inline index_t word_page(std::uint64_t w) {
  return static_cast<index_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(w));
}

/// The B-th largest rank word of pages [0, n) with keys key[0, n) (0 < B < n): page p is among
/// the top B iff rank_word(key[p], p) >= the result. O(n): radix histograms of the keys (11, 11,
/// 10 bits) narrow the candidates to the bucket holding the B-th; the few left go through
/// nth_element. cand: n words of scratch.
inline std::uint64_t top_threshold(const std::uint32_t* key, index_t n, index_t B,
                                   std::uint64_t* cand) {
  constexpr int kTopBits = 11;
  constexpr std::size_t kBuckets = std::size_t{1} << kTopBits;
  constexpr index_t kFew = 64;  // candidates left to nth_element
  // Two interleaved histograms: runs of equal buckets do not wait on one counter.
  std::uint32_t hist[2][kBuckets];
  std::fill(&hist[0][0], &hist[0][0] + 2 * kBuckets, 0u);
  index_t p = 0;
  for (; p + 2 <= n; p += 2) {
    ++hist[0][key[p] >> (32 - kTopBits)];
    ++hist[1][key[p + 1] >> (32 - kTopBits)];
  }
  if (p < n) ++hist[0][key[p] >> (32 - kTopBits)];
  index_t need = B;  // rank wanted within the current bucket (1-based)
  std::uint32_t b = kBuckets - 1;
  for (;; --b) {
    const index_t c = static_cast<index_t>(hist[0][b]) + static_cast<index_t>(hist[1][b]);
    if (c >= need) break;
    need -= c;
  }
  index_t m = 0;  // candidates: the bucket's pages (stored branch-free)
  for (p = 0; p < n; ++p) {
    cand[m] = rank_word(key[p], p);
    m += (key[p] >> (32 - kTopBits)) == b;
  }
  // Narrow further on the next 11, then 10 key bits while many candidates are left.
  for (const int shift : {10, 0}) {
    if (m <= kFew) break;
    const std::uint32_t mask = shift == 0 ? 0x3FFu : 0x7FFu;
    std::fill(hist[0], hist[0] + mask + 1, 0u);
    for (index_t i = 0; i < m; ++i) ++hist[0][(cand[i] >> (32 + shift)) & mask];
    b = mask;
    while (static_cast<index_t>(hist[0][b]) < need) need -= static_cast<index_t>(hist[0][b--]);
    index_t k = 0;
    for (index_t i = 0; i < m; ++i) {
      const std::uint64_t w = cand[i];
      cand[k] = w;
      k += ((w >> (32 + shift)) & mask) == b;
    }
    m = k;
  }
  std::nth_element(cand, cand + (need - 1), cand + m, std::greater<std::uint64_t>());
  return cand[need - 1];
}

}  // namespace quest_detail
/// @endcond

template <class TQ, class Cache>
void Quest::select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                   const AttentionOptions& opt, DecodeSelection& sel, QuestPages* pages_out) const {
  using T = typename Cache::value_type;
  constexpr const char* where = "methods::Quest::select";
  SelectionStats& stats = sel.stats;
  stats = SelectionStats{};
  SelectionTimer timer(stats);
  require_budget_kind(budget, true, true, true, where);
  validate_view(q, "q");
  const index_t Hkv = cache.kv_heads(), d = cache.head_dim(), P = cache.page_size();
  require(cache.has_key_bounds(), where,
          ": the cache keeps no key bounds; build it with key_bounds = true");
  require(q.heads >= 1 && q.heads % Hkv == 0, where, ": Hq=", q.heads,
          " is not a multiple of Hkv=", Hkv);
  require(q.dim == d, where, ": head_dim of q (", q.dim, ") differs from the cache (", d, ")");
  require(q.tokens >= 1, where, ": q needs >= 1 token");
  require(shared_floor >= 0.0 && shared_floor <= 1.0, where, ": shared_floor must be in [0, 1], got ",
          shared_floor);
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
          opt.num_threads);
  const float scale = kernel::resolve_scale(opt.scale, d, where);
  const index_t G = q.heads / Hkv, n_q = q.tokens;
  for (index_t h = 0; h < Hkv; ++h)
    require(cache.length(h) >= n_q, where, ": KV head ", h, " holds ", cache.length(h),
            " tokens, fewer than the ", n_q, " new queries (append them first)");
  // Storage reused across steps: the caller's, else this thread's own.
  static thread_local QuestPages own;
  QuestPages& pg = pages_out ? *pages_out : own;
  quest_detail::Workspace& ws = pg.work;
  const bool per_q = per_query_head;
  const index_t units = per_q ? q.heads : Hkv;
  index_t max_pages = 0;
  for (index_t h = 0; h < Hkv; ++h) max_pages = std::max(max_pages, cache.num_pages(h));
  require(max_pages <= index_t{0xFFFFFFFF}, where, ": ", max_pages, " pages exceed 2^32 - 1");
  pg.page_size = P;
  pg.bound_stride = max_pages;
  pg.bounds.resize(static_cast<std::size_t>(units * max_pages));
  pg.budget_pages.assign(static_cast<std::size_t>(units), 0);

  // Per unit: Q^- and Q^+ (scaled, summed over the unit's query rows), in the order of the
  // bounds (min, max).
  ws.qpn.assign(static_cast<std::size_t>(units * 2 * d), 0.0f);
  ws.row.resize(static_cast<std::size_t>(d));
  for (index_t h = 0; h < q.heads; ++h)
    for (index_t t = 0; t < n_q; ++t) {
      load_row(q.row(h, t), q.stride_dim, ws.row.data(), d);
      float* qn = ws.qpn.data() + (per_q ? h : h / G) * 2 * d;
      for (index_t c = 0; c < d; ++c) {
        const float x = ws.row[static_cast<std::size_t>(c)] * scale;
        qn[c] += std::min(x, 0.0f);
        qn[d + c] += std::max(x, 0.0f);
      }
    }
  ws.lists.resize(static_cast<std::size_t>(units));  // inner lists keep their capacity

  // Bounds of (unit, page chunk) items.
  constexpr index_t kPagesPerItem = 256, kSerialPages = 4096;
  const index_t chunks = (max_pages + kPagesPerItem - 1) / kPagesPerItem;
  auto bounds_of = [&](index_t it) {
    const index_t u = it / chunks, ch = it % chunks, hk = per_q ? u / G : u;
    const index_t p0 = ch * kPagesPerItem, p1 = std::min(cache.num_pages(hk), p0 + kPagesPerItem);
    quest_detail::page_bounds<T>(cache, hk, ws.qpn.data() + u * 2 * d, p0, p1,
                                 pg.bounds.data() + u * max_pages);
  };

  // Mass budgets: e[p] = the estimated share of unit u's attention on page p, softmax over the
  // unit's pages of U / rows + log(tokens in page) (all pages equal when the largest is not
  // finite), into ws.mass[u * max_pages ...].
  const double rows = static_cast<double>(per_q ? n_q : G * n_q);
  const bool shared = budget.is_mass() && shared_mass;
  if (budget.is_mass()) ws.mass.resize(static_cast<std::size_t>(units * max_pages));
  auto estimate = [&](index_t u) {
    const index_t hk = per_q ? u / G : u, len = cache.length(hk), np = cache.num_pages(hk);
    const float* U = pg.bounds.data() + u * max_pages;
    double* e = ws.mass.data() + u * max_pages;
    double mx = -std::numeric_limits<double>::infinity(), total = 0.0;
    const double log_full = std::log(static_cast<double>(P));  // every page but a partial last
    for (index_t p = 0; p < np; ++p) {
      const index_t tokens = std::min(len, (p + 1) * P) - p * P;
      e[p] = static_cast<double>(detail::rank_key(U[p])) / rows +
             (tokens == P ? log_full : std::log(static_cast<double>(tokens)));
      mx = std::max(mx, e[p]);
    }
    for (index_t p = 0; p < np; ++p) total += e[p] = std::isfinite(mx) ? std::exp(e[p] - mx) : 1.0;
    for (index_t p = 0; p < np; ++p) e[p] /= total;
  };
  // A mass budget's B for a unit of first_cur earlier pages: the floor and cap count tokens like
  // count(n), n / P earlier pages.
  auto clamp_mass = [&](index_t B, index_t first_cur) {
    B = std::clamp(B, budget.mass_floor() / P,
                   std::max(budget.mass_floor(), budget.mass_cap()) / P);
    return std::min(B, first_cur);
  };
  // Shared mass: (unit, earlier page) pairs in decreasing estimated mass (ties toward the lower
  // unit, then the unit's rank order) until the mass read summed over the units reaches
  // p x units, every unit's current pages counted first; each unit's B is its pairs taken.
  auto share = [&]() {
    ws.cand.clear();
    ws.shared_B.assign(static_cast<std::size_t>(units), 0);
    double have = 0.0;
    for (index_t u = 0; u < units; ++u) {
      estimate(u);
      const index_t hk = per_q ? u / G : u, first_cur = (cache.length(hk) - n_q) / P;
      for (index_t p = first_cur; p < cache.num_pages(hk); ++p) have += ws.mass[static_cast<std::size_t>(u * max_pages + p)];
      for (index_t p = 0; p < first_cur; ++p) ws.cand.push_back(u * max_pages + p);
    }
    const double* e = ws.mass.data();
    const float* U = pg.bounds.data();
    auto before = [&](index_t a, index_t b) {
      if (e[a] != e[b]) return e[a] > e[b];
      if (a / max_pages != b / max_pages) return a < b;
      return quest_detail::rank_word(quest_detail::order_key(U[a]), a % max_pages) >
             quest_detail::rank_word(quest_detail::order_key(U[b]), b % max_pages);
    };
    const double want = budget.mass_target() * static_cast<double>(units) * (1.0 - 1e-12);
    auto take = [&](index_t c) {
      have += e[c];
      ++ws.shared_B[static_cast<std::size_t>(c / max_pages)];
    };
    // The shortest prefix of the candidates in `before` order whose mass reaches want, without
    // sorting them all: a weighted quickselect. nth_element splits [lo, hi) at its middle; when
    // the better half does not reach want every page of it is kept and the search goes on in
    // the other half, else in the better half. O(candidates) expected (a full sort took most of
    // a step's selection time); the last few are sorted and taken in order.
    auto lo = ws.cand.begin(), hi = ws.cand.end();
    while (hi - lo > 32 && have < want) {
      const auto mid = lo + (hi - lo) / 2;
      std::nth_element(lo, mid, hi, before);
      double half = 0.0;
      for (auto it = lo; it != mid; ++it) half += e[*it];
      if (have + half < want) {
        for (auto it = lo; it != mid; ++it) take(*it);
        lo = mid;
      } else {
        hi = mid;
      }
    }
    std::sort(lo, hi, before);
    for (auto it = lo; it != hi && have < want; ++it) take(*it);
    // The safeguard: every unit at least floor(shared_floor x mean) of its earlier pages.
    index_t kept = 0;
    for (index_t B : ws.shared_B) kept += B;
    const auto least = static_cast<index_t>(std::floor(shared_floor * static_cast<double>(kept) /
                                                       static_cast<double>(units)));
    // Then the budget's floor and cap, as for every mass budget.
    for (index_t u = 0; u < units; ++u) {
      const index_t first_cur = (cache.length(per_q ? u / G : u) - n_q) / P;
      auto& B = ws.shared_B[static_cast<std::size_t>(u)];
      B = clamp_mass(std::max(B, std::min(least, first_cur)), first_cur);
    }
  };

  // Top-B of unit u among the pages before the current one(s), plus the current pages, as key
  // ranges in ws.lists[u]; words, key: max_pages words and keys of scratch.
  auto rank_unit = [&](index_t u, std::uint64_t* words, std::uint32_t* key) {
    const index_t hk = per_q ? u / G : u, len = cache.length(hk);
    const index_t first_cur = (len - n_q) / P;  // first page holding a new token
    const index_t cur_keys = len - first_cur * P;
    const float* U = pg.bounds.data() + u * max_pages;
    for (index_t p = 0; p < first_cur; ++p) key[p] = quest_detail::order_key(U[p]);
    index_t B = 0;
    std::uint64_t threshold = 0;  // page p < first_cur is selected iff its rank word >= this
    if (budget.is_count()) {
      B = budget.units() / P;
    } else if (budget.is_compression()) {
      const index_t keys = count_for_compression(len, budget.target_compression());
      B = std::max<index_t>(0, (keys - cur_keys + P - 1) / P);
    } else if (shared_mass) {
      B = ws.shared_B[static_cast<std::size_t>(u)];
    } else {
      // The current pages count first, then pages in rank order until the running mass
      // reaches p.
      estimate(u);
      const double* e = ws.mass.data() + u * max_pages;
      double have = 0.0;
      for (index_t p = first_cur; p < cache.num_pages(hk); ++p) have += e[p];
      for (index_t p = 0; p < first_cur; ++p) words[p] = quest_detail::rank_word(key[p], p);
      std::sort(words, words + first_cur, std::greater<std::uint64_t>());
      const double want = budget.mass_target();
      while (B < first_cur && have < want * (1.0 - 1e-12))
        have += e[quest_detail::word_page(words[B++])];
      B = clamp_mass(B, first_cur);
      if (B > 0 && B < first_cur) threshold = words[B - 1];
    }
    B = std::min(B, first_cur);
    pg.budget_pages[static_cast<std::size_t>(u)] = B;
    if (B > 0 && B < first_cur && !(budget.is_mass() && !shared_mass))
      threshold = quest_detail::top_threshold(key, first_cur, B, words);
    auto& l = ws.lists[static_cast<std::size_t>(u)];
    l.clear();
    auto add = [&](index_t b, index_t e) {
      if (!l.empty() && l.back().end == b)
        l.back().end = e;
      else
        l.push_back({b, e});
    };
    if (B == first_cur) {
      if (first_cur > 0) add(0, first_cur * P);
    } else if (B > 0) {
      for (index_t p = 0; p < first_cur; ++p)
        if (quest_detail::rank_word(key[p], p) >= threshold) add(p * P, (p + 1) * P);
    }
    if (len > 0) add(first_cur * P, len);
  };

  ws.words.resize(static_cast<std::size_t>(max_pages));
  ws.keys.resize(static_cast<std::size_t>(max_pages));
  if (units * max_pages < kSerialPages || (opt.executor == nullptr && opt.num_threads == 1)) {
    // One thread: each unit's bounds, then its ranking while they are in cache.
    // (A shared mass threshold needs every unit's bounds first.)
    for (index_t u = 0; u < units; ++u) {
      for (index_t ch = 0; ch < chunks; ++ch) bounds_of(u * chunks + ch);
      if (!shared) rank_unit(u, ws.words.data(), ws.keys.data());
    }
    if (shared) {
      share();
      for (index_t u = 0; u < units; ++u) rank_unit(u, ws.words.data(), ws.keys.data());
    }
  } else {
    sparse_attn::detail::with_executor(opt.executor_choice(), [&](Executor& ex) {
      run_items(ex, units * chunks, [&](index_t it, int) { bounds_of(it); });
      if (shared) share();
      const index_t workers = ex.concurrency();
      ws.words.resize(static_cast<std::size_t>(max_pages * workers));
      ws.keys.resize(static_cast<std::size_t>(max_pages * workers));
      run_items(ex, units, [&](index_t u, int worker) {
        const index_t off = static_cast<index_t>(worker) * max_pages;
        rank_unit(u, ws.words.data() + off, ws.keys.data() + off);
      });
    });
  }
  bool all_dense = true;
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u;
    all_dense = all_dense &&
                pg.budget_pages[static_cast<std::size_t>(u)] == (cache.length(hk) - n_q) / P;
  }
  pg.dense = all_dense;
  if (all_dense && cache.uniform())
    sel.keys = KeySelection::all();
  else
    sel.keys = KeySelection::from_ranges(
        per_q ? KeySelection::Scope::per_q_head : KeySelection::Scope::per_kv_head, ws.lists);
  const kv::DecodeStats ds = kv::decode_stats(sel.keys, cache, q.heads, n_q);
  stats.pairs = ds.pairs;
  stats.dense_pairs = ds.dense_pairs;
  stats.target = budget;
  index_t bmin = pg.budget_pages.empty() ? 0 : pg.budget_pages[0], bmax = bmin;
  for (index_t b : pg.budget_pages) bmin = std::min(bmin, b), bmax = std::max(bmax, b);
  stats.detail = "B=" + std::to_string(bmin) +
                 (bmax != bmin ? "-" + std::to_string(bmax) : std::string()) + " pages of " +
                 std::to_string(P);
  finish_stats(stats);
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
