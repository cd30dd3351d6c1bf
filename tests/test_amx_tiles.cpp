// AMX bf16 tile micro-kernels (arch/amx/tiles.hpp) against a float64 reference on random bf16
// data: qk, pv and the 32-bit transpose that feeds pv. The tile kernels run only where the CPU
// and OS offer AMX-BF16 (skipped elsewhere); the transpose needs only AVX-512.

// GCC < 13 (PR 105593): Eigen's pexp warns inside its AVX-512 intrinsics unless Eigen's own lines
// are covered by the pragma.
#include <sparse_attn/core/diagnostics.hpp>
SPARSE_ATTN_DIAGNOSTICS_PUSH
#include <Eigen/Core>
SPARSE_ATTN_DIAGNOSTICS_POP

#include <gtest/gtest.h>

#include <sparse_attn/arch/amx/tiles.hpp>

#if SPARSE_ATTN_X86_TARGETS
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

using namespace sparse_attn;
namespace amx = sparse_attn::arch::amx;

namespace {

constexpr float kSentinel = -12345.0f;  // padding the kernels must leave alone

std::uint32_t bits(bf16 x) {
  std::uint16_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
std::uint32_t pair(bf16 lo, bf16 hi) { return bits(lo) | (bits(hi) << 16); }

// Rows of random bf16 (normal, or uniform [0, 1) like probabilities).
std::vector<bf16> random_bf16(std::size_t n, std::mt19937& rng, bool probabilities = false) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  std::vector<bf16> v(n);
  for (bf16& x : v) x = bf16(probabilities ? ud(rng) : nd(rng));
  return v;
}

double f64(bf16 x) { return static_cast<double>(static_cast<float>(x)); }
std::size_t at(index_t i) { return static_cast<std::size_t>(i); }

// fp32 accumulation of exact bf16 products: error well below 1e-5 of the sum of |terms| for the
// lengths here (at most 256 terms, each step rounding by 2^-24 relative).
constexpr double kRelTol = 1e-5;

#define SKIP_WITHOUT_AMX()                                                                  \
  if (!cpu_supports(CpuTarget::amx))                                                             \
  GTEST_SKIP() << "AMX-BF16 is not available (CPU without AMX-TILE/AMX-BF16, or the OS did " \
                  "not grant the tile state)"

// Runs qk on random data and checks it against the float64 reference, and that the padding
// columns of s stay untouched.
void check_qk(index_t nk, index_t d, index_t rows, unsigned seed) {
  SCOPED_TRACE(testing::Message() << "nk=" << nk << " d=" << d << " rows=" << rows);
  std::mt19937 rng(seed);
  const index_t ldk = d + 16, ldq = rows + 16, lds = rows + 16;
  const std::vector<bf16> k = random_bf16(at(nk * ldk), rng);
  const std::vector<bf16> q = random_bf16(at(rows * d), rng);  // Q[i][c] = q[i * d + c]
  std::vector<std::uint32_t> qp(at((d / 2) * ldq), 0u);
  for (index_t c = 0; c < d; c += 2)
    for (index_t i = 0; i < rows; ++i) qp[at((c / 2) * ldq + i)] = pair(q[at(i * d + c)], q[at(i * d + c + 1)]);
  std::vector<float> s(at(nk * lds + 16), kSentinel);
  const float scale = 0.125f;
  {
    amx::TileScope tiles;
    amx::qk(k.data(), ldk, nk, qp.data(), ldq, d, rows, scale, s.data(), lds);
  }
  for (index_t j = 0; j < nk; ++j) {
    for (index_t i = 0; i < rows; ++i) {
      double ref = 0.0, mag = 0.0;
      for (index_t c = 0; c < d; ++c) {
        const double t = f64(k[at(j * ldk + c)]) * f64(q[at(i * d + c)]);
        ref += t;
        mag += std::fabs(t);
      }
      ref *= scale;
      mag *= scale;
      ASSERT_NEAR(s[at(j * lds + i)], ref, kRelTol * mag + 1e-30) << "j=" << j << " i=" << i;
    }
    for (index_t i = rows; i < lds; ++i) ASSERT_EQ(s[at(j * lds + i)], kSentinel) << "wrote padding";
  }
}

void check_pv(index_t nk, index_t dv, index_t rows, unsigned seed) {
  SCOPED_TRACE(testing::Message() << "nk=" << nk << " dv=" << dv << " rows=" << rows);
  std::mt19937 rng(seed);
  const index_t ldvt = nk / 2 + 16, ldp = rows + 16, ldo = rows + 16;
  const std::vector<bf16> v = random_bf16(at(nk * dv), rng);                 // V[j][c] = v[j * dv + c]
  const std::vector<bf16> p = random_bf16(at(nk * rows), rng, true);         // P[j][i] = p[j * rows + i]
  std::vector<std::uint32_t> vt(at(dv * ldvt), 0u), pp(at((nk / 2) * ldp), 0u);
  for (index_t c = 0; c < dv; ++c)
    for (index_t j = 0; j < nk; j += 2) vt[at(c * ldvt + j / 2)] = pair(v[at(j * dv + c)], v[at((j + 1) * dv + c)]);
  for (index_t j = 0; j < nk; j += 2)
    for (index_t i = 0; i < rows; ++i) pp[at((j / 2) * ldp + i)] = pair(p[at(j * rows + i)], p[at((j + 1) * rows + i)]);
  std::vector<float> ot(at(dv * ldo), kSentinel);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (index_t c = 0; c < dv; ++c)
    for (index_t i = 0; i < rows; ++i) ot[at(c * ldo + i)] = nd(rng);
  const std::vector<float> ot0 = ot;
  {
    amx::TileScope tiles;
    amx::pv(vt.data(), ldvt, nk, pp.data(), ldp, dv, rows, ot.data(), ldo);
  }
  for (index_t c = 0; c < dv; ++c) {
    for (index_t i = 0; i < rows; ++i) {
      double ref = ot0[at(c * ldo + i)], mag = std::fabs(ref);
      for (index_t j = 0; j < nk; ++j) {
        const double t = f64(v[at(j * dv + c)]) * f64(p[at(j * rows + i)]);
        ref += t;
        mag += std::fabs(t);
      }
      ASSERT_NEAR(ot[at(c * ldo + i)], ref, kRelTol * mag + 1e-30) << "c=" << c << " i=" << i;
    }
    for (index_t i = rows; i < ldo; ++i) ASSERT_EQ(ot[at(c * ldo + i)], kSentinel) << "wrote padding";
  }
}

TEST(AmxTiles, TransposePairsExact) {
  if (!cpu_supports(CpuTarget::avx512)) GTEST_SKIP() << "AVX-512 is not available";
  std::mt19937 rng(7);
  for (index_t npairs : {16, 32, 48})
    for (index_t dv : {16, 64, 128}) {
      SCOPED_TRACE(testing::Message() << "npairs=" << npairs << " dv=" << dv);
      const index_t ldvp = dv + 3, ldvt = npairs + 5;  // odd strides: no alignment assumed
      std::vector<std::uint32_t> vp(at(npairs * ldvp));
      for (std::uint32_t& x : vp) x = static_cast<std::uint32_t>(rng());
      std::vector<std::uint32_t> vt(at(dv * ldvt), 0xdeadbeefu);
      amx::transpose_pairs(vp.data(), ldvp, npairs, dv, vt.data(), ldvt);
      for (index_t c = 0; c < dv; ++c) {
        for (index_t jp = 0; jp < npairs; ++jp)
          ASSERT_EQ(vt[at(c * ldvt + jp)], vp[at(jp * ldvp + c)]) << "c=" << c << " jp=" << jp;
        for (index_t jp = npairs; jp < ldvt; ++jp) ASSERT_EQ(vt[at(c * ldvt + jp)], 0xdeadbeefu);
      }
    }
}

TEST(AmxTiles, QkMatchesReference) {
  SKIP_WITHOUT_AMX();
  unsigned seed = 1;
  for (index_t nk : {16, 32, 64, 96, 128})
    for (index_t d : {32, 64, 128, 256})
      for (index_t rows : {16, 48, 64}) check_qk(nk, d, rows, seed++);
}

TEST(AmxTiles, PvMatchesReference) {
  SKIP_WITHOUT_AMX();
  unsigned seed = 100;
  for (index_t nk : {32, 64, 96, 128})
    for (index_t dv : {16, 48, 64, 128})
      for (index_t rows : {16, 48, 64}) check_pv(nk, dv, rows, seed++);
}

// pv fed by transpose_pairs from the pair layout the prefill builds (vp[jp][c]).
TEST(AmxTiles, PvAfterTransposePairs) {
  SKIP_WITHOUT_AMX();
  std::mt19937 rng(5);
  const index_t nk = 64, dv = 64, rows = 32, ld = 64;
  const std::vector<bf16> v = random_bf16(at(nk * dv), rng);
  const std::vector<bf16> p = random_bf16(at(nk * rows), rng, true);
  std::vector<std::uint32_t> vp(at(nk / 2 * dv)), vt(at(dv * ld)), pp(at(nk / 2 * ld), 0u);
  for (index_t j = 0; j < nk; j += 2)
    for (index_t c = 0; c < dv; ++c) vp[at(j / 2 * dv + c)] = pair(v[at(j * dv + c)], v[at((j + 1) * dv + c)]);
  for (index_t j = 0; j < nk; j += 2)
    for (index_t i = 0; i < rows; ++i) pp[at(j / 2 * ld + i)] = pair(p[at(j * rows + i)], p[at((j + 1) * rows + i)]);
  amx::transpose_pairs(vp.data(), dv, nk / 2, dv, vt.data(), ld);
  std::vector<float> ot(at(dv * ld), 0.0f);
  {
    amx::TileScope tiles;
    amx::pv(vt.data(), ld, nk, pp.data(), ld, dv, rows, ot.data(), ld);
  }
  for (index_t c = 0; c < dv; ++c)
    for (index_t i = 0; i < rows; ++i) {
      double ref = 0.0, mag = 0.0;
      for (index_t j = 0; j < nk; ++j) {
        const double t = f64(v[at(j * dv + c)]) * f64(p[at(j * rows + i)]);
        ref += t;
        mag += std::fabs(t);
      }
      ASSERT_NEAR(ot[at(c * ld + i)], ref, kRelTol * mag + 1e-30) << "c=" << c << " i=" << i;
    }
}

TEST(AmxTiles, TileScopeTwiceOnOneThread) {
  SKIP_WITHOUT_AMX();
  { amx::TileScope a; }
  { amx::TileScope b; }
  check_qk(32, 64, 32, 11);  // and the tiles still compute after the releases
  check_qk(32, 64, 32, 12);
}

TEST(AmxTiles, TileScopeFromFourThreads) {
  SKIP_WITHOUT_AMX();
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 4; ++t)
    threads.emplace_back([t] {
      for (unsigned r = 0; r < 2; ++r) {
        check_qk(64, 128, 48, 20 + 2 * t + r);
        check_pv(64, 64, 48, 40 + 2 * t + r);
      }
    });
  for (std::thread& th : threads) th.join();
}

}  // namespace
#endif  // SPARSE_ATTN_X86_TARGETS
