/// @file
/// @brief Fidelity metrics of a sparse attention output against dense attention on the same
/// Q/K/V, and the log-linear fit of error against compression and length (docs/METHODS.md,
/// section "Evaluation").
///
/// - relative L2 error: ||O - O_dense|| / ||O_dense||, per query head (over its rows) and over
///   the whole output (the "layer output" error of docs/METHODS.md, section "Evaluation").
/// - attention-mass recall: share of a row's dense softmax mass on the pairs the method
///   computed, sum_{kept j} e^{s_ij - lse_i} = e^{lse_method_i - lse_dense_i}, where lse_method is
///   the LSE the kernel reports over exactly the pairs it computed. Exact for every row at the
///   cost of the sparse kernel itself; no sampling.
/// - top-1 recall: share of rows whose dense argmax key (ties toward the lower index) was
///   computed by the method. The argmax needs the dense logits: O(n_q n_k d) per head, so rows
///   are sampled above kTop1AllRows queries (top1_rows()).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <Eigen/Core>
#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/exec/default.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace eval {

/// Quiet NaN: the value of a metric that is undefined (no data, or a zero reference with a
/// non-zero error).
inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// Rows whose top-1 recall is measured: every row up to this many queries, else a sample.
inline constexpr index_t kTop1AllRows = 8192;
/// Size of the sample above kTop1AllRows.
inline constexpr index_t kTop1SampleRows = 2048;

/// Query rows for top-1 recall: all of [0, n_q) when n_q <= kTop1AllRows, else kTop1SampleRows rows
/// evenly strided over [0, n_q) that always include the last row (deterministic). O(rows).
/// @param n_q query rows of the problem (n_q <= 0 gives none).
/// @return ascending, distinct row indices in [0, n_q).
/// @throws std::bad_alloc when the list cannot be allocated.
inline std::vector<index_t> top1_rows(index_t n_q) {
  std::vector<index_t> rows;
  if (n_q <= kTop1AllRows) {
    rows.resize(static_cast<std::size_t>(n_q));
    std::iota(rows.begin(), rows.end(), index_t{0});
    return rows;
  }
  for (index_t s = 0; s < kTop1SampleRows; ++s)
    rows.push_back((n_q - 1) - (kTop1SampleRows - 1 - s) * (n_q - 1) / (kTop1SampleRows - 1));
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

/// Dense argmax key of query rows `rows` of every query head: result[h * rows.size() + r] =
/// argmax_{j <= position(rows[r])} q_h,r . k_{h/G},j (ties toward the lower j; the scale does not
/// change the argmax). Queries are the last n_q of the n_k positions. Blocked Eigen GEMMs, over
/// (head, 64 rows) items on `exec`: O(Hq x rows x n_k x d) flops. Allocates an fp32 copy of K
/// (Hkv x n_k x d floats) and, per worker, a 64-row block of queries and its logits (up to
/// 64 x n_k floats).
/// @param q queries, [Hq, n_q, d] fp32, any strides.
/// @param k keys, [Hkv, n_k, d] fp32, any strides; Hq a multiple of Hkv.
/// @param rows query rows to evaluate, each in [0, n_q) (unchecked), ascending (the causal limit
/// of a block of 64 rows is taken from its last row).
/// @param causal true: row r sees keys [0, n_k - n_q + r]; false: every key.
/// @param exec the caller's executor, or the default one for exec.num_threads.
/// @return [Hq][rows.size()] key indices.
/// @throws sparse_attn::invalid_argument when Hq is not a multiple of Hkv, the head dims differ,
/// n_q > n_k, or exec.num_threads < 0.
/// @throws std::bad_alloc when the buffers cannot be allocated.
inline std::vector<index_t> dense_argmax(const TensorView<const float>& q,
                                         const TensorView<const float>& k,
                                         const std::vector<index_t>& rows, bool causal = true,
                                         const ExecutorChoice& exec = {}) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  require(q.heads % k.heads == 0 && q.dim == k.dim && q.tokens <= k.tokens, "eval::dense_argmax",
          "inconsistent Q/K shapes");
  const index_t G = q.heads / k.heads, d = q.dim, n_k = k.tokens, off = k.tokens - q.tokens;
  const index_t nr = static_cast<index_t>(rows.size());
  constexpr index_t kChunk = 64;
  const index_t chunks = (nr + kChunk - 1) / kChunk;
  std::vector<index_t> best(static_cast<std::size_t>(q.heads * nr), 0);
  // Contiguous fp32 keys per KV head (views may be strided).
  std::vector<Mat> keys(static_cast<std::size_t>(k.heads));
  for (index_t hk = 0; hk < k.heads; ++hk) {
    Mat& km = keys[static_cast<std::size_t>(hk)];
    km.resize(n_k, d);
    for (index_t j = 0; j < n_k; ++j)
      for (index_t c = 0; c < d; ++c) km(j, c) = k(hk, j, c);
  }
  sparse_attn::detail::with_executor(exec, [&](Executor& ex) {
    // Per worker: a chunk of query rows and its logits against the visible keys.
    struct Scratch {
      Mat qc, s;
    };
    std::vector<Scratch> ws(static_cast<std::size_t>(std::max(ex.concurrency(), 0)));
    run_items(ex, q.heads * chunks, [&](index_t item, int worker) {
      Mat& qc = ws[static_cast<std::size_t>(worker)].qc;
      Mat& s = ws[static_cast<std::size_t>(worker)].s;
      const index_t h = item / chunks, c0 = (item % chunks) * kChunk;
      const index_t m = std::min(kChunk, nr - c0);
      const index_t last_pos = causal ? rows[static_cast<std::size_t>(c0 + m - 1)] + off : n_k - 1;
      const index_t width = std::min(n_k, last_pos + 1);
      qc.resize(m, d);
      for (index_t r = 0; r < m; ++r)
        for (index_t c = 0; c < d; ++c) qc(r, c) = q(h, rows[static_cast<std::size_t>(c0 + r)], c);
      s.noalias() = qc * keys[static_cast<std::size_t>(h / G)].topRows(width).transpose();
      for (index_t r = 0; r < m; ++r) {
        const index_t lim = causal ? std::min(width, rows[static_cast<std::size_t>(c0 + r)] + off + 1) : width;
        index_t arg = 0;
        float mx = -std::numeric_limits<float>::infinity();
        for (index_t j = 0; j < lim; ++j)
          if (s(r, j) > mx) {
            mx = s(r, j);
            arg = j;
          }
        best[static_cast<std::size_t>(h * nr + c0 + r)] = arg;
      }
    });
  });
  return best;
}

/// Relative L2 errors of `got` against `ref`, both [heads, rows, dv] (any strides).
struct OutputError {
  /// [heads] ||O_h - R_h|| / ||R_h|| (0 when both are 0, NaN when only R_h is).
  std::vector<double> per_head;
  /// ||O - R|| / ||R|| over every head: the layer-output error (0 / NaN as per_head).
  double overall = 0.0;
  /// @return the median of per_head (the mean of the two middle values for an even count); NaN
  /// when empty. O(H log H); copies per_head.
  double median_head() const {
    if (per_head.empty()) return kNaN;
    std::vector<double> v = per_head;
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  }
  /// @return the largest of per_head; NaN when empty. O(H).
  double worst_head() const {
    return per_head.empty() ? kNaN : *std::max_element(per_head.begin(), per_head.end());
  }
};

/// Relative L2 errors of `got` against `ref`, accumulated in double. O(heads x rows x dv).
/// @param got the method's output, [heads, rows, dv].
/// @param ref the dense reference, of the same shape.
/// @return per-head and overall errors.
/// @throws sparse_attn::invalid_argument when the shapes differ.
inline OutputError output_error(const TensorView<const float>& got, const TensorView<const float>& ref) {
  require(got.heads == ref.heads && got.tokens == ref.tokens && got.dim == ref.dim,
          "eval::output_error", "shape mismatch");
  OutputError e;
  double num_all = 0.0, den_all = 0.0;
  for (index_t h = 0; h < ref.heads; ++h) {
    double num = 0.0, den = 0.0;
    for (index_t i = 0; i < ref.tokens; ++i)
      for (index_t c = 0; c < ref.dim; ++c) {
        const double r = ref(h, i, c), g = got(h, i, c);
        num += (g - r) * (g - r);
        den += r * r;
      }
    e.per_head.push_back(den > 0.0 ? std::sqrt(num / den) : (num > 0.0 ? kNaN : 0.0));
    num_all += num;
    den_all += den;
  }
  e.overall = den_all > 0.0 ? std::sqrt(num_all / den_all) : (num_all > 0.0 ? kNaN : 0.0);
  return e;
}

/// Attention-mass recall per row from the two LSEs: e^{lse_method - lse_dense}, clamped to [0, 1]
/// (fp32 rounding can put a fully kept row a hair above 1). A row dense attention leaves empty
/// counts as fully recalled.
struct MassRecall {
  /// Mean recall over the rows, in [0, 1]; NaN when there are no rows.
  double mean = kNaN, min = kNaN;
  /// @var min
  /// Smallest recall of a row, in [0, 1]; NaN when there are no rows.
};
/// Attention-mass recall of every row from the two LSEs (see MassRecall). O(rows).
/// @param lse_method per-row LSE the sparse kernel reported (natural log, over the pairs it
/// computed; -inf for a row that computed none).
/// @param lse_dense per-row LSE of dense attention, the same rows in the same order.
/// @return mean and minimum recall.
/// @throws sparse_attn::invalid_argument when the sizes differ.
inline MassRecall mass_recall(const std::vector<float>& lse_method, const std::vector<float>& lse_dense) {
  require(lse_method.size() == lse_dense.size(), "eval::mass_recall", "size mismatch");
  MassRecall r;
  if (lse_dense.empty()) return r;
  double sum = 0.0, mn = 1.0;
  for (std::size_t i = 0; i < lse_dense.size(); ++i) {
    double m = 1.0;
    if (std::isfinite(lse_dense[i]))
      m = lse_method[i] == -std::numeric_limits<float>::infinity()
              ? 0.0
              : std::clamp(std::exp(static_cast<double>(lse_method[i]) - lse_dense[i]), 0.0, 1.0);
    sum += m;
    mn = std::min(mn, m);
  }
  r.mean = sum / static_cast<double>(lse_dense.size());
  r.min = mn;
  return r;
}

/// Least-squares fit of log(error) = a + b log(CR) + c log(n) over points with error > 0 and
/// CR > 1. With a single distinct n the length term is not identifiable: c = 0 and
/// length_term = false. r2 is the coefficient of determination of log(error).
struct LogLinearFit {
  /// Intercept a (log error at CR 1 and n 1); NaN when the fit was not possible.
  double a = kNaN, b = kNaN, c = kNaN, r2 = kNaN;
  /// @var b
  /// Slope b of log(error) in log(CR).
  /// @var c
  /// Slope c of log(error) in log(n); 0 without a length term.
  /// @var r2
  /// Coefficient of determination of log(error), in (-inf, 1].

  index_t points = 0;         ///< Points used (error > 0, CR > 1, tokens > 0, all finite).
  bool length_term = false;   ///< Whether the points had several lengths, so c was fitted.
  /// @return whether a fit was made (enough points: at least one more than the coefficients).
  bool ok() const { return std::isfinite(a); }
};

/// One point of a log-linear fit.
struct FitPoint {
  /// Relative error (> 0 to be used).
  double error, compression, tokens;
  /// @var compression
  /// Achieved compression ratio (> 1 to be used).
  /// @var tokens
  /// Sequence length n in tokens (> 0 to be used).
};

/// Least-squares fit of log(error) = a + b log(CR) + c log(n) (see LogLinearFit), by
/// column-pivoted Householder QR. Points with a non-finite or non-positive error, a CR not above
/// 1 or non-positive tokens are skipped; with fewer usable points than coefficients + 1 the
/// result is not ok(). O(points).
/// @param pts_in the points (any order).
/// @return the fit.
/// @throws std::bad_alloc when the work arrays cannot be allocated.
inline LogLinearFit fit_log_linear(const std::vector<FitPoint>& pts_in) {
  std::vector<FitPoint> pts;
  for (const FitPoint& p : pts_in)
    if (std::isfinite(p.error) && p.error > 0.0 && std::isfinite(p.compression) &&
        p.compression > 1.0 + 1e-9 && p.tokens > 0.0)
      pts.push_back(p);
  LogLinearFit f;
  f.points = static_cast<index_t>(pts.size());
  bool many_n = false;
  for (const FitPoint& p : pts) many_n = many_n || p.tokens != pts.front().tokens;
  const int cols = many_n ? 3 : 2;
  if (static_cast<int>(pts.size()) < cols + 1) return f;
  Eigen::MatrixXd X(static_cast<Eigen::Index>(pts.size()), cols);
  Eigen::VectorXd y(static_cast<Eigen::Index>(pts.size()));
  for (std::size_t i = 0; i < pts.size(); ++i) {
    const auto r = static_cast<Eigen::Index>(i);
    X(r, 0) = 1.0;
    X(r, 1) = std::log(pts[i].compression);
    if (many_n) X(r, 2) = std::log(pts[i].tokens);
    y(r) = std::log(pts[i].error);
  }
  const Eigen::VectorXd beta = X.colPivHouseholderQr().solve(y);
  const Eigen::VectorXd res = y - X * beta;
  const double mean = y.mean();
  const double ss_tot = (y.array() - mean).square().sum();
  f.a = beta(0);
  f.b = beta(1);
  f.c = many_n ? beta(2) : 0.0;
  f.length_term = many_n;
  f.r2 = ss_tot > 0.0 ? 1.0 - res.squaredNorm() / ss_tot : 1.0;
  return f;
}

/// Where an error curve first reaches `level`: interpolated linearly in log(error) vs log(CR)
/// between the two sweep points that bracket it (bracketed); below the first sparse point when that
/// point is already at or above `level` (cr = that point's CR: the crossing is somewhere in
/// (1, cr]); never within the sweep (cr = NaN). Points must be sorted by compression.
struct Crossing {
  /// How the crossing was located.
  enum Kind { bracketed, below_first, never } kind = never;
  /// @var bracketed
  /// Between two sweep points: cr interpolated in log(error) vs log(CR).
  /// @var below_first
  /// The first sparse point is already at or above the level: the crossing lies in (1, cr].
  /// @var never
  /// No sweep point reaches the level: cr is NaN.
  /// @var kind
  /// Where the crossing lies relative to the sweep.

  double cr = kNaN;  ///< Compression ratio of the crossing (see kind); NaN for never.
};
/// Where an error curve first reaches `level` (see Crossing). Points with a negative or NaN
/// error, or a non-finite CR not above 1, are skipped. O(points); never throws.
/// @param cr_err (achieved CR, error) points sorted by CR.
/// @param level the error level, > 0.
/// @return the crossing.
inline Crossing crossing_compression(const std::vector<std::pair<double, double>>& cr_err, double level) {
  double prev_cr = 1.0, prev_err = 0.0;
  for (const auto& [cr, err] : cr_err) {
    if (!(err >= 0.0) || !std::isfinite(cr) || cr <= 1.0 + 1e-9) continue;
    if (err >= level) {
      if (prev_err <= 0.0) return {Crossing::below_first, cr};
      const double t = (std::log(level) - std::log(prev_err)) / (std::log(err) - std::log(prev_err));
      return {Crossing::bracketed, std::exp(std::log(prev_cr) + t * (std::log(cr) - std::log(prev_cr)))};
    }
    prev_cr = cr;
    prev_err = err;
  }
  return {};
}

}  // namespace eval
SPARSE_ATTN_NAMESPACE_END
