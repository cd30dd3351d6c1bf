// dist::prefill (context-parallel prefill over the zig-zag layout) against the single-process
// prefill: every rank builds the whole Q, K, V from a seed, computes the single-process result as
// the oracle, runs the distributed prefill on its two chunks and compares its rows and LSE.
// Also: the layout's invariants, the byte counters (exact formula for dense causal, fewer bytes
// for a small window) and the collective argument check.
#include <sparse_attn/dist/prefill.hpp>
#include <sparse_attn/dist/zigzag.hpp>

#include <gtest/gtest.h>

#include "same_error_everywhere.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

using namespace sparse_attn;

namespace {

constexpr float kTol = 1e-5f;  // fp32: the merge of partials rounds differently, nothing more

struct Problem {
  index_t hq = 2, hkv = 2, n = 96, d = 16, dv = 16;
};

template <class T>
std::vector<T> random_tensor(index_t count, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<T> x(static_cast<std::size_t>(count));
  for (auto& e : x) e = from_float<T>(u(gen));
  return x;
}

// This rank's rows of a head-major [H, n, D] tensor, in the layout's local order.
template <class T>
std::vector<T> local_rows(const std::vector<T>& full, index_t heads, index_t n, index_t dim,
                          const dist::ZigZagLayout& lay, int rank) {
  const index_t L = lay.local_tokens(rank);
  std::vector<T> x(static_cast<std::size_t>(heads * L * dim));
  for (index_t h = 0; h < heads; ++h)
    for (index_t i = 0; i < L; ++i) {
      const index_t g = lay.global_position(rank, i);
      for (index_t c = 0; c < dim; ++c)
        x[static_cast<std::size_t>((h * L + i) * dim + c)] = full[static_cast<std::size_t>((h * n + g) * dim + c)];
    }
  return x;
}

// Runs oracle and distributed prefill; compares this rank's rows. Returns the stats.
template <class KT, class Mask>
dist::PrefillStats run_and_compare(const Problem& pb, const Mask& mask, std::uint32_t seed) {
  dist::Communicator comm;
  const std::vector<float> q = random_tensor<float>(pb.hq * pb.n * pb.d, seed);
  const std::vector<KT> k = random_tensor<KT>(pb.hkv * pb.n * pb.d, seed + 1);
  const std::vector<KT> v = random_tensor<KT>(pb.hkv * pb.n * pb.dv, seed + 2);
  std::vector<float> ref(static_cast<std::size_t>(pb.hq * pb.n * pb.dv)), ref_lse(static_cast<std::size_t>(pb.hq * pb.n));
  AttentionOptions o1;
  o1.num_threads = 1;
  o1.lse = LseView(ref_lse.data(), pb.n);
  prefill(TensorView<const float>(q.data(), pb.hq, pb.n, pb.d), TensorView<const KT>(k.data(), pb.hkv, pb.n, pb.d),
          TensorView<const KT>(v.data(), pb.hkv, pb.n, pb.dv), TensorView<float>(ref.data(), pb.hq, pb.n, pb.dv),
          mask, o1);

  const dist::ZigZagLayout lay = dist::zigzag_layout(pb.n, comm.size(), mask.shape().block_q, mask.shape().block_k);
  const int r = comm.rank();
  const index_t L = lay.local_tokens(r);
  const std::vector<float> ql = local_rows(q, pb.hq, pb.n, pb.d, lay, r);
  const std::vector<KT> kl = local_rows(k, pb.hkv, pb.n, pb.d, lay, r);
  const std::vector<KT> vl = local_rows(v, pb.hkv, pb.n, pb.dv, lay, r);
  std::vector<float> out(static_cast<std::size_t>(pb.hq * L * pb.dv), 7.0f), lse(static_cast<std::size_t>(pb.hq * L), 7.0f);
  AttentionOptions o;
  o.num_threads = 1;
  o.lse = LseView(lse.data(), L);
  const dist::PrefillStats st = dist::prefill(
      comm, TensorView<const float>(ql.data(), pb.hq, L, pb.d), TensorView<const KT>(kl.data(), pb.hkv, L, pb.d),
      TensorView<const KT>(vl.data(), pb.hkv, L, pb.dv), TensorView<float>(out.data(), pb.hq, L, pb.dv), mask, o);

  int bad = 0;
  for (index_t h = 0; h < pb.hq; ++h)
    for (index_t i = 0; i < L; ++i) {
      const index_t g = lay.global_position(r, i);
      const float rl = ref_lse[static_cast<std::size_t>(h * pb.n + g)], gl = lse[static_cast<std::size_t>(h * L + i)];
      if (std::isinf(rl)) {
        EXPECT_EQ(gl, rl) << "head " << h << " position " << g;
      } else {
        EXPECT_NEAR(gl, rl, kTol * std::max(1.0f, std::abs(rl))) << "head " << h << " position " << g;
      }
      for (index_t c = 0; c < pb.dv; ++c) {
        const float a = out[static_cast<std::size_t>((h * L + i) * pb.dv + c)];
        const float b = ref[static_cast<std::size_t>((h * pb.n + g) * pb.dv + c)];
        if (!(std::abs(a - b) <= kTol) && bad++ < 5)
          ADD_FAILURE() << "out head " << h << " position " << g << " channel " << c << ": " << a << " vs " << b;
      }
    }
  EXPECT_EQ(bad, 0);
  return st;
}

// A random block-sparse mask: each (head, query block) row keeps each allowed key block with
// probability `keep`; some rows end up empty (allowed by BlockListMask).
BlockListMask<> random_block_mask(index_t heads, index_t n, index_t block, bool causal, double keep,
                                  std::uint32_t seed) {
  const MaskShape s{heads, n, n, block, block, causal};
  BlockListBuilder b(s, false);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (index_t h = 0; h < heads; ++h)
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
      const index_t last = causal ? (s.q_end(qb) - 1) / block : s.num_k_blocks() - 1;
      const bool empty_row = u(gen) < 0.1;
      for (index_t kb = 0; kb <= last; ++kb)
        if (!empty_row && u(gen) < keep) b.add(h, qb, kb, true);
    }
  return b.build();
}

}  // namespace

TEST(ZigZagLayout, CoversTheSequenceOnceInBlocks) {
  for (index_t n : {0, 1, 5, 16, 17, 77, 200, 256})
    for (int p : {1, 2, 3, 4, 5}) {
      const dist::ZigZagLayout lay(n, p, 16);
      std::vector<int> seen(static_cast<std::size_t>(n), 0);
      index_t total = 0;
      for (int r = 0; r < p; ++r) {
        const auto ranges = lay.ranges_of(r);
        EXPECT_EQ(lay.owner(lay.chunks_of(r)[0]), r);
        EXPECT_EQ(lay.owner(lay.chunks_of(r)[1]), r);
        for (const auto& rg : ranges) {
          EXPECT_TRUE(rg.begin % 16 == 0 || rg.size() == 0) << "chunks start on a block";
          for (index_t i = rg.begin; i < rg.end; ++i) ++seen[static_cast<std::size_t>(i)];
        }
        for (index_t i = 0; i < lay.local_tokens(r); ++i) {
          const index_t g = lay.global_position(r, i);
          const index_t c = lay.chunk_of(g);
          EXPECT_EQ(lay.owner(c), r);
          EXPECT_TRUE(g >= lay.chunk(c).begin && g < lay.chunk(c).end);
        }
        total += lay.local_tokens(r);
      }
      EXPECT_EQ(total, n);
      for (int s : seen) EXPECT_EQ(s, 1);
      // Chunk sizes differ by at most one block.
      index_t lo = n, hi = 0;
      for (index_t c = 0; c < lay.num_chunks(); ++c) {
        const index_t blocks = (lay.chunk(c).size() + 15) / 16;
        lo = std::min(lo, blocks);
        hi = std::max(hi, blocks);
      }
      if (n > 0) {
        EXPECT_LE(hi - lo, 1);
      }
    }
}

TEST(CpPrefill, DenseCausalMatchesSingleProcess) {
  const Problem pb{2, 2, 200, 32, 32};
  const auto st = run_and_compare<float>(pb, masks::causal(pb.hq, pb.n, pb.n, 16), 11);
  EXPECT_GT(st.blocks_computed, 0);
}

TEST(CpPrefill, SlidingWindowSmallerThanAChunk) {
  const Problem pb{2, 1, 160, 16, 16};
  run_and_compare<float>(pb, masks::sliding_window(pb.hq, pb.n, pb.n, 10, 4, 8), 21);
}

TEST(CpPrefill, SlidingWindowLargerThanAChunk) {
  const Problem pb{2, 2, 150, 16, 24};
  run_and_compare<float>(pb, masks::sliding_window(pb.hq, pb.n, pb.n, 70, 0, 16), 31);
}

TEST(CpPrefill, BlockSparseCausalWithEmptyRows) {
  const Problem pb{3, 3, 176, 16, 16};
  run_and_compare<float>(pb, random_block_mask(pb.hq, pb.n, 16, true, 0.4, 5), 41);
}

TEST(CpPrefill, BlockSparseNonCausal) {
  const Problem pb{2, 1, 130, 16, 16};
  run_and_compare<float>(pb, random_block_mask(pb.hq, pb.n, 16, false, 0.3, 6), 51);
}

TEST(CpPrefill, GqaFourQueryHeadsPerKvHead) {
  const Problem pb{8, 2, 128, 16, 16};
  run_and_compare<float>(pb, masks::causal(pb.hq, pb.n, pb.n, 16), 61);
}

TEST(CpPrefill, OddLengthNotAMultipleOfBlockOrRanks) {
  const Problem pb{2, 2, 77, 16, 16};
  run_and_compare<float>(pb, masks::causal(pb.hq, pb.n, pb.n, 16), 71);
  run_and_compare<float>(pb, masks::sliding_window(pb.hq, pb.n, pb.n, 9, 2, 16), 72);
}

TEST(CpPrefill, TinySequencesWithEmptyChunks) {
  for (index_t n : {1, 5, 20, 33}) {
    const Problem pb{2, 1, n, 8, 8};
    run_and_compare<float>(pb, masks::causal(pb.hq, pb.n, pb.n, 16), 81 + static_cast<std::uint32_t>(n));
  }
}

TEST(CpPrefill, Bf16KeysAndValues) {
  const Problem pb{4, 2, 96, 32, 32};
  run_and_compare<bf16>(pb, masks::causal(pb.hq, pb.n, pb.n, 16), 91);
  run_and_compare<bf16>(pb, masks::sliding_window(pb.hq, pb.n, pb.n, 12, 0, 16), 92);
}

TEST(CpPrefill, LongerSequenceWithDefaultBlocks) {
  // Blocks of 64, head_dim 64, a tri-shape (window + sinks + dense last rows) and dense causal.
  const Problem pb{4, 2, 700, 64, 64};
  run_and_compare<float>(pb, masks::causal(pb.hq, pb.n, pb.n), 121);
  run_and_compare<float>(pb, masks::tri_shape(pb.hq, pb.n, pb.n, 100, 4, 40), 122);
}

TEST(CpPrefill, DenseCausalBytesFollowTheFormula) {
  // n a multiple of 2P blocks: every chunk is c tokens. Rank r receives one chunk from each
  // rank below it and two from each rank above it: (2P - 2 - r) chunks of K and V.
  dist::Communicator comm;
  const index_t P = comm.size(), c = 16;
  const Problem pb{2, 2, 2 * P * c, 8, 8};
  const auto st = run_and_compare<float>(pb, masks::causal(pb.hq, pb.n, pb.n, 16), 101);
  const index_t chunk_bytes = c * pb.hkv * (pb.d + pb.dv) * static_cast<index_t>(sizeof(float));
  EXPECT_EQ(st.bytes_received, (2 * P - 2 - comm.rank()) * chunk_bytes);
  EXPECT_EQ(st.bytes_sent, (P - 1 + comm.rank()) * chunk_bytes);
  // Every (query chunk, key chunk <= query chunk) pair is computed: 2P + 1 per rank.
  EXPECT_EQ(st.chunk_pairs_computed, 2 * P + 1);
}

TEST(CpPrefill, SmallWindowMovesFewerBytesThanDenseCausal) {
  dist::Communicator comm;
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks (one rank sends nothing)";
  const Problem pb{2, 2, 256, 16, 16};
  const auto dense = run_and_compare<float>(pb, masks::causal(pb.hq, pb.n, pb.n, 16), 111);
  const auto window = run_and_compare<float>(pb, masks::sliding_window(pb.hq, pb.n, pb.n, 8, 0, 16), 111);
  // Whole-job totals, so the comparison holds for every rank's view.
  index_t bytes[2] = {dense.bytes_received, window.bytes_received};
  MPI_Allreduce(MPI_IN_PLACE, bytes, 2, MPI_INT64_T, MPI_SUM, comm.handle());
  EXPECT_LT(bytes[1], bytes[0]);
  EXPECT_LE(window.bytes_received, dense.bytes_received);
  EXPECT_LT(window.blocks_computed, dense.blocks_computed);
  // A window of 8 within blocks of 16 needs one key block of the previous chunk per chunk: at
  // most 2 blocks received per rank.
  EXPECT_LE(window.key_blocks_received, 2);
}

namespace {

// dist::prefill on zero-filled local buffers of the given per-rank geometry.
void call_prefill(const dist::Communicator& comm, index_t n, index_t d, index_t window, index_t tokens_delta) {
  const dist::ZigZagLayout lay = dist::zigzag_layout(n, comm.size(), 16, 16);
  const index_t L = lay.local_tokens(comm.rank()) + tokens_delta;
  std::vector<float> q(static_cast<std::size_t>(2 * L * d)), k(q.size()), v(q.size()), out(q.size());
  const IntervalMask mask = masks::sliding_window(2, n, n, window, 0, 16);
  dist::prefill(comm, TensorView<const float>(q.data(), 2, L, d), TensorView<const float>(k.data(), 2, L, d),
                TensorView<const float>(v.data(), 2, L, d), TensorView<float>(out.data(), 2, L, d), mask);
}
}  // namespace

TEST(CpPrefill, DifferentHeadDimOnOneRankFailsOnEveryRank) {
  dist::Communicator comm;
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int odd = comm.size() - 1;
  const std::string m = same_error_everywhere(comm, [&] {
    call_prefill(comm, 64, comm.rank() == odd ? 8 : 16, 20, 0);
  });
  EXPECT_EQ(m, "dist::prefill: ranks disagree on head_dim: rank 0 has 16, rank " + std::to_string(odd) + " has 8");
}

TEST(CpPrefill, DifferentWindowOnOneRankFailsOnEveryRank) {
  dist::Communicator comm;
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const std::string m = same_error_everywhere(comm, [&] {
    call_prefill(comm, 64, 16, comm.rank() == 1 ? 24 : 20, 0);
  });
  EXPECT_EQ(m, "dist::prefill: ranks disagree on window: rank 0 has 20, rank 1 has 24");
}

TEST(CpPrefill, OneRanksWrongShardSizeFailsOnEveryRank) {
  dist::Communicator comm;
  const int bad = comm.size() / 2;
  const std::string m = same_error_everywhere(comm, [&] {
    call_prefill(comm, 64, 16, 20, comm.rank() == bad ? 1 : 0);
  });
  EXPECT_EQ(m.rfind("dist::prefill: rank " + std::to_string(bad) + ": dist::prefill: q has ", 0), 0u) << m;
  EXPECT_NE(m.find("ZigZagLayout::local_tokens"), std::string::npos) << m;
}

TEST(CpPrefill, ValidArgumentsPassTheCheckOnEveryRank) {
  dist::Communicator comm;
  EXPECT_EQ(same_error_everywhere(comm, [&] { call_prefill(comm, 64, 16, 20, 0); }), "");
}

TEST(CpPrefill, DifferentBlockSparseMaskOnOneRankFailsOnEveryRank) {
  // Same shape, kind and options; only the block lists differ: caught by the fingerprint.
  dist::Communicator comm;
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const index_t n = 64, d = 16;
  const BlockListMask<> mask = random_block_mask(2, n, 16, true, 0.5, comm.rank() == 1 ? 8 : 7);
  const dist::ZigZagLayout lay = dist::zigzag_layout(n, comm.size(), 16, 16);
  const index_t L = lay.local_tokens(comm.rank());
  std::vector<float> x(static_cast<std::size_t>(2 * L * d)), out(x.size());
  const std::string m = same_error_everywhere(comm, [&] {
    dist::prefill(comm, TensorView<const float>(x.data(), 2, L, d), TensorView<const float>(x.data(), 2, L, d),
                  TensorView<const float>(x.data(), 2, L, d), TensorView<float>(out.data(), 2, L, d), mask);
  });
  EXPECT_EQ(m.rfind("dist::prefill: ranks disagree on mask fingerprint: rank 0 has ", 0), 0u) << m;
  EXPECT_NE(m.find(", rank 1 has "), std::string::npos) << m;
}

namespace {

// The reference of a PairMask: local key kj of local block t maps to global key
// map(t) x block_k + kj % block_k (map(t) < 0: not a block of the pair); allowed iff the global
// key exists and the global element test allows it (allowed_in_block: for a block list, the
// predicate inside listed blocks).
template <class Mask, class Map>
void expect_pair_mask_matches(const dist::detail::PairMask<Mask>& pm, const Mask& g, index_t q0, Map map) {
  const MaskShape& s = pm.shape();
  const index_t bk = s.block_k, bq = s.block_q;
  for (index_t h = 0; h < s.heads; ++h) {
    for (index_t qi = 0; qi < s.n_q; ++qi)
      for (index_t kj = 0; kj < s.n_k; ++kj) {
        const index_t gb = map(kj / bk), j = gb * bk + kj % bk;
        const bool want = gb >= 0 && j < g.shape().n_k && g.allowed_in_block(h, q0 + qi, j);
        ASSERT_EQ(pm.allowed_in_block(h, qi, kj), want) << "head " << h << " query " << qi << " key " << kj;
      }
    // Listed blocks: the global row's blocks that belong to the pair, in local numbering.
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
      std::vector<index_t> got, want;
      pm.for_each_block(h, qb, [&](index_t t, bool) { got.push_back(map(t)); });
      g.for_each_block(h, q0 / bq + qb, [&](index_t kb, bool) {
        for (index_t t = 0; t < s.num_k_blocks(); ++t)
          if (map(t) == kb) want.push_back(kb);
      });
      EXPECT_EQ(got, want) << "query block " << qb;
    }
  }
  if constexpr (std::is_same_v<Mask, IntervalMask>) {
    // The block-level hook masks exactly the elements the element test rejects.
    const index_t ldq = 64;
    std::vector<float> sc(static_cast<std::size_t>(bk * ldq));
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb)
      for (index_t t = 0; t < s.num_k_blocks(); ++t) {
        if (map(t) < 0) continue;
        const index_t qa = s.q_begin(qb), rows = s.q_end(qb) - qa, k0 = s.k_begin(t), nk = s.k_end(t) - k0;
        std::fill(sc.begin(), sc.end(), 1.0f);
        pm.mask_block(sc.data(), ldq, qa, rows, k0, nk);
        for (index_t j = 0; j < nk; ++j)
          for (index_t i = 0; i < rows; ++i)
            ASSERT_EQ(std::isinf(sc[static_cast<std::size_t>(j * ldq + i)]), !pm.allowed_in_block(0, qa + i, k0 + j))
                << "query " << qa + i << " key " << k0 + j;
      }
  }
}

}  // namespace

TEST(CpPairMask, ContiguousRangeAndScatteredBlocksMapKeysAlike) {
  // A window with sinks over 200 tokens in blocks of 16 (the last block, 12, is short).
  const IntervalMask g = masks::sliding_window(2, 200, 200, 40, 5, 16);
  const BlockListMask<> sparse = random_block_mask(2, 200, 16, true, 0.6, 3);
  const index_t q0 = 160, nq = 40;  // query blocks 10 .. 12
  // Consecutive blocks 8 .. 12 given as a list: the contiguous map (no table).
  const std::vector<std::int32_t> run{8, 9, 10, 11, 12};
  ASSERT_TRUE(dist::detail::PairMask<IntervalMask>::is_contiguous(run));
  auto run_map = [](index_t t) { return t < 5 ? 8 + t : index_t{-1}; };
  expect_pair_mask_matches(dist::detail::PairMask<IntervalMask>(g, nq, 96, q0, run), g, q0, run_map);
  expect_pair_mask_matches(dist::detail::PairMask<BlockListMask<>>(sparse, nq, 96, q0, run), sparse, q0, run_map);
  // The same range read in place at local block 2 (rows before it belong to other blocks).
  auto off_map = [](index_t t) { return t >= 2 && t < 7 ? 6 + t : index_t{-1}; };
  expect_pair_mask_matches(dist::detail::PairMask<IntervalMask>(g, nq, 7 * 16 - 8, q0, 8, 5, 2), g, q0, off_map);
  expect_pair_mask_matches(dist::detail::PairMask<BlockListMask<>>(sparse, nq, 7 * 16 - 8, q0, 8, 5, 2), sparse, q0,
                           off_map);
  // Scattered blocks: the table map.
  const std::vector<std::int32_t> scattered{0, 3, 9, 10, 12};
  ASSERT_FALSE(dist::detail::PairMask<IntervalMask>::is_contiguous(scattered));
  auto table_map = [&](index_t t) { return t < 5 ? index_t{scattered[static_cast<std::size_t>(t)]} : index_t{-1}; };
  expect_pair_mask_matches(dist::detail::PairMask<IntervalMask>(g, nq, 96, q0, scattered), g, q0, table_map);
  expect_pair_mask_matches(dist::detail::PairMask<BlockListMask<>>(sparse, nq, 96, q0, scattered), sparse, q0,
                           table_map);
}

TEST(CpPrefill, LargePairsRunInSlabsOfQueryBlocks) {
  // 16 heads x dv 256 x 4 bytes = 16 KiB per output row: a pair merged through the partial
  // buffer runs in slabs of 256 rows (detail::kPartBytes), so 1 and 2 ranks (chunks of 1024
  // and 512 rows) split their merged pairs.
  const Problem pb{16, 2, 2048, 16, 256};
  run_and_compare<float>(pb, random_block_mask(pb.hq, pb.n, 64, false, 0.08, 9), 131);
}

TEST(CpPrefill, Bf16OutputMatchesFp32Output) {
  // An fp32 output accumulates in place, others in fp32 buffers rounded once: the same values.
  dist::Communicator comm;
  const index_t hq = 4, hkv = 2, n = 160, d = 16;
  const dist::ZigZagLayout lay = dist::zigzag_layout(n, comm.size(), 16, 16);
  const index_t L = lay.local_tokens(comm.rank());
  const std::vector<float> q = random_tensor<float>(hq * L * d, 141 + static_cast<std::uint32_t>(comm.rank()));
  const std::vector<float> k = random_tensor<float>(hkv * L * d, 142 + static_cast<std::uint32_t>(comm.rank()));
  const std::vector<float> v = random_tensor<float>(hkv * L * d, 143 + static_cast<std::uint32_t>(comm.rank()));
  for (const IntervalMask& mask : {masks::causal(hq, n, n, 16), masks::sliding_window(hq, n, n, 20, 3, 16)}) {
    std::vector<float> o32(static_cast<std::size_t>(hq * L * d)), l32(static_cast<std::size_t>(hq * L)), l16(l32.size());
    std::vector<bf16> o16(o32.size());
    AttentionOptions o;
    o.num_threads = 1;
    o.lse = LseView(l32.data(), L);
    dist::prefill(comm, TensorView<const float>(q.data(), hq, L, d), TensorView<const float>(k.data(), hkv, L, d),
                  TensorView<const float>(v.data(), hkv, L, d), TensorView<float>(o32.data(), hq, L, d), mask, o);
    o.lse = LseView(l16.data(), L);
    dist::prefill(comm, TensorView<const float>(q.data(), hq, L, d), TensorView<const float>(k.data(), hkv, L, d),
                  TensorView<const float>(v.data(), hkv, L, d), TensorView<bf16>(o16.data(), hq, L, d), mask, o);
    EXPECT_EQ(l16, l32);
    for (std::size_t i = 0; i < o32.size(); ++i)
      ASSERT_EQ(static_cast<float>(o16[i]), static_cast<float>(bf16(o32[i]))) << "element " << i;
  }
}

TEST(CpPrefill, TokenMajorKeysAndValuesMatchHeadMajor) {
  // Token-major K/V rows are not packed per head: read in place at shift 0 through their
  // strides, and copied into a pack to be sent (head-major views are sent as they are).
  dist::Communicator comm;
  const index_t hq = 4, hkv = 2, n = 192, d = 16;
  const dist::ZigZagLayout lay = dist::zigzag_layout(n, comm.size(), 16, 16);
  const index_t L = lay.local_tokens(comm.rank());
  const auto seed = 151 + static_cast<std::uint32_t>(comm.rank());
  const std::vector<float> q = random_tensor<float>(hq * L * d, seed);
  const std::vector<float> k = random_tensor<float>(hkv * L * d, seed + 10);
  const std::vector<float> v = random_tensor<float>(hkv * L * d, seed + 20);
  std::vector<float> kt(k.size()), vt(v.size());  // [L][Hkv][d]
  for (index_t h = 0; h < hkv; ++h)
    for (index_t t = 0; t < L; ++t)
      for (index_t c = 0; c < d; ++c) {
        kt[static_cast<std::size_t>((t * hkv + h) * d + c)] = k[static_cast<std::size_t>((h * L + t) * d + c)];
        vt[static_cast<std::size_t>((t * hkv + h) * d + c)] = v[static_cast<std::size_t>((h * L + t) * d + c)];
      }
  for (const IntervalMask& mask : {masks::causal(hq, n, n, 16), masks::sliding_window(hq, n, n, 40, 2, 16)}) {
    std::vector<float> a(static_cast<std::size_t>(hq * L * d)), b(a.size());
    AttentionOptions o;
    o.num_threads = 1;
    dist::prefill(comm, TensorView<const float>(q.data(), hq, L, d), TensorView<const float>(k.data(), hkv, L, d),
                  TensorView<const float>(v.data(), hkv, L, d), TensorView<float>(a.data(), hq, L, d), mask, o);
    dist::prefill(comm, TensorView<const float>(q.data(), hq, L, d),
                  TensorView<const float>::token_major(kt.data(), hkv, L, d),
                  TensorView<const float>::token_major(vt.data(), hkv, L, d), TensorView<float>(b.data(), hq, L, d), mask, o);
    for (std::size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], kTol) << "element " << i;
  }
}
