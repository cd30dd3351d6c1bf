// Precision modes of the prefill (AttentionOptions::precision, kernel/common.hpp): the exact fp32
// products and the bf16 products, on every usable CPU target (native vdpbf16ps / AMX, or the
// emulation with the same roundings), against the float64 oracle on the kernel's own inputs.
//
// Error bound of the bf16 products, used as the tolerance (not a fitted number):
//   bf16 keeps 8 significant bits: rounding to nearest changes a value by at most u = 2^-8 of it.
//   P rounded to bf16 changes each weight by at most u p_j, so the output moves by at most
//   u sum_j p_j |v_j - o| <= 2^-7 max|v|.
//   An fp32 Q rounded to bf16 moves logit s_ij by at most e_ij = scale u sum_c |q_ic k_jc|; a
//   logit perturbation moves a softmax average by at most 2 max_j |delta s_j| max|v| (first order;
//   x1.25 covers the second).
//   A bf16 output adds u |o| <= u max|v|.
//   So |o - oracle| <= max|v| (2^-7 + 2.5 max e_ij) + 1e-5 (fp32 accumulation), and the LSE
//   (computed from the unrounded fp32 probabilities) moves by at most max e_ij, plus fp32
//   rounding (2e-5 relative to max(1, |LSE|)).
// The measured errors are printed (docs/PRECISION.md quotes them).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <sparse_attn/eval/problem.hpp>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <vector>

using namespace sparse_attn;

namespace {

template <class T>
std::vector<T> convert(const std::vector<float>& x) {
  std::vector<T> r(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) r[i] = T(x[i]);
  return r;
}

template <class T>
double max_abs(const std::vector<T>& x) {
  double m = 0.0;
  for (const T& e : x) m = std::max(m, std::abs(static_cast<double>(to_float(e))));
  return m;
}

// One attention problem in fp32 (heads-major, contiguous), rounded to the tested types on demand.
struct Problem {
  std::string name;
  index_t hq, hkv, n_q, n_k, d;
  std::vector<float> q, k, v;
};

Problem random_problem(index_t hq, index_t hkv, index_t n_q, index_t n_k, index_t d, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Problem p{"random hq=" + std::to_string(hq) + " hkv=" + std::to_string(hkv) + " n_q=" +
                std::to_string(n_q) + " n_k=" + std::to_string(n_k) + " d=" + std::to_string(d),
            hq, hkv, n_q, n_k, d, {}, {}, {}};
  p.q.resize(static_cast<std::size_t>(hq * n_q * d));
  p.k.resize(static_cast<std::size_t>(hkv * n_k * d));
  p.v.resize(p.k.size());
  for (auto* t : {&p.q, &p.k, &p.v})
    for (float& x : *t) x = nd(rng);
  return p;
}

// max_{h,i,j} scale 2^-8 sum_c |q_ic k_jc| over the allowed (causal suffix) pairs: the logit
// error bound of rounding an fp32 Q to bf16.
double logit_rounding_bound(const Problem& p, double scale) {
  const index_t G = p.hq / p.hkv;
  double e = 0.0;
  for (index_t h = 0; h < p.hq; ++h)
    for (index_t i = 0; i < p.n_q; ++i)
      for (index_t j = 0; j <= p.n_k - p.n_q + i; ++j) {
        double s = 0.0;
        for (index_t c = 0; c < p.d; ++c)
          s += std::abs(static_cast<double>(p.q[static_cast<std::size_t>((h * p.n_q + i) * p.d + c)]) *
                        static_cast<double>(p.k[static_cast<std::size_t>(((h / G) * p.n_k + j) * p.d + c)]));
        e = std::max(e, s);
      }
  return e * scale * std::ldexp(1.0, -8);
}

struct Measured {
  double max_err = 0.0, mean_err = 0.0, lse_err = 0.0;
};

// Causal prefill of p with element types TQ (Q, out), TK (K, V) under `precision` on the current
// CPU target, against the float64 oracle on the same stored values.
template <class TQ, class TK>
Measured run(const Problem& p, Precision precision) {
  const std::vector<TQ> q = convert<TQ>(p.q);
  const std::vector<TK> k = convert<TK>(p.k), v = convert<TK>(p.v);
  std::vector<TQ> o(static_cast<std::size_t>(p.hq * p.n_q * p.d), TQ(-7.0f));
  std::vector<float> lse(static_cast<std::size_t>(p.hq * p.n_q), -7.0f);
  const TensorView<const TQ> qv(q.data(), p.hq, p.n_q, p.d);
  const TensorView<const TK> kv(k.data(), p.hkv, p.n_k, p.d), vv(v.data(), p.hkv, p.n_k, p.d);
  const auto mask = masks::causal(p.hq, p.n_q, p.n_k, 64);
  AttentionOptions opt;
  opt.precision = precision;
  opt.lse = LseView(lse.data(), p.n_q);
  prefill(qv, kv, vv, TensorView<TQ>(o.data(), p.hq, p.n_q, p.d), mask, opt);
  const auto want = reference::attention_masked(qv, kv, vv, 1.0 / std::sqrt(double(p.d)), mask);
  Measured m;
  for (std::size_t i = 0; i < o.size(); ++i) {
    const double e = std::abs(static_cast<double>(to_float(o[i])) - want.out[i]);
    m.max_err = std::max(m.max_err, e);
    m.mean_err += e / static_cast<double>(o.size());
  }
  for (std::size_t i = 0; i < lse.size(); ++i)  // relative to the LSE's magnitude (>= 1)
    m.lse_err = std::max(m.lse_err, std::abs(lse[i] - want.lse[i]) / std::max(1.0, std::abs(want.lse[i])));
  return m;
}

// Runs the modes on every usable target and checks each against its bound.
void check_modes(const Problem& p) {
  const double scale = 1.0 / std::sqrt(double(p.d));
  const double vmax = max_abs(p.v);
  const double e_q = logit_rounding_bound(p, scale);
  const double out_bf16 = std::ldexp(vmax, -8);  // a bf16 output: u |o| <= u max|v|
  const double bf16_bf16q = vmax * std::ldexp(1.0, -7) + out_bf16 + 1e-5;
  const double bf16_fp32q = vmax * (std::ldexp(1.0, -7) + 2.5 * e_q) + 1e-5;
  for (CpuTarget t : usable_cpu_targets()) {
    set_cpu_target(t);
    const std::string where = p.name + " target " + target_name(t);
    struct Mode {
      const char* what;
      Measured m;
      double tol, lse_tol;
    };
    const Mode modes[] = {
        {"fp32 inputs, fp32 products", run<float, float>(p, Precision::automatic), 2e-5 * vmax, 2e-5},
        {"q fp32, kv bf16, fp32 products", run<float, bf16>(p, Precision::automatic), 2e-5 * vmax, 2e-5},
        {"q fp32, kv bf16, bf16 products", run<float, bf16>(p, Precision::bfloat16), bf16_fp32q, e_q + 1e-5},
        {"all bf16, fp32 products", run<bf16, bf16>(p, Precision::float32), 2e-5 * vmax + out_bf16, 2e-5},
        {"all bf16, bf16 products", run<bf16, bf16>(p, Precision::automatic), bf16_bf16q, 2e-5},
    };
    for (const Mode& m : modes) {
      std::printf("[precision] %s | %s | max |err| %.3g (bound %.3g) mean |err| %.3g | lse %.3g\n",
                  where.c_str(), m.what, m.m.max_err, m.tol, m.m.mean_err, m.m.lse_err);
      EXPECT_LE(m.m.max_err, m.tol) << where << ": " << m.what;
      EXPECT_LE(m.m.lse_err, m.lse_tol) << where << ": " << m.what;
    }
  }
  reset_cpu_target();
}

}  // namespace

TEST(Precision, RandomProblemsStayWithinTheRoundingBounds) {
  // GQA groups, a query suffix (n_q < n_k), odd and non-multiple-of-32 head dims (the K copy and
  // the shorter pair loop), blocks not multiples of 32 keys.
  check_modes(random_problem(4, 2, 150, 150, 128, 1));
  check_modes(random_problem(2, 1, 70, 201, 64, 2));
  check_modes(random_problem(3, 3, 97, 97, 80, 3));
  check_modes(random_problem(2, 2, 33, 65, 33, 4));
}

TEST(Precision, TinyLlamaLayersStayWithinTheRoundingBounds) {
  // The last 64 query rows of each bundled layer against all 2048 keys (8 query heads, 1 KV head).
  for (int L : {0, 11, 21}) {
    const std::string b = std::string(SPARSE_ATTN_DATA_DIR) + "/tinyllama/A_L" + std::to_string(L);
    const eval::Problem full = eval::load_npy_problem("L" + std::to_string(L), b + "_q.npy", b + "_k.npy", b + "_v.npy");
    Problem p{"tinyllama/L" + std::to_string(L), full.q.heads, full.k.heads, 64, full.k.tokens, full.q.dim, {}, {}, {}};
    for (index_t h = 0; h < p.hq; ++h)
      for (index_t i = full.q.tokens - p.n_q; i < full.q.tokens; ++i)
        for (index_t c = 0; c < p.d; ++c) p.q.push_back(full.q(h, i, c));
    for (index_t h = 0; h < p.hkv; ++h)
      for (index_t j = 0; j < p.n_k; ++j)
        for (index_t c = 0; c < p.d; ++c) {
          p.k.push_back(full.k(h, j, c));
          p.v.push_back(full.v(h, j, c));
        }
    check_modes(p);
  }
}

TEST(Precision, Bf16ProductsNeedBf16KeysAndValues) {
  std::vector<float> x(2 * 8 * 32, 0.5f);
  std::vector<bf16> xb(x.size(), bf16(0.5f));
  std::vector<float> o(x.size());
  const TensorView<const float> qf(x.data(), 2, 8, 32), kf(x.data(), 2, 8, 32);
  const TensorView<const bf16> kb(xb.data(), 2, 8, 32);
  const auto mask = masks::causal(2, 8, 8, 64);
  AttentionOptions opt;
  opt.precision = Precision::bfloat16;
  try {
    prefill(qf, kf, kf, TensorView<float>(o.data(), 2, 8, 32), mask, opt);
    FAIL() << "fp32 K/V with precision bf16 must throw";
  } catch (const invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("needs bf16 K and V, got K fp32, V fp32"), std::string::npos) << e.what();
  }
  EXPECT_THROW(prefill(qf, kb, kf, TensorView<float>(o.data(), 2, 8, 32), mask, opt), invalid_argument);
  // fp16 inputs always take the exact mode, so automatic accepts them.
  std::vector<fp16> xh(x.size(), fp16(0.5f));
  const TensorView<const fp16> kh(xh.data(), 2, 8, 32);
  opt.precision = Precision::automatic;
  EXPECT_NO_THROW(prefill(qf, kh, kh, TensorView<float>(o.data(), 2, 8, 32), mask, opt));
  EXPECT_FALSE(plan_prefill(attention_shape(kh, kh, kh), mask, opt).bf16_products());
  EXPECT_TRUE(plan_prefill(attention_shape(kb, kb, kb), mask, opt).bf16_products());
  EXPECT_FALSE(plan_prefill(attention_shape(qf, kb, kb), mask, opt).bf16_products());
}

TEST(Precision, PlanRecordsPrecisionAndElementTypes) {
  std::vector<bf16> xb(2 * 8 * 32, bf16(0.25f));
  std::vector<float> xf(xb.size(), 0.25f), o(xb.size());
  const TensorView<const bf16> b(xb.data(), 2, 8, 32);
  const TensorView<const float> f(xf.data(), 2, 8, 32);
  const auto mask = masks::causal(2, 8, 8, 64);
  AttentionOptions opt;
  const PrefillPlan plan = plan_prefill(attention_shape(b, b, b), mask, opt);
  WorkspaceBuffer ws(plan.workspace_bytes());
  const TensorView<float> out(o.data(), 2, 8, 32);
  EXPECT_NO_THROW(prefill(plan, b, b, b, out, mask, ws.view(), opt));
  try {  // fp32 Q with a plan made for bf16 Q
    prefill(plan, f, b, b, out, mask, ws.view(), opt);
    FAIL() << "a plan for bf16 Q must refuse fp32 Q";
  } catch (const invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("q fp32"), std::string::npos) << e.what();
  }
  opt.precision = Precision::float32;
  EXPECT_THROW(prefill(plan, b, b, b, out, mask, ws.view(), opt), invalid_argument);
}

TEST(Precision, NonFiniteValueReachesOnlyRowsThatSeeItsKey) {
  // A NaN in V of the last key: with causal masking only the last query row reads it; the
  // bf16 pairs zero it for the block and add it back to that row alone.
  const index_t n = 70, d = 64;
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<bf16> q(static_cast<std::size_t>(n * d)), k(q.size()), v(q.size());
  for (auto* t : {&q, &k, &v})
    for (bf16& x : *t) x = bf16(nd(rng));
  v[static_cast<std::size_t>((n - 1) * d + 5)] = bf16(std::numeric_limits<float>::quiet_NaN());
  const TensorView<const bf16> qv(q.data(), 1, n, d), kv(k.data(), 1, n, d), vv(v.data(), 1, n, d);
  std::vector<float> o(q.size());
  for (CpuTarget t : usable_cpu_targets()) {
    set_cpu_target(t);
    prefill(qv, kv, vv, TensorView<float>(o.data(), 1, n, d), masks::causal(1, n, n, 64));
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < d; ++c) {
        const float x = o[static_cast<std::size_t>(i * d + c)];
        if (i == n - 1 && c == 5) EXPECT_TRUE(std::isnan(x)) << target_name(t);
        else EXPECT_TRUE(std::isfinite(x)) << target_name(t) << " row " << i << " dim " << c;
      }
  }
  reset_cpu_target();
}
