/// @file
/// NumPy .npy files (https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html):
/// read format versions 1.0, 2.0 and 3.0; write 1.0 (2.0 only if the header outgrows 64 KiB).
/// Little-endian, C order only. dtypes: '<f4' (float32), '<f2' (float16), '<i4', '<i8'.
/// NumPy has no bfloat16: bf16 data travels as float32 and is rounded to bf16 by the consumer
/// (the `sparse-attn` tool's `--kv-dtype bf16` rounds K/V to nearest even before the kernel).
/// Every failure throws sparse_attn::invalid_argument("<path>: <what was wrong>"), I/O errors
/// included (std::bad_alloc aside). Not included by sparse_attn.hpp. The functions share no
/// state: concurrent calls on distinct files are safe.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_WIN32)
#include <process.h>
#else
#include <unistd.h>
#endif

#include "sparse_attn/core/dtype.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
/// NumPy .npy reading and writing.
namespace io {

/// The element types the .npy reader and writer handle.
enum class NpyDtype {
  f4,  ///< '<f4', float32 (float).
  f2,  ///< '<f2', float16 (fp16).
  i4,  ///< '<i4', int32.
  i8   ///< '<i8', int64.
};

/// The descr string NumPy writes for a dtype ("<f4", ...).
/// @param t the dtype.
/// @return "<f4", "<f2", "<i4" or "<i8" ("?" outside the enum); a static string.
inline const char* npy_descr(NpyDtype t) {
  switch (t) {
    case NpyDtype::f4:
      return "<f4";
    case NpyDtype::f2:
      return "<f2";
    case NpyDtype::i4:
      return "<i4";
    case NpyDtype::i8:
      return "<i8";
  }
  return "?";
}
/// The descr with its NumPy name, for messages.
/// @param t the dtype.
/// @return e.g. "'<f4' (float32)" ("?" outside the enum); a static string.
inline const char* npy_dtype_label(NpyDtype t) {
  switch (t) {
    case NpyDtype::f4:
      return "'<f4' (float32)";
    case NpyDtype::f2:
      return "'<f2' (float16)";
    case NpyDtype::i4:
      return "'<i4' (int32)";
    case NpyDtype::i8:
      return "'<i8' (int64)";
  }
  return "?";
}

/// The NpyDtype stored for C++ element type T (float, fp16, int32_t, int64_t).
/// @tparam T the element type; any other type is a compile error.
/// @return its dtype.
template <class T>
constexpr NpyDtype npy_dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return NpyDtype::f4;
  else if constexpr (std::is_same_v<T, fp16>)
    return NpyDtype::f2;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return NpyDtype::i4;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return NpyDtype::i8;
  else
    static_assert(sizeof(T) == 0, "npy: element type must be float, fp16, int32_t or int64_t");
}

/// @param t the dtype.
/// @return its element size in bytes (2, 4 or 8).
inline std::size_t npy_itemsize(NpyDtype t) {
  return (t == NpyDtype::f2) ? 2 : (t == NpyDtype::f4 || t == NpyDtype::i4) ? 4 : 8;
}

namespace detail {

/// NumPy's limit on the number of dimensions (NPY_MAXDIMS: 32 before NumPy 2.0, 64 since).
inline constexpr std::size_t kNpyMaxDims = 64;

/// The largest size in bytes an array may have: it must be an object size (PTRDIFF_MAX, which
/// also bounds std::vector::max_size) and an index_t (element counts, file offsets).
/// 2^63 - 1 on 64-bit targets.
inline constexpr std::uint64_t kNpyMaxBytes =
    static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()) <
            static_cast<std::uint64_t>(std::numeric_limits<index_t>::max())
        ? static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max())
        : static_cast<std::uint64_t>(std::numeric_limits<index_t>::max());

/// "(2, 3, 4)", as NumPy prints shapes ("(5,)" for rank 1, "()" for rank 0).
inline std::string npy_shape_str(const std::vector<index_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

/// Element count and size in bytes of an array.
struct NpyExtent {
  std::size_t count = 0;
  std::size_t bytes = 0;
};

/// The extent of `shape` with `itemsize`-byte elements, checked the way NumPy checks when it
/// creates an array: at most kNpyMaxDims dimensions, each >= 0, and the product of the nonzero
/// dimensions times the itemsize at most kNpyMaxBytes. Zero dimensions are skipped in that
/// product, so the verdict does not depend on where a zero stands: (0, 2^62, 4) of float32 is
/// refused like (2^62, 4, 0), since NumPy cannot create either. Every partial product is checked
/// before it is formed (x * d <= max  <=>  d <= max / x), so nothing wraps around 2^63 or 2^64.
/// Throws sparse_attn::invalid_argument("<where>: ...").
inline NpyExtent npy_extent(const std::string& where, const std::vector<index_t>& shape,
                            std::size_t itemsize) {
  // Messages are built only on failure (NpyArray::size() runs this on every call).
  auto fail = [&](const auto&... what) {
    raise_invalid_argument(sparse_attn::detail::concat(where, ": ", what...));
  };
  if (shape.size() > kNpyMaxDims)
    fail("shape has ", shape.size(), " dimensions; at most ", kNpyMaxDims,
         " are allowed (NumPy's limit)");
  bool empty = false;
  std::uint64_t bytes = itemsize;  // itemsize x the nonzero dimensions so far
  for (index_t d : shape) {
    if (d < 0)
      fail("shape ", npy_shape_str(shape), " has a negative dimension ", d,
           "; dimensions must be >= 0");
    if (d == 0) {
      empty = true;
      continue;
    }
    if (static_cast<std::uint64_t>(d) > kNpyMaxBytes / bytes)
      fail("shape ", npy_shape_str(shape), " of ", itemsize,
           "-byte elements is too large: its size in bytes exceeds the largest array size (the "
           "element or byte count would overflow); an array may hold at most ",
           kNpyMaxBytes, " bytes");
    bytes *= static_cast<std::uint64_t>(d);
  }
  NpyExtent e;
  e.bytes = empty ? 0 : static_cast<std::size_t>(bytes);
  e.count = e.bytes / itemsize;
  return e;
}

}  // namespace detail

/// A loaded array. Exactly one of the value vectors is filled, the one matching `dtype`.
struct NpyArray {
  std::string path;               ///< The file it was read from (prefix of error messages).
  NpyDtype dtype = NpyDtype::f4;  ///< The stored element type.
  std::vector<index_t> shape;  ///< Dimensions, C order; () for a 0-d array.
  std::vector<float> f4;          ///< The values when dtype is f4, else empty.
  std::vector<fp16> f2;           ///< The values when dtype is f2, else empty.
  std::vector<std::int32_t> i4;   ///< The values when dtype is i4, else empty.
  std::vector<std::int64_t> i8;   ///< The values when dtype is i8, else empty.

  /// The element count; throws (naming `path`) if `shape` could not be an array's (see
  /// detail::npy_extent), which never happens for an array read_npy returned.
  /// @return the product of the dimensions (1 for a 0-d array). O(rank).
  /// @throws sparse_attn::invalid_argument for an impossible shape (edited by the caller).
  index_t size() const {
    return static_cast<index_t>(detail::npy_extent(path, shape, npy_itemsize(dtype)).count);
  }
  /// @return the number of dimensions.
  std::size_t rank() const { return shape.size(); }
  /// @return the dtype's descr ("<f4", ...).
  const char* descr() const { return npy_descr(dtype); }

  /// The values when stored as T; throws if the file holds another dtype.
  /// @tparam T float, fp16, int32_t or int64_t.
  /// @return a reference to the matching vector (no copy).
  /// @throws sparse_attn::invalid_argument when dtype is not T's.
  template <class T>
  const std::vector<T>& values() const {
    require(dtype == npy_dtype_of<T>(), path.c_str(), "dtype is '", descr(), "', expected '",
            npy_descr(npy_dtype_of<T>()), "'");
    if constexpr (std::is_same_v<T, float>)
      return f4;
    else if constexpr (std::is_same_v<T, fp16>)
      return f2;
    else if constexpr (std::is_same_v<T, std::int32_t>)
      return i4;
    else
      return i8;
  }

  /// float32 copy of a floating-point array ('<f4' or '<f2'); integer arrays are rejected.
  /// @return the values widened to float (exact for fp16); allocates a copy.
  /// @throws sparse_attn::invalid_argument for an integer dtype; std::bad_alloc.
  std::vector<float> to_float() const {
    if (dtype == NpyDtype::f4) return f4;
    require(dtype == NpyDtype::f2, path.c_str(), "dtype '", descr(),
            "' is not floating point; allowed here: '<f4' (float32), '<f2' (float16)");
    std::vector<float> out(f2.size());
    for (std::size_t i = 0; i < f2.size(); ++i) out[i] = static_cast<float>(f2[i]);
    return out;
  }

  /// "(2, 3, 4)", as NumPy prints shapes.
  /// @return the shape as text ("(5,)" for rank 1, "()" for rank 0).
  std::string shape_str() const { return detail::npy_shape_str(shape); }

  /// Throws unless the array has exactly `rank` dimensions; `what` names it ("Q", "index list").
  /// @param want the required rank.
  /// @param what the array's role, for the message.
  /// @param layout the expected layout, for the message (e.g. "[heads, tokens, dim]").
  /// @throws sparse_attn::invalid_argument when rank() != want.
  void require_rank(std::size_t want, const char* what, const char* layout) const {
    require(shape.size() == want, path.c_str(), what, " must have rank ", want, " ", layout,
            ", got shape ", shape_str(), " (rank ", shape.size(), ")");
  }
};

namespace detail {

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

/// Parser for the header: a Python dict literal with keys 'descr', 'fortran_order', 'shape'.
class NpyHeaderParser {
 public:
  NpyHeaderParser(const std::string& path, const std::string& text) : path_(path), s_(text) {}

  void parse(std::string& descr, bool& fortran, std::vector<index_t>& shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    skip_ws();
    expect('{');
    while (true) {
      skip_ws();
      if (peek() == '}') break;
      const std::string key = parse_string();
      skip_ws();
      expect(':');
      skip_ws();
      if (key == "descr") {
        if (peek() != '\'' && peek() != '"')
          fail("unsupported dtype (structured or non-string 'descr')");
        descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        fortran = parse_bool();
        have_fortran = true;
      } else if (key == "shape") {
        shape = parse_shape();
        have_shape = true;
      } else {
        fail("unexpected header key '", key, "'; expected 'descr', 'fortran_order', 'shape'");
      }
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      skip_ws();
      if (peek() != '}') fail("malformed header: expected ',' or '}' at offset ", pos_);
    }
    ++pos_;
    skip_ws();
    if (pos_ != s_.size()) fail("malformed header: trailing characters after '}'");
    if (!have_descr || !have_fortran || !have_shape)
      fail("header lacks ", !have_descr     ? "'descr'"
                            : !have_fortran ? "'fortran_order'"
                                            : "'shape'");
  }

 private:
  template <class... A>
  [[noreturn]] void fail(const A&... a) const {
    raise_invalid_argument(sparse_attn::detail::concat(path_, ": ", a...));
  }
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }
  void expect(char c) {
    if (peek() != c) fail("malformed header: expected '", c, "' at offset ", pos_);
    ++pos_;
  }
  std::string parse_string() {
    const char q = peek();
    if (q != '\'' && q != '"') fail("malformed header: expected a quoted string at offset ", pos_);
    const std::size_t end = s_.find(q, pos_ + 1);
    if (end == std::string::npos) fail("malformed header: unterminated string");
    std::string r = s_.substr(pos_ + 1, end - pos_ - 1);
    pos_ = end + 1;
    return r;
  }
  bool parse_bool() {
    if (s_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return true;
    }
    if (s_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return false;
    }
    fail("malformed header: 'fortran_order' must be True or False");
  }
  /// A Python tuple of integers. Negative entries are returned (npy_extent refuses them with the
  /// whole shape in the message); entries beyond int64 and more than kNpyMaxDims entries are
  /// refused here, before the vector can grow with the header.
  std::vector<index_t> parse_shape() {
    std::vector<index_t> dims;
    expect('(');
    while (true) {
      skip_ws();
      if (peek() == ')') break;
      const std::size_t begin = pos_;
      const bool negative = peek() == '-';
      if (negative) ++pos_;
      if (peek() < '0' || peek() > '9')
        fail("malformed header: shape entries must be integers (offset ", pos_, ")");
      if (dims.size() == kNpyMaxDims)
        fail("shape has more than ", kNpyMaxDims, " dimensions; at most ", kNpyMaxDims,
             " are allowed (NumPy's limit)");
      // Accumulate the magnitude as uint64 and refuse it above 2^63 - 1 (the bound holds for the
      // negative side too: -(2^63) is refused as a dimension anyway).
      std::uint64_t magnitude = 0;
      bool too_large = false;
      constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<index_t>::max());
      while (peek() >= '0' && peek() <= '9') {
        const std::uint64_t digit = static_cast<std::uint64_t>(peek() - '0');
        if (magnitude > (kMax - digit) / 10) too_large = true;
        if (!too_large) magnitude = magnitude * 10 + digit;
        ++pos_;
      }
      if (too_large)
        fail("shape entry ", s_.substr(begin, std::min<std::size_t>(pos_ - begin, 40)),
             pos_ - begin > 40 ? "..." : "",
             " does not fit in int64; dimensions must be in [0, 2^63 - 1]");
      const index_t v = static_cast<index_t>(magnitude);
      if (peek() == 'L') ++pos_;  // Python 2 long suffix
      dims.push_back(negative ? -v : v);
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() != ')') fail("malformed header: expected ',' or ')' in shape");
    }
    ++pos_;
    return dims;
  }

  const std::string& path_;
  const std::string& s_;
  std::size_t pos_ = 0;
};

inline std::string errno_text(int err) { return std::generic_category().message(err); }

inline void write_all(std::FILE* f, const void* data, std::size_t n, const std::string& path) {
  if (n != 0 && std::fwrite(data, 1, n, f) != n) {
    const int err = errno;
    raise_invalid_argument(sparse_attn::detail::concat(path, ": write failed: ", errno_text(err)));
  }
}

inline std::string npy_header(NpyDtype dtype, const std::vector<index_t>& shape) {
  std::string dict =
      std::string("{'descr': '") + npy_descr(dtype) + "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) dict += (i ? ", " : "") + std::to_string(shape[i]);
  dict += shape.size() == 1 ? ",), }" : "), }";
  // Pad with spaces + '\n' so magic + version + length field + dict is a multiple of 64 bytes.
  const bool v2 = dict.size() + 1 + 10 > 65535;
  const std::size_t prefix = v2 ? 12 : 10;
  const std::size_t total = (prefix + dict.size() + 1 + 63) / 64 * 64;
  dict.append(total - prefix - dict.size() - 1, ' ');
  dict.push_back('\n');
  std::string out("\x93NUMPY", 6);
  out.push_back(static_cast<char>(v2 ? 2 : 1));
  out.push_back('\0');
  const std::uint32_t len = static_cast<std::uint32_t>(dict.size());
  for (std::size_t b = 0; b < (v2 ? 4u : 2u); ++b)
    out.push_back(static_cast<char>((len >> (8 * b)) & 0xff));
  return out + dict;
}

inline std::string tmp_path_for(const std::string& path) {
#if defined(_WIN32)
  const long pid = static_cast<long>(_getpid());
#else
  const long pid = static_cast<long>(getpid());
#endif
  return path + ".tmp." + std::to_string(pid);
}

}  // namespace detail

/// Reads an .npy file. Validates magic, version, header, dtype (one of `allowed`), byte order,
/// C order, the shape (detail::npy_extent: no negative dimension, no element or byte count past
/// 2^63 - 1) and that the data is exactly size * itemsize bytes (truncated or over-long files are
/// rejected). Nothing is allocated beyond what the file holds: sizes are checked against the file
/// size first, and where it is unknown (a pipe) the data is read in bounded chunks.
/// @param path the file (a regular file, or a pipe / character device).
/// @param allowed the dtypes accepted (default: all four); '=' byte order is taken as '<'.
/// @return the array.
/// @throws sparse_attn::invalid_argument (message "<path>: ...") when the file is a directory,
///         cannot be opened or read, has a bad magic, an unsupported version, a header longer
///         than 16 MiB or malformed, a big-endian or not-allowed dtype, fortran_order True, an
///         impossible shape, or data that is truncated or followed by trailing bytes;
///         std::bad_alloc. O(file size).
inline NpyArray read_npy(const std::string& path,
                         std::initializer_list<NpyDtype> allowed = {NpyDtype::f4, NpyDtype::f2,
                                                                    NpyDtype::i4, NpyDtype::i8}) {
  using detail::errno_text;
  auto fail = [&](const auto&... a) {
    raise_invalid_argument(sparse_attn::detail::concat(path, ": ", a...));
  };
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail("is a directory, expected an .npy file");
  errno = 0;
  detail::FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) {
    const int err = errno;
    fail("cannot open: ", err ? errno_text(err) : std::string("unknown error"));
  }
  // Unknown (ec set) for a pipe or a character device: then only the reads themselves bound what
  // is taken from the header.
  const std::uintmax_t file_size = std::filesystem::file_size(path, ec);
  const bool size_known = !ec;
  // Bytes of the file after the first `offset` (0 if it shrank under us).
  auto bytes_after = [&](std::uintmax_t offset) {
    return file_size > offset ? file_size - offset : std::uintmax_t{0};
  };
  auto read_exact = [&](void* dst, std::size_t n, const char* what) {
    const std::size_t got = n ? std::fread(dst, 1, n, f.get()) : 0;
    if (got != n) {
      if (std::ferror(f.get())) fail("read error in ", what);
      fail("truncated file: ", what, " needs ", n, " bytes, only ", got, " present");
    }
  };

  unsigned char pre[8];
  const std::size_t got = std::fread(pre, 1, 8, f.get());
  if (got < 6 || std::memcmp(pre, "\x93NUMPY", 6) != 0)
    fail("not an .npy file (bad magic; expected \\x93NUMPY)");
  if (got < 8) fail("truncated file: missing format version");
  const int major = pre[6], minor = pre[7];
  if (major < 1 || major > 3 || minor != 0)
    fail("unsupported .npy format version ", major, ".", minor, "; supported: 1.0, 2.0, 3.0");
  std::size_t header_len = 0;
  if (major == 1) {
    unsigned char l[2];
    read_exact(l, 2, "header length");
    header_len = std::size_t{l[0]} | (std::size_t{l[1]} << 8);
  } else {
    unsigned char l[4];
    read_exact(l, 4, "header length");
    header_len = std::size_t{l[0]} | (std::size_t{l[1]} << 8) | (std::size_t{l[2]} << 16) |
                 (std::size_t{l[3]} << 24);
  }
  const std::size_t data_begin = (major == 1 ? 10 : 12) + header_len;  // header_len < 2^32
  if (header_len > (std::size_t{1} << 24))
    fail("header length ", header_len, " is implausible; at most 16 MiB (2^24 bytes) is read");
  if (size_known && header_len > bytes_after(data_begin - header_len))
    fail("truncated file: header needs ", header_len, " bytes, only ",
         bytes_after(data_begin - header_len), " present");
  std::string header(header_len, '\0');
  read_exact(header.data(), header_len, "header");

  std::string descr;
  bool fortran = false;
  NpyArray a;
  a.path = path;
  detail::NpyHeaderParser(path, header).parse(descr, fortran, a.shape);

  if (descr.size() >= 2 && descr[0] == '>')
    fail("big-endian dtype '", descr, "' is not supported; save little-endian (e.g. '<",
         descr.substr(1), "'; numpy: arr.astype(arr.dtype.newbyteorder('<')))");
  std::string norm = descr;
  if (norm.size() >= 2 && norm[0] == '=') norm[0] = '<';  // native order; this reader is LE-only
  bool known = false;
  for (NpyDtype t : allowed)
    if (norm == npy_descr(t)) {
      a.dtype = t;
      known = true;
    }
  if (!known) {
    std::string list;
    for (NpyDtype t : allowed) list += (list.empty() ? "" : ", ") + std::string(npy_dtype_label(t));
    fail("unsupported dtype '", descr, "'; allowed: ", list);
  }
  if (fortran)
    fail("fortran_order=True is not supported; save a C-order array (numpy: np.ascontiguousarray)");

  const std::size_t item = npy_itemsize(a.dtype);
  const detail::NpyExtent extent = detail::npy_extent(path, a.shape, item);
  const std::size_t count = extent.count, bytes = extent.bytes;
  // Compare sizes, never data_begin + bytes: that sum can wrap (bytes is up to 2^63 - 1).
  if (size_known && bytes_after(data_begin) != bytes) {
    if (bytes_after(data_begin) < bytes)
      fail("truncated data: shape ", a.shape_str(), " dtype '", descr, "' needs ", bytes,
           " bytes, only ", bytes_after(data_begin), " present");
    fail("unexpected trailing bytes after ", bytes, " data bytes (shape ", a.shape_str(),
         ", dtype '", descr, "'); the file holds ", bytes_after(data_begin), " data bytes");
  }
  auto read_values = [&](auto& vec) {
    using T = typename std::decay_t<decltype(vec)>::value_type;
    static_assert(sizeof(T) == 1 || sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);
    // The vector grows by at most 1 MiB per read (geometrically in capacity), so a header that
    // claims more than a pipe delivers fails as truncated after reading what is there.
    if (size_known) vec.reserve(count);
    constexpr std::size_t kChunk = (std::size_t{1} << 20) / sizeof(T);
    while (vec.size() < count) {
      const std::size_t done = vec.size(), take = std::min(kChunk, count - done);
      vec.resize(done + take);
      const std::size_t n =
          std::fread(reinterpret_cast<char*>(vec.data() + done), 1, take * sizeof(T), f.get());
      if (n != take * sizeof(T)) {
        if (std::ferror(f.get())) fail("read error in data");
        fail("truncated data: shape ", a.shape_str(), " dtype '", descr, "' needs ", bytes,
             " bytes, only ", done * sizeof(T) + n, " present");
      }
    }
  };
  switch (a.dtype) {
    case NpyDtype::f4:
      read_values(a.f4);
      break;
    case NpyDtype::f2:
      read_values(a.f2);
      break;
    case NpyDtype::i4:
      read_values(a.i4);
      break;
    case NpyDtype::i8:
      read_values(a.i8);
      break;
  }
  if (std::fgetc(f.get()) != EOF)
    fail("unexpected trailing bytes after ", bytes, " data bytes (shape ", a.shape_str(),
         ", dtype '", descr, "')");
  static_assert(sizeof(fp16) == 2, "fp16 must be 2 bytes");
  return a;
}

/// Writes an .npy (format 1.0) to exactly `path` (no temp file; see write_npy for that).
/// A failure may leave a partial file at `path`.
/// @tparam T float, fp16, int32_t or int64_t.
/// @param path the file, created or truncated.
/// @param data the product of `shape` elements in C order (may be null when that is 0).
/// @param shape the dimensions, each >= 0.
/// @throws sparse_attn::invalid_argument when the shape is impossible (see NpyArray::size()),
///         data is null for a non-empty array, or opening, writing or closing fails.
template <class T>
void write_npy_direct(const std::string& path, const T* data, const std::vector<index_t>& shape) {
  constexpr NpyDtype dt = npy_dtype_of<T>();
  // A shape whose byte count overflows would write a wrapped (short) count of bytes under a
  // header that claims the full shape: refused like read_npy refuses reading it.
  const detail::NpyExtent extent = detail::npy_extent(path, shape, sizeof(T));
  require(extent.count == 0 || data != nullptr, path.c_str(), "null data for a non-empty array");
  errno = 0;
  detail::FilePtr f(std::fopen(path.c_str(), "wb"));
  if (!f) {
    const int err = errno;
    raise_invalid_argument(sparse_attn::detail::concat(
        path, ": cannot open for writing: ", err ? detail::errno_text(err) : "unknown error"));
  }
  const std::string header = detail::npy_header(dt, shape);
  detail::write_all(f.get(), header.data(), header.size(), path);
  detail::write_all(f.get(), data, extent.bytes, path);
  std::FILE* raw = f.release();
  if (std::fclose(raw) != 0) {
    const int err = errno;
    raise_invalid_argument(
        sparse_attn::detail::concat(path, ": write failed on close: ", detail::errno_text(err)));
  }
}

/// Publishes the finished temp file `tmp` as `path` (atomic rename on POSIX). Removes tmp on
/// failure.
/// @param tmp the finished temporary file.
/// @param path the destination (replaced if it exists).
/// @throws sparse_attn::invalid_argument when the rename fails.
inline void commit_tmp_file(const std::string& tmp, const std::string& path) {
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    raise_invalid_argument(sparse_attn::detail::concat(
        path, ": cannot rename temporary file into place: ", ec.message()));
  }
}

/// Writes an .npy to `path + ".tmp.<pid>"` and renames it onto `path`, so readers never see a
/// partial file and a failure leaves nothing behind (the temp file is removed).
/// @tparam T float, fp16, int32_t or int64_t.
/// @param path the destination.
/// @param data the product of `shape` elements in C order (may be null when that is 0).
/// @param shape the dimensions, each >= 0.
/// @throws as write_npy_direct() and commit_tmp_file(), with messages naming `path`. Two writers of
///         one path from one process use the same temporary name: serialise them.
template <class T>
void write_npy(const std::string& path, const T* data, const std::vector<index_t>& shape) {
  // Checked here too, so the message names `path`, not the temporary file.
  const detail::NpyExtent extent = detail::npy_extent(path, shape, sizeof(T));
  require(extent.count == 0 || data != nullptr, path.c_str(), "null data for a non-empty array");
  const std::string tmp = detail::tmp_path_for(path);
  SPARSE_ATTN_TRY {
    write_npy_direct(tmp, data, shape);
  }
  SPARSE_ATTN_CATCH_ALL {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    SPARSE_ATTN_RETHROW;
  }
  commit_tmp_file(tmp, path);
}

/// write_npy() of a vector whose size must equal the shape's element count.
/// @tparam T float, fp16, int32_t or int64_t.
/// @param path the destination.
/// @param values the elements in C order.
/// @param shape the dimensions.
/// @throws sparse_attn::invalid_argument when values.size() differs from the shape's count, or as
///         write_npy(const std::string&, const T*, const std::vector<index_t>&).
template <class T>
void write_npy(const std::string& path, const std::vector<T>& values,
               const std::vector<index_t>& shape) {
  const std::size_t n = detail::npy_extent(path, shape, sizeof(T)).count;
  require(n == values.size(), path.c_str(), "shape ", detail::npy_shape_str(shape), " holds ", n,
          " elements but ", values.size(), " values were given");
  write_npy(path, values.data(), shape);
}

}  // namespace io
SPARSE_ATTN_NAMESPACE_END
