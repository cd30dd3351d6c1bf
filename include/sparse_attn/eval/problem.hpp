/// @file
/// An evaluation problem: one layer's Q [Hq, n_q, d], K [Hkv, n_k, d], V [Hkv, n_k, dv] in fp32
/// (queries are the last n_q of the n_k positions), plus what the workload knows about itself
/// (the planted needle keys of the synthetic generator).
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

struct Problem {
  std::string name;                     ///< label in tables and JSON, e.g. "tinyllama/L3"
  TensorView<const float> q, k, v;      ///< views into `storage` (or caller memory)
  float scale = std::numeric_limits<float>::quiet_NaN();  ///< NaN: 1 / sqrt(d)
  std::vector<index_t> needles;         ///< key positions the last query row must retrieve
  std::shared_ptr<const void> storage;  ///< keeps the viewed memory alive (may be null)

  index_t tokens() const { return k.tokens; }
  index_t q_offset() const { return k.tokens - q.tokens; }  // position of query row 0
  float resolved_scale() const {
    return std::isnan(scale) ? 1.0f / std::sqrt(static_cast<float>(q.dim)) : scale;
  }
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
/// Causal attention of those rows is unchanged, so a prefix is an exact shorter problem.
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

/// Owns fp32 copies of Q/K/V.
struct OwnedTensors {
  std::vector<float> q, k, v;
};

/// A problem over fp32 data [heads, tokens, dim] (head-major, contiguous), copied into owned memory.
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

/// The synthetic workload as a problem (needles = the planted needle keys), generated on `exec`.
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

/// A problem from three rank-3 .npy files ('<f4' or '<f2'): Q [Hq, n_q, d], K and V [Hkv, n_k, *].
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
