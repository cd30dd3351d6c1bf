// Hardening (docs/ROBUSTNESS.md): the bad-input catalogue of the library API (each
// case asserts sparse_attn::invalid_argument and a message that names the argument and what is
// allowed), the NaN/Inf policy, long-context limits (64-bit pair counts, n >= 65536),
// bit-determinism of every method's selection + kernel for thread counts 1..4, and custom
// executors (an engine's threads give the same bits; a failure inside a parallel loop reaches the
// caller with its own type and nothing changed; a broken executor is an invalid_argument).
// The command-line tool's bad inputs are tested in test_tool.cpp.

// GCC < 13 (PR 105593): the pragma has to cover Eigen's own lines (see core/diagnostics.hpp).
#include <sparse_attn/core/diagnostics.hpp>
SPARSE_ATTN_DIAGNOSTICS_PUSH
#include <Eigen/Core>
SPARSE_ATTN_DIAGNOSTICS_POP

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <random>
#include <sparse_attn/pipeline.hpp>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

using namespace sparse_attn;
namespace sm = sparse_attn::methods;
using sm::Budget;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Random [heads, tokens, dim] tensor in fp32, head-major.
struct Tensor {
  index_t h, n, d;
  std::vector<float> data;
  Tensor(index_t h_, index_t n_, index_t d_, unsigned seed, float sigma = 1.0f)
      : h(h_), n(n_), d(d_), data(static_cast<std::size_t>(h_ * n_ * d_)) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, sigma);
    for (float& x : data) x = nd(rng);
  }
  float& at(index_t hh, index_t t, index_t c) {
    return data[static_cast<std::size_t>((hh * n + t) * d + c)];
  }
  TensorView<const float> view() const { return {data.data(), h, n, d}; }
  TensorView<float> mut() { return {data.data(), h, n, d}; }
};

// Output buffer [heads, tokens, dim] plus LSE [heads, tokens].
struct Out {
  index_t h, n, d;
  std::vector<float> o, lse;
  Out(index_t h_, index_t n_, index_t d_)
      : h(h_), n(n_), d(d_), o(static_cast<std::size_t>(h_ * n_ * d_), -7.0f),
        lse(static_cast<std::size_t>(h_ * n_), -7.0f) {}
  TensorView<float> view() { return {o.data(), h, n, d}; }
  LseView lse_view() { return LseView(lse.data(), n); }
  float at(index_t hh, index_t t, index_t c) const {
    return o[static_cast<std::size_t>((hh * n + t) * d + c)];
  }
  bool row_finite(index_t hh, index_t t) const {
    for (index_t c = 0; c < d; ++c)
      if (!std::isfinite(at(hh, t, c))) return false;
    return true;
  }
  bool row_all_nan(index_t hh, index_t t) const {
    for (index_t c = 0; c < d; ++c)
      if (!std::isnan(at(hh, t, c))) return false;
    return true;
  }
  bool row_equal(const Out& other, index_t hh, index_t t) const {
    return std::memcmp(&o[static_cast<std::size_t>((hh * n + t) * d)],
                       &other.o[static_cast<std::size_t>((hh * n + t) * d)],
                       sizeof(float) * static_cast<std::size_t>(d)) == 0;
  }
};

// f() must throw sparse_attn::invalid_argument whose message is "<where>: <what>" (where = the
// expected prefix) and contains every part (the argument's name, the allowed range).
void expect_invalid(int line, const std::function<void()>& f, const std::string& where,
                    std::initializer_list<const char*> parts) {
  SCOPED_TRACE("expect_invalid at line " + std::to_string(line));
  try {
    f();
  } catch (const sparse_attn::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(where + ": ", 0), 0u) << "message does not start with '" << where
                                              << ": ': " << msg;
    EXPECT_EQ(msg.find(": : "), std::string::npos) << "doubled separator: " << msg;
    for (const char* p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw another exception type: " << e.what();
    return;
  }
  ADD_FAILURE() << "did not throw";
}
#define EXPECT_INVALID(where, parts, ...) expect_invalid(__LINE__, [&] { __VA_ARGS__; }, where, parts)

template <class T>
using Parts = std::initializer_list<T>;

// A standard valid prefill problem: Hq = 4, Hkv = 2, n = 40, d = 16.
struct Prefill {
  Tensor q{4, 40, 16, 1}, k{2, 40, 16, 2}, v{2, 40, 16, 3};
  Out out{4, 40, 16};
  IntervalMask mask = masks::causal(4, 40, 40);
};

kv::CacheOptions cache_options(index_t hkv, index_t d, index_t capacity, index_t page = 16) {
  kv::CacheOptions o;
  o.kv_heads = hkv;
  o.head_dim = d;
  o.capacity = capacity;
  o.page_size = page;
  return o;
}

// The CSR arrays of a block-list mask, for bit-exact comparisons.
template <class Mask>
std::vector<std::int64_t> csr_of(const Mask& m) {
  std::vector<std::int64_t> r(m.row_offsets().begin(), m.row_offsets().end());
  r.insert(r.end(), m.block_indices().begin(), m.block_indices().end());
  r.insert(r.end(), m.full_flags().begin(), m.full_flags().end());
  r.push_back(m.pairs());
  return r;
}
// A line mask's lines (every head's columns, then offsets) and pair count.
std::vector<std::int64_t> csr_of(const LineMask& m) {
  std::vector<std::int64_t> r;
  for (index_t h = 0; h < m.shape().heads; ++h) {
    r.insert(r.end(), m.columns(h), m.columns(h) + m.num_columns(h));
    r.insert(r.end(), m.offsets(h), m.offsets(h) + m.num_offsets(h));
  }
  r.push_back(m.pairs());
  return r;
}

}  // namespace

// =============================================================================================
// Error model
// =============================================================================================

TEST(ErrorModel, InvalidArgumentIsAStdInvalidArgument) {
  static_assert(std::is_base_of_v<std::invalid_argument, sparse_attn::invalid_argument>);
  Prefill p;
  const Tensor k3(3, 40, 16, 9), v3(3, 40, 16, 9);
  try {
    prefill(p.q.view(), k3.view(), v3.view(), p.out.view(), p.mask);
    FAIL() << "Hq=4, Hkv=3 accepted";
  } catch (const std::invalid_argument& e) {  // catchable as the standard type
    EXPECT_NE(dynamic_cast<const sparse_attn::invalid_argument*>(&e), nullptr);
  }
}

TEST(ErrorModel, MessagesAreWhereColonWhatSemicolonAllowed) {
  // require() drops leading ": " of the pieces, so both spellings give one separator.
  try {
    require(false, "f", ": x is 3", "; x must be < 2");
  } catch (const sparse_attn::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "f: x is 3; x must be < 2");
  }
  try {
    require(false, "f", "x is 3; x must be < 2");
  } catch (const sparse_attn::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "f: x is 3; x must be < 2");
  }
}

// =============================================================================================
// Shapes
// =============================================================================================

TEST(BadShapes, QueryHeadsNotMultipleOfKvHeads) {
  Prefill p;
  const Tensor k3(3, 40, 16, 9), v3(3, 40, 16, 9);
  EXPECT_INVALID("prefill", Parts<const char*>({"Hq=4 is not a multiple of Hkv=3", "Hq % Hkv == 0"}),
                 prefill(p.q.view(), k3.view(), v3.view(), p.out.view(), p.mask));
  Out o1(4, 1, 16);
  const Tensor q1(4, 1, 16, 4);
  EXPECT_INVALID("decode", Parts<const char*>({"Hq=4 is not a multiple of Hkv=3", "Hq % Hkv == 0"}),
                 decode(q1.view(), k3.view(), v3.view(), o1.view()));
  EXPECT_INVALID("methods::BlockSparse::select", Parts<const char*>({"Hq=4", "Hkv=3", "Hq % Hkv == 0"}),
                 sm::BlockSparse{}.select(p.q.view(), k3.view(), Budget::compression(10)));
  kv::ContiguousCache<float> cache(cache_options(3, 16, 64));
  cache.append(k3.view(), v3.view());
  EXPECT_INVALID("methods::Quest::select", Parts<const char*>({"Hq=4 is not a multiple of Hkv=3"}),
                 sm::Quest{}.select(q1.view(), cache, Budget::compression(10)));
}

TEST(BadShapes, MismatchedHeadDims) {
  Prefill p;
  const Tensor k8(2, 40, 8, 9), v8(2, 40, 8, 9);
  EXPECT_INVALID("prefill", Parts<const char*>({"head_dim of Q (16) differs from K (8)", "must be equal"}),
                 prefill(p.q.view(), k8.view(), p.v.view(), p.out.view(), p.mask));
  // V may have its own dim dv, but the output must then be [Hq, n_q, dv].
  EXPECT_INVALID("prefill", Parts<const char*>({"out is [4, 40, 16], expected [4, 40, 8]"}),
                 prefill(p.q.view(), p.k.view(), v8.view(), p.out.view(), p.mask));
  EXPECT_INVALID("methods::VerticalSlash::select",
                 Parts<const char*>({"head_dim of q (16) and k (8)", "must be equal and >= 1"}),
                 sm::VerticalSlash{}.select(p.q.view(), k8.view(), Budget::count(7096)));
}

TEST(BadShapes, MismatchedKvHeadsOrTokens) {
  Prefill p;
  const Tensor v39(2, 39, 16, 9), v1h(1, 40, 16, 9);
  EXPECT_INVALID("prefill", Parts<const char*>({"K is [2, 40, 16] but V is [2, 39, 16]", "same heads and tokens"}),
                 prefill(p.q.view(), p.k.view(), v39.view(), p.out.view(), p.mask));
  EXPECT_INVALID("prefill", Parts<const char*>({"same heads and tokens"}),
                 prefill(p.q.view(), p.k.view(), v1h.view(), p.out.view(), p.mask));
}

TEST(BadShapes, OutputShapeMismatch) {
  Prefill p;
  Out wrong(4, 39, 16);
  EXPECT_INVALID("prefill", Parts<const char*>({"out is [4, 39, 16], expected [4, 40, 16]"}),
                 prefill(p.q.view(), p.k.view(), p.v.view(), wrong.view(), p.mask));
}

TEST(BadShapes, MoreQueriesThanKeys) {
  const Tensor q(4, 41, 16, 1), k(2, 40, 16, 2), v(2, 40, 16, 3);
  Out out(4, 41, 16);
  EXPECT_INVALID("prefill", Parts<const char*>({"n_q=41 > n_k=40", "suffix of the keys"}),
                 prefill(q.view(), k.view(), v.view(), out.view(), masks::causal(4, 40, 40)));
  EXPECT_INVALID("decode", Parts<const char*>({"n_q=41 > n_k=40", "suffix of the keys"}),
                 decode(q.view(), k.view(), v.view(), out.view()));
  EXPECT_INVALID("IntervalMask", Parts<const char*>({"n_q=41 > n_k=40", "n_q <= n_k"}),
                 masks::causal(4, 41, 40));
  EXPECT_INVALID("methods::FlexPrefill::select", Parts<const char*>({"n_q=41 > n_k=40", "n_q <= n_k"}),
                 sm::FlexPrefill{}.select(q.view(), k.view(), Budget::mass(0.9)));
}

TEST(BadShapes, MaskGeometryDiffersFromTensors) {
  Prefill p;
  EXPECT_INVALID("prefill", Parts<const char*>({"mask geometry (heads=2, n_q=40, n_k=40)", "does not match Q/K (heads=4"}),
                 prefill(p.q.view(), p.k.view(), p.v.view(), p.out.view(), masks::causal(2, 40, 40)));
}

TEST(ErrorModel, ACallThatThrowsWritesNoOutputOrLse) {
  // Every check runs before the parallel work: out and the LSE buffer keep their -7 fill.
  Prefill p;
  auto untouched = [](const Out& o) {
    for (float x : o.o)
      if (x != -7.0f) return false;
    for (float x : o.lse)
      if (x != -7.0f) return false;
    return true;
  };
  const Tensor k3(3, 40, 16, 9), v3(3, 40, 16, 9), v39(2, 39, 16, 9);
  std::vector<std::function<void(AttentionOptions&)>> bad_prefill = {
      [&](AttentionOptions& o) { prefill(p.q.view(), k3.view(), v3.view(), p.out.view(), p.mask, o); },
      [&](AttentionOptions& o) { prefill(p.q.view(), p.k.view(), v39.view(), p.out.view(), p.mask, o); },
      [&](AttentionOptions& o) {
        prefill(p.q.view(), p.k.view(), p.v.view(), p.out.view(), masks::causal(2, 40, 40), o);
      },
      [&](AttentionOptions& o) {
        o.scale = -1.0f;
        prefill(p.q.view(), p.k.view(), p.v.view(), p.out.view(), p.mask, o);
      },
      [&](AttentionOptions& o) {
        o.num_threads = -1;
        prefill(p.q.view(), p.k.view(), p.v.view(), p.out.view(), p.mask, o);
      },
  };
  for (std::size_t i = 0; i < bad_prefill.size(); ++i) {
    AttentionOptions o;
    o.lse = p.out.lse_view();
    EXPECT_THROW(bad_prefill[i](o), sparse_attn::invalid_argument) << "case " << i;
    EXPECT_TRUE(untouched(p.out)) << "prefill case " << i << " wrote output";
  }
  // Decode: a selection out of range, a split below 16, an output of the wrong shape.
  Out o1(4, 1, 16);
  const Tensor q1(4, 1, 16, 4);
  std::vector<std::function<void(DecodeOptions&)>> bad_decode = {
      [&](DecodeOptions& o) {
        decode(q1.view(), p.k.view(), p.v.view(), o1.view(),
               KeySelection::from_ranges(KeySelection::Scope::per_kv_head, {{{0, 10}}, {{30, 41}}}), o);
      },
      [&](DecodeOptions& o) {
        o.split = 8;
        decode(q1.view(), p.k.view(), p.v.view(), o1.view(), KeySelection::all(), o);
      },
      [&](DecodeOptions& o) {
        decode(q1.view(), p.k.view(), v39.view(), o1.view(), KeySelection::all(), o);
      },
  };
  for (std::size_t i = 0; i < bad_decode.size(); ++i) {
    DecodeOptions o;
    o.lse = o1.lse_view();
    EXPECT_THROW(bad_decode[i](o), sparse_attn::invalid_argument) << "case " << i;
    EXPECT_TRUE(untouched(o1)) << "decode case " << i << " wrote output";
  }
}

TEST(BadShapes, ZeroLengthSequencesAreNoOps) {
  // n_q = 0 (nothing to compute) and n_q = n_k = 0 are valid and write nothing.
  const Tensor q0(4, 0, 16, 1), k(2, 40, 16, 2), v(2, 40, 16, 3), k0(2, 0, 16, 2), v0(2, 0, 16, 3);
  Out o0(4, 0, 16);
  EXPECT_NO_THROW(prefill(q0.view(), k.view(), v.view(), o0.view(), masks::causal(4, 0, 40)));
  EXPECT_NO_THROW(prefill(q0.view(), k0.view(), v0.view(), o0.view(), masks::causal(4, 0, 0)));
  EXPECT_NO_THROW(decode(q0.view(), k0.view(), v0.view(), o0.view()));
  EXPECT_EQ(masks::causal(4, 0, 0).pairs(), 0);
  EXPECT_DOUBLE_EQ(masks::causal(4, 0, 0).compression(), 1.0);
  EXPECT_NO_THROW(sm::BlockSparse{}.select(q0.view(), k.view(), Budget::compression(10)));
  EXPECT_NO_THROW(sm::VerticalSlash{}.select(q0.view(), k0.view(), Budget::count(7096)));
  EXPECT_NO_THROW(sm::FlexPrefill{}.select(q0.view(), k.view(), Budget::mass(0.9)));
  // Decode over an empty key list: zero output, LSE -inf.
  const Tensor q1(4, 1, 16, 4);
  Out o1(4, 1, 16);
  DecodeOptions opt;
  opt.lse = o1.lse_view();
  decode(q1.view(), k.view(), v.view(), o1.view(),
         KeySelection::from_tokens(KeySelection::Scope::per_kv_head, {{}, {}}), opt);
  for (index_t h = 0; h < 4; ++h) {
    EXPECT_EQ(o1.at(h, 0, 0), 0.0f);
    EXPECT_TRUE(std::isinf(o1.lse[static_cast<std::size_t>(h)]));
  }
  // Zero heads or head_dim 0 are not: there is nothing to attend with.
  const Tensor kh0(0, 40, 16, 2), qd0(4, 40, 0, 1), kd0(2, 40, 0, 2);
  Out out(4, 40, 16);
  const Tensor q(4, 40, 16, 1);
  EXPECT_INVALID("prefill", Parts<const char*>({"K and V need >= 1 head", "got K 0"}),
                 prefill(q.view(), kh0.view(), kh0.view(), out.view(), masks::causal(4, 40, 40)));
  EXPECT_INVALID("prefill", Parts<const char*>({"head_dim must be >= 1"}),
                 prefill(qd0.view(), kd0.view(), v.view(), out.view(), masks::causal(4, 40, 40)));
}

// =============================================================================================
// Views: what can be checked (extents, null data, aliasing outputs) and what cannot
// =============================================================================================

TEST(BadViews, NegativeExtents) {
  Prefill p;
  TensorView<const float> q = p.q.view();
  q.tokens = -1;
  EXPECT_INVALID("q", Parts<const char*>({"negative extent", "tokens=-1", "extents must be >= 0"}),
                 prefill(q, p.k.view(), p.v.view(), p.out.view(), p.mask));
  TensorView<const float> k = p.k.view();
  k.dim = -16;
  EXPECT_INVALID("k", Parts<const char*>({"negative extent", "extents must be >= 0"}),
                 prefill(p.q.view(), k, p.v.view(), p.out.view(), p.mask));
}

TEST(BadViews, NullDataOfANonEmptyView) {
  Prefill p;
  TensorView<const float> q = p.q.view(), k = p.k.view(), v = p.v.view();
  TensorView<float> o = p.out.view();
  q.data = nullptr;
  EXPECT_INVALID("q", Parts<const char*>({"non-empty (4x40x16)", "data pointer is null"}),
                 prefill(q, p.k.view(), p.v.view(), p.out.view(), p.mask));
  k.data = nullptr;
  EXPECT_INVALID("k", Parts<const char*>({"data pointer is null"}),
                 prefill(p.q.view(), k, p.v.view(), p.out.view(), p.mask));
  v.data = nullptr;
  EXPECT_INVALID("v", Parts<const char*>({"data pointer is null"}),
                 decode(p.q.view(), p.k.view(), v, p.out.view()));
  o.data = nullptr;
  EXPECT_INVALID("out", Parts<const char*>({"data pointer is null"}),
                 prefill(p.q.view(), p.k.view(), p.v.view(), o, p.mask));
  // An empty view may have a null pointer.
  const TensorView<const float> q0(nullptr, 4, 0, 16), k0(nullptr, 2, 0, 16);
  const TensorView<float> o0(nullptr, 4, 0, 16);
  EXPECT_NO_THROW(prefill(q0, k0, k0, o0, masks::causal(4, 0, 0)));
}

TEST(BadViews, OverlappingOutputStrides) {
  Prefill p;
  // Token stride 8 < head_dim 16: consecutive tokens share 8 elements.
  const TensorView<float> overlap(p.out.o.data(), 4, 40, 16, 40 * 16, 8, 1);
  EXPECT_INVALID("out", Parts<const char*>({"overlapping strides (head 640, token 8, dim 1)", "must not alias"}),
                 prefill(p.q.view(), p.k.view(), p.v.view(), overlap, p.mask));
  const TensorView<float> broadcast(p.out.o.data(), 4, 40, 16, 16, 0, 1);
  EXPECT_INVALID("out", Parts<const char*>({"overlapping strides", "must not alias"}),
                 decode(p.q.view(), p.k.view(), p.v.view(), broadcast));
  const TensorView<float> zero_dim_stride(p.out.o.data(), 4, 40, 16, 640, 16, 0);
  EXPECT_INVALID("out", Parts<const char*>({"stride_dim 0", "must be non-zero"}),
                 prefill(p.q.view(), p.k.view(), p.v.view(), zero_dim_stride, p.mask));
}

TEST(BadViews, InputsMayAliasAndUseAnyStrides) {
  // Inputs are only read: a query broadcast to every token (stride 0), K and V viewing one buffer
  // and negative strides are all legal. The library cannot check that raw pointers and strides
  // stay inside the caller's allocation: that is the caller's responsibility (docs/ROBUSTNESS.md).
  Prefill p;
  const TensorView<const float> q_bcast(p.q.data.data(), 4, 40, 16, 640, 0, 1);
  const TensorView<const float> kv_same(p.k.data.data(), 2, 40, 16);
  const TensorView<const float> k_rev(p.k.data.data() + 39 * 16, 2, 40, 16, 640, -16, 1);
  EXPECT_NO_THROW(prefill(q_bcast, kv_same, kv_same, p.out.view(), p.mask));
  EXPECT_NO_THROW(prefill(p.q.view(), k_rev, kv_same, p.out.view(), p.mask));
  for (index_t h = 0; h < 4; ++h)
    for (index_t i = 0; i < 40; ++i) EXPECT_TRUE(p.out.row_finite(h, i));
}

// =============================================================================================
// Options
// =============================================================================================

TEST(BadOptions, ScaleMustBeFiniteAndPositive) {
  Prefill p;
  for (float s : {0.0f, -0.5f, kInf, -kInf}) {
    AttentionOptions opt;
    opt.scale = s;
    EXPECT_INVALID("prefill", Parts<const char*>({"scale must be finite and > 0"}),
                   prefill(p.q.view(), p.k.view(), p.v.view(), p.out.view(), p.mask, opt));
    DecodeOptions dopt;
    dopt.scale = s;
    EXPECT_INVALID("decode", Parts<const char*>({"scale must be finite and > 0"}),
                   decode(p.q.view(), p.k.view(), p.v.view(), p.out.view(), KeySelection::all(), dopt));
  }
  AttentionOptions nan_scale;  // NaN is the documented default: 1 / sqrt(head_dim)
  nan_scale.scale = kNaN;
  EXPECT_NO_THROW(prefill(p.q.view(), p.k.view(), p.v.view(), p.out.view(), p.mask, nan_scale));
}

TEST(BadOptions, NegativeThreadCountEvenWithNothingToCompute) {
  Prefill p;
  AttentionOptions opt;
  opt.num_threads = -1;
  EXPECT_INVALID("prefill", Parts<const char*>({"num_threads must be >= 0", "got -1"}),
                 prefill(p.q.view(), p.k.view(), p.v.view(), p.out.view(), p.mask, opt));
  const Tensor q0(4, 0, 16, 1);
  Out o0(4, 0, 16);
  EXPECT_INVALID("prefill", Parts<const char*>({"num_threads must be >= 0"}),
                 prefill(q0.view(), p.k.view(), p.v.view(), o0.view(), masks::causal(4, 0, 40), opt));
  DecodeOptions dopt;
  dopt.num_threads = -3;
  EXPECT_INVALID("decode", Parts<const char*>({"num_threads must be >= 0", "got -3"}),
                 decode(q0.view(), p.k.view(), p.v.view(), o0.view(), KeySelection::all(), dopt));
  // Selections take the kernel's options (one AttentionOptions per call): the same check.
  AttentionOptions sopt;
  sopt.num_threads = -1;
  EXPECT_INVALID("options", Parts<const char*>({"num_threads must be >= 0", "got -1"}),
                 sm::BlockSparse{}.select(p.q.view(), p.k.view(), Budget::compression(10), sopt));
}

TEST(BadOptions, DecodeSplitBelowSixteen) {
  Prefill p;
  DecodeOptions opt;
  opt.split = 15;
  EXPECT_INVALID("decode", Parts<const char*>({"split must be >= 16", "got 15"}),
                 decode(p.q.view(), p.k.view(), p.v.view(), p.out.view(), KeySelection::all(), opt));
}

TEST(BadOptions, CompressionRatioBelowOneOrNotFinite) {
  // Every method takes how much to keep as a methods::Budget: a bad target CR (or mass target,
  // FlexPrefill's gamma) is rejected where the budget is made, with one message for every method.
  for (double cr : {0.5, 0.0, -2.0, static_cast<double>(kNaN), static_cast<double>(kInf)}) {
    SCOPED_TRACE("compression " + std::to_string(cr));
    EXPECT_INVALID("Budget::compression", Parts<const char*>({"a compression budget needs a finite target CR >= 1", "got"}),
                   Budget::compression(cr));
  }
  EXPECT_INVALID("Budget::compression", Parts<const char*>({"the CR tolerance must be in [0, 1)", "got 1.5"}),
                 Budget::compression(2.0, 1.5));
  for (double gamma : {static_cast<double>(kNaN), 0.0, -0.5, 1.5}) {
    SCOPED_TRACE("mass " + std::to_string(gamma));
    EXPECT_INVALID("Budget::mass", Parts<const char*>({"a mass budget needs p in (0, 1]", "got"}),
                   Budget::mass(gamma));
  }
  // A valid budget of a kind the method does not take: the method names itself and what it takes.
  Prefill p;
  kv::ContiguousCache<float> cache(cache_options(2, 16, 64));
  cache.append(p.k.view(), p.v.view());
  const Parts<const char*> no_count{"a count budget is not supported", "takes compression"};
  const Parts<const char*> no_mass{"a mass budget is not supported", "takes compression"};
  EXPECT_INVALID("methods::Dense::select", no_count, sm::Dense{}.select(p.q.view(), p.k.view(), Budget::count(4)));
  EXPECT_INVALID("methods::SlidingWindow::select", no_mass,
                 sm::SlidingWindow{}.select(p.q.view(), p.k.view(), Budget::mass(0.9)));
  EXPECT_INVALID("methods::FlexPrefill::select", Parts<const char*>({"a count budget is not supported"}),
                 sm::FlexPrefill{}.select(p.q.view(), p.k.view(), Budget::count(4)));
  // Vertical-Slash, block-sparse, Quest, SnapKV, XAttention and FlexPrefill take mass budgets
  // (tests in test_prefill_methods / test_decode_methods); these do not.
  EXPECT_INVALID("methods::AdaSnapKV::select", no_mass, sm::AdaSnapKV{}.select(p.q.view(), cache, Budget::mass(0.9)));
  sm::H2O::State st;
  EXPECT_INVALID("methods::H2O::State::reset", no_mass, st.reset(cache, Budget::mass(0.9)));
  EXPECT_INVALID("streaming", no_mass, sm::StreamingLLM{}.select(cache, Budget::mass(0.9)));
}

TEST(BadOptions, NegativeBudgets) {
  // Counts (tokens, blocks, pages, lines) are whole numbers >= 1, for every method alike.
  for (index_t n : {index_t{-16}, index_t{-1}, index_t{0}}) {
    const std::string got = "got " + std::to_string(n);
    EXPECT_INVALID("Budget::count", Parts<const char*>({"a count budget needs a whole number of units >= 1", got.c_str()}),
                   Budget::count(n));
  }
  // A count below what a method always keeps is no error but an unmet budget: the forced units
  // are kept and the result says reachable = false.
  Prefill p;
  // Vertical-Slash: 3 lines against 4 sink columns + 40 local offsets (all of n = 40).
  const auto vs = sm::VerticalSlashTiled{}.select(p.q.view(), p.k.view(), Budget::count(3));
  EXPECT_FALSE(vs.stats.reachable);
  EXPECT_EQ(vs.vertical, 4);
  EXPECT_EQ(vs.slash, 40);
  EXPECT_TRUE(sm::VerticalSlashTiled{}.select(p.q.view(), p.k.view(), Budget::count(44)).stats.reachable);
  // Block-sparse with blocks of 8: 1 block per row against up to 3 forced ones.
  const sm::BlockSparse bs{8};
  EXPECT_FALSE(bs.select(p.q.view(), p.k.view(), Budget::count(1)).stats.reachable);
  EXPECT_TRUE(bs.select(p.q.view(), p.k.view(), Budget::count(3)).stats.reachable);
  // SnapKV: 1 token per head against its 32-token window and 4 sinks.
  kv::ContiguousCache<float> cache(cache_options(2, 16, 64));
  cache.append(p.k.view(), p.v.view());
  const kv::EvictionPlan snap = sm::SnapKV{}.select(p.q.view(), cache, Budget::count(1));
  EXPECT_FALSE(snap.stats.reachable);
  EXPECT_EQ(snap.kept(0), 36);
  EXPECT_TRUE(sm::SnapKV{}.select(p.q.view(), cache, Budget::count(36)).stats.reachable);
}

// =============================================================================================
// Budgets larger than what exists clamp to dense
// =============================================================================================

TEST(Budgets, LargerThanTheCacheClampToDense) {
  const index_t n = 70, d = 16;
  const Tensor q(4, n, d, 11), k(2, n, d, 12), v(2, n, d, 13);
  kv::ContiguousCache<float> cache(cache_options(2, d, 128));
  cache.append(k.view(), v.view());
  const auto q1 = q.view().slice_tokens(n - 1, 1);
  Out dense(4, 1, d), sparse(4, 1, d);
  decode(q1, k.view(), v.view(), dense.view());
  // Quest: a budget of 10 000 tokens over a 70-token cache selects everything.
  sm::DecodeSelection plan;
  sm::QuestPages pages;
  sm::Quest{}.select(q1, cache, Budget::count(10000), {}, plan, &pages);
  EXPECT_TRUE(pages.dense);
  EXPECT_TRUE(plan.stats.reachable);
  EXPECT_DOUBLE_EQ(plan.stats.compression(), 1.0);
  decode(q1, cache, sparse.view(), plan.keys);
  for (std::size_t i = 0; i < dense.o.size(); ++i) EXPECT_NEAR(sparse.o[i], dense.o[i], 1e-5);
  // Eviction budgets >= the cache keep every token.
  EXPECT_TRUE(sm::SnapKV{}.select(q.view(), cache, Budget::count(1000)).dense);
  const kv::EvictionPlan ada = sm::AdaSnapKV{}.select(q.view(), cache, Budget::count(1000));
  EXPECT_TRUE(ada.dense);
  EXPECT_EQ(ada.total_kept(), 2 * n);
  sm::H2O::State st;
  st.reset(cache, Budget::count(1000));  // H + R = 500 + 500
  st.observe(q.view(), cache, {}, true);
  EXPECT_TRUE(st.select(cache).dense);
  EXPECT_TRUE(sm::StreamingLLM{}.select(cache, Budget::count(1000)).dense);
  // Prefill: k beyond the key blocks, V and S beyond n are exactly dense.
  const IntervalMask causal = masks::causal(4, n, n, 16);
  EXPECT_EQ(sm::BlockSparse{16}.select(q.view(), k.view(), Budget::count(1000)).mask.pairs(),
            causal.pairs());
  sm::VerticalSlash vs;  // V = S = 100 000 (an even split of the lines)
  vs.block = 16;
  EXPECT_EQ(vs.select(q.view(), k.view(), Budget::count(200000)).mask.pairs(), causal.pairs());
  sm::VerticalSlashTiled vst;
  vst.block = 16;
  EXPECT_EQ(vst.select(q.view(), k.view(), Budget::count(200000)).mask.pairs(), causal.pairs());
  sm::FlexPrefill fp;
  fp.block = 16;
  EXPECT_EQ(fp.select(q.view(), k.view(), Budget::mass(1.0)).mask.pairs(), causal.pairs());
  // Sliding window wider than the sequence is the dense pattern.
  EXPECT_EQ(masks::sliding_window(4, n, n, 1000, 4, 16).pairs(), causal.pairs());
}

// =============================================================================================
// Block and page sizes
// =============================================================================================

TEST(BadBlocks, ZeroBlockOrPageSize) {
  Prefill p;
  EXPECT_INVALID("IntervalMask", Parts<const char*>({"block sizes must be in [1, 2^31 - 1]", "block_q=0"}),
                 masks::causal(4, 40, 40, 0));
  EXPECT_INVALID("BlockListBuilder", Parts<const char*>({"block sizes must be in [1, 2^31 - 1]", "block_k=0"}),
                 BlockListBuilder(MaskShape{4, 40, 40, 16, 0, true}, false));
  EXPECT_INVALID("methods::BlockSparse::select", Parts<const char*>({"block must be >= 1", "got 0"}),
                 sm::BlockSparse{0}.select(p.q.view(), p.k.view(), Budget::compression(10)));
  sm::VerticalSlash vs;
  vs.block = 0;
  EXPECT_INVALID("methods::VerticalSlash::select", Parts<const char*>({"block must be >= 1"}),
                 vs.select(p.q.view(), p.k.view(), Budget::count(7096)));
  sm::FlexPrefill fp;
  fp.block = 0;
  EXPECT_INVALID("methods::FlexPrefill::select", Parts<const char*>({"block must be >= 1"}),
                 fp.select(p.q.view(), p.k.view(), Budget::mass(0.9)));
  sm::SlidingWindow sw;
  sw.block = 0;
  EXPECT_INVALID("methods::SlidingWindow::select", Parts<const char*>({"block must be >= 1"}),
                 sw.select(p.q.view(), p.k.view(), Budget::count(16)));
  EXPECT_INVALID("kv::Cache", Parts<const char*>({"page_size must be in [1, 2^31 - 1]", "got 0"}),
                 kv::ContiguousCache<float>(cache_options(2, 16, 64, 0)));
  EXPECT_INVALID("KeySelection::from_pages", Parts<const char*>({"page_size must be >= 1"}),
                 KeySelection::from_pages(KeySelection::Scope::per_kv_head, {{0}}, 0, 40));
}

TEST(BadBlocks, SizesThatDoNotDivideTheSequenceAreExact) {
  // No API requires a block or page size to divide n: the last block or page is partial.
  const index_t n = 77, d = 16;
  const Tensor q(2, n, d, 21), k(1, n, d, 22), v(1, n, d, 23);
  const double scale = 0.25;
  for (index_t b : {1, 7, 13, 64, 100}) {
    SCOPED_TRACE("block " + std::to_string(b));
    const IntervalMask m(MaskShape{2, n, n, b, b == 7 ? 13 : b, true}, 20, 3);
    Out out(2, n, d);
    prefill(q.view(), k.view(), v.view(), out.view(), m);
    const auto want = reference::attention_masked(q.view(), k.view(), v.view(), scale, m);
    for (std::size_t i = 0; i < out.o.size(); ++i) ASSERT_NEAR(out.o[i], want.out[i], 2e-5);
  }
  // A block larger than the sequence is one partial block (the kernel's scratch is sized by the
  // sequence, not the block); sizes past 2^31 - 1 are rejected.
  const index_t huge = (index_t{1} << 31) - 1;
  EXPECT_INVALID("IntervalMask", Parts<const char*>({"block sizes must be in [1, 2^31 - 1]"}),
                 IntervalMask(MaskShape{2, n, n, huge + 1, 64, true}, 0, 0));
  const IntervalMask one_block(MaskShape{2, n, n, huge, huge, true}, 0, 0);
  EXPECT_EQ(one_block.shape().num_q_blocks(), 1);
  Out big(2, n, d);
  prefill(q.view(), k.view(), v.view(), big.view(), one_block);
  const auto want = reference::attention_masked(q.view(), k.view(), v.view(), scale, one_block);
  for (std::size_t i = 0; i < big.o.size(); ++i) ASSERT_NEAR(big.o[i], want.out[i], 2e-5);
  kv::PagedCache<float> cache(cache_options(1, d, n, 9));  // 77 = 8 x 9 + 5
  cache.append(k.view(), v.view());
  const auto q1 = q.view().slice_tokens(n - 1, 1);
  const sm::DecodeSelection plan = sm::Quest{}.select(q1, cache, Budget::count(27));
  // Three whole pages plus the partial current page.
  EXPECT_EQ(kv::decode_stats(plan.keys, cache, q1.heads, q1.tokens).kv_rows, 3 * 9 + 5);
}

// =============================================================================================
// User block lists and key selections
// =============================================================================================

TEST(BadBlockLists, UnsortedDuplicateOutOfRangeOrFutureBlocks) {
  const MaskShape s{2, 128, 128, 32, 32, true};
  auto build = [&](std::vector<std::pair<index_t, index_t>> entries) {
    BlockListBuilder b(s, false);
    for (auto [qb, kb] : entries) b.add(0, qb, kb);
    return b.build();
  };
  EXPECT_INVALID("BlockListBuilder::build", Parts<const char*>({"query block 2", "strictly increasing (got 1 then 0)"}),
                 build({{2, 1}, {2, 0}}));
  EXPECT_INVALID("BlockListBuilder::build", Parts<const char*>({"strictly increasing (got 1 then 1)"}),
                 build({{2, 1}, {2, 1}}));
  EXPECT_INVALID("BlockListBuilder::build", Parts<const char*>({"key block 4 out of range [0, 4)"}),
                 build({{3, 4}}));
  EXPECT_INVALID("BlockListBuilder::build", Parts<const char*>({"key block 2", "may not list future blocks"}),
                 build({{1, 2}}));
  // A block index past int32 must not wrap to a valid one when the list is packed.
  EXPECT_INVALID("BlockListBuilder::build", Parts<const char*>({"key block 4294967297 out of range [0, 4)"}),
                 build({{3, (index_t{1} << 32) + 1}}));
  EXPECT_INVALID("BlockListBuilder::add", Parts<const char*>({"head 2 out of range"}),
                 BlockListBuilder(s, false).add(2, 0, 0));
  EXPECT_INVALID("BlockListBuilder::add", Parts<const char*>({"query block 4 out of range [0, 4)"}),
                 BlockListBuilder(s, false).add(0, 4, 0));
  // The same errors in an engine's block-CSR layout.
  auto bsr = [&](std::vector<index_t> off, std::vector<std::int32_t> col) {
    return sm::UserMask(MaskShape{1, 128, 128, 32, 32, true}, true, off, col).mask;
  };
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"must be sorted ascending"}),
                 bsr({0, 1, 2, 3, 5}, {0, 0, 1, 3, 2}));
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"repeats", "must be unique"}),
                 bsr({0, 1, 2, 3, 5}, {0, 0, 1, 2, 2}));
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"col_indices[3] = 7", "head 0, query block 3", "key block 7 out of range [0, 4)"}),
                 bsr({0, 1, 2, 3, 4}, {0, 0, 1, 7}));
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"a causal mask allows key blocks [0, 0]"}),
                 bsr({0, 1, 2, 3, 4}, {1, 0, 1, 2}));
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"row_offsets has 4 entries", "expected rows + 1 = 5"}),
                 bsr({0, 1, 2, 3}, {0, 0, 1}));
}

TEST(BadKeySelections, UnsortedDuplicateOutOfRangeOrWrongUnitCount) {
  Prefill p;
  const auto q1 = p.q.view().slice_tokens(39, 1);
  Out o1(4, 1, 16);
  using S = KeySelection::Scope;
  EXPECT_INVALID("KeySelection::from_tokens", Parts<const char*>({"unit 0", "strictly increasing (got 5 then 3)"}),
                 KeySelection::from_tokens(S::per_kv_head, {{5, 3}, {1}}));
  EXPECT_INVALID("KeySelection::from_tokens", Parts<const char*>({"strictly increasing (got 5 then 5)"}),
                 KeySelection::from_tokens(S::per_kv_head, {{5, 5}, {1}}));
  EXPECT_INVALID("KeySelection::from_pages", Parts<const char*>({"page 3 out of range [0, 3)"}),
                 KeySelection::from_pages(S::per_kv_head, {{3}, {0}}, 16, 40));
  EXPECT_INVALID("KeySelection::from_pages", Parts<const char*>({"out of range [0, 3)"}),  // p * P overflows
                 KeySelection::from_pages(S::per_kv_head, {{index_t{1} << 62}, {0}}, 16, 40));
  EXPECT_INVALID("KeySelection::from_pages", Parts<const char*>({"pages must be strictly increasing"}),
                 KeySelection::from_pages(S::per_kv_head, {{1, 0}, {0}}, 16, 40));
  const auto beyond = KeySelection::from_tokens(S::per_kv_head, {{39, 40}, {1}});
  EXPECT_INVALID("decode", Parts<const char*>({"range [39, 41)", "within [0, 40)"}),
                 decode(q1, p.k.view(), p.v.view(), o1.view(), beyond));
  EXPECT_INVALID("KeySelection::from_tokens", Parts<const char*>({"token -1 out of range", "[0, 2^63 - 1)"}),
                 KeySelection::from_tokens(S::per_kv_head, {{-1, 2}, {1}}));
  EXPECT_INVALID("KeySelection::from_ranges", Parts<const char*>({"range [3, 3)", "non-empty, sorted, disjoint"}),
                 KeySelection::from_ranges(S::per_kv_head, {{{0, 2}, {3, 3}}, {{1, 2}}}));
  const auto three_units = KeySelection::from_tokens(S::per_kv_head, {{0}, {1}, {2}});
  EXPECT_INVALID("decode", Parts<const char*>({"key selection has 3 lists but the call needs 2", "one per KV head"}),
                 decode(q1, p.k.view(), p.v.view(), o1.view(), three_units));
  const auto per_q = KeySelection::from_tokens(S::per_q_head, {{0}, {1}});
  EXPECT_INVALID("decode", Parts<const char*>({"needs 4 (one per query head)"}),
                 decode(q1, p.k.view(), p.v.view(), o1.view(), per_q));
}

// =============================================================================================
// KV cache
// =============================================================================================

template <class Cache>
void append_beyond_capacity_leaves_cache_intact() {
  const Tensor k(2, 50, 16, 31), v(2, 50, 16, 32);
  Cache cache(cache_options(2, 16, 60, 8));
  cache.append(k.view().slice_tokens(0, 45), v.view().slice_tokens(0, 45));
  const auto before_k = cache.keys();
  std::vector<float> snapshot;
  for (index_t h = 0; h < 2; ++h)
    for (index_t t = 0; t < 45; ++t)
      for (index_t c = 0; c < 16; ++c) snapshot.push_back(before_k(h, t, c));
  const index_t free_pages = cache.free_pages();
  const std::vector<float> bounds(cache.key_bounds(1, 5), cache.key_bounds(1, 5) + 32);
  EXPECT_INVALID("kv::Cache::append", Parts<const char*>({"appending 16 tokens to a head holding 45", "capacity of 60"}),
                 cache.append(k.view().slice_tokens(0, 16), v.view().slice_tokens(0, 16)));
  const Tensor k_bad(3, 1, 16, 33), v_bad(2, 1, 8, 34), v_short(2, 2, 16, 35);
  EXPECT_INVALID("kv::Cache::append", Parts<const char*>({"k and v need 2 heads, got 3 and 2"}),
                 cache.append(k_bad.view(), v.view().slice_tokens(0, 1)));
  EXPECT_INVALID("kv::Cache::append", Parts<const char*>({"k and v need dims 16 and 16, got 16 and 8"}),
                 cache.append(k.view().slice_tokens(0, 1), v_bad.view()));
  EXPECT_INVALID("kv::Cache::append", Parts<const char*>({"k has 1 tokens but v has 2"}),
                 cache.append(k.view().slice_tokens(0, 1), v_short.view()));
  // Nothing moved: lengths, positions, pages, contents and key bounds.
  EXPECT_EQ(cache.length(0), 45);
  EXPECT_EQ(cache.length(1), 45);
  EXPECT_EQ(cache.sequence_length(), 45);
  EXPECT_EQ(cache.free_pages(), free_pages);
  EXPECT_EQ(std::vector<float>(cache.key_bounds(1, 5), cache.key_bounds(1, 5) + 32), bounds);
  const auto after_k = cache.keys();
  std::size_t e = 0;
  for (index_t h = 0; h < 2; ++h)
    for (index_t t = 0; t < 45; ++t)
      for (index_t c = 0; c < 16; ++c) ASSERT_EQ(after_k(h, t, c), snapshot[e++]);
  // And it still works: the remaining 15 tokens fit.
  EXPECT_NO_THROW(cache.append(k.view().slice_tokens(45, 5), v.view().slice_tokens(45, 5)));
  EXPECT_EQ(cache.position(1, 49), 49);
}

TEST(KvCache, AppendBeyondCapacityOrMismatchedLeavesTheCacheIntact) {
  append_beyond_capacity_leaves_cache_intact<kv::ContiguousCache<float>>();
  append_beyond_capacity_leaves_cache_intact<kv::PagedCache<float>>();
}

TEST(KvCache, InvalidOptionsAndRetainArguments) {
  EXPECT_INVALID("kv::Cache", Parts<const char*>({"kv_heads must be >= 1", "got 0"}),
                 kv::ContiguousCache<float>(cache_options(0, 16, 64)));
  EXPECT_INVALID("kv::Cache", Parts<const char*>({"head_dim and value_dim must be >= 1"}),
                 kv::ContiguousCache<float>(cache_options(2, 0, 64)));
  EXPECT_INVALID("kv::Cache", Parts<const char*>({"capacity must be >= 1 token", "got 0"}),
                 kv::PagedCache<bf16>(cache_options(2, 16, 0)));
  const Tensor k(2, 20, 16, 41), v(2, 20, 16, 42);
  kv::PagedCache<float> cache(cache_options(2, 16, 32, 4));
  cache.append(k.view(), v.view());
  const std::vector<index_t> unsorted{3, 1}, beyond{0, 20};
  EXPECT_INVALID("kv::Cache::retain", Parts<const char*>({"strictly increasing within [0, 20)", "got 1 at 1"}),
                 cache.retain(0, unsorted.data(), 2));
  EXPECT_INVALID("kv::Cache::retain", Parts<const char*>({"within [0, 20)", "got 20 at 1"}),
                 cache.retain(0, beyond.data(), 2));
  EXPECT_INVALID("kv::Cache::retain", Parts<const char*>({"head 2 out of range [0, 2)"}),
                 cache.retain(2, unsorted.data(), 0));
  EXPECT_INVALID("kv::Cache::retain", Parts<const char*>({"need 2 keep lists (one per KV head), got 1"}),
                 cache.retain(std::vector<std::vector<index_t>>{{0}}));
  // A plan whose second list is bad must not leave the first head compacted.
  EXPECT_INVALID("kv::Cache::retain", Parts<const char*>({"head 1", "got 25 at 1"}),
                 cache.retain(std::vector<std::vector<index_t>>{{0, 5, 9}, {1, 25}}));
  EXPECT_EQ(cache.length(0), 20);  // rejected before anything moved
  EXPECT_EQ(cache.length(1), 20);
  EXPECT_EQ(cache.position(0, 19), 19);
  EXPECT_EQ(cache.free_pages(), 2 * 8 - 2 * 5);  // 32 / 4 pages per head, 5 in use
}

TEST(KvCache, UnevenCacheDecodeChecksTheWholeOutputBeforeWriting) {
  // Heads of different lengths run one kernel call per new token; an output of fewer than n_q
  // tokens (or of another head count) is refused before anything is written.
  const Tensor q(4, 3, 16, 61), k(2, 20, 16, 62), v(2, 20, 16, 63);
  kv::ContiguousCache<float> cache(cache_options(2, 16, 32));
  cache.append(k.view(), v.view());
  const std::vector<index_t> keep{0, 2, 4, 6, 8, 10, 12, 14, 16, 17, 18, 19};
  cache.retain(0, keep.data(), static_cast<index_t>(keep.size()));
  ASSERT_FALSE(cache.uniform());
  std::vector<float> small(4 * 2 * 16, 7.0f);
  EXPECT_INVALID("decode(q, cache)", Parts<const char*>({"out is [4, 2, 16]", "n_q=3"}),
                 decode(q.view(), cache, TensorView<float>(small.data(), 4, 2, 16)));
  EXPECT_TRUE(std::all_of(small.begin(), small.end(), [](float x) { return x == 7.0f; }));
  std::vector<float> ok(4 * 3 * 16, 7.0f);
  EXPECT_NO_THROW(decode(q.view(), cache, TensorView<float>(ok.data(), 4, 3, 16)));
}

TEST(BadMethodInputs, DecodeMethodsRejectInconsistentCachesAndQueries) {
  const Tensor q(4, 30, 16, 51), k(2, 30, 16, 52), v(2, 30, 16, 53), q8(4, 1, 8, 54);
  kv::CacheOptions no_bounds = cache_options(2, 16, 64);
  no_bounds.key_bounds = false;
  kv::ContiguousCache<float> plain(no_bounds), cache(cache_options(2, 16, 64));
  plain.append(k.view(), v.view());
  cache.append(k.view(), v.view());
  const Budget cr10 = Budget::compression(10);
  EXPECT_INVALID("methods::Quest::select", Parts<const char*>({"keeps no key bounds", "key_bounds = true"}),
                 sm::Quest{}.select(q.view().slice_tokens(29, 1), plain, cr10));
  EXPECT_INVALID("methods::Quest::select", Parts<const char*>({"head_dim of q (8) differs from the cache (16)"}),
                 sm::Quest{}.select(q8.view(), cache, cr10));
  EXPECT_INVALID("methods::Quest::select", Parts<const char*>({"q needs >= 1 token"}),
                 sm::Quest{}.select(q.view().slice_tokens(0, 0), cache, cr10));
  sm::SnapKV snap;
  snap.pool_kernel = 4;
  EXPECT_INVALID("methods::SnapKV::select", Parts<const char*>({"pool_kernel must be odd and >= 1", "got 4"}),
                 snap.select(q.view(), cache, cr10));
  snap.pool_kernel = 7;
  snap.window = 0;
  EXPECT_INVALID("methods::SnapKV::select", Parts<const char*>({"window must be >= 1"}),
                 snap.select(q.view(), cache, cr10));
  sm::AdaSnapKV ada;
  ada.floor_fraction = 1.5;
  EXPECT_INVALID("methods::AdaSnapKV::select", Parts<const char*>({"floor_fraction must be in [0, 1]", "got 1.5"}),
                 ada.select(q.view(), cache, cr10));
  sm::H2O::State st;
  EXPECT_INVALID("methods::H2O::State::observe", Parts<const char*>({"call reset(cache) first"}),
                 st.observe(q.view(), cache));
  // H2O's budget is H + R (R the larger half, so R >= 1 for every count >= 1); its parameter:
  EXPECT_INVALID("methods::H2O::State::reset", Parts<const char*>({"prefill_queries must be >= 0", "got -2"}),
                 st.reset(cache, Budget::count(8), -2));
  sm::StreamingLLM streaming;
  streaming.sinks = -1;
  EXPECT_INVALID("streaming", Parts<const char*>({"sinks must be >= 0", "got -1"}),
                 streaming.select(cache, Budget::count(16)));
}

// =============================================================================================
// Non-finite inputs: NaN propagates to exactly the rows that read it, never elsewhere
// =============================================================================================

namespace {

// Prefill of [1 head, 100 tokens, d 16] under a causal mask with 64-token tiles: row i reads
// q_i and the K/V rows of keys 0..i. Returns the output with LSE.
Out run_causal_prefill(const Tensor& q, const Tensor& k, const Tensor& v) {
  Out out(q.h, q.n, v.d);
  AttentionOptions opt;
  opt.lse = out.lse_view();
  prefill(q.view(), k.view(), v.view(), out.view(), masks::causal(q.h, q.n, k.n), opt);
  return out;
}

// Rows that read a bad value are all NaN (with NaN LSE, unless only V was bad); every other row
// has exactly the bits of the clean run.
void expect_poisoned(const Out& got, const Out& clean, const std::function<bool(index_t)>& reads,
                     bool value_only, index_t bad_dim = -1) {
  for (index_t i = 0; i < got.n; ++i) {
    SCOPED_TRACE("row " + std::to_string(i));
    if (!reads(i)) {
      EXPECT_TRUE(got.row_equal(clean, 0, i));
      EXPECT_EQ(got.lse[static_cast<std::size_t>(i)], clean.lse[static_cast<std::size_t>(i)]);
    } else if (value_only) {  // a bad V element: only its output dim, LSE untouched
      for (index_t c = 0; c < got.d; ++c)
        EXPECT_EQ(std::isfinite(got.at(0, i, c)), c != bad_dim) << "dim " << c;
      EXPECT_EQ(got.lse[static_cast<std::size_t>(i)], clean.lse[static_cast<std::size_t>(i)]);
    } else {
      EXPECT_TRUE(got.row_all_nan(0, i));
      EXPECT_TRUE(std::isnan(got.lse[static_cast<std::size_t>(i)]));
    }
  }
}

}  // namespace

TEST(NonFinite, NaNInAQueryPoisonsOnlyThatRow) {
  Tensor q(1, 100, 16, 61), k(1, 100, 16, 62), v(1, 100, 16, 63);
  const Out clean = run_causal_prefill(q, k, v);
  for (index_t row : {10, 70}) {  // inside a partial (diagonal) block and past the first tile
    Tensor qn = q;
    qn.at(0, row, 3) = kNaN;
    expect_poisoned(run_causal_prefill(qn, k, v), clean, [&](index_t i) { return i == row; }, false);
  }
}

TEST(NonFinite, NaNInAKeyPoisonsExactlyTheRowsThatSeeIt) {
  Tensor q(1, 100, 16, 61), k(1, 100, 16, 62), v(1, 100, 16, 63);
  const Out clean = run_causal_prefill(q, k, v);
  for (index_t key : {5, 80}) {
    Tensor kn = k;
    kn.at(0, key, 1) = kNaN;
    expect_poisoned(run_causal_prefill(q, kn, v), clean, [&](index_t i) { return i >= key; }, false);
  }
  // Sliding window: rows past the window do not read the key.
  Tensor kn = k;
  kn.at(0, 20, 0) = kNaN;
  Out base(1, 100, 16), got(1, 100, 16);
  AttentionOptions o1, o2;
  o1.lse = base.lse_view();
  o2.lse = got.lse_view();
  const IntervalMask w = masks::sliding_window(1, 100, 100, 16, 0, 64);
  prefill(q.view(), k.view(), v.view(), base.view(), w, o1);
  prefill(q.view(), kn.view(), v.view(), got.view(), w, o2);
  expect_poisoned(got, base, [](index_t i) { return i >= 20 && i < 36; }, false);
}

TEST(NonFinite, NaNOrInfInAValueReachesOnlyRowsThatSeeItsKey) {
  Tensor q(1, 100, 16, 61), k(1, 100, 16, 62), v(1, 100, 16, 63);
  const Out clean = run_causal_prefill(q, k, v);
  for (float bad : {kNaN, kInf, -kInf})
    for (index_t key : {20, 90}) {  // key 20: block 0 holds rows that may not see it
      SCOPED_TRACE("value " + std::to_string(bad) + " at key " + std::to_string(key));
      Tensor vn = v;
      vn.at(0, key, 5) = bad;
      expect_poisoned(run_causal_prefill(q, k, vn), clean, [&](index_t i) { return i >= key; },
                      true, 5);
    }
}

TEST(NonFinite, DecodePropagatesTheSameWay) {
  // Three new tokens (rows 0..2 at positions 97..99) over a 100-token cache, GQA group of 2.
  Tensor q(2, 3, 16, 71), k(1, 100, 16, 72), v(1, 100, 16, 73);
  auto run = [&](const Tensor& qq, const Tensor& kk, const Tensor& vv) {
    Out out(2, 3, 16);
    DecodeOptions opt;
    opt.lse = out.lse_view();
    opt.split = 32;
    decode(qq.view(), kk.view(), vv.view(), out.view(), KeySelection::all(), opt);
    return out;
  };
  const Out clean = run(q, k, v);
  auto check = [&](const Out& got, const std::function<bool(index_t, index_t)>& reads, bool value_only) {
    for (index_t h = 0; h < 2; ++h)
      for (index_t t = 0; t < 3; ++t) {
        SCOPED_TRACE("head " + std::to_string(h) + " token " + std::to_string(t));
        const float lse = got.lse[static_cast<std::size_t>(h * 3 + t)];
        const float lse0 = clean.lse[static_cast<std::size_t>(h * 3 + t)];
        if (!reads(h, t)) {
          EXPECT_TRUE(got.row_equal(clean, h, t));
          EXPECT_EQ(lse, lse0);
        } else {
          EXPECT_FALSE(got.row_finite(h, t));
          EXPECT_EQ(std::isnan(lse), !value_only);
        }
      }
  };
  Tensor qn = q;
  qn.at(1, 1, 0) = kNaN;  // head 1, token 1
  check(run(qn, k, v), [](index_t h, index_t t) { return h == 1 && t == 1; }, false);
  Tensor kn = k;
  kn.at(0, 40, 2) = kNaN;  // an old key: every row reads it
  check(run(q, kn, v), [](index_t, index_t) { return true; }, false);
  Tensor vn = v;
  vn.at(0, 99, 2) = kInf;  // the newest token: only token 2 sees it
  check(run(q, k, vn), [](index_t, index_t t) { return t == 2; }, true);
  Tensor kn2 = k;
  kn2.at(0, 98, 2) = kNaN;  // token 1's key: tokens 1 and 2 see it
  check(run(q, kn2, v), [](index_t, index_t t) { return t >= 1; }, false);
}

TEST(NonFinite, SelectionsOnNaNDataStillGiveValidMasks) {
  // Scores computed from NaN rank last; the masks stay legal and the kernels run.
  Tensor q(2, 200, 16, 81), k(1, 200, 16, 82), v(1, 200, 16, 83);
  q.at(1, 150, 0) = kNaN;
  k.at(0, 30, 4) = kNaN;
  auto run = [&](const auto& mask) {
    EXPECT_EQ(count_pairs(mask), mask.pairs());
    Out out(2, 200, 16);
    EXPECT_NO_THROW(prefill(q.view(), k.view(), v.view(), out.view(), mask));
    EXPECT_TRUE(out.row_finite(0, 10));  // before the bad key: untouched
  };
  const Budget cr3 = Budget::compression(3);
  run(sm::BlockSparse{16}.select(q.view(), k.view(), cr3).mask);
  sm::VerticalSlash vs;
  vs.block = 16;
  run(vs.select(q.view(), k.view(), cr3).mask);
  sm::VerticalSlashTiled vst;
  vst.block = 16;
  run(vst.select(q.view(), k.view(), cr3).mask);
  sm::FlexPrefill fp;
  fp.block = 16;
  fp.min_budget = 16;
  run(fp.select(q.view(), k.view(), Budget::mass(0.9)).mask);
  kv::ContiguousCache<float> cache(cache_options(1, 16, 256));
  cache.append(k.view(), v.view());
  EXPECT_NO_THROW(sm::Quest{}.select(q.view().slice_tokens(199, 1), cache, Budget::compression(4)));
  const kv::EvictionPlan plan = sm::SnapKV{}.select(q.view(), cache, Budget::compression(4));
  EXPECT_EQ(plan.kept(0), 50);  // ceil(200 / 4)
}

// =============================================================================================
// Long context: 64-bit counts and offsets, and running at n >= 65536
// =============================================================================================

TEST(LongContext, PairCountsPast2To31AreExactWithoutRunning) {
  const index_t n = 131072, dense = n * (n + 1) / 2;  // 8 590 000 128 > 2^31
  static_assert(sizeof(index_t) == 8);
  EXPECT_GT(dense, index_t{1} << 32);
  EXPECT_EQ(masks::causal(1, n, n).pairs(), dense);
  EXPECT_EQ(MaskShape({1, n, n, 64, 64, true}).dense_pairs(), dense);
  EXPECT_EQ(MaskShape({8, n, n, 64, 64, false}).dense_pairs(), 8 * n * n);
  EXPECT_DOUBLE_EQ(compression_ratio(dense, dense / 8), 8.0);
  // A block list of every causal block: CSR offsets and the counted pairs are 64-bit.
  BlockListBuilder b(MaskShape{1, n, n, 64, 64, true}, true);
  std::vector<index_t> row;
  for (index_t qb = 0; qb < n / 64; ++qb) {
    row.push_back(qb);
    b.set_row(0, qb, row);
  }
  const auto all = b.build();
  EXPECT_EQ(all.pairs(), dense);
  EXPECT_EQ(all.row_offsets().back(), (n / 64) * (n / 64 + 1) / 2);
  // Block-sparse's closed form at the dense budget, and with 4 blocks per row.
  const MaskShape s{1, n, n, 64, 64, true};
  EXPECT_EQ(sm::BlockSparse::pairs_for_k(s, n / 64), dense);
  EXPECT_EQ(sm::BlockSparse::pairs_for_k(MaskShape{32, n, n, 64, 64, true}, n / 64), 32 * dense);
  // k = 4: query block 0 keeps its diagonal (64 * 65 / 2 pairs), block 1 one more whole block,
  // block 2 two, every later one three whole blocks besides the diagonal.
  EXPECT_EQ(sm::BlockSparse::pairs_for_k(s, 4), 2080 + 6176 + 10272 + (n / 64 - 3) * 14368);
}

TEST(LongContext, SlidingWindowPrefillAt65536Tokens) {
  const index_t n = 65536, d = 16, W = 64;
  const Tensor q(1, n, d, 91), k(1, n, d, 92), v(1, n, d, 93);
  const IntervalMask mask = masks::sliding_window(1, n, n, W, 0, 64);
  EXPECT_EQ(mask.pairs(), W * (W + 1) / 2 + (n - W) * W);
  Out out(1, n, d);
  AttentionOptions opt;
  opt.lse = out.lse_view();
  prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
  for (index_t i : {index_t{0}, index_t{63}, index_t{64}, index_t{40000}, n - 1}) {  // naive check
    SCOPED_TRACE("row " + std::to_string(i));
    const index_t j0 = std::max<index_t>(0, i - W + 1);
    std::vector<double> s;
    double mx = -1e300, sum = 0;
    for (index_t j = j0; j <= i; ++j) {
      double dot = 0;
      for (index_t c = 0; c < d; ++c) dot += double{q.data[static_cast<std::size_t>(i * d + c)]} * double{k.data[static_cast<std::size_t>(j * d + c)]};
      s.push_back(dot * 0.25);
      mx = std::max(mx, s.back());
    }
    for (double& x : s) sum += (x = std::exp(x - mx));
    for (index_t c = 0; c < d; ++c) {
      double o = 0;
      for (index_t j = j0; j <= i; ++j)
        o += s[static_cast<std::size_t>(j - j0)] / sum * double{v.data[static_cast<std::size_t>(j * d + c)]};
      EXPECT_NEAR(out.at(0, i, c), o, 2e-5);
    }
    EXPECT_NEAR(out.lse[static_cast<std::size_t>(i)], mx + std::log(sum), 2e-5 * (1 + std::abs(mx)));
  }
}

TEST(LongContext, DecodeOverA131072TokenCache) {
  const index_t n = 131072, d = 16;
  const Tensor q(2, 1, d, 94), k(1, n, d, 95), v(1, n, d, 96);
  kv::ContiguousCache<bf16> cache(cache_options(1, d, n, 16));
  cache.append(k.view(), v.view());
  EXPECT_EQ(cache.num_pages(0), n / 16);
  const sm::DecodeSelection plan = sm::Quest{}.select(q.view(), cache, Budget::compression(64));
  EXPECT_EQ(plan.stats.dense_pairs, 2 * n);
  EXPECT_NEAR(plan.stats.compression(), 64.0, 1.0);
  EXPECT_TRUE(plan.stats.reachable);
  for (const KeySelection& keys : {KeySelection::all(), plan.keys}) {
    Out out(2, 1, d);
    decode(q.view(), cache, out.view(), keys);
    // Naive check over the selected keys (K/V as stored, bf16).
    const auto kc = cache.keys(), vc = cache.values();
    std::vector<std::uint8_t> sel(static_cast<std::size_t>(n), keys.scope() == KeySelection::Scope::all);
    if (keys.scope() != KeySelection::Scope::all)
      for (const KeyRange* r = keys.ranges_begin(0); r != keys.ranges_end(0); ++r)
        for (index_t j = r->begin; j < r->end; ++j) sel[static_cast<std::size_t>(j)] = 1;
    for (index_t h = 0; h < 2; ++h) {
      double mx = -1e300, sum = 0;
      std::vector<double> s(static_cast<std::size_t>(n), 0.0), o(static_cast<std::size_t>(d), 0.0);
      for (index_t j = 0; j < n; ++j) {
        if (!sel[static_cast<std::size_t>(j)]) continue;
        double dot = 0;
        for (index_t c = 0; c < d; ++c) dot += double{q.data[static_cast<std::size_t>(h * d + c)]} * double{to_float(kc(0, j, c))};
        s[static_cast<std::size_t>(j)] = dot * 0.25;
        mx = std::max(mx, dot * 0.25);
      }
      for (index_t j = 0; j < n; ++j) {
        if (!sel[static_cast<std::size_t>(j)]) continue;
        const double p = std::exp(s[static_cast<std::size_t>(j)] - mx);
        sum += p;
        for (index_t c = 0; c < d; ++c) o[static_cast<std::size_t>(c)] += p * double{to_float(vc(0, j, c))};
      }
      for (index_t c = 0; c < d; ++c) EXPECT_NEAR(out.at(h, 0, c), o[static_cast<std::size_t>(c)] / sum, 2e-5);
    }
  }
}

// =============================================================================================
// Determinism: same bits for 1..4 threads and on repeated runs, selection + kernel
// =============================================================================================

namespace {

// Runs f(threads) for threads 1..4, twice each; every result must equal the first bit for bit.
template <class F>
void expect_same_bits_for_threads(F&& f) {
  const auto first = f(1);
  for (int rep = 0; rep < 2; ++rep)
    for (int t = 1; t <= 4; ++t) {
      const auto again = f(t);
      ASSERT_EQ(again.size(), first.size());
      EXPECT_EQ(std::memcmp(again.data(), first.data(), sizeof(first[0]) * first.size()), 0)
          << "threads=" << t << " repetition " << rep;
    }
}

// A prefill problem with structure to select from: GQA 4:2, n = 300, d = 32, planted columns.
struct Det {
  Tensor q{4, 300, 32, 101}, k{2, 300, 32, 102}, v{2, 300, 32, 103};
  Det() {
    for (index_t h = 0; h < 2; ++h)
      for (index_t c = 0; c < 32; ++c) k.at(h, 77, c) += 2.0f * q.at(2 * h, 299, c);
  }
  // Output bits (and the mask's own arrays, appended as floats' bit patterns) of one run.
  template <class Mask>
  std::vector<float> run(const Mask& mask, int threads) const {
    Out out(4, 300, 32);
    AttentionOptions opt;
    opt.num_threads = threads;
    opt.lse = out.lse_view();
    prefill(q.view(), k.view(), v.view(), out.view(), mask, opt);
    out.o.insert(out.o.end(), out.lse.begin(), out.lse.end());
    return out.o;
  }
  template <class Mask>
  std::vector<float> run_with_csr(const Mask& mask, int threads) const {
    std::vector<float> r = run(mask, threads);
    for (std::int64_t x : csr_of(mask)) r.push_back(static_cast<float>(x));
    return r;
  }
};

}  // namespace

TEST(Determinism, PrefillDenseAndSlidingWindow) {
  const Det p;
  expect_same_bits_for_threads([&](int t) { return p.run(masks::causal(4, 300, 300), t); });
  expect_same_bits_for_threads([&](int t) {
    return p.run(masks::sliding_window(4, 300, 300, 50, 4, 64), t);
  });
}

TEST(Determinism, PrefillBlockSparse) {
  const Det p;
  expect_same_bits_for_threads([&](int t) {
    AttentionOptions o;
    o.num_threads = t;
    return p.run_with_csr(
        sm::BlockSparse{32}.select(p.q.view(), p.k.view(), Budget::compression(3), o).mask, t);
  });
}

TEST(Determinism, PrefillVerticalSlashExactAndTiled) {
  const Det p;
  sm::VerticalSlash exact;
  exact.block = 32;
  exact.local_offsets = 16;
  sm::VerticalSlashTiled tiled;
  tiled.block = 32;
  tiled.local_offsets = 16;
  AttentionOptions o;
  expect_same_bits_for_threads([&](int t) {
    o.num_threads = t;
    return p.run_with_csr(exact.select(p.q.view(), p.k.view(), Budget::compression(3), o).mask, t);
  });
  expect_same_bits_for_threads([&](int t) {
    o.num_threads = t;
    return p.run_with_csr(tiled.select(p.q.view(), p.k.view(), Budget::compression(3), o).mask, t);
  });
}

TEST(Determinism, PrefillFlexPrefill) {
  const Det p;
  expect_same_bits_for_threads([&](int t) {
    sm::FlexPrefill fp;
    fp.block = 32;
    fp.min_budget = 32;
    fp.last_queries = 64;
    AttentionOptions o;
    o.num_threads = t;
    const auto m = fp.select(p.q.view(), p.k.view(), Budget::mass(0.9), o);
    std::vector<float> r = p.run_with_csr(m.mask, t);
    r.insert(r.end(), m.js_distance.begin(), m.js_distance.end());
    return r;
  });
}

TEST(Determinism, PrefillUserMask) {
  const Det p;
  // Per-head causal block-CSR (block 32 -> 10 query x 10 key blocks): each row keeps the diagonal
  // and a pseudo-random subset of the earlier blocks; full flags on for every other head.
  const index_t nb = 10;
  std::vector<index_t> off{0};
  std::vector<std::int32_t> col;
  std::vector<std::uint8_t> full;
  std::uint32_t state = 12345;
  for (index_t h = 0; h < 4; ++h)
    for (index_t qb = 0; qb < nb; ++qb) {
      for (index_t kb = 0; kb <= qb; ++kb) {
        state = state * 1664525u + 1013904223u;
        if (kb == qb || (state >> 28) < 7) {
          col.push_back(static_cast<std::int32_t>(kb));
          full.push_back(h % 2 == 0 && kb < qb ? 1 : 0);
        }
      }
      off.push_back(static_cast<index_t>(col.size()));
    }
  const MaskShape shape{4, 300, 300, 32, 32, true};
  for (bool flags : {false, true}) {
    SCOPED_TRACE(flags ? "with full flags" : "without full flags");
    const auto mask =
        sm::UserMask(shape, false, off, col, flags ? full : std::vector<std::uint8_t>{}).mask;
    ASSERT_GT(mask.compression(), 1.2);
    expect_same_bits_for_threads([&](int t) { return p.run_with_csr(mask, t); });
  }
}

namespace {

using SessionCache = kv::PagedCache<bf16>;

// The decode methods of a session, each at its compression target: an eviction method (or none)
// and Quest's per-step selection (or dense decode). Policies hold per-sequence state, so every
// session gets its own, made by add_to().
enum class Evict { none, snapkv, ada_snapkv, h2o, streaming };
struct SessionMethods {
  Evict eviction = Evict::none;
  double eviction_cr = 4;
  bool quest = false;
  bool quest_per_query_head = false;
  double quest_cr = 4;

  void add_to(DecodeSession<SessionCache>& s) const {
    const Budget ecr = Budget::compression(eviction_cr);
    switch (eviction) {  // evicting policies first, then the selecting one
      case Evict::snapkv: s.add_policy(sm::make_policy<SessionCache, float>(sm::SnapKV{}, ecr)); break;
      case Evict::ada_snapkv: s.add_policy(sm::make_policy<SessionCache, float>(sm::AdaSnapKV{}, ecr)); break;
      case Evict::h2o: s.add_policy(sm::make_policy<SessionCache, float>(sm::H2O{}, ecr)); break;
      case Evict::streaming: s.add_policy(sm::make_policy<SessionCache, float>(sm::StreamingLLM{}, ecr)); break;
      case Evict::none: break;
    }
    if (quest) {
      sm::Quest m;
      m.per_query_head = quest_per_query_head;
      s.add_policy(sm::make_policy<SessionCache, float>(m, Budget::compression(quest_cr)));
    }
  }
};

// Decode pipeline with `methods` under `session options`: prompt of 200 tokens (eviction after
// it), then 6 single-token steps. Returns every step's output bits plus the kept positions.
std::vector<float> decode_run(const SessionMethods& methods, SessionOptions so, int threads) {
  const index_t n = 206, d = 32;
  const Tensor q(4, n, d, 111), k(2, n, d, 112), v(2, n, d, 113);
  so.num_threads = threads;
  SessionCache cache(cache_options(2, d, 256, 16));
  DecodeSession<SessionCache> s(cache, so);
  methods.add_to(s);
  std::vector<float> bits;
  Out prompt_out(4, 200, d);
  s.prefill(q.view().slice_tokens(0, 200), k.view().slice_tokens(0, 200),
            v.view().slice_tokens(0, 200), prompt_out.view(), masks::causal(4, 200, 200));
  for (index_t t = 200; t < n; ++t) {
    Out out(4, 1, d);
    s.step(q.view().slice_tokens(t, 1), k.view().slice_tokens(t, 1), v.view().slice_tokens(t, 1),
           out.view());
    bits.insert(bits.end(), out.o.begin(), out.o.end());
    for (index_t h = 0; h < 2; ++h)
      for (index_t i = 0; i < cache.length(h); ++i) bits.push_back(static_cast<float>(cache.position(h, i)));
  }
  return bits;
}

}  // namespace

TEST(Determinism, DecodeDenseAndQuest) {
  const SessionOptions so;
  SessionMethods m;
  expect_same_bits_for_threads([&](int t) { return decode_run(m, so, t); });
  m.quest = true;
  m.quest_cr = 4;
  expect_same_bits_for_threads([&](int t) { return decode_run(m, so, t); });
  m.quest_per_query_head = true;
  expect_same_bits_for_threads([&](int t) { return decode_run(m, so, t); });
}

TEST(Determinism, DecodeSlidingWindowWithSinksOnTheKernel) {
  // Sinks + window as key ranges per KV head (2 KV heads, GQA 2), 3 new tokens, small split so
  // several chunks are merged; fp32 K/V, and bf16 K/V with bf16 products (vdpbf16ps where the CPU
  // has it, else emulated).
  const Tensor q(4, 3, 64, 121), k(2, 700, 64, 122), v(2, 700, 64, 123);
  const std::vector<bf16> k16(k.data.begin(), k.data.end()), v16(v.data.begin(), v.data.end());
  const TensorView<const bf16> kb(k16.data(), 2, 700, 64), vb(v16.data(), 2, 700, 64);
  const auto keys = KeySelection::from_ranges(KeySelection::Scope::per_kv_head,
                                              {{{0, 4}, {500, 700}}, {{0, 4}, {451, 700}}});
  for (bool bf16_products : {false, true}) {
    expect_same_bits_for_threads([&](int t) {
      Out out(4, 3, 64);
      DecodeOptions o;
      o.num_threads = t;
      o.split = 32;
      o.precision = bf16_products ? Precision::bfloat16 : Precision::float32;
      o.lse = out.lse_view();
      if (bf16_products)
        decode(q.view(), kb, vb, out.view(), keys, o);
      else
        decode(q.view(), k.view(), v.view(), out.view(), keys, o);
      out.o.insert(out.o.end(), out.lse.begin(), out.lse.end());
      return out.o;
    });
  }
}

TEST(Determinism, DecodeEvictionSnapKVAdaSnapKVH2OStreaming) {
  for (Evict e : {Evict::snapkv, Evict::ada_snapkv, Evict::h2o, Evict::streaming}) {
    SCOPED_TRACE("eviction " + std::to_string(static_cast<int>(e)));
    const SessionOptions so;
    SessionMethods m;
    m.eviction = e;
    m.eviction_cr = 4;
    expect_same_bits_for_threads([&](int t) { return decode_run(m, so, t); });
  }
}

// =============================================================================================
// Executors: an engine's own threads give the same bits; failures reach the caller intact
// =============================================================================================

namespace {

// A team of std::threads per run(): items are taken from a shared counter, so which worker runs
// which item changes from run to run.
class ThreadTeamExecutor final : public Executor {
 public:
  explicit ThreadTeamExecutor(int threads) : threads_(threads) {}
  int concurrency() const noexcept override { return threads_; }
  void run(index_t n, ItemFunction body) override {
    std::atomic<index_t> next{0};
    auto work = [&](int worker) {
      for (index_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i, worker);
    };
    std::vector<std::thread> team;
    for (int w = 1; w < threads_; ++w) team.emplace_back(work, w);
    work(0);
    for (std::thread& t : team) t.join();
  }

 private:
  int threads_;
};

// Runs the items on the calling thread from last to first, cycling through its worker ids, so
// every per-worker buffer is used and no loop runs in index order.
class ReversedExecutor final : public Executor {
 public:
  explicit ReversedExecutor(int workers) : workers_(workers) {}
  int concurrency() const noexcept override { return workers_; }
  void run(index_t n, ItemFunction body) override {
    for (index_t i = n - 1; i >= 0; --i) body(i, static_cast<int>(i % workers_));
  }

 private:
  int workers_;
};

// Broken executors: no workers at all, or a worker id equal to concurrency() for the last item.
class ZeroConcurrencyExecutor final : public Executor {
 public:
  int concurrency() const noexcept override { return 0; }
  void run(index_t n, ItemFunction body) override {
    for (index_t i = 0; i < n; ++i) body(i, 0);
  }
};
class BadWorkerIdExecutor final : public Executor {
 public:
  int concurrency() const noexcept override { return 2; }
  void run(index_t n, ItemFunction body) override {
    for (index_t i = 0; i < n; ++i) body(i, i == n - 1 ? 2 : static_cast<int>(i % 2));
  }
};

template <class T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  EXPECT_EQ(std::memcmp(got.data(), want.data(), sizeof(T) * want.size()), 0) << what;
}

// Everything a cache shows: sequence length, free pages, and per head its length, positions, K
// and V rows and the key bounds of its pages (as floats: exact for every storage type).
template <class Cache>
std::vector<float> cache_state(const Cache& c) {
  std::vector<float> s{static_cast<float>(c.sequence_length()), static_cast<float>(c.free_pages())};
  const auto keys = c.keys();
  const auto values = c.values();
  for (index_t h = 0; h < c.kv_heads(); ++h) {
    s.push_back(static_cast<float>(c.length(h)));
    for (index_t i = 0; i < c.length(h); ++i) {
      s.push_back(static_cast<float>(c.position(h, i)));
      for (index_t x = 0; x < c.head_dim(); ++x) s.push_back(to_float(keys(h, i, x)));
      for (index_t x = 0; x < c.value_dim(); ++x) s.push_back(to_float(values(h, i, x)));
    }
    for (index_t p = 0; c.has_key_bounds() && p < c.num_pages(h); ++p)
      for (index_t x = 0; x < 2 * c.head_dim(); ++x) s.push_back(to_float(c.key_bounds(h, p)[x]));
  }
  return s;
}

// A key selection's scope and ranges, flattened.
std::vector<index_t> selection_of(const KeySelection& keys) {
  std::vector<index_t> r{static_cast<index_t>(keys.scope())};
  if (keys.scope() == KeySelection::Scope::all) return r;
  for (index_t u = 0; u < keys.units(); ++u) {
    r.push_back(-1);
    for (const KeyRange* x = keys.ranges_begin(u); x != keys.ranges_end(u); ++x) {
      r.push_back(x->begin);
      r.push_back(x->end);
    }
  }
  return r;
}

std::vector<index_t> keep_of(const kv::EvictionPlan& plan) {
  std::vector<index_t> r;
  for (const auto& k : plan.keep) {
    r.push_back(-1);
    r.insert(r.end(), k.begin(), k.end());
  }
  return r;
}

struct SelectorFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A decode policy that evicts nothing and selects every key, and fails when told to: in
// after_prefill, in after_step (after the kernel), or in before_step inside its own parallel loop
// on the session's executor (item 5 of 8 throws).
template <class Cache>
class FailingPolicy final : public sm::DecodePolicy<Cache, float> {
 public:
  using QView = TensorView<const float>;
  bool fail_prefill = false, fail_select = false, fail_step = false;
  FailingPolicy() : sm::DecodePolicy<Cache, float>(Budget{}) {}
  const char* name() const override { return "failing"; }
  void after_prefill(const QView&, Cache&, const AttentionOptions&) override {
    if (fail_prefill) throw SelectorFailure("after_prefill");
  }
  KeySelection before_step(const QView&, Cache&, const AttentionOptions& opt) override {
    if (fail_select) {
      if (opt.executor == nullptr) throw std::logic_error("the session passed no executor");
      run_items(*opt.executor, 8, [](index_t i, int) {
        if (i == 5) throw SelectorFailure("selector item 5");
      });
    }
    return KeySelection::all();
  }
  void after_step(const QView&, Cache&, const AttentionOptions&, const float*) override {
    if (fail_step) throw SelectorFailure("after_step");
  }
};

}  // namespace

TEST(Executors, CustomExecutorsGiveTheDefaultBitsForPrefillSelections) {
  const Det p;
  ThreadTeamExecutor team(3);
  ReversedExecutor reversed(5);
  const sm::BlockSparse bs{32};
  const Budget k5 = Budget::count(5);  // 2 blocks beyond the forced 3 are ranked by score for most rows
  sm::VerticalSlash vs;
  vs.block = 32;
  vs.local_offsets = 16;
  sm::VerticalSlashTiled vst;
  vst.block = 32;
  vst.local_offsets = 16;
  const Budget cr3 = Budget::compression(3);
  sm::FlexPrefill fp;
  fp.block = 32;
  fp.min_budget = 32;
  fp.last_queries = 64;
  fp.tau = 0.19;  // between the heads' JS distances: some heads query-aware, some not
  const Budget gamma = Budget::mass(0.8);
  AttentionOptions o;  // the selections' options: the executor under test (none: the default)
  auto flex_bits = [&] {
    const auto m = fp.select(p.q.view(), p.k.view(), gamma, o);
    std::vector<float> r = p.run_with_csr(m.mask, 0);
    r.insert(r.end(), m.js_distance.begin(), m.js_distance.end());
    for (index_t h = 0; h < 4; ++h) {
      r.push_back(m.query_aware[static_cast<std::size_t>(h)]);
      r.push_back(static_cast<float>(m.vertical_blocks[static_cast<std::size_t>(h)]));
      r.push_back(static_cast<float>(m.slash_blocks[static_cast<std::size_t>(h)]));
    }
    return r;
  };
  const auto bs_bits = p.run_with_csr(bs.select(p.q.view(), p.k.view(), k5).mask, 0);
  const auto vs_exact = p.run_with_csr(vs.select(p.q.view(), p.k.view(), cr3).mask, 0);
  const auto vs_tiled = p.run_with_csr(vst.select(p.q.view(), p.k.view(), cr3).mask, 0);
  const auto flex = flex_bits();
  const auto aware = fp.select(p.q.view(), p.k.view(), gamma).query_aware;
  const int aware_heads = std::count(aware.begin(), aware.end(), 1);
  ASSERT_TRUE(aware_heads > 0 && aware_heads < 4) << aware_heads << " query-aware heads";
  for (Executor* ex : {static_cast<Executor*>(&team), static_cast<Executor*>(&reversed)}) {
    SCOPED_TRACE(ex == &team ? "std::thread team" : "reversed order");
    o.executor = ex;
    expect_same_bits(p.run_with_csr(bs.select(p.q.view(), p.k.view(), k5, o).mask, 0), bs_bits,
                     "block_sparse");
    expect_same_bits(p.run_with_csr(vs.select(p.q.view(), p.k.view(), cr3, o).mask, 0), vs_exact,
                     "vertical_slash exact");
    expect_same_bits(p.run_with_csr(vst.select(p.q.view(), p.k.view(), cr3, o).mask, 0), vs_tiled,
                     "vertical_slash tiled");
    expect_same_bits(flex_bits(), flex, "flex_prefill");
    // The float64 oracle on the mask selected on this executor, and the pair count on it.
    const auto mask = bs.select(p.q.view(), p.k.view(), k5, o).mask;
    EXPECT_EQ(count_pairs(mask, *ex), mask.pairs());
    const auto oracle = reference::attention_masked(p.q.view(), p.k.view(), p.v.view(),
                                                    1.0 / std::sqrt(32.0), mask, {ex});
    const auto oracle_default = reference::attention_masked(p.q.view(), p.k.view(), p.v.view(),
                                                            1.0 / std::sqrt(32.0), mask);
    expect_same_bits(oracle.out, oracle_default.out, "oracle");
  }
}

TEST(Executors, CustomExecutorsGiveTheDefaultBitsForDecodeMethods) {
  ThreadTeamExecutor team(3);
  ReversedExecutor reversed(4);
  // Quest's page bounds run in parallel from 4096 (unit, page) pairs: 2 KV heads x 2100 pages of
  // 1 token. The cache is filled by one parallel append.
  const index_t n = 2100, d = 16;
  const Tensor q(4, 40, d, 141), k(2, n, d, 142), v(2, n, d, 143);
  kv::ContiguousCache<float> base(cache_options(2, d, n, 1));
  base.append(k.view(), v.view());
  const std::vector<float> base_state = cache_state(base);
  const Budget quest_cr = Budget::compression(8), snap_cr = Budget::compression(6),
               h2o_cr = Budget::compression(5);
  AttentionOptions o;  // the methods' options: the executor under test (none: the default)
  const auto q1 = q.view().slice_tokens(39, 1);
  auto quest_bits = [&](const kv::ContiguousCache<float>& c, bool per_q) {
    sm::Quest m;
    m.per_query_head = per_q;
    sm::DecodeSelection plan;
    sm::QuestPages pages;
    m.select(q1, c, quest_cr, o, plan, &pages);
    std::vector<float> r = pages.bounds;
    for (index_t x : selection_of(plan.keys)) r.push_back(static_cast<float>(x));
    return r;
  };
  auto h2o_bits = [&](const kv::ContiguousCache<float>& c) {
    sm::H2O::State st;
    st.reset(c, h2o_cr);
    st.observe(q.view(), c, o, true);  // 40 rows x 2 heads per group: the tiled column scores
    std::vector<float> r;
    for (index_t h = 0; h < 2; ++h) r.insert(r.end(), st.scores(h), st.scores(h) + n);
    st.observe(q1, c, o);  // one row: the direct path
    for (index_t h = 0; h < 2; ++h) r.insert(r.end(), st.scores(h), st.scores(h) + n);
    for (index_t x : keep_of(st.select(c))) r.push_back(static_cast<float>(x));
    return r;
  };
  const auto quest_kv = quest_bits(base, false), quest_q = quest_bits(base, true);
  const kv::EvictionPlan snap = sm::SnapKV{}.select(q.view(), base, snap_cr, o);
  const kv::EvictionPlan ada = sm::AdaSnapKV{}.select(q.view(), base, snap_cr, o);
  const auto h2o = h2o_bits(base);
  for (Executor* ex : {static_cast<Executor*>(&team), static_cast<Executor*>(&reversed)}) {
    SCOPED_TRACE(ex == &team ? "std::thread team" : "reversed order");
    kv::ContiguousCache<float> c(cache_options(2, d, n, 1));
    c.append(k.view(), v.view(), {ex});
    expect_same_bits(cache_state(c), base_state, "cache append");
    o.executor = ex;
    expect_same_bits(quest_bits(c, false), quest_kv, "quest per KV head");
    expect_same_bits(quest_bits(c, true), quest_q, "quest per query head");
    const kv::EvictionPlan s = sm::SnapKV{}.select(q.view(), c, snap_cr, o);
    expect_same_bits(s.scores, snap.scores, "snapkv scores");
    EXPECT_EQ(keep_of(s), keep_of(snap));
    const kv::EvictionPlan a = sm::AdaSnapKV{}.select(q.view(), c, snap_cr, o);
    expect_same_bits(a.scores, ada.scores, "ada_snapkv scores");
    EXPECT_EQ(keep_of(a), keep_of(ada));
    expect_same_bits(h2o_bits(c), h2o, "h2o");
  }
  ASSERT_FALSE(snap.dense);
  ASSERT_LT(ada.total_kept(), 2 * n);
}

TEST(Executors, ACustomExecutorInTheSessionGivesTheDefaultBits) {
  ThreadTeamExecutor team(3);
  ReversedExecutor reversed(4);
  SessionOptions so;
  SessionMethods m;
  m.quest = true;
  m.quest_cr = 4;
  for (Evict e : {Evict::none, Evict::snapkv, Evict::ada_snapkv, Evict::h2o, Evict::streaming}) {
    SCOPED_TRACE("eviction " + std::to_string(static_cast<int>(e)));
    m.eviction = e;
    m.eviction_cr = 4;
    so.executor = nullptr;
    const std::vector<float> want = decode_run(m, so, 0);
    for (Executor* ex : {static_cast<Executor*>(&team), static_cast<Executor*>(&reversed)}) {
      so.executor = ex;
      expect_same_bits(decode_run(m, so, 0), want, ex == &team ? "std::thread team" : "reversed");
    }
  }
}

TEST(Executors, AThrowingSelectorOrPolicyLeavesTheCacheAndTheOutputUnchanged) {
  using Cache = kv::PagedCache<bf16>;
  const index_t n = 104, d = 32, prompt = 100;
  const Tensor q(4, n, d, 151), k(2, n, d, 152), v(2, n, d, 153);
  ThreadTeamExecutor team(3);
  SessionOptions so;
  so.executor = &team;
  // Policies: the failing one (evicts nothing), then Quest's selection at CR 3.
  auto add_quest = [](DecodeSession<Cache>& s) {
    s.add_policy(sm::make_policy<Cache, float>(sm::Quest{}, Budget::compression(3)));
  };
  auto step_token = [&](DecodeSession<Cache>& s, index_t t, Out& out) {
    return s.step(q.view().slice_tokens(t, 1), k.view().slice_tokens(t, 1),
                  v.view().slice_tokens(t, 1), out.view());
  };
  auto start = [&](DecodeSession<Cache>& s) {
    Out prompt_out(4, prompt, d);
    s.prefill(q.view().slice_tokens(0, prompt), k.view().slice_tokens(0, prompt),
              v.view().slice_tokens(0, prompt), prompt_out.view(), masks::causal(4, prompt, prompt));
    Out out(4, 1, d);
    step_token(s, prompt, out);
  };
  // The reference: the same steps, nothing failing.
  Cache ref_cache(cache_options(2, d, 128, 16));
  DecodeSession<Cache> ref(ref_cache, so);
  ref.add_policy(std::make_unique<FailingPolicy<Cache>>());
  add_quest(ref);
  start(ref);
  Out ref_out(4, 1, d);
  step_token(ref, prompt + 1, ref_out);

  Cache cache(cache_options(2, d, 128, 16));
  DecodeSession<Cache> s(cache, so);
  auto policy = std::make_unique<FailingPolicy<Cache>>();
  FailingPolicy<Cache>& failing = *policy;
  s.add_policy(std::move(policy));
  add_quest(s);
  start(s);
  const std::vector<float> before = cache_state(cache);
  Out out(4, 1, d);
  const std::vector<float> untouched = out.o;

  // A selector whose own parallel loop fails on one item, on the session's executor.
  failing.fail_select = true;
  EXPECT_THROW(step_token(s, prompt + 1, out), SelectorFailure);
  expect_same_bits(cache_state(cache), before, "cache after the selector threw");
  expect_same_bits(out.o, untouched, "out after the selector threw");

  // The policy throws after the kernel ran.
  failing.fail_select = false;
  failing.fail_step = true;
  EXPECT_THROW(step_token(s, prompt + 1, out), SelectorFailure);
  expect_same_bits(cache_state(cache), before, "cache after the policy threw");
  expect_same_bits(out.o, untouched, "out after the policy threw");

  // The same token again, nothing failing: exactly what the session that never failed computed.
  failing.fail_step = false;
  step_token(s, prompt + 1, out);
  expect_same_bits(out.o, ref_out.o, "the retried step");
  expect_same_bits(cache_state(cache), cache_state(ref_cache), "the cache after the retried step");

  // ingest(): a policy that throws after the prompt was appended leaves the cache empty.
  Cache empty(cache_options(2, d, 128, 16));
  DecodeSession<Cache> s2(empty, so);
  auto p2 = std::make_unique<FailingPolicy<Cache>>();
  p2->fail_prefill = true;
  s2.add_policy(std::move(p2));
  const std::vector<float> empty_state = cache_state(empty);
  EXPECT_THROW(s2.ingest(q.view().slice_tokens(0, prompt), k.view().slice_tokens(0, prompt),
                         v.view().slice_tokens(0, prompt)),
               SelectorFailure);
  expect_same_bits(cache_state(empty), empty_state, "cache after ingest threw");
}

TEST(Executors, ZeroConcurrencyOrABadWorkerIdIsInvalidArgument) {
  ZeroConcurrencyExecutor zero;
  BadWorkerIdExecutor bad;
  const Det p;
  const index_t d = 16;
  const Tensor q(4, 40, d, 161), k(2, 300, d, 162), v(2, 300, d, 163);
  for (Executor* ex : {static_cast<Executor*>(&zero), static_cast<Executor*>(&bad)}) {
    const bool is_zero = ex == &zero;
    SCOPED_TRACE(is_zero ? "concurrency() 0" : "worker id == concurrency()");
    const char* what = is_zero ? "concurrency() must be >= 1, got 0"
                               : "worker id 2 outside [0, concurrency() = 2)";
    AttentionOptions o;
    o.executor = ex;
    EXPECT_INVALID("Executor", Parts<const char*>({what}),
                   sm::BlockSparse{32}.select(p.q.view(), p.k.view(), Budget::compression(10), o));
    sm::VerticalSlash vs;
    vs.block = 32;
    EXPECT_INVALID("Executor", Parts<const char*>({what}),
                   vs.select(p.q.view(), p.k.view(), Budget::compression(3), o));
    sm::FlexPrefill fp;
    fp.block = 32;
    EXPECT_INVALID("Executor", Parts<const char*>({what}),
                   fp.select(p.q.view(), p.k.view(), Budget::mass(0.9), o));
    const auto dense = masks::causal(4, 300, 300);
    EXPECT_INVALID("Executor", Parts<const char*>({what}), count_pairs(dense, *ex));

    // A parallel append (2 heads x 300 rows) fails and leaves the cache as it was.
    kv::PagedCache<bf16> cache(cache_options(2, d, 640, 16));
    cache.append(k.view().slice_tokens(0, 10), v.view().slice_tokens(0, 10));
    const std::vector<float> before = cache_state(cache);
    EXPECT_INVALID("Executor", Parts<const char*>({what}), cache.append(k.view(), v.view(), {ex}));
    expect_same_bits(cache_state(cache), before, "cache after the failed append");
    cache.append(k.view().slice_tokens(10, 290), v.view().slice_tokens(10, 290));
    EXPECT_INVALID("Executor", Parts<const char*>({what}),
                   sm::evict(sm::SnapKV{}, q.view(), cache, Budget::compression(10), o));
    sm::H2O::State st;
    st.reset(cache, Budget::compression(10));
    EXPECT_INVALID("Executor", Parts<const char*>({what}), st.observe(q.view(), cache, o, true));
    expect_same_bits(std::vector<float>(st.scores(0), st.scores(0) + 300),
                     std::vector<float>(300, 0.0f), "H2O scores after the failed observe");
    EXPECT_EQ(cache.length(0), 300);
  }
}

// =============================================================================================
// Robustness round 2: mask queries agree with the kernel, raw public constructors validate,
// hostile sizes are refused (docs/ROBUSTNESS.md, section "Public entry points and what each
// checks").

namespace {

// The pairs the kernel computes for `mask`, read back from the kernel itself: with Q = 0 every
// logit is 0, so row i's weights are 1 / count on exactly the keys it computes; V is one-hot
// (v[hk, j, c] = [c == j], dv = n_k), so out[h, i, j] > 0 iff the kernel computed (i, j).
template <class Mask>
std::vector<std::uint8_t> kernel_pairs(const Mask& mask, index_t hkv, index_t d) {
  const MaskShape& s = mask.shape();
  std::vector<float> q(static_cast<std::size_t>(s.heads * s.n_q * d), 0.0f);
  Tensor k(hkv, s.n_k, d, 77);
  std::vector<float> v(static_cast<std::size_t>(hkv * s.n_k * s.n_k), 0.0f);
  for (index_t h = 0; h < hkv; ++h)
    for (index_t j = 0; j < s.n_k; ++j) v[static_cast<std::size_t>((h * s.n_k + j) * s.n_k + j)] = 1.0f;
  Out out(s.heads, s.n_q, s.n_k);
  AttentionOptions opt;
  opt.precision = Precision::float32;
  prefill(TensorView<const float>(q.data(), s.heads, s.n_q, d), k.view(),
          TensorView<const float>(v.data(), hkv, s.n_k, s.n_k), out.view(), mask, opt);
  std::vector<std::uint8_t> r(out.o.size());
  for (std::size_t e = 0; e < r.size(); ++e) r[e] = out.o[e] > 0.0f ? 1 : 0;
  return r;
}

// allowed(), to_dense() and pairs() against the kernel's own pairs, for every head.
template <class Mask>
void expect_queries_match_kernel(const Mask& mask, index_t hkv, index_t d) {
  const MaskShape& s = mask.shape();
  const std::vector<std::uint8_t> kp = kernel_pairs(mask, hkv, d);
  index_t total = 0, mismatches = 0;
  for (index_t h = 0; h < s.heads; ++h) {
    const auto dense = to_dense(mask, h);
    for (index_t i = 0; i < s.n_q; ++i)
      for (index_t j = 0; j < s.n_k; ++j) {
        const bool k_ = kp[static_cast<std::size_t>((h * s.n_q + i) * s.n_k + j)] != 0;
        total += k_ ? 1 : 0;
        if (k_ != mask.allowed(h, i, j) || k_ != dense(i, j)) {
          if (++mismatches <= 5)
            ADD_FAILURE() << "pair (h=" << h << ", i=" << i << ", j=" << j << "): kernel " << k_
                          << ", allowed " << mask.allowed(h, i, j) << ", to_dense " << dense(i, j);
        }
      }
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(mask.pairs(), total);
  EXPECT_EQ(count_pairs(mask), total);
  // Outside the geometry nothing is allowed.
  EXPECT_FALSE(mask.allowed(-1, 0, 0));
  EXPECT_FALSE(mask.allowed(s.heads, 0, 0));
  EXPECT_FALSE(mask.allowed(0, s.n_q, 0));
  EXPECT_FALSE(mask.allowed(0, 0, s.n_k));
  EXPECT_FALSE(mask.allowed(0, 0, -1));
}

// A predicate with a hole pattern: forbids pairs with (i + 2 j) % 5 == 0 on odd heads.
struct Holes {
  static constexpr bool trivial = false;
  bool operator()(index_t h, index_t i, index_t j) const noexcept {
    return h % 2 == 0 || (i + 2 * j) % 5 != 0;
  }
};

}  // namespace

TEST(MaskQueries, EveryPrefillMethodAnswersExactlyThePairsTheKernelComputes) {
  // Hq = 4 over Hkv = 2; odd lengths (no block divides them); a full prefill and a chunk
  // (n_q < n_k); every registered method at two budgets.
  for (const auto& [nq, nk] : {std::pair<index_t, index_t>{150, 150}, {90, 170}}) {
    const Tensor q(4, nq, 16, 11), k(2, nk, 16, 12);
    for (const sm::MethodInfo& info : sm::prefill_methods()) {
      for (double cr : {2.0, 6.0}) {
        SCOPED_TRACE(info.name + " n_q=" + std::to_string(nq) + " n_k=" + std::to_string(nk) +
                     " cr=" + std::to_string(cr));
        sm::with_prefill_method(info.name, {}, [&](const auto& method) {
          using M = std::decay_t<decltype(method)>;
          if constexpr (sm::takes_user_mask_v<M>) {
            return;  // needs the caller's mask: UserMaskWith* below
          } else {
            const Budget b = info.unit == sm::BudgetUnit::none ? Budget{} : Budget::compression(cr);
            const auto sel = method.select(q.view(), k.view(), b);
            expect_queries_match_kernel(sel.mask, 2, 16);
          }
        });
      }
    }
  }
}

TEST(MaskQueries, IntervalMasksAndBlockListsWithPredicatesAndFullFlags) {
  expect_queries_match_kernel(masks::causal(2, 70, 101, 16), 1, 8);
  expect_queries_match_kernel(masks::full(2, 33, 33, 8), 2, 8);
  expect_queries_match_kernel(masks::sliding_window(2, 101, 101, 20, 3, 16), 1, 8);
  // A sparse block list (blocks 0 and the diagonal), with a predicate on partial blocks: blocks
  // not listed must read false even where the predicate says true.
  const MaskShape shape{2, 77, 77, 16, 16, true};
  BlockListBuilder b(shape, false);
  for (index_t h = 0; h < 2; ++h)
    for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb) {
      b.add(h, qb, 0, false);
      if (qb > 1) b.add(h, qb, qb, false);
    }
  expect_queries_match_kernel(b.build(Holes{}), 1, 8);
  BlockListBuilder b2(shape, true);
  for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb) b2.add(0, qb, qb / 2);
  expect_queries_match_kernel(b2.build(), 2, 8);
}

TEST(MaskQueries, UserMaskWithFullFlagsAndAPredicate) {
  // Non-causal, per head; full flags on some entries (a full flag skips the predicate), causal
  // variant with full flags on diagonal blocks (downgraded: causality still applies).
  for (bool causal : {false, true}) {
    const MaskShape shape{2, 50, 50, 16, 16, causal};
    std::vector<index_t> off{0};
    std::vector<std::int32_t> col;
    std::vector<std::uint8_t> full;
    for (index_t h = 0; h < 2; ++h)
      for (index_t qb = 0; qb < 4; ++qb) {
        for (index_t kb = 0; kb < 4; ++kb)
          if ((kb + qb + h) % 2 == 0 && (!causal || kb <= qb)) {
            col.push_back(static_cast<std::int32_t>(kb));
            full.push_back(kb % 3 == 0 ? 1 : 0);
          }
        off.push_back(static_cast<index_t>(col.size()));
      }
    SCOPED_TRACE(causal ? "causal" : "non-causal");
    expect_queries_match_kernel(sm::BasicUserMask<Holes>(shape, false, off, col, full).mask, 1, 8);
    expect_queries_match_kernel(sm::UserMask(shape, false, off, col).mask, 2, 8);
  }
}

TEST(RawConstructors, BlockListMaskValidatesItsCsrArrays) {
  const MaskShape s{2, 40, 40, 16, 16, true};  // 3 query blocks, 3 key blocks, 2 heads -> 6 rows
  using V64 = std::vector<index_t>;
  using V32 = std::vector<std::int32_t>;
  using V8 = std::vector<std::uint8_t>;
  auto make = [&](V64 off, V32 col, V8 full, bool shared = false, MaskShape shape = {2, 40, 40, 16, 16, true}) {
    return BlockListMask<>(shape, shared, std::move(off), std::move(col), std::move(full));
  };
  // A short row-offset array read past its end before this check (heap overflow under ASan).
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"row_offsets has 2 entries", "expected rows + 1 = 7"}),
                 make({0, 1}, {0}, {1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"row_offsets has 0 entries"}), make({}, {}, {}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"row_offsets[0] must be 0"}),
                 make({1, 1, 1, 1, 1, 1, 1}, {0}, {1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"non-decreasing"}),
                 make({0, 2, 1, 2, 2, 2, 2}, {0, 0}, {1, 1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"must equal the size of blocks"}),
                 make({0, 1, 2, 3, 4, 5, 9}, {0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"full has 1 flags", "one per blocks entry (2)"}),
                 make({0, 1, 2, 2, 2, 2, 2}, {0, 0}, {1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"key block 3 out of range [0, 3)"}),
                 make({0, 1, 1, 1, 1, 1, 1}, {3}, {1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"key block -1 out of range"}),
                 make({0, 1, 1, 1, 1, 1, 1}, {-1}, {1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"sorted ascending"}),
                 make({0, 0, 2, 2, 2, 2, 2}, {1, 0}, {1, 1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"repeats the previous entry"}),
                 make({0, 0, 2, 2, 2, 2, 2}, {0, 0}, {1, 1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"may not list future blocks"}),
                 make({0, 1, 1, 1, 1, 1, 1}, {1}, {1}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"block sizes must be in [1, 2^31 - 1]"}),
                 make({0, 0}, {}, {}, true, MaskShape{1, 4, 4, 0, 16, true}));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"known_pairs must be >= 0"}),
                 BlockListMask<>(s, true, {0, 0, 0, 0}, {}, {}, {}, -2));
  // Valid raw arrays: a full flag on a block causality cuts is downgraded, so the kernel and
  // the queries agree (row 0's block 0 crosses the diagonal).
  const auto m = make({0, 1, 2, 4, 5, 6, 8}, {0, 1, 0, 2, 0, 0, 1, 2}, {1, 1, 1, 1, 1, 1, 1, 1});
  EXPECT_EQ(m.full_flags()[0], 0);
  expect_queries_match_kernel(m, 1, 8);
}

TEST(RawConstructors, UserMaskRefusesNullArraysAndHugeIndices) {
  const MaskShape s{1, 32, 32, 16, 16, true};
  sm::BlockCsr<index_t, std::int32_t> csr;
  std::vector<index_t> off{0, 1, 3};
  std::vector<std::int32_t> col{0, 0, 1};
  csr.row_offsets = {off.data(), 3};
  csr.col_indices = {nullptr, 3};
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"col_indices is null"}), sm::UserMask(s, csr));
  csr.col_indices = {col.data(), 3};
  csr.row_offsets = {nullptr, 3};
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"row_offsets is null"}), sm::UserMask(s, csr));
  // uint64 indices beyond int64 wrap negative and are refused as out of range, never truncated.
  std::vector<std::uint64_t> col64{0, 0, (std::uint64_t{1} << 63) + 1};
  std::vector<std::uint64_t> off64{0, 1, 3};
  sm::BlockCsr<std::uint64_t, std::uint64_t> c64;
  c64.row_offsets = off64;
  c64.col_indices = col64;
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"col_indices[2]", "out of range"}),
                 sm::UserMask(s, c64));
  std::vector<std::int64_t> col_big{0, 0, std::int64_t{1} << 32};  // 1 after int32 truncation
  sm::BlockCsr<index_t, std::int64_t> cbig;
  cbig.row_offsets = off;
  cbig.col_indices = col_big;
  EXPECT_INVALID("methods::UserMask", Parts<const char*>({"key block 4294967296 out of range"}),
                 sm::UserMask(s, cbig));
}

TEST(RawConstructors, HandBuiltPagedViewsAreValidatedByEveryKernel) {
  // K/V [1 head, 40 tokens, d 8] in 3 physical pages of 16 rows, the table naming pages 2, 0, 1.
  const index_t d = 8, P = 16, n = 40;
  std::vector<float> pool(static_cast<std::size_t>(3 * P * d));
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (float& x : pool) x = nd(rng);
  std::vector<index_t> table{2, 0, 1};
  kv::PagedView<const float> pv;
  pv.pool = pool.data();
  pv.table = table.data();
  pv.heads = 1;
  pv.tokens = n;
  pv.dim = d;
  pv.page_size = P;
  pv.page_stride = P * d;
  pv.row_stride = d;
  pv.pool_pages = 3;
  Tensor q(2, 1, d, 6);
  Out out(2, 1, d);
  // Valid: equals the same keys laid out contiguously.
  std::vector<float> flat(static_cast<std::size_t>(n * d));
  for (index_t t = 0; t < n; ++t) std::copy(pv.row(0, t), pv.row(0, t) + d, flat.begin() + t * d);
  const TensorView<const float> kf(flat.data(), 1, n, d);
  Out ref(2, 1, d);
  decode(q.view(), kf, kf, ref.view());
  decode(q.view(), pv, pv, out.view());
  EXPECT_EQ(out.o, ref.o);
  Tensor qp(2, n, d, 7);
  Out outp(2, n, d), refp(2, n, d);
  prefill(qp.view(), kf, kf, refp.view(), masks::causal(2, n, n, 16));
  prefill(qp.view(), pv, pv, outp.view(), masks::causal(2, n, n, 16));
  EXPECT_EQ(outp.o, refp.o);
  auto expect_refused = [&](kv::PagedView<const float> bad, std::initializer_list<const char*> parts) {
    Out o2(2, 1, d);
    EXPECT_INVALID("k", parts, decode(q.view(), bad, pv, o2.view()));
    EXPECT_INVALID("v", parts, decode(q.view(), pv, bad, o2.view()));
    Out o3(2, n, d);
    EXPECT_INVALID("k", parts, prefill(qp.view(), bad, pv, o3.view(), masks::causal(2, n, n, 16)));
    EXPECT_EQ(o2.o, Out(2, 1, d).o);  // nothing written
  };
  std::vector<index_t> t_out{2, 3, 1}, t_neg{2, -1, 1};
  auto v1 = pv;
  v1.table = t_out.data();
  expect_refused(v1, {"page table entry 1 of head 0 is 3", "[0, 3)"});
  v1.table = t_neg.data();
  expect_refused(v1, {"page table entry 1 of head 0 is -1"});
  auto v2 = pv;
  v2.pool = nullptr;
  expect_refused(v2, {"pool pointer is null"});
  auto v3 = pv;
  v3.table = nullptr;
  expect_refused(v3, {"page table pointer is null"});
  auto v4 = pv;
  v4.page_size = 0;
  expect_refused(v4, {"page_size must be in [1, 2^31 - 1]"});
  auto v5 = pv;
  v5.pool_pages = 0;
  expect_refused(v5, {"pool_pages must be >= 1"});
  auto v6 = pv;
  v6.row_stride = 0;
  expect_refused(v6, {"row_stride >= 1"});
  auto v7 = pv;
  v7.tokens = -1;
  expect_refused(v7, {"negative extent"});
}

TEST(RawConstructors, DecodeStatsValidatesLikeTheDecodeItDescribes) {
  kv::Cache<float> cache(cache_options(4, 8, 32));
  Tensor kv_(4, 10, 8, 3);
  cache.append(kv_.view(), kv_.view());
  // Hq < Hkv made the GQA group 0 and divided by it.
  EXPECT_INVALID("kv::decode_stats", Parts<const char*>({"Hq=2 is not a positive multiple of Hkv=4"}),
                 kv::decode_stats(KeySelection::all(), cache, 2, 1));
  EXPECT_INVALID("kv::decode_stats", Parts<const char*>({"Hq=0"}),
                 kv::decode_stats(KeySelection::all(), cache, 0, 1));
  EXPECT_INVALID("kv::decode_stats", Parts<const char*>({"n_q=11"}),
                 kv::decode_stats(KeySelection::all(), cache, 8, 11));
  EXPECT_INVALID("kv::decode_stats", Parts<const char*>({"n_q=-1"}),
                 kv::decode_stats(KeySelection::all(), cache, 8, -1));
  const KeySelection two = KeySelection::from_tokens(KeySelection::Scope::per_kv_head, {{0}, {1}});
  EXPECT_INVALID("kv::decode_stats", Parts<const char*>({"key selection has 2 lists", "needs 4"}),
                 kv::decode_stats(two, cache, 8, 1));
  EXPECT_EQ(kv::decode_stats(KeySelection::all(), cache, 8, 1).pairs, 8 * 10);
}

TEST(HostileSizes, PairCountsTensorsAndWorkspacesBeyondTheLimitsAreInvalidArgument) {
  const index_t big = index_t{1} << 32;
  // n_q x n_k beyond 2^63 pairs: the mask shape refuses (its pair counts are int64).
  EXPECT_INVALID("IntervalMask", Parts<const char*>({"pairs exceed 2^63 - 1"}),
                 masks::causal(4, big, big));
  EXPECT_INVALID("BlockListBuilder", Parts<const char*>({"pairs exceed 2^63 - 1"}),
                 BlockListBuilder(MaskShape{3, index_t{1} << 31, index_t{1} << 31, 64, 64, true}, true));
  EXPECT_INVALID("BlockListMask", Parts<const char*>({"pairs exceed 2^63 - 1"}),
                 BlockListMask<>(MaskShape{1, big, big, 64, 64, true}, true, {0}, {}, {}));
  // No queries but n_k near 2^63: the block arithmetic (ceil(n_k / block)) would wrap.
  EXPECT_INVALID("IntervalMask", Parts<const char*>({"n_k must be < 2^62"}),
                 IntervalMask(MaskShape{3, 0, std::numeric_limits<index_t>::max(), 2, 2, false}, 0, 0));
  // A plan for shapes no memory can hold: tensors beyond 2^56 elements, pairs beyond 2^63.
  AttentionShape s{8, 8, index_t{1} << 20, index_t{1} << 40, index_t{1} << 20, index_t{1} << 20};
  EXPECT_INVALID("decode", Parts<const char*>({"more than 2^56 elements"}), plan_decode(s));
  s = {1, 1, big, big, 1, 1};  // 2^64 pairs, small tensors
  EXPECT_INVALID("decode", Parts<const char*>({"pairs exceed 2^63 - 1"}), plan_decode(s));
  s = {-1, 1, 4, 4, 8, 8};
  EXPECT_INVALID("decode", Parts<const char*>({"extents must be >= 0"}), plan_decode(s));
  // Valid shapes whose prefill scratch (block_q x block_k logits per worker) passes 2^62 bytes.
  // (2 empty rows of 2^31 - 1 queries: nothing to compute, but the plan sizes the scratch.)
  const index_t n = index_t{1} << 31;
  const BlockListMask<> huge_blocks(MaskShape{1, n, n, n - 1, n - 1, true}, true, {0, 0, 0}, {}, {});
  EXPECT_INVALID("prefill", Parts<const char*>({"would exceed 2^62 bytes"}),
                 plan_prefill(AttentionShape{1, 1, n, n, 1, 1}, huge_blocks, AttentionOptions{}));
  // Decode partials (output rows x split chunks x dv): 2^21 query rows x 2^16 chunks of 16 keys
  // x dv 64 (the same on every target's lane padding) = 2^63 floats.
  s = {index_t{1} << 21, 1, index_t{1} << 20, index_t{1} << 20, 1, 64};
  DecodeOptions split16;
  split16.split = 16;
  EXPECT_INVALID("decode", Parts<const char*>({"would exceed 2^62 bytes"}),
                 plan_decode(s, KeySelection::all(), split16));
  // Views: element counts and strides whose reach wraps.
  float x = 0.0f;
  Out o(1, 1, 1);
  const TensorView<const float> huge(&x, big, big, 2, 0, 0, 1);
  EXPECT_INVALID("k", Parts<const char*>({"at most 2^56"}),
                 decode(TensorView<const float>(&x, 1, 1, 1), huge, huge, o.view()));
  const TensorView<const float> far(&x, 1, 3, 1, 0, index_t{1} << 62, 1);
  EXPECT_INVALID("k", Parts<const char*>({"beyond 2^62 elements"}),
                 decode(TensorView<const float>(&x, 1, 1, 1), far, far, o.view()));
  const TensorView<const float> minstride(&x, 1, 2, 1, 0, std::numeric_limits<index_t>::min(), 1);
  EXPECT_INVALID("k", Parts<const char*>({"beyond 2^62 elements"}),
                 decode(TensorView<const float>(&x, 1, 1, 1), minstride, minstride, o.view()));
}
