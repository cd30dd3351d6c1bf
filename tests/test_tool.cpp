// The .npy reader/writer and the `sparse-attn` tool, run as a subprocess on files in a temp dir.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
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
};

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
  args.insert(args.end(), {"--method", "sliding_window", "--window", "6", "--sinks", "3", "--block",
                           "8", "--threads", "2"});
  const RunResult r = run(args);
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  const Reference ref = naive_attention(p, true, 6, 3, 1.0 / std::sqrt(double(p.d)));
  const Reference dense = naive_attention(p, true, 0, 0, 1.0);
  EXPECT_EQ(j["method"], "sliding_window");
  EXPECT_EQ(j["window"], 6);
  EXPECT_EQ(j["sinks"], 3);
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
  expect_rejected(with(good_args(), {"--method", "sliding_window", "--window", "0"}),
                  "--window must be >= 1");
}

TEST_F(Attend, RejectsWindowWithoutSlidingWindowMethod) {
  expect_rejected(with(good_args(), {"--window", "4"}), "--window/--sinks apply only");
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
  // Each step attends the S sinks, the W most recent cached tokens and itself: window W + 1.
  const RunResult r = run(with(decode_inputs(p, 5), {"--method", "streaming", "--window", "6", "--sinks", "2"}));
  ASSERT_EQ(r.rc, 0) << r.err;
  const nlohmann::json j = parse_one_json_line(r.out);
  EXPECT_EQ(j["cache_tokens_after_prefill"], 2 * 8);
  EXPECT_NEAR(j["per_step"][0]["keys_read"].get<double>(), 9.0, 1e-12);
  const Reference ref = naive_attention(p, true, 7, 2, 1.0 / std::sqrt(double(p.d)));
  expect_close(read_npy(path("o.npy")).values<float>(), last_rows(p, ref.out, 5), 1e-5);
}

TEST_F(Decode, SparseMethodsAtCompressionOneEqualDense) {
  Problem p;
  p.fill(24);
  const Reference ref = naive_attention(p, true, 0, 0, 1.0 / std::sqrt(double(p.d)));
  for (const char* m : {"quest", "snapkv", "ada_snapkv", "h2o"}) {
    const RunResult r = run(with(decode_inputs(p, 2), {"--method", m, "--compression", "1"}));
    ASSERT_EQ(r.rc, 0) << m << ": " << r.err;
    EXPECT_DOUBLE_EQ(parse_one_json_line(r.out)["mean_achieved_compression"].get<double>(), 1.0) << m;
    expect_close(read_npy(path("o.npy")).values<float>(), last_rows(p, ref.out, 2), 1e-5);
  }
}

TEST_F(Decode, SparseMethodsReportKeysReadAndCompression) {
  Problem p;
  p.n_q = p.n_k = 200;
  p.fill(25);
  for (const char* m : {"quest", "snapkv", "ada_snapkv", "h2o"}) {
    const RunResult r = run(with(decode_inputs(p, 2), {"--method", m, "--compression", "4", "--page", "8",
                                                       "--kv-dtype", "bf16"}));
    ASSERT_EQ(r.rc, 0) << m << ": " << r.err;
    const nlohmann::json j = parse_one_json_line(r.out);
    EXPECT_EQ(j["target_compression"], 4.0);
    for (const auto& s : j["per_step"]) {
      EXPECT_GT(s["achieved_compression"].get<double>(), 2.0) << m;
      EXPECT_LT(s["keys_read"].get<double>(), 100.0) << m;
    }
  }
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

TEST_F(Decode, RejectsCompressionForDense) {
  expect_rejected(with(good_decode_args(), {"--compression", "4"}), "do not apply to --method dense");
}

TEST_F(Decode, RejectsCompressionTogetherWithBudget) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--compression", "4", "--budget", "16"}),
                  "--budget");
}

TEST_F(Decode, RejectsCompressionBelowOne) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--compression", "0.5"}),
                  "--compression must be finite and >= 1");
}

TEST_F(Decode, RejectsNonPositiveBudget) {
  expect_rejected(with(good_decode_args(), {"--method", "snapkv", "--budget", "0"}),
                  "--budget must be >= 1");
}

TEST_F(Decode, RejectsNonPositivePage) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--page", "0"}), "--page must be >= 1");
}

TEST_F(Decode, RejectsWindowForQuest) {
  expect_rejected(with(good_decode_args(), {"--method", "quest", "--window", "8"}),
                  "--window/--sinks do not apply to --method quest");
}

TEST_F(Decode, RejectsStreamingWindowWithCompression) {
  expect_rejected(with(good_decode_args(), {"--method", "streaming", "--window", "8", "--compression", "2"}),
                  "not both");
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
// Hardening (issue 6): tool inputs the sections above do not cover. The library API's bad-input
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
  // The library's policy (ROBUSTNESS.md): not rejected, no crash; a NaN in query row i makes
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
