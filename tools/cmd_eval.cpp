// `sparse-attn eval`: fidelity vs compression of every method on one layer's Q/K/V (.npy files).
// For each method x target CR: achieved CR, relative L2 error of the output vs dense (whole output,
// median and worst head), attention-mass recall (mean, min over rows), top-1 recall, time and
// speed-up vs dense in the same run. Prefill over every query row; decode over the last R query
// rows as decode steps (step t: the token at position n_k - R + t over the cache [0, n_k - R + t]
// as the method left it; include/sparse_attn/eval/evaluate.hpp has the exact protocol).
// Table on stdout, progress on stderr, JSON and PNG on request.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <sparse_attn/eval/evaluate.hpp>
#include <string>
#include <vector>

#include "cli.hpp"
#include "eval_report.hpp"

namespace sparse_attn::cli {
namespace {

struct EvalArgs {
  std::string q, k, v, json, plot;
  std::string phase = "both";
  std::string methods = "all";
  std::string compression = "2,5,10,20";
  std::string adaptive = "block_sparse,vertical_slash,quest,quest_head,snapkv";
  std::string lengths;
  index_t last_rows = 64;
  RunOptions run;
};

std::vector<index_t> parse_lengths(const std::string& s) {
  std::vector<index_t> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = s.find(',', pos);
    const std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    char* end = nullptr;
    const long long v = std::strtoll(tok.c_str(), &end, 10);
    check(!tok.empty() && end && *end == '\0' && v >= 1, "--lengths: '", tok,
          "' is not a token count (positive integers, comma-separated)");
    out.push_back(static_cast<index_t>(v));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void run_eval(const EvalArgs& a) {
  // Options first: nothing is read or computed before the command line is known to be sane.
  check(a.phase == "prefill" || a.phase == "decode" || a.phase == "both",
        "--phase must be prefill, decode or both, got '", a.phase, "'");
  a.run.check_ranges();
  eval::EvalOptions opt;
  opt.compressions = report::parse_compressions(a.compression);
  report::parse_methods(a.methods, opt.prefill_methods, opt.decode_methods);
  opt.adaptive = report::parse_adaptive(a.adaptive);
  opt.prefill = a.phase != "decode";
  opt.decode = a.phase != "prefill";
  opt.last_rows = a.last_rows;
  opt.num_threads = a.run.threads;
  opt.progress = [](const std::string& s) { std::fprintf(stderr, "sparse-attn: eval: %s\n", s.c_str()); };
  if (opt.decode) check(a.last_rows >= 1, "--last-rows must be >= 1, got ", a.last_rows);
  // Output paths and the plotter next: nothing is read or computed for a run that cannot write
  // what it was asked for.
  OutputSet outputs;
  const std::size_t json_out = a.json.empty() ? report::kNoOutput : outputs.add(a.json, "--json");
  const std::size_t plot_out =
      a.plot.empty() ? report::kNoOutput : outputs.add(a.plot, "--plot", ".png");
  const std::string python =
      a.plot.empty() ? std::string()
                     : report::require_plotter("--plot " + a.plot, "or drop --plot");

  const QkvFiles files = load_qkv(a.q, a.k, a.v);
  const Tensor3 &q = files.q, &k = files.k, &v = files.v;
  const index_t off = k.tokens - q.tokens;
  std::vector<index_t> lengths = a.lengths.empty() ? std::vector<index_t>{k.tokens} : parse_lengths(a.lengths);
  for (index_t n : lengths) {
    check(n > off && n <= k.tokens, "--lengths: ", n, " must be in (", off, ", ", k.tokens,
          "] (a prefix of the keys that keeps at least one query row)");
    if (opt.decode)
      check(a.last_rows < n - off, "--last-rows ", a.last_rows, " must be < the query rows (", n - off,
            " at length ", n, "): the prompt before the decode steps keeps at least one query");
  }

  std::string name = std::filesystem::path(a.q).stem().string();
  eval::Problem full = eval::make_problem(name, q.array.to_float(), q.heads, q.tokens, k.array.to_float(),
                                          v.array.to_float(), k.heads, k.tokens, q.dim, v.dim);
  if (a.run.scale_opt->count()) full.scale = static_cast<float>(a.run.scale);

  std::vector<eval::Record> recs;
  for (index_t n : lengths) {
    const eval::Problem p = n == k.tokens ? full : eval::prefix(full, n);
    auto r = eval::evaluate(p, opt);
    recs.insert(recs.end(), r.begin(), r.end());
  }

  // Table of the full length; fits over every length.
  std::vector<eval::Record> last;
  for (const auto& r : recs)
    if (r.tokens == k.tokens) last.push_back(r);
  char title[256];
  std::snprintf(title, sizeof title, "%s: Hq=%lld Hkv=%lld n_q=%lld n_k=%lld d=%lld, decode = last %lld rows",
                name.c_str(), static_cast<long long>(q.heads), static_cast<long long>(k.heads),
                static_cast<long long>(q.tokens), static_cast<long long>(k.tokens),
                static_cast<long long>(q.dim), static_cast<long long>(a.last_rows));
  report::print_table(stdout, title, last, false);
  report::print_legend(stdout, false);

  nlohmann::ordered_json doc;
  doc["tool"] = "sparse-attn eval";
  doc["title"] = std::string("sparse-attn eval: ") + name;
  doc["input"] = {{"q", a.q}, {"k", a.k}, {"v", a.v}, {"hq", q.heads}, {"hkv", k.heads},
                  {"n_q", q.tokens}, {"n_k", k.tokens}, {"d", q.dim}, {"dv", v.dim}};
  doc["options"] = {{"phase", a.phase},        {"methods", a.methods},
                    {"compression", opt.compressions}, {"adaptive", opt.adaptive},
                    {"last_rows", a.last_rows}, {"lengths", lengths},
                    {"threads", OpenMPExecutor(a.run.threads).concurrency()},
                    {"cpu_target", target_name(cpu_target())}};
  doc["records"] = nlohmann::ordered_json::array();
  for (const auto& r : recs) doc["records"].push_back(report::to_json(r));
  doc["panels"] = nlohmann::ordered_json::array();
  doc["crossings"] = nlohmann::ordered_json::object();
  for (const char* phase : {"prefill", "decode"}) {
    std::vector<eval::Record> ph;
    for (const auto& r : last)
      if (r.phase == phase) ph.push_back(r);
    if (ph.empty()) continue;
    report::Panel panel;
    panel.title = name + " - " + phase + ", n=" + std::to_string(k.tokens);
    panel.phase = phase;
    panel.tokens = k.tokens;
    panel.fit_over = lengths.size() > 1 ? "lengths " + a.lengths : "one length: c not fitted";
    panel.series = report::series_of(ph);
    for (auto& s : panel.series) s.fit = eval::fit_records(recs, name, phase, s.method);
    report::print_fits(stdout, panel);
    doc["panels"].push_back(report::to_json(panel));
    doc["crossings"][phase] = report::crossings(panel);
  }
  std::fflush(stdout);
  report::write_outputs(doc, outputs, json_out, plot_out, python);
}

}  // namespace

Command add_eval_command(CLI::App& root) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* sub = root.add_subcommand(
      "eval", "Fidelity vs compression of every method on Q/K/V: table on stdout, JSON/PNG on request");
  sub->add_option("--q", a->q, "queries .npy [Hq, n_q, d], '<f4' or '<f2'")->required();
  sub->add_option("--k", a->k, "keys .npy [Hkv, n_k, d], '<f4' or '<f2'")->required();
  sub->add_option("--v", a->v, "values .npy [Hkv, n_k, dv], '<f4' or '<f2'")->required();
  sub->add_option("--phase", a->phase, "prefill, decode or both")->capture_default_str();
  sub->add_option("--methods", a->methods,
                  "all, or a comma-separated list of prefill and/or decode methods")
      ->capture_default_str();
  sub->add_option("--compression", a->compression, "target compression ratios, comma-separated")
      ->capture_default_str();
  sub->add_option("--adaptive", a->adaptive,
                  "none, or methods that also run adaptively: at each target CR, the mass budget "
                  "(per head where the estimated attention mass is) whose achieved CR is nearest "
                  "the target, reported as <method>+mass")
      ->capture_default_str();
  sub->add_option("--last-rows", a->last_rows,
                  "R: the last R query rows are decode steps (cache = keys [0, n_k - R + t] at step t)")
      ->capture_default_str();
  sub->add_option("--lengths", a->lengths,
                  "also evaluate these prefixes (token counts, comma-separated) for the fit "
                  "log(err) = a + b log(CR) + c log(n); default: the full length only");
  sub->add_option("--json", a->json, "write every record, fit and panel as JSON");
  sub->add_option("--plot", a->plot,
                  "write the frontier PNG (needs python3 with matplotlib: $SPARSE_ATTN_PYTHON, else "
                  "python3, else /usr/bin/python3; a PNG that cannot be made is an error, exit 1)");
  sub->footer(kOutputFilesHelp);
  a->run.add_to(sub);
  return Command{sub, [a] { run_eval(*a); }};
}

}  // namespace sparse_attn::cli
