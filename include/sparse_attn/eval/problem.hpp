/// @file
/// @brief eval::Problem, the input of the evaluator: one layer's Q, K, V in fp32 plus what the
/// workload knows about itself, and the ways to make one (arrays, .npy files, the synthetic
/// generator).
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/eval/synthetic.hpp"
#include "sparse_attn/io/npy.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace eval {

/// @brief An evaluation problem: one layer's Q [Hq, n_q, d], K [Hkv, n_k, d], V [Hkv, n_k, dv]
/// in fp32, queries being the last n_q of the n_k positions, plus what the workload knows about
/// itself (the planted needle keys of the synthetic generator).
///
/// A cheap-to-copy value: copies share the viewed memory through `storage`. Immutable use from
/// several threads is safe.
struct Problem {
  std::string name;  ///< Label in tables and JSON, e.g. "tinyllama/L3".
  /// Queries, [Hq, n_q, d]: a view into `storage` (or caller memory that outlives the problem).
  TensorView<const float> q, k, v;
  /// @var k
  /// Keys after RoPE, [Hkv, n_k, d].
  /// @var v
  /// Values, [Hkv, n_k, dv].

  float scale = std::numeric_limits<float>::quiet_NaN();  ///< Softmax scale; NaN: 1 / sqrt(d).
  std::vector<index_t> needles;  ///< Key positions the last query row must retrieve, in [0, n_k).
  std::shared_ptr<const void> storage;  ///< Keeps the viewed memory alive (may be null).

  /// @return n_k, the keys (positions) of the problem.
  index_t tokens() const { return k.tokens; }
  /// @return n_k - n_q, the position of query row 0.
  index_t q_offset() const { return k.tokens - q.tokens; }
  /// @return the softmax scale: `scale`, or 1 / sqrt(d) when it is NaN.
  float resolved_scale() const {
    return std::isnan(scale) ? 1.0f / std::sqrt(static_cast<float>(q.dim)) : scale;
  }
  /// Checks the views (validate_view) and their consistency: Hq a positive multiple of Hkv, K and
  /// V with equal heads and tokens, equal head dims of Q and K, 1 <= n_q <= n_k, every needle in
  /// [0, n_k). O(needles); allocates only an error's message.
  /// @param where the caller's name, prefixed to error messages.
  /// @throws sparse_attn::invalid_argument on the first failed check.
  void validate(const char* where) const {
    validate_view(q, "q");
    validate_view(k, "k");
    validate_view(v, "v");
    require(q.heads >= 1 && k.heads >= 1 && q.heads % k.heads == 0, where, ": Q heads (", q.heads,
            ") must be a positive multiple of K/V heads (", k.heads, ")");
    require(k.heads == v.heads && k.tokens == v.tokens, where, ": K [", k.heads, ", ", k.tokens,
            "] and V [", v.heads, ", ", v.tokens, "] differ in heads or tokens");
    require(q.dim == k.dim, where, ": head dim of Q (", q.dim, ") differs from K (", k.dim, ")");
    require(q.tokens >= 1 && q.tokens <= k.tokens, where, ": need 1 <= n_q <= n_k, got n_q=",
            q.tokens, ", n_k=", k.tokens);
    for (index_t j : needles)
      require(j >= 0 && j < k.tokens, where, ": needle position ", j, " outside [0, ", k.tokens, ")");
  }
};

/// The first n positions of a problem: keys [0, n) and the query rows whose positions are < n.
/// Causal attention of those rows is unchanged, so a prefix is an exact shorter problem. No data
/// are copied (the views are sliced and the storage shared); needles >= n are dropped. O(needles).
/// @param p the problem.
/// @param n positions kept, in (q_offset(), n_k].
/// @return the shorter problem, named as p.
/// @throws sparse_attn::invalid_argument when n is out of range (it must keep at least one query
/// row).
/// @throws std::bad_alloc when the copy of the name or needles cannot be allocated.
inline Problem prefix(const Problem& p, index_t n) {
  const index_t off = p.q_offset();
  require(n > off && n <= p.k.tokens, "eval::prefix", ": length ", n, " must be in (", off, ", ",
          p.k.tokens, "] (it must keep at least one query row)");
  Problem r = p;
  r.k = p.k.slice_tokens(0, n);
  r.v = p.v.slice_tokens(0, n);
  r.q = p.q.slice_tokens(0, n - off);
  r.needles.clear();
  for (index_t j : p.needles)
    if (j < n) r.needles.push_back(j);
  return r;
}

/// Owns fp32 copies of Q/K/V: the `storage` of a problem make_problem() built.
struct OwnedTensors {
  /// Queries, [Hq, n_q, d] contiguous.
  std::vector<float> q, k, v;
  /// @var k
  /// Keys, [Hkv, n_k, d] contiguous.
  /// @var v
  /// Values, [Hkv, n_k, dv] contiguous.
};

/// A problem over fp32 data [heads, tokens, dim] (head-major, contiguous). The vectors are moved
/// into memory the problem owns (no copy when the caller passes rvalues), then validated.
/// @param name label in tables and JSON.
/// @param q queries, hq x n_q x d floats.
/// @param hq query heads, a positive multiple of hkv.
/// @param n_q query rows (the last n_q positions), in [1, n_k].
/// @param k keys after RoPE, hkv x n_k x d floats.
/// @param v values, hkv x n_k x dv floats.
/// @param hkv KV heads.
/// @param n_k key positions.
/// @param d head dimension of queries and keys.
/// @param dv head dimension of values.
/// @return the problem (scale NaN: 1 / sqrt(d); no needles).
/// @throws sparse_attn::invalid_argument when a vector's size does not match its shape, or the
/// shapes are inconsistent (Problem::validate).
/// @throws std::bad_alloc when the owner cannot be allocated.
inline Problem make_problem(std::string name, std::vector<float> q, index_t hq, index_t n_q,
                            std::vector<float> k, std::vector<float> v, index_t hkv, index_t n_k,
                            index_t d, index_t dv) {
  auto own = std::make_shared<OwnedTensors>();
  own->q = std::move(q);
  own->k = std::move(k);
  own->v = std::move(v);
  require(static_cast<index_t>(own->q.size()) == hq * n_q * d &&
              static_cast<index_t>(own->k.size()) == hkv * n_k * d &&
              static_cast<index_t>(own->v.size()) == hkv * n_k * dv,
          "eval::make_problem", ": data sizes do not match the shapes");
  Problem p;
  p.name = std::move(name);
  p.q = TensorView<const float>(own->q.data(), hq, n_q, d);
  p.k = TensorView<const float>(own->k.data(), hkv, n_k, d);
  p.v = TensorView<const float>(own->v.data(), hkv, n_k, dv);
  p.storage = own;
  p.validate("eval::make_problem");
  return p;
}

/// The synthetic workload as a problem (needles = the planted needle keys), generated on `exec`
/// (see make_synthetic(): the data do not depend on the executor).
/// @param opt the generator's options.
/// @param name label in tables and JSON.
/// @param exec the caller's executor, or the default one for exec.num_threads.
/// @return the problem, owning its data (Hq x n x d + 2 x Hkv x n x d floats).
/// @throws sparse_attn::invalid_argument on inconsistent options (as make_synthetic()).
/// @throws std::bad_alloc when the data cannot be allocated.
inline Problem synthetic_problem(const SyntheticOptions& opt, std::string name = "synthetic",
                                 const ExecutorChoice& exec = {}) {
  auto data = std::make_shared<SyntheticData>(make_synthetic(opt, exec));
  Problem p;
  p.name = std::move(name);
  p.q = data->q_view();
  p.k = data->k_view();
  p.v = data->v_view();
  p.needles = data->needles;
  p.storage = data;
  return p;
}

/// A problem from three rank-3 .npy files ('<f4' or '<f2', converted to fp32): Q [Hq, n_q, d],
/// K [Hkv, n_k, d] and V [Hkv, n_k, dv]. Reads each file whole (io::read_npy).
/// @param name label in tables and JSON.
/// @param q_path path of the queries' .npy file.
/// @param k_path path of the keys' .npy file (after RoPE).
/// @param v_path path of the values' .npy file.
/// @return the problem, owning fp32 copies (scale NaN: 1 / sqrt(d); no needles).
/// @throws sparse_attn::invalid_argument when a file cannot be read or is not a valid .npy of an
/// allowed dtype, an array is not of rank 3, K and V differ in heads or tokens, or the shapes are
/// inconsistent (as make_problem()).
/// @throws std::bad_alloc when the data cannot be allocated.
inline Problem load_npy_problem(const std::string& name, const std::string& q_path,
                                const std::string& k_path, const std::string& v_path) {
  auto load = [](const std::string& path, const char* what) {
    io::NpyArray a = io::read_npy(path, {io::NpyDtype::f4, io::NpyDtype::f2});
    require(a.rank() == 3, "eval::load_npy_problem", ": ", what, " ", path,
            " must have rank 3 [heads, tokens, dim], got shape ", a.shape_str());
    return a;
  };
  const io::NpyArray q = load(q_path, "Q"), k = load(k_path, "K"), v = load(v_path, "V");
  require(k.shape[0] == v.shape[0] && k.shape[1] == v.shape[1], "eval::load_npy_problem",
          ": K ", k.shape_str(), " and V ", v.shape_str(), " differ in heads or tokens");
  return make_problem(name, q.to_float(), q.shape[0], q.shape[1], k.to_float(), v.to_float(),
                      k.shape[0], k.shape[1], q.shape[2], v.shape[2]);
}

}  // namespace eval
SPARSE_ATTN_NAMESPACE_END
