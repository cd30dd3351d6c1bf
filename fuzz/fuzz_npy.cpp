// libFuzzer harness for the file formats the tool reads from untrusted paths:
//   - io::read_npy (library): the input bytes written to a per-process temporary file;
//   - the tool's in-memory parsers (tools/npz.hpp): parse_int_npy and parse_npz (np.savez zip,
//     zip64, CRC-32), then parse_int_npy on every member it returns.
// Every input must either parse into a consistent array (element count = product of the shape,
// values present for exactly one dtype; an .npy read back after write_npy gives the same shape
// and bytes) or throw sparse_attn::invalid_argument whose message names the input. Any other
// exception, a crash or a sanitizer report is a finding. Build: see fuzz/CMakeLists.txt.
//
// Raw bytes rarely spell a header whose shape is 2^62 or 2^64 / itemsize, so an input whose first
// byte is not the start of a seed file ('\x93' of \x93NUMPY, 'P' of a zip) is also decoded as a
// recipe (synthesise(), byte layout there): version, dtype, fortran_order, rank, each dimension
// from a table of extremes (0, 1, 2^31, 2^32, 2^62, 2^63 - 1, 2^64 / itemsize +- 1, negative, past
// 2^64) or raw 64-bit, how the data length relates to the shape, and whether the .npy travels in
// a stored .npz. The parsers then face a well-formed header with that shape, and an oracle
// (expect_valid) computes independently, in overflow-checked 64-bit arithmetic, whether it must
// be accepted: the verdict must agree, and an accepted array must hold exactly the data bytes.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "../tools/npz.hpp"
#include "sparse_attn/io/npy.hpp"

namespace {

using namespace sparse_attn;

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "\nfuzz_npy FAILURE: %s\n", why.c_str());
  std::abort();
}

void expect_named(const invalid_argument& e, const std::string& name) {
  const std::string msg = e.what();
  if (msg.rfind(name + ": ", 0) != 0 && msg.rfind(name, 0) != 0)
    fail("message does not start with '" + name + "': " + msg);
}

std::string temp_path(const char* tag) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/fuzz_npy_" + std::to_string(getpid()) + tag;
}

template <class T>
void round_trip(const io::NpyArray& a, const std::vector<T>& values, const std::string& path) {
  if (values.size() != static_cast<std::size_t>(a.size()))
    fail("read_npy: " + std::to_string(values.size()) + " values for shape " + a.shape_str());
  io::write_npy(path, values, a.shape);
  const io::NpyArray b = io::read_npy(path, {a.dtype});
  if (b.shape != a.shape) fail("write_npy/read_npy changed the shape " + a.shape_str());
  const std::vector<T>& w = b.template values<T>();
  if (w.size() != values.size() ||
      (!w.empty() && std::memcmp(w.data(), values.data(), sizeof(T) * w.size()) != 0))
    fail("write_npy/read_npy changed the values of shape " + a.shape_str());
}

/// The array read_npy returns for `bytes` (after the round-trip checks), or nothing if it threw
/// invalid_argument naming the file.
std::optional<io::NpyArray> library_reader(const std::string& bytes) {
  static const std::string path = temp_path(".npy"), again = temp_path("_again.npy");
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) fail("cannot create " + path);
    if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size())
      fail("cannot write " + path);
    std::fclose(f);
  }
  io::NpyArray a;
  try {
    a = io::read_npy(path, {io::NpyDtype::f4, io::NpyDtype::f2, io::NpyDtype::i4, io::NpyDtype::i8});
  } catch (const invalid_argument& e) {
    expect_named(e, path);
    return std::nullopt;
  }
  // Values only in the vector of the file's dtype (round_trip checks that one's count).
  if (a.f4.size() + a.f2.size() + a.i4.size() + a.i8.size() != static_cast<std::size_t>(a.size()))
    fail("read_npy: values held for more than one dtype, shape " + a.shape_str());
  switch (a.dtype) {
    case io::NpyDtype::f4: round_trip(a, a.f4, again); break;
    case io::NpyDtype::f2: round_trip(a, a.f2, again); break;
    case io::NpyDtype::i4: round_trip(a, a.i4, again); break;
    case io::NpyDtype::i8: round_trip(a, a.i8, again); break;
  }
  return a;
}

void check_int_array(const cli::IntArray& a) {
  std::size_t n = 1;
  for (index_t s : a.shape) {
    if (s < 0) fail("parse_int_npy: negative extent in " + cli::shape_str(a.shape));
    n *= static_cast<std::size_t>(s);
  }
  if (n != a.values.size()) fail("parse_int_npy: element count does not match " + cli::shape_str(a.shape));
}

void tool_parsers(const std::string& bytes) {
  try {
    check_int_array(cli::parse_int_npy("input", bytes));
  } catch (const invalid_argument& e) {
    expect_named(e, "input");
  }
  cli::Npz npz;
  try {
    npz = cli::parse_npz(bytes, "archive", {"offsets", "indptr", "indices", "full"});
  } catch (const invalid_argument& e) {
    expect_named(e, "archive");
    return;
  }
  for (const auto& [key, member] : npz.members) {
    try {
      check_int_array(cli::parse_int_npy("archive['" + key + "']", member));
    } catch (const invalid_argument& e) {
      expect_named(e, "archive['" + key + "']");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Synthesised headers.

/// Reads the recipe front to back; 0 once the input is exhausted.
struct Recipe {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= std::uint64_t{byte()} << (8 * i);
    return v;
  }
};

constexpr std::uint64_t kInt64Max = static_cast<std::uint64_t>(INT64_MAX);

/// A dimension as the header spells it and as the oracle reads it: sign and magnitude, or
/// `beyond` when the magnitude does not fit in uint64.
struct Dim {
  std::string text;
  bool negative = false, beyond = false;
  std::uint64_t magnitude = 0;
};

Dim dim_of(bool negative, std::uint64_t magnitude) {
  Dim d;
  d.negative = negative && magnitude != 0;
  d.magnitude = magnitude;
  d.text = (d.negative ? "-" : "") + std::to_string(magnitude);
  return d;
}
Dim dim_beyond(const char* text) {
  Dim d;
  d.text = text;
  d.negative = text[0] == '-';
  d.beyond = true;
  return d;
}

/// Dimension `selector` for `itemsize`-byte elements: the table of extremes, or (selector >= 0xF0)
/// 8 raw bytes as a signed 64-bit value.
Dim pick_dim(std::uint8_t selector, std::size_t itemsize, Recipe& r) {
  // 2^64 / itemsize: the count whose byte count is exactly 2^64 (wraps to 0).
  const std::uint64_t wrap = itemsize == 1 ? 0 : (UINT64_MAX / itemsize) + 1;
  switch (selector % 0x20) {
    case 0: return dim_of(false, 0);
    case 1: return dim_of(false, 1);
    case 2: return dim_of(false, 2);
    case 3: return dim_of(false, 3);
    case 4: return dim_of(false, 7);
    case 5: return dim_of(false, 64);
    case 6: return dim_of(false, (1ull << 31) - 1);
    case 7: return dim_of(false, 1ull << 31);
    case 8: return dim_of(false, (1ull << 32) - 1);
    case 9: return dim_of(false, 1ull << 32);
    case 10: return dim_of(false, (1ull << 32) + 1);
    case 11: return dim_of(false, (1ull << 61) - 1);
    case 12: return dim_of(false, 1ull << 61);
    case 13: return dim_of(false, (1ull << 61) + 1);
    case 14: return dim_of(false, (1ull << 62) - 1);
    case 15: return dim_of(false, 1ull << 62);
    case 16: return dim_of(false, kInt64Max);
    case 17: return dim_of(false, kInt64Max + 1);
    case 18: return dim_of(false, UINT64_MAX);
    case 19: return itemsize == 1 ? dim_of(false, UINT64_MAX) : dim_of(false, wrap - 1);
    case 20: return itemsize == 1 ? dim_beyond("18446744073709551616") : dim_of(false, wrap);
    case 21: return itemsize == 1 ? dim_beyond("18446744073709551617") : dim_of(false, wrap + 1);
    case 22: return dim_of(false, kInt64Max / itemsize);      // the largest valid rank-1 shape
    case 23: return dim_of(false, kInt64Max / itemsize + 1);  // one past it
    case 24: return dim_of(true, 1);
    case 25: return dim_of(true, kInt64Max);
    case 26: return dim_of(true, kInt64Max + 1);  // -2^63
    case 27: return dim_beyond("99999999999999999999999999999");
    case 28: return dim_beyond("-99999999999999999999999999999");
    default: {
      if (selector < 0xF0) return dim_of(false, selector % 0x20);
      const std::uint64_t raw = r.u64();
      const bool negative = (raw >> 63) != 0;
      return dim_of(negative, negative ? ~raw + 1 : raw);
    }
  }
}

const char* const kDescrs[] = {"<f4", "<f2", "<i4", "<i8", "=f4", "=i8", "|u1", "|b1", "<u2",
                               "<u8", "<i2", "|i1", ">f4", ">i1", "<f8", "<c8", "|O",  "<U3",
                               "f4",  "",    ">u8", "<b1", "|b2", "<i3"};

bool library_takes(const std::string& descr) {
  for (const char* d : {"<f4", "<f2", "<i4", "<i8", "=f4", "=f2", "=i4", "=i8"})
    if (descr == d) return true;
  return false;
}
bool tool_takes(const std::string& d) {
  return d.size() == 3 && std::strchr("<|=>", d[0]) != nullptr && std::strchr("iub", d[1]) &&
         std::strchr("1248", d[2]) && (d[1] != 'b' || d[2] == '1') && (d[0] != '>' || d[2] == '1');
}

/// The oracle: the byte count of `dims` with `itemsize`-byte elements if NumPy could create the
/// array (rank <= 64, every dimension in [0, 2^63 - 1], the product of the nonzero dimensions times
/// the itemsize <= 2^63 - 1), else nothing. Written apart from the library's npy_extent.
std::optional<std::uint64_t> expect_valid(const std::vector<Dim>& dims, std::size_t itemsize) {
  if (dims.size() > 64) return std::nullopt;
  std::uint64_t bytes = itemsize;
  bool empty = false;
  for (const Dim& d : dims) {
    if (d.beyond || d.magnitude > kInt64Max || (d.negative && d.magnitude != 0))
      return std::nullopt;
    if (d.magnitude == 0) {
      empty = true;
      continue;
    }
    if (__builtin_mul_overflow(bytes, d.magnitude, &bytes) || bytes > kInt64Max)
      return std::nullopt;
  }
  return empty ? 0 : bytes;
}

std::string le_bytes(std::uint64_t v, int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

/// A stored (np.savez) zip holding `member` as "indices.npy".
std::string npz_of(const std::string& member) {
  const std::string name = "indices.npy";
  const std::uint32_t crc = cli::crc32(member);
  const std::string sizes = le_bytes(crc, 4) + le_bytes(member.size(), 4) +
                            le_bytes(member.size(), 4) + le_bytes(name.size(), 2);
  std::string zip = le_bytes(0x04034b50, 4) + le_bytes(20, 2) + le_bytes(0, 2) + le_bytes(0, 2) +
                    le_bytes(0, 4) + sizes + le_bytes(0, 2) + name + member;
  const std::size_t cd = zip.size();
  zip += le_bytes(0x02014b50, 4) + le_bytes(20, 2) + le_bytes(20, 2) + le_bytes(0, 2) +
         le_bytes(0, 2) + le_bytes(0, 4) + sizes + le_bytes(0, 2) + le_bytes(0, 2) +
         le_bytes(0, 2) + le_bytes(0, 2) + le_bytes(0, 4) + le_bytes(0, 4) + name;
  zip += le_bytes(0x06054b50, 4) + le_bytes(0, 2) + le_bytes(0, 2) + le_bytes(1, 2) +
         le_bytes(1, 2) + le_bytes(zip.size() - cd, 4) + le_bytes(cd, 4) + le_bytes(0, 2);
  return zip;
}

// Recipe layout, one byte each unless said otherwise (missing bytes read as 0):
//   [0] marker (anything but '\x93' and 'P')
//   [1] flags: bits 0-1 version 1.0 / 2.0 / 3.0 / 0xVV (VV = next byte); bit 2 fortran_order True;
//       bit 3 wrap in a .npz; bit 4 header length field off by one; bit 5 Python 2 'L' suffixes;
//       bit 6 keys in reverse order; bit 7 64 + (rank byte % 2) dimensions instead of rank % 8
//   [2] dtype: kDescrs[byte % count]
//   [3] rank % 8 (or see bit 7)
//   one byte per dimension: pick_dim (>= 0xF0: 8 more raw bytes)
//   [.] data: bits 0-1 exact length / one short / one long / the rest of the input as is
//   rest: the data bytes (zero-padded or cut to the length chosen)
void synthesised(const std::uint8_t* data, std::size_t size) {
  Recipe r{data + 1, size - 1};
  const std::uint8_t flags = r.byte();
  int major = 1 + (flags & 3);
  if ((flags & 3) == 3) major = r.byte();
  const bool fortran = (flags & 4) != 0, in_npz = (flags & 8) != 0, bad_len = (flags & 16) != 0,
             long_suffix = (flags & 32) != 0, reversed = (flags & 64) != 0;
  const std::string descr = kDescrs[r.byte() % (sizeof(kDescrs) / sizeof(kDescrs[0]))];
  const std::size_t itemsize =
      descr.size() == 3 && descr[2] >= '1' && descr[2] <= '8' ? std::size_t(descr[2] - '0') : 1;
  const std::uint8_t rank_byte = r.byte();
  const std::size_t rank = (flags & 128) ? 64 + rank_byte % 2 : rank_byte % 8;
  std::vector<Dim> dims;
  for (std::size_t i = 0; i < rank; ++i) dims.push_back(pick_dim(r.byte(), itemsize, r));
  const std::uint8_t data_mode = r.byte() % 4;

  std::string shape = "(";
  for (std::size_t i = 0; i < dims.size(); ++i)
    shape += (i ? ", " : "") + dims[i].text + (long_suffix ? "L" : "");
  shape += dims.size() == 1 ? ",)" : ")";
  const std::string entries[] = {"'descr': '" + descr + "'",
                                 std::string("'fortran_order': ") + (fortran ? "True" : "False"),
                                 "'shape': " + shape};
  std::string dict = "{";
  for (int i = 0; i < 3; ++i) dict += entries[reversed ? 2 - i : i] + ", ";
  dict += "}";
  const std::size_t prefix = major == 1 ? 10 : 12;
  while ((prefix + dict.size() + 1) % 64 != 0) dict += ' ';
  dict += '\n';
  std::string npy("\x93NUMPY", 6);
  npy += static_cast<char>(major);
  npy += '\0';
  npy += le_bytes(dict.size() + (bad_len ? 1 : 0), static_cast<int>(prefix - 8));
  npy += dict;

  const std::string rest(reinterpret_cast<const char*>(r.p), r.n);
  const std::optional<std::uint64_t> valid_bytes = expect_valid(dims, itemsize);
  constexpr std::uint64_t kMaxData = 1 << 16;  // longer exact data is not synthesised
  std::string payload = rest;
  if (data_mode != 3 && valid_bytes && *valid_bytes <= kMaxData) {
    const std::uint64_t want = *valid_bytes + (data_mode == 2) - (data_mode == 1 && *valid_bytes);
    payload.resize(static_cast<std::size_t>(want), '\0');
  }
  // With the length field one long, the header takes the first data byte; were it whitespace the
  // header would still parse and one-long data would fit again. A non-blank byte keeps it refused.
  if (bad_len && !payload.empty()) payload[0] = 'x';
  npy += payload;

  // Accepted exactly when the header is well formed (right version and length field), the dtype
  // and C order are supported, the shape is one NumPy could create and the data has its size.
  const bool header_ok = major >= 1 && major <= 3 && !bad_len && !fortran;
  const bool size_ok = valid_bytes && payload.size() == *valid_bytes;
  const bool library_ok = header_ok && size_ok && library_takes(descr);
  const bool tool_ok = header_ok && size_ok && tool_takes(descr);
  // '<u8' values past int64 are refused by design, so an accepted shape may still fail there.
  const bool tool_may_fail = descr.size() == 3 && descr[1] == 'u' && descr[2] == '8';

  std::vector<index_t> want_shape;
  for (const Dim& d : dims) want_shape.push_back(static_cast<index_t>(d.magnitude));

  if (!in_npz) {
    const std::optional<io::NpyArray> a = library_reader(npy);
    if (a.has_value() != library_ok)
      fail(std::string("read_npy ") + (a ? "accepted" : "refused") + " descr '" + descr +
           "' shape " + shape + " with " + std::to_string(payload.size()) + " data bytes");
    if (a) {
      if (a->shape != want_shape) fail("read_npy: shape " + a->shape_str() + " for " + shape);
      const void* got = a->f4.empty() ? a->f2.empty() ? a->i4.empty()
                                                            ? static_cast<const void*>(a->i8.data())
                                                            : a->i4.data()
                                                      : a->f2.data()
                                      : a->f4.data();
      if (!payload.empty() && std::memcmp(got, payload.data(), payload.size()) != 0)
        fail("read_npy: values differ from the data bytes, shape " + shape);
    }
  }
  const std::string name = in_npz ? "archive['indices']" : "input";
  std::string member = npy;
  if (in_npz) {
    cli::Npz npz;
    try {
      npz = cli::parse_npz(npz_of(npy), "archive", {"indices"});
    } catch (const invalid_argument& e) {
      fail(std::string("parse_npz refused a well-formed stored archive: ") + e.what());
    }
    if (npz.members.count("indices") == 0 || npz.members.at("indices") != npy)
      fail("parse_npz: member 'indices' lost or changed");
    member = npz.members.at("indices");
  }
  try {
    const cli::IntArray a = cli::parse_int_npy(name, member);
    check_int_array(a);
    if (!tool_ok) fail("parse_int_npy accepted descr '" + descr + "' shape " + shape);
    if (a.shape != want_shape)
      fail("parse_int_npy: shape " + cli::shape_str(a.shape) + " for " + shape);
  } catch (const invalid_argument& e) {
    expect_named(e, name);
    if (tool_ok && !tool_may_fail)
      fail("parse_int_npy refused descr '" + descr + "' shape " + shape + ": " + e.what());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    library_reader(bytes);
    tool_parsers(bytes);
    if (size >= 1 && data[0] != 0x93 && data[0] != 'P') synthesised(data, size);
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  return 0;
}
