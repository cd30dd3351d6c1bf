// libFuzzer harness for the whole attention path: the input bytes choose a small problem (shapes,
// GQA group, dtypes, memory layouts, causality, thread count) and a mask or key selection of every
// kind the library has, the kernel runs, and the result is compared with the double-precision
// oracle (reference.hpp) on exactly the pairs the mask allows.
//
// Aborts (so libFuzzer keeps the input) on: a mismatch beyond the fp32 error bound of the case, a
// non-finite output from finite inputs, a write outside the output view, output bits that change
// with the thread count, a pair count that disagrees with the mask's own elements, an exception
// other than sparse_attn::invalid_argument, a valid input that is rejected, or an input the harness
// made invalid on purpose that is accepted. The sanitizers (ASan, UBSan) abort on memory errors
// and undefined behaviour. Inputs are finite; the NaN/Inf policy has its own tests
// (tests/test_hardening.cpp, docs/ROBUSTNESS.md).
//
// Build and run: docs/ROBUSTNESS.md ("Fuzzing").
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <sparse_attn/core/dtype.hpp>
#include <sparse_attn/kernel/decode.hpp>
#include <sparse_attn/kernel/prefill.hpp>
#include <sparse_attn/kv/cache.hpp>
#include <sparse_attn/kv/decode.hpp>
#include <sparse_attn/mask/block_mask.hpp>
#include <sparse_attn/mask/key_selection.hpp>
#include <sparse_attn/mask/patterns.hpp>
#include <sparse_attn/methods/ada_snapkv.hpp>
#include <sparse_attn/methods/h2o.hpp>
#include <sparse_attn/methods/quest.hpp>
#include <sparse_attn/methods/snapkv.hpp>
#include <sparse_attn/methods/streaming.hpp>
#include <sparse_attn/reference.hpp>
// Prefill selections still under development elsewhere: fuzzed when their header exists.
#if __has_include(<sparse_attn/methods/block_sparse.hpp>)
#include <sparse_attn/methods/block_sparse.hpp>
#define FUZZ_BLOCK_SPARSE 1
#endif
#if __has_include(<sparse_attn/methods/vertical_slash.hpp>)
#include <sparse_attn/methods/vertical_slash.hpp>
#define FUZZ_VERTICAL_SLASH 1
#endif
#if __has_include(<sparse_attn/methods/flex_prefill.hpp>)
#include <sparse_attn/methods/flex_prefill.hpp>
#define FUZZ_FLEX_PREFILL 1
#endif
#if __has_include(<sparse_attn/methods/user_mask.hpp>)
#include <sparse_attn/methods/user_mask.hpp>
#define FUZZ_USER_MASK 1
#endif

using namespace sparse_attn;
namespace sm = sparse_attn::methods;

namespace {

// ---------------------------------------------------------------------------------------------
// Failure reporting
// ---------------------------------------------------------------------------------------------

std::string g_case;  // what the current input decoded to, printed on failure

template <class... A>
void note(const A&... a) {
  g_case += detail::concat(a...);
  g_case += ' ';
}

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "\nfuzz_attention FAILURE: %s\n  case: %s\n", why.c_str(), g_case.c_str());
  std::fflush(stderr);
  std::abort();
}

// Runs f. `invalid` = the harness broke an argument on purpose: f must throw
// sparse_attn::invalid_argument with a "<where>: <what>" message. Otherwise f must not throw.
// Returns true when f ran without throwing.
template <class F>
bool expect(bool invalid, const char* what, F&& f) {
  try {
    f();
  } catch (const sparse_attn::invalid_argument& e) {
    const std::string msg = e.what();
    if (!invalid) fail(std::string(what) + ": valid input rejected: " + msg);
    if (msg.find(": ") == std::string::npos || msg.size() < 8)
      fail(std::string(what) + ": message not in '<where>: <what>' form: " + msg);
    return false;
  } catch (const std::exception& e) {
    fail(std::string(what) + ": unexpected exception type: " + e.what());
  } catch (...) {
    fail(std::string(what) + ": unexpected non-std exception");
  }
  if (invalid) fail(std::string(what) + ": invalid input accepted");
  return true;
}

// ---------------------------------------------------------------------------------------------
// Inputs: strided storage with poisoned padding
// ---------------------------------------------------------------------------------------------

enum class Layout { head_major, token_major, padded, dim_strided, reversed, kCount };

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::head_major: return "head_major";
    case Layout::token_major: return "token_major";
    case Layout::padded: return "padded";
    case Layout::dim_strided: return "dim_strided";
    case Layout::reversed: return "reversed";
    default: return "?";
  }
}

// A [H, n, d] tensor in a buffer laid out per `layout`. Elements outside the view hold `fill`
// (NaN for inputs, so a read outside the view shows up as a non-finite output; a sentinel for
// outputs, checked after the run).
template <class T>
struct Storage {
  std::vector<T> buf;
  TensorView<T> view;
  Storage(index_t H, index_t n, index_t d, Layout layout, T fill) {
    index_t sh = n * d, st = d, sd = 1, size = H * n * d, offset = 0;
    switch (layout) {
      case Layout::token_major: sh = d, st = H * d; break;
      case Layout::padded: st = d + 3, sh = n * st + 5, size = H * sh; break;
      case Layout::dim_strided: sd = 2, st = 2 * d + 1, sh = n * st + 2, size = H * sh; break;
      case Layout::reversed: st = -d, offset = std::max<index_t>(0, (n - 1) * d); break;
      default: break;
    }
    buf.assign(static_cast<std::size_t>(std::max<index_t>(size, 1)), fill);
    view = TensorView<T>(buf.data() + offset, H, n, d, sh, st, sd);
  }
  TensorView<const T> cview() const { return view; }
  // Every buffer element outside the view (by address).
  std::vector<std::uint8_t> inside() const {
    std::vector<std::uint8_t> in(buf.size(), 0);
    for (index_t h = 0; h < view.heads; ++h)
      for (index_t t = 0; t < view.tokens; ++t)
        for (index_t c = 0; c < view.dim; ++c)
          in[static_cast<std::size_t>(&view(h, t, c) - buf.data())] = 1;
    return in;
  }
};

// Values: normal(0, sigma) rounded to T; "ties" quantises them to a few levels.
struct Values {
  std::mt19937 rng;
  float sigma = 1.0f;
  bool ties = false;
  float next() {
    std::normal_distribution<float> nd(0.0f, sigma);
    float x = nd(rng);
    if (ties) x = std::round(x / sigma * 2.0f) * sigma * 0.5f;
    return x;
  }
  template <class T>
  void fill(TensorView<T>& v) {
    for (index_t h = 0; h < v.heads; ++h)
      for (index_t t = 0; t < v.tokens; ++t)
        for (index_t c = 0; c < v.dim; ++c) v(h, t, c) = from_float<std::remove_const_t<T>>(next());
  }
};

Values make_values(FuzzedDataProvider& fdp) {
  Values v;
  v.rng.seed(fdp.ConsumeIntegral<std::uint32_t>());
  const float sigmas[] = {1.0f, 0.05f, 3.0f, 1.0f, 12.0f};
  v.sigma = fdp.PickValueInArray(sigmas);
  v.ties = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  note("sigma=", v.sigma, v.ties ? " ties" : "");
  return v;
}

index_t pick_dim(FuzzedDataProvider& fdp) {
  const index_t dims[] = {16, 32, 64, 1, 2, 3, 5, 7, 8, 15, 17, 24, 31, 33, 48, 63, 65, 72, 80, 64, 32};
  return fdp.PickValueInArray(dims);
}

Layout pick_layout(FuzzedDataProvider& fdp) {
  return static_cast<Layout>(
      fdp.ConsumeIntegralInRange<int>(0, static_cast<int>(Layout::kCount) - 1));
}

int pick_threads(FuzzedDataProvider& fdp) { return fdp.ConsumeIntegralInRange<int>(1, 3); }

// ---------------------------------------------------------------------------------------------
// Checking against the oracle
// ---------------------------------------------------------------------------------------------

constexpr double kEps32 = 1.0 / (1 << 23);  // 2^-23: twice the fp32 unit roundoff

template <class T>
double storage_eps() {
  if constexpr (std::is_same_v<T, float>) return 0.0;
  else if constexpr (std::is_same_v<T, bf16>) return 1.0 / 256;   // 2^-8
  else return 1.0 / 2048;                                           // 2^-11
}

// Oracle with an error bound per row: logit error <= E = (d + 2) 2^-23 scale max_j sum_c |q_c k_jc|
// over the allowed keys (fp32 FMA dot products), output error <= vmax (4 E + accumulation).
struct Expected {
  reference::Result ref;
  std::vector<double> logit_err;  // [heads * n_q]
  double vmax = 0.0;
};

template <class QV, class KV, class VV, class Allowed>
Expected oracle(const QV& q, const KV& k, const VV& v, double scale, Allowed&& allowed,
                double extra_rel = 0.0) {
  Expected e;
  e.ref = reference::attention(q, k, v, scale, allowed);
  const index_t G = q.heads / k.heads;
  e.logit_err.assign(static_cast<std::size_t>(q.heads * q.tokens), 0.0);
  for (index_t h = 0; h < q.heads; ++h)
    for (index_t i = 0; i < q.tokens; ++i) {
      double worst = 0.0;
      for (index_t j = 0; j < k.tokens; ++j) {
        if (!allowed(h, i, j)) continue;
        double s = 0.0;
        for (index_t c = 0; c < q.dim; ++c)
          s += std::abs(static_cast<double>(to_float(q(h, i, c))) *
                        static_cast<double>(to_float(k(h / G, j, c))));
        worst = std::max(worst, s * scale);
      }
      e.logit_err[static_cast<std::size_t>(h * q.tokens + i)] =
          worst * ((static_cast<double>(q.dim) + 2.0) * kEps32 + extra_rel);
    }
  for (index_t h = 0; h < v.heads; ++h)
    for (index_t j = 0; j < v.tokens; ++j)
      for (index_t c = 0; c < v.dim; ++c)
        e.vmax = std::max(e.vmax, std::abs(static_cast<double>(to_float(v(h, j, c)))));
  return e;
}

// Compares out (and lse when given) with the oracle; p_round: relative rounding of the
// probabilities (bf16 dot products), 0 otherwise.
template <class TO>
void check_output(const Storage<TO>& out, const std::vector<std::uint8_t>& inside, TO sentinel,
                  const std::vector<float>* lse, const Expected& e, index_t n_k, double p_round,
                  const char* what) {
  const TensorView<TO>& o = out.view;
  const double accum = (2.0 * static_cast<double>(n_k) + 64.0) * kEps32 + 2.0 * p_round;
  for (index_t h = 0; h < o.heads; ++h)
    for (index_t i = 0; i < o.tokens; ++i) {
      const double E = e.logit_err[static_cast<std::size_t>(h * o.tokens + i)];
      const double want_lse = e.ref.lse_at(h, i);
      const bool empty = std::isinf(want_lse);
      const double tol = e.vmax * (4.0 * E + accum);
      for (index_t c = 0; c < o.dim; ++c) {
        const double got = static_cast<double>(to_float(o(h, i, c)));
        const double want = e.ref(h, i, c);
        if (!std::isfinite(got))
          fail(detail::concat(what, ": non-finite output ", got, " at h=", h, " i=", i, " c=", c));
        if (empty && got != 0.0)
          fail(detail::concat(what, ": row with no allowed key is ", got, " at h=", h, " i=", i,
                              " c=", c, " (must be exactly 0)"));
        const double lim = tol + std::abs(want) * storage_eps<TO>() + 1e-30;
        if (std::abs(got - want) > lim)
          fail(detail::concat(what, ": output mismatch at h=", h, " i=", i, " c=", c, ": got ",
                              got, ", oracle ", want, ", |diff| ", std::abs(got - want),
                              " > bound ", lim));
      }
      if (lse) {
        const double got = (*lse)[static_cast<std::size_t>(h * o.tokens + i)];
        if (empty) {
          if (!(std::isinf(got) && got < 0))
            fail(detail::concat(what, ": LSE of an empty row is ", got, " (must be -inf) at h=",
                                h, " i=", i));
        } else {
          const double lim = 2.0 * E + accum * (1.0 + std::abs(want_lse)) + 4.0 * p_round;
          if (!std::isfinite(got) || std::abs(got - want_lse) > lim)
            fail(detail::concat(what, ": LSE mismatch at h=", h, " i=", i, ": got ", got,
                                ", oracle ", want_lse, " bound ", lim));
        }
      }
    }
  for (std::size_t x = 0; x < out.buf.size(); ++x)
    if (!inside[x] && std::memcmp(&out.buf[x], &sentinel, sizeof(TO)) != 0)
      fail(detail::concat(what, ": element ", x, " of the output buffer outside the view was written"));
}

// A call that threw must have written nothing: every output element and LSE entry still holds
// what the harness put there.
template <class TO>
void check_untouched(const Storage<TO>& out, TO sentinel, const std::vector<float>& lse,
                     const char* what) {
  for (std::size_t x = 0; x < out.buf.size(); ++x)
    if (std::memcmp(&out.buf[x], &sentinel, sizeof(TO)) != 0)
      fail(detail::concat(what, ": threw but wrote element ", x, " of the output buffer"));
  for (std::size_t x = 0; x < lse.size(); ++x)
    if (lse[x] != -7.0f) fail(detail::concat(what, ": threw but wrote LSE entry ", x));
}

template <class TO>
bool same_bits(const Storage<TO>& a, const Storage<TO>& b) {
  return a.buf.size() == b.buf.size() &&
         std::memcmp(a.buf.data(), b.buf.data(), a.buf.size() * sizeof(TO)) == 0;
}

// Pair-count consistency: the mask's own count, count_pairs() and its dense export agree.
template <class Mask>
void check_mask(const Mask& m, const char* what) {
  const MaskShape& s = m.shape();
  index_t dense = 0;
  const index_t nh = m.head_shared() ? 1 : s.heads;
  for (index_t h = 0; h < nh; ++h) {
    const auto d = to_dense(m, h);
    dense += static_cast<index_t>(d.count());
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
      index_t prev = -1;
      m.for_each_block(h, qb, [&](index_t kb, bool full) {
        if (kb <= prev || kb < 0 || kb >= s.num_k_blocks())
          fail(detail::concat(what, ": block list not strictly increasing / in range: ", prev,
                              " then ", kb));
        prev = kb;
        // A full block skips every element test, so it must not cross the causal diagonal (its
        // predicate is not consulted: user_mask's full flags override it, as FlexAttention's).
        if (full && s.causal && s.k_end(kb) - 1 > s.q_begin(qb) + s.q_offset())
          fail(detail::concat(what, ": full block (", qb, ", ", kb, ") crosses the diagonal"));
      });
    }
    if (s.causal)
      for (index_t i = 0; i < s.n_q; ++i)
        for (index_t j = i + s.q_offset() + 1; j < s.n_k; ++j)
          if (d(i, j)) fail(detail::concat(what, ": causal mask allows a future key (", i, ", ", j, ")"));
  }
  if (m.head_shared()) dense *= s.heads;
  if (m.pairs() != dense)
    fail(detail::concat(what, ": pairs() = ", m.pairs(), " but the mask allows ", dense));
  if (count_pairs(m) != dense)
    fail(detail::concat(what, ": count_pairs = ", count_pairs(m), " but the mask allows ", dense));
}

// ---------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------

// Ways the harness breaks a prefill call on purpose (each must be rejected).
enum class Bad {
  none, heads_not_multiple, kv_tokens_differ, head_dim_differs, out_shape, more_queries_than_keys,
  mask_geometry, null_q, null_k, overlapping_out, bad_scale, bad_threads, kCount
};

struct PrefillProblem {
  index_t hq, hkv, n_q, n_k, d, dv;
  bool causal;
  int threads;
  float scale;  // NaN: default
  bool lse;
  Bad bad = Bad::none;
};

// Runs prefill of `mask` on a problem whose tensors are built here, checks it against the oracle
// and for bit-identical results at another thread count.
template <class TQ, class TKV, class TO, class Mask>
void run_prefill(FuzzedDataProvider& fdp, const PrefillProblem& p, const Mask& mask, Values& vals,
                 Layout lq, Layout lk, Layout lv, Layout lo) {
  index_t hq = p.hq, hkv = p.hkv, n_q = p.n_q, n_k = p.n_k, d = p.d, dv = p.dv;
  index_t k_tokens = n_k, v_tokens = n_k, kd = d, out_heads = hq, out_dim = dv;
  switch (p.bad) {
    case Bad::heads_not_multiple: hkv = hq + 1; break;
    case Bad::kv_tokens_differ: v_tokens = n_k + 1; break;
    case Bad::head_dim_differs: kd = d + 1; break;
    case Bad::out_shape: fdp.ConsumeBool() ? ++out_heads : ++out_dim; break;
    case Bad::more_queries_than_keys: n_q = n_k + 1; break;
    default: break;
  }
  Storage<TQ> q(hq, n_q, d, lq, TQ(NAN));
  Storage<TKV> k(hkv, k_tokens, kd, lk, TKV(NAN)), v(hkv, v_tokens, dv, lv, TKV(NAN));
  vals.fill(q.view);
  vals.fill(k.view);
  vals.fill(v.view);
  const TO sentinel = from_float<TO>(1234.5f);
  Storage<TO> out(out_heads, n_q, out_dim, lo, sentinel);
  std::vector<float> lse(static_cast<std::size_t>(std::max<index_t>(1, out_heads * n_q)), -7.0f);
  PrefillOptions opt;
  opt.num_threads = p.threads;
  opt.scale = p.scale;
  if (p.lse) opt.lse = LseView(lse.data(), n_q);
  // Precision: automatic (bf16 products for all-bf16 inputs), or forced either way over a bf16 cache.
  if (std::is_same_v<TKV, bf16>) {
    const Precision modes[] = {Precision::automatic, Precision::float32, Precision::bfloat16};
    opt.precision = fdp.PickValueInArray(modes);
  }
  const bool dot = kernel::bf16_products(opt.precision, dtype_of<TQ>(), dtype_of<TKV>(), dtype_of<TKV>(), "fuzz");
  TensorView<const TQ> qv = q.cview();
  TensorView<const TKV> kv = k.cview(), vv = v.cview();
  TensorView<TO> ov = out.view;
  switch (p.bad) {
    case Bad::null_q: qv.data = nullptr; break;
    case Bad::null_k: kv.data = nullptr; break;
    case Bad::overlapping_out: ov.stride_token = 0; break;
    case Bad::bad_scale: {
      const float s[] = {0.0f, -1.0f, INFINITY, -INFINITY};
      opt.scale = fdp.PickValueInArray(s);
      break;
    }
    case Bad::bad_threads: opt.num_threads = -1; break;
    default: break;
  }
  note("| prefill hq=", hq, " hkv=", hkv, " n_q=", n_q, " n_k=", n_k, " d=", d, " dv=", dv,
       " causal=", p.causal, " threads=", opt.num_threads, " scale=", opt.scale, " lse=", p.lse,
       " bad=", static_cast<int>(p.bad), " types=", dtype_name<TQ>(), "/", dtype_name<TKV>(), "/",
       dtype_name<TO>(), " precision=", precision_name(opt.precision), " layouts=", layout_name(lq), ",", layout_name(lk), ",", layout_name(lv),
       ",", layout_name(lo), " block=", mask.shape().block_q, "x", mask.shape().block_k,
       " pairs=", mask.pairs());
  const bool invalid = p.bad != Bad::none;
  if (!expect(invalid, "prefill", [&] { prefill(qv, kv, vv, ov, mask, opt); })) {
    check_untouched(out, sentinel, lse, "prefill");
    return;
  }

  const double scale =
      std::isnan(p.scale) ? static_cast<double>(1.0f / std::sqrt(static_cast<float>(d))) : p.scale;
  // The oracle reads the mask's dense export (check_mask verified it against the block lists).
  std::vector<Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic>> dense;
  for (index_t h = 0; h < (mask.head_shared() ? 1 : hq); ++h) dense.push_back(to_dense(mask, h));
  // bf16 products: Q rounded (2^-8 of each |q k| term, the logit bound's extra_rel) and P rounded.
  const Expected e = oracle(q.cview(), k.cview(), v.cview(), scale, [&](index_t h, index_t i, index_t j) {
    return dense[static_cast<std::size_t>(mask.head_shared() ? 0 : h)](i, j);
  }, dot ? 1.0 / 128 : 0.0);
  check_output(out, out.inside(), sentinel, p.lse ? &lse : nullptr, e, n_k, dot ? 1.0 / 128 : 0.0, "prefill");

  // Same bits at another thread count.
  Storage<TO> out2(out_heads, n_q, out_dim, lo, sentinel);
  PrefillOptions opt2 = opt;
  opt2.num_threads = opt.num_threads % 3 + 1;
  prefill(q.cview(), k.cview(), v.cview(), out2.view, mask, opt2);
  if (!same_bits(out, out2))
    fail(detail::concat("prefill: output bits differ between ", opt.num_threads, " and ",
                        opt2.num_threads, " threads"));
}

// A predicate that is not trivial: a fixed pseudo-random subset of (head, query, key).
struct HashPredicate {
  static constexpr bool trivial = false;
  std::uint32_t seed = 0;
  bool operator()(index_t h, index_t i, index_t j) const {
    std::uint64_t x = seed ^ (static_cast<std::uint64_t>(h) * 0x9E3779B97F4A7C15ull) ^
                      (static_cast<std::uint64_t>(i) << 20) ^ static_cast<std::uint64_t>(j);
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return (x & 3u) != 0;
  }
};

enum PrefillKind {
  kDense, kWindow, kBlockList, kBlockListPred, kBlockSparse, kVsExact, kVsTiled, kFlex,
  kUserMask, kPrefillKinds
};

// The options a selection runs with: the kernel call's scale, and its own thread count.
AttentionOptions selection_options(FuzzedDataProvider& fdp, const PrefillProblem& p) {
  AttentionOptions o;
  o.scale = p.scale;
  o.num_threads = pick_threads(fdp);
  return o;
}

// A selection's statistics agree with its mask, and reachability follows the one rule for
// compression targets (budget.hpp: within the tolerance, on either side).
template <class Mask>
void check_stats(const sm::SelectionStats& st, const Mask& m, const char* what) {
  if (st.pairs != m.pairs() || st.dense_pairs != m.shape().dense_pairs())
    fail(detail::concat(what, ": stats say ", st.pairs, " of ", st.dense_pairs,
                        " pairs but the mask has ", m.pairs(), " of ", m.shape().dense_pairs()));
  if (st.target.is_compression() && st.dense_pairs > 0 &&
      st.reachable != sm::is_reachable(st.target, st.compression()))
    fail(detail::concat(what, ": reachable=", st.reachable, " at CR ", st.compression(),
                        " for target ", st.target.str()));
  if (st.detail.empty() || !(st.select_ms >= 0.0))
    fail(detail::concat(what, ": stats lack the resolved budget or the selection time"));
}

template <class TQ, class TKV, class TO>
void prefill_case(FuzzedDataProvider& fdp, int kind) {
  PrefillProblem p{};
  p.hkv = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  p.hq = p.hkv * fdp.ConsumeIntegralInRange<index_t>(1, 4);
  p.n_k = fdp.ConsumeIntegralInRange<index_t>(0, 96);
  p.n_q = fdp.ConsumeBool() ? p.n_k : fdp.ConsumeIntegralInRange<index_t>(0, p.n_k);
  p.d = pick_dim(fdp);
  p.dv = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? pick_dim(fdp) : p.d;
  p.causal = fdp.ConsumeIntegralInRange<int>(0, 3) != 0;
  p.threads = pick_threads(fdp);
  p.scale = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? fdp.ConsumeFloatingPointInRange<float>(0.01f, 2.0f)
                                                       : NAN;
  p.lse = fdp.ConsumeBool();
  const int bad = fdp.ConsumeIntegralInRange<int>(0, 6 * static_cast<int>(Bad::kCount));
  p.bad = bad < static_cast<int>(Bad::kCount) ? static_cast<Bad>(bad) : Bad::none;
  if (p.bad == Bad::null_q && p.hq * p.n_q * p.d == 0) p.bad = Bad::none;
  if (p.bad == Bad::null_k && p.n_k == 0) p.bad = Bad::none;
  if (p.bad == Bad::overlapping_out && p.n_q < 2) p.bad = Bad::none;
  // Shape errors the library reports from the mask, not the kernel, are covered by kind-specific
  // cases; the kernel-level ones above apply to every mask.
  Values vals = make_values(fdp);
  const Layout lq = pick_layout(fdp), lk = pick_layout(fdp), lv = pick_layout(fdp),
               lo = pick_layout(fdp);
  index_t bq = fdp.ConsumeIntegralInRange<index_t>(1, 80);
  index_t bk = fdp.ConsumeBool() ? bq : fdp.ConsumeIntegralInRange<index_t>(1, 80);
  const index_t mask_heads = p.bad == Bad::mask_geometry ? p.hq + 1 : p.hq;
  MaskShape shape{mask_heads, p.n_q, p.n_k, bq, bk, p.causal};
  auto go = [&](const auto& mask) {
    check_mask(mask, "mask");
    run_prefill<TQ, TKV, TO>(fdp, p, mask, vals, lq, lk, lv, lo);
  };
  // Query and key tensors for the data-dependent selections: a copy of the value stream, so for a
  // valid call they hold exactly the Q and K the kernel call builds next.
  auto with_qk = [&](auto&& select) {
    Values sel_vals = vals;
    Storage<TQ> q(p.hq, p.n_q, p.d, lq, TQ(NAN));
    Storage<TKV> k(p.hkv, p.n_k, p.d, lk, TKV(NAN));
    sel_vals.fill(q.view);
    sel_vals.fill(k.view);
    select(q.cview(), k.cview());
  };
  switch (kind) {
    case kDense:
    case kWindow: {
      index_t window = 0, sinks = 0;
      if (kind == kWindow) {
        window = fdp.ConsumeIntegralInRange<index_t>(1, 100);
        sinks = fdp.ConsumeIntegralInRange<index_t>(0, 8);
      }
      note("interval window=", window, " sinks=", sinks);
      const bool bad_window = fdp.ConsumeIntegralInRange<int>(0, 15) == 0;
      if (bad_window) {  // negative window or sinks, zero block: rejected by the mask
        note("bad_window");
        expect(true, "IntervalMask", [&] {
          MaskShape s2 = shape;
          const int which = fdp.ConsumeIntegralInRange<int>(0, 2);
          if (which == 0) s2.block_k = 0;
          IntervalMask m(s2, which == 1 ? -1 : window, which == 2 ? -1 : sinks);
        });
        return;
      }
      go(IntervalMask(shape, window, sinks));
      return;
    }
    case kBlockList:
    case kBlockListPred: {
      const bool shared = fdp.ConsumeBool();
      const int density = fdp.ConsumeIntegralInRange<int>(0, 4);  // keep probability in quarters
      // Corruptions of the list: 1 out of range, 2 duplicate, 3 unsorted, 4 future block (causal).
      int corrupt = fdp.ConsumeIntegralInRange<int>(0, 12);
      if (corrupt > 4) corrupt = 0;
      note("blocklist shared=", shared, " density=", density, " corrupt=", corrupt);
      std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
      BlockListBuilder builder(shape, shared);
      const index_t nh = shared ? 1 : shape.heads;
      bool corrupted = false;
      for (index_t h = 0; h < nh; ++h)
        for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb) {
          const index_t last_pos = shape.q_end(qb) - 1 + shape.q_offset();
          const index_t legal = p.causal ? std::min(shape.num_k_blocks(), last_pos / bk + 1)
                                         : shape.num_k_blocks();
          std::vector<index_t> row;
          for (index_t kb = 0; kb < legal; ++kb)
            if (static_cast<int>(rng() % 4) < density) row.push_back(kb);
          const bool here = corrupt != 0 && !corrupted && rng() % 3 == 0;
          if (here) {
            if (corrupt == 1) row.push_back(shape.num_k_blocks() + static_cast<index_t>(rng() % 3));
            if (corrupt == 2 && !row.empty()) row.push_back(row.back());
            if (corrupt == 3 && row.size() >= 2) std::swap(row[0], row[1]);
            if (corrupt == 4 && p.causal && legal < shape.num_k_blocks()) row.push_back(legal);
            corrupted = corrupt == 1 || (corrupt == 2 && !row.empty()) ||
                        (corrupt == 3 && row.size() >= 2) ||
                        (corrupt == 4 && p.causal && legal < shape.num_k_blocks());
          }
          for (index_t kb : row) builder.add(h, qb, kb, rng() % 2 == 0);
        }
      if (kind == kBlockList) {
        BlockListMask<AllowAll> m;
        if (expect(corrupted, "BlockListBuilder::build", [&] { m = builder.build(); })) go(m);
      } else {
        BlockListMask<HashPredicate> m;
        HashPredicate pred{static_cast<std::uint32_t>(rng())};
        if (expect(corrupted, "BlockListBuilder::build", [&] { m = builder.build(pred); })) go(m);
      }
      return;
    }
#if FUZZ_BLOCK_SPARSE
    case kBlockSparse: {
      // The selection gets the kernel's options (scale, threads), as every method does.
      AttentionOptions so = selection_options(fdp, p);
      sm::BlockSparse method;
      method.block = bq;
      const bool by_count = fdp.ConsumeBool();
      index_t top_k = by_count ? fdp.ConsumeIntegralInRange<index_t>(1, 8) : 0;
      double cr = by_count ? 0.0 : fdp.ConsumeFloatingPointInRange<double>(1.0, 12.0);
      const bool by_mass = !by_count && fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
      const double mass = by_mass ? fdp.ConsumeFloatingPointInRange<double>(0.01, 1.0) : 0.0;
      const int corrupt = fdp.ConsumeIntegralInRange<int>(0, 15);
      if (corrupt == 1) method.block = 0;
      if (corrupt == 2) top_k = fdp.ConsumeBool() ? -1 : 0;
      if (corrupt == 3) top_k = 0, cr = fdp.ConsumeBool() ? 0.5 : NAN;
      if (corrupt == 4) so.num_threads = -2;
      const bool bad = corrupt >= 1 && corrupt <= 4;
      note("block_sparse top_k=", top_k, " cr=", cr, " mass=", mass, " block=", method.block,
           " corrupt=", corrupt);
      if (p.bad == Bad::mask_geometry) p.bad = Bad::none;  // the selection sets the geometry
      with_qk([&](const auto& q, const auto& k) {
        sm::PrefillSelection<BlockListMask<AllowAll>> sel;
        if (!expect(bad, "BlockSparse::select", [&] {
              const sm::Budget budget = top_k != 0 || corrupt == 2 ? sm::Budget::count(top_k)
                                        : by_mass && corrupt != 3 ? sm::Budget::mass(mass)
                                                                  : sm::Budget::compression(cr);
              sel = method.select(q, k, budget, so);
            }))
          return;
        check_stats(sel.stats, sel.mask, "block_sparse");
        if (top_k > 0 && q.tokens > 0 &&
            sel.stats.reachable != (top_k >= sm::BlockSparse::max_forced(sel.mask.shape())))
          fail("block_sparse: a count budget is reachable iff it covers the forced blocks");
        go(sel.mask);
      });
      return;
    }
#endif
#if FUZZ_VERTICAL_SLASH
    case kVsExact:
    case kVsTiled: {
      AttentionOptions so = selection_options(fdp, p);
      sm::VerticalSlash method;  // exact; the tiled one takes the same parameters
      method.block = bq;
      method.last_queries = fdp.ConsumeIntegralInRange<index_t>(1, 80);
      method.sink_columns = fdp.ConsumeIntegralInRange<index_t>(0, 6);
      method.local_offsets = fdp.ConsumeIntegralInRange<index_t>(0, 70);
      method.vertical_share = fdp.ConsumeFloatingPointInRange<double>(0.0, 1.0);
      // A count of lines (V + S, possibly below the forced ones: then unreachable) or a CR.
      double cr = 0.0;
      index_t lines = 0;
      if (fdp.ConsumeBool())
        cr = fdp.ConsumeFloatingPointInRange<double>(1.0, 12.0);
      else
        lines = fdp.ConsumeIntegralInRange<index_t>(
            1, method.sink_columns + method.local_offsets + 200);
      const int corrupt = fdp.ConsumeIntegralInRange<int>(0, 15);
      if (corrupt == 1) method.block = 0;
      if (corrupt == 2) method.last_queries = 0;
      if (corrupt == 3) method.vertical_share = fdp.ConsumeBool() ? 1.5 : NAN;
      if (corrupt == 4) lines = 0, cr = fdp.ConsumeBool() ? 0.5 : INFINITY;
      if (corrupt == 5) so.scale = -1.0f;
      const bool bad = corrupt >= 1 && corrupt <= 5;
      note(kind == kVsExact ? "vs_exact" : "vs_tiled", " lines=", lines, " share=",
           method.vertical_share, " cr=", cr, " w=", method.last_queries,
           " sinks=", method.sink_columns, " local=", method.local_offsets, " corrupt=", corrupt);
      if (p.bad == Bad::mask_geometry) p.bad = Bad::none;
      auto budget = [&] {
        return lines > 0 ? sm::Budget::count(lines) : sm::Budget::compression(cr);
      };
      // A count budget is reachable iff it covers the forced lines (clamped to n_k).
      auto check_reachable = [&](const sm::SelectionStats& st, index_t n_q, index_t n_k) {
        if (lines == 0 || n_q == 0) return;
        const index_t forced =
            std::min(method.sink_columns, n_k) + std::min(method.local_offsets, n_k);
        if (st.reachable != (lines >= forced))
          fail("vertical_slash: a count budget is reachable iff it covers the forced lines");
      };
      with_qk([&](const auto& q, const auto& k) {
        if (kind == kVsExact) {
          sm::VerticalSlashSelection<sm::VerticalSlash::Mask> sel;
          if (!expect(bad, "VerticalSlash::select", [&] { sel = method.select(q, k, budget(), so); }))
            return;
          check_stats(sel.stats, sel.mask, "vertical_slash");
          check_reachable(sel.stats, q.tokens, k.tokens);
          // Invariants: every query sees itself (local_offsets >= 1) and the sink columns.
          const auto& m = sel.mask;
          const MaskShape& s = m.shape();
          for (index_t h = 0; h < s.heads; ++h) {
            const auto dm = to_dense(m, h);
            for (index_t i = 0; i < s.n_q; ++i) {
              const index_t pos = i + s.q_offset();
              if (method.local_offsets >= 1 && !dm(i, pos)) fail("vertical_slash: query misses itself");
              for (index_t j = 0; j < std::min(method.sink_columns, pos + 1); ++j)
                if (!dm(i, j)) fail("vertical_slash: query misses a sink column");
            }
          }
          go(m);
        } else {
          sm::VerticalSlashTiled tiled;
          tiled.block = method.block;
          tiled.last_queries = method.last_queries;
          tiled.sink_columns = method.sink_columns;
          tiled.local_offsets = method.local_offsets;
          tiled.vertical_share = method.vertical_share;
          sm::VerticalSlashSelection<sm::VerticalSlashTiled::Mask> sel;
          if (!expect(bad, "VerticalSlashTiled::select", [&] { sel = tiled.select(q, k, budget(), so); }))
            return;
          check_stats(sel.stats, sel.mask, "vertical_slash_tiled");
          check_reachable(sel.stats, q.tokens, k.tokens);
          // Tiled contains exact for the same V and S (V + S lines split V : S; the split only
          // clamps to the forced lines, which V and S already cover).
          const index_t v = sel.vertical, sl = sel.slash;
          if (v + sl >= 1) {
            sm::VerticalSlash exact = method;
            exact.vertical_share = static_cast<double>(v) / static_cast<double>(v + sl);
            const auto ex = exact.select(q, k, sm::Budget::count(v + sl), so);
            if (ex.vertical != v || ex.slash != sl)
              fail(detail::concat("vertical_slash: exact split V=", ex.vertical, " S=", ex.slash,
                                  ", tiled V=", v, " S=", sl));
            const auto& m = sel.mask;
            for (index_t h = 0; h < m.shape().heads; ++h) {
              const auto dt = to_dense(m, h), de = to_dense(ex.mask, h);
              for (index_t i = 0; i < dt.rows(); ++i)
                for (index_t j = 0; j < dt.cols(); ++j)
                  if (de(i, j) && !dt(i, j))
                    fail(detail::concat("vertical_slash: tiled misses exact element (", i, ", ", j, ")"));
            }
          }
          go(sel.mask);
        }
      });
      return;
    }
#endif
#if FUZZ_FLEX_PREFILL
    case kFlex: {
      AttentionOptions so = selection_options(fdp, p);
      sm::FlexPrefill method;
      method.block = bq;
      // gamma >= 1 is dense: the mass target p = 1.
      double gamma = std::min(1.0, fdp.ConsumeFloatingPointInRange<double>(0.05, 1.2));
      // A CR instead (FlexPrefill searches gamma for it), now and then: it runs 14 selections.
      const double cr =
          fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? fdp.ConsumeFloatingPointInRange<double>(1.0, 12.0) : 0.0;
      method.tau = fdp.ConsumeFloatingPointInRange<double>(0.0, 1.0);
      method.min_budget = fdp.ConsumeIntegralInRange<index_t>(0, 200);
      method.last_queries = fdp.ConsumeIntegralInRange<index_t>(1, 140);
      const int corrupt = fdp.ConsumeIntegralInRange<int>(0, 15);
      if (corrupt == 1) gamma = fdp.ConsumeBool() ? 0.0 : NAN;
      if (corrupt == 2) method.tau = fdp.ConsumeBool() ? -0.1 : NAN;
      if (corrupt == 3) method.min_budget = -1;
      if (corrupt == 4) method.block = 0;
      if (corrupt == 5) method.last_queries = 0;
      const bool bad = corrupt >= 1 && corrupt <= 5;
      note("flex gamma=", gamma, " cr=", cr, " tau=", method.tau, " min_budget=", method.min_budget,
           " w=", method.last_queries, " corrupt=", corrupt);
      if (p.bad == Bad::mask_geometry) p.bad = Bad::none;
      with_qk([&](const auto& q, const auto& k) {
        sm::FlexPrefillSelection sel;
        if (!expect(bad, "FlexPrefill::select", [&] {
              const sm::Budget budget = cr > 0.0 && corrupt != 1 ? sm::Budget::compression(cr)
                                                                 : sm::Budget::mass(gamma);
              sel = method.select(q, k, budget, so);
            }))
          return;
        check_stats(sel.stats, sel.mask, "flex_prefill");
        // Invariant: every query block keeps key block 0 and its diagonal block(s).
        const auto& m = sel.mask;
        const MaskShape& s = m.shape();
        for (index_t h = 0; h < s.heads; ++h)
          for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
            std::vector<index_t> kbs;
            m.for_each_block(h, qb, [&](index_t kb, bool) { kbs.push_back(kb); });
            const index_t d1 = (s.q_end(qb) - 1 + s.q_offset()) / s.block_k;
            if (kbs.empty() || kbs.front() != 0 || kbs.back() != d1)
              fail(detail::concat("flex_prefill: query block ", qb, " of head ", h,
                                  " lacks block 0 or its diagonal block ", d1));
          }
        go(m);
      });
      return;
    }
#endif
#if FUZZ_USER_MASK
    case kUserMask: {
      const bool shared = fdp.ConsumeBool();
      const int density = fdp.ConsumeIntegralInRange<int>(0, 4);
      const bool flags = fdp.ConsumeBool(), pred = fdp.ConsumeBool(), narrow = fdp.ConsumeBool();
      // 1 out of range, 2 duplicate, 3 unsorted, 4 future (causal), 5 offsets count,
      // 6 offsets decreasing, 7 last offset != size, 8 flag count, 9 offsets[0] != 0.
      int corrupt = fdp.ConsumeIntegralInRange<int>(0, 20);
      if (corrupt > 9) corrupt = 0;
      std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
      const index_t nh = shared ? 1 : shape.heads, nqb = shape.num_q_blocks();
      std::vector<index_t> off{0};
      std::vector<std::int32_t> col;
      bool corrupted = false;
      for (index_t h = 0; h < nh; ++h)
        for (index_t qb = 0; qb < nqb; ++qb) {
          const index_t last_pos = shape.q_end(qb) - 1 + shape.q_offset();
          const index_t legal = p.causal ? std::min(shape.num_k_blocks(), last_pos / bk + 1)
                                         : shape.num_k_blocks();
          std::vector<std::int32_t> row;
          for (index_t kb = 0; kb < legal; ++kb)
            if (static_cast<int>(rng() % 4) < density) row.push_back(static_cast<std::int32_t>(kb));
          if (!corrupted && corrupt >= 1 && corrupt <= 4 && rng() % 2 == 0) {
            if (corrupt == 1) row.push_back(static_cast<std::int32_t>(shape.num_k_blocks()));
            if (corrupt == 2 && !row.empty()) row.push_back(row.back());
            if (corrupt == 3 && row.size() >= 2) std::swap(row[0], row[1]);
            if (corrupt == 4 && p.causal && legal < shape.num_k_blocks())
              row.push_back(static_cast<std::int32_t>(legal));
            corrupted = corrupt == 1 || (corrupt == 2 && row.size() >= 2) ||
                        (corrupt == 3 && row.size() >= 2) ||
                        (corrupt == 4 && p.causal && legal < shape.num_k_blocks());
          }
          col.insert(col.end(), row.begin(), row.end());
          off.push_back(static_cast<index_t>(col.size()));
        }
      std::vector<std::uint8_t> full;
      if (flags) for (std::size_t e = 0; e < col.size(); ++e) full.push_back(rng() % 2);
      if (corrupt == 5) off.push_back(off.back()), corrupted = true;
      if (corrupt == 6 && off.size() >= 3 && off[1] > 0) off[1] = off[2] + 1, corrupted = true;
      if (corrupt == 7) col.push_back(0), corrupted = true;
      if (corrupt == 8) full.resize(col.size() + 1, 1), corrupted = true;
      if (corrupt == 9 && !col.empty() && off.size() >= 2) off[0] = 1, corrupted = true;
      note("user_mask shared=", shared, " density=", density, " flags=", flags, " pred=", pred,
           " narrow=", narrow, " corrupt=", corrupt, " corrupted=", corrupted);
      if (pred) {
        BlockListMask<HashPredicate> m;
        if (expect(corrupted, "UserMask", [&] {
              m = sm::BasicUserMask<HashPredicate>(shape, shared, off, col, full,
                                                   HashPredicate{static_cast<std::uint32_t>(rng())})
                      .mask;
            }))
          go(m);
      } else if (narrow) {  // int32 offsets, uint16 indices (wide values must not wrap to valid)
        std::vector<std::int32_t> off32(off.begin(), off.end());
        std::vector<std::uint16_t> col16(col.begin(), col.end());
        sm::BlockCsr<std::int32_t, std::uint16_t> csr;
        csr.row_offsets = off32;
        csr.col_indices = col16;
        csr.full = full;
        csr.head_shared = shared;
        BlockListMask<AllowAll> m;
        if (expect(corrupted, "UserMask", [&] { m = sm::UserMask(shape, csr).mask; }))
          go(m);
      } else {
        BlockListMask<AllowAll> m;
        if (expect(corrupted, "UserMask",
                   [&] { m = sm::UserMask(shape, shared, off, col, full).mask; }))
          go(m);
      }
      return;
    }
#endif
    default:
      go(IntervalMask(shape, 0, 0));
  }
}

// ---------------------------------------------------------------------------------------------
// Decode over raw views with a KeySelection
// ---------------------------------------------------------------------------------------------

template <class TQ, class TKV, class TO>
void decode_case(FuzzedDataProvider& fdp) {
  const index_t hkv = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  const index_t G = fdp.ConsumeIntegralInRange<index_t>(1, 4), hq = hkv * G;
  const index_t n_k = fdp.ConsumeIntegralInRange<index_t>(0, 200);
  const index_t n_q = fdp.ConsumeIntegralInRange<index_t>(0, std::min<index_t>(n_k, 6));
  const index_t d = pick_dim(fdp), dv = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? pick_dim(fdp) : d;
  DecodeOptions opt;
  opt.causal = fdp.ConsumeIntegralInRange<int>(0, 3) != 0;
  const index_t splits[] = {16, 17, 33, 64, 100, 512};
  opt.split = fdp.PickValueInArray(splits);
  const Precision precisions[] = {Precision::automatic, Precision::float32, Precision::bfloat16};
  opt.precision = fdp.PickValueInArray(precisions);
  opt.num_threads = pick_threads(fdp);
  const bool with_lse = fdp.ConsumeBool();
  // Selection: 0 all, 1 tokens, 2 pages, 3 ranges; scope per KV head or per query head.
  const int sel_kind = fdp.ConsumeIntegralInRange<int>(0, 3);
  const bool per_q = fdp.ConsumeBool();
  const index_t page = fdp.ConsumeIntegralInRange<index_t>(1, 40);
  const int density = fdp.ConsumeIntegralInRange<int>(0, 4);
  // 1 unsorted tokens, 2 duplicate token, 3 page out of range, 4 wrong unit count,
  // 5 range beyond the cache, 6 split < 16, 7 K/V token mismatch.
  int corrupt = fdp.ConsumeIntegralInRange<int>(0, 20);
  if (corrupt > 7) corrupt = 0;
  Values vals = make_values(fdp);
  const Layout lq = pick_layout(fdp), lk = pick_layout(fdp), lv = pick_layout(fdp),
               lo = pick_layout(fdp);
  std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
  const auto scope = per_q ? KeySelection::Scope::per_q_head : KeySelection::Scope::per_kv_head;
  const index_t units = per_q ? hq : hkv;
  note("| decode hq=", hq, " hkv=", hkv, " n_q=", n_q, " n_k=", n_k, " d=", d, " dv=", dv,
       " causal=", opt.causal, " split=", opt.split, " precision=", precision_name(opt.precision), " threads=",
       opt.num_threads, " sel=", sel_kind, " per_q=", per_q, " page=", page, " density=", density,
       " corrupt=", corrupt, " types=", dtype_name<TQ>(), "/", dtype_name<TKV>(), "/",
       dtype_name<TO>(), " precision=", precision_name(opt.precision), " layouts=", layout_name(lq), ",", layout_name(lk), ",",
       layout_name(lv), ",", layout_name(lo));

  bool bad = false;
  KeySelection sel;
  std::vector<std::vector<std::uint8_t>> chosen(static_cast<std::size_t>(units),
                                                std::vector<std::uint8_t>(static_cast<std::size_t>(n_k), 1));
  if (sel_kind != 0) {
    std::vector<std::vector<index_t>> lists(static_cast<std::size_t>(units));
    const index_t npages = (n_k + page - 1) / page;
    const index_t universe = sel_kind == 2 ? npages : n_k;
    for (auto& l : lists)
      for (index_t x = 0; x < universe; ++x)
        if (static_cast<int>(rng() % 4) < density) l.push_back(x);
    bool build_bad = false;
    if (corrupt == 1 && !lists.empty() && lists[0].size() >= 2 && sel_kind == 1)
      std::swap(lists[0][0], lists[0][1]), build_bad = true;
    if (corrupt == 2 && !lists.empty() && !lists[0].empty() && sel_kind == 1)
      lists[0].push_back(lists[0].back()), build_bad = true;
    if (corrupt == 3 && sel_kind == 2) lists[0].push_back(npages + static_cast<index_t>(rng() % 3)), build_bad = true;
    if (corrupt == 4) lists.push_back({}), bad = true;
    for (index_t u = 0; u < units; ++u) {
      auto& c = chosen[static_cast<std::size_t>(u)];
      std::fill(c.begin(), c.end(), 0);
      for (index_t x : lists[static_cast<std::size_t>(u)])
        for (index_t j = sel_kind == 2 ? x * page : x;
             j < std::min(n_k, sel_kind == 2 ? (x + 1) * page : x + 1); ++j)
          c[static_cast<std::size_t>(j)] = 1;
    }
    const bool ok = expect(build_bad, "KeySelection", [&] {
      if (sel_kind == 2) {
        sel = KeySelection::from_pages(scope, lists, page, n_k);
      } else if (sel_kind == 1) {
        sel = KeySelection::from_tokens(scope, lists);
      } else {  // ranges: coalesce tokens into runs
        std::vector<std::vector<KeyRange>> rl(lists.size());
        for (std::size_t u = 0; u < lists.size(); ++u)
          for (index_t t : lists[u]) {
            if (!rl[u].empty() && rl[u].back().end == t) ++rl[u].back().end;
            else rl[u].push_back({t, t + 1});
          }
        if (corrupt == 5) rl[0].push_back({n_k, n_k + 2}), bad = true;
        sel = KeySelection::from_ranges(scope, rl);
      }
    });
    if (!ok) return;
  }
  if (corrupt == 6) opt.split = 15, bad = true;
  const index_t v_tokens = corrupt == 7 ? n_k + 1 : n_k;
  if (corrupt == 7) bad = true;
  // bf16 products: Precision::bfloat16 (needs bf16 K and V, else an error) or automatic with
  // q, K and V all bf16.
  constexpr bool all_bf16 = std::is_same_v<TQ, bf16> && std::is_same_v<TKV, bf16>;
  if (opt.precision == Precision::bfloat16 && !std::is_same_v<TKV, bf16>) bad = true;
  const bool bf16_products = std::is_same_v<TKV, bf16> &&
                             (opt.precision == Precision::bfloat16 || (opt.precision == Precision::automatic && all_bf16));

  Storage<TQ> q(hq, n_q, d, lq, TQ(NAN));
  Storage<TKV> k(hkv, n_k, d, lk, TKV(NAN)), v(hkv, v_tokens, dv, lv, TKV(NAN));
  vals.fill(q.view);
  vals.fill(k.view);
  vals.fill(v.view);
  const TO sentinel = from_float<TO>(-999.0f);
  Storage<TO> out(hq, n_q, dv, lo, sentinel);
  std::vector<float> lse(static_cast<std::size_t>(std::max<index_t>(1, hq * n_q)), -7.0f);
  if (with_lse) opt.lse = LseView(lse.data(), n_q);
  if (!expect(bad, "decode", [&] { decode(q.cview(), k.cview(), v.cview(), out.view, sel, opt); })) {
    check_untouched(out, sentinel, lse, "decode");
    return;
  }
  const double scale = static_cast<double>(1.0f / std::sqrt(static_cast<float>(d)));
  const bool dot = bf16_products;
  const Expected e = oracle(
      q.cview(), k.cview(), v.cview(), scale,
      [&](index_t h, index_t i, index_t j) {
        const index_t u = sel.scope() == KeySelection::Scope::all ? 0 : (per_q ? h : h / G);
        if (opt.causal && j > n_k - n_q + i) return false;
        return chosen[static_cast<std::size_t>(u)][static_cast<std::size_t>(j)] != 0;
      },
      dot ? 1.0 / 128 : 0.0);
  check_output(out, out.inside(), sentinel, with_lse ? &lse : nullptr, e, n_k, dot ? 1.0 / 128 : 0.0,
               "decode");
  Storage<TO> out2(hq, n_q, dv, lo, sentinel);
  DecodeOptions opt2 = opt;
  opt2.num_threads = opt.num_threads % 3 + 1;
  opt2.lse = LseView();
  decode(q.cview(), k.cview(), v.cview(), out2.view, sel, opt2);
  if (!same_bits(out, out2)) fail("decode: output bits differ between thread counts");
}

// ---------------------------------------------------------------------------------------------
// KV cache: append (contiguous / paged), optional eviction, Quest or dense decode
// ---------------------------------------------------------------------------------------------

template <class T, kv::Layout L>
void cache_case(FuzzedDataProvider& fdp) {
  const index_t hkv = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  const index_t G = fdp.ConsumeIntegralInRange<index_t>(1, 4), hq = hkv * G;
  const index_t n_p = fdp.ConsumeIntegralInRange<index_t>(1, 96);  // prompt
  const index_t n_new = fdp.ConsumeIntegralInRange<index_t>(1, 4);  // decode tokens per step
  const index_t steps = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  const index_t d = pick_dim(fdp), dv = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? pick_dim(fdp) : d;
  kv::CacheOptions co;
  co.kv_heads = hkv;
  co.head_dim = d;
  co.value_dim = dv;
  co.page_size = fdp.ConsumeIntegralInRange<index_t>(1, 33);
  co.page_table = fdp.ConsumeBool() ? kv::PageTable::shared : kv::PageTable::per_kv_head;
  const index_t total = n_p + n_new * steps;
  co.capacity = total + fdp.ConsumeIntegralInRange<index_t>(0, 20);
  // Eviction after the prompt: 0 none, 1 snapkv, 2 ada_snapkv, 3 h2o, 4 streaming.
  const int eviction = fdp.ConsumeIntegralInRange<int>(0, 4);
  const bool quest = fdp.ConsumeBool();
  const bool per_q = fdp.ConsumeBool();
  const double cr = fdp.ConsumeFloatingPointInRange<double>(1.0, 8.0);
  const index_t budget = fdp.ConsumeBool() ? fdp.ConsumeIntegralInRange<index_t>(1, 64) : 0;
  const index_t chunks = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  const int threads = pick_threads(fdp);
  // 1 append beyond capacity (must throw and leave the cache intact), 2 Quest CR < 1,
  // 3 Quest q head_dim mismatch, 4 SnapKV window 0, 5 capacity 0.
  int corrupt = fdp.ConsumeIntegralInRange<int>(0, 15);
  if (corrupt > 5) corrupt = 0;
  Values vals = make_values(fdp);
  note("| cache type=", dtype_name<T>(), " paged=", L == kv::Layout::paged, " table_shared=",
       co.page_table == kv::PageTable::shared, " hq=", hq, " hkv=", hkv, " n_p=", n_p,
       " n_new=", n_new, " steps=", steps, " d=", d, " dv=", dv, " P=", co.page_size,
       " cap=", co.capacity, " eviction=", eviction, " quest=", quest, " per_q=", per_q,
       " cr=", cr, " budget=", budget, " chunks=", chunks, " threads=", threads,
       " corrupt=", corrupt);

  if (corrupt == 5) {
    kv::CacheOptions bad = co;
    bad.capacity = 0;
    expect(true, "kv::Cache", [&] { kv::Cache<T, L> c(bad); });
    return;
  }
  // Full-sequence tensors (positions 0 .. total-1) in fp32, rounded to T as the cache stores them.
  std::vector<float> Q(static_cast<std::size_t>(hq * total * d)), K(static_cast<std::size_t>(hkv * total * d)),
      V(static_cast<std::size_t>(hkv * total * dv));
  for (float& x : Q) x = vals.next();
  for (float& x : K) x = to_float(from_float<T>(vals.next()));
  for (float& x : V) x = to_float(from_float<T>(vals.next()));
  auto qs = [&](index_t t0, index_t m) {
    return TensorView<const float>(Q.data(), hq, total, d).slice_tokens(t0, m);
  };
  auto ks = [&](index_t t0, index_t m) {
    return TensorView<const float>(K.data(), hkv, total, d).slice_tokens(t0, m);
  };
  auto vs = [&](index_t t0, index_t m) {
    return TensorView<const float>(V.data(), hkv, total, dv).slice_tokens(t0, m);
  };

  kv::Cache<T, L> cache(co);
  // Prompt in `chunks` appends (an empty append is allowed).
  {
    index_t t = 0;
    for (index_t c = 0; c < chunks; ++c) {
      const index_t m = c + 1 == chunks ? n_p - t : fdp.ConsumeIntegralInRange<index_t>(0, n_p - t);
      cache.append(ks(t, m), vs(t, m));
      t += m;
    }
  }
  if (corrupt == 1) {  // beyond capacity: throws, the cache is unchanged
    const index_t len = cache.length(0), free_pages = cache.free_pages();
    const index_t extra = co.capacity - n_p + 1;
    std::vector<float> kk(static_cast<std::size_t>(hkv * extra * d), 1.0f),
        vv(static_cast<std::size_t>(hkv * extra * dv), 1.0f);
    expect(true, "kv::Cache::append", [&] {
      cache.append(TensorView<const float>(kk.data(), hkv, extra, d),
                   TensorView<const float>(vv.data(), hkv, extra, dv));
    });
    if (cache.length(0) != len || cache.sequence_length() != n_p || cache.free_pages() != free_pages)
      fail("kv::Cache::append: a rejected append changed the cache");
  }
  // One budget for every method: a count of tokens (per KV head; Quest: tokens -> pages) or a CR.
  const methods::Budget b =
      budget > 0 ? methods::Budget::count(budget) : methods::Budget::compression(cr);
  AttentionOptions mo;  // the methods' options (scale: the default, as the kernel's below)
  mo.num_threads = threads;
  // An eviction's statistics: pairs = tokens kept, reachability by the one rule for CR targets.
  auto check_eviction = [&](const kv::EvictionPlan& plan, const char* what) {
    if (plan.stats.pairs != cache.total_length() ||
        plan.stats.dense_pairs != cache.sequence_length() * hkv)
      fail(detail::concat(what, ": stats say ", plan.stats.pairs, " of ", plan.stats.dense_pairs,
                          " tokens kept, the cache holds ", cache.total_length()));
    if (b.is_compression() && plan.stats.reachable != methods::is_reachable(b, plan.stats.compression()))
      fail(detail::concat(what, ": reachable=", plan.stats.reachable, " at CR ",
                          plan.stats.compression(), " for ", b.str()));
  };
  // H2O's step uses the decode kernel's key mass (no second pass) when this is set.
  const bool h2o_kernel_mass = fdp.ConsumeBool();
  // Eviction after the prompt, scored with the prompt's queries.
  methods::H2O::State h2o;
  {
    methods::SnapKV snap;
    snap.window = fdp.ConsumeIntegralInRange<index_t>(1, 40);
    snap.pool_kernel = 2 * fdp.ConsumeIntegralInRange<index_t>(0, 4) + 1;
    const bool bad = corrupt == 4 && (eviction == 1 || eviction == 2);
    if (bad) snap.window = 0;
    const auto qp = qs(0, n_p);
    // A rejected eviction must leave every head's slots (count and positions) as they were.
    auto slots = [&] {
      std::vector<index_t> r;
      for (index_t h = 0; h < hkv; ++h) {
        r.push_back(cache.length(h));
        for (index_t i = 0; i < cache.length(h); ++i) r.push_back(cache.position(h, i));
      }
      return r;
    };
    const std::vector<index_t> before = slots();
    auto rejected = [&](const char* what) {
      if (slots() != before) fail(detail::concat(what, ": a rejected eviction changed the cache"));
    };
    kv::EvictionPlan plan;
    switch (eviction) {
      case 1:
        if (!expect(bad, "SnapKV::evict", [&] { plan = sm::evict(snap, qp, cache, b, mo); }))
          return rejected("SnapKV::evict");
        check_eviction(plan, "SnapKV::evict");
        break;
      case 2: {
        methods::AdaSnapKV ada;
        ada.window = snap.window;
        ada.pool_kernel = snap.pool_kernel;
        if (!expect(bad, "AdaSnapKV::evict", [&] { plan = sm::evict(ada, qp, cache, b, mo); }))
          return rejected("AdaSnapKV::evict");
        check_eviction(plan, "AdaSnapKV::evict");
        break;
      }
      case 3:
        h2o.reset(cache, b);
        h2o.observe(qp, cache, mo, true);
        plan = h2o.select(cache);
        h2o.apply(plan, cache);
        check_eviction(plan, "H2O");
        break;
      case 4: {
        methods::StreamingLLM st;
        st.sinks = fdp.ConsumeIntegralInRange<index_t>(0, 6);
        check_eviction(sm::evict(st, TensorView<const float>(), cache, b), "StreamingLLM");
        break;
      }
      default: break;
    }
  }
  // Decode steps: append the step's K/V, select, attend, compare with the oracle over the kept
  // positions; H2O and StreamingLLM evict again after each step.
  for (index_t s = 0; s < steps; ++s) {
    const index_t t0 = n_p + s * n_new;
    cache.append(ks(t0, n_new), vs(t0, n_new));
    const auto q = qs(t0, n_new);
    KeySelection keys = KeySelection::all();
    if (quest) {
      methods::Quest qm;
      qm.per_query_head = per_q;
      const bool bad = corrupt == 2 || corrupt == 3;
      std::vector<float> qbad;
      TensorView<const float> qq = q;
      if (corrupt == 3) {
        qbad.assign(static_cast<std::size_t>(hq * n_new * (d + 1)), 0.5f);
        qq = TensorView<const float>(qbad.data(), hq, n_new, d + 1);
      }
      methods::DecodeSelection plan;
      if (!expect(bad, "Quest::select", [&] {
            plan = qm.select(qq, cache, corrupt == 2 ? methods::Budget::compression(0.5) : b, mo);
          }))
        return;
      keys = plan.keys;
      // The current page(s) are always attended.
      if (keys.scope() != KeySelection::Scope::all)
        for (index_t u = 0; u < keys.units(); ++u) {
          const index_t hk = per_q ? u / G : u, len = cache.length(hk);
          const index_t first_cur = (len - n_new) / co.page_size * co.page_size;
          index_t covered = 0;
          for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
            covered += std::max<index_t>(0, std::min(r->end, len) - std::max(r->begin, first_cur));
          if (covered != len - first_cur) fail("quest: current page not attended");
        }
      const auto st = kv::decode_stats(keys, cache, hq, n_new);
      if (st.pairs != plan.stats.pairs || st.dense_pairs != plan.stats.dense_pairs)
        fail("quest: stats disagree with decode_stats");
      if (b.is_compression() && plan.stats.reachable != methods::is_reachable(b, plan.stats.compression()))
        fail(detail::concat("quest: reachable=", plan.stats.reachable, " at CR ",
                            plan.stats.compression(), " for ", b.str()));
    }
    std::vector<float> out(static_cast<std::size_t>(hq * n_new * dv), -5.0f),
        out2(out.size(), -5.0f), lse(static_cast<std::size_t>(hq * n_new), -7.0f);
    DecodeOptions o;
    o.num_threads = threads;
    o.lse = LseView(lse.data(), n_new);
    // H2O: the kernel's per-key mass in the same pass, [Hkv][max_length()].
    const bool with_mass = eviction == 3 && h2o_kernel_mass;
    std::vector<float> mass(with_mass ? static_cast<std::size_t>(hkv * cache.max_length()) : 0);
    if (with_mass) o.key_mass = {mass.data(), cache.max_length(), 0};
    const TensorView<float> ov(out.data(), hq, n_new, dv);
    decode(q, cache, ov, keys, o);
    if (with_mass)  // every row's probabilities sum to 1: G x n_new per KV head
      for (index_t hk = 0; hk < hkv; ++hk) {
        double sum = 0.0;
        for (index_t j = 0; j < cache.max_length(); ++j)
          sum += mass[static_cast<std::size_t>(hk * cache.max_length() + j)];
        const double want = static_cast<double>(G * n_new);
        if (!(std::fabs(sum - want) <= 1e-4 * want))
          fail(detail::concat("decode key mass: KV head ", hk, " sums to ", sum, ", expected ", want));
      }
    // Oracle: each head's kept (selected) positions, causal by position.
    std::vector<std::vector<std::uint8_t>> allowed(static_cast<std::size_t>(hq),
                                                   std::vector<std::uint8_t>(static_cast<std::size_t>(total), 0));
    for (index_t h = 0; h < hq; ++h) {
      const index_t hk = h / G, len = cache.length(hk);
      std::vector<std::uint8_t> sel(static_cast<std::size_t>(len), 1);
      if (keys.scope() != KeySelection::Scope::all) {
        std::fill(sel.begin(), sel.end(), 0);
        const index_t u = keys.scope() == KeySelection::Scope::per_q_head ? h : hk;
        for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
          for (index_t j = r->begin; j < std::min(r->end, len); ++j) sel[static_cast<std::size_t>(j)] = 1;
      }
      for (index_t slot = 0; slot < len; ++slot)
        if (sel[static_cast<std::size_t>(slot)])
          allowed[static_cast<std::size_t>(h)][static_cast<std::size_t>(cache.position(hk, slot))] = 1;
    }
    const Expected e = oracle(q, TensorView<const float>(K.data(), hkv, total, d),
                              TensorView<const float>(V.data(), hkv, total, dv),
                              static_cast<double>(1.0f / std::sqrt(static_cast<float>(d))),
                              [&](index_t h, index_t i, index_t j) {
                                return j <= t0 + i &&
                                       allowed[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)] != 0;
                              });
    Storage<float> os(hq, n_new, dv, Layout::head_major, -5.0f);
    os.buf = out;
    os.view.data = os.buf.data();
    check_output(os, os.inside(), -5.0f, &lse, e, total, 0.0, "decode(q, cache)");
    // Same bits at another thread count.
    DecodeOptions o2 = o;
    o2.num_threads = threads % 3 + 1;
    o2.lse = LseView();
    o2.key_mass = KeyMassView{};
    decode(q, cache, TensorView<float>(out2.data(), hq, n_new, dv), keys, o2);
    if (std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)) != 0)
      fail("decode(q, cache): output bits differ between thread counts");
    if (eviction == 3)
      check_eviction(with_mass ? h2o.step_mass(mass.data(), cache.max_length(), cache)
                               : h2o.step(q, cache, mo),
                     "H2O::State::step");
    if (eviction == 4) {  // 2 sinks + a window of max(1, budget)
      methods::StreamingLLM st;
      st.sinks = 2;
      sm::evict(st, TensorView<const float>(), cache,
                methods::Budget::count(2 + std::max<index_t>(1, budget)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

// (Q, K/V, out) storage types: every type in every role, five combinations.
template <class F>
void with_types(int combo, F&& f) {
  switch (combo) {
    case 0: f(float{}, float{}, float{}); break;
    case 1: f(float{}, bf16{}, float{}); break;
    case 2: f(float{}, fp16{}, float{}); break;
    case 3: f(bf16{}, bf16{}, bf16{}); break;
    default: f(fp16{}, fp16{}, fp16{}); break;
  }
}

constexpr int kDecodeKind = kPrefillKinds;      // raw decode with a KeySelection
constexpr int kCacheKind = kPrefillKinds + 1;   // cache + eviction + Quest / dense
constexpr int kKinds = kPrefillKinds + 2;

}  // namespace

// OpenMP threads that spin between the many tiny parallel regions starve the fuzzing thread.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  setenv("OMP_WAIT_POLICY", "passive", 0);
  setenv("KMP_BLOCKTIME", "0", 0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  g_case.clear();
  const int kind = fdp.ConsumeIntegralInRange<int>(0, kKinds - 1);
  const int combo = fdp.ConsumeIntegralInRange<int>(0, 4);
  note("kind=", kind, " combo=", combo);
  try {
    if (kind < kPrefillKinds) {
      with_types(combo, [&](auto tq, auto tkv, auto to) {
        prefill_case<decltype(tq), decltype(tkv), decltype(to)>(fdp, kind);
      });
    } else if (kind == kDecodeKind) {
      with_types(combo, [&](auto tq, auto tkv, auto to) {
        decode_case<decltype(tq), decltype(tkv), decltype(to)>(fdp);
      });
    } else if (kind == kCacheKind) {
      const bool paged = fdp.ConsumeBool();
      switch (combo % 3) {
        case 0: paged ? cache_case<float, kv::Layout::paged>(fdp) : cache_case<float, kv::Layout::contiguous>(fdp); break;
        case 1: paged ? cache_case<bf16, kv::Layout::paged>(fdp) : cache_case<bf16, kv::Layout::contiguous>(fdp); break;
        default: paged ? cache_case<fp16, kv::Layout::paged>(fdp) : cache_case<fp16, kv::Layout::contiguous>(fdp); break;
      }
    }
  } catch (const sparse_attn::invalid_argument& e) {
    fail(std::string("valid input rejected (uncaught): ") + e.what());
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  static const bool verbose = std::getenv("FUZZ_ATTENTION_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "case: %s\n", g_case.c_str());
  return 0;
}
