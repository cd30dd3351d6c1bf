// Hostile .npy headers (Robustness round 2): shapes whose element or byte count wraps around 2^63
// or 2^64, negative, huge and too many dimensions, huge header lengths. io::read_npy, io::write_npy
// and the tool's in-memory parsers (tools/npz.hpp) must refuse each with
// sparse_attn::invalid_argument naming the input, never std::length_error, std::bad_alloc or a
// wrapped size. Before the fix, (2^62 - 1,) float32 passed the size check because
// data offset + 2^64 - 4 bytes wrapped to a small number, and std::vector threw length_error.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <typeinfo>
#include <vector>

#include "../tools/npz.hpp"
#include "sparse_attn/io/npy.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/stat.h>

#include <thread>
#endif

namespace {

using namespace sparse_attn;

/// A version 1.0 (or 2.0) .npy: header dict with `descr` and the literal shape tuple `shape`,
/// padded to 64 bytes, then `data_bytes` zero bytes.
std::string npy_bytes(const std::string& descr, const std::string& shape, std::size_t data_bytes,
                      int major = 1) {
  std::string dict =
      "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  const std::size_t prefix = major == 1 ? 10 : 12;
  while ((prefix + dict.size() + 1) % 64 != 0) dict += ' ';
  dict += '\n';
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  for (std::size_t b = 0; b < prefix - 8; ++b)
    out += static_cast<char>((dict.size() >> (8 * b)) & 0xff);
  return out + dict + std::string(data_bytes, '\0');
}

/// A per-process path in the temp directory (tmp_path_for appends the process id).
std::string temp_file(const std::string& tag) {
  return io::detail::tmp_path_for(
      (std::filesystem::temp_directory_path() / ("npy_hostile_" + tag)).string());
}

void write_file(const std::string& path, const std::string& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(std::fwrite(bytes.data(), 1, bytes.size(), f), bytes.size());
  std::fclose(f);
}

/// The invalid_argument message of read_npy on `bytes` (empty if it succeeded); any other
/// exception type fails the test.
std::string read_error(const std::string& bytes) {
  const std::string path = temp_file("read.npy");
  write_file(path, bytes);
  std::string msg;
  try {
    io::read_npy(path);
  } catch (const invalid_argument& e) {
    msg = e.what();
    EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << "does not name the file: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not sparse_attn::invalid_argument: " << typeid(e).name() << ": " << e.what();
  }
  std::filesystem::remove(path);
  return msg;
}

/// Same for the tool's parser of integer .npy held in memory.
std::string tool_error(const std::string& bytes) {
  std::string msg;
  try {
    cli::parse_int_npy("--mask-indices m.npy", bytes);
  } catch (const invalid_argument& e) {
    msg = e.what();
    EXPECT_EQ(msg.rfind("--mask-indices m.npy: ", 0), 0u) << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not sparse_attn::invalid_argument: " << typeid(e).name() << ": " << e.what();
  }
  return msg;
}

bool has(const std::string& msg, const char* what) { return msg.find(what) != std::string::npos; }

// 2^61 + 1 = 2305843009213693953, 2^62 = 4611686018427387904, 2^63 - 1 = 9223372036854775807.
TEST(NpyHostile, ShapesWhoseByteCountWrapsAreRefused) {
  struct Case {
    const char* shape;
    std::size_t itemsize;  // of '<f4' / '<f2' / '<i8' below
  };
  const Case cases[] = {
      {"(4611686018427387903,)", 4},     // 2^64 - 4 bytes: offset + bytes wrapped (the old hole)
      {"(4294967296, 4294967296)", 4},   // 2^64 elements: count wraps to 0
      {"(4611686018427387904, 4)", 4},   // 2^64 elements
      {"(3, 2305843009213693953)", 4},   // 3 * 2^61 + 3 elements: count past 2^63, bytes past 2^64
      {"(2305843009213693952,)", 4},     // 2^63 bytes exactly: one past int64
      {"(4611686018427387904,)", 2},     // float16, 2^63 bytes
      {"(9223372036854775807,)", 8},     // int64, count fits int64, bytes do not
      {"(1152921504606846976, 1)", 8},   // 2^60 int64 = 2^63 bytes
      {"(0, 4611686018427387904, 4)", 4},  // empty, but NumPy refuses the nonzero product too
      {"(4611686018427387904, 4, 0)", 4},  // same with the zero last: order does not matter
  };
  for (const Case& c : cases) {
    const char* descr = c.itemsize == 4 ? "<f4" : c.itemsize == 2 ? "<f2" : "<i8";
    const std::string msg = read_error(npy_bytes(descr, c.shape, 16));
    EXPECT_TRUE(has(msg, "too large") && has(msg, c.shape)) << c.shape << ": " << msg;
    const char* int_descr = c.itemsize == 4 ? "<i4" : c.itemsize == 2 ? "<u2" : "<i8";
    const std::string tool = tool_error(npy_bytes(int_descr, c.shape, 16));
    EXPECT_TRUE(has(tool, "too large") && has(tool, c.shape)) << c.shape << ": " << tool;
  }
  // One-byte elements (tool only): 2^64 elements wrap size_t, 2^63 do not fit int64.
  for (const char* shape : {"(4294967296, 4294967296)", "(2, 4611686018427387904)",
                            "(9223372036854775807, 2)"}) {
    const std::string tool = tool_error(npy_bytes("|u1", shape, 16));
    EXPECT_TRUE(has(tool, "too large")) << shape << ": " << tool;
  }
}

TEST(NpyHostile, LargeButRepresentableShapesFailAsTruncatedNotByAllocating) {
  // 2^63 - 4 bytes: a valid size, so the file is too short; nothing is allocated for it.
  const std::string msg = read_error(npy_bytes("<f4", "(2305843009213693951,)", 16));
  EXPECT_TRUE(has(msg, "truncated data") && has(msg, "9223372036854775804")) << msg;
  const std::string tool = tool_error(npy_bytes("|u1", "(9223372036854775807,)", 16));
  EXPECT_TRUE(has(tool, "truncated data")) << tool;
}

TEST(NpyHostile, NegativeAndOversizedDimensionsAreRefused) {
  for (const char* shape : {"(-1,)", "(4, -4)", "(0, -1)", "(-9223372036854775807,)"}) {
    const std::string msg = read_error(npy_bytes("<f4", shape, 0));
    EXPECT_TRUE(has(msg, "negative dimension") && has(msg, "must be >= 0")) << shape << ": " << msg;
    EXPECT_TRUE(has(tool_error(npy_bytes("<i4", shape, 0)), "negative dimension")) << shape;
  }
  for (const char* shape : {"(9223372036854775808,)", "(18446744073709551616, 1)",
                            "(-9223372036854775808,)", "(99999999999999999999999999999,)"}) {
    const std::string msg = read_error(npy_bytes("<f4", shape, 0));
    EXPECT_TRUE(has(msg, "does not fit in int64")) << shape << ": " << msg;
    EXPECT_TRUE(has(tool_error(npy_bytes("<i8", shape, 0)), "does not fit in int64")) << shape;
  }
}

TEST(NpyHostile, ZeroDimensionsGiveEmptyArrays) {
  const std::string path = temp_file("empty.npy");
  for (const char* shape :
       {"(0,)", "(0, 5)", "(5, 0, 1099511627776)", "(2305843009213693951, 0)"}) {
    write_file(path, npy_bytes("<f4", shape, 0));
    const io::NpyArray a = io::read_npy(path);
    EXPECT_EQ(a.size(), 0) << shape;
    EXPECT_TRUE(a.f4.empty()) << shape;
    EXPECT_TRUE(cli::parse_int_npy("m", npy_bytes("<i4", shape, 0)).values.empty()) << shape;
    // An empty array with data after it has trailing bytes.
    EXPECT_TRUE(has(read_error(npy_bytes("<f4", shape, 4)), "trailing")) << shape;
  }
  write_file(path, npy_bytes("<f4", "()", 4));  // 0-d: one element
  EXPECT_EQ(io::read_npy(path).f4.size(), 1u);
  std::filesystem::remove(path);
}

TEST(NpyHostile, AbsurdRankAndHeaderLengthAreRefused) {
  std::string ones_64 = "(";
  for (int i = 0; i < 64; ++i) ones_64 += "1, ";
  const std::string ones_65 = ones_64 + "1)";
  ones_64 += ")";
  const std::string path = temp_file("rank.npy");
  write_file(path, npy_bytes("<f4", ones_64, 4));  // NumPy's limit: 64 dimensions
  EXPECT_EQ(io::read_npy(path).rank(), 64u);
  std::filesystem::remove(path);
  EXPECT_TRUE(has(read_error(npy_bytes("<f4", ones_65, 4)), "at most 64"));
  EXPECT_TRUE(has(tool_error(npy_bytes("<i4", ones_65, 4)), "at most 64"));

  // Version 2.0 header lengths: 4 GiB - 1 (implausible) and 16 MiB (plausible, but past the end).
  for (std::uint32_t len : {0xFFFFFFFFu, 1u << 24}) {
    std::string b("\x93NUMPY\x02\x00", 8);
    for (int i = 0; i < 4; ++i) b += static_cast<char>((len >> (8 * i)) & 0xff);
    b += "{'descr': '<f4'";
    const std::string msg = read_error(b);
    EXPECT_TRUE(has(msg, len == 0xFFFFFFFFu ? "implausible" : "truncated file: header")) << msg;
    EXPECT_TRUE(has(tool_error(b), "truncated file: header"));
  }
}

TEST(NpyHostile, WriteRefusesShapesWhoseByteCountOverflows) {
  const std::string path = temp_file("write.npy");
  const float one = 1.0f;
  for (const std::vector<index_t>& shape :
       {std::vector<index_t>{index_t{1} << 32, index_t{1} << 32},
        std::vector<index_t>{index_t{1} << 62, 4}, std::vector<index_t>{3, (index_t{1} << 61) + 1},
        std::vector<index_t>{0, index_t{1} << 62, 4}, std::vector<index_t>{2, -1}}) {
    const std::string shape_text = io::detail::npy_shape_str(shape);
    // The pointer overload would otherwise write a wrapped byte count (0 for 2^64 elements)
    // under a header claiming the full shape; the vector overload compared a wrapped product.
    for (int overload = 0; overload < 2; ++overload) {
      try {
        if (overload == 0)
          io::write_npy(path, &one, shape);
        else
          io::write_npy(path, std::vector<float>{}, shape);
        ADD_FAILURE() << "accepted " << shape_text;
      } catch (const invalid_argument& e) {
        const std::string msg = e.what();
        EXPECT_EQ(msg.rfind(path + ": ", 0), 0u) << msg;  // the target, not its temp file
        EXPECT_TRUE(has(msg, "too large") || has(msg, "negative dimension")) << msg;
      }
      EXPECT_FALSE(std::filesystem::exists(path)) << shape_text;
    }
  }
}

#if defined(__unix__) || defined(__APPLE__)
TEST(NpyHostile, PipeClaimingAHugeShapeFailsAsTruncated) {
  // A FIFO has no file size, so the reader cannot compare before reading: it must read in
  // bounded chunks instead of allocating the 2^63 - 4 bytes the header claims.
  const std::string path = temp_file("pipe.npy");
  std::filesystem::remove(path);
  ASSERT_EQ(mkfifo(path.c_str(), 0600), 0);
  std::thread writer([&] { write_file(path, npy_bytes("<f4", "(2305843009213693951,)", 16)); });
  const std::string msg = [&] {
    try {
      io::read_npy(path);
    } catch (const invalid_argument& e) {
      return std::string(e.what());
    } catch (const std::exception& e) {
      return std::string("wrong exception: ") + e.what();
    }
    return std::string("accepted");
  }();
  writer.join();
  std::filesystem::remove(path);
  EXPECT_TRUE(has(msg, "truncated data") && has(msg, "only 16 present")) << msg;
}
#endif

TEST(NpyHostile, NpzMemberWithWrappingShapeNamesTheMember) {
  // A stored zip with one member "indices.npy" whose header claims (2^32, 2^32) int32.
  const std::string member = npy_bytes("<i4", "(4294967296, 4294967296)", 16);
  auto le = [](std::uint64_t v, int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += static_cast<char>((v >> (8 * i)) & 0xff);
    return s;
  };
  const std::string name = "indices.npy";
  const std::uint32_t crc = cli::crc32(member);
  std::string zip = le(0x04034b50, 4) + le(20, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(crc, 4) +
                    le(member.size(), 4) + le(member.size(), 4) + le(name.size(), 2) + le(0, 2) +
                    name + member;
  const std::size_t cd = zip.size();
  zip += le(0x02014b50, 4) + le(20, 2) + le(20, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(crc, 4) +
         le(member.size(), 4) + le(member.size(), 4) + le(name.size(), 2) + le(0, 2) + le(0, 2) +
         le(0, 2) + le(0, 2) + le(0, 4) + le(0, 4) + name;
  zip += le(0x06054b50, 4) + le(0, 2) + le(0, 2) + le(1, 2) + le(1, 2) + le(zip.size() - cd, 4) +
         le(cd, 4) + le(0, 2);
  const cli::Npz npz = cli::parse_npz(zip, "--mask-bsr m.npz", {"indices"});
  ASSERT_EQ(npz.members.count("indices"), 1u);
  try {
    cli::parse_int_npy("--mask-bsr m.npz['indices']", npz.members.at("indices"));
    ADD_FAILURE() << "accepted";
  } catch (const invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("--mask-bsr m.npz['indices']: shape (4294967296, 4294967296)", 0), 0u)
        << msg;
  }
}

}  // namespace
