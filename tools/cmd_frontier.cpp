// `sparse-attn frontier`: the error-vs-compression frontier of every method on the embedded default
// workload, no arguments needed:
//   - the synthetic long-context generator (include/sparse_attn/eval/synthetic.hpp) at 32k tokens,
//     4 query heads on 1 KV head, plus 8k and 16k for the length term of the fit; needles planted;
//     its calibrated preset by default (concentration matched to the TinyLlama layers 3-21),
//     --synthetic-preset stress for the original, much more diffuse one;
//   - the bundled TinyLlama-1.1B layers 0, 3, 11, 21 (data/tinyllama: 8 query heads of KV group 0,
//     2048 tokens), at prefixes 512, 1024, 2048.
// Prints a table per dataset (synthetic at its full length; TinyLlama at 2048 averaged over layers
// 3, 11, 21, layer 0 separately), the fits log(err) = a + b log(CR) + c log(n) per method and phase
// and the CR where the error crosses 1% and 5%; writes frontier.json and frontier.png (--out-dir).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sparse_attn/eval/evaluate.hpp>
#include <string>
#include <vector>

#include "cli.hpp"
#include "eval_report.hpp"

#ifndef SPARSE_ATTN_DATA_DIR
#define SPARSE_ATTN_DATA_DIR ""
#endif

namespace sparse_attn::cli {
namespace {

struct FrontierArgs {
  std::string out_dir = ".";
  std::string json;  // default <out_dir>/frontier.json
  std::string data_dir = SPARSE_ATTN_DATA_DIR;
  std::string compression = "2,5,10,20";
  std::string real_compression = "1.1,1.25,1.5,2,3,5,10,20";
  index_t synthetic_tokens = 32768;
  std::string synthetic_preset = "calibrated";  // or "stress"
  index_t last_rows = 64;
  int threads = 0;
  bool no_plot = false;
};

constexpr int kLayers[] = {0, 3, 11, 21};
// The total targets of the per-layer budget table.
const std::vector<double> kScheduleCompressions{5, 10};

// Mean over records of the same (phase, method, target CR): errors, recalls and times averaged,
// worst-head error and min mass are the worst over the group, reachable if all are.
std::vector<eval::Record> average(const std::vector<eval::Record>& recs, const std::string& label) {
  std::vector<eval::Record> out;
  std::vector<int> count;
  for (const eval::Record& r : recs) {
    auto it = std::find_if(out.begin(), out.end(), [&](const eval::Record& o) {
      return o.phase == r.phase && o.label() == r.label() && o.target_cr == r.target_cr;
    });
    if (it == out.end()) {
      out.push_back(r);
      out.back().dataset = label;
      out.back().detail.clear();
      count.push_back(1);
      continue;
    }
    const std::size_t i = static_cast<std::size_t>(it - out.begin());
    eval::Record& o = *it;
    o.achieved_cr += r.achieved_cr;
    o.reachable = o.reachable && r.reachable;
    o.err_layer += r.err_layer;
    o.err_median_head += r.err_median_head;
    o.err_worst_head = std::max(o.err_worst_head, r.err_worst_head);
    o.mass_mean += r.mass_mean;
    o.mass_min = std::min(o.mass_min, r.mass_min);
    o.top1 += r.top1;
    o.ms_select += r.ms_select;
    o.ms_kernel += r.ms_kernel;
    o.ms_dense += r.ms_dense;
    ++count[i];
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double c = count[i];
    eval::Record& o = out[i];
    o.achieved_cr /= c;
    o.err_layer /= c;
    o.err_median_head /= c;
    o.mass_mean /= c;
    o.top1 /= c;
  }
  return out;
}

std::vector<eval::Record> filter(const std::vector<eval::Record>& recs,
                                 const std::function<bool(const eval::Record&)>& pred) {
  std::vector<eval::Record> out;
  for (const auto& r : recs)
    if (pred(r)) out.push_back(r);
  return out;
}

void run_frontier(const FrontierArgs& a) {
  namespace fs = std::filesystem;
  using Clock = std::chrono::steady_clock;
  const auto t_start = Clock::now();
  check(a.threads >= 0, "--threads must be >= 0 (0 = OpenMP default), got ", a.threads);
  check(a.synthetic_tokens >= 1024 && a.synthetic_tokens <= (index_t{1} << 20),
        "--synthetic-tokens must be in [1024, 1048576], got ", a.synthetic_tokens);
  check(a.last_rows >= 1 && a.last_rows < 512, "--last-rows must be in [1, 512), got ", a.last_rows);
  std::error_code ec;
  check(fs::is_directory(a.out_dir, ec), "--out-dir ", a.out_dir, ": directory does not exist");
  const std::string json_path = a.json.empty() ? (fs::path(a.out_dir) / "frontier.json").string() : a.json;
  const std::string png_path = a.no_plot ? std::string() : (fs::path(a.out_dir) / "frontier.png").string();
  // Output paths and the plotter before the (long) run.
  OutputSet outputs;
  const std::size_t json_out = outputs.add(json_path, a.json.empty() ? "--out-dir" : "--json");
  const std::size_t png_out =
      a.no_plot ? report::kNoOutput : outputs.add(png_path, "--out-dir", ".png");
  const std::string python =
      a.no_plot ? std::string() : report::require_plotter(png_path, "or pass --no-plot");

  eval::EvalOptions opt;
  opt.compressions = report::parse_compressions(a.compression);
  opt.last_rows = a.last_rows;
  opt.num_threads = a.threads;
  opt.progress = [t_start](const std::string& s) {
    const double sec = std::chrono::duration<double>(Clock::now() - t_start).count();
    std::fprintf(stderr, "sparse-attn: frontier [%6.1fs] %s\n", sec, s.c_str());
  };

  std::printf("sparse-attn frontier: kernels on CPU target %s, %d thread(s)\n",
              target_name(cpu_target()), OpenMPExecutor(a.threads).concurrency());

  eval::EvalOptions opt_real = opt;  // finer near CR 1: where the error crosses 1% and 5%
  opt_real.compressions = report::parse_compressions(a.real_compression);

  // Real layers (the bundled subset), if present.
  const fs::path tl = fs::path(a.data_dir) / "tinyllama";
  const bool have_real = !a.data_dir.empty() && fs::exists(tl / "A_L3_q.npy", ec);
  if (!have_real)
    std::fprintf(stderr, "sparse-attn: note: no TinyLlama data under '%s' (pass --data-dir); "
                 "running the synthetic workload only\n", tl.string().c_str());
  std::vector<eval::Record> recs;
  std::vector<eval::Problem> full_layers;  // layers 0, 3, 11, 21 at full length
  if (have_real) {
    for (int L : kLayers) {
      const std::string base = (tl / ("A_L" + std::to_string(L))).string();
      full_layers.push_back(eval::load_npy_problem("tinyllama/L" + std::to_string(L),
                                                   base + "_q.npy", base + "_k.npy", base + "_v.npy"));
      const eval::Problem& full = full_layers.back();
      for (index_t n : {index_t{512}, index_t{1024}, full.tokens()}) {
        if (n > full.tokens()) continue;
        const eval::Problem p = n == full.tokens() ? full : eval::prefix(full, n);
        auto r = eval::evaluate(p, opt_real);
        recs.insert(recs.end(), r.begin(), r.end());
      }
    }
  }
  // Synthetic: generated at each length (the needles and their late queries scale with n).
  const eval::SyntheticPreset preset =
      a.synthetic_preset == "stress" ? eval::SyntheticPreset::stress : eval::SyntheticPreset::calibrated;
  const index_t N = a.synthetic_tokens;
  for (index_t n : {N / 4, N / 2, N}) {
    eval::SyntheticOptions so;
    so.preset = preset;
    so.tokens = n;
    so.q_heads = 4;
    so.kv_heads = 1;
    const eval::Problem p = eval::synthetic_problem(so, "synthetic", {nullptr, a.threads});
    auto r = eval::evaluate(p, opt);
    recs.insert(recs.end(), r.begin(), r.end());
  }

  auto is_mid_layer = [](const eval::Record& r) {
    return r.dataset == "tinyllama/L3" || r.dataset == "tinyllama/L11" || r.dataset == "tinyllama/L21";
  };
  index_t real_n = 0;
  for (const auto& r : recs)
    if (is_mid_layer(r)) real_n = std::max(real_n, r.tokens);

  // Tables.
  const auto syn = filter(recs, [&](const eval::Record& r) { return r.dataset == "synthetic" && r.tokens == N; });
  report::print_table(stdout, "synthetic (" + a.synthetic_preset + " preset): n=" + std::to_string(N) +
                                  ", Hq=4 Hkv=1 d=64, sinks + band + stripes + slashes + 4 needles; "
                                  "decode = last " + std::to_string(a.last_rows) + " rows",
                      syn, true);
  std::vector<eval::Record> real_mid, real_l0;
  if (have_real) {
    real_mid = average(filter(recs, [&](const eval::Record& r) { return is_mid_layer(r) && r.tokens == real_n; }),
                       "tinyllama/L3-21");
    real_l0 = filter(recs, [&](const eval::Record& r) { return r.dataset == "tinyllama/L0" && r.tokens == real_n; });
    report::print_table(stdout, "TinyLlama-1.1B layers 3, 11, 21 (mean; err-max and massmin: worst), n=" +
                                    std::to_string(real_n) + ", Hq=8 Hkv=1 (KV group 0); ms summed over layers",
                        real_mid, false);
    report::print_table(stdout, "TinyLlama-1.1B layer 0 (near-uniform attention), n=" + std::to_string(real_n),
                        real_l0, false);
  }
  report::print_legend(stdout, true);

  // Per-layer budgets over the four bundled layers: one total CR split by each schedule.
  std::vector<eval::ScheduleRecord> schedules;
  if (have_real) {
    eval::EvalOptions so = opt;
    so.compressions = kScheduleCompressions;
    so.prefill_methods = {"block_sparse", "vertical_slash"};
    so.decode_methods = {"quest", "snapkv"};
    schedules = eval::evaluate_schedules(full_layers, so);
    report::print_schedules(stdout,
                            "Per-layer budgets over TinyLlama layers 0, 3, 11, 21 (n=" +
                                std::to_string(full_layers.front().tokens()) +
                                "): one total CR split by schedule",
                            schedules);
  }

  // Panels and fits.
  std::vector<report::Panel> panels;
  for (const char* phase : {"prefill", "decode"}) {
    if (have_real) {
      report::Panel p;
      p.title = "TinyLlama L3-21 (mean), n=" + std::to_string(real_n) + " - " + phase;
      p.phase = phase;
      p.tokens = real_n;
      p.fit_over = "layers 3, 11, 21 x n = 512, 1024, 2048";
      p.series = report::series_of(filter(real_mid, [&](const eval::Record& r) { return r.phase == phase; }));
      for (auto& s : p.series) {
        std::vector<eval::FitPoint> pts;
        for (const auto& r : recs)
          if (is_mid_layer(r) && r.phase == phase && r.label() == s.method)
            pts.push_back({r.err_layer, r.achieved_cr, static_cast<double>(r.tokens)});
        s.fit = eval::fit_log_linear(pts);
      }
      panels.push_back(p);
    }
    report::Panel p;
    p.title = "synthetic (" + a.synthetic_preset + "), n=" + std::to_string(N) + " - " + phase;
    p.phase = phase;
    p.tokens = N;
    p.fit_over = "n = " + std::to_string(N / 4) + ", " + std::to_string(N / 2) + ", " + std::to_string(N);
    p.series = report::series_of(filter(syn, [&](const eval::Record& r) { return r.phase == phase; }));
    for (auto& s : p.series) s.fit = eval::fit_records(recs, "synthetic", phase, s.method);
    panels.push_back(p);
  }
  for (const auto& p : panels) report::print_fits(stdout, p);

  nlohmann::ordered_json doc;
  doc["tool"] = "sparse-attn frontier";
  doc["title"] = "sparse-attn frontier: relative L2 error vs achieved compression";
  doc["options"] = {{"compression", opt.compressions}, {"real_compression", opt_real.compressions},
                    {"last_rows", a.last_rows},
                    {"synthetic_tokens", N}, {"synthetic_preset", a.synthetic_preset}, {"data_dir", a.data_dir},
                    {"threads", OpenMPExecutor(a.threads).concurrency()},
                    {"cpu_target", target_name(cpu_target())}};
  doc["records"] = nlohmann::ordered_json::array();
  for (const auto& r : recs) doc["records"].push_back(report::to_json(r));
  doc["tinyllama_l3_21_mean"] = nlohmann::ordered_json::array();
  for (const auto& r : real_mid) doc["tinyllama_l3_21_mean"].push_back(report::to_json(r));
  doc["layer_schedules"] = nlohmann::ordered_json::array();
  for (const auto& r : schedules) doc["layer_schedules"].push_back(report::to_json(r));
  doc["panels"] = nlohmann::ordered_json::array();
  doc["crossings"] = nlohmann::ordered_json::object();
  for (const auto& p : panels) {
    doc["panels"].push_back(report::to_json(p));
    doc["crossings"][p.title] = report::crossings(p);
  }
  const double total = std::chrono::duration<double>(Clock::now() - t_start).count();
  doc["seconds"] = total;
  std::fflush(stdout);
  report::write_outputs(doc, outputs, json_out, png_out, python);
  std::fprintf(stderr, "sparse-attn: frontier: done in %.1f s; wrote %s%s%s\n", total, json_path.c_str(),
               png_path.empty() ? "" : " and ", png_path.c_str());
}

}  // namespace

Command add_frontier_command(CLI::App& root) {
  auto a = std::make_shared<FrontierArgs>();
  CLI::App* sub = root.add_subcommand(
      "frontier",
      "Error-vs-compression frontier of every method on the embedded default workload (synthetic "
      "32k + bundled TinyLlama layers): tables, fits, frontier.json and frontier.png");
  sub->add_option("--out-dir", a->out_dir, "directory for frontier.json and frontier.png")->capture_default_str();
  sub->add_option("--json", a->json, "JSON path (default <out-dir>/frontier.json)");
  sub->add_flag("--no-plot", a->no_plot,
                "do not write frontier.png (without it the PNG is required: python3 with "
                "matplotlib, else exit 1)");
  sub->footer(kOutputFilesHelp);
  sub->add_option("--data-dir", a->data_dir, "folder holding tinyllama/A_L{0,3,11,21}_{q,k,v}.npy")
      ->capture_default_str();
  sub->add_option("--synthetic-tokens", a->synthetic_tokens,
                  "synthetic length N (also N/4 and N/2 for the fit)")
      ->capture_default_str();
  sub->add_option("--synthetic-preset", a->synthetic_preset,
                  "synthetic weights: calibrated (the concentration of the TinyLlama layers 3-21) "
                  "or stress (the original, far more diffuse workload)")
      ->check(CLI::IsMember({"calibrated", "stress"}))
      ->capture_default_str();
  sub->add_option("--compression", a->compression, "target compression ratios, comma-separated")
      ->capture_default_str();
  sub->add_option("--real-compression", a->real_compression,
                  "target compression ratios on the TinyLlama layers")
      ->capture_default_str();
  sub->add_option("--last-rows", a->last_rows, "decode steps: the last R query rows")->capture_default_str();
  sub->add_option("--threads", a->threads, "OpenMP threads (0 = OpenMP default)")->capture_default_str();
  return Command{sub, [a] { run_frontier(*a); }};
}

}  // namespace sparse_attn::cli
