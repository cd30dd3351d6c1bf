// libFuzzer harness for the file formats the tool reads from untrusted paths:
//   - io::read_npy (library): the input bytes written to a per-process temporary file;
//   - the tool's in-memory parsers (tools/npz.hpp): parse_int_npy and parse_npz (np.savez zip,
//     zip64, CRC-32), then parse_int_npy on every member it returns.
// Every input must either parse into a consistent array (element count = product of the shape,
// values present for exactly one dtype; an .npy read back after write_npy gives the same shape
// and bytes) or throw sparse_attn::invalid_argument whose message names the input. Any other
// exception, a crash or a sanitizer report is a finding. Build: see fuzz/CMakeLists.txt.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

void library_reader(const std::string& bytes) {
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
    return;
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    library_reader(bytes);
    tool_parsers(bytes);
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  return 0;
}
