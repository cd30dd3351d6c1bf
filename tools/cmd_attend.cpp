// `sparse-attn attend`: one prefill over Q [Hq, n_q, d], K [Hkv, n_k, d], V [Hkv, n_k, dv] from
// .npy files, under the mask of a method: dense, sliding_window, the data-dependent selections
// block_sparse, vertical_slash, flex_prefill (METHODS.md 3-5), or a block mask given by the caller
// (user_mask, block-CSR from .npy files or an np.savez .npz archive).
// Queries are the last n_q positions of the n_k keys (chunked-prefill convention).
// Selections read the K the kernel reads (after --kv-dtype rounding); their time is reported apart
// from the kernel's (JSON select_ms and ms).
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "npz.hpp"

namespace sparse_attn::cli {
namespace {

struct AttendArgs {
  std::string q, k, v, out, lse;
  bool causal = true;
  std::string method = "dense";
  index_t window = methods::SlidingWindowOptions{}.window;
  index_t sinks = methods::SlidingWindowOptions{}.sinks;
  double scale = std::numeric_limits<double>::quiet_NaN();
  int threads = 0;
  std::string kv_dtype = "auto";
  std::string out_dtype = "fp32";
  index_t block = 64;  // flex_prefill's default is its own (128) unless --block is given
  // block_sparse / vertical_slash
  double compression = methods::BlockSparseOptions{}.compression;
  index_t vertical = methods::VerticalSlashOptions{}.vertical;
  index_t slash = methods::VerticalSlashOptions{}.slash;
  std::string vs_mode = "exact";
  index_t last_q = 0;  // 0: the method's default (vertical_slash 64, flex_prefill 128)
  // flex_prefill
  double gamma = methods::FlexPrefillOptions{}.gamma;
  double tau = methods::FlexPrefillOptions{}.tau;
  index_t min_budget = methods::FlexPrefillOptions{}.min_budget;
  // user_mask
  std::string mask_bsr, mask_offsets, mask_indices, mask_full;
  // Which optional flags were given (CLI11 option handles).
  CLI::Option *window_opt = nullptr, *sinks_opt = nullptr, *scale_opt = nullptr,
              *causal_opt = nullptr, *block_opt = nullptr, *compression_opt = nullptr,
              *vertical_opt = nullptr, *slash_opt = nullptr, *vs_mode_opt = nullptr,
              *last_q_opt = nullptr, *gamma_opt = nullptr, *tau_opt = nullptr,
              *min_budget_opt = nullptr, *mask_bsr_opt = nullptr, *mask_offsets_opt = nullptr,
              *mask_indices_opt = nullptr, *mask_full_opt = nullptr;
};

bool given(const CLI::Option* o) { return o->count() > 0; }

index_t effective_block(const AttendArgs& a) {
  if (a.method == "flex_prefill" && !given(a.block_opt)) return methods::FlexPrefillOptions{}.block;
  return a.block;
}
index_t effective_last_q(const AttendArgs& a) {
  if (given(a.last_q_opt)) return a.last_q;
  return a.method == "flex_prefill" ? methods::FlexPrefillOptions{}.last_queries
                                    : methods::VerticalSlashOptions{}.last_queries;
}

// Option checks that need no file: which flags apply to the method, then their ranges.
void check_options(const AttendArgs& a) {
  const std::string& m = a.method;
  auto only_for = [&](const CLI::Option* o, const char* flag, bool applies, const char* methods) {
    check(!given(o) || applies, flag, " applies only to --method ", methods, ", not --method ", m);
  };
  const bool sliding = m == "sliding_window", bs = m == "block_sparse", vs = m == "vertical_slash",
             flex = m == "flex_prefill", user = m == "user_mask";
  if (!sliding)
    check(!given(a.window_opt) && !given(a.sinks_opt),
          "--window/--sinks apply only to --method sliding_window, not --method ", m);
  if (flex)
    check(!given(a.compression_opt),
          "--compression does not apply to --method flex_prefill: FlexPrefill sets no target CR "
          "(it is measured); tune --gamma (attention mass kept, > 0; >= 1 dense) instead");
  only_for(a.compression_opt, "--compression", bs || vs, "block_sparse or vertical_slash");
  only_for(a.vertical_opt, "--vertical", vs, "vertical_slash");
  only_for(a.slash_opt, "--slash", vs, "vertical_slash");
  only_for(a.vs_mode_opt, "--vs-mode", vs, "vertical_slash");
  only_for(a.last_q_opt, "--last-q", vs || flex, "vertical_slash or flex_prefill");
  only_for(a.gamma_opt, "--gamma", flex, "flex_prefill");
  only_for(a.tau_opt, "--tau", flex, "flex_prefill");
  only_for(a.min_budget_opt, "--min-budget", flex, "flex_prefill");
  only_for(a.mask_bsr_opt, "--mask-bsr", user, "user_mask");
  only_for(a.mask_offsets_opt, "--mask-offsets", user, "user_mask");
  only_for(a.mask_indices_opt, "--mask-indices", user, "user_mask");
  only_for(a.mask_full_opt, "--mask-full", user, "user_mask");
  if (!(m == "dense" || user)) check(a.causal, "--method ", m, " is causal only; drop --no-causal");

  if (a.scale_opt->count())
    check(std::isfinite(a.scale) && a.scale > 0, "--scale must be finite and > 0, got ", a.scale);
  check(a.threads >= 0, "--threads must be >= 0 (0 = OpenMP default), got ", a.threads);
  check(a.block >= 1, "--block must be >= 1, got ", a.block);
  if (sliding) {
    check(a.window >= 1, "--window must be >= 1, got ", a.window);
    check(a.sinks >= 0, "--sinks must be >= 0, got ", a.sinks);
  }
  if (given(a.compression_opt))
    check(std::isfinite(a.compression) && a.compression >= 1.0,
          "--compression must be finite and >= 1 (1 = dense), got ", a.compression);
  if (vs) {
    check(given(a.vertical_opt) == given(a.slash_opt),
          "--vertical and --slash go together (V columns and S offsets); got only ",
          given(a.vertical_opt) ? "--vertical" : "--slash");
    check(!(given(a.vertical_opt) && given(a.compression_opt)),
          "--method vertical_slash takes --compression or --vertical/--slash, not both");
    const methods::VerticalSlashOptions d;
    check(a.vertical >= d.sink_columns, "--vertical must be >= ", d.sink_columns,
          " (the forced sink columns 0..", d.sink_columns - 1, "), got ", a.vertical);
    check(a.slash >= d.local_offsets, "--slash must be >= ", d.local_offsets,
          " (the forced local band, offsets 0..", d.local_offsets - 1, "), got ", a.slash);
  }
  if (given(a.last_q_opt)) check(a.last_q >= 1, "--last-q must be >= 1 query, got ", a.last_q);
  if (flex) {
    check(std::isfinite(a.gamma) && a.gamma > 0.0,
          "--gamma must be finite and > 0 (attention mass kept; >= 1: dense), got ", a.gamma);
    check(std::isfinite(a.tau) && a.tau >= 0.0,
          "--tau must be finite and >= 0 (query-aware threshold on sqrt(JS); 0: never), got ",
          a.tau);
    check(a.min_budget >= 0, "--min-budget must be >= 0 tokens, got ", a.min_budget);
  }
  if (user) {
    const bool pair = given(a.mask_offsets_opt) || given(a.mask_indices_opt);
    check(given(a.mask_bsr_opt) || pair,
          "--method user_mask needs the block mask: --mask-bsr FILE.npz, or --mask-offsets "
          "OFF.npy --mask-indices IDX.npy [--mask-full FULL.npy]");
    check(!(given(a.mask_bsr_opt) && (pair || given(a.mask_full_opt))),
          "--mask-bsr holds the whole mask; do not combine it with --mask-offsets/--mask-indices/"
          "--mask-full");
    if (!given(a.mask_bsr_opt))
      check(given(a.mask_offsets_opt) && given(a.mask_indices_opt),
            "--mask-offsets and --mask-indices go together; got only ",
            given(a.mask_offsets_opt) ? "--mask-offsets" : "--mask-indices");
  }
}

// ---------------------------------------------------------------------------------------------
// User block mask: integer .npy arrays, from files or from a stored (np.savez) .npz archive.

std::string read_whole_file(const std::string& path, const char* what) {
  std::error_code ec;
  check(!std::filesystem::is_directory(path, ec), what, " ", path,
        ": is a directory, expected a file");
  errno = 0;
  io::detail::FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) {
    const int err = errno;
    check(false, what, " ", path,
          ": cannot open: ", err ? io::detail::errno_text(err) : std::string("unknown error"));
  }
  std::string bytes;
  std::array<char, 1 << 16> buf;
  for (std::size_t n; (n = std::fread(buf.data(), 1, buf.size(), f.get())) > 0;)
    bytes.append(buf.data(), n);
  check(!std::ferror(f.get()), what, " ", path, ": read error");
  return bytes;
}

/// The members of `path` (a .npz archive) named in `wanted`; see parse_npz().
Npz read_npz(const std::string& path, const char* what, const std::vector<std::string>& wanted) {
  return parse_npz(read_whole_file(path, what), std::string(what) + " " + path, wanted);
}

/// The arrays of --method user_mask, as given (checked against the geometry in user_mask()).
struct UserBsr {
  std::string source;  // for messages: which flags / file
  IntArray offsets, indices, full;
  bool has_full = false;
};

UserBsr load_user_bsr(const AttendArgs& a) {
  UserBsr m;
  if (given(a.mask_bsr_opt)) {
    m.source = "--mask-bsr " + a.mask_bsr;
    const Npz npz = read_npz(a.mask_bsr, "--mask-bsr", {"offsets", "indptr", "indices", "full"});
    std::string present;
    for (const std::string& n : npz.names) present += (present.empty() ? "'" : ", '") + n + "'";
    if (present.empty()) present = "none";
    auto member = [&](const char* key, IntArray& out) {
      auto it = npz.members.find(key);
      if (it == npz.members.end()) return false;
      out = parse_int_npy(m.source + "['" + key + "']", it->second);
      return true;
    };
    const bool offsets = member("offsets", m.offsets), indptr = npz.members.count("indptr") > 0;
    check(!(offsets && indptr), m.source,
          ": holds both 'offsets' and 'indptr'; keep one (they name the same array)");
    check(offsets || member("indptr", m.offsets), m.source,
          ": no 'offsets' member (scipy's name 'indptr' is accepted too); members present: ",
          present, ". Write it with np.savez(FILE, offsets=..., indices=..., full=...)");
    check(member("indices", m.indices), m.source,
          ": no 'indices' member; members present: ", present,
          ". Write it with np.savez(FILE, offsets=..., indices=..., full=...)");
    m.has_full = member("full", m.full);
  } else {
    m.source = "--mask-offsets " + a.mask_offsets + " / --mask-indices " + a.mask_indices;
    auto load = [](const std::string& path, const char* what) {
      return parse_int_npy(std::string(what) + " " + path, read_whole_file(path, what));
    };
    m.offsets = load(a.mask_offsets, "--mask-offsets");
    m.indices = load(a.mask_indices, "--mask-indices");
    m.has_full = given(a.mask_full_opt);
    if (m.has_full) m.full = load(a.mask_full, "--mask-full");
  }
  for (const IntArray* arr : {&m.offsets, &m.indices, m.has_full ? &m.full : nullptr})
    if (arr != nullptr)
      check(arr->shape.size() == 1, arr->name, ": must have rank 1, got shape ",
            shape_str(arr->shape), " (rank ", arr->shape.size(), ")");
  return m;
}

// from_bsr's messages say row_offsets / col_indices / full; the tool's names are offsets,
// indices, full.
std::string tool_names(std::string msg) {
  const std::string prefix = "methods::user_mask::from_bsr: ";
  if (msg.rfind(prefix, 0) == 0) msg.erase(0, prefix.size());
  for (auto [from, to] :
       {std::pair<std::string, std::string>{"row_offsets", "offsets"}, {"col_indices", "indices"}})
    for (std::size_t at; (at = msg.find(from)) != std::string::npos;)
      msg.replace(at, from.size(), to);
  return msg;
}

/// Checks the arrays against the geometry and builds the mask (head-shared when offsets has
/// num_q_blocks + 1 entries and Hq > 1); its pairs are counted on `pool`.
BlockListMask<AllowAll> user_mask(const UserBsr& m, const MaskShape& shape, Executor& pool) {
  const index_t nqb = shape.num_q_blocks(), per_head = shape.heads * nqb + 1, shared = nqb + 1;
  check(m.offsets.size() == per_head || m.offsets.size() == shared, m.offsets.name, ": has ",
        m.offsets.size(), " entries; expected Hq x num_q_blocks + 1 = ", shape.heads, " x ", nqb,
        " + 1 = ", per_head, " (one layout per query head) or num_q_blocks + 1 = ", shared,
        " (one layout for all heads), where num_q_blocks = ceil(n_q / block) = ceil(", shape.n_q,
        " / ", shape.block_q, ") = ", nqb);
  std::vector<std::uint8_t> full;
  if (m.has_full) {
    check(m.full.size() == m.indices.size(), m.full.name, ": has ", m.full.size(),
          " flags; expected one per indices entry (", m.indices.size(), ")");
    full.resize(m.full.values.size());
    for (std::size_t e = 0; e < full.size(); ++e) {
      const std::int64_t f = m.full.values[e];
      check(f == 0 || f == 1, m.full.name, ": entry ", e, " = ", f,
            "; flags must be 0 (partial) or 1 (full block)");
      full[e] = static_cast<std::uint8_t>(f);
    }
  }
  methods::BlockCsr<std::int64_t, std::int64_t> csr;
  csr.row_offsets = m.offsets.values;
  csr.col_indices = m.indices.values;
  csr.full = full;
  csr.head_shared = shape.heads > 1 && m.offsets.size() == shared;
  try {
    return methods::user_mask::from_bsr(shape, csr, AllowAll{}, {&pool});
  } catch (const invalid_argument& e) {
    throw invalid_argument(m.source + ": invalid block mask: " + tool_names(e.what()));
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel

// K or V in the storage type the kernel reads.
template <class T>
std::vector<T> to_storage(const io::NpyArray& a) {
  if constexpr (std::is_same_v<T, fp16>) {
    if (a.dtype == io::NpyDtype::f2) return a.f2;  // already fp16: used as stored
  }
  if constexpr (std::is_same_v<T, float>) return a.to_float();
  std::vector<T> out(static_cast<std::size_t>(a.size()));
  if (a.dtype == io::NpyDtype::f4) {
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = from_float<T>(a.f4[i]);  // RNE
  } else {
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] = from_float<T>(static_cast<float>(a.f2[i]));
  }
  return out;
}

struct RunResult {
  double select_ms = 0, ms = 0;
  index_t pairs = 0;
  double achieved_compression = 1.0;
  double target_compression = std::numeric_limits<double>::quiet_NaN();  // NaN: none (null)
  bool has_reachable = false, reachable = true;
  nlohmann::ordered_json fields = nlohmann::ordered_json::object();  // the method's own
};

template <class F>
auto timed(double& ms, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  auto result = f();
  ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

template <class TKV, class TO>
RunResult run_kernel(const AttendArgs& a, const Tensor3& q, const Tensor3& k, const Tensor3& v,
                     const UserBsr* bsr, OutputSet& outputs) {
  const std::vector<float> qf = q.array.to_float();
  const std::vector<TKV> ks = to_storage<TKV>(k.array), vs = to_storage<TKV>(v.array);
  std::vector<TO> out(static_cast<std::size_t>(q.heads * q.tokens * v.dim));
  std::vector<float> lse(a.lse.empty() ? 0 : static_cast<std::size_t>(q.heads * q.tokens));

  TensorView<const float> qv(qf.data(), q.heads, q.tokens, q.dim);
  TensorView<const TKV> kv(ks.data(), k.heads, k.tokens, k.dim);
  TensorView<const TKV> vv(vs.data(), v.heads, v.tokens, v.dim);
  TensorView<TO> ov(out.data(), q.heads, q.tokens, v.dim);
  // One executor for the selection and the kernel; its threads start first (an empty item per
  // worker), so neither time includes thread creation.
  OpenMPExecutor pool(a.threads);
  run_items(pool, pool.concurrency(), [](index_t, int) {});
  PrefillOptions opt;
  opt.scale = static_cast<float>(a.scale);
  opt.num_threads = a.threads;
  opt.executor = &pool;
  if (!lse.empty()) opt.lse = LseView(lse.data(), q.tokens);

  RunResult r;
  auto execute = [&](const auto& mask) {
    const auto t0 = std::chrono::steady_clock::now();
    prefill(qv, kv, vv, ov, mask, opt);
    const auto t1 = std::chrono::steady_clock::now();
    r.ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
    r.pairs = mask.pairs();
    r.achieved_compression = mask.compression();
  };
  const std::string& m = a.method;
  const index_t block = effective_block(a);
  if (m == "dense" || m == "sliding_window") {
    const IntervalMask mask = timed(r.select_ms, [&] {
      return m == "sliding_window"
                 ? methods::sliding_window(q.heads, q.tokens, k.tokens,
                                           methods::SlidingWindowOptions{a.window, a.sinks, block})
                 : methods::dense(q.heads, q.tokens, k.tokens,
                                  methods::DenseOptions{a.causal, block});
    });
    execute(mask);
  } else if (m == "block_sparse") {
    methods::BlockSparseOptions o;
    o.compression = a.compression;
    o.block = block;
    o.num_threads = a.threads;
    o.executor = &pool;
    const methods::BlockSparseMask mask =
        timed(r.select_ms, [&] { return methods::block_sparse::select(qv, kv, o); });
    r.target_compression = mask.target_compression;
    r.has_reachable = true;
    r.reachable = mask.reachable;
    r.fields["k"] = mask.top_k;
    execute(static_cast<const BlockListMask<AllowAll>&>(mask));
  } else if (m == "vertical_slash") {
    methods::VerticalSlashOptions o;
    o.compression = given(a.compression_opt) ? a.compression : 0.0;  // 0: use V and S
    o.vertical = a.vertical;
    o.slash = a.slash;
    o.last_queries = effective_last_q(a);
    o.block = block;
    o.scale = static_cast<float>(a.scale);
    o.num_threads = a.threads;
    o.executor = &pool;
    auto report = [&](const auto& mask) {
      r.target_compression = mask.target_compression;
      r.has_reachable = true;
      r.reachable = mask.reachable;
      r.fields["vs_mode"] = a.vs_mode;
      r.fields["last_q"] = o.last_queries;
      r.fields["vertical"] = mask.vertical;
      r.fields["slash"] = mask.slash;
    };
    if (a.vs_mode == "tiled") {
      const methods::VerticalSlashTiledMask mask =
          timed(r.select_ms, [&] { return methods::vertical_slash::select_tiled(qv, kv, o); });
      report(mask);
      execute(static_cast<const BlockListMask<AllowAll>&>(mask));
    } else {
      const methods::VerticalSlashExactMask mask =
          timed(r.select_ms, [&] { return methods::vertical_slash::select_exact(qv, kv, o); });
      report(mask);
      execute(static_cast<const BlockListMask<methods::VerticalSlashPredicate>&>(mask));
    }
  } else if (m == "flex_prefill") {
    methods::FlexPrefillOptions o;
    o.gamma = a.gamma;
    o.tau = a.tau;
    o.min_budget = a.min_budget;
    o.block = block;
    o.last_queries = effective_last_q(a);
    o.scale = static_cast<float>(a.scale);
    o.num_threads = a.threads;
    o.executor = &pool;
    const methods::FlexPrefillMask mask =
        timed(r.select_ms, [&] { return methods::flex_prefill::select(qv, kv, o); });
    r.has_reachable = true;
    r.reachable = mask.reachable;
    index_t query_aware = 0;
    for (std::uint8_t qa : mask.query_aware) query_aware += qa ? 1 : 0;
    r.fields["gamma"] = a.gamma;
    r.fields["tau"] = a.tau;
    r.fields["min_budget"] = a.min_budget;
    r.fields["last_q"] = o.last_queries;
    r.fields["query_aware_heads"] = query_aware;
    execute(static_cast<const BlockListMask<AllowAll>&>(mask));
  } else {  // user_mask
    const MaskShape shape{q.heads, q.tokens, k.tokens, block, block, a.causal};
    const BlockListMask<AllowAll> mask =
        timed(r.select_ms, [&] { return user_mask(*bsr, shape, pool); });
    r.fields["mask_layout"] = mask.head_shared() ? "shared" : "per_head";
    r.fields["mask_blocks"] = static_cast<index_t>(mask.block_indices().size());
    r.fields["mask_full_flags"] = bsr->has_full;
    execute(mask);
  }

  outputs.stage(a.out, out.data(), {q.heads, q.tokens, v.dim});
  if (!lse.empty()) outputs.stage(a.lse, lse.data(), {q.heads, q.tokens});
  return r;
}

template <class TKV>
RunResult run_out(const AttendArgs& a, const Tensor3& q, const Tensor3& k, const Tensor3& v,
                  const UserBsr* bsr, OutputSet& outputs) {
  if (a.out_dtype == "fp16") return run_kernel<TKV, fp16>(a, q, k, v, bsr, outputs);
  return run_kernel<TKV, float>(a, q, k, v, bsr, outputs);
}

void run_attend(const AttendArgs& a) {
  // Option checks first: no file is read before the command line is known to be sane.
  check_options(a);
  check(a.out != a.lse, "--out and --lse name the same file ", a.out);
  OutputSet::check_writable(a.out, "--out");
  if (!a.lse.empty()) OutputSet::check_writable(a.lse, "--lse");

  const QkvFiles files = load_qkv(a.q, a.k, a.v);
  const Tensor3 &q = files.q, &k = files.k, &v = files.v;

  std::string kv_dtype = a.kv_dtype;
  if (kv_dtype == "auto") {
    check(k.array.dtype == v.array.dtype, "K and V dtypes differ ('", k.array.descr(), "' vs '",
          v.array.descr(), "'); pass --kv-dtype to choose the storage type");
    kv_dtype = k.array.dtype == io::NpyDtype::f2 ? "fp16" : "fp32";
  }
  std::unique_ptr<UserBsr> bsr;
  if (a.method == "user_mask") bsr = std::make_unique<UserBsr>(load_user_bsr(a));

  OutputSet outputs;
  RunResult r;
  if (kv_dtype == "bf16")
    r = run_out<bf16>(a, q, k, v, bsr.get(), outputs);
  else if (kv_dtype == "fp16")
    r = run_out<fp16>(a, q, k, v, bsr.get(), outputs);
  else
    r = run_out<float>(a, q, k, v, bsr.get(), outputs);
  outputs.commit();

  nlohmann::ordered_json j;
  j["method"] = a.method;
  j["hq"] = q.heads;
  j["hkv"] = k.heads;
  j["n_q"] = q.tokens;
  j["n_k"] = k.tokens;
  j["d"] = q.dim;
  if (v.dim != q.dim) j["dv"] = v.dim;
  j["dtype"] = kv_dtype;
  j["out_dtype"] = a.out_dtype;
  j["causal"] = a.causal;
  if (a.method == "sliding_window") {
    j["window"] = a.window;
    j["sinks"] = a.sinks;
  }
  j["block"] = effective_block(a);
  j["scale"] = std::isnan(a.scale) ? 1.0 / std::sqrt(static_cast<double>(q.dim)) : a.scale;
  j["threads"] = OpenMPExecutor(a.threads).concurrency();
  j["cpu_target"] = target_name(cpu_target());
  for (auto it = r.fields.begin(); it != r.fields.end(); ++it) j[it.key()] = it.value();
  if (std::isnan(r.target_compression))
    j["target_compression"] = nullptr;
  else
    j["target_compression"] = r.target_compression;
  if (r.has_reachable) j["reachable"] = r.reachable;
  j["pairs"] = r.pairs;
  j["achieved_compression"] = r.achieved_compression;
  j["select_ms"] = r.select_ms;
  j["ms"] = r.ms;
  std::cout << j.dump() << std::endl;
}

constexpr const char* kFooter = R"(Methods (--method):
  dense           all keys j <= p (causal, default) or all keys (--no-causal)
  sliding_window  keys p-W < j <= p plus the first S keys (--window W, --sinks S)
  block_sparse    MInference block kernel: per query block the top-k key blocks of --block
                  (mean-pooled scores; sink, diagonal and previous block forced); k from
                  --compression C (default 10, finite, >= 1; 1 = dense)
  vertical_slash  MInference Vertical-Slash: --compression C, or --vertical V (>= 4) --slash S
                  (>= 64) (default V=1000, S=6096); --vs-mode exact (element-wise) | tiled (whole
                  blocks); --last-q W estimate queries (default 64)
  flex_prefill    FlexPrefill: --gamma G (mass kept, > 0; >= 1 dense; default 0.9), --tau T
                  (default 0.1), --min-budget M tokens (default 512); --block default 128,
                  --last-q default 128; CR is measured, not set
  user_mask       your block mask in block-CSR (BSR) form over --block x --block tiles: row
                  r = h * num_q_blocks + qb (num_q_blocks = ceil(n_q / block)), or qb alone
                  for one layout shared by all heads;
                    offsets  [rows + 1] ints (CSR indptr), offsets[0] = 0, non-decreasing
                    indices  [offsets[-1]] ints: key blocks of row r at
                             indices[offsets[r]:offsets[r+1]], strictly increasing, < num_k_blocks
                             (causal: not after the query block's last position)
                    full     optional, one 0/1 (or bool) per index: 1 = full block, no
                             element test (a hint: causality still applies, results are equal)
                  integer dtypes int8..int64, uint8..uint64, bool; given as --mask-offsets
                  OFF.npy --mask-indices IDX.npy [--mask-full FULL.npy], or as --mask-bsr
                  FILE.npz from np.savez(FILE, offsets=..., indices=..., full=...) ('indptr' is
                  accepted for 'offsets'). Archives from np.savez_compressed are not read:
                  use np.savez or the .npy files.
Output: O [Hq, n_q, dv] .npy and one JSON line: pairs, achieved_compression, target_compression
(null when the method takes none), reachable (false: target beyond the method's cap, clamped),
select_ms (mask selection), ms (kernel) and the method's own fields (k; vertical, slash;
query_aware_heads; mask_layout, mask_blocks).)";

}  // namespace

Command add_attend_command(CLI::App& root) {
  auto a = std::make_shared<AttendArgs>();
  CLI::App* sub = root.add_subcommand(
      "attend", "Prefill attention: O = softmax(scale * Q K^T + mask) V; prints one JSON line");
  sub->footer(kFooter);
  sub->add_option("--q", a->q, "queries .npy [Hq, n_q, d], '<f4' or '<f2'")->required();
  sub->add_option("--k", a->k, "keys .npy [Hkv, n_k, d], '<f4' or '<f2'")->required();
  sub->add_option("--v", a->v, "values .npy [Hkv, n_k, dv], '<f4' or '<f2'")->required();
  sub->add_option("--out", a->out, "output .npy [Hq, n_q, dv]")->required();
  sub->add_option("--lse", a->lse, "also write log-sum-exp .npy [Hq, n_q] (float32, natural log)");
  a->causal_opt = sub->add_flag("--causal,!--no-causal", a->causal,
                                "causal mask (default); --no-causal: dense and user_mask only");
  sub->add_option("--method", a->method, "selection method (see below)")
      ->check(CLI::IsMember({"dense", "sliding_window", "block_sparse", "vertical_slash",
                             "flex_prefill", "user_mask"}))
      ->capture_default_str();
  a->window_opt =
      sub->add_option("--window", a->window, "sliding_window: keys p-W < j <= p are visible")
          ->capture_default_str();
  a->sinks_opt = sub->add_option("--sinks", a->sinks, "sliding_window: first S keys always visible")
                     ->capture_default_str();
  a->scale_opt = sub->add_option("--scale", a->scale, "logit scale (default 1/sqrt(d))");
  sub->add_option("--threads", a->threads, "OpenMP threads (0 = OpenMP default)")
      ->capture_default_str();
  sub->add_option("--kv-dtype", a->kv_dtype,
                  "K/V storage: fp32, bf16 (float32 files rounded to nearest even), fp16; "
                  "auto = the files' dtype")
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16"}))
      ->capture_default_str();
  sub->add_option("--out-dtype", a->out_dtype, "output dtype")
      ->check(CLI::IsMember({"fp32", "fp16"}))
      ->capture_default_str();
  a->block_opt = sub->add_option("--block", a->block,
                                 "kernel tile = selection block = user_mask BSR block, >= 1 "
                                 "(default 64; flex_prefill 128)");
  a->compression_opt = sub->add_option(
      "--compression", a->compression,
      "block_sparse, vertical_slash: target compression ratio, finite, >= 1 (block_sparse "
      "default 10)");
  a->vertical_opt = sub->add_option("--vertical", a->vertical,
                                    "vertical_slash: V vertical columns kept, >= 4 (with --slash)");
  a->slash_opt = sub->add_option("--slash", a->slash,
                                 "vertical_slash: S slash offsets kept, >= 64 (with --vertical)");
  a->vs_mode_opt = sub->add_option("--vs-mode", a->vs_mode,
                                   "vertical_slash: exact (element-wise) or tiled (whole blocks)")
                       ->check(CLI::IsMember({"exact", "tiled"}))
                       ->capture_default_str();
  a->last_q_opt = sub->add_option("--last-q", a->last_q,
                                  "vertical_slash, flex_prefill: estimate from the last W queries, "
                                  ">= 1 (default 64; flex_prefill 128)");
  a->gamma_opt = sub->add_option("--gamma", a->gamma,
                                 "flex_prefill: attention mass to cover, > 0 (>= 1: dense)")
                     ->capture_default_str();
  a->tau_opt = sub->add_option("--tau", a->tau,
                               "flex_prefill: query-aware threshold on sqrt(JS divergence), >= 0")
                   ->capture_default_str();
  a->min_budget_opt =
      sub->add_option("--min-budget", a->min_budget,
                      "flex_prefill: fewest tokens of a vertical / slash budget, >= 0")
          ->capture_default_str();
  a->mask_bsr_opt = sub->add_option(
      "--mask-bsr", a->mask_bsr,
      "user_mask: .npz from np.savez with offsets, indices[, full] (not savez_compressed)");
  a->mask_offsets_opt = sub->add_option("--mask-offsets", a->mask_offsets,
                                        "user_mask: offsets .npy [Hq * num_q_blocks + 1] or "
                                        "[num_q_blocks + 1] (shared by all heads)");
  a->mask_indices_opt = sub->add_option("--mask-indices", a->mask_indices,
                                        "user_mask: key-block indices .npy [offsets[-1]]");
  a->mask_full_opt = sub->add_option("--mask-full", a->mask_full,
                                     "user_mask: optional full-block flags .npy (0/1), one per "
                                     "index");
  return Command{sub, [a] { run_attend(*a); }};
}

}  // namespace sparse_attn::cli
