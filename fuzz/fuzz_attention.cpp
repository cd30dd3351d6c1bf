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
// Build and run: docs/ROBUSTNESS.md, section "Fuzzing".
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
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
#include <sparse_attn/methods/dense.hpp>
#include <sparse_attn/methods/h2o.hpp>
#include <sparse_attn/methods/quest.hpp>
#include <sparse_attn/methods/sliding_window.hpp>
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
#if __has_include(<sparse_attn/methods/xattention.hpp>)
#include <sparse_attn/methods/xattention.hpp>
#define FUZZ_XATTENTION 1
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

// Whether n bytes at a and b are equal; true for n = 0, where an empty vector's data() may be
// null (memcmp's pointers must not be, even for n = 0: UBSan stops the fuzzer on it).
bool same_bytes(const void* a, const void* b, std::size_t n) { return n == 0 || std::memcmp(a, b, n) == 0; }

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
  Storage() = default;
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
         same_bytes(a.buf.data(), b.buf.data(), a.buf.size() * sizeof(TO));
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
  kUserMask, kXAttention, kPrefillKinds
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
      index_t window = 0, sinks = 0, dense_rows = 0;
      if (kind == kWindow) {
        window = fdp.ConsumeIntegralInRange<index_t>(1, 100);
        sinks = fdp.ConsumeIntegralInRange<index_t>(0, 8);
        if (fdp.ConsumeBool()) dense_rows = fdp.ConsumeIntegralInRange<index_t>(0, 80);  // tri-shape
      }
      note("interval window=", window, " sinks=", sinks, " dense_rows=", dense_rows);
      const bool bad_window = fdp.ConsumeIntegralInRange<int>(0, 15) == 0;
      if (bad_window) {  // negative window or sinks, zero block: rejected by the mask
        note("bad_window");
        expect(true, "IntervalMask", [&] {
          MaskShape s2 = shape;
          const int which = fdp.ConsumeIntegralInRange<int>(0, 3);
          if (which == 0) s2.block_k = 0;
          IntervalMask m(s2, which == 1 ? -1 : window, which == 2 ? -1 : sinks,
                         which == 3 ? -1 : dense_rows);
        });
        return;
      }
      const IntervalMask m(shape, window, sinks, dense_rows);
      // The pattern's rule, written out: dense, or the sinks, the band and the last dense rows.
      const bool dense = window == 0 || window >= shape.n_k;
      for (index_t i = 0; i < shape.n_q; ++i)
        for (index_t j = 0; j < shape.n_k; ++j) {
          const index_t pos = i + shape.q_offset();
          const bool visible = !shape.causal || j <= pos;
          const bool in_band = shape.causal ? pos - j < window : std::abs(pos - j) < window;
          const bool want = visible && (dense || i >= shape.n_q - dense_rows || j < sinks || in_band);
          if (m.allowed(0, i, j) != want)
            fail(detail::concat("IntervalMask: allowed(0, ", i, ", ", j, ") = ", m.allowed(0, i, j),
                                ", the rule says ", want));
        }
      go(m);
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
      // A count of lines (V + S, possibly below the forced ones: then unreachable), a CR, or a
      // mass target with a floor and a cap (lines per head).
      double cr = 0.0, mass = 0.0;
      index_t lines = 0, mass_floor = 0, mass_cap = sm::Budget::kNoCap;
      const int how = fdp.ConsumeIntegralInRange<int>(0, 2);
      if (how == 0) {
        cr = fdp.ConsumeFloatingPointInRange<double>(1.0, 12.0);
      } else if (how == 1) {
        lines = fdp.ConsumeIntegralInRange<index_t>(
            1, method.sink_columns + method.local_offsets + 200);
      } else {
        mass = fdp.ConsumeFloatingPointInRange<double>(0.01, 1.0);
        if (fdp.ConsumeBool()) mass_floor = fdp.ConsumeIntegralInRange<index_t>(0, 250);
        if (fdp.ConsumeBool()) mass_cap = fdp.ConsumeIntegralInRange<index_t>(std::max<index_t>(mass_floor, 1), 300);
      }
      const int corrupt = fdp.ConsumeIntegralInRange<int>(0, 15);
      if (corrupt == 1) method.block = 0;
      if (corrupt == 2) method.last_queries = 0;
      if (corrupt == 3) method.vertical_share = fdp.ConsumeBool() ? 1.5 : NAN;
      if (corrupt == 4) lines = 0, mass = 0.0, cr = fdp.ConsumeBool() ? 0.5 : INFINITY;
      if (corrupt == 5) so.scale = -1.0f;
      const bool bad = corrupt >= 1 && corrupt <= 5;
      note(kind == kVsExact ? "vs_exact" : "vs_tiled", " lines=", lines, " share=",
           method.vertical_share, " cr=", cr, " mass=", mass, " floor=", mass_floor, " cap=",
           mass_cap, " w=", method.last_queries,
           " sinks=", method.sink_columns, " local=", method.local_offsets, " corrupt=", corrupt);
      if (p.bad == Bad::mask_geometry) p.bad = Bad::none;
      auto budget = [&] {
        return lines > 0  ? sm::Budget::count(lines)
               : mass > 0 ? sm::Budget::mass(mass, mass_floor, mass_cap)
                          : sm::Budget::compression(cr);
      };
      // A count budget is reachable iff it covers the forced lines (clamped to n_k), a mass
      // budget iff its cap does; a mass budget's heads keep between max(floor, forced) and
      // max(that, min(cap, 2 n_k)) lines.
      auto check_reachable = [&](const auto& sel, index_t n_q, index_t n_k) {
        const sm::SelectionStats& st = sel.stats;
        if ((lines == 0 && mass == 0.0) || n_q == 0) return;
        const index_t forced =
            std::min(method.sink_columns, n_k) + std::min(method.local_offsets, n_k);
        if (lines > 0 && st.reachable != (lines >= forced))
          fail("vertical_slash: a count budget is reachable iff it covers the forced lines");
        if (mass > 0.0) {
          if (st.reachable != (mass_cap >= forced))
            fail("vertical_slash: a mass budget is reachable iff its cap covers the forced lines");
          const index_t lo = std::max(mass_floor, forced), hi = std::max(lo, std::min(mass_cap, 2 * n_k));
          if (sel.head_vertical.size() != static_cast<std::size_t>(sel.mask.shape().heads))
            fail("vertical_slash: head_vertical does not hold one V per head");
          for (std::size_t h = 0; h < sel.head_vertical.size(); ++h) {
            const index_t l = sel.head_vertical[h] + sel.head_slash[h];
            if (l < std::min(lo, 2 * n_k) || l > hi || sel.head_vertical[h] > n_k || sel.head_slash[h] > n_k)
              fail(detail::concat("vertical_slash: head ", h, " keeps V=", sel.head_vertical[h], " S=",
                                  sel.head_slash[h], " outside [", lo, ", ", hi, "] lines"));
          }
        }
      };
      with_qk([&](const auto& q, const auto& k) {
        if (kind == kVsExact) {
          sm::VerticalSlashSelection<sm::VerticalSlash::Mask> sel;
          if (!expect(bad, "VerticalSlash::select", [&] { sel = method.select(q, k, budget(), so); }))
            return;
          check_stats(sel.stats, sel.mask, "vertical_slash");
          check_reachable(sel, q.tokens, k.tokens);
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
          check_reachable(sel, q.tokens, k.tokens);
          if (mass > 0.0) {  // the same per-head sets as exact, whose mask tiled contains
            const auto ex = method.select(q, k, budget(), so);
            if (ex.head_vertical != sel.head_vertical || ex.head_slash != sel.head_slash)
              fail("vertical_slash: exact and tiled mass selections keep different lines");
            for (index_t h = 0; h < sel.mask.shape().heads; ++h) {
              const auto dt = to_dense(sel.mask, h), de = to_dense(ex.mask, h);
              for (index_t i = 0; i < dt.rows(); ++i)
                for (index_t j = 0; j < dt.cols(); ++j)
                  if (de(i, j) && !dt(i, j))
                    fail(detail::concat("vertical_slash: tiled misses exact element (", i, ", ", j, ")"));
            }
          }
          // Tiled contains exact for the same V and S (V + S lines split V : S; the split only
          // clamps to the forced lines, which V and S already cover).
          const index_t v = sel.vertical, sl = sel.slash;
          if (mass == 0.0 && v + sl >= 1) {
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
#if FUZZ_XATTENTION
    case kXAttention: {
      AttentionOptions so = selection_options(fdp, p);
      sm::XAttention method;
      method.block = bq;
      std::vector<index_t> divisors;  // strides that divide the block
      for (index_t s = 1; s <= bq; ++s)
        if (bq % s == 0) divisors.push_back(s);
      method.stride = divisors[fdp.ConsumeIntegralInRange<std::size_t>(0, divisors.size() - 1)];
      double tau = fdp.ConsumeFloatingPointInRange<double>(0.01, 1.0);
      // A CR instead (tau searched over the entry thresholds), now and then.
      const double cr = fdp.ConsumeIntegralInRange<int>(0, 2) == 0
                            ? fdp.ConsumeFloatingPointInRange<double>(1.0, 12.0)
                            : 0.0;
      const int corrupt = fdp.ConsumeIntegralInRange<int>(0, 15);
      if (corrupt == 1) method.block = 0;
      if (corrupt == 2) method.stride = bq + 1;  // cannot divide the block
      if (corrupt == 3) method.stride = fdp.ConsumeBool() ? 0 : -3;
      if (corrupt == 4) tau = fdp.ConsumeBool() ? 0.0 : NAN;
      const bool bad = corrupt >= 1 && corrupt <= 4;
      note("xattention tau=", tau, " cr=", cr, " stride=", method.stride, " corrupt=", corrupt);
      if (p.bad == Bad::mask_geometry) p.bad = Bad::none;
      with_qk([&](const auto& q, const auto& k) {
        sm::XAttentionSelection sel;
        if (!expect(bad, "XAttention::select", [&] {
              const sm::Budget budget = cr > 0.0 && corrupt != 4 ? sm::Budget::compression(cr)
                                                                 : sm::Budget::mass(tau);
              sel = method.select(q, k, budget, so);
            }))
          return;
        check_stats(sel.stats, sel.mask, "xattention");
        // Invariants: every query block keeps key block 0 and its diagonal blocks; tau = 1 is
        // dense causal.
        const auto& m = sel.mask;
        const MaskShape& s = m.shape();
        for (index_t h = 0; h < s.heads; ++h)
          for (index_t qb = 0; qb < s.num_q_blocks(); ++qb) {
            std::vector<index_t> kbs;
            m.for_each_block(h, qb, [&](index_t kb, bool) { kbs.push_back(kb); });
            const index_t d0 = (s.q_begin(qb) + s.q_offset()) / s.block_k;
            const index_t d1 = (s.q_end(qb) - 1 + s.q_offset()) / s.block_k;
            bool forced = !kbs.empty() && kbs.front() == 0 && kbs.back() == d1;
            for (index_t kb = d0; kb <= d1 && forced; ++kb)
              forced = std::find(kbs.begin(), kbs.end(), kb) != kbs.end();
            if (!forced)
              fail(detail::concat("xattention: query block ", qb, " of head ", h,
                                  " lacks block 0 or a diagonal block"));
          }
        if (sel.tau >= 1.0 && sel.stats.pairs != sel.stats.dense_pairs)
          fail("xattention: tau = 1 is not dense causal");
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
  // Quest's budget: 0 the common one below, 1 a mass budget per unit, 2 a shared mass threshold.
  const int quest_mass = fdp.ConsumeIntegralInRange<int>(0, 2);
  const double mass_p = fdp.ConsumeFloatingPointInRange<double>(1e-3, 1.0);
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
       " quest_mass=", quest_mass, " p=", mass_p,
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
      qm.shared_mass = quest_mass == 2;
      const methods::Budget qb = quest_mass > 0 ? methods::Budget::mass(mass_p) : b;
      const bool bad = corrupt == 2 || corrupt == 3;
      std::vector<float> qbad;
      TensorView<const float> qq = q;
      if (corrupt == 3) {
        qbad.assign(static_cast<std::size_t>(hq * n_new * (d + 1)), 0.5f);
        qq = TensorView<const float>(qbad.data(), hq, n_new, d + 1);
      }
      methods::DecodeSelection plan;
      if (!expect(bad, "Quest::select", [&] {
            plan = qm.select(qq, cache, corrupt == 2 ? methods::Budget::compression(0.5) : qb, mo);
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
      if (qb.is_compression() && plan.stats.reachable != methods::is_reachable(qb, plan.stats.compression()))
        fail(detail::concat("quest: reachable=", plan.stats.reachable, " at CR ",
                            plan.stats.compression(), " for ", qb.str()));
      if (qb.is_mass() && !plan.stats.reachable) fail("quest: a mass budget is always honoured");
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
    if (!same_bytes(out.data(), out2.data(), out.size() * sizeof(float)))
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
// Raw mode: the public constructors and entry points fed straight from fuzzer bytes
// ---------------------------------------------------------------------------------------------
//
// Unlike the modes above, nothing here goes through a builder: BlockListMask's raw CSR
// constructor, methods::UserMask (int64 / int32 / uint16 CSR), MaskShape with extreme fields,
// IntervalMask and masks::*, KeySelection::from_tokens / from_pages / from_ranges, TensorView /
// LseView with raw extents and strides, kv::Cache with raw options (and its paged views),
// kv::PagedView with raw page tables, plan_prefill / plan_decode with raw shapes and workspaces,
// methods::Budget with raw kinds and values passed to every method's select. Contract: each call
// throws sparse_attn::invalid_argument ("<where>: ..."), or std::bad_alloc for a valid request
// too large to allocate, or succeeds; the harness predicts which from its own reading of the
// documented rules (docs/ROBUSTNESS.md) and aborts on a disagreement. An accepted object must be
// consistent (pairs() == count_pairs == its dense export) and usable: the kernel runs with it on
// small data and is compared with the double oracle.
//
// A raw integer: mostly in [lo, hi], sometimes an extreme value or any int64.
index_t raw_index(FuzzedDataProvider& fdp, index_t lo, index_t hi) {
  const int how = fdp.ConsumeIntegralInRange<int>(0, 15);
  if (how < 14) return fdp.ConsumeIntegralInRange<index_t>(lo, hi);
  if (how == 14) {
    const index_t ext[] = {0, -1, -2, 1, (index_t{1} << 31) - 1, index_t{1} << 31, -(index_t{1} << 31),
                           index_t{1} << 32, index_t{1} << 40, index_t{1} << 62,
                           std::numeric_limits<index_t>::max(), std::numeric_limits<index_t>::min(),
                           std::numeric_limits<index_t>::max() - 1, 65535, 65536, 32768};
    return fdp.PickValueInArray(ext);
  }
  return fdp.ConsumeIntegral<index_t>();
}

// A raw double for budgets: specials, boundaries or anything.
double raw_double(FuzzedDataProvider& fdp) {
  const double v[] = {NAN, INFINITY, -INFINITY, -1.0, 0.0, -0.0, 0.5, 1.0, 1.0 + 1e-16, 1.0000001,
                      2.0, 7.3, 1e300, 4.9e-324, 9.0e15, 9.0e15 - 1.0, 9007199254740993.0, 0.1, 1e-9,
                      3.0, 64.0, 1.5};
  const int how = fdp.ConsumeIntegralInRange<int>(0, 3);
  if (how == 0) return fdp.ConsumeFloatingPoint<double>();
  if (how == 1) return fdp.ConsumeFloatingPointInRange<double>(0.0, 16.0);
  return fdp.PickValueInArray(v);
}

std::string g_last_error;  // message of the last invalid_argument caught by attempt()

enum class Outcome { ok, invalid, bad_alloc };

// Runs f; classifies its end. Any exception but invalid_argument (in "<where>: <what>" form) and
// std::bad_alloc is a finding.
template <class F>
Outcome attempt(const char* what, F&& f) {
  try {
    f();
  } catch (const sparse_attn::invalid_argument& e) {
    g_last_error = e.what();
    if (g_last_error.find(": ") == std::string::npos || g_last_error.size() < 8)
      fail(std::string(what) + ": message not in '<where>: <what>' form: " + g_last_error);
    return Outcome::invalid;
  } catch (const std::bad_alloc&) {
    return Outcome::bad_alloc;
  } catch (const std::exception& e) {
    fail(std::string(what) + ": unexpected exception type: " + e.what());
  } catch (...) {
    fail(std::string(what) + ": unexpected non-std exception");
  }
  return Outcome::ok;
}

// why: the harness's reason the input is invalid ("" = valid). may_alloc: a valid request that may
// be too large to allocate. Returns true when the call succeeded.
bool judge(const char* what, const std::string& why, Outcome o, bool may_alloc = false) {
  note("->", o == Outcome::ok ? "ok" : o == Outcome::invalid ? "invalid" : "bad_alloc");
  if (o == Outcome::bad_alloc && !may_alloc)
    fail(std::string(what) + ": std::bad_alloc for a small request" + (why.empty() ? "" : " (invalid: " + why + ")"));
  if (!why.empty() && o == Outcome::ok) fail(std::string(what) + ": invalid input accepted: " + why);
  if (why.empty() && o == Outcome::invalid)
    fail(std::string(what) + ": valid input rejected: " + g_last_error);
  return o == Outcome::ok;
}

template <class T>
std::string vec_str(const std::vector<T>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size() && i < 48; ++i)
    s += (i ? "," : "") + std::to_string(static_cast<long long>(v[i]));
  if (v.size() > 48) s += ",...(" + std::to_string(v.size()) + ")";
  return s + "]";
}

std::string shape_str(const MaskShape& s) {
  return detail::concat("{heads=", s.heads, " n_q=", s.n_q, " n_k=", s.n_k, " bq=", s.block_q,
                        " bk=", s.block_k, " causal=", s.causal, "}");
}

constexpr index_t kMaxBlockSize = (index_t{1} << 31) - 1;

// The documented MaskShape rules ("" = valid).
std::string shape_problem(const MaskShape& s) {
  if (s.heads < 1) return "heads < 1";
  if (s.n_q < 0 || s.n_k < 0) return "negative n_q / n_k";
  if (s.n_q > s.n_k) return "n_q > n_k";
  if (s.block_q < 1 || s.block_k < 1) return "block < 1";
  if (s.block_q > kMaxBlockSize || s.block_k > kMaxBlockSize) return "block > 2^31 - 1";
  if (s.n_k >= (index_t{1} << 62)) return "n_k >= 2^62";
  index_t a = 0, b = 0;
  if (__builtin_mul_overflow(s.heads, s.n_q, &a) || __builtin_mul_overflow(a, s.n_k, &b))
    return "heads x n_q x n_k pairs overflow int64";
  return "";
}

// Rows of a block-CSR layout, -1 when the shape has none or heads x blocks overflows.
index_t csr_rows(const MaskShape& s, bool shared) {
  if (s.heads < 1 || s.n_q < 0 || s.block_q < 1) return -1;
  const index_t nqb = s.n_q == 0 ? 0 : (s.n_q - 1) / s.block_q + 1;
  index_t r = 0;
  if (__builtin_mul_overflow(shared ? index_t{1} : s.heads, nqb, &r)) return -1;
  return r;
}

// The documented CSR rules ("" = valid): row_offsets [rows + 1] from 0, non-decreasing, ending at
// the entry count; flags none or one per entry; key blocks in range, strictly increasing per row,
// no future block under a causal mask.
std::string csr_problem(const MaskShape& s, bool shared, const std::vector<index_t>& off,
                        const std::vector<index_t>& col, std::size_t nfull) {
  std::string w = shape_problem(s);
  if (!w.empty()) return w;
  const index_t rows = csr_rows(s, shared);
  if (rows < 0) return "rows overflow";
  if (static_cast<index_t>(off.size()) != rows + 1) return "row_offsets size != rows + 1";
  if (off[0] != 0) return "row_offsets[0] != 0";
  for (index_t r = 0; r < rows; ++r)
    if (off[static_cast<std::size_t>(r + 1)] < off[static_cast<std::size_t>(r)]) return "row_offsets decrease";
  if (off.back() != static_cast<index_t>(col.size())) return "row_offsets.back() != entries";
  if (nfull != 0 && nfull != col.size()) return "full flags: neither none nor one per entry";
  const index_t nqb = s.num_q_blocks(), nkb = s.num_k_blocks();
  for (index_t r = 0; r < rows; ++r) {
    const index_t qb = r % nqb;
    index_t prev = -1;
    for (index_t e = off[static_cast<std::size_t>(r)]; e < off[static_cast<std::size_t>(r + 1)]; ++e) {
      const index_t kb = col[static_cast<std::size_t>(e)];
      if (kb < 0 || kb >= nkb) return detail::concat("entry ", e, ": key block ", kb, " out of range");
      if (kb <= prev) return detail::concat("entry ", e, ": not strictly increasing");
      if (s.causal && s.k_begin(kb) > s.q_end(qb) - 1 + s.q_offset())
        return detail::concat("entry ", e, ": future block");
      prev = kb;
    }
  }
  return "";
}

// Whether key block kb of query block qb is cut by the causal diagonal.
bool crosses(const MaskShape& s, index_t qb, index_t kb) {
  return s.causal && s.k_end(kb) - 1 > s.q_begin(qb) + s.q_offset();
}

// Pairs of a valid CSR (harness count, independent of the library); -1 when too many cells to walk.
// full_eff(e, qb, kb): whether entry e counts as a full block.
template <class Pred, class FullOf>
index_t csr_count(const MaskShape& s, bool shared, const std::vector<index_t>& off,
                  const std::vector<index_t>& col, const Pred& pred, FullOf&& full_eff) {
  const index_t nqb = s.num_q_blocks(), rows = static_cast<index_t>(off.size()) - 1;
  index_t total = 0, cells = 0;
  (void)shared;
  for (index_t row = 0; row < rows; ++row) {  // (rows, not heads x blocks: heads may be huge when n_q = 0)
    {
      const index_t h = row / nqb, qb = row % nqb;
      const std::size_t r = static_cast<std::size_t>(row);
      for (index_t e = off[r]; e < off[r + 1]; ++e) {
        const index_t kb = col[static_cast<std::size_t>(e)];
        const index_t q0 = s.q_begin(qb), q1 = s.q_end(qb), k0 = s.k_begin(kb), k1 = s.k_end(kb);
        if (full_eff(e, qb, kb)) {
          total += (q1 - q0) * (k1 - k0);
          continue;
        }
        cells += (q1 - q0) * (k1 - k0);
        if (cells > 4000000) return -1;
        for (index_t i = q0; i < q1; ++i)
          for (index_t j = k0; j < k1; ++j)
            if ((!s.causal || j <= i + s.q_offset()) && pred(h, i, j)) ++total;
      }
    }
  }
  return shared ? total * s.heads : total;
}

// Small enough to run the kernel and the oracle on.
bool small_shape(const MaskShape& s) {
  return s.heads >= 1 && s.heads <= 8 && s.n_k <= 400 && s.n_q >= 0 && s.heads * s.n_q * s.n_k <= 40000;
}

// An accepted mask: consistent (check_mask) and usable (prefill vs the oracle), on float data.
template <class Mask>
void run_raw_mask(FuzzedDataProvider& fdp, const Mask& m, const char* what) {
  const MaskShape& s = m.shape();
  if (!small_shape(s)) return;
  check_mask(m, what);
  PrefillProblem p{};
  p.hq = s.heads;
  index_t g = fdp.ConsumeIntegralInRange<index_t>(1, 4);
  while (p.hq % g != 0) --g;
  p.hkv = p.hq / g;
  p.n_q = s.n_q;
  p.n_k = s.n_k;
  const index_t dims[] = {1, 2, 3, 8, 16, 17, 32};
  p.d = fdp.PickValueInArray(dims);
  p.dv = fdp.ConsumeBool() ? p.d : fdp.PickValueInArray(dims);
  p.causal = s.causal;
  p.threads = pick_threads(fdp);
  p.scale = NAN;
  p.lse = fdp.ConsumeBool();
  Values vals = make_values(fdp);
  const Layout lq = pick_layout(fdp), lk = pick_layout(fdp), lv = pick_layout(fdp), lo = pick_layout(fdp);
  run_prefill<float, float, float>(fdp, p, m, vals, lq, lk, lv, lo);
}

MaskShape raw_mask_shape(FuzzedDataProvider& fdp) {
  MaskShape s;
  s.heads = raw_index(fdp, 1, 4);
  s.n_k = raw_index(fdp, 0, 70);
  s.n_q = fdp.ConsumeBool() ? s.n_k
          : (s.n_k >= 0 && s.n_k <= 70 && fdp.ConsumeBool()) ? fdp.ConsumeIntegralInRange<index_t>(0, s.n_k)
                                                              : raw_index(fdp, 0, 70);
  s.block_q = raw_index(fdp, 1, 40);
  s.block_k = fdp.ConsumeBool() ? s.block_q : raw_index(fdp, 1, 40);
  s.causal = fdp.ConsumeIntegralInRange<int>(0, 3) != 0;
  return s;
}

struct RawCsr {
  MaskShape shape;
  bool shared = false;
  std::vector<index_t> off, col;
  std::vector<std::uint8_t> full;
};

// Block-CSR arrays from raw bytes: mostly a plausible layout of the shape (sometimes with one
// corrupted entry), sometimes raw arrays of any length and values.
RawCsr raw_csr(FuzzedDataProvider& fdp) {
  RawCsr c;
  c.shape = raw_mask_shape(fdp);
  c.shared = fdp.ConsumeBool();
  const MaskShape& s = c.shape;
  const int mode = fdp.ConsumeIntegralInRange<int>(0, 7);
  const index_t rows = csr_rows(s, c.shared);
  std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
  // (a plausible layout walks the shape's blocks: only for block sizes whose arithmetic is defined)
  if (mode <= 5 && rows >= 0 && rows <= 512 && s.n_k >= 0 && s.block_k >= 1 && s.block_q <= kMaxBlockSize &&
      s.block_k <= kMaxBlockSize) {
    const int density = fdp.ConsumeIntegralInRange<int>(0, 4);
    const index_t nqb = s.num_q_blocks(), nkb = s.num_k_blocks();
    c.off.push_back(0);
    for (index_t r = 0; r < rows; ++r) {
      const index_t qb = r % nqb;
      index_t legal = nkb;
      if (s.causal) legal = std::max<index_t>(0, std::min(nkb, (s.q_end(qb) - 1 + s.q_offset()) / s.block_k + 1));
      for (index_t kb = 0; kb < std::min<index_t>(legal, 64); ++kb)
        if (static_cast<int>(rng() % 4) < density) c.col.push_back(kb);
      c.off.push_back(static_cast<index_t>(c.col.size()));
    }
    if (mode == 5) {
      const int how = fdp.ConsumeIntegralInRange<int>(0, 6);
      const index_t v = raw_index(fdp, -1, 70);
      if (how == 0) c.off[rng() % c.off.size()] = v;
      if (how == 1 && !c.col.empty()) c.col[rng() % c.col.size()] = v;
      if (how == 2 && c.col.size() >= 2) std::swap(c.col[0], c.col[1]);
      if (how == 3 && !c.col.empty()) c.col.push_back(c.col.back()), ++c.off.back();
      if (how == 4) c.col.push_back(v), ++c.off.back();
      if (how == 5) c.off.pop_back();
      if (how == 6) c.off.push_back(c.off.back());
    }
  } else {
    c.off.resize(fdp.ConsumeIntegralInRange<std::size_t>(0, 10));
    for (auto& x : c.off) x = raw_index(fdp, -1, 8);
    c.col.resize(fdp.ConsumeIntegralInRange<std::size_t>(0, 16));
    for (auto& x : c.col) x = raw_index(fdp, -1, 8);
  }
  const int fmode = fdp.ConsumeIntegralInRange<int>(0, 5);
  std::size_t nf = fmode == 0 ? 0 : fmode == 4 ? fdp.ConsumeIntegralInRange<std::size_t>(0, c.col.size() + 2) : c.col.size();
  for (std::size_t e = 0; e < nf; ++e) c.full.push_back(fmode == 5 ? 1 : static_cast<std::uint8_t>(rng() % 2));
  note("csr shape=", shape_str(s), " shared=", c.shared, " mode=", mode, " off=", vec_str(c.off),
       " col=", vec_str(c.col), " full=", vec_str(c.full));
  return c;
}

// BlockListMask's raw constructor (int32 key blocks, raw known_pairs).
template <class Pred>
void raw_blocklist(FuzzedDataProvider& fdp, Pred pred) {
  RawCsr c = raw_csr(fdp);
  const MaskShape& s = c.shape;
  std::vector<std::int32_t> col32;
  for (auto& x : c.col) {
    col32.push_back(static_cast<std::int32_t>(x));
    x = col32.back();
  }
  // BlockListMask takes exactly one flag per entry; a full flag on a block the diagonal cuts is
  // downgraded to partial (documented), so the count treats it as partial.
  std::string why = csr_problem(s, c.shared, c.off, c.col, c.full.size());
  if (why.empty() && c.full.size() != c.col.size()) why = "full flags: not one per entry";
  const index_t correct =
      why.empty()
          ? csr_count(s, c.shared, c.off, c.col, pred,
                      [&](index_t e, index_t qb, index_t kb) {
                        return c.full[static_cast<std::size_t>(e)] != 0 && !crosses(s, qb, kb);
                      })
          : -1;
  // A valid list whose partial blocks are too many elements to count (O(listed blocks x b^2)):
  // valid but slow, not a finding.
  if (why.empty() && csr_count(s, c.shared, c.off, c.col, pred, [&](index_t e, index_t, index_t) {
        return static_cast<std::size_t>(e) < c.full.size() && c.full[static_cast<std::size_t>(e)] != 0;
      }) < 0)
    return note("skipped(valid, too many elements to count)");
  const int kp_mode = fdp.ConsumeIntegralInRange<int>(0, 3);
  index_t kp = -1;
  if (kp_mode == 1 && correct >= 0) kp = correct;
  if (kp_mode == 2 && correct >= 0) kp = raw_index(fdp, -3, 3000);
  if (kp_mode == 3 && correct >= 0) kp = correct + (fdp.ConsumeBool() ? 1 : -1);
  std::string why_kp = why;
  if (why_kp.empty() && kp < -1) why_kp = "known_pairs < -1";
  if (why_kp.empty() && kp >= 0 && kp != correct) why_kp = "known_pairs differs from the count (debug build)";
  note("blocklist_raw pred=", Pred::trivial ? "all" : "hash", " known_pairs=", kp, " correct=", correct,
       " why=", why_kp);
  BlockListMask<Pred> m;
  const Outcome o = attempt("BlockListMask(raw)", [&] {
    m = BlockListMask<Pred>(s, c.shared, c.off, col32, c.full, pred, kp);
  });
  if (!judge("BlockListMask(raw)", why_kp, o)) return;
  if (correct >= 0 && m.pairs() != correct)
    fail(detail::concat("BlockListMask(raw): pairs() = ", m.pairs(), ", the CSR holds ", correct));
  run_raw_mask(fdp, m, "BlockListMask(raw)");
}

// methods::UserMask from raw CSR arrays (int64 / int32 / uint16 types, raw ArrayRefs).
void raw_user_mask(FuzzedDataProvider& fdp) {
  RawCsr c = raw_csr(fdp);
  const MaskShape& s = c.shape;
  const int variant = fdp.ConsumeIntegralInRange<int>(0, 4);
  note("user_mask_raw variant=", variant);
  // The arrays as the variant's types hold them (narrow types wrap), which is what is validated.
  std::vector<std::int32_t> off32, col32;
  std::vector<std::uint16_t> col16;
  for (auto& x : c.off) off32.push_back(static_cast<std::int32_t>(x));
  for (auto& x : c.col) col32.push_back(static_cast<std::int32_t>(x)), col16.push_back(static_cast<std::uint16_t>(x));
  if (variant == 0 || variant == 1 || variant == 4)
    for (std::size_t i = 0; i < c.col.size(); ++i) c.col[i] = col32[i];
  if (variant == 2) {
    for (std::size_t i = 0; i < c.off.size(); ++i) c.off[i] = off32[i];
    for (std::size_t i = 0; i < c.col.size(); ++i) c.col[i] = col16[i];
  }
  std::string why = csr_problem(s, c.shared, c.off, c.col, c.full.size());
  // variant 4: raw ArrayRefs (null data, sizes that lie).
  sm::BlockCsr<index_t, std::int32_t> raw;
  raw.head_shared = c.shared;
  raw.row_offsets = c.off;
  raw.col_indices = col32;
  raw.full = c.full;
  if (variant == 4) {
    const int how = fdp.ConsumeIntegralInRange<int>(0, 4);
    const index_t n = raw_index(fdp, -2, 6);
    if (how == 0) raw.row_offsets.data = nullptr, why = why.empty() ? "null row_offsets" : why;
    if (how == 1) {
      raw.col_indices = sm::ArrayRef<std::int32_t>(nullptr, n);
      if (n != 0) why = "null col_indices with a size";
      else why = csr_problem(s, c.shared, c.off, {}, c.full.size());
    }
    if (how == 2 && n > 0 && n <= static_cast<index_t>(c.full.size())) raw.full.size = n,
        why = csr_problem(s, c.shared, c.off, c.col, static_cast<std::size_t>(n));
    if (how == 3 && n < 0) raw.col_indices.size = n, why = "negative col_indices size";
    if (how == 4 && n != 0) raw.full = sm::ArrayRef<std::uint8_t>(nullptr, n), why = "null full with a size";
    note("arrayref how=", how, " n=", n);
  }
  note("why=", why);
  const std::uint32_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  auto count = [&](const auto& pred, bool trivial) {
    return csr_count(s, c.shared, c.off, c.col, pred, [&](index_t e, index_t qb, index_t kb) {
      const bool f = c.full.empty() ? trivial : c.full[static_cast<std::size_t>(e)] != 0;
      return f && !crosses(s, qb, kb);
    });
  };
  if (why.empty() && (variant == 1 ? count(HashPredicate{seed}, false) : count(AllowAll{}, true)) < 0)
    return note("skipped(valid, too many elements to count)");
  if (variant == 1) {
    BlockListMask<HashPredicate> m;
    const Outcome o = attempt("UserMask", [&] {
      m = sm::BasicUserMask<HashPredicate>(s, c.shared, c.off, col32, c.full, HashPredicate{seed}).mask;
    });
    if (!judge("UserMask", why, o)) return;
    const index_t want = count(HashPredicate{seed}, false);
    if (want >= 0 && m.pairs() != want) fail(detail::concat("UserMask: pairs() = ", m.pairs(), ", CSR holds ", want));
    return run_raw_mask(fdp, m, "UserMask(hash)");
  }
  BlockListMask<AllowAll> m;
  const Outcome o = attempt("UserMask", [&] {
    if (variant == 0) {
      m = sm::UserMask(s, c.shared, c.off, col32, c.full).mask;
    } else if (variant == 2) {
      sm::BlockCsr<std::int32_t, std::uint16_t> csr;
      csr.row_offsets = off32;
      csr.col_indices = col16;
      csr.full = c.full;
      csr.head_shared = c.shared;
      m = sm::UserMask(s, csr).mask;
    } else if (variant == 3) {
      sm::BlockCsr<index_t, index_t> csr;
      csr.row_offsets = c.off;
      csr.col_indices = c.col;
      csr.full = c.full;
      csr.head_shared = c.shared;
      m = sm::UserMask(s, csr).mask;
    } else {
      m = sm::UserMask(s, raw).mask;
    }
  });
  if (!judge("UserMask", why, o)) return;
  const index_t want = count(AllowAll{}, true);
  if (want >= 0 && m.pairs() != want) fail(detail::concat("UserMask: pairs() = ", m.pairs(), ", CSR holds ", want));
  run_raw_mask(fdp, m, "UserMask");
}

// MaskShape with raw fields into IntervalMask and masks::causal / full / sliding_window.
void raw_interval(FuzzedDataProvider& fdp) {
  MaskShape s = raw_mask_shape(fdp);
  const int variant = fdp.ConsumeIntegralInRange<int>(0, 3);
  const index_t window = raw_index(fdp, 0, 80), sinks = raw_index(fdp, 0, 8);
  if (variant != 0) s.block_k = s.block_q;
  if (variant == 1 || variant == 3) s.causal = true;
  if (variant == 2) s.causal = false;
  std::string why;
  if (variant == 3 && window < 1) why = "window < 1";
  if (why.empty()) why = shape_problem(s);
  if (why.empty() && variant == 0 && window < 0) why = "window < 0";
  if (why.empty() && (variant == 0 || variant == 3) && sinks < 0) why = "sinks < 0";
  note("interval_raw variant=", variant, " shape=", shape_str(s), " window=", window, " sinks=", sinks,
       " why=", why);
  if (why.empty() && s.n_q > (index_t{1} << 18)) return note("skipped(valid, O(n_q) constructor)");
  IntervalMask m;
  const Outcome o = attempt("IntervalMask", [&] {
    switch (variant) {
      case 0: m = IntervalMask(s, window, sinks); break;
      case 1: m = masks::causal(s.heads, s.n_q, s.n_k, s.block_q); break;
      case 2: m = masks::full(s.heads, s.n_q, s.n_k, s.block_q); break;
      default: m = masks::sliding_window(s.heads, s.n_q, s.n_k, window, sinks, s.block_q); break;
    }
  });
  if (!judge("IntervalMask", why, o)) return;
  if (!small_shape(s)) return;
  // The documented pattern: sinks [0, S) plus the band (causal: p - W < j <= p; else |p - j| < W),
  // cut by causality; W = 0 (or W >= n_k) is dense.
  const index_t W = variant == 1 || variant == 2 ? 0 : window, S = variant == 1 || variant == 2 ? 0 : sinks;
  const auto dm = to_dense(m, 0);
  for (index_t i = 0; i < s.n_q; ++i)
    for (index_t j = 0; j < s.n_k; ++j) {
      const index_t p = i + s.q_offset();
      bool want = W == 0 || j < S || (s.causal ? j > p - W : std::abs(p - j) < W);
      if (s.causal && j > p) want = false;
      if (dm(i, j) != want)
        fail(detail::concat("IntervalMask: element (", i, ", ", j, ") is ", dm(i, j), ", the pattern says ", want));
    }
  run_raw_mask(fdp, m, "IntervalMask(raw)");
}

// ---- Views: TensorView / LseView with raw extents and strides ----

// Strides for extents e (heads, tokens, dim) by a layout byte: contiguous, token-major, raw,
// odd stride_dim (0, negative, 2), a broadcast (stride 0) axis, reversed tokens.
void raw_strides(FuzzedDataProvider& fdp, const index_t e[3], index_t st[3]) {
  const index_t h = std::max<index_t>(e[0], 1), n = std::max<index_t>(e[1], 1), d = std::max<index_t>(e[2], 1);
  st[0] = n * d, st[1] = d, st[2] = 1;
  switch (fdp.ConsumeIntegralInRange<int>(0, 7)) {
    case 1: st[0] = d, st[1] = h * d; break;
    case 2: for (int a = 0; a < 3; ++a) st[a] = fdp.ConsumeIntegralInRange<index_t>(-40, 40); break;
    case 3: {
      const index_t sd[] = {0, -1, 2, -2, 3};
      st[2] = fdp.PickValueInArray(sd);
      st[1] = d * std::abs(st[2]) + 1;
      st[0] = n * st[1] + 1;
      break;
    }
    case 4: st[fdp.ConsumeIntegralInRange<int>(0, 2)] = 0; break;
    case 5: st[1] = -d; break;
    default: break;
  }
}

// A view of extents e and strides st inside a buffer that spans exactly its elements (so any view
// the library accepts reads only memory the harness owns). False (a 1-element buffer) when an
// extent is negative.
template <class T>
bool place(std::vector<T>& buf, TensorView<T>& v, const index_t e[3], const index_t st[3], T fill) {
  v = TensorView<T>(nullptr, e[0], e[1], e[2], st[0], st[1], st[2]);
  if (e[0] < 0 || e[1] < 0 || e[2] < 0) {
    buf.assign(1, fill);
    v.data = buf.data();
    return false;
  }
  index_t lo = 0, hi = 0;
  for (int a = 0; a < 3; ++a)
    if (e[a] > 0) {
      const index_t c = st[a] * (e[a] - 1);
      lo += std::min<index_t>(0, c);
      hi += std::max<index_t>(0, c);
    }
  buf.assign(static_cast<std::size_t>(hi - lo + 1), fill);
  v.data = buf.data() - lo;
  return true;
}

// Brute force: do two elements of the view share an address?
template <class T>
bool aliases(const TensorView<T>& v) {
  std::vector<const T*> a;
  for (index_t h = 0; h < v.heads; ++h)
    for (index_t t = 0; t < v.tokens; ++t)
      for (index_t c = 0; c < v.dim; ++c) a.push_back(&v(h, t, c));
  std::sort(a.begin(), a.end());
  return std::adjacent_find(a.begin(), a.end()) != a.end();
}

template <class T>
std::string view_str(const TensorView<T>& v) {
  return detail::concat("[", v.heads, ",", v.tokens, ",", v.dim, "|", v.stride_head, ",", v.stride_token,
                        ",", v.stride_dim, v.data == nullptr ? ",null" : "", "]");
}

// The documented view and shape rules of prefill / decode ("" = valid).
template <class Q, class K, class V, class O>
std::string qkvo_problem(const Q& q, const K& k, const V& v, const O& o) {
  auto one = [](const auto& x, const char* n, bool output) -> std::string {
    if (x.heads < 0 || x.tokens < 0 || x.dim < 0) return std::string(n) + ": negative extent";
    if (x.empty()) return "";
    if (x.data == nullptr) return std::string(n) + ": null data";
    if (x.stride_dim == 0) return std::string(n) + ": stride_dim 0";
    if (output && !x.non_overlapping()) return std::string(n) + ": overlapping output";
    return "";
  };
  for (const std::string& w : {one(q, "q", false), one(k, "k", false), one(v, "v", false), one(o, "out", true)})
    if (!w.empty()) return w;
  if (k.heads < 1 || v.heads < 1) return "K/V heads < 1";
  if (k.heads != v.heads || k.tokens != v.tokens) return "K/V heads or tokens differ";
  if (q.dim != k.dim) return "q.dim != k.dim";
  if (q.dim < 1 || v.dim < 1) return "head dim < 1";
  if (q.heads % k.heads != 0) return "Hq % Hkv != 0";
  if (q.tokens > k.tokens) return "n_q > n_k";
  if (o.heads != q.heads || o.tokens != q.tokens || o.dim != v.dim) return "out shape";
  return "";
}

// Checks an accepted call's output (in a buffer the harness placed) against the oracle.
template <class QV, class KV, class VV, class Allowed>
void check_raw_output(const QV& q, const KV& k, const VV& v, const TensorView<float>& ov,
                      const std::vector<float>& obuf, const std::vector<float>* lse, double scale,
                      Allowed&& allowed, const char* what) {
  const Expected e = oracle(q, k, v, scale, allowed);
  Storage<float> st;
  st.buf = obuf;
  st.view = ov;
  st.view.data = st.buf.data() + (ov.data - obuf.data());
  check_output(st, st.inside(), -5.0f, lse, e, k.tokens, 0.0, what);
}

void raw_views(FuzzedDataProvider& fdp) {
  const index_t hkv = fdp.ConsumeIntegralInRange<index_t>(1, 3), G = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  const index_t n_k = fdp.ConsumeIntegralInRange<index_t>(0, 20), n_q = fdp.ConsumeIntegralInRange<index_t>(0, n_k);
  const index_t d = fdp.ConsumeIntegralInRange<index_t>(1, 9), dv = fdp.ConsumeBool() ? d : fdp.ConsumeIntegralInRange<index_t>(1, 9);
  index_t ext[4][3] = {{hkv * G, n_q, d}, {hkv, n_k, d}, {hkv, n_k, dv}, {hkv * G, n_q, dv}};
  for (int i = std::max(0, fdp.ConsumeIntegralInRange<int>(-3, 3)); i > 0; --i) {
    const int which = fdp.ConsumeIntegralInRange<int>(0, 3), axis = fdp.ConsumeIntegralInRange<int>(0, 2);
    ext[which][axis] = fdp.ConsumeIntegralInRange<index_t>(-2, 12);
  }
  index_t st[4][3];
  for (int i = 0; i < 4; ++i) raw_strides(fdp, ext[i], st[i]);
  const bool decode_op = fdp.ConsumeBool();
  const int null_which = fdp.ConsumeIntegralInRange<int>(0, 31);  // 0: q, 1: k, 2: v null
  const float scales[] = {0.0f, -1.0f, INFINITY, -INFINITY, -0.0f, 1e-30f, 0.5f, 1.7f};
  const float scale = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? fdp.PickValueInArray(scales) : NAN;
  const int threads = fdp.ConsumeIntegralInRange<int>(0, 15) == 0 ? -1 : pick_threads(fdp);
  const int lse_mode = fdp.ConsumeIntegralInRange<int>(0, 2);
  const index_t lsh = fdp.ConsumeIntegralInRange<index_t>(-6, 6), lst = fdp.ConsumeIntegralInRange<index_t>(-6, 6);
  const bool causal = fdp.ConsumeBool();
  const index_t splits[] = {16, 17, 64, 512, 16, 17, 64, 512, 15, 0, -1, std::numeric_limits<index_t>::max()};
  const index_t split = fdp.PickValueInArray(splits);
  const index_t bq = fdp.ConsumeIntegralInRange<index_t>(1, 24), bk = fdp.ConsumeIntegralInRange<index_t>(1, 24);
  const index_t window = fdp.ConsumeIntegralInRange<index_t>(0, 6);
  Values vals = make_values(fdp);

  std::vector<float> bq_, bk_, bv_, bo_;
  TensorView<float> q, k, v, o;
  place(bq_, q, ext[0], st[0], 0.0f);
  place(bk_, k, ext[1], st[1], 0.0f);
  place(bv_, v, ext[2], st[2], 0.0f);
  place(bo_, o, ext[3], st[3], -5.0f);
  for (auto* b : {&bq_, &bk_, &bv_})
    for (float& x : *b) x = vals.next();
  if (null_which == 0) q.data = nullptr;
  if (null_which == 1) k.data = nullptr;
  if (null_which == 2) v.data = nullptr;
  note("views_raw op=", decode_op ? "decode" : "prefill", " q=", view_str(q), " k=", view_str(k), " v=", view_str(v),
       " out=", view_str(o), " scale=", scale, " threads=", threads, " lse=", lse_mode, "(", lsh, ",", lst,
       ") causal=", causal, " split=", split, " block=", bq, "x", bk, " window=", window);
  // Soundness of the output check: a view non_overlapping() accepts has no aliasing element.
  if (o.heads >= 0 && o.tokens >= 0 && o.dim >= 0 && o.non_overlapping() && aliases(o))
    fail("TensorView::non_overlapping: true for a view whose elements alias");
  std::string why = qkvo_problem(TensorView<const float>(q), TensorView<const float>(k), TensorView<const float>(v), o);
  if (why.empty() && !(std::isnan(scale) || (std::isfinite(scale) && scale > 0.0f))) why = "bad scale";
  if (why.empty() && threads < 0) why = "num_threads < 0";
  if (why.empty() && decode_op && split < 16) why = "split < 16";
  // LSE: lse(h, i) for h < Hq, i < n_q inside a buffer of its span.
  std::vector<float> lbuf(1, -7.0f);
  LseView lse;
  bool lse_distinct = true;
  if (lse_mode > 0 && q.heads >= 0 && q.tokens >= 0) {
    const index_t sh = lse_mode == 1 ? q.tokens : lsh, stt = lse_mode == 1 ? 1 : lst;
    index_t lo = 0, hi = 0;
    if (q.heads > 0) lo += std::min<index_t>(0, sh * (q.heads - 1)), hi += std::max<index_t>(0, sh * (q.heads - 1));
    if (q.tokens > 0) lo += std::min<index_t>(0, stt * (q.tokens - 1)), hi += std::max<index_t>(0, stt * (q.tokens - 1));
    lbuf.assign(static_cast<std::size_t>(hi - lo + 1), -7.0f);
    lse = LseView(lbuf.data() - lo, sh, stt);
    std::vector<float*> a;
    for (index_t h = 0; h < q.heads; ++h)
      for (index_t i = 0; i < q.tokens; ++i) a.push_back(&lse(h, i));
    std::sort(a.begin(), a.end());
    lse_distinct = std::adjacent_find(a.begin(), a.end()) == a.end();
  }
  const std::vector<float> o0 = bo_, l0 = lbuf;
  const TensorView<const float> qc = q, kc = k, vc = v;
  note("why=", why);
  auto untouched = [&](const char* what) {
    if (!same_bytes(bo_.data(), o0.data(), bo_.size() * 4))
      fail(detail::concat(what, ": threw but wrote the output"));
    if (!same_bytes(lbuf.data(), l0.data(), lbuf.size() * 4)) fail(detail::concat(what, ": threw but wrote the LSE"));
  };
  auto lse_rows = [&]() {
    std::vector<float> r;
    if (!lse) return r;
    for (index_t h = 0; h < q.heads; ++h)
      for (index_t i = 0; i < q.tokens; ++i) r.push_back(lse(h, i));
    return r;
  };
  const double dscale = std::isnan(scale) ? static_cast<double>(1.0f / std::sqrt(static_cast<float>(std::max<index_t>(q.dim, 1)))) : scale;
  if (decode_op) {
    DecodeOptions opt;
    opt.scale = scale;
    opt.num_threads = threads;
    opt.causal = causal;
    opt.split = split;
    opt.lse = lse;
    const Outcome out = attempt("decode", [&] { decode(qc, kc, vc, o, KeySelection::all(), opt); });
    if (!judge("decode(raw views)", why, out)) return untouched("decode(raw views)");
    const std::vector<float> lr = lse_rows();
    check_raw_output(qc, kc, vc, o, bo_, lse && lse_distinct ? &lr : nullptr, dscale,
                     [&](index_t, index_t i, index_t j) { return !causal || j <= kc.tokens - qc.tokens + i; },
                     "decode(raw views)");
    std::vector<float> b2 = o0;
    TensorView<float> o2 = o;
    o2.data = b2.data() + (o.data - bo_.data());
    opt.num_threads = threads % 3 + 1;
    opt.lse = LseView();
    decode(qc, kc, vc, o2, KeySelection::all(), opt);
    if (!same_bytes(b2.data(), bo_.data(), b2.size() * 4)) fail("decode(raw views): bits differ between thread counts");
    return;
  }
  MaskShape ms{q.heads, q.tokens, k.tokens, bq, bk, causal};
  if (!shape_problem(ms).empty()) {
    if (why.empty()) return note("skipped(no mask of this geometry)");
    ms = MaskShape{1, 0, 0, 1, 1, true};
  }
  const IntervalMask mask(ms, window, 0);
  PrefillOptions opt;
  opt.scale = scale;
  opt.num_threads = threads;
  opt.lse = lse;
  const Outcome out = attempt("prefill", [&] { prefill(qc, kc, vc, o, mask, opt); });
  if (!judge("prefill(raw views)", why, out)) return untouched("prefill(raw views)");
  const auto dm = to_dense(mask, 0);
  const std::vector<float> lr = lse_rows();
  check_raw_output(qc, kc, vc, o, bo_, lse && lse_distinct ? &lr : nullptr, dscale,
                   [&](index_t, index_t i, index_t j) { return dm(i, j); }, "prefill(raw views)");
  std::vector<float> b2 = o0;
  TensorView<float> o2 = o;
  o2.data = b2.data() + (o.data - bo_.data());
  opt.num_threads = threads % 3 + 1;
  opt.lse = LseView();
  prefill(qc, kc, vc, o2, mask, opt);
  if (!same_bytes(b2.data(), bo_.data(), b2.size() * 4)) fail("prefill(raw views): bits differ between thread counts");
}

// ---- KeySelection from raw lists, decode over it, kv::decode_stats ----

void raw_selection(FuzzedDataProvider& fdp) {
  const index_t hkv = fdp.ConsumeIntegralInRange<index_t>(1, 3), G = fdp.ConsumeIntegralInRange<index_t>(1, 3), hq = hkv * G;
  const index_t n_k = fdp.ConsumeIntegralInRange<index_t>(0, 60), n_q = fdp.ConsumeIntegralInRange<index_t>(0, std::min<index_t>(n_k, 4));
  const index_t d = fdp.ConsumeIntegralInRange<index_t>(1, 16);
  const int scope_i = fdp.ConsumeIntegralInRange<int>(0, 2), kind = fdp.ConsumeIntegralInRange<int>(0, 2);
  const auto scope = static_cast<KeySelection::Scope>(scope_i);
  const index_t want_units = scope == KeySelection::Scope::per_q_head ? hq : hkv;
  const index_t units = fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? fdp.ConsumeIntegralInRange<index_t>(0, 6) : want_units;
  const index_t page = raw_index(fdp, 1, 12);
  const index_t pages_nk = fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? raw_index(fdp, 0, 60) : n_k;
  const bool causal = fdp.ConsumeBool();
  const int threads = pick_threads(fdp);
  std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
  const index_t universe = kind == 1 ? (page >= 1 && pages_nk > 0 ? std::min<index_t>((pages_nk - 1) / page + 1, 64) : 0) : n_k;
  std::vector<std::vector<index_t>> lists(static_cast<std::size_t>(units));
  std::vector<std::vector<KeyRange>> rl(static_cast<std::size_t>(units));
  for (std::size_t u = 0; u < lists.size(); ++u) {
    if (fdp.ConsumeIntegralInRange<int>(0, 3) != 0) {  // plausible: a sorted subset
      const int density = fdp.ConsumeIntegralInRange<int>(0, 4);
      for (index_t x = 0; x < universe; ++x)
        if (static_cast<int>(rng() % 4) < density) lists[u].push_back(x);
      for (index_t t : lists[u])
        if (!rl[u].empty() && rl[u].back().end == t) ++rl[u].back().end;
        else rl[u].push_back({t, t + 1});
    } else {  // raw values
      for (int i = fdp.ConsumeIntegralInRange<int>(0, 5); i > 0; --i) {
        lists[u].push_back(raw_index(fdp, -2, universe + 2));
        const index_t b = raw_index(fdp, -2, n_k + 2);
        index_t e = 0;
        if (!fdp.ConsumeBool() || __builtin_add_overflow(b, fdp.ConsumeIntegralInRange<index_t>(-1, 5), &e))
          e = raw_index(fdp, -2, n_k + 2);
        rl[u].push_back({b, e});
      }
    }
  }
  std::string lists_s;
  for (std::size_t u = 0; u < lists.size(); ++u) {
    lists_s += vec_str(lists[u]) + "/";
    for (const KeyRange& r : rl[u]) lists_s += detail::concat("(", r.begin, ",", r.end, ")");
    lists_s += " ";
  }
  note("selection_raw hq=", hq, " hkv=", hkv, " n_q=", n_q, " n_k=", n_k, " d=", d, " scope=", scope_i,
       " kind=", kind, " units=", units, " page=", page, " pages_nk=", pages_nk, " causal=", causal,
       " lists=", lists_s);
  // The builder's rules, and the ranges it produces (harness's own coalescing).
  std::string why_build;
  std::vector<std::vector<KeyRange>> ranges(static_cast<std::size_t>(units));
  if (kind == 0) {
    for (std::size_t u = 0; u < lists.size(); ++u)
      for (std::size_t e = 0; e < lists[u].size(); ++e) {
        const index_t t = lists[u][e];
        if (t < 0 || t == std::numeric_limits<index_t>::max()) why_build = "token out of [0, 2^63 - 1)";
        if (e > 0 && lists[u][e - 1] >= t) why_build = "tokens not strictly increasing";
        if (!why_build.empty()) break;
        if (!ranges[u].empty() && ranges[u].back().end == t) ++ranges[u].back().end;
        else ranges[u].push_back({t, t + (t == std::numeric_limits<index_t>::max() ? 0 : 1)});
      }
  } else if (kind == 1) {
    const index_t in_cache = page < 1 || pages_nk <= 0 ? 0 : (pages_nk - 1) / page + 1;
    if (page < 1) why_build = "page_size < 1";
    for (std::size_t u = 0; u < lists.size() && why_build.empty(); ++u)
      for (std::size_t e = 0; e < lists[u].size(); ++e) {
        const index_t p = lists[u][e];
        if (p < 0 || p >= in_cache) why_build = "page out of range";
        else if (e > 0 && lists[u][e - 1] >= p) why_build = "pages not strictly increasing";
        if (!why_build.empty()) break;
        const KeyRange kr{p * page, static_cast<index_t>(std::min<__int128>(pages_nk, (__int128(p) + 1) * page))};
        if (!ranges[u].empty() && ranges[u].back().end == kr.begin) ranges[u].back().end = kr.end;
        else ranges[u].push_back(kr);
      }
  } else {
    ranges = rl;
    // from_ranges: ranges non-empty, sorted, disjoint, begin >= 0; scope all takes no lists.
    if (scope == KeySelection::Scope::all && !rl.empty()) why_build = "scope all with lists";
    for (std::size_t u = 0; u < rl.size() && why_build.empty(); ++u) {
      index_t prev_end = 0;
      for (const KeyRange& r : rl[u])
        if (!(r.begin >= prev_end && r.begin < r.end)) {
          why_build = "range empty / unsorted / overlapping / negative";
          break;
        } else {
          prev_end = r.end;
        }
    }
  }
  if (scope == KeySelection::Scope::all && (kind == 2 ? !rl.empty() : !lists.empty()) && why_build.empty())
    why_build = "scope all with lists";
  KeySelection sel;
  const Outcome ob = attempt("KeySelection", [&] {
    if (kind == 0) sel = KeySelection::from_tokens(scope, lists);
    else if (kind == 1) sel = KeySelection::from_pages(scope, lists, page, pages_nk);
    else sel = KeySelection::from_ranges(scope, rl);
  });
  if (!judge("KeySelection", why_build, ob)) return;
  // decode's rules for the selection.
  std::string why;
  if (scope != KeySelection::Scope::all) {
    if (units != want_units) why = "unit count";
    for (std::size_t u = 0; u < ranges.size() && why.empty(); ++u) {
      index_t prev_end = 0;
      for (const KeyRange& r : ranges[u]) {
        if (!(r.begin >= prev_end && r.begin < r.end && r.end <= n_k)) {
          why = "range not sorted / disjoint / non-empty / within [0, n_k)";
          break;
        }
        prev_end = r.end;
      }
    }
  }
  note("why=", why);
  std::vector<float> Q(static_cast<std::size_t>(hq * n_q * d)), K(static_cast<std::size_t>(hkv * n_k * d)),
      V(static_cast<std::size_t>(hkv * n_k * d)), O(static_cast<std::size_t>(hq * n_q * d), -5.0f);
  Values vals = make_values(fdp);
  for (auto* b : {&Q, &K, &V})
    for (float& x : *b) x = vals.next();
  const TensorView<const float> q(Q.data(), hq, n_q, d), k(K.data(), hkv, n_k, d), v(V.data(), hkv, n_k, d);
  const TensorView<float> o(O.data(), hq, n_q, d);
  DecodeOptions opt;
  opt.causal = causal;
  opt.num_threads = threads;
  opt.split = 16;
  const Outcome od = attempt("decode", [&] { decode(q, k, v, o, sel, opt); });
  if (!judge("decode(raw selection)", why, od)) return;
  std::vector<std::vector<std::uint8_t>> chosen(ranges.size(), std::vector<std::uint8_t>(static_cast<std::size_t>(n_k), 0));
  if (scope != KeySelection::Scope::all)  // (scope all ignores its lists, which may be anything)
    for (std::size_t u = 0; u < ranges.size(); ++u)
      for (const KeyRange& r : ranges[u])
        for (index_t j = r.begin; j < r.end; ++j) chosen[u][static_cast<std::size_t>(j)] = 1;
  auto picked = [&](index_t h, index_t j) {
    if (scope == KeySelection::Scope::all) return true;
    return chosen[static_cast<std::size_t>(scope == KeySelection::Scope::per_q_head ? h : h / G)][static_cast<std::size_t>(j)] != 0;
  };
  check_raw_output(q, k, v, o, O, nullptr, static_cast<double>(1.0f / std::sqrt(static_cast<float>(d))),
                   [&](index_t h, index_t i, index_t j) { return picked(h, j) && (!causal || j <= n_k - n_q + i); },
                   "decode(raw selection)");
  // kv::decode_stats over a cache holding the same keys, for Hq (sometimes a raw head count).
  if (n_k == 0) return;
  kv::CacheOptions co;
  co.kv_heads = hkv;
  co.head_dim = d;
  co.capacity = n_k;
  co.page_size = fdp.ConsumeIntegralInRange<index_t>(1, 8);
  kv::Cache<float> cache(co);
  cache.append(k, v);
  const index_t hq_s = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? fdp.ConsumeIntegralInRange<index_t>(0, 7) : hq;
  note("decode_stats hq=", hq_s);
  if (hq_s % hkv != 0 && hq_s >= hkv) return;  // no documented contract for a partial group
  if (scope == KeySelection::Scope::per_q_head && hq_s != hq) return;  // the selection is for hq units
  kv::DecodeStats st;
  const Outcome os = attempt("kv::decode_stats", [&] { st = kv::decode_stats(sel, cache, hq_s, n_q); });
  if (!judge("kv::decode_stats", hq_s < hkv ? "Hq < Hkv" : "", os)) return;
  index_t pairs = 0, dense = 0, rows = 0;
  const index_t Gs = hq_s / hkv;
  for (index_t t = 0; t < n_q; ++t) dense += hq_s * (n_k - n_q + t + 1);
  const index_t nunits = scope == KeySelection::Scope::per_q_head ? hq_s : hkv;
  for (index_t u = 0; u < nunits; ++u) {
    for (index_t j = 0; j < n_k; ++j)
      if (scope == KeySelection::Scope::all || chosen[static_cast<std::size_t>(u)][static_cast<std::size_t>(j)] != 0) {
        ++rows;
        for (index_t t = 0; t < n_q; ++t)
          if (j <= n_k - n_q + t) pairs += scope == KeySelection::Scope::per_q_head ? 1 : Gs;
      }
  }
  if (st.pairs != pairs || st.dense_pairs != dense || st.kv_rows != rows)
    fail(detail::concat("kv::decode_stats: pairs/dense/kv_rows = ", st.pairs, "/", st.dense_pairs, "/", st.kv_rows,
                        ", expected ", pairs, "/", dense, "/", rows));
}

// ---- kv::Cache with raw options; appends, retains, decode over its (paged) views ----

// Decode of q (the newest n_new tokens, in the cache) over `keys` against the cache, checked with
// the oracle over the positions the cache keeps. Kf/Vf: every appended token by position,
// [Hkv][total][d|dv], as the cache stores them.
template <class C>
void check_cache_decode(FuzzedDataProvider& fdp, const C& cache, const std::vector<float>& Kf,
                        const std::vector<float>& Vf, index_t total, const TensorView<const float>& q,
                        const KeySelection& keys, const char* what) {
  const index_t hkv = cache.kv_heads(), hq = q.heads, G = hq / hkv, n_new = q.tokens;
  const index_t d = cache.head_dim(), dv = cache.value_dim(), seq = cache.sequence_length();
  std::vector<float> out(static_cast<std::size_t>(hq * n_new * dv), -5.0f), lse(static_cast<std::size_t>(hq * n_new), -7.0f);
  DecodeOptions o;
  o.num_threads = pick_threads(fdp);
  o.lse = LseView(lse.data(), n_new);
  const TensorView<float> ov(out.data(), hq, n_new, dv);
  decode(q, cache, ov, keys, o);
  std::vector<std::vector<std::uint8_t>> allowed(static_cast<std::size_t>(hq), std::vector<std::uint8_t>(static_cast<std::size_t>(total), 0));
  for (index_t h = 0; h < hq; ++h) {
    const index_t hk = h / G, len = cache.length(hk);
    std::vector<std::uint8_t> sel(static_cast<std::size_t>(len), keys.scope() == KeySelection::Scope::all);
    if (keys.scope() != KeySelection::Scope::all) {
      const index_t u = keys.scope() == KeySelection::Scope::per_q_head ? h : hk;
      for (const KeyRange* r = keys.ranges_begin(u); r != keys.ranges_end(u); ++r)
        for (index_t j = r->begin; j < std::min(r->end, len); ++j) sel[static_cast<std::size_t>(j)] = 1;
    }
    for (index_t slot = 0; slot < len; ++slot)
      if (sel[static_cast<std::size_t>(slot)]) allowed[static_cast<std::size_t>(h)][static_cast<std::size_t>(cache.position(hk, slot))] = 1;
  }
  const Expected e = oracle(q, TensorView<const float>(Kf.data(), hkv, total, d), TensorView<const float>(Vf.data(), hkv, total, dv),
                            static_cast<double>(1.0f / std::sqrt(static_cast<float>(d))),
                            [&](index_t h, index_t i, index_t j) {
                              return j <= seq - n_new + i && allowed[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)] != 0;
                            });
  Storage<float> os(hq, n_new, dv, Layout::head_major, -5.0f);
  os.buf = out;
  os.view.data = os.buf.data();
  check_output(os, os.inside(), -5.0f, &lse, e, total, 0.0, what);
}

template <class T, kv::Layout L>
void raw_cache(FuzzedDataProvider& fdp) {
  kv::CacheOptions co;
  co.kv_heads = raw_index(fdp, 1, 3);
  co.head_dim = raw_index(fdp, 1, 12);
  co.value_dim = raw_index(fdp, 0, 12);
  co.capacity = raw_index(fdp, 1, 80);
  co.page_size = raw_index(fdp, 1, 20);
  co.page_table = fdp.ConsumeBool() ? kv::PageTable::shared : kv::PageTable::per_kv_head;
  co.key_bounds = fdp.ConsumeBool();
  constexpr bool paged = L == kv::Layout::paged;
  note("cache_raw type=", dtype_name<T>(), " paged=", paged, " kv_heads=", co.kv_heads, " d=", co.head_dim,
       " dv=", co.value_dim, " cap=", co.capacity, " P=", co.page_size, " shared=", co.page_table == kv::PageTable::shared,
       " bounds=", co.key_bounds);
  const index_t dv = co.value_dim == 0 ? co.head_dim : co.value_dim;
  std::string why;
  if (co.kv_heads < 1) why = "kv_heads < 1";
  else if (co.head_dim < 1 || dv < 1) why = "dims < 1";
  else if (co.capacity < 1) why = "capacity < 1";
  else if (co.page_size < 1) why = "page_size < 1";
  bool may_alloc = false, either = false;  // either: invalid_argument or bad_alloc, not success
  if (why.empty()) {
    // The allocations the cache makes, in order (elements x element size), in exact arithmetic.
    using W = __int128;
    // Saturating at 2^100 (every factor is < 2^63, so one product of two stays exact).
    auto mul = [](W a, W b) { return a > 0 && b > (W(1) << 100) / a ? W(1) << 100 : a * b; };
    const W H = co.kv_heads, d = co.head_dim, cap = co.capacity, P = co.page_size, Wv = dv;
    const W max_pages = (cap + P - 1) / P;
    const bool shared = co.page_table == kv::PageTable::shared;
    const W tables = shared ? 1 : H, phys = mul(tables, max_pages), hpp = shared ? H : 1;
    const W sz = static_cast<W>(sizeof(T));
    std::vector<std::pair<W, W>> allocs = {{H, 8}, {mul(H, cap), 8}};
    if (co.key_bounds) allocs.push_back({mul(mul(mul(H, max_pages), 2), d), sz});
    if (paged)
      allocs.insert(allocs.end(), {{mul(mul(mul(phys + 1, hpp), P), d), sz}, {mul(mul(mul(phys + 1, hpp), P), Wv), sz},
                                   {mul(tables, max_pages), 8}, {tables, 8}, {phys, 8}});
    else
      allocs.insert(allocs.end(), {{mul(mul(H, cap), d), sz}, {mul(mul(H, cap), Wv), sz}});
    const W kMax = std::numeric_limits<index_t>::max();
    // The library's own index products (and cap + P - 1) must not overflow int64, nor an element
    // count exceed what a vector can hold: the cache must refuse (or fail to allocate) them.
    bool overflow = cap + P - 1 > kMax || P > kMaxBlockSize;
    for (auto [n, esz] : allocs) overflow = overflow || n > kMax || mul(n, esz) > kMax;
    if (overflow) {
      either = true;  // invalid_argument (sizes beyond int64 / a vector) or bad_alloc
    } else {
      for (auto [n, esz] : allocs) {
        const W bytes = n * esz;
        if (bytes > (W{1} << 31)) {  // fails under the harness's 2 GiB allocation cap
          may_alloc = true;
          break;
        }
        if (bytes > (W{1} << 26)) return note("skipped(valid, 64 MiB+ allocation)");
      }
    }
  }
  note("why=", why, " may_alloc=", may_alloc, " either=", either);
  std::unique_ptr<kv::Cache<T, L>> cp;
  const Outcome oc = attempt("kv::Cache", [&] { cp = std::make_unique<kv::Cache<T, L>>(co); });
  if (either) {
    if (oc == Outcome::ok) fail("kv::Cache: a capacity / page size whose sizes overflow int64 was accepted");
    return;
  }
  if (!judge("kv::Cache", why, oc, may_alloc)) return;
  if (may_alloc) {
    if (oc == Outcome::ok) return;  // allocated after all (a lenient allocator): nothing to run on
  }
  kv::Cache<T, L>& cache = *cp;
  const index_t H = cache.kv_heads(), d = cache.head_dim(), cap = cache.capacity();
  if (H > 16 || d > 256 || dv > 256) return note("accepted; too large for the harness's token buffers");
  if (cache.value_dim() != dv) fail("kv::Cache: value_dim 0 must mean head_dim");
  Values vals = make_values(fdp);
  // Every appended token by position (rounded to T), and the harness's own slot -> position map.
  const index_t max_total = std::min<index_t>(cap, 64) + 8;
  std::vector<float> Kf(static_cast<std::size_t>(H * max_total * d)), Vf(static_cast<std::size_t>(H * max_total * dv));
  std::vector<std::vector<index_t>> pos(static_cast<std::size_t>(H));
  index_t seq = 0;
  auto append = [&](index_t m, bool bad_dims) {
    // Beyond capacity, the view claims more tokens than its buffer holds: only an append that is
    // rejected (reading nothing) is made with it.
    const index_t mm = std::clamp<index_t>(m, 0, cap + 9), kd = bad_dims ? d + 1 : d;
    std::vector<float> kk(static_cast<std::size_t>(H * mm * kd)), vv(static_cast<std::size_t>(H * mm * dv));
    for (float& x : kk) x = to_float(from_float<T>(vals.next()));
    for (float& x : vv) x = to_float(from_float<T>(vals.next()));
    index_t maxlen = 0;
    for (auto& p : pos) maxlen = std::max<index_t>(maxlen, static_cast<index_t>(p.size()));
    std::string w;
    if (m < 0) w = "negative token count";
    else if (bad_dims) w = "wrong head_dim";
    else if (m > 0 && maxlen + m > cap) w = "beyond capacity";
    else if (seq + m > max_total) return false;  // valid, but beyond what the harness tracks
    note("append m=", m, " bad_dims=", bad_dims, " why=", w);
    const auto lens = cache.lengths();
    const index_t seq0 = cache.sequence_length(), free0 = cache.free_pages();
    index_t prod = 0;
    const bool ctor_overflow = __builtin_mul_overflow(m, std::max(kd, dv), &prod);
    const Outcome oa = attempt("kv::Cache::append", [&] {
      if (ctor_overflow)  // the contiguous constructor: n x d overflows
        cache.append(TensorView<const float>(kk.data(), H, m, kd), TensorView<const float>(vv.data(), H, m, dv));
      else
        cache.append(TensorView<const float>(kk.data(), H, m, kd, mm * kd, kd, 1),
                     TensorView<const float>(vv.data(), H, m, dv, mm * dv, dv, 1));
    });
    if (!judge("kv::Cache::append", w, oa)) {
      if (cache.lengths() != lens || cache.sequence_length() != seq0 || cache.free_pages() != free0)
        fail("kv::Cache::append: a rejected append changed the cache");
      return false;
    }
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < m; ++t) {
        std::copy_n(&kk[static_cast<std::size_t>((h * m + t) * d)], d, &Kf[static_cast<std::size_t>((h * max_total + seq + t) * d)]);
        std::copy_n(&vv[static_cast<std::size_t>((h * m + t) * dv)], dv, &Vf[static_cast<std::size_t>((h * max_total + seq + t) * dv)]);
        pos[static_cast<std::size_t>(h)].push_back(seq + t);
      }
    seq += m;
    return true;
  };
  for (int i = fdp.ConsumeIntegralInRange<int>(1, 3); i > 0; --i)
    append(raw_index(fdp, -1, 30), fdp.ConsumeIntegralInRange<int>(0, 15) == 0);
  // retain: every head's list (plausible or raw), or one head with a raw head index and count.
  if (fdp.ConsumeBool()) {
    std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
    std::vector<std::vector<index_t>> keep(static_cast<std::size_t>(fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? H + 1 : H));
    std::string w = static_cast<index_t>(keep.size()) != H ? "keep lists != kv_heads" : "";
    for (std::size_t h = 0; h < keep.size(); ++h) {
      const index_t len = h < pos.size() ? static_cast<index_t>(pos[h].size()) : 0;
      if (fdp.ConsumeIntegralInRange<int>(0, 3) != 0) {
        const int density = fdp.ConsumeIntegralInRange<int>(0, 4);
        for (index_t s = 0; s < len; ++s)
          if (static_cast<int>(rng() % 4) < density) keep[h].push_back(s);
      } else {
        for (int i = fdp.ConsumeIntegralInRange<int>(0, 4); i > 0; --i) keep[h].push_back(raw_index(fdp, -1, len + 1));
      }
      for (std::size_t i = 0; i < keep[h].size() && w.empty() && h < pos.size(); ++i)
        if (keep[h][i] < 0 || keep[h][i] >= len || (i > 0 && keep[h][i - 1] >= keep[h][i])) w = "bad kept slots";
    }
    const bool one = fdp.ConsumeBool() && !keep.empty();
    index_t hh = 0, count = 0;
    if (one) {
      hh = fdp.ConsumeIntegralInRange<index_t>(-1, H);
      const std::size_t lh = static_cast<std::size_t>(std::clamp<index_t>(hh, 0, H - 1));
      count = fdp.ConsumeBool() ? static_cast<index_t>(keep[std::min(lh, keep.size() - 1)].size()) : raw_index(fdp, -1, 4);
      keep.resize(static_cast<std::size_t>(H));
      const std::vector<index_t>& l = keep[lh];
      w = "";
      if (hh < 0 || hh >= H) w = "head out of range";
      else if (count < 0 || count > static_cast<index_t>(pos[lh].size())) w = "count out of range";
      else if (count > static_cast<index_t>(l.size())) return;  // the caller's array is shorter: not callable
      else
        for (index_t i = 0; i < count && w.empty(); ++i)
          if (l[static_cast<std::size_t>(i)] < 0 || l[static_cast<std::size_t>(i)] >= static_cast<index_t>(pos[lh].size()) ||
              (i > 0 && l[static_cast<std::size_t>(i - 1)] >= l[static_cast<std::size_t>(i)]))
            w = "bad kept slots";
    }
    std::string ks;
    for (auto& l : keep) ks += vec_str(l);
    note("retain one=", one, " h=", hh, " count=", count, " keep=", ks, " why=", w);
    const auto lens = cache.lengths();
    const Outcome orr = attempt("kv::Cache::retain", [&] {
      if (one) cache.retain(hh, keep[static_cast<std::size_t>(std::clamp<index_t>(hh, 0, H - 1))].data(), count);
      else cache.retain(keep);
    });
    if (!judge("kv::Cache::retain", w, orr)) {
      if (cache.lengths() != lens) fail("kv::Cache::retain: a rejected retain changed the cache");
    } else {
      for (index_t h = 0; h < H; ++h) {
        if (one && h != hh) continue;
        std::vector<index_t> np;
        const auto& l = keep[static_cast<std::size_t>(h)];
        for (index_t i = 0; i < (one ? count : static_cast<index_t>(l.size())); ++i)
          np.push_back(pos[static_cast<std::size_t>(h)][static_cast<std::size_t>(l[static_cast<std::size_t>(i)])]);
        pos[static_cast<std::size_t>(h)] = np;
      }
    }
  }
  for (index_t h = 0; h < H; ++h) {
    if (cache.length(h) != static_cast<index_t>(pos[static_cast<std::size_t>(h)].size()))
      fail(detail::concat("kv::Cache: head ", h, " holds ", cache.length(h), " tokens, expected ", pos[static_cast<std::size_t>(h)].size()));
    for (index_t s = 0; s < cache.length(h); ++s)
      if (cache.position(h, s) != pos[static_cast<std::size_t>(h)][static_cast<std::size_t>(s)])
        fail(detail::concat("kv::Cache: head ", h, " slot ", s, " has position ", cache.position(h, s)));
  }
  if (cache.sequence_length() != seq) fail("kv::Cache: sequence_length differs");
  // New tokens, then decode them over every head's kept keys.
  const index_t n_new = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  if (!append(n_new, false)) return;
  const index_t G = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  std::vector<float> Q(static_cast<std::size_t>(H * G * n_new * d));
  for (float& x : Q) x = vals.next();
  check_cache_decode(fdp, cache, Kf, Vf, max_total, TensorView<const float>(Q.data(), H * G, n_new, d),
                     KeySelection::all(), "decode(q, raw cache)");
}

// ---- kv::PagedView with raw page tables, read by decode and prefill ----

void raw_paged_view(FuzzedDataProvider& fdp) {
  const index_t H = fdp.ConsumeIntegralInRange<index_t>(1, 3), G = fdp.ConsumeIntegralInRange<index_t>(1, 3), hq = H * G;
  const index_t tokens = raw_index(fdp, 0, 30);
  const index_t d = fdp.ConsumeIntegralInRange<index_t>(1, 9), dv = fdp.ConsumeBool() ? d : fdp.ConsumeIntegralInRange<index_t>(1, 9);
  const index_t P = raw_index(fdp, 1, 8);
  const index_t phys = fdp.ConsumeIntegralInRange<index_t>(1, 8);
  const bool shared = fdp.ConsumeBool();
  const index_t logical = tokens > 0 && P >= 1 ? (tokens - 1) / P + 1 : 0;
  const int tmode = fdp.ConsumeIntegralInRange<int>(0, 5);
  const index_t tsh = shared ? 0 : tmode == 5 ? fdp.ConsumeIntegralInRange<index_t>(-3, 10) : std::min<index_t>(logical, 40);
  const index_t table_need = shared ? logical : H * std::max<index_t>(tsh, 0);
  std::vector<index_t> table(static_cast<std::size_t>(
      fdp.ConsumeIntegralInRange<int>(0, 3) != 0 ? std::min<index_t>(table_need, 200) + fdp.ConsumeIntegralInRange<index_t>(0, 3)
                                                 : fdp.ConsumeIntegralInRange<index_t>(0, 40)));
  std::mt19937 rng(fdp.ConsumeIntegral<std::uint32_t>());
  for (auto& x : table)
    x = fdp.ConsumeIntegralInRange<int>(0, 15) == 0 ? raw_index(fdp, -2, phys + 2) : static_cast<index_t>(rng() % static_cast<std::uint32_t>(phys));
  const index_t hpp = shared ? H : 1;
  index_t page_stride = hpp * std::min<index_t>(std::max<index_t>(P, 1), 64) * d, head_stride = shared ? std::min<index_t>(std::max<index_t>(P, 1), 64) * d : 0, row_stride = d;
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) {
    page_stride = fdp.ConsumeIntegralInRange<index_t>(-8, 60);
    head_stride = fdp.ConsumeIntegralInRange<index_t>(-8, 40);
    row_stride = fdp.ConsumeIntegralInRange<index_t>(-8, 20);
  }
  const index_t pool_k = std::max<index_t>(1, phys * std::max<index_t>(page_stride, 1) + fdp.ConsumeIntegralInRange<index_t>(0, 8));
  const int nulls = fdp.ConsumeIntegralInRange<int>(0, 15);  // 0: null pool, 1: null table
  const bool decode_op = fdp.ConsumeBool();
  const index_t n_q = decode_op ? fdp.ConsumeIntegralInRange<index_t>(0, std::clamp<index_t>(tokens, 0, 4))
                                : fdp.ConsumeIntegralInRange<index_t>(0, std::clamp<index_t>(tokens, 0, 30));
  Values vals = make_values(fdp);
  std::vector<float> kpool(static_cast<std::size_t>(std::min<index_t>(pool_k, 1 << 16))), vpool;
  for (float& x : kpool) x = vals.next();
  kv::PagedView<const float> kp;
  kp.pool = nulls == 0 ? nullptr : kpool.data();
  kp.table = nulls == 1 ? nullptr : table.data();
  kp.heads = H, kp.tokens = tokens, kp.dim = d, kp.page_size = P, kp.table_stride_head = tsh;
  kp.page_stride = page_stride, kp.head_stride = head_stride, kp.row_stride = row_stride;
  kp.pool_pages = fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? raw_index(fdp, -1, phys + 1) : phys;
  // V: the same table over its own pool, natural strides.
  kv::PagedView<const float> vp = kp;
  vp.dim = dv;
  vp.page_stride = hpp * std::min<index_t>(std::max<index_t>(P, 1), 64) * dv;
  vp.head_stride = shared ? std::min<index_t>(std::max<index_t>(P, 1), 64) * dv : 0;
  vp.row_stride = dv;
  vpool.resize(static_cast<std::size_t>(std::max<index_t>(1, phys * vp.page_stride)));
  for (float& x : vpool) x = vals.next();
  vp.pool = nulls == 0 ? nullptr : vpool.data();
  note("paged_view_raw op=", decode_op ? "decode" : "prefill", " H=", H, " G=", G, " tokens=", tokens, " d=", d,
       " dv=", dv, " P=", P, " phys=", phys, " tsh=", tsh, " strides=", page_stride, ",", head_stride, ",",
       row_stride, " pool=", kpool.size(), " nulls=", nulls, " n_q=", n_q, " table=", vec_str(table));
  // What a validating library can check (extents, page size, null pointers), and whether every
  // element the view addresses is in memory the harness owns (else the call is not made: bounds
  // of a page pool are the caller's responsibility).
  // The library's checks, in its order (kv/paged_view.hpp validate_view); the table scan stops
  // (unsafe: the call is not made) where the harness's table ends before an answer is known.
  std::string why;
  bool table_short = false;
  if (tokens < 0) why = "negative tokens";
  else if (tokens > 0 && (kp.pool == nullptr || kp.table == nullptr)) why = "null pool or table";
  else if (tokens > 0 && (P < 1 || P > kMaxBlockSize)) why = "page_size out of [1, 2^31 - 1]";
  else if (tokens > 0 && (tsh < 0 || page_stride < 1 || head_stride < 0 || row_stride < 1)) why = "bad strides";
  else if (tokens > 0 && kp.pool_pages < 1) why = "pool_pages < 1";
  else if (tokens > 0) {
    const index_t tables = tsh == 0 ? 1 : H;
    for (index_t h = 0; h < tables && why.empty() && !table_short; ++h)
      for (index_t pg = 0; pg < logical; ++pg) {
        const index_t ti = h * tsh + pg;
        if (ti >= static_cast<index_t>(table.size())) {
          table_short = true;
          break;
        }
        const index_t e = table[static_cast<std::size_t>(ti)];
        if (e < 0 || e >= kp.pool_pages) {
          why = "page table entry out of [0, pool_pages)";
          break;
        }
      }
  }
  if (table_short) return note("skipped(page table shorter than the view)");
  bool inside = why.empty() && tokens <= 4096;
  auto in_pool = [&](const kv::PagedView<const float>& pv, index_t size) {
    for (index_t h = 0; h < H && inside; ++h)
      for (index_t t = 0; t < tokens && inside; ++t) {
        const index_t ti = h * pv.table_stride_head + t / P;
        if (ti < 0 || ti >= static_cast<index_t>(table.size())) { inside = false; break; }
        const __int128 base = __int128(table[static_cast<std::size_t>(ti)]) * pv.page_stride + h * pv.head_stride +
                              (t % P) * pv.row_stride;
        if (base < 0 || base + pv.dim > size) inside = false;
      }
  };
  if (inside) in_pool(kp, static_cast<index_t>(kpool.size()));
  if (inside) in_pool(vp, static_cast<index_t>(vpool.size()));
  note("why=", why, " inside=", inside);
  if (why.empty() && !inside) return note("skipped(view outside the harness's pool)");
  if (!why.empty() && (tokens > 4096 || tokens < -4096)) return;  // an accepting library would read far
  std::vector<float> Q(static_cast<std::size_t>(hq * n_q * d)), O(static_cast<std::size_t>(hq * n_q * dv), -5.0f);
  for (float& x : Q) x = vals.next();
  const TensorView<const float> q(Q.data(), hq, n_q, d);
  const TensorView<float> o(O.data(), hq, n_q, dv);
  const double scale = static_cast<double>(1.0f / std::sqrt(static_cast<float>(d)));
  if (decode_op) {
    DecodeOptions opt;
    opt.num_threads = pick_threads(fdp);
    opt.split = 16;
    const Outcome oc = attempt("decode", [&] { decode(q, kp, vp, o, KeySelection::all(), opt); });
    if (!judge("decode(raw paged view)", why, oc)) return;
    check_raw_output(q, kp, vp, o, O, nullptr, scale,
                     [&](index_t, index_t i, index_t j) { return j <= tokens - n_q + i; }, "decode(raw paged view)");
    return;
  }
  const IntervalMask mask(MaskShape{hq, n_q, std::max<index_t>(tokens, n_q), 16, 16, true}, 0, 0);
  PrefillOptions opt;
  opt.num_threads = pick_threads(fdp);
  const Outcome oc = attempt("prefill", [&] { prefill(q, kp, vp, o, mask, opt); });
  if (!judge("prefill(raw paged view)", why, oc)) return;
  check_raw_output(q, kp, vp, o, O, nullptr, scale,
                   [&](index_t, index_t i, index_t j) { return j <= tokens - n_q + i; }, "prefill(raw paged view)");
}

// ---- plan_prefill / plan_decode from raw shapes and options; runs with raw workspaces ----

void raw_plans(FuzzedDataProvider& fdp) {
  AttentionShape sh;
  sh.heads_kv = raw_index(fdp, 1, 3);
  const index_t G = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  sh.heads_q = fdp.ConsumeBool() && sh.heads_kv >= 1 && sh.heads_kv <= 3 ? sh.heads_kv * G : raw_index(fdp, -2, 6);
  sh.n_k = raw_index(fdp, 0, 40);
  sh.n_q = fdp.ConsumeBool() && sh.n_k >= 0 && sh.n_k <= 40 ? fdp.ConsumeIntegralInRange<index_t>(0, sh.n_k) : raw_index(fdp, -1, 40);
  sh.head_dim = raw_index(fdp, 1, 9);
  sh.head_dim_v = fdp.ConsumeBool() ? sh.head_dim : raw_index(fdp, 1, 9);
  const int threads = fdp.ConsumeIntegralInRange<int>(0, 11) == 0 ? -1 : fdp.ConsumeIntegralInRange<int>(1, 3);
  const int prec = fdp.ConsumeIntegralInRange<int>(0, 9);
  const auto precision = static_cast<Precision>(prec <= 6 ? 0 : prec == 7 ? 1 : prec == 8 ? 2 : 5);
  const bool decode_op = fdp.ConsumeBool();
  const int ws_mode = fdp.ConsumeIntegralInRange<int>(0, 9);
  const index_t delta = fdp.ConsumeIntegralInRange<index_t>(1, 64);
  note("plans_raw op=", decode_op ? "decode" : "prefill", " shape=", describe(sh), " threads=", threads,
       " precision=", static_cast<int>(precision), " ws_mode=", ws_mode, " delta=", delta);
  std::string why;
  if (sh.heads_q < 0 || sh.n_q < 0 || sh.n_k < 0) why = "negative extent";
  else if (sh.heads_kv < 1) why = "Hkv < 1";
  else if (sh.head_dim < 1 || sh.head_dim_v < 1) why = "head dim < 1";
  else if (sh.heads_q % sh.heads_kv != 0) why = "Hq % Hkv != 0";
  else if (sh.n_q > sh.n_k) why = "n_q > n_k";
  else if (threads < 0) why = "num_threads < 0";
  else if (prec == 8) why = "precision bfloat16 with fp32 K/V";
  else if (prec == 9) why = "unknown precision";
  // The size limits: tensors <= 2^56 elements, Hq x n_q x n_k < 2^63 pairs; a huge shape within
  // them may still need a workspace beyond 2^62 bytes (invalid_argument) or more than the
  // allocator gives (bad_alloc): `huge` accepts any of those outcomes, and runs nothing.
  bool huge = false;
  if (why.empty()) {
    using W = __int128;
    auto mul = [](W a, W b) { return a > 0 && b > (W(1) << 100) / a ? W(1) << 100 : a * b; };  // saturating
    const W dmax = std::max(sh.head_dim, sh.head_dim_v);
    if (mul(mul(sh.heads_q, sh.n_q), dmax) > (W(1) << 56) || mul(mul(sh.heads_kv, sh.n_k), dmax) > (W(1) << 56))
      why = "tensor beyond 2^56 elements";
    else if (mul(mul(sh.heads_q, sh.n_q), sh.n_k) > std::numeric_limits<index_t>::max())
      why = "pairs beyond 2^63 - 1";
    const W width = dmax + 64;
    huge = why.empty() && (mul(mul(sh.heads_q, sh.n_q), width) > (W(1) << 40) ||
                           mul(mul(sh.n_k, width), sh.heads_kv) > (W(1) << 40));
  }
  auto judge_plan = [&](const char* what, Outcome o) {
    if (!huge) return judge(what, why, o);
    return o == Outcome::ok;  // any of ok / invalid_argument / bad_alloc; only ok goes on
  };
  const bool small = why.empty() && sh.heads_q <= 12 && sh.n_k <= 40 && sh.head_dim <= 9 && sh.head_dim_v <= 9;
  Values vals = make_values(fdp);
  auto run_views = [&](auto&& call) {  // q, k, v, out for the plan's shape (ws_mode 5: one token more)
    const index_t extra = ws_mode == 5 ? 1 : 0;
    std::vector<float> Q(static_cast<std::size_t>(sh.heads_q * sh.n_q * sh.head_dim)),
        K(static_cast<std::size_t>(sh.heads_kv * (sh.n_k + extra) * sh.head_dim)),
        V(static_cast<std::size_t>(sh.heads_kv * (sh.n_k + extra) * sh.head_dim_v)),
        O(static_cast<std::size_t>(sh.heads_q * sh.n_q * sh.head_dim_v), -5.0f);
    for (auto* b : {&Q, &K, &V})
      for (float& x : *b) x = vals.next();
    call(TensorView<const float>(Q.data(), sh.heads_q, sh.n_q, sh.head_dim),
         TensorView<const float>(K.data(), sh.heads_kv, sh.n_k + extra, sh.head_dim),
         TensorView<const float>(V.data(), sh.heads_kv, sh.n_k + extra, sh.head_dim_v),
         TensorView<float>(O.data(), sh.heads_q, sh.n_q, sh.head_dim_v), O);
  };
  // Workspace: exact, short by delta, misaligned, null, larger; 5 views of another shape, 6 another
  // precision at run time, 7 another mask / selection.
  auto workspace = [&](std::size_t need, WorkspaceBuffer& buf, std::string& w) {
    buf = WorkspaceBuffer(need + 256);
    Workspace ws{buf.view().data, need};
    switch (ws_mode) {
      case 1: if (need > 0) ws.bytes = need - std::min<std::size_t>(need, static_cast<std::size_t>(delta)), w = "workspace too small"; break;
      case 2: ws.data = static_cast<unsigned char*>(ws.data) + 8 * (delta % 8 + 1) % 64; if (reinterpret_cast<std::uintptr_t>(ws.data) % 64) w = "workspace misaligned"; break;
      case 3: ws.data = nullptr; if (need > 0) w = "workspace null"; break;
      case 4: ws.bytes = need + static_cast<std::size_t>(delta); break;
      case 5: w = "views differ from the plan"; break;
      case 6: w = "precision differs from the plan"; break;
      case 7: w = "mask / selection differs from the plan"; break;
      default: break;
    }
    return ws;
  };
  if (!decode_op) {
    const index_t bq = raw_index(fdp, 1, 40), bk = raw_index(fdp, 1, 40);
    const bool causal = fdp.ConsumeBool();
    const MaskShape ms{sh.heads_q, sh.n_q, sh.n_k, bq, bk, causal};
    std::string wm = shape_problem(ms);
    note("mask=", shape_str(ms));
    if (wm.empty() && ms.n_q > (index_t{1} << 18)) return note("skipped(valid, O(n_q) mask)");
    IntervalMask mask;
    if (!judge("IntervalMask", wm, attempt("IntervalMask", [&] { mask = IntervalMask(ms, 0, 0); }))) return;
    PrefillOptions opt;
    opt.num_threads = threads;
    opt.precision = precision;
    PrefillPlan plan;
    if (!judge_plan("plan_prefill", attempt("plan_prefill", [&] { plan = plan_prefill(sh, mask, opt); }))) return;
    if (!small) return;
    WorkspaceBuffer buf;
    std::string w;
    const Workspace ws = workspace(plan.workspace_bytes(), buf, w);
    PrefillOptions ro = opt;
    if (ws_mode == 6) ro.precision = precision == Precision::float32 ? Precision::automatic : Precision::float32;
    const IntervalMask other(MaskShape{ms.heads, ms.n_q, ms.n_k, ms.block_q == 1 ? 2 : 1, ms.block_k, causal}, 0, 0);
    run_views([&](auto q, auto k, auto v, auto o, std::vector<float>& O) {
      note("run why=", w);
      const Outcome oc = attempt("prefill(plan)", [&] { prefill(plan, q, k, v, o, ws_mode == 7 ? other : mask, ws, ro); });
      if (!judge("prefill(plan, workspace)", w, oc)) {
        for (float x : O) if (x != -5.0f) fail("prefill(plan): threw but wrote the output");
        return;
      }
      const auto dm = to_dense(mask, 0);
      check_raw_output(q, k, v, o, O, nullptr, static_cast<double>(1.0f / std::sqrt(static_cast<float>(sh.head_dim))),
                       [&](index_t, index_t i, index_t j) { return dm(i, j); }, "prefill(plan, workspace)");
      // The same plan and workspace again: the same bits.
      const std::vector<float> first = O;
      prefill(plan, q, k, v, o, mask, ws, ro);
      if (!same_bytes(first.data(), O.data(), O.size() * 4)) fail("prefill(plan): a second run with the same workspace differs");
    });
    return;
  }
  DecodeOptions opt;
  opt.num_threads = threads;
  opt.precision = precision;
  const index_t splits[] = {16, 17, 64, 512, 15, 0, -5, index_t{1} << 40, std::numeric_limits<index_t>::max()};
  opt.split = fdp.PickValueInArray(splits);
  opt.causal = fdp.ConsumeBool();
  const int scope_i = fdp.ConsumeIntegralInRange<int>(0, 2);
  const auto scope = static_cast<KeySelection::Scope>(scope_i);
  note("split=", opt.split, " causal=", opt.causal, " scope=", scope_i);
  if (why.empty() && opt.split < 16) why = "split < 16";
  // Every key of every unit, as a selection of the scope (units: Hkv or Hq).
  const index_t units = scope == KeySelection::Scope::per_q_head ? sh.heads_q : sh.heads_kv;
  if (why.empty()) {
    const index_t items = units * (sh.n_k / std::max<index_t>(opt.split, 16) + 1);
    if (units > 64 || items > (index_t{1} << 16)) return note("skipped(valid, too many items to list)");
  }
  auto all_of = [&](KeySelection::Scope sc, index_t n_units) {
    if (sc == KeySelection::Scope::all || n_units < 0 || n_units > 64) return KeySelection::all();
    std::vector<std::vector<KeyRange>> r(static_cast<std::size_t>(n_units));
    if (sh.n_k > 0)
      for (auto& l : r) l.push_back({0, sh.n_k});
    return KeySelection::from_ranges(sc, r);
  };
  const KeySelection keys = all_of(scope, units);
  if (why.empty() && scope != KeySelection::Scope::all && units > 64) return;
  DecodePlan plan;
  if (!judge_plan("plan_decode", attempt("plan_decode", [&] { plan = plan_decode(sh, keys, opt); }))) return;
  if (!small) return;
  WorkspaceBuffer buf;
  std::string w;
  const Workspace ws = workspace(plan.workspace_bytes(), buf, w);
  DecodeOptions ro = opt;
  if (ws_mode == 6) ro.precision = precision == Precision::float32 ? Precision::automatic : Precision::float32;
  const KeySelection other = all_of(scope == KeySelection::Scope::all ? KeySelection::Scope::per_kv_head : KeySelection::Scope::all, sh.heads_kv);
  run_views([&](auto q, auto k, auto v, auto o, std::vector<float>& O) {
    note("run why=", w);
    const Outcome oc = attempt("decode(plan)", [&] { decode(plan, q, k, v, o, ws_mode == 7 ? other : keys, ws, ro); });
    if (!judge("decode(plan, workspace)", w, oc)) {
      for (float x : O) if (x != -5.0f) fail("decode(plan): threw but wrote the output");
      return;
    }
    check_raw_output(q, k, v, o, O, nullptr, static_cast<double>(1.0f / std::sqrt(static_cast<float>(sh.head_dim))),
                     [&](index_t, index_t i, index_t j) { return !opt.causal || j <= sh.n_k - sh.n_q + i; },
                     "decode(plan, workspace)");
    const std::vector<float> first = O;
    decode(plan, q, k, v, o, keys, ws, ro);
    if (!same_bytes(first.data(), O.data(), O.size() * 4)) fail("decode(plan): a second run with the same workspace differs");
  });
}

// ---- methods::Budget from raw kinds and values, passed to each method's select ----

void raw_budget(FuzzedDataProvider& fdp) {
  const int kind = fdp.ConsumeIntegralInRange<int>(0, 3);
  const double value = raw_double(fdp);
  const double tol = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? raw_double(fdp) : sm::kDefaultCompressionTolerance;
  const index_t count = raw_index(fdp, 1, 200);
  const int method = fdp.ConsumeIntegralInRange<int>(0, 11);
  note("budget_raw kind=", kind, " value=", value, " tol=", tol, " count=", count, " method=", method);
  std::string why;
  if (kind == 0 && !(std::isfinite(value) && value >= 1.0)) why = "CR not finite or < 1";
  if (kind == 0 && why.empty() && !(std::isfinite(tol) && tol >= 0.0 && tol < 1.0)) why = "tolerance outside [0, 1)";
  if (kind == 1 && !(count >= 1 && static_cast<double>(count) < 9.0e15)) why = "count < 1 or too large";
  // Mass budgets: a raw floor and cap now and then.
  const bool limits = kind == 2 && fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const index_t mfloor = limits ? raw_index(fdp, 0, 100) : 0;
  const index_t mcap = limits ? raw_index(fdp, 1, 200) : sm::Budget::kNoCap;
  if (kind == 2 && !(value > 0.0 && value <= 1.0)) why = "mass outside (0, 1]";
  if (kind == 2 && why.empty() && !(mfloor >= 0 && mcap >= std::max<index_t>(mfloor, 1)))
    why = "mass floor < 0 or cap < max(floor, 1)";
  sm::Budget b;
  const Outcome ob = attempt("Budget", [&] {
    if (kind == 0) b = sm::Budget::compression(value, tol);
    if (kind == 1) b = sm::Budget::count(count);
    if (kind == 2) b = sm::Budget::mass(value, mfloor, mcap);
  });
  if (!judge("methods::Budget", why, ob)) return;
  if ((kind == 0 && (b.target_compression() != value || !b.is_compression())) ||
      (kind == 1 && (b.units() != count || !b.is_count())) || (kind == 2 && (b.mass_target() != value || !b.is_mass() || b.mass_floor() != mfloor ||
                     b.mass_cap() != mcap)))
    fail("methods::Budget: the budget does not hold what it was made from");
  b.validate("fuzz");  // a factory-made budget always passes
  AttentionOptions mo;
  mo.num_threads = pick_threads(fdp);
  Values vals = make_values(fdp);
  const index_t hkv = fdp.ConsumeIntegralInRange<index_t>(1, 2), G = fdp.ConsumeIntegralInRange<index_t>(1, 2), hq = hkv * G;
  const index_t dims[] = {4, 8, 16};
  const index_t d = fdp.PickValueInArray(dims);
  if (method <= 5) {  // prefill selections over small Q / K
    const index_t n_k = fdp.ConsumeIntegralInRange<index_t>(0, 48), n_q = fdp.ConsumeBool() ? n_k : fdp.ConsumeIntegralInRange<index_t>(0, n_k);
    const index_t block = fdp.ConsumeIntegralInRange<index_t>(1, 32);
    std::vector<float> Q(static_cast<std::size_t>(hq * n_q * d)), K(static_cast<std::size_t>(hkv * n_k * d));
    for (auto* buf : {&Q, &K})
      for (float& x : *buf) x = vals.next();
    const TensorView<const float> q(Q.data(), hq, n_q, d), k(K.data(), hkv, n_k, d);
    note("prefill n_q=", n_q, " n_k=", n_k, " hq=", hq, " hkv=", hkv, " d=", d, " block=", block);
    // Kinds the documentation settles: Dense and UserMask take compression budgets only, the
    // sliding window compression and count; the others may reject a kind (invalid_argument).
    auto run = [&](const char* what, int takes, auto&& select) {  // takes: -1 unknown, bit 0/1/2 = kind
      using Sel = std::decay_t<decltype(select())>;
      Sel sel;
      const Outcome o = attempt(what, [&] { sel = select(); });
      if (o == Outcome::bad_alloc) fail(std::string(what) + ": bad_alloc for a small request");
      if (takes >= 0) {
        if (!judge(what, (takes >> (kind == 3 ? 0 : kind) & 1) ? "" : "budget kind not taken", o)) return;
      } else if (o != Outcome::ok) {
        return note("->rejected: ", g_last_error);
      }
      check_stats(sel.stats, sel.mask, what);
      run_raw_mask(fdp, sel.mask, what);
    };
    switch (method) {
      case 0: {
        sm::Dense m;
        m.block = block;
        run("Dense::select", 1, [&] { return m.select(q, k, b, mo); });
        break;
      }
      case 1: {
        sm::SlidingWindow m;
        m.block = block;
        m.sinks = fdp.ConsumeIntegralInRange<index_t>(0, 6);
        run("SlidingWindow::select", 3, [&] { return m.select(q, k, b, mo); });
        break;
      }
#if FUZZ_BLOCK_SPARSE
      case 2: {
        sm::BlockSparse m;
        m.block = block;
        run("BlockSparse::select", -1, [&] { return m.select(q, k, b, mo); });
        break;
      }
#endif
#if FUZZ_VERTICAL_SLASH
      case 3: {
        sm::VerticalSlash m;
        m.block = block;
        m.last_queries = fdp.ConsumeIntegralInRange<index_t>(1, 32);
        run("VerticalSlash::select", -1, [&] { return m.select(q, k, b, mo); });
        break;
      }
#endif
#if FUZZ_FLEX_PREFILL
      case 4: {
        sm::FlexPrefill m;
        m.block = block;
        m.last_queries = fdp.ConsumeIntegralInRange<index_t>(1, 32);
        run("FlexPrefill::select", -1, [&] { return m.select(q, k, b, mo); });
        break;
      }
#endif
#if FUZZ_USER_MASK
      case 5: {
        const MaskShape ms{hq, n_q, n_k, block, block, true};
        BlockListBuilder bld(ms, true);
        for (index_t qb = 0; qb < ms.num_q_blocks(); ++qb)
          for (index_t kb = 0; kb <= std::min(ms.num_k_blocks() - 1, (ms.q_end(qb) - 1 + ms.q_offset()) / block); ++kb)
            bld.add(0, qb, kb);
        const sm::UserMask m(bld.build());
        run("UserMask::select", 1, [&] { return m.select(q, k, b, mo); });
        break;
      }
#endif
      default: break;
    }
    return;
  }
  // Decode selections and evictions over a small cache.
  kv::CacheOptions co;
  co.kv_heads = hkv;
  co.head_dim = d;
  co.page_size = fdp.ConsumeIntegralInRange<index_t>(1, 8);
  const index_t n_p = fdp.ConsumeIntegralInRange<index_t>(1, 40), n_new = fdp.ConsumeIntegralInRange<index_t>(1, 3);
  const index_t total = n_p + n_new;
  co.capacity = total;
  std::vector<float> Kf(static_cast<std::size_t>(hkv * total * d)), Vf(Kf.size()), Q(static_cast<std::size_t>(hq * total * d));
  for (auto* buf : {&Kf, &Vf, &Q})
    for (float& x : *buf) x = vals.next();
  const TensorView<const float> K(Kf.data(), hkv, total, d), V(Vf.data(), hkv, total, d), Qa(Q.data(), hq, total, d);
  const bool paged = fdp.ConsumeBool();
  note("decode n_p=", n_p, " n_new=", n_new, " hq=", hq, " hkv=", hkv, " d=", d, " P=", co.page_size, " paged=", paged);
  auto body = [&](auto& cache) {
    cache.append(K.slice_tokens(0, n_p), V.slice_tokens(0, n_p));
    const auto qp = Qa.slice_tokens(0, n_p), qn = Qa.slice_tokens(n_p, n_new);
    KeySelection keys = KeySelection::all();
    auto rejected = [&](const char* what, Outcome o) {
      if (o == Outcome::bad_alloc) fail(std::string(what) + ": bad_alloc for a small request");
      if (o != Outcome::ok) note("->rejected: ", g_last_error);
      return o != Outcome::ok;
    };
    switch (method) {
      case 6: case 7: {  // selections: after the step's append
        cache.append(K.slice_tokens(n_p, n_new), V.slice_tokens(n_p, n_new));
        sm::DecodeSelection sel;
        Outcome o;
        if (method == 6) {
          o = attempt("Dense::select", [&] { sel = sm::Dense{}.select(qn, cache, b, mo); });
          if (!judge("Dense::select (decode)", kind == 0 || kind == 3 ? "" : "budget kind not taken", o)) return;
        } else {
          sm::Quest m;
          m.per_query_head = fdp.ConsumeBool();
          o = attempt("Quest::select", [&] { sel = m.select(qn, cache, b, mo); });
          if (rejected("Quest::select", o)) return;
        }
        keys = sel.keys;
        const auto st = kv::decode_stats(keys, cache, hq, n_new);
        if (st.pairs != sel.stats.pairs || st.dense_pairs != sel.stats.dense_pairs)
          fail("decode selection: stats disagree with decode_stats");
        return check_cache_decode(fdp, cache, Kf, Vf, total, qn, keys, "decode(selection, raw budget)");
      }
      case 8: {
        sm::SnapKV m;
        m.window = fdp.ConsumeIntegralInRange<index_t>(1, 16);
        if (rejected("SnapKV::evict", attempt("SnapKV::evict", [&] { sm::evict(m, qp, cache, b, mo); }))) return;
        break;
      }
      case 9: {
        sm::AdaSnapKV m;
        m.window = fdp.ConsumeIntegralInRange<index_t>(1, 16);
        if (rejected("AdaSnapKV::evict", attempt("AdaSnapKV::evict", [&] { sm::evict(m, qp, cache, b, mo); }))) return;
        break;
      }
      case 10: {
        sm::H2O::State h2o;
        const Outcome o = attempt("H2O", [&] {
          h2o.reset(cache, b);
          h2o.observe(qp, cache, mo, true);
          h2o.apply(h2o.select(cache), cache);
        });
        if (rejected("H2O", o)) return;
        break;
      }
      default: {
        sm::StreamingLLM m;
        m.sinks = fdp.ConsumeIntegralInRange<index_t>(0, 6);
        if (rejected("StreamingLLM::evict", attempt("StreamingLLM::evict", [&] {
              sm::evict(m, TensorView<const float>(), cache, b);
            })))
          return;
        break;
      }
    }
    cache.append(K.slice_tokens(n_p, n_new), V.slice_tokens(n_p, n_new));
    check_cache_decode(fdp, cache, Kf, Vf, total, qn, KeySelection::all(), "decode(eviction, raw budget)");
  };
  if (paged) {
    kv::Cache<float, kv::Layout::paged> cache(co);
    body(cache);
  } else {
    kv::Cache<float> cache(co);
    body(cache);
  }
}

void raw_case(FuzzedDataProvider& fdp) {
  const int sub = fdp.ConsumeIntegralInRange<int>(0, 11);
  note("| raw sub=", sub);
  switch (sub) {
    case 0: raw_blocklist(fdp, AllowAll{}); break;
    case 1: raw_blocklist(fdp, HashPredicate{fdp.ConsumeIntegral<std::uint32_t>()}); break;
    case 2: raw_user_mask(fdp); break;
    case 3: raw_interval(fdp); break;
    case 4: raw_views(fdp); break;
    case 5: raw_selection(fdp); break;
    case 6: raw_cache<float, kv::Layout::contiguous>(fdp); break;
    case 7: fdp.ConsumeBool() ? raw_cache<float, kv::Layout::paged>(fdp) : raw_cache<bf16, kv::Layout::paged>(fdp); break;
    case 8: raw_paged_view(fdp); break;
    case 9: raw_plans(fdp); break;
    default: raw_budget(fdp); break;
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

// Allocations above 2 GiB fail instead of aborting under ASan (the raw mode asks for huge caches
// on purpose), and operator new turns the failure into std::bad_alloc, as outside ASan: ASan's own
// operator new reports an out-of-memory error and dies instead of throwing. The replacements
// allocate with malloc / posix_memalign, so ASan still checks every access (new / delete pairs
// across the ASan runtime's own operators and these are not reported as mismatched).
extern "C" const char* __asan_default_options() {
  return "allocator_may_return_null=1:max_allocation_size_mb=2048:alloc_dealloc_mismatch=0";
}
void* operator new(std::size_t n) {
  void* p = std::malloc(n != 0 ? n : 1);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  void* p = nullptr;
  if (posix_memalign(&p, std::max(static_cast<std::size_t>(a), sizeof(void*)), n != 0 ? n : 1) != 0)
    throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

// OpenMP threads that spin between the many tiny parallel regions starve the fuzzing thread.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  setenv("OMP_WAIT_POLICY", "passive", 0);
  setenv("KMP_BLOCKTIME", "0", 0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  g_case.clear();
  // The last byte picks the mode: one input in four (bytes 192..255) feeds the public
  // constructors raw bytes; the others are byte % kKinds, as before the raw mode existed.
  const auto mode_byte = fdp.ConsumeIntegral<std::uint8_t>();
  const bool raw = mode_byte >= 192;
  const int kind = mode_byte % kKinds;
  const int combo = raw ? 0 : fdp.ConsumeIntegralInRange<int>(0, 4);
  if (raw) note("kind=raw");
  else note("kind=", kind, " combo=", combo);
  try {
    if (raw) {
      raw_case(fdp);
    } else if (kind < kPrefillKinds) {
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
