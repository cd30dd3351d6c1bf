// Method 6 (METHODS.md): Quest, query-aware page selection over a full KV cache.
//
// Each decode step, for every page of P keys (the cache's page_size) and KV head, an upper bound
// of the scaled logits in the page from the cache's per-page key min/max:
//   U_r(page) = scale * sum_d max(q_rd * min_d, q_rd * max_d)  >=  scale * q_r . k  for k in page.
// Since max_d >= min_d, max(q * min, q * max) = q^+ * max + q^- * min (q^+ = max(q, 0),
// q^- = min(q, 0)), so summing U over the G query heads of a group (the default, shared pages) is
// U = Q^+ . max + Q^- . min with Q^+- = scale * sum_r q_r^+-: two dot products per page whatever G.
// Several new tokens (n_q > 1) share one selection: their bounds are summed too.
// The top B pages among those before the current one (ties toward the lower page, NaN last:
// methods/detail/ranking.hpp) plus the current page(s) (every page holding one of the n_q new
// tokens) are attended by the core decode kernel. Per-query-head selection (per_query_head) ranks
// each query head's own bound and yields a KeySelection of scope per_q_head.
//
// Budget (unit tokens):
//   count(n)        B = n / P pages besides the current page(s) (always honoured).
//   compression(c)  the fewest pages not sparser than asked: keys = count_for_compression(len, c)
//                   and B = ceil((keys - current-page keys) / P); reachable iff the achieved CR
//                   (dense pairs / pairs read) is within the tolerance of c (the current page
//                   alone may already be denser than a high target on a short cache).
//   mass(p)         per unit, the fewest pages whose estimated attention mass reaches p, the
//                   current page(s) counted first. Estimate: softmax over the unit's pages of
//                   U / r + log(tokens in the page), r = the query rows the bound sums (G x n_q,
//                   or n_q per query head), i.e. each page as if all its keys reached the mean
//                   row's bound. Always honoured.
// B >= the pages before the current one is dense (the selection is the whole cache). The cache
// must have been built with key_bounds = true.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
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

/// What a Quest step computed besides its selection: the page bounds and the budget per unit.
/// Pass one to Quest::select to read them (or to reuse its storage across steps).
struct QuestPages {
  index_t page_size = 0;
  std::vector<index_t> budget_pages;  // B per unit (pages besides the current ones)
  std::vector<float> bounds;          // [units][bound_stride] U per page (scaled logits)
  index_t bound_stride = 0;
  bool dense = false;  // every page selected
};

struct Quest {
  static constexpr const char* name = "quest";
  static constexpr const char* summary = "Quest: top pages by key-bound, full cache kept";
  static constexpr BudgetUnit unit = BudgetUnit::tokens;
  static constexpr bool needs_key_bounds = true;

  bool per_query_head = false;  // rank pages per query head instead of per KV head (group sum)

  template <class V>
  void visit_params(V&& v) {
    v("per_query_head", per_query_head, "rank pages per query head instead of per KV head");
  }

  /// The step's selection for q [Hq, n_q, d] (the newest n_q tokens, already appended) on
  /// `cache`; sel (and pages, when given) are reused as storage across steps.
  template <class TQ, class Cache>
  void select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
              const AttentionOptions& opt, DecodeSelection& sel, QuestPages* pages = nullptr) const;

  template <class TQ, class Cache>
  DecodeSelection select(const TensorView<TQ>& q, const Cache& cache, const Budget& budget,
                         const AttentionOptions& opt = {}) const {
    DecodeSelection sel;
    select(q, cache, budget, opt, sel);
    return sel;
  }
};

namespace quest_detail {

// U for pages [p0, p1) of KV head hk: out[p] = qp . max + qn . min (qp, qn already scaled),
// on the CPU target's dot product (bounds read in their storage type).
template <class T, class Cache>
void page_bounds(const Cache& cache, index_t hk, const float* qp, const float* qn, index_t p0,
                 index_t p1, float* out) {
  const index_t d = cache.head_dim();
  arch::dispatch(cpu_target(), [&](auto a) {
    using A = decltype(a);
    for (index_t p = p0; p < p1; ++p) {
      const T* meta = cache.key_bounds(hk, p);
      out[p] = A::dot(qn, meta, d) + A::dot(qp, meta + d, d);
    }
  });
}

}  // namespace quest_detail

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
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
          opt.num_threads);
  const float scale = kernel::resolve_scale(opt.scale, d, where);
  const index_t G = q.heads / Hkv, n_q = q.tokens;
  for (index_t h = 0; h < Hkv; ++h)
    require(cache.length(h) >= n_q, where, ": KV head ", h, " holds ", cache.length(h),
            " tokens, fewer than the ", n_q, " new queries (append them first)");
  QuestPages local;
  QuestPages& pg = pages_out ? *pages_out : local;
  const bool per_q = per_query_head;
  const index_t units = per_q ? q.heads : Hkv;
  index_t max_pages = 0;
  for (index_t h = 0; h < Hkv; ++h) max_pages = std::max(max_pages, cache.num_pages(h));
  pg.page_size = P;
  pg.bound_stride = max_pages;
  pg.bounds.resize(static_cast<std::size_t>(units * max_pages));
  pg.budget_pages.assign(static_cast<std::size_t>(units), 0);

  // Per unit: Q^+ and Q^- (scaled, summed over the unit's query rows).
  std::vector<float> qpn(static_cast<std::size_t>(units * 2 * d), 0.0f);
  {
    std::vector<float> row(static_cast<std::size_t>(d));
    for (index_t h = 0; h < q.heads; ++h)
      for (index_t t = 0; t < n_q; ++t) {
        load_row(q.row(h, t), q.stride_dim, row.data(), d);
        float* qp = qpn.data() + (per_q ? h : h / G) * 2 * d;
        for (index_t c = 0; c < d; ++c) {
          const float x = row[static_cast<std::size_t>(c)] * scale;
          qp[c] += std::max(x, 0.0f);
          qp[d + c] += std::min(x, 0.0f);
        }
      }
  }

  // Bounds, in page chunks over (unit, chunk) items.
  constexpr index_t kPagesPerItem = 256, kSerialPages = 4096;
  const index_t chunks = (max_pages + kPagesPerItem - 1) / kPagesPerItem;
  auto bounds_of = [&](index_t it) {
    const index_t u = it / chunks, ch = it % chunks, hk = per_q ? u / G : u;
    const index_t p0 = ch * kPagesPerItem, p1 = std::min(cache.num_pages(hk), p0 + kPagesPerItem);
    const float* qp = qpn.data() + u * 2 * d;
    quest_detail::page_bounds<T>(cache, hk, qp, qp + d, p0, p1, pg.bounds.data() + u * max_pages);
  };
  if (units * max_pages < kSerialPages) {  // a small cache: a parallel region costs more
    for (index_t it = 0; it < units * chunks; ++it) bounds_of(it);
  } else {
    sparse_attn::detail::with_executor(opt.executor_choice(), [&](Executor& ex) {
      run_items(ex, units * chunks, [&](index_t it, int) { bounds_of(it); });
    });
  }

  // Top-B per unit among the pages before the current one(s); current pages always.
  std::vector<std::vector<KeyRange>> lists(static_cast<std::size_t>(units));
  std::vector<index_t> order;
  bool all_dense = true;
  const double rows = static_cast<double>(per_q ? n_q : G * n_q);
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u, len = cache.length(hk);
    const index_t first_cur = (len - n_q) / P;  // first page holding a new token
    const index_t cur_keys = len - first_cur * P;
    const float* U = pg.bounds.data() + u * max_pages;
    order.resize(static_cast<std::size_t>(first_cur));
    for (index_t p = 0; p < first_cur; ++p) order[static_cast<std::size_t>(p)] = p;
    const detail::ScoreOrder better{U};
    index_t B = 0;
    if (budget.is_count()) {
      B = budget.units() / P;
    } else if (budget.is_compression()) {
      const index_t keys = count_for_compression(len, budget.target_compression());
      B = std::max<index_t>(0, (keys - cur_keys + P - 1) / P);
    } else {
      // Estimated mass: softmax over every page of U / rows + log(tokens in page). The current
      // pages count first, then pages in rank order until the running mass reaches p.
      const index_t np = cache.num_pages(hk);
      auto logit = [&](index_t p) {
        const index_t tokens = std::min(len, (p + 1) * P) - p * P;
        return static_cast<double>(detail::rank_key(U[p])) / rows +
               std::log(static_cast<double>(tokens));
      };
      double mx = -std::numeric_limits<double>::infinity();
      for (index_t p = 0; p < np; ++p) mx = std::max(mx, logit(p));
      double total = 0.0, have = 0.0;
      for (index_t p = 0; p < np; ++p) {
        const double e = std::isfinite(mx) ? std::exp(logit(p) - mx) : 1.0;
        total += e;
        if (p >= first_cur) have += e;
      }
      std::sort(order.begin(), order.end(), better);
      const double want = budget.mass_target() * total;
      while (B < first_cur && have < want * (1.0 - 1e-12)) {
        const index_t p = order[static_cast<std::size_t>(B)];
        have += std::isfinite(mx) ? std::exp(logit(p) - mx) : 1.0;
        ++B;
      }
    }
    B = std::min(B, first_cur);
    pg.budget_pages[static_cast<std::size_t>(u)] = B;
    all_dense = all_dense && B == first_cur;
    if (B < first_cur && !budget.is_mass())
      std::nth_element(order.begin(), order.begin() + B, order.end(), better);
    order.resize(static_cast<std::size_t>(B));
    std::sort(order.begin(), order.end());
    auto& l = lists[static_cast<std::size_t>(u)];
    auto add = [&](index_t b, index_t e) {
      if (!l.empty() && l.back().end == b)
        l.back().end = e;
      else
        l.push_back({b, e});
    };
    for (index_t p : order) add(p * P, std::min(len, (p + 1) * P));
    if (len > 0) add(first_cur * P, len);
  }
  pg.dense = all_dense;
  if (all_dense && cache.uniform())
    sel.keys = KeySelection::all();
  else
    sel.keys = KeySelection::from_ranges(
        per_q ? KeySelection::Scope::per_q_head : KeySelection::Scope::per_kv_head, lists);
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
