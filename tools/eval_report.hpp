// Reporting shared by `sparse-attn eval` and `sparse-attn frontier`: the stdout table, the JSON
// document and the PNG (tools/plot_frontier.py, embedded at build time, run with python3 +
// matplotlib as a subprocess; a PNG that cannot be made is an error, exit 1). The files go through
// an OutputSet (output_file.hpp): all of a run's outputs or none.
#pragma once
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <nlohmann/json.hpp>
#include <sparse_attn/eval/evaluate.hpp>
#include <sparse_attn/methods/registry.hpp>
#include <string>
#include <vector>

#include "cli.hpp"
#include "plot_script.hpp"

extern char** environ;

namespace sparse_attn::cli::report {

using eval::LogLinearFit;
using eval::Record;

inline std::string fmt(const char* f, double x) {
  if (!std::isfinite(x)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

/// The readable table: one line per record.
inline void print_table(std::FILE* out, const std::string& title, const std::vector<Record>& recs,
                        bool needles) {
  std::fprintf(out, "\n%s\n", title.c_str());
  std::fprintf(out, "%-21s %-7s %6s %8s %8s %8s %8s %7s %7s %6s %s%9s %8s\n", "method", "phase",
               "target", "achieved", "err", "err-med", "err-max", "mass", "massmin", "top1",
               needles ? "needles " : "", "ms", "speed-up");
  for (const Record& r : recs) {
    std::string target = fmt("%g", r.target_cr);
    std::string achieved = fmt("%.2f", r.achieved_cr) + (r.reachable ? " " : "*");
    std::string nd;
    if (needles) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%3lld/%-3lld ", static_cast<long long>(r.needles_kept),
                    static_cast<long long>(r.needles_total));
      nd = buf;
    }
    std::fprintf(out, "%-21s %-7s %6s %9s %8s %8s %8s %7s %7s %6s %s%9s %8s\n", r.label().c_str(),
                 r.phase.c_str(), target.c_str(), achieved.c_str(), fmt("%.4f", r.err_layer).c_str(),
                 fmt("%.4f", r.err_median_head).c_str(), fmt("%.4f", r.err_worst_head).c_str(),
                 fmt("%.4f", r.mass_mean).c_str(), fmt("%.4f", r.mass_min).c_str(),
                 fmt("%.3f", r.top1).c_str(), nd.c_str(), fmt("%.1f", r.ms_total()).c_str(),
                 fmt("%.2fx", r.speedup()).c_str());
  }
}

inline void print_legend(std::FILE* out, bool needles) {
  std::fprintf(out,
               "\nerr = relative L2 error of the whole output vs dense (err-med / err-max: median and "
               "worst query head); mass = share of each row's dense softmax mass the method computed "
               "(mean, min over rows); top1 = share of rows whose dense argmax key was computed; "
               "%sms = selection + kernel; speed-up = dense ms / ms in the same run; "
               "* = target CR not reachable (the achieved CR is more than 10%% from it).\n",
               needles ? "needles = (query head, needle) pairs the last query row computes; " : "");
}

inline nlohmann::ordered_json to_json(const Record& r) {
  auto num = [](double x) { return std::isfinite(x) ? nlohmann::ordered_json(x) : nlohmann::ordered_json(); };
  nlohmann::ordered_json j;
  j["dataset"] = r.dataset;
  j["phase"] = r.phase;
  j["method"] = r.method;
  j["budget"] = r.budget;
  j["adaptive"] = r.adaptive;
  j["tokens"] = r.tokens;
  j["rows"] = r.rows;
  j["target_cr"] = num(r.target_cr);
  j["achieved_cr"] = num(r.achieved_cr);
  j["reachable"] = r.reachable;
  j["detail"] = r.detail;
  j["err_layer"] = num(r.err_layer);
  j["err_median_head"] = num(r.err_median_head);
  j["err_worst_head"] = num(r.err_worst_head);
  j["mass_recall_mean"] = num(r.mass_mean);
  j["mass_recall_min"] = num(r.mass_min);
  j["top1_recall"] = num(r.top1);
  j["top1_rows"] = r.top1_rows;
  if (r.needles_total > 0) {
    j["needles_kept"] = r.needles_kept;
    j["needles_total"] = r.needles_total;
  }
  j["ms_select"] = num(r.ms_select);
  j["ms_kernel"] = num(r.ms_kernel);
  j["ms_dense"] = num(r.ms_dense);
  j["speedup"] = num(r.speedup());
  return j;
}

/// The per-layer budget table: one line per (phase, method, schedule, total CR).
inline void print_schedules(std::FILE* out, const std::string& title,
                            const std::vector<eval::ScheduleRecord>& recs) {
  std::fprintf(out, "\n%s\n", title.c_str());
  std::fprintf(out, "%-16s %-7s %-8s %6s %8s %8s %8s  %s\n", "method", "phase", "schedule",
               "target", "achieved", "err-mean", "err-max", "per layer: target CR -> err");
  for (const eval::ScheduleRecord& r : recs) {
    std::string layers;
    for (std::size_t l = 0; l < r.layer_target.size(); ++l)
      layers += (l ? "  " : "") + fmt("%.1f", r.layer_target[l]) + "->" + fmt("%.3f", r.layer_err[l]);
    std::fprintf(out, "%-16s %-7s %-8s %6s %8s %8s %8s  %s\n", r.method.c_str(), r.phase.c_str(),
                 r.schedule.c_str(), fmt("%g", r.target_cr).c_str(),
                 fmt("%.2f", r.achieved_cr).c_str(), fmt("%.4f", r.err_mean).c_str(),
                 fmt("%.4f", r.err_max).c_str(), layers.c_str());
  }
}

inline nlohmann::ordered_json to_json(const eval::ScheduleRecord& r) {
  nlohmann::ordered_json j;
  j["phase"] = r.phase;
  j["method"] = r.method;
  j["schedule"] = r.schedule;
  j["target_cr"] = r.target_cr;
  j["achieved_cr"] = r.achieved_cr;
  j["err_mean"] = r.err_mean;
  j["err_max"] = r.err_max;
  j["layer_target_cr"] = r.layer_target;
  j["layer_achieved_cr"] = r.layer_achieved;
  j["layer_err"] = r.layer_err;
  j["layer_weight"] = r.layer_weight;
  return j;
}

inline nlohmann::ordered_json to_json(const LogLinearFit& f) {
  nlohmann::ordered_json j;
  auto num = [](double x) { return std::isfinite(x) ? nlohmann::ordered_json(x) : nlohmann::ordered_json(); };
  j["a"] = num(f.a);
  j["b"] = num(f.b);
  j["c"] = f.length_term ? num(f.c) : nlohmann::ordered_json();
  j["r2"] = num(f.r2);
  j["points"] = f.points;
  j["length_term"] = f.length_term;
  return j;
}

/// A plotted curve: one method's (achieved CR, error) points in one panel, and its fit.
struct Series {
  std::string method;
  std::vector<double> cr, err;
  std::vector<bool> reachable;
  LogLinearFit fit;
};

struct Panel {
  std::string title, phase, fit_over;
  index_t tokens = 0;  // n used to draw the fit line
  std::vector<Series> series;
};

/// One series per non-dense method of `recs` (in order of appearance), points sorted by CR.
inline std::vector<Series> series_of(const std::vector<Record>& recs) {
  std::vector<Series> out;
  for (const Record& r : recs) {
    if (r.method == methods::Dense::name) continue;  // the baseline, not a curve
    auto it = std::find_if(out.begin(), out.end(), [&](const Series& s) { return s.method == r.label(); });
    if (it == out.end()) {
      out.push_back(Series{r.label(), {}, {}, {}, {}});
      it = out.end() - 1;
    }
    it->cr.push_back(r.achieved_cr);
    it->err.push_back(r.err_layer);
    it->reachable.push_back(r.reachable);
  }
  return out;
}

inline nlohmann::ordered_json to_json(const Panel& p) {
  nlohmann::ordered_json j;
  j["title"] = p.title;
  j["phase"] = p.phase;
  j["tokens"] = p.tokens;
  j["fit_over"] = p.fit_over;
  j["dense_error_floor"] = 1e-4;
  j["series"] = nlohmann::ordered_json::array();
  for (const Series& s : p.series) {
    nlohmann::ordered_json js;
    js["method"] = s.method;
    js["cr"] = s.cr;
    js["err"] = s.err;
    js["reachable"] = s.reachable;
    js["fit"] = to_json(s.fit);
    j["series"].push_back(js);
  }
  return j;
}

/// CR at which each series' error first reaches 1% and 5% (log-log interpolation): a number, or
/// "<X" (already above at the first sparse point X), or ">X" (still below at the largest CR X).
inline std::string crossing_text(const std::vector<std::pair<double, double>>& pts, double level) {
  const eval::Crossing c = eval::crossing_compression(pts, level);
  if (c.kind == eval::Crossing::bracketed) return fmt("%.2f", c.cr);
  if (c.kind == eval::Crossing::below_first) return "<" + fmt("%.2f", c.cr);
  double mx = 1.0;
  for (const auto& p : pts) mx = std::max(mx, p.first);
  return ">" + fmt("%.2f", mx);
}

inline std::vector<std::pair<double, double>> sorted_points(const Series& s) {
  std::vector<std::pair<double, double>> pts;
  for (std::size_t i = 0; i < s.cr.size(); ++i) pts.push_back({s.cr[i], s.err[i]});
  std::sort(pts.begin(), pts.end());
  return pts;
}

inline nlohmann::ordered_json crossings(const Panel& p) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const Series& s : p.series) {
    const auto pts = sorted_points(s);
    j[s.method] = {{"err_1pct_cr", crossing_text(pts, 0.01)}, {"err_5pct_cr", crossing_text(pts, 0.05)}};
  }
  return j;
}

inline void print_fits(std::FILE* out, const Panel& p) {
  std::fprintf(out, "\nfit log(err) = a + b log(CR) + c log(n), %s (fit over %s):\n", p.title.c_str(),
               p.fit_over.c_str());
  std::fprintf(out, "  %-21s %8s %8s %8s %6s %6s  %s\n", "method", "a", "b", "c", "R^2", "points",
               "CR where err reaches 1% / 5%");
  for (const Series& s : p.series) {
    const auto pts = sorted_points(s);
    std::fprintf(out, "  %-21s %8s %8s %8s %6s %6lld  %s / %s\n", s.method.c_str(),
                 fmt("%.3f", s.fit.a).c_str(), fmt("%.3f", s.fit.b).c_str(),
                 s.fit.length_term ? fmt("%.3f", s.fit.c).c_str() : "-", fmt("%.2f", s.fit.r2).c_str(),
                 static_cast<long long>(s.fit.points), crossing_text(pts, 0.01).c_str(),
                 crossing_text(pts, 0.05).c_str());
  }
}

namespace detail {
// Runs argv (PATH lookup) with stdin from /dev/null and stdout + stderr to `log` (/dev/null when
// empty); returns the exit code (-1 when it could not start or did not exit normally).
inline int run_logged(const std::vector<std::string>& argv, const std::string& log) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, log.empty() ? "/dev/null" : log.c_str(),
                                   O_WRONLY | O_TRUNC, 0);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return -1;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The last non-empty line of a file (a Python traceback's "Error: message" line), or "".
inline std::string last_line(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::string line, last;
  while (std::getline(f, line)) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (!line.empty()) last = line;
  }
  return last;
}
}  // namespace detail

/// The python3 that draws the PNG: $SPARSE_ATTN_PYTHON when it is set (then only it), else
/// python3 on PATH, else /usr/bin/python3 (Debian's python3-matplotlib): the first that imports
/// matplotlib. None: std::runtime_error (exit 1) naming what was tried and, in `hint`, how to do
/// without the plot. Called before any computation, so a missing plotter costs no run.
inline std::string require_plotter(const std::string& what, const std::string& hint) {
  std::vector<std::string> cands;
  std::string tried;
  if (const char* env = std::getenv("SPARSE_ATTN_PYTHON"); env && *env) {
    cands.push_back(env);
    tried = std::string("SPARSE_ATTN_PYTHON=") + env;
  } else {
    cands = {"python3", "/usr/bin/python3"};
    tried = "python3 on PATH, /usr/bin/python3";
  }
  for (const std::string& py : cands)
    if (detail::run_logged({py, "-c", "import matplotlib"}, "") == 0) return py;
  throw std::runtime_error(what + ": cannot make the PNG: no python3 that imports matplotlib (tried " +
                           tried + "); install python3-matplotlib or set SPARSE_ATTN_PYTHON, " +
                           hint);
}

/// Draws output `png` of `outs` (its temp file; committed by the caller with the other outputs)
/// from the JSON document at json_path with tools/plot_frontier.py run by `python`. A failed or
/// empty plot is std::runtime_error (exit 1) with the plotter's last message line; its scratch
/// files (script, log) are removed whatever happens.
inline void render_png(const std::string& python, const std::string& json_path, OutputSet& outs,
                       std::size_t png) {
  const OutputTarget& t = outs.target(png);
  const std::string base = t.dest + ".tmp." + detail_out::pid_suffix();
  const ScratchFile script(base + ".plot_frontier.py", t.what());
  script.write(kPlotFrontierPy, t.what());
  const ScratchFile log(base + ".log", t.what());
  const std::string& tmp_png = outs.create_tmp(png);
  const int rc = detail::run_logged({python, script.path(), json_path, tmp_png}, log.path());
  std::error_code ec;
  const auto size = std::filesystem::file_size(tmp_png, ec);
  if (rc == 0 && !ec && size > 0) return;
  std::string why = detail::last_line(log.path());
  if (why.empty()) why = rc == 0 ? "it wrote no image" : "no message";
  throw std::runtime_error(t.what() + ": the plot failed (" + python + " exit " +
                           std::to_string(rc) + "): " + why + "; no output was written");
}

/// Stages the JSON (output `json`, if not kNoOutput) and the PNG (output `png`, if not
/// kNoOutput; drawn by `python`) and commits them together. The PNG is drawn from the JSON: the
/// staged one, or without --json a scratch copy next to the PNG.
constexpr std::size_t kNoOutput = static_cast<std::size_t>(-1);
inline void write_outputs(const nlohmann::ordered_json& doc, OutputSet& outs, std::size_t json,
                          std::size_t png, const std::string& python) {
  const std::string text = doc.dump(1) + "\n";
  if (json != kNoOutput) outs.stage_text(json, text);
  if (png != kNoOutput) {
    if (json != kNoOutput) {
      render_png(python, outs.tmp(json), outs, png);
    } else {
      const OutputTarget& t = outs.target(png);
      const ScratchFile src(t.dest + ".tmp." + detail_out::pid_suffix() + ".json", t.what());
      src.write(text, t.what());
      render_png(python, src.path(), outs, png);
    }
  }
  outs.commit();
}

/// Parses "2,5,10,20" into CRs (finite, >= 1).
inline std::vector<double> parse_compressions(const std::string& s) {
  std::vector<double> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = s.find(',', pos);
    const std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    char* end = nullptr;
    const double v = std::strtod(tok.c_str(), &end);
    check(!tok.empty() && end && *end == '\0' && std::isfinite(v) && v >= 1.0,
          "--compression: '", tok, "' is not a compression ratio (numbers >= 1, comma-separated, e.g. 2,5,10,20)");
    out.push_back(v);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

/// Parses a method list ("all" or "m1,m2") against the registry's names of one phase or both
/// (methods that need a caller's mask, user_mask, are not evaluated).
/// --adaptive: "none", or a comma-separated list of methods that take mass budgets.
inline std::vector<std::string> parse_adaptive(const std::string& s) {
  std::vector<std::string> out;
  if (s == "none") return out;
  std::string known;
  std::vector<std::string> names;
  for (const auto& list : {methods::prefill_methods(), methods::decode_methods()})
    for (const auto& m : list)
      if (m.takes_mass) {
        names.push_back(m.name);
        known += (known.empty() ? "" : ", ") + m.name;
      }
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = s.find(',', pos);
    const std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    check(std::find(names.begin(), names.end(), tok) != names.end(), "--adaptive: '", tok,
          "' is not a method that takes mass budgets; known: none, ", known);
    out.push_back(tok);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

inline void parse_methods(const std::string& s, std::vector<std::string>& prefill,
                          std::vector<std::string>& decode) {
  prefill.clear();
  decode.clear();
  if (s == "all") return;
  std::vector<std::string> prefill_names, decode_names;
  for (const auto& m : methods::prefill_methods())
    if (!m.needs_user_mask) prefill_names.push_back(m.name);
  for (const auto& m : methods::decode_methods())
    if (!m.needs_user_mask) decode_names.push_back(m.name);
  std::string known;
  for (const auto& n : prefill_names) known += (known.empty() ? "" : ", ") + n;
  for (const auto& n : decode_names)
    if (std::find(prefill_names.begin(), prefill_names.end(), n) == prefill_names.end())
      known += ", " + n;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = s.find(',', pos);
    const std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    bool found = false;
    for (const auto& n : prefill_names)
      if (tok == n) prefill.push_back(tok), found = true;
    for (const auto& n : decode_names)
      if (tok == n) decode.push_back(tok), found = true;
    check(found, "--methods: unknown method '", tok, "'; known: all, ", known);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  // A list naming only one phase's methods leaves the other phase empty (skipped by the caller).
  if (prefill.empty()) prefill.push_back("<none>");
  if (decode.empty()) decode.push_back("<none>");
}

}  // namespace sparse_attn::cli::report
