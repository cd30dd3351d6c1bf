// Context-parallel decode (dist/decode.hpp, dist/eviction.hpp) against the single-process methods
// on the same data: every rank builds the whole problem from a seed, runs the single-process
// method locally as the oracle, and holds only its shard in the distributed run. The selected
// key sets (global slots, gathered from all ranks) must be identical and rank 0's output equal to
// fp32 rounding.
#include <sparse_attn/dist/decode.hpp>
#include <sparse_attn/dist/eviction.hpp>
#include <sparse_attn/methods/ada_snapkv.hpp>
#include <sparse_attn/methods/quest.hpp>
#include <sparse_attn/methods/snapkv.hpp>
#include <sparse_attn/methods/streaming.hpp>

#include <gtest/gtest.h>

#include "same_error_everywhere.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

using namespace sparse_attn;

namespace {

std::vector<float> random_values(std::size_t n, std::uint64_t seed, float amplitude = 1.0f) {
  std::vector<float> x(n);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& e : x) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    e = amplitude * (static_cast<float>(static_cast<std::int32_t>(s >> 32)) / 2147483648.0f);
  }
  return x;
}

// How the prompt is split: balanced along pages, or deliberately uneven (not page aligned).
enum class Split { pages, uneven };

dist::TokenRange range_of(index_t n, index_t P, Split split, int rank, int size) {
  if (split == Split::pages) return dist::shard_range(n, P, rank, size);
  // Uneven: rank r gets a share proportional to (r + 1) (the last the largest), cut anywhere.
  const index_t total_w = static_cast<index_t>(size) * (size + 1) / 2;
  index_t w0 = static_cast<index_t>(rank) * (rank + 1) / 2, w1 = w0 + rank + 1;
  return {n * w0 / total_w, n * w1 / total_w};
}

struct Problem {
  index_t Hkv = 2, G = 4, d = 32, P = 16, n = 200, n_q = 1, steps = 3;
  std::uint64_t seed = 1;
  index_t Hq() const { return Hkv * G; }
  std::vector<float> k, v;  // [Hkv][n][d] token rows, head-major
  std::vector<float> q_prompt;
  void make() {
    k = random_values(static_cast<std::size_t>(Hkv * n * d), seed);
    v = random_values(static_cast<std::size_t>(Hkv * n * d), seed + 1);
    q_prompt = random_values(static_cast<std::size_t>(Hq() * 32 * d), seed + 2, 2.0f);
  }
  TensorView<const float> keys() const { return {k.data(), Hkv, n, d}; }
  TensorView<const float> values() const { return {v.data(), Hkv, n, d}; }
  std::vector<float> step_q(index_t s) const {
    return random_values(static_cast<std::size_t>(Hq() * n_q * d), seed + 100 + 3 * s, 2.0f);
  }
  std::vector<float> step_k(index_t s) const {
    return random_values(static_cast<std::size_t>(Hkv * n_q * d), seed + 101 + 3 * s);
  }
  std::vector<float> step_v(index_t s) const {
    return random_values(static_cast<std::size_t>(Hkv * n_q * d), seed + 102 + 3 * s);
  }
};

// The global slots of unit u selected over all ranks, ascending.
template <class T>
std::vector<index_t> gathered_slots(const dist::ShardedCache<T>& cache, const KeySelection& keys,
                                    index_t u, index_t G) {
  const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
  const index_t hk = per_q ? u / G : u, off = cache.slot_offset(hk), len = cache.local().length(hk);
  std::vector<std::int64_t> mine;
  if (keys.scope() == KeySelection::Scope::all) {
    for (index_t s = 0; s < len; ++s) mine.push_back(off + s);
  } else {
    for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
      for (index_t s = r->begin; s < std::min(r->end, len); ++s) mine.push_back(off + s);
  }
  const MPI_Comm comm = cache.comm().handle();
  const int p = cache.comm().size();
  int count = static_cast<int>(mine.size());
  std::vector<int> counts(static_cast<std::size_t>(p)), displ(static_cast<std::size_t>(p));
  MPI_Allgather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, comm);
  int total = 0;
  for (int r = 0; r < p; ++r) displ[static_cast<std::size_t>(r)] = total, total += counts[static_cast<std::size_t>(r)];
  std::vector<std::int64_t> all(static_cast<std::size_t>(total));
  MPI_Allgatherv(mine.data(), count, MPI_INT64_T, all.data(), counts.data(), displ.data(), MPI_INT64_T, comm);
  std::sort(all.begin(), all.end());
  return {all.begin(), all.end()};
}

// The slots of unit u a single-process selection reads.
template <class Cache>
std::vector<index_t> oracle_slots(const Cache& cache, const KeySelection& keys, index_t u, index_t G) {
  std::vector<index_t> s;
  const bool per_q = keys.scope() == KeySelection::Scope::per_q_head;
  const index_t len = cache.length(per_q ? u / G : u);
  if (keys.scope() == KeySelection::Scope::all) {
    for (index_t j = 0; j < len; ++j) s.push_back(j);
  } else {
    for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
      for (index_t j = r->begin; j < std::min(r->end, len); ++j) s.push_back(j);
  }
  return s;
}

float max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / std::max(scale, 1e-30f);
}

// The single-process selection of one step for the policy.
kv::ContiguousCache<float> oracle_cache(const Problem& pb, index_t capacity) {
  kv::CacheOptions o;
  o.kv_heads = pb.Hkv;
  o.head_dim = pb.d;
  o.capacity = capacity;
  o.page_size = pb.P;
  return kv::ContiguousCache<float>(o);
}

KeySelection oracle_select(const dist::StepPolicy& pol, const TensorView<const float>& q,
                           kv::ContiguousCache<float>& cache, const Problem& pb) {
  using K = dist::StepPolicy::Kind;
  if (pol.kind == K::quest) {
    methods::Quest m;
    m.per_query_head = pol.per_query_head;
    return m.select(q, cache, pol.budget).keys;
  }
  if (pol.kind == K::streaming) {  // single-process StreamingLLM evicts: its cache is the keys
    methods::evict(methods::StreamingLLM{pol.sinks}, q, cache, pol.budget);
    return KeySelection::all();
  }
  if (pol.kind == K::window) {  // the stated rule: first S and last W slots per head
    std::vector<std::vector<KeyRange>> l(static_cast<std::size_t>(pb.Hkv));
    for (index_t h = 0; h < pb.Hkv; ++h) {
      const index_t L = cache.length(h), s = std::min(pol.sinks, L);
      if (s > 0) l[static_cast<std::size_t>(h)].push_back({0, s});
      const index_t b = std::max(s, L - pol.window);
      if (b < L) l[static_cast<std::size_t>(h)].push_back({b, L});
    }
    return KeySelection::from_ranges(KeySelection::Scope::per_kv_head, l);
  }
  return KeySelection::all();
}

// Runs `steps` decode steps distributed and single-process; compares keys and outputs. With
// `snapkv`, both first evict the prompt with SnapKV (with `ada`: Ada-SnapKV) at that budget.
// *ragged (if given): whether the KV heads kept different numbers of tokens.
void run_case(Problem pb, const dist::StepPolicy& pol, Split split,
              const methods::Budget* snapkv = nullptr, bool ada = false,
              bool* ragged = nullptr) {
  pb.make();
  dist::Communicator comm;
  const dist::TokenRange r = range_of(pb.n, pb.P, split, comm.rank(), comm.size());
  dist::ShardedCacheOptions so;
  so.kv_heads = pb.Hkv;
  so.head_dim = pb.d;
  so.page_size = pb.P;
  so.decode_capacity = pb.steps * pb.n_q;
  dist::ShardedCache<float> cache(comm, so, r.begin, pb.keys().slice_tokens(r.begin, r.end - r.begin),
                                  pb.values().slice_tokens(r.begin, r.end - r.begin));
  kv::ContiguousCache<float> single = oracle_cache(pb, pb.n + pb.steps * pb.n_q);
  single.append(pb.keys(), pb.values());
  const index_t Hq = pb.Hq(), G = pb.G;
  if (snapkv != nullptr) {
    const TensorView<const float> qp(pb.q_prompt.data(), Hq, 32, pb.d);
    kv::EvictionPlan plan;
    dist::EvictionStats es;
    if (ada) {
      methods::AdaSnapKV m;
      m.window = 8;
      m.floor_fraction = 0.3;
      plan = methods::evict(m, qp, single, *snapkv);
      es = dist::evict_ada_snapkv(cache, m, qp, *snapkv);
    } else {
      methods::SnapKV m;
      m.window = 8;
      plan = methods::evict(m, qp, single, *snapkv);
      es = dist::evict_snapkv(cache, m, qp, *snapkv);
    }
    for (index_t h = 0; h < pb.Hkv; ++h) {
      const std::vector<index_t> got = gathered_slots(cache, KeySelection::all(), h, G);
      ASSERT_EQ(static_cast<index_t>(got.size()), plan.kept(h)) << "head " << h;
      // Kept positions: the distributed shards' survivors map back through global_position.
      std::vector<std::int64_t> pos;
      for (index_t s = 0; s < cache.local().length(h); ++s) pos.push_back(cache.global_position(h, s));
      int c = static_cast<int>(pos.size());
      std::vector<int> cs(static_cast<std::size_t>(comm.size())), ds(cs.size());
      MPI_Allgather(&c, 1, MPI_INT, cs.data(), 1, MPI_INT, comm.handle());
      int tot = 0;
      for (std::size_t i = 0; i < cs.size(); ++i) ds[i] = tot, tot += cs[i];
      std::vector<std::int64_t> all(static_cast<std::size_t>(tot));
      MPI_Allgatherv(pos.data(), c, MPI_INT64_T, all.data(), cs.data(), ds.data(), MPI_INT64_T, comm.handle());
      std::vector<index_t> want(plan.keep[static_cast<std::size_t>(h)].begin(), plan.keep[static_cast<std::size_t>(h)].end());
      EXPECT_EQ(std::vector<index_t>(all.begin(), all.end()), want) << "kept positions of head " << h;
    }
    EXPECT_EQ(es.global_kept, plan.total_kept());
    if (ragged != nullptr) {
      *ragged = false;
      for (index_t h = 1; h < pb.Hkv; ++h) *ragged = *ragged || plan.kept(h) != plan.kept(0);
    }
  }
  for (index_t s = 0; s < pb.steps; ++s) {
    const std::vector<float> qs = pb.step_q(s), ks = pb.step_k(s), vs = pb.step_v(s);
    const TensorView<const float> q(qs.data(), Hq, pb.n_q, pb.d);
    const TensorView<const float> kn(ks.data(), pb.Hkv, pb.n_q, pb.d), vn(vs.data(), pb.Hkv, pb.n_q, pb.d);
    // Single process.
    single.append(kn, vn);
    const KeySelection want_keys = oracle_select(pol, q, single, pb);
    std::vector<float> want(static_cast<std::size_t>(Hq * pb.n_q * pb.d)), want_lse(static_cast<std::size_t>(Hq * pb.n_q));
    DecodeOptions o;
    o.lse = LseView(want_lse.data(), pb.n_q);
    decode(q, single, TensorView<float>(want.data(), Hq, pb.n_q, pb.d), want_keys, o);
    // Distributed.
    std::vector<float> got(want.size(), 0.0f), got_lse(want_lse.size(), 0.0f);
    DecodeOptions od;
    od.lse = LseView(got_lse.data(), pb.n_q);
    dist::StepStats st;
    dist::decode_step(cache, q, kn, vn, TensorView<float>(got.data(), Hq, pb.n_q, pb.d), pol, od, &st);
    const bool per_q = want_keys.scope() == KeySelection::Scope::per_q_head;
    for (index_t u = 0; u < (per_q ? Hq : pb.Hkv); ++u) {
      std::vector<index_t> want_slots = oracle_slots(single, want_keys, u, G);
      if (pol.kind == dist::StepPolicy::Kind::streaming) {  // compare positions: the oracle evicted
        for (index_t& j : want_slots) j = single.position(u, j);
      }
      EXPECT_EQ(gathered_slots(cache, st.keys, u, G), want_slots) << "step " << s << " unit " << u;
    }
    const kv::DecodeStats ds = kv::decode_stats(want_keys, single, Hq, pb.n_q);
    EXPECT_EQ(st.global_kv_rows, ds.kv_rows);
    EXPECT_EQ(st.pairs, ds.pairs);
    if (comm.rank() == 0) {
      EXPECT_LE(max_rel_diff(got, want), 1e-5f) << "step " << s;
      EXPECT_LE(max_rel_diff(got_lse, want_lse), 1e-5f) << "step " << s;
    }
  }
}

}  // namespace

TEST(CpDecode, DenseEqualsSingleProcess) {
  Problem pb;
  run_case(pb, dist::StepPolicy::dense(), Split::pages);
  pb.n = 131;  // not a multiple of P, uneven shards, two new tokens per step
  pb.n_q = 2;
  run_case(pb, dist::StepPolicy::dense(), Split::uneven);
}

TEST(CpDecode, QuestGlobalTopBPages) {
  Problem pb;
  pb.n = 215;  // 14 pages, the last partial; steps cross a page boundary (215 + 3 > 216)
  for (const index_t tokens : {8, 16, 48, 80, 160, 400})  // B = 0, 1, 3, 5, 10, >= pages
    run_case(pb, dist::StepPolicy::quest(methods::Budget::count(tokens)), Split::pages);
  run_case(pb, dist::StepPolicy::quest(methods::Budget::compression(4.0)), Split::uneven);
  pb.n_q = 3;
  pb.n = 97;
  run_case(pb, dist::StepPolicy::quest(methods::Budget::count(48), true), Split::uneven);
}

TEST(CpDecode, QuestManyPagesSmallShards) {
  Problem pb;
  pb.P = 4;
  pb.n = 157;  // 40 pages, odd, the last partial; page-unaligned shard boundaries
  pb.steps = 5;
  for (const index_t tokens : {8, 36, 100})
    run_case(pb, dist::StepPolicy::quest(methods::Budget::count(tokens)), Split::uneven);
}

TEST(CpDecode, StreamingAndSlidingWindow) {
  Problem pb;
  pb.n = 150;
  run_case(pb, dist::StepPolicy::streaming(methods::Budget::count(40), 4), Split::uneven);
  run_case(pb, dist::StepPolicy::streaming(methods::Budget::compression(3.0), 4), Split::pages);
  run_case(pb, dist::StepPolicy::sliding_window(4, 60), Split::pages);
  run_case(pb, dist::StepPolicy::sliding_window(0, 500), Split::uneven);  // W >= n: dense
}

TEST(CpDecode, SnapKVEvictionThenQuest) {
  Problem pb;
  pb.n = 300;
  pb.steps = 4;
  const methods::Budget c = methods::Budget::count(75);
  run_case(pb, dist::StepPolicy::quest(methods::Budget::count(32)), Split::pages, &c);
  const methods::Budget cr = methods::Budget::compression(3.0);
  run_case(pb, dist::StepPolicy::dense(), Split::uneven, &cr);
  const methods::Budget all = methods::Budget::count(1000);  // dense: nothing evicted
  run_case(pb, dist::StepPolicy::quest(methods::Budget::count(48)), Split::uneven, &all);
}

TEST(CpDecode, AdaSnapKVEvictionThenDecode) {
  Problem pb;
  pb.n = 300;  // GQA: Hkv = 2, G = 4
  pb.steps = 3;
  const methods::Budget c = methods::Budget::count(60);
  bool ragged = false;
  run_case(pb, dist::StepPolicy::dense(), Split::uneven, &c, true, &ragged);
  EXPECT_TRUE(ragged) << "the test wants heads with different budgets";
  run_case(pb, dist::StepPolicy::dense(), Split::pages, &c, true);
  const methods::Budget cr = methods::Budget::compression(4.0);
  run_case(pb, dist::StepPolicy::dense(), Split::uneven, &cr, true);
  pb.Hkv = 3;  // three heads of G = 2, unequal shards, 2 new tokens per step
  pb.G = 2;
  pb.n = 173;
  pb.n_q = 2;
  const methods::Budget c2 = methods::Budget::count(40);
  run_case(pb, dist::StepPolicy::dense(), Split::uneven, &c2, true);
  const methods::Budget tiny = methods::Budget::count(5);  // raised to the forced count
  run_case(pb, dist::StepPolicy::dense(), Split::uneven, &tiny, true);
  const methods::Budget all = methods::Budget::count(1000);  // dense: nothing evicted
  run_case(pb, dist::StepPolicy::dense(), Split::uneven, &all, true);
}

namespace {

struct Small {
  Problem pb;
  dist::Communicator comm;
  dist::ShardedCache<float> cache;
  static Problem made() {
    Problem p;
    p.n = 64;
    p.make();
    return p;
  }
  static dist::ShardedCacheOptions options(const Problem& p) {
    dist::ShardedCacheOptions o;
    o.kv_heads = p.Hkv;
    o.head_dim = p.d;
    o.page_size = p.P;
    o.decode_capacity = 4;
    return o;
  }
  Small()
      : pb(made()),
        cache(comm, options(pb), dist::shard_range(pb.n, pb.P, comm.rank(), comm.size()).begin,
              pb.keys().slice_tokens(dist::shard_range(pb.n, pb.P, comm.rank(), comm.size()).begin,
                                     dist::shard_range(pb.n, pb.P, comm.rank(), comm.size()).end -
                                         dist::shard_range(pb.n, pb.P, comm.rank(), comm.size()).begin),
              pb.values().slice_tokens(dist::shard_range(pb.n, pb.P, comm.rank(), comm.size()).begin,
                                       dist::shard_range(pb.n, pb.P, comm.rank(), comm.size()).end -
                                           dist::shard_range(pb.n, pb.P, comm.rank(), comm.size()).begin)) {}
};
}  // namespace

TEST(CpDecodeErrors, OneRankWithAnotherHeadDimFailsEverywhere) {
  Small s;
  const int bad = s.comm.size() - 1;
  const index_t d = s.comm.rank() == bad ? s.pb.d / 2 : s.pb.d;
  std::vector<float> qs(static_cast<std::size_t>(s.pb.Hq() * s.pb.d)), ks(static_cast<std::size_t>(s.pb.Hkv * s.pb.d)),
      out(qs.size());
  const index_t before = s.cache.sequence_length();
  const std::string m = same_error_everywhere(s.comm, [&] {
    dist::decode_step(s.cache, TensorView<const float>(qs.data(), s.pb.Hq(), 1, d),
                      TensorView<const float>(ks.data(), s.pb.Hkv, 1, s.pb.d),
                      TensorView<const float>(ks.data(), s.pb.Hkv, 1, s.pb.d),
                      TensorView<float>(out.data(), s.pb.Hq(), 1, s.pb.d), dist::StepPolicy::dense());
  });
  EXPECT_EQ(m, "dist::decode_step: rank " + std::to_string(bad) + ": dist::decode_step: q has head_dim " +
                   std::to_string(s.pb.d / 2) + ", the cache has " + std::to_string(s.pb.d));
  EXPECT_EQ(s.cache.sequence_length(), before);  // nothing appended
}

TEST(CpDecodeErrors, DisagreeingBudgetFailsEverywhere) {
  Small s;
  if (s.comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<float> qs(static_cast<std::size_t>(s.pb.Hq() * s.pb.d)), ks(static_cast<std::size_t>(s.pb.Hkv * s.pb.d)),
      out(qs.size());
  const index_t tokens = s.comm.rank() == 1 ? 48 : 32;
  const std::string m = same_error_everywhere(s.comm, [&] {
    dist::decode_step(s.cache, TensorView<const float>(qs.data(), s.pb.Hq(), 1, s.pb.d),
                      TensorView<const float>(ks.data(), s.pb.Hkv, 1, s.pb.d),
                      TensorView<const float>(ks.data(), s.pb.Hkv, 1, s.pb.d),
                      TensorView<float>(out.data(), s.pb.Hq(), 1, s.pb.d),
                      dist::StepPolicy::quest(methods::Budget::count(tokens)));
  });
  EXPECT_NE(m.find("dist::decode_step: ranks disagree on budget value: rank 0 has"), std::string::npos) << m;
  // The same for the eviction's budget.
  const TensorView<const float> qp(s.pb.q_prompt.data(), s.pb.Hq(), 32, s.pb.d);
  const std::string e = same_error_everywhere(s.comm, [&] {
    dist::evict_snapkv(s.cache, methods::SnapKV{}, qp, methods::Budget::count(tokens));
  });
  EXPECT_NE(e.find("dist::evict_snapkv: ranks disagree on budget value"), std::string::npos) << e;
  EXPECT_EQ(s.cache.length(0), s.pb.n);  // nothing evicted
}

TEST(CpDecodeErrors, AdaSnapKVDisagreeingBudgetFailsEverywhere) {
  Small s;
  if (s.comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const index_t tokens = s.comm.rank() == 1 ? 48 : 32;
  const TensorView<const float> qp(s.pb.q_prompt.data(), s.pb.Hq(), 32, s.pb.d);
  const std::string e = same_error_everywhere(s.comm, [&] {
    dist::evict_ada_snapkv(s.cache, methods::AdaSnapKV{}, qp, methods::Budget::count(tokens));
  });
  EXPECT_NE(e.find("dist::evict_ada_snapkv: ranks disagree on budget value: rank 0 has"), std::string::npos) << e;
  for (index_t h = 0; h < s.pb.Hkv; ++h) EXPECT_EQ(s.cache.length(h), s.pb.n);  // nothing evicted
  MPI_Barrier(s.comm.handle());
}

TEST(CpDecodeErrors, DisagreeingPageSizeFailsAtConstruction) {
  dist::Communicator comm;
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  Problem pb;
  pb.n = 64;
  pb.make();
  dist::ShardedCacheOptions o = Small::options(pb);
  if (comm.rank() == 0) o.page_size = 8;
  const dist::TokenRange r = dist::shard_range(pb.n, 16, comm.rank(), comm.size());
  const std::string m = same_error_everywhere(comm, [&] {
    dist::ShardedCache<float> c(comm, o, r.begin, pb.keys().slice_tokens(r.begin, r.end - r.begin),
                                pb.values().slice_tokens(r.begin, r.end - r.begin));
  });
  EXPECT_EQ(m, "dist::ShardedCache: ranks disagree on page_size: rank 0 has 8, rank 1 has 16");
}

TEST(CpDecodeErrors, TailOutOfCapacityAndGappedRangesFailEverywhere) {
  Small s;
  std::vector<float> qs(static_cast<std::size_t>(s.pb.Hq() * 8 * s.pb.d)), ks(static_cast<std::size_t>(s.pb.Hkv * 8 * s.pb.d)),
      out(qs.size());
  const std::string m = same_error_everywhere(s.comm, [&] {  // 8 new tokens, capacity 4
    dist::decode_step(s.cache, TensorView<const float>(qs.data(), s.pb.Hq(), 8, s.pb.d),
                      TensorView<const float>(ks.data(), s.pb.Hkv, 8, s.pb.d),
                      TensorView<const float>(ks.data(), s.pb.Hkv, 8, s.pb.d),
                      TensorView<float>(out.data(), s.pb.Hq(), 8, s.pb.d), dist::StepPolicy::dense());
  });
  EXPECT_NE(m.find("dist::decode_step: rank " + std::to_string(s.comm.size() - 1) +
                   ": kv::Cache::append: appending 8 tokens"),
            std::string::npos)
      << m;
  // Ranges with a gap: every rank claims to start at its rank x 10 but holds 5 tokens.
  const std::string g = same_error_everywhere(s.comm, [&] {
    dist::ShardedCache<float> c(s.comm, Small::options(s.pb), 10 * s.comm.rank(),
                                s.pb.keys().slice_tokens(0, 5), s.pb.values().slice_tokens(0, 5));
  });
  if (s.comm.size() > 1) {
    EXPECT_EQ(g, "dist::ShardedCache: rank 1 begins at token 10, expected 5; the ranges must be "
                 "contiguous from 0 in rank order");
  } else {
    EXPECT_EQ(g, "");
  }
}

TEST(CpDecode, Bf16CacheGqaSeveralTokens) {
  // bf16 storage: the sharded cache rounds like the single-process one; q fp32, Hq = 4 Hkv.
  Problem pb;
  pb.n = 90;
  pb.n_q = 2;
  pb.make();
  dist::Communicator comm;
  const dist::TokenRange r = range_of(pb.n, pb.P, Split::uneven, comm.rank(), comm.size());
  dist::ShardedCache<bf16> cache(comm, Small::options(pb), r.begin, pb.keys().slice_tokens(r.begin, r.end - r.begin),
                                 pb.values().slice_tokens(r.begin, r.end - r.begin));
  kv::CacheOptions o;
  o.kv_heads = pb.Hkv;
  o.head_dim = pb.d;
  o.capacity = pb.n + 4;
  o.page_size = pb.P;
  kv::ContiguousCache<bf16> single(o);
  single.append(pb.keys(), pb.values());
  for (index_t s = 0; s < 2; ++s) {
    const std::vector<float> qs = pb.step_q(s), ks = pb.step_k(s), vs = pb.step_v(s);
    const TensorView<const float> q(qs.data(), pb.Hq(), 2, pb.d), kn(ks.data(), pb.Hkv, 2, pb.d),
        vn(vs.data(), pb.Hkv, 2, pb.d);
    single.append(kn, vn);
    const KeySelection want_keys = methods::Quest{}.select(q, single, methods::Budget::count(32)).keys;
    std::vector<float> want(qs.size()), got(qs.size());
    decode(q, single, TensorView<float>(want.data(), pb.Hq(), 2, pb.d), want_keys);
    dist::StepStats st;
    dist::decode_step(cache, q, kn, vn, TensorView<float>(got.data(), pb.Hq(), 2, pb.d),
                      dist::StepPolicy::quest(methods::Budget::count(32)), {}, &st);
    for (index_t u = 0; u < pb.Hkv; ++u)
      EXPECT_EQ(gathered_slots(cache, st.keys, u, pb.G), oracle_slots(single, want_keys, u, pb.G));
    if (comm.rank() == 0) {
      EXPECT_LE(max_rel_diff(got, want), 1e-5f);
    }
  }
}
