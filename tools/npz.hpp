// In-memory parsers of the files `sparse-attn attend --method user_mask` reads: integer/bool .npy
// arrays and stored (np.savez) .npz archives. No file I/O here, so fuzz/fuzz_npy.cpp can drive them
// with arbitrary bytes; every malformed input throws sparse_attn::invalid_argument.
#pragma once
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "check.hpp"
#include "sparse_attn/io/npy.hpp"

namespace sparse_attn::cli {

inline std::string shape_str(const std::vector<index_t>& shape) {
  return io::detail::npy_shape_str(shape);
}

/// A rank-1 integer array of the mask, widened to int64. `name` says where it came from.
struct IntArray {
  std::string name;
  std::vector<index_t> shape;
  std::vector<std::int64_t> values;
  index_t size() const { return static_cast<index_t>(values.size()); }
};

constexpr const char* kIntDtypes =
    "'<i4' (int32), '<i8' (int64), '<i2', '|i1', '<u2', '<u4', '<u8', '|u1' (uint8), '|b1' "
    "(bool)";

/// Parses an integer or bool .npy held in memory (versions 1.0-3.0, little-endian, C order).
inline IntArray parse_int_npy(const std::string& name, const std::string& b) {
  check(b.size() >= 6 && b.compare(0, 6, std::string("\x93NUMPY", 6)) == 0, name,
        ": not an .npy file (bad magic; expected \\x93NUMPY)");
  check(b.size() >= 8, name, ": truncated file: missing format version");
  const int major = static_cast<unsigned char>(b[6]), minor = static_cast<unsigned char>(b[7]);
  check(major >= 1 && major <= 3 && minor == 0, name, ": unsupported .npy format version ", major,
        ".", minor, "; supported: 1.0, 2.0, 3.0");
  const std::size_t len_bytes = major == 1 ? 2 : 4, begin = 8 + len_bytes;
  check(b.size() >= begin, name, ": truncated file: missing header length");
  std::size_t header_len = 0;
  for (std::size_t i = 0; i < len_bytes; ++i)
    header_len |= std::size_t{static_cast<unsigned char>(b[8 + i])} << (8 * i);
  check(header_len <= b.size() - begin, name, ": truncated file: header needs ", header_len,
        " bytes, only ", b.size() - begin, " present");
  const std::string header = b.substr(begin, header_len);
  IntArray a;
  a.name = name;
  std::string descr;
  bool fortran = false;
  io::detail::NpyHeaderParser(name, header).parse(descr, fortran, a.shape);

  check(!(descr.size() >= 2 && descr[0] == '>' && descr.back() != '1'), name,
        ": big-endian dtype '", descr,
        "' is not supported; save little-endian (numpy: arr.astype(arr.dtype.newbyteorder('<')))");
  const bool known = descr.size() == 3 && std::strchr("<|=>", descr[0]) != nullptr &&
                     std::strchr("iub", descr[1]) != nullptr &&
                     std::strchr("1248", descr[2]) != nullptr &&
                     (descr[1] != 'b' || descr[2] == '1');
  check(known, name, ": unsupported dtype '", descr, "'; allowed: ", kIntDtypes);
  check(
      !fortran, name,
      ": fortran_order=True is not supported; save a C-order array (numpy: np.ascontiguousarray)");
  const char kind = descr[1];
  const std::size_t item = static_cast<std::size_t>(descr[2] - '0');

  // The library's overflow-checked extent (negative dimensions, element or byte counts past
  // 2^63 - 1, more than 64 dimensions), so both readers accept exactly the same shapes.
  const io::detail::NpyExtent extent = io::detail::npy_extent(name, a.shape, item);
  const std::size_t count = extent.count, bytes = extent.bytes;
  const std::size_t have = b.size() - begin - header_len;  // header_len <= b.size() - begin
  check(have >= bytes, name, ": truncated data: shape ", shape_str(a.shape), " dtype '", descr,
        "' needs ", bytes, " bytes, only ", have, " present");
  check(have == bytes, name, ": unexpected trailing bytes after ", bytes, " data bytes (shape ",
        shape_str(a.shape), ", dtype '", descr, "')");
  a.values.resize(count);
  const auto* p = reinterpret_cast<const unsigned char*>(b.data()) + begin + header_len;
  for (std::size_t i = 0; i < count; ++i, p += item) {
    std::uint64_t u = 0;
    for (std::size_t byte = 0; byte < item; ++byte) u |= std::uint64_t{p[byte]} << (8 * byte);
    std::int64_t x = 0;
    if (kind == 'b') {
      x = u != 0 ? 1 : 0;
    } else if (kind == 'i' && item < 8) {  // sign-extend
      const std::uint64_t sign = std::uint64_t{1} << (8 * item - 1);
      x = static_cast<std::int64_t>(u ^ sign) - static_cast<std::int64_t>(sign);
    } else {
      check(
          kind == 'i' || u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
          name, ": entry ", i, " = ", u, " does not fit int64");
      std::memcpy(&x, &u, sizeof x);
    }
    a.values[i] = x;
  }
  return a;
}

// CRC-32 (IEEE 802.3, as zip stores it).
inline std::uint32_t crc32(const std::string& s) {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t n = 0; n < 256; ++n) {
      std::uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  std::uint32_t c = 0xFFFFFFFFu;
  for (unsigned char ch : s) c = table[(c ^ ch) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

/// The members of a .npz (zip) archive: every name, and the bytes of those in `wanted` (member
/// names without ".npy"). Only stored (uncompressed) members are read, as np.savez writes them;
/// zip64 records are understood; CRC-32 is checked.
struct Npz {
  std::vector<std::string> names;
  std::map<std::string, std::string> members;
};
/// `z`: the archive's bytes; `where` names it in messages (e.g. "--mask-bsr FILE.npz").
inline Npz parse_npz(const std::string& z, const std::string& where,
                     const std::vector<std::string>& wanted) {
  auto need = [&](std::uint64_t off, std::uint64_t n) {
    check(off <= z.size() && n <= z.size() - off, where,
          ": truncated or corrupt .npz (zip) archive: a record at byte ", off,
          " runs past the end of the file");
  };
  auto rd = [&](std::uint64_t off, int n) {
    need(off, static_cast<std::uint64_t>(n));
    std::uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i)
      v = (v << 8) | static_cast<unsigned char>(z[static_cast<std::size_t>(off) + i]);
    return v;
  };
  // End of central directory: 22 bytes plus a comment of at most 65535, so search the tail.
  std::uint64_t eocd = std::numeric_limits<std::uint64_t>::max();
  if (z.size() >= 22)
    for (std::uint64_t p = z.size() - 22;; --p) {
      if (rd(p, 4) == 0x06054b50) {
        eocd = p;
        break;
      }
      if (p == 0 || z.size() - p >= 22 + 65535) break;
    }
  check(eocd != std::numeric_limits<std::uint64_t>::max(), where,
        ": not a .npz (zip) archive (no end-of-central-directory record); write it with "
        "np.savez, or pass .npy files with --mask-offsets/--mask-indices");
  std::uint64_t entries = rd(eocd + 10, 2), cd_off = rd(eocd + 16, 4);
  if (entries == 0xFFFF || cd_off == 0xFFFFFFFF) {  // zip64: the locator precedes the record
    check(eocd >= 20 && rd(eocd - 20, 4) == 0x07064b50, where,
          ": corrupt zip64 archive (no zip64 end-of-central-directory locator)");
    const std::uint64_t z64 = rd(eocd - 20 + 8, 8);
    check(rd(z64, 4) == 0x06064b50, where, ": corrupt zip64 end-of-central-directory record");
    entries = rd(z64 + 32, 8);
    cd_off = rd(z64 + 48, 8);
  }
  Npz npz;
  std::uint64_t p = cd_off;
  for (std::uint64_t e = 0; e < entries; ++e) {
    check(rd(p, 4) == 0x02014b50, where, ": corrupt zip central directory at byte ", p);
    const std::uint64_t flags = rd(p + 8, 2), method = rd(p + 10, 2), crc = rd(p + 16, 4);
    std::uint64_t csize = rd(p + 20, 4), usize = rd(p + 24, 4), local = rd(p + 42, 4);
    const std::uint64_t nlen = rd(p + 28, 2), xlen = rd(p + 30, 2), clen = rd(p + 32, 2);
    need(p + 46, nlen + xlen);
    const std::string name =
        z.substr(static_cast<std::size_t>(p + 46), static_cast<std::size_t>(nlen));
    // zip64 extra field (id 1): the 8-byte sizes / offset whose 4-byte fields read 0xFFFFFFFF.
    for (std::uint64_t x = p + 46 + nlen; x + 4 <= p + 46 + nlen + xlen;) {
      const std::uint64_t id = rd(x, 2), len = rd(x + 2, 2);
      std::uint64_t f = x + 4;
      if (id == 1) {
        // Each 8-byte value must lie inside this extra field (and so inside the record), not
        // be taken from whatever follows it.
        auto zip64_value = [&]() {
          check(f + 8 <= x + 4 + len && f + 8 <= p + 46 + nlen + xlen, where,
                ": corrupt zip64 extra field at byte ", x, " (", len,
                " bytes, too short for the sizes it must hold)");
          const std::uint64_t v = rd(f, 8);
          f += 8;
          return v;
        };
        if (usize == 0xFFFFFFFF) usize = zip64_value();
        if (csize == 0xFFFFFFFF) csize = zip64_value();
        if (local == 0xFFFFFFFF) local = zip64_value();
      }
      x += 4 + len;
    }
    p += 46 + nlen + xlen + clen;
    std::string shown = name;  // names go into one-line error messages: printable ASCII only
    for (char& c : shown)
      if (c < 0x20 || c > 0x7e) c = '?';
    npz.names.push_back(shown);
    const std::string key = name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0
                                ? name.substr(0, name.size() - 4)
                                : name;
    bool want = false;
    for (const std::string& w : wanted) want = want || w == key;
    if (!want) continue;  // other members (e.g. scipy's 'format', 'shape') are not read
    const std::string mname = where + "['" + key + "']";
    check(npz.members.count(key) == 0, mname, ": the archive holds two members named '", name, "'");
    check((flags & 1) == 0, mname, ": encrypted zip members are not supported");
    check(method == 0, mname, ": member '", name, "' is compressed (zip method ", method,
          method == 8 ? ", deflate, as np.savez_compressed writes" : "",
          "); only stored members are read: save with np.savez (not np.savez_compressed), or pass "
          ".npy files with --mask-offsets/--mask-indices [--mask-full]");
    check(csize == usize, mname, ": stored member has compressed size ", csize,
          " != uncompressed size ", usize);
    check(rd(local, 4) == 0x04034b50, mname, ": corrupt zip (no local header at byte ", local, ")");
    const std::uint64_t data = local + 30 + rd(local + 26, 2) + rd(local + 28, 2);
    need(data, usize);
    std::string bytes = z.substr(static_cast<std::size_t>(data), static_cast<std::size_t>(usize));
    check(crc32(bytes) == crc, mname, ": CRC-32 mismatch (corrupt archive)");
    npz.members[key] = std::move(bytes);
  }
  return npz;
}

}  // namespace sparse_attn::cli
