// The .npy reader/writer and the `sparse-attn` tool, run as a subprocess on files in a temp dir.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sparse_attn/arch/target.hpp>
#include <sparse_attn/io/npy.hpp>
#include <sstream>
#include <string>
#include <vector>

#ifndef SPARSE_ATTN_CLI
#error "SPARSE_ATTN_CLI must name the sparse-attn executable"
#endif

namespace fs = std::filesystem;
using sparse_attn::bf16;
using sparse_attn::fp16;
using sparse_attn::index_t;
using namespace sparse_attn::io;

namespace {

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A hand-made .npy: magic, version, header length (2 or 4 bytes), the dict, then `data`.
std::string make_npy(const std::string& dict, const std::string& data, int major = 1) {
  std::string h = dict + "\n";
  std::string out("\x93NUMPY", 6);
  out.push_back(static_cast<char>(major));
  out.push_back('\0');
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  for (std::size_t b = 0; b < len_bytes; ++b)
    out.push_back(static_cast<char>((h.size() >> (8 * b)) & 0xff));
  return out + h + data;
}

std::string float_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// Temp directory, removed at the end of each test.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "sparse_attn_test_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::set<std::string> listing() const {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.insert(e.path().filename().string());
    return names;
  }
  fs::path dir_;
};

template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const sparse_attn::invalid_argument& e) {
    return e.what();
  }
  return "<no sparse_attn::invalid_argument thrown>";
}

// ---------------------------------------------------------------------------------------------
// .npy reader / writer

using Npy = TempDirTest;

TEST_F(Npy, RoundTripsFloat32) {
  std::vector<float> v(2 * 3 * 4);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.5f * static_cast<float>(i) - 3.0f;
  write_npy(path("a.npy"), v, {2, 3, 4});
  const NpyArray a = read_npy(path("a.npy"));
  EXPECT_EQ(a.dtype, NpyDtype::f4);
  EXPECT_EQ(a.shape, (std::vector<index_t>{2, 3, 4}));
  EXPECT_EQ(a.values<float>(), v);
  EXPECT_EQ(listing(), std::set<std::string>{"a.npy"});  // no temp file left
}

TEST_F(Npy, RoundTripsFloat16) {
  std::vector<fp16> v;
  for (int i = 0; i < 10; ++i) v.push_back(fp16(0.25f * static_cast<float>(i) - 1.0f));
  write_npy(path("h.npy"), v, {10});
  const NpyArray a = read_npy(path("h.npy"));
  EXPECT_EQ(a.dtype, NpyDtype::f2);
  EXPECT_EQ(a.shape_str(), "(10,)");
  const std::vector<float> f = a.to_float();
  for (int i = 0; i < 10; ++i)
    EXPECT_EQ(f[static_cast<std::size_t>(i)], 0.25f * static_cast<float>(i) - 1.0f);
}

TEST_F(Npy, RoundTripsIntegersIncludingZeroDim) {
  write_npy(path("i4.npy"), std::vector<std::int32_t>{-1, 7, 1 << 30}, {3});
  write_npy(path("i8.npy"), std::vector<std::int64_t>{std::int64_t{1} << 40}, {});
  EXPECT_EQ(read_npy(path("i4.npy")).values<std::int32_t>(),
            (std::vector<std::int32_t>{-1, 7, 1 << 30}));
  const NpyArray s = read_npy(path("i8.npy"));
  EXPECT_TRUE(s.shape.empty());
  EXPECT_EQ(s.values<std::int64_t>(), (std::vector<std::int64_t>{std::int64_t{1} << 40}));
}

TEST_F(Npy, WritesVersion1HeaderPaddedTo64Bytes) {
  write_npy(path("a.npy"), std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  const std::string b = read_file(path("a.npy"));
  ASSERT_GE(b.size(), 10u);
  EXPECT_EQ(b.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const std::size_t hlen =
      static_cast<unsigned char>(b[8]) | (static_cast<unsigned char>(b[9]) << 8);
  EXPECT_EQ((10 + hlen) % 64, 0u);
  EXPECT_EQ(b[10 + hlen - 1], '\n');
  EXPECT_NE(b.find("'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"),
            std::string::npos);
  EXPECT_EQ(b.size(), 10 + hlen + 6 * sizeof(float));
}

TEST_F(Npy, ReadsFormatVersions2And3) {
  const std::vector<float> v{1.5f, -2.0f};
  for (int major : {2, 3}) {
    const std::string p = path("v" + std::to_string(major) + ".npy");
    write_bytes(p, make_npy("{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2,)}",
                            float_bytes(v), major));
    EXPECT_EQ(read_npy(p).values<float>(), v) << "version " << major;
  }
}

TEST_F(Npy, RejectsMissingFile) {
  const std::string msg = error_of([&] { read_npy(path("nope.npy")); });
  EXPECT_NE(msg.find(path("nope.npy")), std::string::npos) << msg;
  EXPECT_NE(msg.find("cannot open"), std::string::npos) << msg;
}

TEST_F(Npy, RejectsBadMagic) {
  write_bytes(path("x.npy"), "this is not numpy data at all");
  const std::string msg = error_of([&] { read_npy(path("x.npy")); });
  EXPECT_NE(msg.find(path("x.npy")), std::string::npos) << msg;
  EXPECT_NE(msg.find("bad magic"), std::string::npos) << msg;
}

TEST_F(Npy, RejectsTruncatedData) {
  write_npy(path("a.npy"), std::vector<float>(24, 1.0f), {2, 3, 4});
  std::string b = read_file(path("a.npy"));
  write_bytes(path("a.npy"), b.substr(0, b.size() - 5));
  const std::string msg = error_of([&] { read_npy(path("a.npy")); });
  EXPECT_NE(msg.find(path("a.npy")), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
}

TEST_F(Npy, RejectsTruncatedHeader) {
  const std::string full = make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", "");
  write_bytes(path("a.npy"), full.substr(0, 20));
  EXPECT_NE(error_of([&] { read_npy(path("a.npy")); }).find("truncated"), std::string::npos);
}

TEST_F(Npy, RejectsTrailingBytes) {
  write_bytes(path("a.npy"), make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
                                      float_bytes({1.0f, 2.0f})));
  EXPECT_NE(error_of([&] { read_npy(path("a.npy")); }).find("trailing"), std::string::npos);
}

TEST_F(Npy, RejectsUnsupportedDtypeListingAllowedOnes) {
  write_bytes(path("a.npy"), make_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1,)}",
                                      std::string(8, '\0')));
  const std::string msg = error_of([&] { read_npy(path("a.npy")); });
  EXPECT_NE(msg.find("unsupported dtype '<f8'"), std::string::npos) << msg;
  for (const char* allowed : {"<f4", "<f2", "<i4", "<i8"})
    EXPECT_NE(msg.find(allowed), std::string::npos) << msg;
}

TEST_F(Npy, RejectsBigEndian) {
  write_bytes(path("a.npy"), make_npy("{'descr': '>f4', 'fortran_order': False, 'shape': (1,)}",
                                      std::string(4, '\0')));
  EXPECT_NE(error_of([&] { read_npy(path("a.npy")); }).find("big-endian"), std::string::npos);
}

TEST_F(Npy, RejectsFortranOrder) {
  write_bytes(path("a.npy"), make_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2)}",
                                      std::string(16, '\0')));
  EXPECT_NE(error_of([&] { read_npy(path("a.npy")); }).find("fortran_order"), std::string::npos);
}

TEST_F(Npy, RejectsMalformedHeader) {
  write_bytes(path("a.npy"), make_npy("{'descr': '<f4', 'shape': (2, 2)}", std::string(16, '\0')));
  EXPECT_NE(error_of([&] { read_npy(path("a.npy")); }).find("fortran_order"), std::string::npos);
  write_bytes(path("b.npy"),
              make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x)}", ""));
  EXPECT_NE(error_of([&] { read_npy(path("b.npy")); }).find("malformed header"), std::string::npos);
}

TEST_F(Npy, RequireRankNamesTheArrayAndShape) {
  write_npy(path("a.npy"), std::vector<float>(6, 0.0f), {2, 3});
  const NpyArray a = read_npy(path("a.npy"));
  const std::string msg = error_of([&] { a.require_rank(3, "Q", "[heads, tokens, dim]"); });
  EXPECT_NE(msg.find("Q must have rank 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(2, 3)"), std::string::npos) << msg;
}

TEST_F(Npy, FailedWriteLeavesNothingBehind) {
  // Unwritable location: nothing is created.
  EXPECT_NE(error_of([&] {
              write_npy(path("missing_dir/a.npy"), std::vector<float>{1}, {1});
            }).find("cannot open for writing"),
            std::string::npos);
  // The temp file is written but cannot be renamed over a non-empty directory: it is removed.
  fs::create_directories(dir_ / "target.npy" / "occupied");
  EXPECT_NE(error_of([&] {
              write_npy(path("target.npy"), std::vector<float>{1}, {1});
            }).find("cannot rename"),
            std::string::npos);
  EXPECT_EQ(listing(), std::set<std::string>{"target.npy"});
}

TEST_F(Npy, WriteReplacesAnExistingFile) {
  write_npy(path("a.npy"), std::vector<float>{1, 2}, {2});
  write_npy(path("a.npy"), std::vector<float>{3, 4, 5}, {3});
  EXPECT_EQ(read_npy(path("a.npy")).values<float>(), (std::vector<float>{3, 4, 5}));
  EXPECT_EQ(listing(), std::set<std::string>{"a.npy"});
}

// Cross-check against NumPy itself where it is installed (python3-numpy); skipped otherwise.
TEST_F(Npy, InteroperatesWithNumpy) {
  const char* py = nullptr;
  for (const char* cand : {"/usr/bin/python3", "python3"}) {
    const std::string probe = std::string(cand) + " -c 'import numpy' >/dev/null 2>&1";
    if (std::system(probe.c_str()) == 0) {
      py = cand;
      break;
    }
  }
  if (!py) GTEST_SKIP() << "python3 with numpy not available";
  write_npy(path("ours.npy"), std::vector<fp16>{fp16(1.5f), fp16(-2.0f), fp16(0.25f)}, {3, 1});
  const std::string script =
      "import numpy as np, sys; d = sys.argv[1]; a = np.load(d + '/ours.npy'); "
      "assert a.dtype == np.float16 and a.shape == (3, 1), (a.dtype, a.shape); "
      "assert a.ravel().tolist() == [1.5, -2.0, 0.25]; "
      "np.save(d + '/theirs.npy', np.arange(24, dtype=np.float32).reshape(2, 3, 4)); "
      "np.save(d + '/theirs_i8.npy', np.array([5, -6], dtype=np.int64))";
  const std::string cmd = std::string(py) + " -c \"" + script + "\" '" + dir_.string() + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const NpyArray a = read_npy(path("theirs.npy"));
  EXPECT_EQ(a.shape, (std::vector<index_t>{2, 3, 4}));
  for (std::size_t i = 0; i < 24; ++i) EXPECT_EQ(a.values<float>()[i], static_cast<float>(i));
  EXPECT_EQ(read_npy(path("theirs_i8.npy")).values<std::int64_t>(),
            (std::vector<std::int64_t>{5, -6}));
}

// ---------------------------------------------------------------------------------------------
// sparse-attn attend

struct RunResult {
  int rc = -1;
  std::string out, err;
};

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += (c == '\'') ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Inputs: Q [Hq, n_q, d], K/V [Hkv, n_k, d] as float32 values (rounded per dtype by the test).
struct Problem {
  index_t hq = 4, hkv = 2, n_q = 37, n_k = 37, d = 16;
  std::vector<float> q, k, v;
  void fill(unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto gen = [&](index_t n) {
      std::vector<float> x(static_cast<std::size_t>(n));
      for (float& e : x) e = normal(rng);
      return x;
    };
    q = gen(hq * n_q * d);
    k = gen(hkv * n_k * d);
    v = gen(hkv * n_k * d);
  }
};

// Naive double-precision attention. window 0 = no window; query i sits at position i + n_k - n_q.
struct Reference {
  std::vector<double> out, lse;
  index_t pairs = 0;
};
Reference naive_attention(const Problem& p, bool causal, index_t window, index_t sinks,
                          double scale) {
  Reference r;
  r.out.assign(static_cast<std::size_t>(p.hq * p.n_q * p.d), 0.0);
  r.lse.assign(static_cast<std::size_t>(p.hq * p.n_q), 0.0);
  const index_t group = p.hq / p.hkv;
  for (index_t h = 0; h < p.hq; ++h) {
    const index_t hk = h / group;
    for (index_t i = 0; i < p.n_q; ++i) {
      const index_t pos = i + p.n_k - p.n_q;
      std::vector<double> s;
      std::vector<index_t> keys;
      for (index_t j = 0; j < p.n_k; ++j) {
        if (causal && j > pos) continue;
        if (window > 0 && !(j < sinks || pos - j < window)) continue;
        double dot = 0;
        for (index_t c = 0; c < p.d; ++c)
          dot += double{p.q[static_cast<std::size_t>((h * p.n_q + i) * p.d + c)]} *
                 double{p.k[static_cast<std::size_t>((hk * p.n_k + j) * p.d + c)]};
        s.push_back(scale * dot);
        keys.push_back(j);
      }
      r.pairs += static_cast<index_t>(keys.size());
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      r.lse[static_cast<std::size_t>(h * p.n_q + i)] = mx + std::log(sum);
      for (std::size_t e = 0; e < keys.size(); ++e)
        for (index_t c = 0; c < p.d; ++c)
          r.out[static_cast<std::size_t>((h * p.n_q + i) * p.d + c)] +=
              s[e] / sum * double{p.v[static_cast<std::size_t>((hk * p.n_k + keys[e]) * p.d + c)]};
    }
  }
  return r;
}

class Attend : public TempDirTest {
 protected:
  RunResult run(const std::vector<std::string>& args) const {
    std::string cmd = shell_quote(SPARSE_ATTN_CLI);
    for (const std::string& a : args) cmd += " " + shell_quote(a);
    const std::string out = path("stdout.txt"), err = path("stderr.txt");
    cmd += " >" + shell_quote(out) + " 2>" + shell_quote(err) + " </dev/null";
    const int status = std::system(cmd.c_str());
    RunResult r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = read_file(out);
    r.err = read_file(err);
    fs::remove(out);
    fs::remove(err);
    return r;
  }

  // Writes q/k/v.npy (float32) and returns the standard arguments.
  std::vector<std::string> write_inputs(const Problem& p) const {
    write_npy(path("q.npy"), p.q, {p.hq, p.n_q, p.d});
    write_npy(path("k.npy"), p.k, {p.hkv, p.n_k, p.d});
    write_npy(path("v.npy"), p.v, {p.hkv, p.n_k, p.d});
    return {"attend", "--q",         path("q.npy"), "--k",        path("k.npy"),
            "--v",    path("v.npy"), "--out",       path("o.npy")};
  }

  static nlohmann::json parse_one_json_line(const std::string& out) {
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    return nlohmann::json::parse(out);
  }

  static void expect_close(const std::vector<float>& got, const std::vector<double>& want,
                           double tol) {
    ASSERT_EQ(got.size(), want.size());
    double worst = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      worst = std::max(worst, std::abs(got[i] - want[i]));
    EXPECT_LE(worst, tol);
  }

  // Bad input: exit 2, exactly one stderr line "sparse-attn: error: ..." containing `needle`,
  // nothing on stdout, and no file besides the inputs the test wrote.
  void expect_rejected(const std::vector<std::string>& args, const std::string& needle) {
    const std::set<std::string> before = listing();
    const RunResult r = run(args);
    EXPECT_EQ(r.rc, 2) << r.err;
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err.rfind("sparse-attn: error: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos)
        << "stderr lacks '" << needle << "': " << r.err;
    EXPECT_FALSE(fs::exists(path("o.npy")));
    EXPECT_FALSE(fs::exists(path("lse.npy")));
    EXPECT_EQ(listing(), before);
  }

  std::vector<std::string> good_args() {
    Problem p;
    p.fill(1);
    return write_inputs(p);
  }
  static std::vector<std::string> with(std::vector<std::string> a,
                                       const std::vector<std::string>& extra) {
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  // The reachable flag's honesty: a compression target is reachable iff the achieved CR is within
  // the default tolerance (10%) of it, on either side.
  static void expect_honest(const nlohmann::json& j, double target) {
    const double achieved = j.value("achieved_compression", 0.0);
    EXPECT_EQ(j.value("reachable", false), std::fabs(achieved / target - 1.0) <= 0.1 + 1e-12)
        << "target " << target << ": " << j.dump();
  }
};

TEST_F(Attend, ReportsAndHonoursTheCpuTarget) {
  // The tool decides like this process (the same build, the same SPARSE_ATTN_TARGET if CI set one).
  const char* inherited = std::getenv("SPARSE_ATTN_TARGET");
  const std::string restore = inherited != nullptr ? inherited : "";
  const RunResult best = run(good_args());
  ASSERT_EQ(best.rc, 0) << best.err;
  EXPECT_EQ(parse_one_json_line(best.out)["cpu_target"], sparse_attn::target_name(sparse_attn::cpu_target()));
  const std::vector<float> best_out = read_npy(path("o.npy")).values<float>();
  ::setenv("SPARSE_ATTN_TARGET", "generic", 1);
  const RunResult generic = run(good_args());
  ASSERT_EQ(generic.rc, 0) << generic.err;
  EXPECT_EQ(parse_one_json_line(generic.out)["cpu_target"], "generic");
  const std::vector<float> generic_out = read_npy(path("o.npy")).values<float>();
  ASSERT_EQ(generic_out.size(), best_out.size());
  for (std::size_t i = 0; i < best_out.size(); ++i) EXPECT_NEAR(generic_out[i], best_out[i], 1e-5);
  fs::remove(path("o.npy"));
  ::setenv("SPARSE_ATTN_TARGET", "avx1024", 1);
  expect_rejected(good_args(), "unknown CPU target 'avx1024'; allowed: generic, avx2, avx512, avx512_bf16, amx");
  if (restore.empty()) ::unsetenv("SPARSE_ATTN_TARGET");
  else ::setenv("SPARSE_ATTN_TARGET", restore.c_str(), 1);
}

TEST_F(Attend, DenseCausalMatchesNaiveReference) {
  Problem p;
  p.fill(7);
  auto args = write_inputs(p);
  args.insert(args.end(), {"--lse", path("lse.npy"), "--block", "8"});
  const RunResult r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.err, "");
  const nlohmann::json j = parse_one_json_line(r.out);
  const Reference ref = naive_attention(p, true, 0, 0, 1.0 / std::sqrt(double(p.d)));
  EXPECT_EQ(j["method"], "dense");
  EXPECT_EQ(j["hq"], p.hq);
  EXPECT_EQ(j["hkv"], p.hkv);
  EXPECT_EQ(j["n_q"], p.n_q);
  EXPECT_EQ(j["n_k"], p.n_k);
  EXPECT_EQ(j["d"], p.d);
  EXPECT_EQ(j["dtype"], "fp32");
  EXPECT_EQ(j["causal"], true);
  EXPECT_FALSE(j.contains("window"));
  EXPECT_EQ(j["pairs"], ref.pairs);
  EXPECT_DOUBLE_EQ(j["achieved_compression"].get<double>(), 1.0);
  // Dense's default budget is CR 1, which it reaches; --block is its block parameter.
  EXPECT_EQ(j["budget"], "cr=1");
  EXPECT_DOUBLE_EQ(j["target_compression"].get<double>(), 1.0);
  EXPECT_EQ(j["reachable"], true);
  EXPECT_EQ(j["params"]["block"], "8");
  EXPECT_EQ(j["params"]["causal"], "true");
  EXPECT_GE(j["ms"].get<double>(), 0.0);

  const NpyArray o = read_npy(path("o.npy"));
  EXPECT_EQ(o.shape, (std::vector<index_t>{p.hq, p.n_q, p.d}));
  expect_close(o.values<float>(), ref.out, 1e-4);
  const NpyArray lse = read_npy(path("lse.npy"));
  EXPECT_EQ(lse.shape, (std::vector<index_t>{p.hq, p.n_q}));
  expect_close(lse.values<float>(), ref.lse, 1e-4);
  EXPECT_EQ(listing(), (std::set<std::string>{"q.npy", "k.npy", "v.npy", "o.npy", "lse.npy"}));
}

TEST_F(Attend, SlidingWindowOnQuerySuffixMatchesNaiveReference) {
  Problem p;
  p.n_q = 20;
  p.n_k = 45;
  p.fill(8);
  auto args = write_inputs(p);
  // --budget counts the window W (tokens); the sinks are a parameter.
  args.insert(args.end(), {"--method", "sliding_window", "--budget", "6", "--param", "sinks=3",
                           "--block", "8", "--threads", "2"});
  const RunResult r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  const Reference ref = naive_attention(p, true, 6, 3, 1.0 / std::sqrt(double(p.d)));
  const Reference dense = naive_attention(p, true, 0, 0, 1.0);
  EXPECT_EQ(j["method"], "sliding_window");
  EXPECT_EQ(j["budget"], "count=6");
  EXPECT_TRUE(j["target_compression"].is_null());
  EXPECT_EQ(j["reachable"], true);
  EXPECT_EQ(j["params"]["sinks"], "3");
  EXPECT_EQ(j["params"]["block"], "8");
  EXPECT_NE(j["detail"].get<std::string>().find("W=6"), std::string::npos) << j["detail"];
  EXPECT_EQ(j["pairs"], ref.pairs);
  EXPECT_NEAR(j["achieved_compression"].get<double>(), double(dense.pairs) / double(ref.pairs),
              1e-9);
  EXPECT_GT(j["achieved_compression"].get<double>(), 1.0);
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-4);
}

TEST_F(Attend, NonCausalWithExplicitScaleMatchesNaiveReference) {
  Problem p;
  p.hq = 3;
  p.hkv = 1;
  p.n_q = 9;
  p.n_k = 30;
  p.fill(9);
  auto args = write_inputs(p);
  args.insert(args.end(), {"--no-causal", "--scale", "0.3"});
  const RunResult r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  EXPECT_EQ(j["causal"], false);
  const Reference ref = naive_attention(p, false, 0, 0, 0.3);
  EXPECT_EQ(j["pairs"], p.hq * p.n_q * p.n_k);
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-4);
}

TEST_F(Attend, Bf16KvDtypeRoundsKeysAndValuesToNearestEven) {
  Problem p;
  p.fill(10);
  auto args = write_inputs(p);
  args.insert(args.end(), {"--kv-dtype", "bf16"});
  const RunResult r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse_one_json_line(r.out)["dtype"], "bf16");
  Problem rounded = p;
  for (auto* vec : {&rounded.k, &rounded.v})
    for (float& x : *vec) x = static_cast<float>(bf16(x));
  const std::vector<float> got = read_npy(path("o.npy")).values<float>();
  expect_close(got, naive_attention(rounded, true, 0, 0, 1.0 / std::sqrt(double(p.d))).out, 1e-4);
  // ...and the rounding is visible: fp32 K/V give a different answer.
  const Reference exact = naive_attention(p, true, 0, 0, 1.0 / std::sqrt(double(p.d)));
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - exact.out[i]));
  EXPECT_GT(worst, 1e-4);
}

TEST_F(Attend, Bf16PrecisionRoundsQueriesAndProbabilities) {
  // --precision bfloat16 over a bf16 cache: Q and P rounded to bf16 (docs/PRECISION.md). Against
  // the oracle on the rounded Q, K, V only the P rounding remains: <= 2^-7 max|v|.
  Problem p;
  p.fill(12);
  auto args = write_inputs(p);
  args.insert(args.end(), {"--kv-dtype", "bf16", "--precision", "bfloat16"});
  const RunResult r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse_one_json_line(r.out)["precision"], "bfloat16");
  Problem rounded = p;
  double vmax = 0;
  for (auto* vec : {&rounded.q, &rounded.k, &rounded.v})
    for (float& x : *vec) x = static_cast<float>(bf16(x));
  for (float x : rounded.v) vmax = std::max(vmax, std::abs(double(x)));
  expect_close(read_npy(path("o.npy")).values<float>(),
               naive_attention(rounded, true, 0, 0, 1.0 / std::sqrt(double(p.d))).out,
               std::ldexp(vmax, -7) + 1e-5);
  // bf16 products need a bf16 cache.
  fs::remove(path("o.npy"));
  std::vector<std::string> bad = write_inputs(p);
  bad.insert(bad.end(), {"--precision", "bfloat16"});
  expect_rejected(bad, "precision bfloat16 needs bf16 K and V");
}

TEST_F(Attend, Fp16InputsAreUsedAsStoredAndFp16OutputIsWritten) {
  Problem p;
  p.fill(11);
  for (auto* vec : {&p.q, &p.k, &p.v})
    for (float& x : *vec) x = static_cast<float>(fp16(x));
  auto to_half = [](const std::vector<float>& x) {
    std::vector<fp16> h;
    for (float e : x) h.push_back(fp16(e));
    return h;
  };
  write_npy(path("q.npy"), to_half(p.q), {p.hq, p.n_q, p.d});
  write_npy(path("k.npy"), to_half(p.k), {p.hkv, p.n_k, p.d});
  write_npy(path("v.npy"), to_half(p.v), {p.hkv, p.n_k, p.d});
  const std::vector<std::string> args{"attend",      "--q",         path("q.npy"),
                                      "--k",         path("k.npy"), "--v",
                                      path("v.npy"), "--out",       path("o.npy")};
  const Reference ref = naive_attention(p, true, 0, 0, 1.0 / std::sqrt(double(p.d)));

  RunResult r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse_one_json_line(r.out)["dtype"], "fp16");
  NpyArray o = read_npy(path("o.npy"));
  EXPECT_EQ(o.dtype, NpyDtype::f4);
  expect_close(o.values<float>(), ref.out, 1e-4);

  r = run(with(args, {"--out-dtype", "fp16"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(parse_one_json_line(r.out)["out_dtype"], "fp16");
  o = read_npy(path("o.npy"));
  EXPECT_EQ(o.dtype, NpyDtype::f2);
  expect_close(o.to_float(), ref.out, 2e-3);  // fp16 output rounding: |x| < 4 -> 2^-9 relative
}

TEST_F(Attend, HelpExitsZero) {
  const RunResult r = run({"attend", "--help"});
  EXPECT_EQ(r.rc, 0);
  EXPECT_NE(r.out.find("--kv-dtype"), std::string::npos);
}

// One test per kind of bad input: exit 2, one stderr line naming the problem, no output file.
TEST_F(Attend, RejectsMissingInputFile) {
  auto a = good_args();
  fs::remove(path("k.npy"));
  expect_rejected(a, path("k.npy") + ": cannot open");
}

TEST_F(Attend, RejectsFileThatIsNotNpy) {
  auto a = good_args();
  write_bytes(path("q.npy"), "garbage");
  expect_rejected(a, "bad magic");
}

TEST_F(Attend, RejectsTruncatedFile) {
  auto a = good_args();
  const std::string b = read_file(path("v.npy"));
  write_bytes(path("v.npy"), b.substr(0, b.size() - 3));
  expect_rejected(a, "truncated");
}

TEST_F(Attend, RejectsUnsupportedDtype) {
  auto a = good_args();
  write_npy(path("q.npy"), std::vector<std::int32_t>(4 * 37 * 16, 1), {4, 37, 16});
  expect_rejected(a, "unsupported dtype '<i4'; allowed: '<f4' (float32), '<f2' (float16)");
}

TEST_F(Attend, RejectsBigEndianFile) {
  auto a = good_args();
  write_bytes(path("k.npy"),
              make_npy("{'descr': '>f4', 'fortran_order': False, 'shape': (1, 1, 1)}",
                       std::string(4, '\0')));
  expect_rejected(a, "big-endian");
}

TEST_F(Attend, RejectsFortranOrderFile) {
  auto a = good_args();
  write_bytes(path("k.npy"), make_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1, 1)}",
                                      std::string(4, '\0')));
  expect_rejected(a, "fortran_order");
}

TEST_F(Attend, RejectsWrongRank) {
  auto a = good_args();
  write_npy(path("q.npy"), std::vector<float>(37 * 16, 0.0f), {37, 16});
  expect_rejected(a, "must have rank 3");
}

TEST_F(Attend, RejectsKvShapeMismatch) {
  auto a = good_args();
  write_npy(path("v.npy"), std::vector<float>(2 * 36 * 16, 0.0f), {2, 36, 16});
  expect_rejected(a, "K and V shapes differ");
}

TEST_F(Attend, RejectsHeadDimMismatch) {
  auto a = good_args();
  write_npy(path("q.npy"), std::vector<float>(4 * 37 * 8, 0.0f), {4, 37, 8});
  expect_rejected(a, "head dim mismatch");
}

TEST_F(Attend, RejectsQueryHeadsNotMultipleOfKvHeads) {
  auto a = good_args();
  write_npy(path("q.npy"), std::vector<float>(3 * 37 * 16, 0.0f), {3, 37, 16});
  expect_rejected(a, "must be a multiple of K/V heads");
}

TEST_F(Attend, RejectsMoreQueriesThanKeys) {
  auto a = good_args();
  write_npy(path("q.npy"), std::vector<float>(4 * 38 * 16, 0.0f), {4, 38, 16});
  expect_rejected(a, "n_q=38 > n_k=37");
}

TEST_F(Attend, RejectsNonFiniteScale) {
  expect_rejected(with(good_args(), {"--scale", "nan"}), "--scale must be finite and > 0");
  expect_rejected(with(good_args(), {"--scale", "inf"}), "--scale must be finite and > 0");
}

TEST_F(Attend, RejectsNonPositiveScale) {
  expect_rejected(with(good_args(), {"--scale", "0"}), "--scale must be finite and > 0");
  expect_rejected(with(good_args(), {"--scale=-1"}), "--scale must be finite and > 0");
}

TEST_F(Attend, RejectsUnknownMethod) {
  expect_rejected(with(good_args(), {"--method", "magic"}), "--method");
}

TEST_F(Attend, RejectsUnknownFlag) {
  expect_rejected(with(good_args(), {"--bogus-flag"}), "--bogus-flag");
}

TEST_F(Attend, RejectsWindowBelowOne) {
  expect_rejected(with(good_args(), {"--method", "sliding_window", "--budget", "0"}),
                  "--budget must be a whole number >= 1 of tokens (--method sliding_window), got 0");
}

TEST_F(Attend, RejectsParameterOfAnotherMethod) {
  // sinks is sliding_window's parameter: dense names its own.
  expect_rejected(with(good_args(), {"--param", "sinks=4"}),
                  "dense: unknown parameter 'sinks'; its parameters: causal, block");
}

TEST_F(Attend, RejectsNonCausalSlidingWindow) {
  expect_rejected(with(good_args(), {"--method", "sliding_window", "--no-causal"}), "causal only");
}

TEST_F(Attend, RejectsNegativeThreads) {
  expect_rejected(with(good_args(), {"--threads", "-1"}), "--threads must be >= 0");
}

TEST_F(Attend, RejectsNonPositiveBlock) {
  expect_rejected(with(good_args(), {"--block", "0"}), "--block must be >= 1");
}

TEST_F(Attend, RejectsUnknownKvDtype) {
  expect_rejected(with(good_args(), {"--kv-dtype", "int8"}), "--kv-dtype");
}

TEST_F(Attend, RejectsMissingRequiredOption) {
  auto a = good_args();
  a.resize(a.size() - 2);  // drop --out O.npy
  expect_rejected(a, "--out");
}

TEST_F(Attend, RejectsMissingSubcommand) { expect_rejected({}, "subcommand"); }

TEST_F(Attend, RejectsOutputInMissingDirectory) {
  auto a = good_args();
  a.back() = path("no_such_dir/o.npy");
  expect_rejected(a, "directory does not exist");
}

TEST_F(Attend, RejectsOutputThatIsADirectoryOrUnderAFile) {
  fs::create_directory(path("out_dir"));
  auto a = good_args();
  a.back() = path("out_dir");
  expect_rejected(a, "is a directory");
  EXPECT_TRUE(fs::is_directory(path("out_dir")));
  a.back() = path("k.npy") + "/o.npy";  // the parent is a regular file
  expect_rejected(a, "directory does not exist");
  // The LSE output is checked the same way, before anything is computed or written.
  a = with(good_args(), {"--lse", path("out_dir")});
  expect_rejected(a, "is a directory");
}

}  // namespace

// =============================================================================================
// sparse-attn decode (KV cache, decode methods; tools/cmd_decode.cpp)
// =============================================================================================
namespace {

class Decode : public Attend {
 protected:
  // Writes q/k/v.npy and returns "decode --q .. --k .. --v .. --out o.npy --steps T".
  std::vector<std::string> decode_inputs(const Problem& p, index_t steps) const {
    auto a = write_inputs(p);
    a[0] = "decode";
    a.insert(a.end(), {"--steps", std::to_string(steps)});
    return a;
  }
  std::vector<std::string> good_decode_args() {
    Problem p;
    p.fill(21);
    return decode_inputs(p, 3);
  }
  // Rows [n_q - T, n_q) of every head of a reference output [hq][n_q][d], as [hq][T][d].
  static std::vector<double> last_rows(const Problem& p, const std::vector<double>& out, index_t T) {
    std::vector<double> r;
    for (index_t h = 0; h < p.hq; ++h)
      for (index_t i = p.n_q - T; i < p.n_q; ++i)
        for (index_t c = 0; c < p.d; ++c) r.push_back(out[static_cast<std::size_t>((h * p.n_q + i) * p.d + c)]);
    return r;
  }
};

TEST_F(Decode, DenseStepsMatchNaiveCausalReference) {
  Problem p;
  p.fill(22);
  const RunResult r = run(with(decode_inputs(p, 4), {"--layout", "paged", "--page", "8"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  EXPECT_EQ(j["steps"], 4);
  EXPECT_EQ(j["prompt_tokens"], 33);
  EXPECT_EQ(j["budget"], "cr=1");  // dense's default budget
  EXPECT_EQ(j["reachable"], true);
  EXPECT_DOUBLE_EQ(j["achieved_compression"].get<double>(), 1.0);
  ASSERT_EQ(j["per_step"].size(), 4u);
  EXPECT_DOUBLE_EQ(j["per_step"][3]["achieved_compression"].get<double>(), 1.0);
  const NpyArray o = read_npy(path("o.npy"));
  EXPECT_EQ(o.shape, (std::vector<index_t>{p.hq, 4, p.d}));
  const Reference ref = naive_attention(p, true, 0, 0, 1.0 / std::sqrt(double(p.d)));
  expect_close(o.values<float>(), last_rows(p, ref.out, 4), 1e-5);
}

TEST_F(Decode, StreamingEqualsSinksPlusSlidingWindow) {
  Problem p;
  p.fill(23);
  // Budget S + W = 9 tokens per KV head, S = 2: each step (its token appended, the cache cut to
  // S + W before it attends) attends the 2 sinks and the 7 most recent positions, itself included.
  const RunResult r = run(with(decode_inputs(p, 5),
                               {"--method", "streaming", "--budget", "9", "--param", "sinks=2"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  EXPECT_EQ(j["cache_tokens_after_prefill"], 2 * 9);
  EXPECT_NEAR(j["per_step"][0]["keys_read"].get<double>(), 9.0, 1e-12);
  EXPECT_EQ(j["budget"], "count=9");
  EXPECT_TRUE(j["target_compression"].is_null());
  EXPECT_EQ(j["reachable"], true);
  EXPECT_EQ(j["params"]["sinks"], "2");
  EXPECT_EQ(j["detail"], "S=2 W=7");
  const Reference ref = naive_attention(p, true, 7, 2, 1.0 / std::sqrt(double(p.d)));
  expect_close(read_npy(path("o.npy")).values<float>(), last_rows(p, ref.out, 5), 1e-5);
}

TEST_F(Decode, SparseMethodsAtCompressionOneEqualDense) {
  Problem p;
  p.fill(24);
  const Reference ref = naive_attention(p, true, 0, 0, 1.0 / std::sqrt(double(p.d)));
  for (const char* m : {"quest", "snapkv", "ada_snapkv", "h2o", "streaming"}) {
    const RunResult r = run(with(decode_inputs(p, 2), {"--method", m, "--compression", "1"}));
    ASSERT_EQ(r.rc, 0) << m << ": " << r.err;
    const nlohmann::json j = parse_one_json_line(r.out);
    EXPECT_DOUBLE_EQ(j["mean_achieved_compression"].get<double>(), 1.0) << m;
    EXPECT_DOUBLE_EQ(j["achieved_compression"].get<double>(), 1.0) << m;
    EXPECT_EQ(j["reachable"], true) << m;
    expect_close(read_npy(path("o.npy")).values<float>(), last_rows(p, ref.out, 2), 1e-5);
  }
}

TEST_F(Decode, SparseMethodsReportKeysReadAndCompression) {
  Problem p;
  p.n_q = p.n_k = 200;
  p.fill(25);
  for (const char* m : {"quest", "snapkv", "ada_snapkv", "h2o", "streaming"}) {
    const RunResult r = run(with(decode_inputs(p, 2), {"--method", m, "--compression", "4", "--page", "8",
                                                       "--kv-dtype", "bf16"}));
    ASSERT_EQ(r.rc, 0) << m << ": " << r.err;
    const nlohmann::json j = parse_one_json_line(r.out);
    EXPECT_EQ(j["target_compression"], 4.0);
    EXPECT_FALSE(j["detail"].get<std::string>().empty()) << m;
    expect_honest(j, 4.0);
    for (const auto& s : j["per_step"]) {
      EXPECT_GT(s["achieved_compression"].get<double>(), 2.0) << m;
      EXPECT_LT(s["keys_read"].get<double>(), 100.0) << m;
    }
  }
}

TEST_F(Decode, QuestPerQueryHeadIsAParameter) {
  Problem p;
  p.n_q = p.n_k = 200;
  p.fill(27);
  const RunResult r = run(with(decode_inputs(p, 2), {"--method", "quest", "--budget", "48",
                                                     "--page", "8", "--param",
                                                     "per_query_head=true"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  EXPECT_EQ(j["params"]["per_query_head"], "true");
  EXPECT_EQ(j["budget"], "count=48");
  EXPECT_EQ(j["reachable"], true);
  EXPECT_GT(j["achieved_compression"].get<double>(), 2.0);
}

TEST_F(Decode, DenseAtAnUnreachableCompressionRunsAndSaysSo) {
  const RunResult r = run(with(good_decode_args(), {"--compression", "4"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  EXPECT_EQ(j["reachable"], false);
  EXPECT_DOUBLE_EQ(j["achieved_compression"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(j["target_compression"].get<double>(), 4.0);
}

TEST_F(Decode, RejectsStepsBeyondQueryRows) {
  auto a = good_decode_args();
  a.back() = "38";
  expect_rejected(a, "--steps 38 > n_q=37");
}

TEST_F(Decode, RejectsNonPositiveSteps) {
  auto a = good_decode_args();
  a.back() = "0";
  expect_rejected(a, "--steps must be >= 1");
}

TEST_F(Decode, RejectsCountBudgetForDense) {
  expect_rejected(with(good_decode_args(), {"--budget", "8"}),
                  "--budget does not apply to --method dense: it has no count unit");
}

TEST_F(Decode, RejectsCompressionTogetherWithBudget) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--compression", "4", "--budget", "16"}),
                  "--compression, --budget and --mass are alternative budgets");
}

TEST_F(Decode, RejectsCompressionBelowOne) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--compression", "0.5"}),
                  "--compression must be finite and >= 1");
}

TEST_F(Decode, RejectsNonPositiveBudget) {
  expect_rejected(with(good_decode_args(), {"--method", "snapkv", "--budget", "0"}),
                  "--budget must be a whole number >= 1 of tokens (--method snapkv), got 0");
}

TEST_F(Decode, RejectsNonPositivePage) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--page", "0"}), "--page must be >= 1");
}

TEST_F(Decode, RejectsParameterOfAnotherMethod) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--param", "window=8"}),
                  "quest: unknown parameter 'window'; its parameters: per_query_head, shared_mass, shared_floor");
  expect_rejected(with(good_decode_args(), {"--method", "snapkv", "--param", "pool_kernel=2"}),
                  "pool_kernel must be odd");
}

TEST_F(Decode, RejectsMassForMethodsWithoutIt) {
  expect_rejected(with(good_decode_args(), {"--method", "streaming", "--mass", "0.9"}),
                  "a mass budget is not supported");
}

TEST_F(Decode, RejectsSnapKVWithoutPromptQueries) {
  Problem p;
  p.n_q = 2;
  p.fill(26);
  expect_rejected(with(decode_inputs(p, 2), {"--method", "snapkv"}), "n_q > --steps");
}

TEST_F(Decode, RejectsUnknownDecodeMethod) {
  expect_rejected(with(good_decode_args(), {"--method", "vertical_slash"}), "--method");
}

TEST_F(Decode, RejectsKvShapeMismatchInDecode) {
  auto a = good_decode_args();
  write_npy(path("v.npy"), std::vector<float>(2 * 36 * 16, 0.0f), {2, 36, 16});
  expect_rejected(a, "K and V shapes differ");
}

}  // namespace

// =============================================================================================
// Hardening: tool inputs the sections above do not cover. The library API's bad-input
// catalogue, NaN policy and long-context tests are in test_hardening.cpp (docs/ROBUSTNESS.md).
// =============================================================================================
namespace {

TEST_F(Attend, RejectsZeroLengthArrays) {
  for (auto [n, d] : {std::pair<index_t, index_t>{0, 16}, {37, 0}}) {
    Problem p;
    p.n_q = p.n_k = n;
    p.d = d;
    p.fill(41);
    expect_rejected(write_inputs(p), "every extent must be >= 1");
  }
}

TEST_F(Attend, NaNInputPropagatesToTheRowsThatReadIt) {
  // The library's policy (docs/ROBUSTNESS.md): not rejected, no crash; a NaN in query row i makes
  // row i NaN and nothing else.
  Problem p;
  p.fill(42);
  p.q[static_cast<std::size_t>((1 * p.n_q + 20) * p.d + 3)] = std::numeric_limits<float>::quiet_NaN();
  const RunResult r = run(write_inputs(p));
  ASSERT_EQ(r.rc, 0) << r.err;
  const std::vector<float> o = read_npy(path("o.npy")).values<float>();
  for (index_t h = 0; h < p.hq; ++h)
    for (index_t i = 0; i < p.n_q; ++i) {
      const float x = o[static_cast<std::size_t>((h * p.n_q + i) * p.d)];
      EXPECT_EQ(std::isnan(x), h == 1 && i == 20) << "head " << h << " row " << i;
    }
}

TEST_F(Decode, RejectsNonFiniteCompression) {
  for (const char* cr : {"nan", "inf"})
    expect_rejected(with(good_decode_args(), {"--method", "quest", "--compression", cr}),
                    "--compression must be finite and >= 1");
}

TEST_F(Decode, RejectsNegativeThreads) {
  expect_rejected(with(good_decode_args(), {"--threads", "-1"}), "--threads must be >= 0");
}

TEST_F(Decode, RejectsNonFiniteScale) {
  expect_rejected(with(good_decode_args(), {"--scale", "nan"}), "--scale must be finite and > 0");
}

TEST_F(Decode, RejectsQueryHeadsNotMultipleOfKvHeads) {
  Problem p;
  p.hq = 3;
  p.fill(43);
  expect_rejected(decode_inputs(p, 2), "must be a multiple of K/V heads");
}

}  // namespace

// =============================================================================================
// Prefill methods: `attend --method block_sparse | vertical_slash |
// flex_prefill | user_mask` (tools/cmd_attend.cpp). The tool's output is checked against naive
// double-precision attention over the very mask the library selects for the same inputs.
// =============================================================================================
#include <sparse_attn/methods/block_sparse.hpp>
#include <sparse_attn/methods/flex_prefill.hpp>
#include <sparse_attn/methods/registry.hpp>
#include <sparse_attn/methods/vertical_slash.hpp>

namespace {

// Naive double-precision attention under allowed[(h * n_q + i) * n_k + j]; an empty row gives 0.
Reference naive_over(const Problem& p, const std::vector<std::uint8_t>& allowed, double scale) {
  Reference r;
  r.out.assign(static_cast<std::size_t>(p.hq * p.n_q * p.d), 0.0);
  r.lse.assign(static_cast<std::size_t>(p.hq * p.n_q), -std::numeric_limits<double>::infinity());
  const index_t group = p.hq / p.hkv;
  for (index_t h = 0; h < p.hq; ++h)
    for (index_t i = 0; i < p.n_q; ++i) {
      std::vector<double> s;
      std::vector<index_t> keys;
      for (index_t j = 0; j < p.n_k; ++j) {
        if (!allowed[static_cast<std::size_t>((h * p.n_q + i) * p.n_k + j)]) continue;
        double dot = 0;
        for (index_t c = 0; c < p.d; ++c)
          dot += double{p.q[static_cast<std::size_t>((h * p.n_q + i) * p.d + c)]} *
                 double{p.k[static_cast<std::size_t>(((h / group) * p.n_k + j) * p.d + c)]};
        s.push_back(scale * dot);
        keys.push_back(j);
      }
      r.pairs += static_cast<index_t>(keys.size());
      if (keys.empty()) continue;
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      r.lse[static_cast<std::size_t>(h * p.n_q + i)] = mx + std::log(sum);
      for (std::size_t e = 0; e < keys.size(); ++e)
        for (index_t c = 0; c < p.d; ++c)
          r.out[static_cast<std::size_t>((h * p.n_q + i) * p.d + c)] +=
              s[e] / sum *
              double{p.v[static_cast<std::size_t>(((h / group) * p.n_k + keys[e]) * p.d + c)]};
    }
  return r;
}

// The elements a library mask allows: listed blocks, element test (causality, predicate) applied.
template <class Mask>
std::vector<std::uint8_t> allowed_of(const Mask& m) {
  const sparse_attn::MaskShape& s = m.shape();
  std::vector<std::uint8_t> a(static_cast<std::size_t>(s.heads * s.n_q * s.n_k), 0);
  for (index_t h = 0; h < s.heads; ++h)
    for (index_t qb = 0; qb < s.num_q_blocks(); ++qb)
      m.for_each_block(m.head_shared() ? 0 : h, qb, [&](index_t kb, bool) {
        for (index_t i = s.q_begin(qb); i < s.q_end(qb); ++i)
          for (index_t j = s.k_begin(kb); j < s.k_end(kb); ++j)
            if (m.allowed(h, i, j)) a[static_cast<std::size_t>((h * s.n_q + i) * s.n_k + j)] = 1;
      });
  return a;
}

std::uint32_t crc32_of(const std::string& s) {
  std::uint32_t c = 0xFFFFFFFFu;
  for (unsigned char ch : s) {
    c ^= ch;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  }
  return c ^ 0xFFFFFFFFu;
}

void put_le(std::string& out, std::uint64_t v, int bytes) {
  for (int b = 0; b < bytes; ++b) out.push_back(static_cast<char>((v >> (8 * b)) & 0xff));
}

// A zip of (name, bytes) members as np.savez writes it: stored (method 0) and, like Python's
// zipfile with force_zip64, local headers carrying the sizes in a zip64 extra field.
std::string make_zip(const std::vector<std::pair<std::string, std::string>>& members,
                     std::uint16_t method = 0) {
  std::string out, cd;
  for (const auto& [name, data] : members) {
    const std::uint32_t crc = crc32_of(data);
    const std::size_t local = out.size();
    put_le(out, 0x04034b50, 4);
    put_le(out, 45, 2);  // version needed (zip64)
    put_le(out, 0, 2);   // flags
    put_le(out, method, 2);
    put_le(out, 0, 2);     // time
    put_le(out, 0x21, 2);  // date
    put_le(out, crc, 4);
    put_le(out, 0xFFFFFFFF, 4);  // sizes in the zip64 extra field
    put_le(out, 0xFFFFFFFF, 4);
    put_le(out, name.size(), 2);
    put_le(out, 20, 2);
    out += name;
    put_le(out, 1, 2);
    put_le(out, 16, 2);
    put_le(out, data.size(), 8);
    put_le(out, data.size(), 8);
    out += data;

    put_le(cd, 0x02014b50, 4);
    put_le(cd, 45, 2);
    put_le(cd, 45, 2);
    put_le(cd, 0, 2);
    put_le(cd, method, 2);
    put_le(cd, 0, 2);
    put_le(cd, 0x21, 2);
    put_le(cd, crc, 4);
    put_le(cd, data.size(), 4);
    put_le(cd, data.size(), 4);
    put_le(cd, name.size(), 2);
    put_le(cd, 0, 2);  // extra
    put_le(cd, 0, 2);  // comment
    put_le(cd, 0, 2);  // disk
    put_le(cd, 0, 2);  // internal attributes
    put_le(cd, 0, 4);  // external attributes
    put_le(cd, local, 4);
    cd += name;
  }
  const std::size_t cd_off = out.size();
  out += cd;
  put_le(out, 0x06054b50, 4);
  put_le(out, 0, 2);
  put_le(out, 0, 2);
  put_le(out, members.size(), 2);
  put_le(out, members.size(), 2);
  put_le(out, cd.size(), 4);
  put_le(out, cd_off, 4);
  put_le(out, 0, 2);
  return out;
}

// A block-CSR user mask: rows (head, query block) -> sorted key blocks.
struct Bsr {
  std::vector<std::int64_t> offsets{0};
  std::vector<std::int32_t> indices;
  std::vector<std::uint8_t> full;
  void add_row(const std::vector<std::int32_t>& blocks) {
    for (std::int32_t kb : blocks) {
      indices.push_back(kb);
      full.push_back(static_cast<std::uint8_t>(indices.size() % 2));  // flags do not change results
    }
    offsets.push_back(static_cast<std::int64_t>(indices.size()));
  }
};

class PrefillMethods : public Attend {
 protected:
  // Problem of the user-mask tests: n_q = 37 of n_k = 45, blocks of 8 -> 5 query, 6 key blocks.
  static Problem user_problem() {
    Problem p;
    p.n_q = 37;
    p.n_k = 45;
    p.fill(61);
    return p;
  }
  static constexpr index_t kUserBlock = 8;

  // Per head h and query block qb (last position 8 qb + 15, or 44): the diagonal key block
  // qb + 1 and the earlier blocks with (h + kb + qb) % 3 == 0; head 3 leaves query block 2 empty.
  static Bsr user_bsr(index_t heads, index_t nqb) {
    Bsr b;
    for (index_t h = 0; h < heads; ++h)
      for (index_t qb = 0; qb < nqb; ++qb) {
        std::vector<std::int32_t> row;
        if (!(h == 3 && qb == 2))
          for (index_t kb = 0; kb <= qb + 1; ++kb)
            if (kb == qb + 1 || (h + kb + qb) % 3 == 0)
              row.push_back(static_cast<std::int32_t>(kb));
        b.add_row(row);
      }
    return b;
  }

  // allowed[] of a BSR over problem p (rows per head, or one shared layout), causal or not.
  static std::vector<std::uint8_t> bsr_allowed(const Problem& p, const Bsr& b, bool shared,
                                               bool causal) {
    const index_t nqb = (p.n_q + kUserBlock - 1) / kUserBlock;
    std::vector<std::uint8_t> a(static_cast<std::size_t>(p.hq * p.n_q * p.n_k), 0);
    for (index_t h = 0; h < p.hq; ++h)
      for (index_t i = 0; i < p.n_q; ++i) {
        const index_t r = (shared ? 0 : h) * nqb + i / kUserBlock;
        for (std::int64_t e = b.offsets[static_cast<std::size_t>(r)];
             e < b.offsets[static_cast<std::size_t>(r) + 1]; ++e) {
          const index_t kb = b.indices[static_cast<std::size_t>(e)];
          for (index_t j = kb * kUserBlock; j < std::min(p.n_k, (kb + 1) * kUserBlock); ++j)
            if (!causal || j <= i + p.n_k - p.n_q)
              a[static_cast<std::size_t>((h * p.n_q + i) * p.n_k + j)] = 1;
        }
      }
    return a;
  }

  // The bytes of an .npy file holding `values` (written with write_npy, then read back).
  template <class T>
  std::string npy_of(const std::vector<T>& values) const {
    const std::string tmp = path("member.tmp");
    write_npy(tmp, values, {static_cast<index_t>(values.size())});
    const std::string bytes = read_file(tmp);
    fs::remove(tmp);
    return bytes;
  }
  static std::string bool_npy(const std::vector<std::uint8_t>& flags) {
    return make_npy("{'descr': '|b1', 'fortran_order': False, 'shape': (" +
                        std::to_string(flags.size()) + ",), }",
                    std::string(flags.begin(), flags.end()));
  }

  // Writes o.npy / i.npy / f.npy and returns the user_mask arguments for them.
  std::vector<std::string> user_mask_args(const Problem& p, const Bsr& b) const {
    auto a = write_inputs(p);
    write_npy(path("off.npy"), b.offsets, {static_cast<index_t>(b.offsets.size())});
    write_npy(path("idx.npy"), b.indices, {static_cast<index_t>(b.indices.size())});
    a.insert(a.end(), {"--method", "user_mask", "--block", std::to_string(kUserBlock),
                       "--mask-offsets", path("off.npy"), "--mask-indices", path("idx.npy")});
    return a;
  }
  std::vector<std::string> good_user_args() const {
    const Problem p = user_problem();
    return user_mask_args(p, user_bsr(p.hq, 5));
  }

  // Inputs of the selection tests: n_q = 100 of n_k = 128.
  static Problem selection_problem(unsigned seed) {
    Problem p;
    p.n_q = 100;
    p.n_k = 128;
    p.fill(seed);
    return p;
  }
  static sparse_attn::TensorView<const float> view(const std::vector<float>& x, index_t h,
                                                   index_t n, index_t d) {
    return sparse_attn::TensorView<const float>(x.data(), h, n, d);
  }
  static double default_scale(const Problem& p) { return 1.0 / std::sqrt(double(p.d)); }

  // Runs `args`, checks exit 0 and the common JSON fields, and returns the JSON.
  nlohmann::json run_ok(const std::vector<std::string>& args, const std::string& method) {
    const RunResult r = run(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(r.err, "");
    if (r.rc != 0) return nlohmann::json::object();
    const nlohmann::json j = parse_one_json_line(r.out);
    EXPECT_EQ(j["method"], method);
    for (const char* key : {"budget", "target_compression", "reachable", "achieved_compression",
                            "pairs", "detail", "params", "select_ms", "ms"})
      EXPECT_TRUE(j.contains(key)) << key << " missing: " << r.out;
    EXPECT_GE(j.value("select_ms", -1.0), 0.0);
    EXPECT_GE(j.value("ms", -1.0), 0.0);
    return j;
  }
};

TEST_F(PrefillMethods, BlockSparseCompressionOneEqualsDense) {
  Problem p = selection_problem(62);
  const nlohmann::json j = run_ok(
      with(write_inputs(p), {"--method", "block_sparse", "--compression", "1", "--block", "8"}),
      "block_sparse");
  EXPECT_DOUBLE_EQ(j["target_compression"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(j["achieved_compression"].get<double>(), 1.0);
  EXPECT_EQ(j["reachable"], true);
  EXPECT_EQ(j["detail"], "k=16 blocks");  // every key block
  EXPECT_EQ(j["params"]["block"], "8");
  const Reference ref = naive_attention(p, true, 0, 0, default_scale(p));
  EXPECT_EQ(j["pairs"], ref.pairs);
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
}

TEST_F(PrefillMethods, BlockSparseExecutesTheSelectedMask) {
  Problem p = selection_problem(63);
  auto args = with(write_inputs(p), {"--method", "block_sparse", "--compression", "2.5", "--block",
                                     "8", "--lse", path("lse.npy"), "--threads", "2"});
  const nlohmann::json j = run_ok(args, "block_sparse");
  sparse_attn::methods::BlockSparse bs;
  bs.block = 8;
  const auto sel = bs.select(view(p.q, p.hq, p.n_q, p.d), view(p.k, p.hkv, p.n_k, p.d),
                             sparse_attn::methods::Budget::compression(2.5));
  EXPECT_EQ(j["detail"], sel.stats.detail);
  EXPECT_EQ(j["pairs"], sel.mask.pairs());
  EXPECT_DOUBLE_EQ(j["target_compression"].get<double>(), 2.5);
  EXPECT_EQ(j["reachable"], sel.stats.reachable);
  expect_honest(j, 2.5);
  EXPECT_GT(j["achieved_compression"].get<double>(), 1.5);
  const Reference ref = naive_over(p, allowed_of(sel.mask), default_scale(p));
  EXPECT_EQ(ref.pairs, sel.mask.pairs());
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
  expect_close(read_npy(path("lse.npy")).values<float>(), ref.lse, 1e-4);
}

TEST_F(PrefillMethods, BlockSparseReportsUnreachableTarget) {
  Problem p = selection_problem(64);
  const nlohmann::json j = run_ok(
      with(write_inputs(p), {"--method", "block_sparse", "--compression", "1000", "--block", "8"}),
      "block_sparse");
  EXPECT_EQ(j["reachable"], false);
  EXPECT_DOUBLE_EQ(j["target_compression"].get<double>(), 1000.0);
  EXPECT_LT(j["achieved_compression"].get<double>(), 1000.0);
  EXPECT_EQ(j["detail"], "k=3 blocks");  // the forced blocks alone
}

TEST_F(PrefillMethods, BlockSparseMassBudgetExecutesTheSelectedMask) {
  Problem p = selection_problem(70);
  const nlohmann::json j = run_ok(
      with(write_inputs(p), {"--method", "block_sparse", "--mass", "0.6", "--block", "8"}),
      "block_sparse");
  sparse_attn::methods::BlockSparse bs;
  bs.block = 8;
  const auto sel = bs.select(view(p.q, p.hq, p.n_q, p.d), view(p.k, p.hkv, p.n_k, p.d),
                             sparse_attn::methods::Budget::mass(0.6));
  EXPECT_EQ(j["budget"], "mass=0.6");
  EXPECT_TRUE(j["target_compression"].is_null());
  EXPECT_EQ(j["reachable"], true);
  EXPECT_EQ(j["detail"], sel.stats.detail);
  EXPECT_EQ(j["pairs"], sel.mask.pairs());
  const Reference ref = naive_over(p, allowed_of(sel.mask), default_scale(p));
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
}

TEST_F(PrefillMethods, MassFloorAndCapReachTheMethod) {
  Problem p = selection_problem(71);
  const nlohmann::json j = run_ok(
      with(write_inputs(p), {"--method", "block_sparse", "--mass", "0.6", "--mass-floor", "4",
                             "--mass-cap", "6", "--block", "8"}),
      "block_sparse");
  sparse_attn::methods::BlockSparse bs;
  bs.block = 8;
  const auto sel = bs.select(view(p.q, p.hq, p.n_q, p.d), view(p.k, p.hkv, p.n_k, p.d),
                             sparse_attn::methods::Budget::mass(0.6, 4, 6));
  EXPECT_EQ(j["budget"], "mass=0.6,floor=4,cap=6");
  EXPECT_EQ(j["detail"], sel.stats.detail);
  EXPECT_EQ(j["pairs"], sel.mask.pairs());
  const Reference ref = naive_over(p, allowed_of(sel.mask), default_scale(p));
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
}

TEST_F(PrefillMethods, VerticalSlashCompressionOneEqualsDense) {
  Problem p = selection_problem(65);
  const Reference ref = naive_attention(p, true, 0, 0, default_scale(p));
  for (const char* method : {"vertical_slash", "vertical_slash_tiled"}) {
    const nlohmann::json j = run_ok(
        with(write_inputs(p), {"--method", method, "--compression", "1", "--block", "16"}), method);
    EXPECT_DOUBLE_EQ(j["achieved_compression"].get<double>(), 1.0) << method;
    EXPECT_EQ(j["pairs"], ref.pairs) << method;
    EXPECT_EQ(j["reachable"], true);
    EXPECT_FALSE(j["detail"].get<std::string>().empty());
    expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
  }
}

TEST_F(PrefillMethods, VerticalSlashExecutesTheSelectedMaskInBothModes) {
  Problem p = selection_problem(66);
  p.n_q = p.n_k = 160;
  p.fill(66);
  // 76 lines with 8% columns: V = round(6.08) = 6 columns, S = 70 offsets.
  const auto qv = view(p.q, p.hq, p.n_q, p.d);
  const auto kv = view(p.k, p.hkv, p.n_k, p.d);
  const auto budget = sparse_attn::methods::Budget::count(76);
  for (const char* method : {"vertical_slash", "vertical_slash_tiled"}) {
    const nlohmann::json j = run_ok(
        with(write_inputs(p), {"--method", method, "--budget", "76", "--param",
                               "vertical_share=0.08", "--block", "16", "--param",
                               "last_queries=32"}),
        method);
    EXPECT_TRUE(j["target_compression"].is_null());
    EXPECT_EQ(j["budget"], "count=76");
    EXPECT_EQ(j["reachable"], true);
    EXPECT_EQ(j["params"]["last_queries"], "32");
    EXPECT_EQ(j["params"]["vertical_share"], "0.08");
    std::vector<std::uint8_t> allowed;
    index_t pairs = 0;
    std::string detail;
    auto configure = [](auto& m) {
      m.vertical_share = 0.08;
      m.block = 16;
      m.last_queries = 32;
    };
    if (std::string(method) == "vertical_slash") {
      sparse_attn::methods::VerticalSlash vs;
      configure(vs);
      const auto sel = vs.select(qv, kv, budget);
      EXPECT_EQ(sel.vertical, 6);
      EXPECT_EQ(sel.slash, 70);
      allowed = allowed_of(sel.mask);
      pairs = sel.mask.pairs();
      detail = sel.stats.detail;
    } else {
      sparse_attn::methods::VerticalSlashTiled vs;
      configure(vs);
      const auto sel = vs.select(qv, kv, budget);
      allowed = allowed_of(sel.mask);
      pairs = sel.mask.pairs();
      detail = sel.stats.detail;
    }
    EXPECT_EQ(j["detail"], detail) << method;
    EXPECT_EQ(j["pairs"], pairs) << method;
    EXPECT_GT(j["achieved_compression"].get<double>(), 1.0) << method;
    const Reference ref = naive_over(p, allowed, default_scale(p));
    EXPECT_EQ(ref.pairs, pairs) << method;
    expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
  }
}

TEST_F(PrefillMethods, FlexPrefillMassOneEqualsDense) {
  Problem p = selection_problem(67);
  const nlohmann::json j =
      run_ok(with(write_inputs(p), {"--method", "flex_prefill", "--mass", "1", "--block", "16"}),
             "flex_prefill");
  EXPECT_TRUE(j["target_compression"].is_null());
  EXPECT_EQ(j["budget"], "mass=1");
  EXPECT_DOUBLE_EQ(j["achieved_compression"].get<double>(), 1.0);
  EXPECT_NE(j["detail"].get<std::string>().find("query-aware heads=0"), std::string::npos)
      << j["detail"];
  const Reference ref = naive_attention(p, true, 0, 0, default_scale(p));
  EXPECT_EQ(j["pairs"], ref.pairs);
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
}

TEST_F(PrefillMethods, FlexPrefillExecutesTheSelectedMask) {
  Problem p = selection_problem(68);
  p.n_q = p.n_k = 192;
  p.fill(68);
  // tau 0.8 (sqrt(JS) <= sqrt(ln 2) ~ 0.83) makes heads query-aware on random data; both paths
  // are covered by running tau 0 too.
  for (const char* tau : {"0", "0.8"}) {
    const nlohmann::json j = run_ok(
        with(write_inputs(p), {"--method", "flex_prefill", "--mass", "0.5", "--param",
                               std::string("tau=") + tau, "--param", "min_budget=16", "--block",
                               "16", "--param", "last_queries=32"}),
        "flex_prefill");
    sparse_attn::methods::FlexPrefill fp;
    fp.tau = std::stod(tau);
    fp.min_budget = 16;
    fp.block = 16;
    fp.last_queries = 32;
    const auto sel = fp.select(view(p.q, p.hq, p.n_q, p.d), view(p.k, p.hkv, p.n_k, p.d),
                               sparse_attn::methods::Budget::mass(0.5));
    index_t query_aware = 0;
    for (auto qa : sel.query_aware) query_aware += qa;
    if (std::string(tau) == "0") {
      EXPECT_EQ(query_aware, 0);
    }
    EXPECT_EQ(j["detail"], sel.stats.detail) << tau;  // gamma, floor and query-aware heads
    EXPECT_NE(j["detail"].get<std::string>().find("query-aware heads=" +
                                                  std::to_string(query_aware)),
              std::string::npos)
        << j["detail"];
    EXPECT_EQ(j["params"]["block"], "16");
    EXPECT_EQ(j["params"]["tau"], tau);
    EXPECT_EQ(j["pairs"], sel.mask.pairs()) << tau;
    EXPECT_GT(j["achieved_compression"].get<double>(), 1.0) << tau;
    const Reference ref = naive_over(p, allowed_of(sel.mask), default_scale(p));
    expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
  }
}

TEST_F(PrefillMethods, FlexPrefillDefaultsToBlock128AndLastQ128AndCompression10) {
  Problem p = selection_problem(69);
  const nlohmann::json j =
      run_ok(with(write_inputs(p), {"--method", "flex_prefill"}), "flex_prefill");
  EXPECT_EQ(j["params"]["block"], "128");
  EXPECT_EQ(j["params"]["last_queries"], "128");
  EXPECT_EQ(j["budget"], "cr=10");
  EXPECT_DOUBLE_EQ(j["target_compression"].get<double>(), 10.0);
  expect_honest(j, 10.0);
}

TEST_F(PrefillMethods, UserMaskPerHeadMatchesNaiveReference) {
  const Problem p = user_problem();
  const Bsr b = user_bsr(p.hq, 5);
  write_npy(path("full.npy"), std::vector<std::int32_t>(b.full.begin(), b.full.end()),
            {static_cast<index_t>(b.full.size())});
  auto args = with(user_mask_args(p, b), {"--mask-full", path("full.npy")});
  const nlohmann::json j = run_ok(args, "user_mask");
  EXPECT_TRUE(j["target_compression"].is_null());
  EXPECT_TRUE(j["reachable"].is_null());  // no budget given: nothing to reach
  EXPECT_EQ(j["mask_layout"], "per_head");
  EXPECT_EQ(j["mask_blocks"], b.indices.size());
  EXPECT_EQ(j["mask_full_flags"], true);
  const Reference ref = naive_over(p, bsr_allowed(p, b, false, true), default_scale(p));
  const Reference dense = naive_attention(p, true, 0, 0, 1.0);
  EXPECT_EQ(j["pairs"], ref.pairs);
  EXPECT_NEAR(j["achieved_compression"].get<double>(), double(dense.pairs) / double(ref.pairs),
              1e-12);
  const std::vector<float> o = read_npy(path("o.npy")).values<float>();
  expect_close(o, ref.out, 1e-5);
  // Head 3's query block 2 lists no key block: its rows are 0.
  for (index_t i = 16; i < 24; ++i)
    EXPECT_EQ(o[static_cast<std::size_t>((3 * p.n_q + i) * p.d)], 0.0f);
}

TEST_F(PrefillMethods, UserMaskSharedLayoutFromNpzAsNumpyWritesIt) {
  const Problem p = user_problem();
  const Bsr b = user_bsr(1, 5);  // offsets of num_q_blocks + 1 entries: one layout for all heads
  write_inputs(p);
  write_bytes(path("mask.npz"), make_zip({{"offsets.npy", npy_of(b.offsets)},
                                          {"indices.npy", npy_of(b.indices)},
                                          {"full.npy", bool_npy(b.full)}}));
  const nlohmann::json j = run_ok(with(write_inputs(p), {"--method", "user_mask", "--block", "8",
                                                         "--mask-bsr", path("mask.npz")}),
                                  "user_mask");
  EXPECT_EQ(j["mask_layout"], "shared");
  EXPECT_EQ(j["mask_full_flags"], true);
  const Reference ref = naive_over(p, bsr_allowed(p, b, true, true), default_scale(p));
  EXPECT_EQ(j["pairs"], ref.pairs);
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
}

TEST_F(PrefillMethods, UserMaskNpzAcceptsScipyIndptrName) {
  const Problem p = user_problem();
  const Bsr b = user_bsr(p.hq, 5);
  write_bytes(path("mask.npz"), make_zip({{"format.npy", "not parsed"},
                                          {"indptr.npy", npy_of(b.offsets)},
                                          {"indices.npy", npy_of(b.indices)}}));
  const nlohmann::json j = run_ok(with(write_inputs(p), {"--method", "user_mask", "--block", "8",
                                                         "--mask-bsr", path("mask.npz")}),
                                  "user_mask");
  EXPECT_EQ(j["mask_full_flags"], false);
  const Reference ref = naive_over(p, bsr_allowed(p, b, false, true), default_scale(p));
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
}

TEST_F(PrefillMethods, UserMaskNonCausalMayListFutureBlocks) {
  const Problem p = user_problem();
  Bsr b;  // shared: every query block sees key blocks 0 and 5 (the future for most rows)
  for (int qb = 0; qb < 5; ++qb) b.add_row({0, 5});
  const nlohmann::json j = run_ok(with(user_mask_args(p, b), {"--no-causal"}), "user_mask");
  EXPECT_EQ(j["causal"], false);
  const Reference ref = naive_over(p, bsr_allowed(p, b, true, false), default_scale(p));
  EXPECT_EQ(j["pairs"], ref.pairs);
  expect_close(read_npy(path("o.npy")).values<float>(), ref.out, 1e-5);
}

TEST_F(PrefillMethods, HelpListsEveryRegistryMethodAndTheMaskFormats) {
  const RunResult r = run({"attend", "--help"});
  EXPECT_EQ(r.rc, 0);
  // The footer is generated from the registry: every method, its summary and its parameters.
  for (const auto& m : sparse_attn::methods::prefill_methods()) {
    EXPECT_NE(r.out.find("  " + m.name + " "), std::string::npos) << m.name;
    EXPECT_NE(r.out.find(m.summary), std::string::npos) << m.summary;
    for (const auto& prm : m.params)
      EXPECT_NE(r.out.find("--param " + prm.name + "=" + prm.default_value), std::string::npos)
          << m.name << " " << prm.name;
  }
  for (const char* s : {"--mask-bsr", "np.savez_compressed", "--compression", "--budget", "--mass",
                        "--tolerance", "--param"})
    EXPECT_NE(r.out.find(s), std::string::npos) << s;
}

// Bad input: exit 2, one line naming the problem and the allowed range, no output file.
TEST_F(PrefillMethods, RejectsCompressionBelowOne) {
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--compression", "0.5"}),
                  "--compression must be finite and >= 1 (1 = dense), got 0.5");
  expect_rejected(with(good_args(), {"--method", "vertical_slash", "--compression", "0"}),
                  "--compression must be finite and >= 1");
}

TEST_F(PrefillMethods, RejectsNaNCompression) {
  for (const char* cr : {"nan", "inf"})
    expect_rejected(with(good_args(), {"--method", "block_sparse", "--compression", cr}),
                    "--compression must be finite and >= 1");
}

TEST_F(PrefillMethods, RejectsBlockZero) {
  for (const char* m : {"block_sparse", "vertical_slash", "flex_prefill", "user_mask"})
    expect_rejected(with(good_args(), {"--method", m, "--block", "0"}), "--block must be >= 1");
}

TEST_F(PrefillMethods, RejectsUnsortedBsrIndices) {
  const Problem p = user_problem();
  Bsr b = user_bsr(p.hq, 5);
  std::swap(b.indices[b.offsets[4]], b.indices[b.offsets[4] + 1]);  // head 0, query block 4
  expect_rejected(user_mask_args(p, b), "key blocks of a row must be sorted ascending");
}

TEST_F(PrefillMethods, RejectsDuplicateBsrIndices) {
  const Problem p = user_problem();
  Bsr b = user_bsr(p.hq, 5);
  b.indices[b.offsets[4] + 1] = b.indices[b.offsets[4]];
  expect_rejected(user_mask_args(p, b), "must be unique");
}

TEST_F(PrefillMethods, RejectsOffsetsLengthMismatch) {
  const Problem p = user_problem();
  Bsr b = user_bsr(p.hq, 5);
  b.offsets.pop_back();
  b.indices.resize(static_cast<std::size_t>(b.offsets.back()));
  expect_rejected(user_mask_args(p, b),
                  "has 20 entries; expected Hq x num_q_blocks + 1 = 4 x 5 + 1 = 21 (one layout "
                  "per query head) or num_q_blocks + 1 = 6");
}

TEST_F(PrefillMethods, RejectsOffsetsNotMatchingIndexCount) {
  const Problem p = user_problem();
  Bsr b = user_bsr(p.hq, 5);
  b.indices.push_back(0);
  expect_rejected(user_mask_args(p, b), "must equal the size of indices");
}

TEST_F(PrefillMethods, RejectsOutOfRangeBsrIndex) {
  const Problem p = user_problem();
  Bsr b = user_bsr(p.hq, 5);
  b.indices.back() = 6;
  expect_rejected(user_mask_args(p, b), "indices[37] = 6, head 3, query block 4: key block 6 out of range [0, 6)");
  b.indices.back() = -1;
  expect_rejected(user_mask_args(p, b), "key block -1 out of range [0, 6)");
}

TEST_F(PrefillMethods, RejectsFutureBlockInCausalMask) {
  const Problem p = user_problem();
  Bsr b;
  for (int qb = 0; qb < 5; ++qb) b.add_row({0, 5});
  expect_rejected(user_mask_args(p, b), "a causal mask allows key blocks [0, 1]");
}

TEST_F(PrefillMethods, RejectsFullFlagsOtherThanZeroOrOne) {
  const Problem p = user_problem();
  const Bsr b = user_bsr(p.hq, 5);
  std::vector<std::int64_t> full(b.indices.size(), 1);
  full[2] = 7;
  write_npy(path("full.npy"), full, {static_cast<index_t>(full.size())});
  expect_rejected(with(user_mask_args(p, b), {"--mask-full", path("full.npy")}),
                  "entry 2 = 7; flags must be 0 (partial) or 1 (full block)");
  full.pop_back();
  write_npy(path("full.npy"), full, {static_cast<index_t>(full.size())});
  expect_rejected(with(user_mask_args(p, b), {"--mask-full", path("full.npy")}),
                  "flags; expected one per indices entry");
}

TEST_F(PrefillMethods, RejectsParameterTheMethodDoesNotHave) {
  // The registry's message names the method's own parameters.
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--param", "gamma=0.9"}),
                  "block_sparse: unknown parameter 'gamma'; its parameters: block");
  expect_rejected(with(good_args(), {"--method", "flex_prefill", "--param", "window=8"}),
                  "flex_prefill: unknown parameter 'window'; its parameters: tau, min_budget, "
                  "block, last_queries");
}

TEST_F(PrefillMethods, RejectsFlagsOfOtherMethodsAndBudgetMisuse) {
  expect_rejected(with(good_args(), {"--method", "dense", "--mask-offsets", path("q.npy")}),
                  "--mask-offsets applies only to --method user_mask, not --method dense");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--compression", "4", "--budget",
                                     "3"}),
                  "--compression, --budget and --mass are alternative budgets; give at most one");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--mass", "0.9", "--budget", "3"}),
                  "alternative budgets");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--tolerance", "0.2"}),
                  "--tolerance applies only to a --compression budget");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--compression", "4",
                                     "--tolerance", "1"}),
                  "--tolerance must be in [0, 1)");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--budget", "2.5"}),
                  "--budget must be a whole number >= 1 of blocks (--method block_sparse), got 2.5");
  expect_rejected(with(good_args(), {"--method", "flex_prefill", "--budget", "3"}),
                  "--budget does not apply to --method flex_prefill: it has no count unit");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--param", "block"}),
                  "--param expects NAME=VALUE");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--param", "block=x"}),
                  "block_sparse: parameter block=x is not a valid value");
  // A budget kind the method does not take: the library's message, before any output.
  expect_rejected(with(good_args(), {"--method", "sliding_window", "--mass", "0.9"}),
                  "a mass budget is not supported");
  // A mass budget's floor and cap: only with --mass, whole numbers, floor <= cap.
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--budget", "3", "--mass-cap",
                                     "5"}),
                  "--mass-floor and --mass-cap apply only to a --mass budget");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--mass", "0.9", "--mass-cap",
                                     "0"}),
                  "--mass-cap must be a whole number >= 1 of blocks (--method block_sparse), got 0");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--mass", "0.9", "--mass-floor",
                                     "1.5"}),
                  "--mass-floor must be a whole number >= 0 of blocks");
  expect_rejected(with(good_args(), {"--method", "block_sparse", "--mass", "0.9", "--mass-floor",
                                     "6", "--mass-cap", "5"}),
                  "--mass-floor (6) must not exceed --mass-cap (5)");
}

TEST_F(PrefillMethods, RejectsNonCausalSelection) {
  for (const char* m :
       {"sliding_window", "block_sparse", "vertical_slash", "vertical_slash_tiled", "flex_prefill"})
    expect_rejected(with(good_args(), {"--method", m, "--no-causal"}),
                    std::string("--method ") + m + " is causal only; drop --no-causal");
}

TEST_F(PrefillMethods, RejectsVerticalSlashParametersOutOfRange) {
  expect_rejected(with(good_args(), {"--method", "vertical_slash", "--param", "last_queries=0"}),
                  "last_queries");
  expect_rejected(with(good_args(), {"--method", "vertical_slash", "--param",
                                     "vertical_share=1.5"}),
                  "vertical_share");
}

TEST_F(PrefillMethods, RejectsMassOutOfRange) {
  for (const char* p : {"0", "nan", "inf", "1.5", "-0.5"})
    expect_rejected(with(good_args(), {"--method", "flex_prefill", "--mass", p}),
                    "--mass must be in (0, 1]");
}

TEST_F(PrefillMethods, RejectsFlexPrefillParametersOutOfRange) {
  expect_rejected(with(good_args(), {"--method", "flex_prefill", "--param", "tau=-0.1"}),
                  "tau must be >= 0");
  expect_rejected(with(good_args(), {"--method", "flex_prefill", "--param", "min_budget=-1"}),
                  "min_budget must be >= 0");
}

TEST_F(PrefillMethods, RejectsUserMaskWithoutOrWithTwoMasks) {
  expect_rejected(with(good_args(), {"--method", "user_mask"}), "needs the block mask");
  auto a = good_user_args();
  expect_rejected(with(a, {"--mask-bsr", path("m.npz")}), "do not combine it");
  a.resize(a.size() - 2);  // drop --mask-indices
  expect_rejected(a, "--mask-offsets and --mask-indices go together");
}

TEST_F(PrefillMethods, RejectsMissingIndexFile) {
  auto a = good_user_args();
  fs::remove(path("idx.npy"));
  expect_rejected(a, "--mask-indices " + path("idx.npy") + ": cannot open");
}

TEST_F(PrefillMethods, RejectsFloatOrWrongRankIndexFile) {
  auto a = good_user_args();
  write_npy(path("idx.npy"), std::vector<float>{0, 1}, {2});
  expect_rejected(a, "unsupported dtype '<f4'; allowed: '<i4' (int32), '<i8' (int64)");
  write_npy(path("idx.npy"), std::vector<std::int32_t>{0, 1}, {1, 2});
  expect_rejected(a, "must have rank 1, got shape (1, 2)");
}

TEST_F(PrefillMethods, RejectsCompressedOrCorruptNpz) {
  const Problem p = user_problem();
  const Bsr b = user_bsr(p.hq, 5);
  auto a = with(write_inputs(p),
                {"--method", "user_mask", "--block", "8", "--mask-bsr", path("mask.npz")});
  const std::vector<std::pair<std::string, std::string>> members{
      {"offsets.npy", npy_of(b.offsets)}, {"indices.npy", npy_of(b.indices)}};
  write_bytes(path("mask.npz"), make_zip(members, 8));
  expect_rejected(a, "is compressed (zip method 8, deflate, as np.savez_compressed writes)");
  std::string zip = make_zip(members);
  zip[200] = static_cast<char>(zip[200] ^ 0x5a);  // inside the first member's data
  write_bytes(path("mask.npz"), zip);
  expect_rejected(a, "CRC-32 mismatch");
  write_bytes(path("mask.npz"), make_zip({{"offsets.npy", npy_of(b.offsets)}}));
  expect_rejected(a, "no 'indices' member; members present: 'offsets.npy'");
  write_bytes(path("mask.npz"), "PK not really a zip");
  expect_rejected(a, "not a .npz (zip) archive");
  write_bytes(path("mask.npz"), zip.substr(0, zip.size() - 30));
  expect_rejected(a, "--mask-bsr " + path("mask.npz"));
}

}  // namespace

// =============================================================================================
// One selection contract (docs/METHODS.md): every method of the registry takes `--compression C` in
// attend and decode; a target it cannot reach is run (exit 0) and reported reachable = false, and
// reachable is true exactly when the achieved CR is within the default tolerance (10%) of C.
// =============================================================================================
namespace {

class Contract : public Decode {
 protected:
  // n = 4096 keys, 2 query heads on 1 KV head, d = 32: long enough for the CR searches to land
  // near their targets, small enough for a quick test.
  static Problem long_problem(index_t n_q) {
    Problem p;
    p.hq = 2;
    p.hkv = 1;
    p.n_q = n_q;
    p.n_k = 4096;
    p.d = 32;
    p.fill(91);
    return p;
  }
  nlohmann::json run_json(const std::vector<std::string>& args) {
    const RunResult r = run(args);
    EXPECT_EQ(r.rc, 0) << r.err;
    if (r.rc != 0) return nlohmann::json::object();
    return parse_one_json_line(r.out);
  }
};

TEST_F(Contract, AttendTakesCompressionForEveryPrefillMethod) {
  const Problem p = long_problem(4096);
  const auto base = write_inputs(p);
  for (const auto& m : sparse_attn::methods::prefill_methods()) {
    if (m.needs_user_mask) continue;  // below, with a mask
    const bool dense = m.name == "dense";
    for (double cr : {2.0, 5.0, 10.0}) {
      char text[16];
      std::snprintf(text, sizeof text, "%g", cr);
      const nlohmann::json j = run_json(with(base, {"--method", m.name, "--compression", text}));
      SCOPED_TRACE(m.name + " CR " + text);
      EXPECT_EQ(j["method"], m.name);
      EXPECT_DOUBLE_EQ(j.value("target_compression", 0.0), cr);
      expect_honest(j, cr);
      if (dense) {
        EXPECT_EQ(j["reachable"], false);
        EXPECT_DOUBLE_EQ(j.value("achieved_compression", 0.0), 1.0);
      }
      if (!dense && cr == 2.0) {
        EXPECT_EQ(j["reachable"], true);
      }
    }
  }
}

TEST_F(Contract, AttendUnreachableCompressionExitsZeroAndSaysSo) {
  Problem p = long_problem(1024);
  p.n_k = 1024;
  p.fill(92);
  const auto base = write_inputs(p);
  for (const auto& m : sparse_attn::methods::prefill_methods()) {
    if (m.needs_user_mask) continue;
    const nlohmann::json j = run_json(with(base, {"--method", m.name, "--compression", "1000"}));
    EXPECT_EQ(j["reachable"], false) << m.name;
    EXPECT_LT(j.value("achieved_compression", 1e9), 900.0) << m.name;
    EXPECT_DOUBLE_EQ(j.value("target_compression", 0.0), 1000.0) << m.name;
  }
}

TEST_F(PrefillMethods, UserMaskTakesACompressionTargetAndSaysWhetherItIsMet) {
  // The mask is the caller's: without a budget nothing is asked (budget, target and reachable
  // are null); with --compression C, reachable says whether the mask's CR is within 10% of C.
  const nlohmann::json plain = run_ok(good_user_args(), "user_mask");
  EXPECT_TRUE(plain["budget"].is_null());
  EXPECT_TRUE(plain["target_compression"].is_null());
  EXPECT_TRUE(plain["reachable"].is_null());
  const double achieved = plain["achieved_compression"].get<double>();
  ASSERT_GT(achieved, 1.2);
  const std::string near = std::to_string(achieved * 1.05);
  const nlohmann::json hit = run_ok(with(good_user_args(), {"--compression", near}), "user_mask");
  EXPECT_EQ(hit["reachable"], true);
  EXPECT_DOUBLE_EQ(hit["achieved_compression"].get<double>(), achieved);
  const nlohmann::json miss =
      run_ok(with(good_user_args(), {"--compression", "1000"}), "user_mask");
  EXPECT_EQ(miss["reachable"], false);
  EXPECT_DOUBLE_EQ(miss["target_compression"].get<double>(), 1000.0);
  fs::remove(path("o.npy"));
  expect_rejected(with(good_user_args(), {"--budget", "4"}),
                  "--budget does not apply to --method user_mask: it has no count unit");
}

TEST_F(Contract, DecodeTakesCompressionForEveryDecodeMethod) {
  const Problem p = long_problem(64);  // 64 query rows: 60 prompt queries for scoring, 4 steps
  const auto base = decode_inputs(p, 4);
  for (const auto& m : sparse_attn::methods::decode_methods()) {
    const bool dense = m.name == "dense";
    for (double cr : {2.0, 5.0, 10.0}) {
      char text[16];
      std::snprintf(text, sizeof text, "%g", cr);
      const nlohmann::json j = run_json(with(base, {"--method", m.name, "--compression", text}));
      SCOPED_TRACE(m.name + " CR " + text);
      EXPECT_EQ(j["method"], m.name);
      EXPECT_DOUBLE_EQ(j.value("target_compression", 0.0), cr);
      expect_honest(j, cr);
      EXPECT_EQ(j["reachable"], !dense);
      if (dense) {
        EXPECT_DOUBLE_EQ(j.value("achieved_compression", 0.0), 1.0);
      }
    }
  }
}

TEST_F(Contract, DecodeUnreachableCompressionExitsZeroAndSaysSo) {
  const Problem p = long_problem(64);
  const auto base = decode_inputs(p, 2);
  for (const auto& m : sparse_attn::methods::decode_methods()) {
    const nlohmann::json j = run_json(with(base, {"--method", m.name, "--compression", "1000"}));
    EXPECT_EQ(j["reachable"], false) << m.name;
    EXPECT_DOUBLE_EQ(j.value("target_compression", 0.0), 1000.0) << m.name;
  }
}

TEST_F(Contract, DecodeHelpListsEveryRegistryMethod) {
  const RunResult r = run({"decode", "--help"});
  EXPECT_EQ(r.rc, 0);
  for (const auto& m : sparse_attn::methods::decode_methods()) {
    EXPECT_NE(r.out.find("  " + m.name + " "), std::string::npos) << m.name;
    EXPECT_NE(r.out.find(m.summary), std::string::npos) << m.summary;
    for (const auto& prm : m.params)
      EXPECT_NE(r.out.find("--param " + prm.name + "=" + prm.default_value), std::string::npos)
          << m.name << " " << prm.name;
  }
}

TEST_F(Contract, UnknownParameterNamesTheAllowedOnes) {
  expect_rejected(with(good_args(), {"--method", "sliding_window", "--param", "window=8"}),
                  "sliding_window: unknown parameter 'window'; its parameters: sinks, block");
  expect_rejected(with(good_decode_args(), {"--method", "snapkv", "--param", "budget=8"}),
                  "snapkv: unknown parameter 'budget'; its parameters: window, sinks, pool_kernel");
}

}  // namespace

// =============================================================================================
// Output files of every subcommand (tools/output_file.hpp; docs/ROBUSTNESS.md, section "The
// tool's output files"): symbolic links written through, non-regular files refused untouched, all or nothing,
// and a requested plot is made or the run fails.
// =============================================================================================
namespace {

// The type and size of every entry under `dir` (recursive, links not followed): a run that
// changes nothing leaves this exactly as it was.
std::map<std::string, std::string> tree_of(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    struct stat st {};
    ::lstat(e.path().c_str(), &st);
    std::string kind = S_ISREG(st.st_mode)    ? "file " + std::to_string(st.st_size) + " " +
                                                  std::to_string(st.st_mode & 0777)
                       : S_ISLNK(st.st_mode)  ? "link -> " + fs::read_symlink(e.path()).string()
                       : S_ISDIR(st.st_mode)  ? "dir"
                       : S_ISFIFO(st.st_mode) ? "fifo"
                       : S_ISSOCK(st.st_mode) ? "socket"
                       : S_ISCHR(st.st_mode)  ? "chardev"
                                              : "other";
    if (S_ISREG(st.st_mode)) kind += " " + read_file(e.path());
    out[fs::relative(e.path(), dir).string()] = kind;
  }
  return out;
}

bool has_matplotlib() {
  for (const char* py : {"python3", "/usr/bin/python3"}) {
    const std::string probe = std::string(py) + " -c 'import matplotlib' >/dev/null 2>&1";
    if (std::system(probe.c_str()) == 0) return true;
  }
  return false;
}

bool is_png(const std::string& bytes) {
  return bytes.size() > 100 && bytes.compare(0, 8, std::string("\x89PNG\r\n\x1a\n", 8)) == 0;
}

class OutputFiles : public Decode {
 protected:
  // One output path option of one subcommand: the full command line with that option set to
  // `target`, and how to recognise its data.
  struct Case {
    std::string label;  // "attend --out"
    std::function<std::vector<std::string>(const std::string&)> args;
    enum Kind { npy, json, png } kind = npy;
  };

  // Runs the tool under a time limit (a test never blocks, even on a FIFO) with `env` settings.
  RunResult run_env(const std::vector<std::string>& args, const std::string& env = "") const {
    std::string cmd = "timeout -k 5 300 env " + env + " " + shell_quote(SPARSE_ATTN_CLI);
    for (const std::string& a : args) cmd += " " + shell_quote(a);
    const std::string out = (fs::temp_directory_path() / ("sa_out_" + dir_.filename().string())).string();
    const std::string err = out + ".err";
    cmd += " >" + shell_quote(out) + " 2>" + shell_quote(err) + " </dev/null";
    const int status = std::system(cmd.c_str());
    RunResult r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = read_file(out);
    r.err = read_file(err);
    fs::remove(out);
    fs::remove(err);
    return r;
  }

  std::vector<std::string> eval_args() {
    Problem p;
    p.fill(5);
    write_inputs(p);
    return {"eval", "--q", path("q.npy"), "--k", path("k.npy"), "--v", path("v.npy"),
            "--methods", "sliding_window,streaming", "--last-rows", "4", "--threads", "1"};
  }
  static std::vector<std::string> frontier_args() {
    return {"frontier", "--data-dir", "", "--synthetic-tokens", "1024", "--compression", "2",
            "--last-rows", "8", "--threads", "1"};
  }

  // Every output path option of every subcommand (the PNG ones only when `with_plot`).
  std::vector<Case> cases(bool with_plot) {
    const auto attend = good_args();  // ends with --out o.npy
    auto decode = good_decode_args();
    const auto eval = eval_args();
    std::vector<Case> c;
    c.push_back({"attend --out", [=](const std::string& t) {
                   auto a = attend;
                   a[a.size() - 1] = t;
                   return a;
                 }});
    c.push_back({"attend --lse", [=](const std::string& t) { return with(attend, {"--lse", t}); }});
    c.push_back({"decode --out", [=](const std::string& t) {
                   auto a = decode;
                   *(std::find(a.begin(), a.end(), "--out") + 1) = t;
                   return a;
                 }});
    c.push_back({"eval --json", [=](const std::string& t) { return with(eval, {"--json", t}); },
                 Case::json});
    c.push_back({"frontier --json",
                 [=](const std::string& t) {
                   return with(frontier_args(), {"--out-dir", dir_.string(), "--no-plot", "--json", t});
                 },
                 Case::json});
    if (with_plot)
      c.push_back({"eval --plot", [=](const std::string& t) { return with(eval, {"--plot", t}); },
                   Case::png});
    return c;
  }

  static void expect_data(const Case& c, const fs::path& p) {
    SCOPED_TRACE(c.label + ": " + p.string());
    ASSERT_TRUE(fs::is_regular_file(fs::symlink_status(p)));
    const std::string bytes = read_file(p);
    if (c.kind == Case::npy) {
      EXPECT_GE(read_npy(p.string()).size(), 1);
    } else if (c.kind == Case::json) {
      EXPECT_TRUE(nlohmann::json::parse(bytes).contains("records"));
    } else {
      EXPECT_TRUE(is_png(bytes)) << bytes.size() << " bytes";
    }
  }

  // Exit 2, one error line naming the path and `kind`, nothing computed or written: the
  // directory tree (and what `target` is) unchanged.
  void expect_refused(const Case& c, const std::string& target, const std::string& kind) {
    SCOPED_TRACE(c.label + " " + target);
    const auto before = tree_of(dir_);
    const RunResult r = run_env(c.args(target));
    EXPECT_EQ(r.rc, 2) << r.err;
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("sparse-attn: error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(target), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(kind), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("only regular files or new paths are written"), std::string::npos) << r.err;
    EXPECT_EQ(tree_of(dir_), before);
  }
};

TEST_F(OutputFiles, SymbolicLinkIsWrittenThroughAndStaysALink) {
  const bool plot = has_matplotlib();
  fs::create_directory(path("elsewhere"));
  int i = 0;
  for (const Case& c : cases(plot)) {
    SCOPED_TRACE(c.label);
    // The target is in another directory, named by a relative link; it exists (old data).
    const std::string target = path("elsewhere/t" + std::to_string(i));
    const std::string link = path("link" + std::to_string(i++));
    write_bytes(target, "old");
    fs::create_symlink("elsewhere/" + fs::path(target).filename().string(), link);
    const RunResult r = run_env(c.args(link));
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_TRUE(fs::is_symlink(link));
    EXPECT_EQ(fs::read_symlink(link), "elsewhere/" + fs::path(target).filename().string());
    expect_data(c, target);
    // No temp file next to the link or the target.
    for (const auto& [name, kind] : tree_of(dir_))
      EXPECT_EQ(name.find(".tmp."), std::string::npos) << name;
  }
}

TEST_F(OutputFiles, SymbolicLinkChainIsFollowedToItsFinalTarget) {
  auto a = good_args();
  write_bytes(path("final.npy"), "old");
  fs::create_symlink("final.npy", path("mid"));
  fs::create_symlink(path("mid"), path("first"));  // absolute, then relative
  a.back() = path("first");
  ASSERT_EQ(run_env(a).rc, 0);
  EXPECT_TRUE(fs::is_symlink(path("first")));
  EXPECT_TRUE(fs::is_symlink(path("mid")));
  EXPECT_EQ(read_npy(path("final.npy")).shape, (std::vector<index_t>{4, 37, 16}));
}

TEST_F(OutputFiles, DanglingSymbolicLinkCreatesItsTarget) {
  int i = 0;
  for (const Case& c : cases(has_matplotlib())) {
    SCOPED_TRACE(c.label);
    const std::string link = path("dangling" + std::to_string(i));
    const std::string target = "new" + std::to_string(i++);
    fs::create_symlink(target, link);
    const RunResult r = run_env(c.args(link));
    ASSERT_EQ(r.rc, 0) << r.err;
    EXPECT_TRUE(fs::is_symlink(link));
    expect_data(c, path(target));
  }
}

TEST_F(OutputFiles, DanglingSymbolicLinkIntoAMissingDirectoryIsRefused) {
  for (const Case& c : cases(true)) {
    SCOPED_TRACE(c.label);
    fs::create_symlink("no_such_dir/x", path("dl"));
    const auto before = tree_of(dir_);
    const RunResult r = run_env(c.args(path("dl")));
    EXPECT_EQ(r.rc, 2) << r.err;
    EXPECT_NE(r.err.find("directory does not exist"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("symbolic link to"), std::string::npos) << r.err;
    EXPECT_EQ(tree_of(dir_), before);
    fs::remove(path("dl"));
  }
}

TEST_F(OutputFiles, FifoIsRefusedUntouchedAndNeverOpened) {
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0644), 0);
  fs::create_symlink("fifo", path("to_fifo"));
  // A reader holds the FIFO open without blocking: had the tool opened it for writing, that
  // would not block either, and what it wrote would be read below.
  const int fd = ::open(path("fifo").c_str(), O_RDONLY | O_NONBLOCK);
  ASSERT_GE(fd, 0);
  for (const Case& c : cases(true)) {
    expect_refused(c, path("fifo"), "is a FIFO");
    expect_refused(c, path("to_fifo"), "(a symbolic link to " + path("fifo") + ") is a FIFO");
  }
  char buf[16];
  EXPECT_LE(::read(fd, buf, sizeof buf), 0);  // nothing was ever written
  ::close(fd);
  struct stat st {};
  ASSERT_EQ(::lstat(path("fifo").c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  EXPECT_TRUE(fs::is_symlink(path("to_fifo")));
}

TEST_F(OutputFiles, DirectoryIsRefused) {
  fs::create_directory(path("a_dir"));
  write_bytes(path("a_dir/keep"), "x");
  fs::create_directory_symlink("a_dir", path("to_dir"));
  for (const Case& c : cases(true)) {
    expect_refused(c, path("a_dir"), "is a directory");
    expect_refused(c, path("to_dir"), "is a directory");
  }
  EXPECT_EQ(read_file(path("a_dir/keep")), "x");
}

TEST_F(OutputFiles, SocketIsRefused) {
  const int s = ::socket(AF_UNIX, SOCK_STREAM, 0);
  ASSERT_GE(s, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  const std::string p = path("sock");
  ASSERT_LT(p.size(), sizeof addr.sun_path);
  std::copy(p.begin(), p.end(), addr.sun_path);
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  for (const Case& c : cases(true)) expect_refused(c, p, "is a socket");
  ::close(s);
}

TEST_F(OutputFiles, DeviceNodesAreRefusedAndStayDevices) {
  // First a device node of our own (as root): if it were not refused, /dev is not tried.
  if (::geteuid() == 0 && ::mknod(path("full").c_str(), S_IFCHR | 0666, makedev(1, 7)) == 0) {
    for (const Case& c : cases(true)) expect_refused(c, path("full"), "is a character device");
    struct stat st {};
    ASSERT_EQ(::lstat(path("full").c_str(), &st), 0);
    ASSERT_TRUE(S_ISCHR(st.st_mode)) << "a device node was replaced; /dev is not tried";
    fs::remove(path("full"));
  }
  for (const char* dev : {"/dev/null", "/dev/full"}) {
    struct stat st {};
    if (::stat(dev, &st) != 0 || !S_ISCHR(st.st_mode)) continue;
    for (const Case& c : cases(true)) {
      SCOPED_TRACE(c.label);
      const RunResult r = run_env(c.args(dev));
      EXPECT_EQ(r.rc, 2) << r.err;
      EXPECT_NE(r.err.find(std::string(dev) + " is a character device"), std::string::npos) << r.err;
      ASSERT_EQ(::lstat(dev, &st), 0);
      ASSERT_TRUE(S_ISCHR(st.st_mode)) << dev << " is no longer a character device";
    }
    EXPECT_FALSE(fs::exists(std::string(dev) + ".tmp." + std::to_string(::getpid())));
  }
}

TEST_F(OutputFiles, TwoOptionsNamingOneFileThroughALinkAreRefused) {
  fs::create_symlink("o.npy", path("alias.npy"));
  expect_rejected(with(good_args(), {"--lse", path("alias.npy")}), "name the same file");
  const auto eval = eval_args();
  const RunResult r = run_env(with(eval, {"--json", path("x.json"), "--plot", path("./x.json")}));
  EXPECT_EQ(r.rc, 2) << r.err;
  EXPECT_NE(r.err.find("--json and --plot name the same file"), std::string::npos) << r.err;
}

TEST_F(OutputFiles, ReplacedFileKeepsItsPermissionBits) {
  auto a = good_args();
  write_bytes(path("o.npy"), "old");
  fs::permissions(path("o.npy"), fs::perms::owner_read | fs::perms::owner_write |
                                     fs::perms::group_read);
  ASSERT_EQ(run_env(a).rc, 0);
  EXPECT_EQ(fs::status(path("o.npy")).permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
  EXPECT_EQ(read_npy(path("o.npy")).shape, (std::vector<index_t>{4, 37, 16}));
}

TEST_F(OutputFiles, FailedRunLeavesNoFileAndKeepsExistingOutputs) {
  // attend: the outputs pass their checks, then an input fails; neither output changes.
  auto a = with(good_args(), {"--lse", path("lse.npy")});
  write_bytes(path("o.npy"), "old out");
  write_bytes(path("lse.npy"), "old lse");
  write_bytes(path("q.npy"), "not an npy file");
  auto before = tree_of(dir_);
  RunResult r = run_env(a);
  EXPECT_EQ(r.rc, 2) << r.err;
  EXPECT_EQ(tree_of(dir_), before);

  // eval: the JSON is complete, then the plot fails; the JSON (through a link into another
  // directory) is not replaced, the PNG not created, and no temp or scratch file remains.
  const auto eval = eval_args();
  fs::create_directory(path("sub"));
  write_bytes(path("sub/report.json"), "old json");
  fs::create_symlink("sub/report.json", path("report.json"));
  write_bytes(path("fakepy"),
              "#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then exit 0; fi\n"
              "echo 'Traceback (most recent call last):' >&2\n"
              "echo 'RuntimeError: simulated plot failure' >&2\nexit 3\n");
  fs::permissions(path("fakepy"), fs::perms::owner_all);
  before = tree_of(dir_);
  r = run_env(with(eval, {"--json", path("report.json"), "--plot", path("sub/plot.png")}),
              "SPARSE_ATTN_PYTHON=" + shell_quote(path("fakepy")));
  EXPECT_EQ(r.rc, 1) << r.err;
  EXPECT_NE(r.err.find("sparse-attn: error: --plot " + path("sub/plot.png") +
                       ": the plot failed"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("RuntimeError: simulated plot failure"), std::string::npos) << r.err;
  EXPECT_EQ(tree_of(dir_), before);
}

TEST_F(OutputFiles, EvalPlotOnOneSequenceLengthWritesAPng) {
  if (!has_matplotlib()) GTEST_SKIP() << "python3 with matplotlib not available";
  const auto eval = eval_args();
  const auto before = tree_of(dir_);
  // The default: the full length only (the fit has no length term).
  RunResult r = run_env(with(eval, {"--plot", path("one.png")}));
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(is_png(read_file(path("one.png"))));
  auto after = tree_of(dir_);
  after.erase("one.png");
  EXPECT_EQ(after, before);  // no temp, script or scratch JSON left
  // With the JSON, and over two lengths (the fit's length term drawn).
  r = run_env(with(eval, {"--plot", path("two.png"), "--json", path("two.json"), "--lengths",
                          "20,37"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(is_png(read_file(path("two.png"))));
  EXPECT_EQ(nlohmann::json::parse(read_file(path("two.json")))["panels"].size(), 2u);
}

// The synthetic workload's preset: calibrated by default, stress on request (a different, more
// diffuse workload: other errors), recorded in the JSON; an unknown name is refused.
TEST_F(OutputFiles, FrontierRecordsTheSyntheticPreset) {
  auto errors = [](const nlohmann::json& doc) {
    std::vector<double> e;
    for (const auto& r : doc["records"])
      if (r["dataset"] == "synthetic") e.push_back(r["err_layer"].get<double>());
    return e;
  };
  RunResult r = run_env(with(frontier_args(), {"--no-plot", "--json", path("c.json")}));
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto cal = nlohmann::json::parse(read_file(path("c.json")));
  EXPECT_EQ(cal["options"]["synthetic_preset"], "calibrated");
  r = run_env(with(frontier_args(), {"--no-plot", "--json", path("s.json"), "--synthetic-preset", "stress"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  const auto stress = nlohmann::json::parse(read_file(path("s.json")));
  EXPECT_EQ(stress["options"]["synthetic_preset"], "stress");
  ASSERT_FALSE(errors(cal).empty());
  EXPECT_EQ(errors(cal).size(), errors(stress).size());
  EXPECT_NE(errors(cal), errors(stress));
  r = run_env(with(frontier_args(), {"--no-plot", "--json", path("x.json"), "--synthetic-preset", "hard"}));
  EXPECT_EQ(r.rc, 2) << r.err;
  EXPECT_NE(r.err.find("--synthetic-preset"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(path("x.json")));
}

TEST_F(OutputFiles, FrontierWritesItsJsonAndPngThroughLinksInTheOutDir) {
  const bool plot = has_matplotlib();
  fs::create_directory(path("out"));
  fs::create_directory(path("store"));
  fs::create_symlink("../store/f.json", path("out/frontier.json"));
  fs::create_symlink("../store/f.png", path("out/frontier.png"));
  auto a = with(frontier_args(), {"--out-dir", path("out")});
  if (!plot) a.push_back("--no-plot");
  const RunResult r = run_env(a);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_TRUE(fs::is_symlink(path("out/frontier.json")));
  EXPECT_TRUE(nlohmann::json::parse(read_file(path("store/f.json"))).contains("panels"));
  if (plot) {
    EXPECT_TRUE(fs::is_symlink(path("out/frontier.png")));
    EXPECT_TRUE(is_png(read_file(path("store/f.png"))));
  }
  // A FIFO named frontier.png is refused before the run.
  fs::remove(path("out/frontier.png"));
  ASSERT_EQ(::mkfifo(path("out/frontier.png").c_str(), 0644), 0);
  const RunResult f = run_env(with(frontier_args(), {"--out-dir", path("out")}));
  EXPECT_EQ(f.rc, 2) << f.err;
  EXPECT_NE(f.err.find(path("out/frontier.png") + " is a FIFO"), std::string::npos) << f.err;
  EXPECT_EQ(f.err.find("frontier ["), std::string::npos) << "ran before refusing: " << f.err;
}

TEST_F(OutputFiles, PlotThatCannotBeMadeExitsNonZeroBeforeTheRun) {
  const auto eval = eval_args();
  const auto before = tree_of(dir_);
  // No python3 with matplotlib (SPARSE_ATTN_PYTHON, when set, is the only one tried).
  RunResult r = run_env(with(eval, {"--plot", path("p.png"), "--json", path("p.json")}),
                        "SPARSE_ATTN_PYTHON=/nonexistent/python3");
  EXPECT_EQ(r.rc, 1) << r.err;
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;  // nothing evaluated
  EXPECT_NE(r.err.find("cannot make the PNG: no python3 that imports matplotlib"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("/nonexistent/python3"), std::string::npos) << r.err;
  EXPECT_EQ(tree_of(dir_), before);
  // frontier writes frontier.png by default: the same, with the way out.
  r = run_env(with(frontier_args(), {"--out-dir", dir_.string()}),
              "SPARSE_ATTN_PYTHON=/nonexistent/python3");
  EXPECT_EQ(r.rc, 1) << r.err;
  EXPECT_NE(r.err.find("--no-plot"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("frontier ["), std::string::npos) << "ran before failing: " << r.err;
  EXPECT_EQ(tree_of(dir_), before);
}

TEST_F(OutputFiles, HelpStatesTheOutputFileRules) {
  for (const char* sub : {"attend", "decode", "eval", "frontier"}) {
    const RunResult r = run_env({sub, "--help"});
    EXPECT_EQ(r.rc, 0);
    std::string flat = r.out;
    std::replace(flat.begin(), flat.end(), '\n', ' ');
    EXPECT_NE(flat.find("A symbolic link is written through"), std::string::npos) << sub;
    EXPECT_NE(flat.find("directory, FIFO, device or socket is refused"), std::string::npos) << sub;
  }
}

}  // namespace
