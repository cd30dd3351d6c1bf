// Key-mass output (AttentionOptions::key_mass): per KV head and key, the attention probability
// summed over the group's query heads and the rows >= row_begin, computed by the decode and
// prefill kernels in the same pass. Checked against the float64 oracle (reference::key_mass), its
// invariants (column sums, determinism, outputs unchanged) and its validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <sparse_attn/kernel/decode.hpp>
#include <sparse_attn/kernel/prefill.hpp>
#include <sparse_attn/mask/patterns.hpp>
#include <sparse_attn/reference.hpp>
#include <string>
#include <vector>

using namespace sparse_attn;

namespace {

template <class T>
struct Store {
  index_t h, n, d;
  std::vector<T> data;
  Store(index_t h_, index_t n_, index_t d_, std::mt19937& rng, float sigma = 1.0f)
      : h(h_), n(n_), d(d_), data(static_cast<std::size_t>(h_ * n_ * d_)) {
    std::normal_distribution<float> nd(0.0f, sigma);
    for (auto& x : data) x = T(nd(rng));
  }
  TensorView<const T> view() const { return TensorView<const T>(data.data(), h, n, d); }
};

struct Result {
  std::vector<float> out, mass;
};

// |got - want| <= rel * want + abs for every key, and per KV head sum_j got = rows x G (the rows
// that see at least one key).
void expect_mass(const std::vector<float>& got, index_t stride, const std::vector<double>& want,
                 index_t hkv, index_t n_k, double rel, double abs, const std::string& what) {
  for (index_t hk = 0; hk < hkv; ++hk) {
    double sum_got = 0, sum_want = 0;
    for (index_t j = 0; j < n_k; ++j) {
      const double g = got[static_cast<std::size_t>(hk * stride + j)];
      const double w = want[static_cast<std::size_t>(hk * n_k + j)];
      ASSERT_TRUE(std::isfinite(g)) << what << " hk " << hk << " key " << j;
      ASSERT_NEAR(g, w, rel * w + abs) << what << " hk " << hk << " key " << j;
      if (w == 0.0) {
        ASSERT_EQ(g, 0.0f) << what << " hk " << hk << " key " << j << " is not read";
      }
      sum_got += g;
      sum_want += w;
    }
    EXPECT_NEAR(sum_got, std::round(sum_want), 1e-4 * std::max(1.0, sum_want)) << what << " column sum, hk " << hk;
  }
}

// ---------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------

enum class Sel { all, per_kv, per_q };

KeySelection make_selection(Sel sel, index_t hq, index_t hkv, index_t n_k, std::mt19937& rng) {
  if (sel == Sel::all) return KeySelection::all();
  const index_t units = sel == Sel::per_kv ? hkv : hq;
  std::vector<std::vector<KeyRange>> lists(static_cast<std::size_t>(units));
  std::uniform_int_distribution<index_t> len(1, 90), gap(0, 60);
  for (index_t u = 0; u < units; ++u) {
    index_t pos = u % 3 == 0 ? 0 : gap(rng);  // some units start at key 0
    while (pos < n_k) {
      const index_t e = std::min(n_k, pos + len(rng));
      lists[static_cast<std::size_t>(u)].push_back({pos, e});
      pos = e + 1 + gap(rng);
    }
    auto& l = lists[static_cast<std::size_t>(u)];
    if (l.empty()) l.push_back({n_k - 1, n_k});
    if (u == 1 && units > 2) l.back().end = n_k;  // the newest keys
  }
  return KeySelection::from_ranges(sel == Sel::per_kv ? KeySelection::Scope::per_kv_head
                                                      : KeySelection::Scope::per_q_head,
                                   lists);
}

bool selected(const KeySelection& keys, index_t unit, index_t j) {
  if (keys.scope() == KeySelection::Scope::all) return true;
  for (const KeyRange* r = keys.ranges_begin(unit); r != keys.ranges_end(unit); ++r)
    if (j >= r->begin && j < r->end) return true;
  return false;
}

template <class TKV>
Result run_decode(const Store<float>& q, const Store<TKV>& k, const Store<TKV>& v,
                  const KeySelection& keys, DecodeOptions opt, bool with_mass, index_t row_begin,
                  index_t stride_pad = 3) {
  Result r;
  r.out.assign(static_cast<std::size_t>(q.h * q.n * v.d), -7.0f);
  const index_t stride = k.n + stride_pad;
  r.mass.assign(static_cast<std::size_t>(k.h * stride), -7.0f);
  if (with_mass) opt.key_mass = KeyMassView{r.mass.data(), stride, row_begin};
  decode(q.view(), k.view(), v.view(), TensorView<float>(r.out.data(), q.h, q.n, v.d), keys, opt);
  return r;
}

struct DecodeCase {
  index_t hkv, G, n_q, n_k, d;
  Sel sel;
  bool bf16_kv, bf16_products;  // bf16_products: Precision::bfloat16 (bf16 K/V)
};

template <class TKV>
void check_decode(const DecodeCase& c) {
  const std::string what = "hkv=" + std::to_string(c.hkv) + " G=" + std::to_string(c.G) +
                           " n_q=" + std::to_string(c.n_q) + " n_k=" + std::to_string(c.n_k) +
                           " sel=" + std::to_string(static_cast<int>(c.sel)) +
                           (c.bf16_kv ? " bf16" : " fp32") + (c.bf16_products ? " bf16 products" : "");
  std::mt19937 rng(static_cast<unsigned>(c.n_k * 7 + c.G * 3 + c.n_q + static_cast<int>(c.sel)));
  const index_t hq = c.hkv * c.G;
  const Store<float> q(hq, c.n_q, c.d, rng, 1.5f);
  const Store<TKV> k(c.hkv, c.n_k, c.d, rng), v(c.hkv, c.n_k, c.d, rng);
  const KeySelection keys = make_selection(c.sel, hq, c.hkv, c.n_k, rng);
  DecodeOptions opt;
  opt.split = 128;  // several chunks per unit
  opt.precision = c.bf16_products ? Precision::bfloat16 : Precision::float32;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  for (index_t row_begin : {index_t{0}, c.n_q - 1}) {
    const Result got = run_decode(q, k, v, keys, opt, true, row_begin);
    const std::vector<double> want = reference::key_mass(
        q.view(), k.view(), scale,
        [&](index_t h, index_t i, index_t j) {
          const index_t unit = keys.scope() == KeySelection::Scope::per_q_head ? h : h / c.G;
          return j <= c.n_k - c.n_q + i && selected(keys, unit, j);
        },
        row_begin);
    // bf16 products round q to bf16 for q.k: logits differ from the oracle's by ~1e-2 x |logit|.
    const double rel = c.bf16_products ? 5e-2 : 2e-5;
    expect_mass(got.mass, c.n_k + 3, want, c.hkv, c.n_k, rel, rel * 1e-2, what + " row_begin=" + std::to_string(row_begin));
    for (index_t hk = 0; hk < c.hkv; ++hk)  // the padding between rows is not written
      for (index_t j = c.n_k; j < c.n_k + 3; ++j) EXPECT_EQ(got.mass[static_cast<std::size_t>(hk * (c.n_k + 3) + j)], -7.0f);
    if (row_begin != 0) continue;
    // Outputs are those of a call without key mass, bit for bit.
    const Result plain = run_decode(q, k, v, keys, opt, false, 0);
    EXPECT_EQ(0, std::memcmp(plain.out.data(), got.out.data(), plain.out.size() * sizeof(float))) << what;
    // Bit-identical for 1 and 3 threads.
    DecodeOptions o1 = opt, o3 = opt;
    o1.num_threads = 1;
    o3.num_threads = 3;
    const Result a = run_decode(q, k, v, keys, o1, true, 0), b = run_decode(q, k, v, keys, o3, true, 0);
    EXPECT_EQ(0, std::memcmp(a.mass.data(), b.mass.data(), a.mass.size() * sizeof(float))) << what;
    EXPECT_EQ(0, std::memcmp(a.mass.data(), got.mass.data(), a.mass.size() * sizeof(float))) << what;
  }
}

}  // namespace

TEST(KeyMass, DecodeMatchesOracle) {
  for (index_t G : {1, 4})
    for (index_t n_q : {1, 3})
      for (Sel sel : {Sel::all, Sel::per_kv, Sel::per_q}) {
        check_decode<float>({2, G, n_q, 517, 64, sel, false, false});
        check_decode<bf16>({2, G, n_q, 517, 64, sel, true, false});
      }
}

TEST(KeyMass, DecodeBf16Products) {
  for (index_t G : {1, 4})
    for (Sel sel : {Sel::all, Sel::per_q}) check_decode<bf16>({2, G, 3, 700, 64, sel, true, true});
}

TEST(KeyMass, DecodeShortCacheAndOddDims) {
  check_decode<float>({3, 2, 2, 5, 13, Sel::all, false, false});
  check_decode<float>({1, 3, 3, 40, 24, Sel::per_q, false, false});
  check_decode<bf16>({2, 4, 1, 1000, 72, Sel::per_kv, true, false});
}

TEST(KeyMass, DecodeValidation) {
  std::mt19937 rng(3);
  const Store<float> q(4, 2, 16, rng), k(2, 50, 16, rng), v(2, 50, 16, rng);
  std::vector<float> out(4 * 2 * 16), mass(2 * 60);
  const TensorView<float> ov(out.data(), 4, 2, 16);
  DecodeOptions opt;
  opt.key_mass = KeyMassView{mass.data(), 49, 0};  // stride < n_k
  EXPECT_THROW(decode(q.view(), k.view(), v.view(), ov, KeySelection::all(), opt), invalid_argument);
  opt.key_mass = KeyMassView{mass.data(), 50, -1};
  EXPECT_THROW(decode(q.view(), k.view(), v.view(), ov, KeySelection::all(), opt), invalid_argument);
  opt.key_mass = KeyMassView{mass.data(), 50, 3};  // > n_q
  EXPECT_THROW(decode(q.view(), k.view(), v.view(), ov, KeySelection::all(), opt), invalid_argument);
  opt.key_mass = KeyMassView{mass.data(), 50, 2};  // = n_q: no row counts, every key 0
  decode(q.view(), k.view(), v.view(), ov, KeySelection::all(), opt);
  for (index_t j = 0; j < 100; ++j) EXPECT_EQ(mass[static_cast<std::size_t>(j)], 0.0f);
  // A plan made without key mass does not size its workspace for it.
  DecodeOptions plain;
  const DecodePlan plan = plan_decode(attention_shape(q.view(), k.view(), v.view()), KeySelection::all(), plain);
  const WorkspaceBuffer ws(plan.workspace_bytes());
  opt.key_mass = KeyMassView{mass.data(), 50, 0};
  EXPECT_THROW(decode(plan, q.view(), k.view(), v.view(), ov, KeySelection::all(), ws.view(), opt), invalid_argument);
  EXPECT_THROW(plan_decode(attention_shape(q.view(), k.view(), v.view()), KeySelection::all(),
                           [] { DecodeOptions o; o.key_mass = KeyMassView{nullptr, 0, 0}; static float m[1]; o.key_mass.data = m; return o; }()),
               invalid_argument);
  // Requested: a larger workspace; without: the same as before.
  const DecodePlan with = plan_decode(attention_shape(q.view(), k.view(), v.view()), KeySelection::all(), opt);
  EXPECT_GT(with.workspace_bytes(), plan.workspace_bytes());
}

// ---------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------

namespace {

// A predicate that may throw (so the kernel evaluates it into the workspace first).
struct Sparse {
  static constexpr bool trivial = false;
  bool operator()(index_t h, index_t i, index_t j) const { return (i * 7 + j * 3 + h) % 5 != 0; }
};

template <class TKV, class Mask>
Result run_prefill(const Store<float>& q, const Store<TKV>& k, const Store<TKV>& v, const Mask& mask,
                   AttentionOptions opt, bool with_mass, index_t row_begin) {
  Result r;
  r.out.assign(static_cast<std::size_t>(q.h * q.n * v.d), -7.0f);
  const index_t stride = k.n + 5;
  r.mass.assign(static_cast<std::size_t>(k.h * stride), -7.0f);
  if (with_mass) opt.key_mass = KeyMassView{r.mass.data(), stride, row_begin};
  prefill(q.view(), k.view(), v.view(), TensorView<float>(r.out.data(), q.h, q.n, v.d), mask, opt);
  return r;
}

template <class TKV, class Mask>
void check_prefill(const Store<float>& q, const Store<TKV>& k, const Store<TKV>& v, const Mask& mask,
                   const std::string& what) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.d));
  for (index_t row_begin : {index_t{0}, std::max<index_t>(0, q.n - 32), q.n - 1}) {
    const std::string w = what + " row_begin=" + std::to_string(row_begin);
    const Result got = run_prefill(q, k, v, mask, AttentionOptions{}, true, row_begin);
    const std::vector<double> want = reference::key_mass_masked(q.view(), k.view(), scale, mask, row_begin);
    expect_mass(got.mass, k.n + 5, want, k.h, k.n, 2e-5, 1e-7, w);
    for (index_t hk = 0; hk < k.h; ++hk)
      for (index_t j = k.n; j < k.n + 5; ++j) EXPECT_EQ(got.mass[static_cast<std::size_t>(hk * (k.n + 5) + j)], -7.0f);
    const Result plain = run_prefill(q, k, v, mask, AttentionOptions{}, false, 0);
    EXPECT_EQ(0, std::memcmp(plain.out.data(), got.out.data(), plain.out.size() * sizeof(float))) << w;
    AttentionOptions o1, o3;
    o1.num_threads = 1;
    o3.num_threads = 3;
    const Result a = run_prefill(q, k, v, mask, o1, true, row_begin), b = run_prefill(q, k, v, mask, o3, true, row_begin);
    EXPECT_EQ(0, std::memcmp(a.mass.data(), b.mass.data(), a.mass.size() * sizeof(float))) << w;
    EXPECT_EQ(0, std::memcmp(a.mass.data(), got.mass.data(), a.mass.size() * sizeof(float))) << w;
  }
}

template <class TKV>
void check_prefill_masks(index_t hkv, index_t G, index_t n_q, index_t n_k, index_t d, index_t block) {
  const std::string what = "hkv=" + std::to_string(hkv) + " G=" + std::to_string(G) + " n_q=" +
                           std::to_string(n_q) + " n_k=" + std::to_string(n_k) + " d=" + std::to_string(d) +
                           " block=" + std::to_string(block) + (std::is_same_v<TKV, float> ? " fp32" : " bf16");
  std::mt19937 rng(static_cast<unsigned>(n_q * 5 + n_k + G));
  const index_t hq = hkv * G;
  const Store<float> q(hq, n_q, d, rng, 1.5f);
  const Store<TKV> k(hkv, n_k, d, rng), v(hkv, n_k, d, rng);
  const MaskShape shape{hq, n_q, n_k, block, block, true};
  check_prefill(q, k, v, IntervalMask(shape, 0, 0), what + " causal");
  check_prefill(q, k, v, IntervalMask(shape, 70, 3), what + " window");
  // Block-sparse, per head: the diagonal block, block 0 and a random third of the others.
  BlockListBuilder b(shape, false);
  std::bernoulli_distribution keep(0.35);
  for (index_t h = 0; h < hq; ++h)
    for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb) {
      const index_t last = (shape.q_end(qb) - 1 + shape.q_offset()) / block;
      std::vector<index_t> kbs;
      for (index_t kb = 0; kb <= last; ++kb)
        if (kb == 0 || kb == last || keep(rng)) kbs.push_back(kb);
      b.set_row(h, qb, kbs);
    }
  BlockListBuilder b2 = b;
  check_prefill(q, k, v, b.build(), what + " block-sparse");
  check_prefill(q, k, v, b2.build(Sparse{}), what + " block-sparse + predicate");
}

}  // namespace

TEST(KeyMass, PrefillMatchesOracle) {
  check_prefill_masks<float>(2, 1, 301, 301, 64, 64);
  check_prefill_masks<float>(2, 4, 190, 257, 40, 32);
  check_prefill_masks<bf16>(1, 4, 133, 133, 64, 64);
  check_prefill_masks<float>(1, 2, 20, 97, 16, 16);  // n_q < 32: the window is every row
}

TEST(KeyMass, PrefillValidation) {
  std::mt19937 rng(5);
  const Store<float> q(4, 40, 16, rng), k(2, 50, 16, rng), v(2, 50, 16, rng);
  std::vector<float> out(4 * 40 * 16), mass(2 * 60, -7.0f);
  const TensorView<float> ov(out.data(), 4, 40, 16);
  const IntervalMask mask(MaskShape{4, 40, 50, 16, 16, true}, 0, 0);
  AttentionOptions opt;
  opt.key_mass = KeyMassView{mass.data(), 49, 0};
  EXPECT_THROW(prefill(q.view(), k.view(), v.view(), ov, mask, opt), invalid_argument);
  opt.key_mass = KeyMassView{mass.data(), 50, -1};
  EXPECT_THROW(prefill(q.view(), k.view(), v.view(), ov, mask, opt), invalid_argument);
  opt.key_mass = KeyMassView{mass.data(), 50, 41};
  EXPECT_THROW(prefill(q.view(), k.view(), v.view(), ov, mask, opt), invalid_argument);
  EXPECT_THROW(plan_prefill(attention_shape(q.view(), k.view(), v.view()), mask, opt), invalid_argument);
  opt.key_mass = KeyMassView{mass.data(), 50, 40};  // no counted row: every key 0
  prefill(q.view(), k.view(), v.view(), ov, mask, opt);
  for (index_t j = 0; j < 100; ++j) EXPECT_EQ(mass[static_cast<std::size_t>(j)], 0.0f);
  const AttentionOptions plain;
  const PrefillPlan plan = plan_prefill(attention_shape(q.view(), k.view(), v.view()), mask, plain);
  const WorkspaceBuffer ws(plan.workspace_bytes());
  opt.key_mass = KeyMassView{mass.data(), 50, 0};
  EXPECT_THROW(prefill(plan, q.view(), k.view(), v.view(), ov, mask, ws.view(), opt), invalid_argument);
  const PrefillPlan with = plan_prefill(attention_shape(q.view(), k.view(), v.view()), mask, opt);
  EXPECT_GT(with.workspace_bytes(), plan.workspace_bytes());
  // A plan for row_begin 8 serves row_begin >= 8, not an earlier one.
  opt.key_mass.row_begin = 8;
  const PrefillPlan p8 = plan_prefill(attention_shape(q.view(), k.view(), v.view()), mask, opt);
  const WorkspaceBuffer ws8(p8.workspace_bytes());
  opt.key_mass.row_begin = 20;
  prefill(p8, q.view(), k.view(), v.view(), ov, mask, ws8.view(), opt);
  opt.key_mass.row_begin = 7;
  EXPECT_THROW(prefill(p8, q.view(), k.view(), v.view(), ov, mask, ws8.view(), opt), invalid_argument);
}

TEST(KeyMass, NanQueryPoisonsOnlyTheKeysItsRowReads) {
  std::mt19937 rng(9);
  Store<float> q(4, 40, 16, rng);
  const Store<float> k(2, 60, 16, rng), v(2, 60, 16, rng);
  q.data[static_cast<std::size_t>((1 * 40 + 30) * 16 + 3)] = std::nanf("");  // head 1 (KV head 0), row 30
  const IntervalMask mask(MaskShape{4, 40, 60, 16, 16, true}, 0, 0);
  const Result r = run_prefill(q, k, v, mask, AttentionOptions{}, true, 20);
  const index_t stride = 65, pos = 60 - 40 + 30;
  for (index_t j = 0; j < 60; ++j) {
    EXPECT_EQ(std::isnan(r.mass[static_cast<std::size_t>(j)]), j <= pos) << "key " << j;
    EXPECT_TRUE(std::isfinite(r.mass[static_cast<std::size_t>(stride + j)])) << "KV head 1, key " << j;
  }
  // Decode: the NaN row (head 1, the last token) reads every key of KV head 0.
  const Store<float> qd(4, 1, 16, rng);
  Store<float> qn = qd;
  qn.data[static_cast<std::size_t>(1 * 16 + 5)] = std::nanf("");
  const Result d = run_decode(qn, k, v, KeySelection::all(), DecodeOptions{}, true, 0);
  for (index_t j = 0; j < 60; ++j) {
    EXPECT_TRUE(std::isnan(d.mass[static_cast<std::size_t>(j)])) << "key " << j;
    EXPECT_TRUE(std::isfinite(d.mass[static_cast<std::size_t>(63 + j)])) << "KV head 1, key " << j;
  }
}
