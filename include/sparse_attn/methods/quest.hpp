// Method 6 (METHODS.md): Quest, query-aware page selection over a full KV cache.
//
// Each decode step, for every page of P keys (the cache's page_size) and KV head, an upper bound
// of the scaled logits in the page from the cache's per-page key min/max:
//   U_r(page) = scale * sum_d max(q_rd * min_d, q_rd * max_d)  >=  scale * q_r . k  for k in page.
// Since max_d >= min_d, max(q * min, q * max) = q^+ * max + q^- * min (q^+ = max(q, 0),
// q^- = min(q, 0)), so summing U over the G query heads of a group (the default, shared pages) is
// U = Q^+ . max + Q^- . min with Q^+- = scale * sum_r q_r^+-: two dot products per page whatever G.
// Several new tokens (n_q > 1) share one selection: their bounds are summed too.
// The top B pages among those before the current one (ties toward the lower page) plus the
// current page(s) (every page holding one of the n_q new tokens) are attended by the core decode
// kernel. Per-query-head selection (per_query_head) ranks each query head's own bound and yields
// a KeySelection of scope per_q_head.
//
// Budget: B = budget / P pages (budget in tokens), or from a target CR: the smallest B with
// length / (B * P + current-page keys) <= CR (achieved CR <= target, as block_sparse does). B >=
// the pages before the current one is dense (the selection is the whole cache). The cache must have
// been built with key_bounds = true.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "sparse_attn/exec/default.hpp"
#include "sparse_attn/kernel/common.hpp"
#include "sparse_attn/arch/dispatch.hpp"
#include "sparse_attn/kv/cache.hpp"
#include "sparse_attn/kv/decode.hpp"
#include "sparse_attn/kv/eviction.hpp"  // kv::detail::rank_key
#include "sparse_attn/mask/key_selection.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

struct QuestOptions {
  double compression = 10.0;    // target CR (finite, >= 1); ignored when budget > 0
  index_t budget = 0;           // > 0: tokens, B = budget / P pages besides the current page
  bool per_query_head = false;  // rank pages per query head instead of per KV head (group sum)
  float scale = std::numeric_limits<float>::quiet_NaN();  // NaN: 1 / sqrt(d)
  int num_threads = 0;           // threads of the default executor (0: OpenMP default)
  Executor* executor = nullptr;  // the caller's executor, not owned; nullptr: the default for
                                 // num_threads
};

/// A decode step's selection (the plan): run it with decode(q, cache.keys(), cache.values(),
/// out, plan.keys) or kv::decode(q, cache, out, plan.keys).
struct QuestPlan {
  KeySelection keys;  // per_kv_head (or per_q_head) ranges; all() when dense
  index_t page_size = 0;
  std::vector<index_t> budget_pages;  // B per unit
  std::vector<float> bounds;          // [units][bound_stride] U per page (scaled logits), if kept
  index_t bound_stride = 0;
  kv::DecodeStats stats;  // pairs, dense pairs, rows read: stats.compression() is the CR
  bool reachable = true;  // false when the current page alone exceeds the target CR's keys
  bool dense = false;     // every page selected
  double compression() const { return stats.compression(); }
};

namespace quest {
namespace detail {

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

}  // namespace detail

/// Page upper bounds and top-B selection for q [Hq, n_q, d] (the newest n_q tokens, already
/// appended) on `cache`; plan is reused as workspace across steps.
template <class TQ, class Cache>
void select(const TensorView<TQ>& q, const Cache& cache, const QuestOptions& opt, QuestPlan& plan) {
  using T = typename Cache::value_type;
  constexpr const char* where = "quest::select";
  validate_view(q, "q");
  const index_t Hkv = cache.kv_heads(), d = cache.head_dim(), P = cache.page_size();
  require(cache.has_key_bounds(), where,
          ": the cache keeps no key bounds; build it with key_bounds = true");
  require(q.heads >= 1 && q.heads % Hkv == 0, where, ": Hq=", q.heads,
          " is not a multiple of Hkv=", Hkv);
  require(q.dim == d, where, ": head_dim of q (", q.dim, ") differs from the cache (", d, ")");
  require(q.tokens >= 1, where, ": q needs >= 1 token");
  require(opt.budget >= 0, where, ": budget must be >= 0 tokens, got ", opt.budget);
  if (opt.budget == 0)
    require(std::isfinite(opt.compression) && opt.compression >= 1.0, where,
            ": compression must be finite and >= 1, got ", opt.compression);
  require(opt.num_threads >= 0, where, ": num_threads must be >= 0 (0: default), got ",
          opt.num_threads);
  const float scale = kernel::resolve_scale(opt.scale, d, where);
  const index_t G = q.heads / Hkv, n_q = q.tokens;
  for (index_t h = 0; h < Hkv; ++h)
    require(cache.length(h) >= n_q, where, ": KV head ", h, " holds ", cache.length(h),
            " tokens, fewer than the ", n_q, " new queries (append them first)");
  const bool per_q = opt.per_query_head;
  const index_t units = per_q ? q.heads : Hkv;
  index_t max_pages = 0;
  for (index_t h = 0; h < Hkv; ++h) max_pages = std::max(max_pages, cache.num_pages(h));
  plan.page_size = P;
  plan.bound_stride = max_pages;
  plan.bounds.resize(static_cast<std::size_t>(units * max_pages));
  plan.budget_pages.assign(static_cast<std::size_t>(units), 0);

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
    detail::page_bounds<T>(cache, hk, qp, qp + d, p0, p1, plan.bounds.data() + u * max_pages);
  };
  if (units * max_pages < kSerialPages) {  // a small cache: a parallel region costs more
    for (index_t it = 0; it < units * chunks; ++it) bounds_of(it);
  } else {
    sparse_attn::detail::with_executor({opt.executor, opt.num_threads}, [&](Executor& ex) {
      run_items(ex, units * chunks, [&](index_t it, int) { bounds_of(it); });
    });
  }

  // Top-B per unit among the pages before the current one(s); current pages always.
  std::vector<std::vector<KeyRange>> lists(static_cast<std::size_t>(units));
  std::vector<index_t> order;
  bool all_dense = true;
  plan.reachable = true;
  for (index_t u = 0; u < units; ++u) {
    const index_t hk = per_q ? u / G : u, len = cache.length(hk);
    const index_t first_cur = (len - n_q) / P;  // first page holding a new token
    const index_t cur_keys = len - first_cur * P;
    index_t B;
    if (opt.budget > 0) {
      B = opt.budget / P;
    } else {
      // Smallest B whose CR len / (B * P + cur_keys) is <= the target (at least that dense).
      const double target_keys = static_cast<double>(len) / opt.compression;
      const double b = (target_keys - static_cast<double>(cur_keys)) / static_cast<double>(P);
      B = std::max<index_t>(0, static_cast<index_t>(std::ceil(b - 1e-9)));
      if (b < -1e-9) plan.reachable = false;  // the current page alone is denser than the target
    }
    B = std::min(B, first_cur);
    plan.budget_pages[static_cast<std::size_t>(u)] = B;
    all_dense = all_dense && B == first_cur;
    const float* U = plan.bounds.data() + u * max_pages;
    order.resize(static_cast<std::size_t>(first_cur));
    for (index_t p = 0; p < first_cur; ++p) order[static_cast<std::size_t>(p)] = p;
    auto better = [&](index_t a, index_t b) {
      const float x = kv::detail::rank_key(U[a]), y = kv::detail::rank_key(U[b]);
      return x > y || (x == y && a < b);
    };
    if (B < first_cur) std::nth_element(order.begin(), order.begin() + B, order.end(), better);
    order.resize(static_cast<std::size_t>(B));
    std::sort(order.begin(), order.end());
    auto& l = lists[static_cast<std::size_t>(u)];
    l.clear();
    auto add = [&](index_t b, index_t e) {
      if (!l.empty() && l.back().end == b)
        l.back().end = e;
      else
        l.push_back({b, e});
    };
    for (index_t p : order) add(p * P, std::min(len, (p + 1) * P));
    if (len > 0) add(first_cur * P, len);
  }
  plan.dense = all_dense;
  if (all_dense && cache.uniform())
    plan.keys = KeySelection::all();
  else
    plan.keys = KeySelection::from_ranges(
        per_q ? KeySelection::Scope::per_q_head : KeySelection::Scope::per_kv_head, lists);
  plan.stats = kv::decode_stats(plan.keys, cache, q.heads, n_q);
}

template <class TQ, class Cache>
QuestPlan select(const TensorView<TQ>& q, const Cache& cache, const QuestOptions& opt) {
  QuestPlan plan;
  select(q, cache, opt, plan);
  return plan;
}

}  // namespace quest
}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
