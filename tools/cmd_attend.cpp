// `sparse-attn attend`: one prefill over Q [Hq, n_q, d], K [Hkv, n_k, d], V [Hkv, n_k, dv] from
// .npy files, under the mask of a method of the registry (sparse_attn/methods/registry.hpp) at a
// budget (--compression | --budget | --mass), or under a block mask given by the caller
// (user_mask, block-CSR from .npy files or an np.savez .npz archive).
// Queries are the last n_q positions of the n_k keys (chunked-prefill convention).
// Selections read the K the kernel reads (after --kv-dtype rounding) and get the kernel's options
// (scale, executor); their time is reported apart from the kernel's (JSON select_ms and ms).
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
#include <sparse_attn/exec/openmp.hpp>
#include <sparse_attn/kernel/prefill.hpp>
#include <sparse_attn/methods/registry.hpp>
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
  RunOptions run;
  MethodArgs m;
  std::string kv_dtype = "auto";
  std::string out_dtype = "fp32";
  std::string precision = "automatic";  // --precision: AttentionOptions::precision
  index_t block = 64;  // --block: the method's block parameter, and user_mask's BSR block
  // user_mask
  std::string mask_bsr, mask_offsets, mask_indices, mask_full;
  // Which optional flags were given (CLI11 option handles).
  CLI::Option *block_opt = nullptr, *mask_bsr_opt = nullptr, *mask_offsets_opt = nullptr,
              *mask_indices_opt = nullptr, *mask_full_opt = nullptr;
};

bool given(const CLI::Option* o) { return o->count() > 0; }

const std::vector<methods::MethodInfo>& registry() {
  static const std::vector<methods::MethodInfo> r = methods::prefill_methods();
  return r;
}

// The methods that take the caller's mask (--mask-*), for messages.
std::string user_mask_methods() {
  std::string s;
  for (const methods::MethodInfo& m : registry())
    if (m.needs_user_mask) s += (s.empty() ? "" : " or ") + m.name;
  return s;
}

// What the command line resolves to, checked before any file is read.
struct Plan {
  const methods::MethodInfo* info = nullptr;
  methods::Budget budget;
  bool has_target = true;  // false: a user mask run without a budget (nothing was asked)
  methods::ParamSettings settings;  // --param, then --block and --no-causal where they apply
  index_t bsr_block = 64;           // the user mask's block (its tiles)
};

// Option checks that need no file: which flags apply to the method, their ranges, the budget and
// the parameters (checked by the registry against the method's own).
Plan check_options(const AttendArgs& a) {
  Plan plan;
  const methods::MethodInfo& info = method_info(registry(), a.m.method);
  plan.info = &info;
  const std::string& m = info.name;
  for (auto [opt, flag] : {std::pair<const CLI::Option*, const char*>{a.mask_bsr_opt, "--mask-bsr"},
                           {a.mask_offsets_opt, "--mask-offsets"},
                           {a.mask_indices_opt, "--mask-indices"},
                           {a.mask_full_opt, "--mask-full"}})
    check(!given(opt) || info.needs_user_mask, flag, " applies only to --method ",
          user_mask_methods(), ", not --method ", m);
  a.run.check_ranges();
  check(a.block >= 1, "--block must be >= 1, got ", a.block);
  plan.budget = a.m.budget(info);
  // A user mask is the caller's choice: without a budget flag there is no target to reach.
  plan.has_target = a.m.budget_given() || !info.needs_user_mask;
  if (!plan.has_target) plan.budget = methods::Budget{};
  plan.settings = a.m.settings();
  // --block B is --param block=B where the method has a block parameter; a user mask's block is
  // the tile of its BSR layout.
  if (given(a.block_opt)) {
    check(has_param(info, "block") || info.needs_user_mask, "--block does not apply to --method ",
          m, ": it has no block parameter");
    if (has_param(info, "block")) plan.settings.emplace_back("block", std::to_string(a.block));
  }
  // --no-causal: a method with a causal parameter, or a user mask (its shape says).
  if (!a.causal) {
    check(has_param(info, "causal") || info.needs_user_mask, "--method ", m,
          " is causal only; drop --no-causal");
    if (has_param(info, "causal")) plan.settings.emplace_back("causal", "false");
  }
  // Unknown parameters and bad values now, before any file is read (the registry's message
  // names the method's parameters).
  methods::with_prefill_method(m, plan.settings, [](auto&) { return 0; });
  if (info.needs_user_mask) {
    // The BSR tile: --block, else the method's block parameter (default or --param), else 64.
    plan.bsr_block = a.block;
    if (!given(a.block_opt))
      for (const methods::ParamInfo& p : info.params)
        if (p.name == "block") plan.bsr_block = std::stoll(p.default_value);
    for (const auto& [key, value] : plan.settings)
      if (key == "block") plan.bsr_block = std::stoll(value);
    const bool pair = given(a.mask_offsets_opt) || given(a.mask_indices_opt);
    check(given(a.mask_bsr_opt) || pair, "--method ", m,
          " needs the block mask: --mask-bsr FILE.npz, or --mask-offsets "
          "OFF.npy --mask-indices IDX.npy [--mask-full FULL.npy]");
    check(!(given(a.mask_bsr_opt) && (pair || given(a.mask_full_opt))),
          "--mask-bsr holds the whole mask; do not combine it with --mask-offsets/--mask-indices/"
          "--mask-full");
    if (!given(a.mask_bsr_opt))
      check(given(a.mask_offsets_opt) && given(a.mask_indices_opt),
            "--mask-offsets and --mask-indices go together; got only ",
            given(a.mask_offsets_opt) ? "--mask-offsets" : "--mask-indices");
  }
  return plan;
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

/// The arrays of --method user_mask, as given (checked against the geometry in give_user_mask()).
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

// The method's messages say row_offsets / col_indices / full; the tool's names are offsets,
// indices, full.
std::string tool_names(std::string msg) {
  for (const char* prefix : {"methods::UserMask: ", "methods::UserMask"})
    if (msg.rfind(prefix, 0) == 0) msg.erase(0, std::string(prefix).size());
  for (auto [from, to] :
       {std::pair<std::string, std::string>{"row_offsets", "offsets"}, {"col_indices", "indices"}})
    for (std::size_t at; (at = msg.find(from)) != std::string::npos;)
      msg.replace(at, from.size(), to);
  return msg;
}

/// Checks the arrays against the geometry and gives the mask to the user-mask method `method`
/// (head-shared when offsets has num_q_blocks + 1 entries and Hq > 1); its pairs are counted on
/// `pool`.
template <class M>
void give_user_mask(M& method, const UserBsr& m, const MaskShape& shape, Executor& pool) {
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
    method = M(shape, csr, {}, ExecutorChoice{&pool, 0});
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
  bool reachable = true;
  std::string detail;
  nlohmann::ordered_json params = nlohmann::ordered_json::object();
  nlohmann::ordered_json fields = nlohmann::ordered_json::object();  // the user mask's
};

// The OutputSet indices of --out and --lse (added in this order by run_attend).
constexpr std::size_t kOutIndex = 0, kLseIndex = 1;

template <class TKV, class TO>
RunResult run_kernel(const AttendArgs& a, const Plan& plan, const Tensor3& q, const Tensor3& k,
                     const Tensor3& v, const UserBsr* bsr, OutputSet& outputs) {
  const std::vector<float> qf = q.array.to_float();
  const std::vector<TKV> ks = to_storage<TKV>(k.array), vs = to_storage<TKV>(v.array);
  std::vector<TO> out(static_cast<std::size_t>(q.heads * q.tokens * v.dim));
  std::vector<float> lse(a.lse.empty() ? 0 : static_cast<std::size_t>(q.heads * q.tokens));

  TensorView<const float> qv(qf.data(), q.heads, q.tokens, q.dim);
  TensorView<const TKV> kv(ks.data(), k.heads, k.tokens, k.dim);
  TensorView<const TKV> vv(vs.data(), v.heads, v.tokens, v.dim);
  TensorView<TO> ov(out.data(), q.heads, q.tokens, v.dim);
  // One executor for the selection and the kernel; its threads start first, so neither time
  // includes thread creation. The selection gets the kernel's options (scale, executor).
  OpenMPExecutor pool(a.run.threads);
  warm_up(pool);
  AttentionOptions sel_opt = a.run.attention(pool);
  sel_opt.precision = a.precision == "bfloat16" ? Precision::bfloat16
                      : a.precision == "float32" ? Precision::float32
                                                 : Precision::automatic;
  PrefillOptions opt = sel_opt;
  if (!lse.empty()) opt.lse = LseView(lse.data(), q.tokens);

  RunResult r = methods::with_prefill_method(
      plan.info->name, plan.settings, [&](auto& method) -> RunResult {
        using M = std::decay_t<decltype(method)>;
        RunResult res;
        auto t0 = std::chrono::steady_clock::now();
        if constexpr (methods::takes_user_mask_v<M>) {
          // The caller's mask: validated against the problem's geometry, then handed over.
          const MaskShape shape{q.heads, q.tokens, k.tokens, plan.bsr_block, plan.bsr_block,
                                a.causal};
          give_user_mask(method, *bsr, shape, pool);
          res.fields["mask_layout"] = method.mask.head_shared() ? "shared" : "per_head";
          res.fields["mask_blocks"] = static_cast<index_t>(method.mask.block_indices().size());
          res.fields["mask_full_flags"] = bsr->has_full;
          res.fields["block"] = plan.bsr_block;
        }
        const auto sel = method.select(qv, kv, plan.budget, sel_opt);
        auto t1 = std::chrono::steady_clock::now();
        res.select_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
        t0 = std::chrono::steady_clock::now();
        prefill(qv, kv, vv, ov, sel.mask, opt);
        t1 = std::chrono::steady_clock::now();
        res.ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
        // Pairs and CR of the mask the kernel ran; reachable and detail from the method.
        res.pairs = sel.mask.pairs();
        res.achieved_compression = sel.mask.compression();
        res.reachable = sel.stats.reachable;
        res.detail = sel.stats.detail;
        res.params = params_json(method);
        return res;
      });

  outputs.stage_npy(kOutIndex, out.data(), {q.heads, q.tokens, v.dim});
  if (!lse.empty()) outputs.stage_npy(kLseIndex, lse.data(), {q.heads, q.tokens});
  return r;
}

void run_attend(const AttendArgs& a) {
  // Option checks first: no file is read before the command line is known to be sane.
  const Plan plan = check_options(a);
  // Output paths next: a FIFO, device or directory is refused before anything is read or run.
  OutputSet outputs;
  outputs.add(a.out, "--out");
  if (!a.lse.empty()) outputs.add(a.lse, "--lse");

  const QkvFiles files = load_qkv(a.q, a.k, a.v);
  const Tensor3 &q = files.q, &k = files.k, &v = files.v;
  const std::string kv_dtype = resolve_kv_dtype(a.kv_dtype, k, v);
  std::unique_ptr<UserBsr> bsr;
  if (plan.info->needs_user_mask) bsr = std::make_unique<UserBsr>(load_user_bsr(a));

  const RunResult r = with_kv_type(kv_dtype, [&](auto tkv) {
    using TKV = decltype(tkv);
    if (a.out_dtype == "fp16") return run_kernel<TKV, fp16>(a, plan, q, k, v, bsr.get(), outputs);
    return run_kernel<TKV, float>(a, plan, q, k, v, bsr.get(), outputs);
  });
  outputs.commit();

  nlohmann::ordered_json j = problem_json(plan.info->name, files, kv_dtype);
  j["out_dtype"] = a.out_dtype;
  j["precision"] = a.precision;
  // A method's own causal parameter (set by --no-causal or --param causal=...) is what ran.
  j["causal"] = r.params.contains("causal") ? r.params["causal"] == "true" : a.causal;
  add_run_json(j, a.run, q.dim);
  for (auto it = r.fields.begin(); it != r.fields.end(); ++it) j[it.key()] = it.value();
  add_selection_json(j, plan.budget, r.reachable, r.achieved_compression, r.pairs);
  if (!plan.has_target) j["budget"] = j["target_compression"] = j["reachable"] = nullptr;
  j["detail"] = r.detail;
  j["params"] = r.params;
  j["select_ms"] = r.select_ms;
  j["ms"] = r.ms;
  std::cout << j.dump() << std::endl;
}

constexpr const char* kUserMaskHelp = R"(User masks (--method user_mask): your block mask in block-CSR (BSR) form over --block x
--block tiles (default: the method's block parameter): row r = h * num_q_blocks + qb
(num_q_blocks = ceil(n_q / block)), or qb alone for one layout shared by all heads;
    offsets  [rows + 1] ints (CSR indptr), offsets[0] = 0, non-decreasing
    indices  [offsets[-1]] ints: key blocks of row r at indices[offsets[r]:offsets[r+1]],
             strictly increasing, < num_k_blocks (causal: not after the query block's last
             position)
    full     optional, one 0/1 (or bool) per index: 1 = full block, no element test (a hint:
             causality still applies, results are equal)
  integer dtypes int8..int64, uint8..uint64, bool; given as --mask-offsets OFF.npy
  --mask-indices IDX.npy [--mask-full FULL.npy], or as --mask-bsr FILE.npz from
  np.savez(FILE, offsets=..., indices=..., full=...) ('indptr' is accepted for 'offsets').
  Archives from np.savez_compressed are not read: use np.savez or the .npy files.
Budget: at most one of --compression C (default: dense 1, every other method 10), --budget N (the
method's count unit), --mass P [--mass-floor N] [--mass-cap N] (floor and cap in the count unit).
A target CR the method cannot reach within --tolerance is still run (exit 0) and reported with
reachable: false.
Output: O [Hq, n_q, dv] .npy and one JSON line: budget, target_compression (null for --budget /
--mass), reachable, achieved_compression, pairs, detail (the resolved budget in the method's
terms), params (every parameter's value), select_ms (mask selection), ms (kernel).
)";

}  // namespace

Command add_attend_command(CLI::App& root) {
  auto a = std::make_shared<AttendArgs>();
  CLI::App* sub = root.add_subcommand(
      "attend", "Prefill attention: O = softmax(scale * Q K^T + mask) V; prints one JSON line");
  sub->footer(methods_help(registry(), "Methods (--method NAME; --param NAME=VALUE sets a parameter):") +
              kUserMaskHelp + kOutputFilesHelp);
  sub->add_option("--q", a->q, "queries .npy [Hq, n_q, d], '<f4' or '<f2'")->required();
  sub->add_option("--k", a->k, "keys .npy [Hkv, n_k, d], '<f4' or '<f2'")->required();
  sub->add_option("--v", a->v, "values .npy [Hkv, n_k, dv], '<f4' or '<f2'")->required();
  sub->add_option("--out", a->out, "output .npy [Hq, n_q, dv]")->required();
  sub->add_option("--lse", a->lse, "also write log-sum-exp .npy [Hq, n_q] (float32, natural log)");
  sub->add_flag("--causal,!--no-causal", a->causal,
                "causal mask (default); --no-causal: methods with a causal parameter and user "
                "masks only");
  a->m.add_to(sub, registry());
  a->run.add_to(sub);
  add_kv_dtype_option(sub, a->kv_dtype);
  sub->add_option("--out-dtype", a->out_dtype, "output dtype")
      ->check(CLI::IsMember({"fp32", "fp16"}))
      ->capture_default_str();
  sub->add_option("--precision", a->precision,
                  "products of Q K^T and P V: automatic (Q is float32 here: fp32 products), "
                  "float32, bfloat16 (bf16 products with fp32 accumulation; needs --kv-dtype bf16)")
      ->check(CLI::IsMember({"automatic", "float32", "bfloat16"}))
      ->capture_default_str();
  a->block_opt = sub->add_option("--block", a->block,
                                 "--param block=B for methods with a block parameter (kernel tile "
                                 "= selection block); user_mask: the BSR block, >= 1");
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
