// Shared plumbing of the `sparse-attn` tool. Each subcommand lives in tools/cmd_<name>.cpp and
// exposes one `add_<name>_command`; sparse_attn_cli.cpp registers them and maps errors to exit
// codes: 0 ok, 2 bad input or usage (one line on stderr), 1 internal failure.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "check.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"
#include "sparse_attn/io/npy.hpp"

namespace sparse_attn::cli {

constexpr int kExitOk = 0;
constexpr int kExitInternal = 1;
constexpr int kExitBadInput = 2;

/// A registered subcommand: its CLI11 node and the body to run once parsing succeeded. The body
/// throws sparse_attn::invalid_argument for bad input and must leave no output file behind.
struct Command {
  CLI::App* app = nullptr;
  std::function<void()> run;
};

Command add_attend_command(CLI::App& root);
Command add_decode_command(CLI::App& root);


/// A rank-3 [heads, tokens, dim] floating-point array read from an .npy file.
struct Tensor3 {
  io::NpyArray array;
  index_t heads = 0, tokens = 0, dim = 0;
};

/// Reads `path` (named `what` in messages, e.g. "--q") and checks rank 3, float dtype, extents
/// >= 1.
inline Tensor3 load_tensor3(const std::string& path, const char* what) {
  Tensor3 t;
  try {
    t.array = io::read_npy(path, {io::NpyDtype::f4, io::NpyDtype::f2});
  } catch (const invalid_argument& e) {
    throw invalid_argument(sparse_attn::detail::concat(what, " ", e.what()));
  }
  check(t.array.rank() == 3, what, " ", path, ": must have rank 3 [heads, tokens, dim], got shape ",
        t.array.shape_str(), " (rank ", t.array.rank(), ")");
  t.heads = t.array.shape[0];
  t.tokens = t.array.shape[1];
  t.dim = t.array.shape[2];
  check(t.heads >= 1 && t.tokens >= 1 && t.dim >= 1, what, " ", path,
        ": every extent must be >= 1, got shape ", t.array.shape_str());
  return t;
}

/// --q, --k, --v of one problem: each read by load_tensor3, then checked against each other (K and
/// V agree in heads and tokens, Q's head dim equals K's, GQA heads, n_q <= n_k).
struct QkvFiles {
  Tensor3 q, k, v;
};
inline QkvFiles load_qkv(const std::string& q_path, const std::string& k_path,
                         const std::string& v_path) {
  QkvFiles f{load_tensor3(q_path, "--q"), load_tensor3(k_path, "--k"), load_tensor3(v_path, "--v")};
  const Tensor3 &q = f.q, &k = f.k, &v = f.v;
  check(k.heads == v.heads && k.tokens == v.tokens, "K and V shapes differ: K ",
        k.array.shape_str(), ", V ", v.array.shape_str(), "; heads and tokens must match");
  check(q.dim == k.dim, "head dim mismatch: Q has d=", q.dim, ", K has d=", k.dim);
  check(q.heads % k.heads == 0, "Q heads (", q.heads, ") must be a multiple of K/V heads (",
        k.heads, ")");
  check(q.tokens <= k.tokens, "n_q=", q.tokens, " > n_k=", k.tokens,
        "; queries are the last n_q of the n_k positions, so n_q <= n_k");
  return f;
}

/// Output files written to temp names and renamed into place only when all are complete; if
/// anything fails (or commit() is never reached) no output file remains.
class OutputSet {
 public:
  OutputSet() = default;
  OutputSet(const OutputSet&) = delete;
  OutputSet& operator=(const OutputSet&) = delete;
  ~OutputSet() {
    if (!committed_)
      for (const Item& it : items_) remove_quietly(it.tmp);
  }

  /// Fails early (before any compute) when the file cannot be created in its directory.
  static void check_writable(const std::string& path, const char* what) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path parent = fs::path(path).parent_path();
    check(parent.empty() || fs::is_directory(parent, ec), what, " ", path,
          ": directory does not exist");
    check(!fs::is_directory(path, ec), what, " ", path, ": is a directory");
  }

  template <class T>
  void stage(const std::string& path, const T* data, const std::vector<index_t>& shape) {
    items_.push_back({path, io::detail::tmp_path_for(path)});
    io::write_npy_direct(items_.back().tmp, data, shape);
  }

  void commit() {
    std::size_t done = 0;
    try {
      for (; done < items_.size(); ++done) io::commit_tmp_file(items_[done].tmp, items_[done].path);
    } catch (...) {
      for (std::size_t i = 0; i < done; ++i) remove_quietly(items_[i].path);
      for (std::size_t i = done; i < items_.size(); ++i) remove_quietly(items_[i].tmp);
      committed_ = true;
      throw;
    }
    committed_ = true;
  }

 private:
  struct Item {
    std::string path, tmp;
  };
  static void remove_quietly(const std::string& p) {
    std::error_code ec;
    std::filesystem::remove(p, ec);
  }
  std::vector<Item> items_;
  bool committed_ = false;
};

}  // namespace sparse_attn::cli
