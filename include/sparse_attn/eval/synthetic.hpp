/// @file
/// @brief Synthetic long-context attention workload (eval::make_synthetic), deterministic by seed,
/// any length (tested to 128k).
///
/// Q [Hq, n, d], K and V [Hkv, n, d] (fp32, RoPE already applied, softmax scale 1/sqrt(d)) whose
/// attention shows the structures the sparse methods bet on - attention sinks, a local band,
/// vertical stripes, diagonal slashes - plus planted needles that the late queries must retrieve.
///
/// Construction, in logit units (q . k / sqrt(d) = the designed logit; vectors are stored scaled
/// by d^(1/4)). The head dimension is split into subspaces:
///
///     [0, P)            positional, P/2 RoPE pairs with theta_i = 10000^(-2i/P). Keys hold a_i
///                       (one real amplitude per pair, sum a_i^2 = 1, plus 0.05 noise), queries
///                       hold a_i (w_band + sum_s w_slash e^{-i delta_s theta_i}); after RoPE at
///                       positions p and j the logit is sum_i a_i^2 (w_band cos(D theta_i) +
///                       sum_s w_slash cos((D - delta_s) theta_i)), D = p - j: a band that decays
///                       with log D (RoPE's long-range decay) and a bump on each slash offset
///                       delta_s.
///     P                 sink feature: 1 on keys 0..sinks-1, else 0; every query holds w_sink.
///     P + 1             stripe feature: amplitude in [0.5, 1] on the stripe keys (random
///                       columns, "frequent tokens"), else 0; every query holds w_stripe.
///     needle subspace   orthonormal needle directions e_m: needle key m holds e_m; the last
///                       needle_query_rows queries hold w_needle sum_m e_m, so each needle's
///                       logit is w_needle exactly; other keys hold 0.02 noise there.
///     content subspace  Gaussian q and k: logit noise of std ~0.7 x the head's content weight.
///
/// Query head h has type h % 4, which sets the weights (sink, band, stripe, slash, needle,
/// content), content scaling the content logits' std. Two presets (SyntheticOptions::preset):
///
///     stress (the original weights; a hard, diffuse workload):
///     0 sink+local (7, 5, 2, 0, 14, 1)    1 vertical (4, 3, 6, 1.5, 13, 1)
///     2 slash (4, 4, 1.5, 5, 13, 1)       3 diffuse (1.5, 1.5, 1, 0.5, 12, 0.45)
///
///     calibrated (the default; concentration matched to TinyLlama-1.1B layers 3, 11, 21 at
///     n = 2048, see docs/METHODS.md, section "Calibrating the synthetic workload"):
///     0 sink (2.5, 4, 3, 0, 14, 3)        1 vertical (1.5, 6, 6, 1, 14, 3)
///     2 local+slash (2.5, 7, 3, 3, 14, 2.5)   3 content (1.5, 6.5, 4, 1, 14, 3.5)
///
/// The calibrated preset also grows the sink logit of query p by ln(p + 1) (so the sinks keep a
/// position-independent share against a bulk that grows linearly with p, as on the real layers),
/// and the late queries' needle logit by the same, so a needle stays w_needle - w_sink above the
/// sinks; the stress preset's logits do not depend on p. In both, a needle (logit 12-14 above the
/// stress sinks, 11.5-12.5 above the calibrated ones) outranks every structural key for the late
/// queries (stress: sink <= 7, stripe <= 6, band and slash peaks <= 5, plus O(1) positional tails
/// and noise; calibrated: content logits of std <= 2.5 and band peaks <= 7).
/// Values are N(0, 1). Every random number comes from a counter-based hash of (seed, stream,
/// index) (SplitMix64 + Box-Muller), so the data depend only on the seed and the options, not on
/// the platform's `<random>` or the thread count.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace eval {

/// Named weight sets of the synthetic workload (SyntheticOptions::preset; the weights are listed
/// in the description of eval/synthetic.hpp).
enum class SyntheticPreset {
  /// Per-head concentration (top-1/5/10/25% key mass, sink and local-band mass) matched to the
  /// median of TinyLlama-1.1B layers 3, 11, 21 at n = 2048 (docs/METHODS.md, section
  /// "Calibrating the synthetic workload"); the default.
  calibrated,
  /// The original weights: far more diffuse than the real layers (a hard workload); same data,
  /// byte for byte, as before the presets existed.
  stress,
};

/// @param p a preset.
/// @return its name: "calibrated" or "stress" (a static string).
inline const char* synthetic_preset_name(SyntheticPreset p) {
  return p == SyntheticPreset::stress ? "stress" : "calibrated";
}

/// Options of the synthetic workload (make_synthetic()); the data depend only on these.
struct SyntheticOptions {
  SyntheticPreset preset = SyntheticPreset::calibrated;  ///< The head weights (SyntheticPreset).
  index_t tokens = 32768;           ///< n, >= 64: keys = queries (a full prompt).
  index_t q_heads = 4;              ///< Hq, a positive multiple of kv_heads.
  index_t kv_heads = 1;             ///< Hkv, >= 1.
  index_t head_dim = 64;            ///< d, even and >= 16.
  std::uint64_t seed = 7;           ///< Seed of every random number.
  index_t sinks = 4;                ///< Keys 0 .. sinks - 1 are attention sinks (>= 0).
  index_t stripes = 0;              ///< Vertical stripe columns (>= 0); 0: max(8, n / 512).
  index_t slashes = 3;              ///< Slash diagonals per query head (>= 0).
  /// Planted needle keys, >= 0 and <= the needle subspace's dimension (d - P - 2) / 2, P = d / 2
  /// rounded down to even (15 for d = 64).
  index_t needles = 4;
  index_t needle_query_rows = 128;  ///< The last rows that look for the needles (>= 0).
};

/// The generated workload: fp32 Q, K, V (head-major, contiguous) and the planted structure.
struct SyntheticData {
  /// Hq: query heads.
  index_t q_heads = 0, kv_heads = 0, tokens = 0, head_dim = 0;
  /// @var kv_heads
  /// Hkv: KV heads.
  /// @var tokens
  /// n: positions (keys and queries).
  /// @var head_dim
  /// d: head dimension of Q, K and V.

  /// Queries, [Hq, n, d] contiguous, RoPE applied.
  std::vector<float> q, k, v;
  /// @var k
  /// Keys, [Hkv, n, d] contiguous, RoPE applied.
  /// @var v
  /// Values, [Hkv, n, d] contiguous, N(0, 1).

  std::vector<index_t> stripes;                    ///< Stripe key positions, sorted.
  std::vector<index_t> needles;                    ///< Needle key positions, sorted.
  /// [Hq] lists of slash offsets delta_s: query p's slash keys sit at p - delta_s.
  std::vector<std::vector<index_t>> slash_offsets;
  index_t needle_query_begin = 0;                  ///< Query rows >= this look for the needles.

  /// @return a view of q, [Hq, n, d]; valid while this object lives and q is not resized.
  TensorView<const float> q_view() const { return {q.data(), q_heads, tokens, head_dim}; }
  /// @return a view of k, [Hkv, n, d]; valid while this object lives and k is not resized.
  TensorView<const float> k_view() const { return {k.data(), kv_heads, tokens, head_dim}; }
  /// @return a view of v, [Hkv, n, d]; valid while this object lives and v is not resized.
  TensorView<const float> v_view() const { return {v.data(), kv_heads, tokens, head_dim}; }
};

/// @cond INTERNAL
namespace detail_syn {

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
// Uniform in (0, 1) from (seed, stream, index).
inline double uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
  const std::uint64_t h = splitmix64(splitmix64(seed ^ splitmix64(stream)) + i);
  return (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
// Standard normal (Box-Muller on two counter-based uniforms).
inline double gauss(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
  const double u1 = uniform(seed, stream, 2 * i), u2 = uniform(seed, stream, 2 * i + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}
enum Stream : std::uint64_t {
  kPicks = 1, kStripeAmp, kNeedleDir, kKeyNoise, kQueryNoise, kValues, kSlash
};

struct HeadWeights {
  double sink, band, stripe, slash, needle, content;
};
inline HeadWeights head_weights(SyntheticPreset preset, index_t h) {
  static constexpr HeadWeights kStress[4] = {{7.0, 5.0, 2.0, 0.0, 14.0, 1.0},
                                             {4.0, 3.0, 6.0, 1.5, 13.0, 1.0},
                                             {4.0, 4.0, 1.5, 5.0, 13.0, 1.0},
                                             {1.5, 1.5, 1.0, 0.5, 12.0, 0.45}};
  static constexpr HeadWeights kCalibrated[4] = {{2.5, 4.0, 3.0, 0.0, 14.0, 3.0},
                                                 {1.5, 6.0, 6.0, 1.0, 14.0, 3.0},
                                                 {2.5, 7.0, 3.0, 3.0, 14.0, 2.5},
                                                 {1.5, 6.5, 4.0, 1.0, 14.0, 3.5}};
  return (preset == SyntheticPreset::stress ? kStress : kCalibrated)[h % 4];
}
// Growth of the sink (and late needle) logit of query p: g ln(p + 1).
inline double sink_growth(SyntheticPreset preset) {
  return preset == SyntheticPreset::stress ? 0.0 : 1.0;
}

}  // namespace detail_syn
/// @endcond

/// Builds the workload (see the file's description for the construction). The rows of Q, K and
/// V are generated in parallel on `exec`; the data do not depend on it, nor on the platform.
/// Cost O((Hq + Hkv) x n x d) plus O(Hq x d x slashes) for the query templates; allocates Q, K
/// and V ((Hq + 2 Hkv) x n x d floats) and O(n) bookkeeping.
/// @param o the options.
/// @param exec the caller's executor, or the default one for exec.num_threads.
/// @return the data, with the positions of the stripes and needles and the slash offsets.
/// @throws sparse_attn::invalid_argument when q_heads is not a positive multiple of kv_heads,
/// head_dim is odd or < 16, a count is negative, needles exceeds the needle subspace, or
/// tokens < 64 or < 4 x (sinks + stripes + needles).
/// @throws std::bad_alloc when the data cannot be allocated.
inline SyntheticData make_synthetic(const SyntheticOptions& o, const ExecutorChoice& exec = {}) {
  namespace ds = detail_syn;
  constexpr const char* where = "eval::make_synthetic";
  require(o.q_heads >= 1 && o.kv_heads >= 1 && o.q_heads % o.kv_heads == 0, where,
          "q_heads (", o.q_heads, ") must be a positive multiple of kv_heads (", o.kv_heads, ")");
  require(o.head_dim >= 16 && o.head_dim % 2 == 0, where, "head_dim must be even and >= 16, got ",
          o.head_dim);
  require(o.sinks >= 0 && o.slashes >= 0 && o.needles >= 0 && o.stripes >= 0 &&
              o.needle_query_rows >= 0,
          where, "counts must be >= 0");
  const index_t n = o.tokens, d = o.head_dim;
  const index_t P = (d / 2) / 2 * 2;                 // positional dims (even)
  const index_t sink_dim = P, stripe_dim = P + 1;
  const index_t needle0 = P + 2, needle_dims = (d - P - 2) / 2;
  const index_t content0 = needle0 + needle_dims, content_dims = d - content0;
  require(o.needles <= needle_dims, where, "needles (", o.needles, ") must be <= ", needle_dims,
          " for head_dim ", d);
  const index_t n_stripes = o.stripes > 0 ? o.stripes : std::max<index_t>(8, n / 512);
  require(n >= 64 && n >= 4 * (o.sinks + n_stripes + o.needles), where, "tokens (", n,
          ") too small for ", o.sinks, " sinks, ", n_stripes, " stripes and ", o.needles,
          " needles (needs >= 64 and >= 4x their sum)");

  SyntheticData s;
  s.q_heads = o.q_heads;
  s.kv_heads = o.kv_heads;
  s.tokens = n;
  s.head_dim = d;
  s.needle_query_begin = std::max<index_t>(0, n - o.needle_query_rows);
  const std::uint64_t seed = o.seed;

  // Positions: needles spread over [0.1 n, 0.85 n), stripes anywhere after the sinks, disjoint.
  std::vector<std::uint8_t> taken(static_cast<std::size_t>(n), 0);
  for (index_t j = 0; j < std::min(o.sinks, n); ++j) taken[static_cast<std::size_t>(j)] = 1;
  std::uint64_t pick = 0;
  auto draw = [&](index_t lo, index_t hi) {  // a free position in [lo, hi)
    for (;;) {
      const auto j = lo + static_cast<index_t>(ds::uniform(seed, ds::kPicks, pick++) * static_cast<double>(hi - lo));
      if (j >= lo && j < hi && !taken[static_cast<std::size_t>(j)]) {
        taken[static_cast<std::size_t>(j)] = 1;
        return j;
      }
    }
  };
  for (index_t m = 0; m < o.needles; ++m) {
    const index_t span = (n * 85 / 100 - n / 10) / std::max<index_t>(1, o.needles);
    const index_t lo = n / 10 + m * span;
    s.needles.push_back(draw(lo, lo + std::max<index_t>(1, span)));
  }
  for (index_t t = 0; t < n_stripes; ++t) s.stripes.push_back(draw(o.sinks, n));
  std::sort(s.needles.begin(), s.needles.end());
  std::sort(s.stripes.begin(), s.stripes.end());
  std::vector<float> stripe_amp(static_cast<std::size_t>(n), 0.0f);
  for (std::size_t t = 0; t < s.stripes.size(); ++t)
    stripe_amp[static_cast<std::size_t>(s.stripes[t])] =
        static_cast<float>(0.5 + 0.5 * ds::uniform(seed, ds::kStripeAmp, t));
  std::vector<int> needle_of(static_cast<std::size_t>(n), -1);
  for (std::size_t m = 0; m < s.needles.size(); ++m) needle_of[static_cast<std::size_t>(s.needles[m])] = static_cast<int>(m);

  // Orthonormal needle directions (Gram-Schmidt on Gaussian vectors) in the needle subspace.
  std::vector<std::vector<double>> e(static_cast<std::size_t>(o.needles), std::vector<double>(static_cast<std::size_t>(needle_dims)));
  for (index_t m = 0; m < o.needles; ++m) {
    auto& em = e[static_cast<std::size_t>(m)];
    for (index_t c = 0; c < needle_dims; ++c)
      em[static_cast<std::size_t>(c)] = ds::gauss(seed, ds::kNeedleDir, static_cast<std::uint64_t>(m * needle_dims + c));
    for (index_t r = 0; r < m; ++r) {
      double dot = 0.0;
      for (index_t c = 0; c < needle_dims; ++c) dot += em[static_cast<std::size_t>(c)] * e[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)];
      for (index_t c = 0; c < needle_dims; ++c) em[static_cast<std::size_t>(c)] -= dot * e[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)];
    }
    double norm = 0.0;
    for (double x : em) norm += x * x;
    for (double& x : em) x /= std::sqrt(norm);
  }

  // RoPE frequencies and amplitudes a_i (sum a_i^2 = 1).
  const index_t pairs = P / 2;
  std::vector<double> theta(static_cast<std::size_t>(pairs));
  for (index_t i = 0; i < pairs; ++i)
    theta[static_cast<std::size_t>(i)] = std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(P));
  const double amp = 1.0 / std::sqrt(static_cast<double>(std::max<index_t>(pairs, 1)));
  const double store = std::pow(static_cast<double>(d), 0.25);  // q . k / sqrt(d) = designed logit

  // Slash offsets per query head: log-uniform in [32, n / 2].
  s.slash_offsets.resize(static_cast<std::size_t>(o.q_heads));
  for (index_t h = 0; h < o.q_heads; ++h)
    for (index_t t = 0; t < o.slashes; ++t) {
      const double u = ds::uniform(seed, ds::kSlash, static_cast<std::uint64_t>(h * 64 + t));
      const double lo = std::log(32.0), hi = std::log(std::max(64.0, static_cast<double>(n) / 2));
      s.slash_offsets[static_cast<std::size_t>(h)].push_back(static_cast<index_t>(std::exp(lo + u * (hi - lo))));
    }

  s.q.assign(static_cast<std::size_t>(o.q_heads * n * d), 0.0f);
  s.k.assign(static_cast<std::size_t>(o.kv_heads * n * d), 0.0f);
  s.v.assign(static_cast<std::size_t>(o.kv_heads * n * d), 0.0f);

  auto rope = [&](float* row, index_t p) {
    for (index_t i = 0; i < pairs; ++i) {
      const double a = static_cast<double>(p) * theta[static_cast<std::size_t>(i)];
      const double c = std::cos(a), sn = std::sin(a);
      const double x = row[2 * i], y = row[2 * i + 1];
      row[2 * i] = static_cast<float>(x * c - y * sn);
      row[2 * i + 1] = static_cast<float>(x * sn + y * c);
    }
  };

  // Keys and values.
  auto key_value_row = [&](index_t t) {
    const index_t j = t % n;
    const auto base = static_cast<std::uint64_t>(t * d);
    float* kr = s.k.data() + t * d;
    float* vr = s.v.data() + t * d;
    for (index_t i = 0; i < pairs; ++i) {
      kr[2 * i] = static_cast<float>(amp + 0.05 * ds::gauss(seed, ds::kKeyNoise, base + static_cast<std::uint64_t>(2 * i)));
      kr[2 * i + 1] = static_cast<float>(0.05 * ds::gauss(seed, ds::kKeyNoise, base + static_cast<std::uint64_t>(2 * i + 1)));
    }
    rope(kr, j);
    kr[sink_dim] = j < o.sinks ? 1.0f : 0.0f;
    kr[stripe_dim] = stripe_amp[static_cast<std::size_t>(j)];
    const int m = needle_of[static_cast<std::size_t>(j)];
    for (index_t c = 0; c < needle_dims; ++c)
      kr[needle0 + c] = m >= 0 ? static_cast<float>(e[static_cast<std::size_t>(m)][static_cast<std::size_t>(c)])
                               : static_cast<float>(0.02 * ds::gauss(seed, ds::kKeyNoise, base + static_cast<std::uint64_t>(needle0 + c)));
    for (index_t c = 0; c < content_dims; ++c)
      kr[content0 + c] = static_cast<float>(0.43 * ds::gauss(seed, ds::kKeyNoise, base + static_cast<std::uint64_t>(content0 + c)));
    for (index_t c = 0; c < d; ++c) {
      kr[c] = static_cast<float>(kr[c] * store);
      vr[c] = static_cast<float>(ds::gauss(seed, ds::kValues, base + static_cast<std::uint64_t>(c)));
    }
  };

  // Queries.
  std::vector<double> qre(static_cast<std::size_t>(o.q_heads * pairs)), qim(qre.size());
  for (index_t h = 0; h < o.q_heads; ++h) {
    const auto w = ds::head_weights(o.preset, h);
    for (index_t i = 0; i < pairs; ++i) {
      double re = w.band, im = 0.0;
      for (index_t delta : s.slash_offsets[static_cast<std::size_t>(h)]) {
        const double a = -static_cast<double>(delta) * theta[static_cast<std::size_t>(i)];
        re += w.slash * std::cos(a);
        im += w.slash * std::sin(a);
      }
      qre[static_cast<std::size_t>(h * pairs + i)] = amp * re;
      qim[static_cast<std::size_t>(h * pairs + i)] = amp * im;
    }
  }
  std::vector<double> needle_sum(static_cast<std::size_t>(needle_dims), 0.0);
  for (const auto& em : e)
    for (index_t c = 0; c < needle_dims; ++c) needle_sum[static_cast<std::size_t>(c)] += em[static_cast<std::size_t>(c)];
  const double growth = ds::sink_growth(o.preset);
  auto query_row = [&](index_t t) {
    const index_t h = t / n, p = t % n;
    const auto w = ds::head_weights(o.preset, h);
    const auto base = static_cast<std::uint64_t>(t * d);
    float* qr = s.q.data() + t * d;
    for (index_t i = 0; i < pairs; ++i) {
      qr[2 * i] = static_cast<float>(qre[static_cast<std::size_t>(h * pairs + i)] +
                                     0.05 * ds::gauss(seed, ds::kQueryNoise, base + static_cast<std::uint64_t>(2 * i)));
      qr[2 * i + 1] = static_cast<float>(qim[static_cast<std::size_t>(h * pairs + i)] +
                                         0.05 * ds::gauss(seed, ds::kQueryNoise, base + static_cast<std::uint64_t>(2 * i + 1)));
    }
    rope(qr, p);
    const double grow = growth > 0.0 ? growth * std::log(static_cast<double>(p + 1)) : 0.0;
    qr[sink_dim] = static_cast<float>(w.sink + grow);
    qr[stripe_dim] = static_cast<float>(w.stripe);
    const bool late = p >= s.needle_query_begin;
    for (index_t c = 0; c < needle_dims; ++c)
      qr[needle0 + c] = late ? static_cast<float>((w.needle + grow) * needle_sum[static_cast<std::size_t>(c)])
                             : static_cast<float>(0.3 * ds::gauss(seed, ds::kQueryNoise, base + static_cast<std::uint64_t>(needle0 + c)));
    for (index_t c = 0; c < content_dims; ++c)
      qr[content0 + c] = static_cast<float>(0.43 * w.content * ds::gauss(seed, ds::kQueryNoise, base + static_cast<std::uint64_t>(content0 + c)));
    for (index_t c = 0; c < d; ++c) qr[c] = static_cast<float>(qr[c] * store);
  };
  // Rows are cheap and uniform: about 4 chunks of rows per worker.
  sparse_attn::detail::with_executor(exec, [&](Executor& ex) {
    auto rows_on_workers = [&](index_t rows, auto&& row) {
      const index_t grain = std::max<index_t>(1, rows / (4 * std::max(ex.concurrency(), 1)));
      run_chunks(ex, rows, grain, [&](index_t t0, index_t t1, int) {
        for (index_t t = t0; t < t1; ++t) row(t);
      });
    };
    rows_on_workers(o.kv_heads * n, key_value_row);
    rows_on_workers(o.q_heads * n, query_row);
  });
  return s;
}

}  // namespace eval
SPARSE_ATTN_NAMESPACE_END
