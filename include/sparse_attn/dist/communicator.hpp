/// @file
/// The context-parallel layer's view of an MPI communicator, and the collective argument check
/// every distributed entry point runs before any work.
///
/// The dist/ layer is optional: it needs MPI (`mpi.h`, link MPI::MPI_CXX; CMake target
/// sparse_attn::dist) and nothing in the rest of the library includes it. See docs/DISTRIBUTED.md.
///
/// Why a collective check: a distributed call is a sequence of collectives. If one rank threw on a
/// bad argument while the others entered the first exchange, they would wait forever. So every
/// entry point first gathers, from every rank, (a) the fingerprint of its arguments (shapes,
/// options, budgets: the values that must agree) and (b) the message of its local validation, if
/// it failed. All ranks then hold the same information and raise the same
/// sparse_attn::invalid_argument, or all proceed. Two collectives, a few hundred bytes.
#pragma once
#include "sparse_attn/core/config.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

#include <mpi.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

SPARSE_ATTN_NAMESPACE_BEGIN

/// @namespace sparse_attn::dist
/// Context parallelism over MPI: one sequence's tokens split over the ranks of a communicator
/// (docs/DISTRIBUTED.md). Optional layer; include its headers explicitly.
namespace dist {

/// A non-owning view of an MPI communicator: its handle, this process's rank and the rank count.
/// Copyable; the caller keeps the MPI communicator alive (and MPI initialised) while it is used.
/// Thread safety: calls through one Communicator must come from one thread at a time (MPI's
/// MPI_THREAD_FUNNELED or higher is enough; the kernels' own threads never call MPI).
class Communicator {
 public:
  /// Wraps `comm` (default MPI_COMM_WORLD). Queries rank and size once.
  /// @param comm an intra-communicator, valid for the lifetime of this view.
  /// @throws sparse_attn::invalid_argument if MPI is not initialised or comm is MPI_COMM_NULL.
  explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    require(initialised != 0, "dist::Communicator", "MPI is not initialised (call MPI_Init first)");
    require(comm != MPI_COMM_NULL, "dist::Communicator", "comm is MPI_COMM_NULL");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  /// The MPI handle.
  /// @return the wrapped communicator.
  MPI_Comm handle() const noexcept { return comm_; }
  /// This process's rank, in [0, size()).
  /// @return the rank.
  int rank() const noexcept { return rank_; }
  /// The number of ranks.
  /// @return the size (>= 1).
  int size() const noexcept { return size_; }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

/// The MPI datatype of a C++ scalar (float, double, the fixed-width integers, std::uint16_t for
/// bf16/fp16 storage bits).
/// @tparam T the scalar type.
/// @return the matching predefined MPI datatype.
template <class T>
MPI_Datatype mpi_type() noexcept {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int32_t>) return MPI_INT32_T;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return MPI_UINT64_T;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return MPI_UINT8_T;
  else {
    static_assert(sizeof(T) == 2 && std::is_trivially_copyable_v<T>,
                  "mpi_type: float, double, int32/int64/uint64/uint8 or a 2-byte storage type");
    return MPI_UINT16_T;
  }
}

/// One named value that must be equal on every rank (a shape, an option, a budget).
struct Agreed {
  const char* name;    ///< what the value is, for the error message (e.g. "head_dim")
  std::int64_t value;  ///< the value; doubles enter bit-cast (see agreed_double)
};

/// An Agreed entry for a double, compared bit for bit (so 0.1 on one rank and 0.1f on another
/// disagree, as they should: they would select different keys).
/// @param name what the value is.
/// @param value the value.
/// @return the entry.
inline Agreed agreed_double(const char* name, double value) noexcept {
  std::int64_t bits = 0;
  static_assert(sizeof(bits) == sizeof(value));
  std::memcpy(&bits, &value, sizeof(bits));
  return {name, bits};
}

/// The collective check of a distributed entry point's arguments. Every rank of `comm` must call
/// it, with the same `where` and the same list of names (the values may differ: that is what it
/// detects). Raises the same sparse_attn::invalid_argument on every rank when
///  - some rank's `local_error` is not empty: "<where>: rank R: <local_error>" for the lowest such
///    rank R (e.g. a rank's own shard had a bad shape), or
///  - the ranks disagree on a value: "<where>: ranks disagree on <name>: rank 0 has A, rank R has
///    B" for the first such name and the lowest such rank;
/// otherwise returns on every rank. Nothing is left pending: both collectives complete on all
/// ranks before any of them throws.
/// @param comm the communicator.
/// @param where the entry point, prefix of the message.
/// @param agreed the values that must agree (same names, same count on every rank; a differing
///        count is reported as a disagreement on "the number of agreed values").
/// @param local_error this rank's validation message, empty when its arguments are valid.
/// @throws sparse_attn::invalid_argument on every rank, with the same message, as described.
/// Cost: one MPI_Allgather of sizeof(int64) x (agreed.size() + 2) bytes per rank, one
/// MPI_Allgatherv of the error texts (empty when none). Allocates O(size x agreed) bytes.
inline void check_collectively(const Communicator& comm, const char* where,
                               const std::vector<Agreed>& agreed, const std::string& local_error) {
  // Fixed-width record per rank: [count, error length, values... (padded to the max count)].
  // The count goes first so a rank with a different list is reported, not misread; a first
  // Allreduce of the count would be one more round trip for a case that is a programming error.
  const int p = comm.size();
  const std::int64_t count = static_cast<std::int64_t>(agreed.size());
  std::int64_t max_count = count;
  MPI_Allreduce(MPI_IN_PLACE, &max_count, 1, MPI_INT64_T, MPI_MAX, comm.handle());
  const std::size_t width = static_cast<std::size_t>(max_count) + 2;
  std::vector<std::int64_t> mine(width, 0), all(width * static_cast<std::size_t>(p));
  mine[0] = count;
  mine[1] = static_cast<std::int64_t>(local_error.size());
  for (std::size_t i = 0; i < agreed.size(); ++i) mine[i + 2] = agreed[i].value;
  MPI_Allgather(mine.data(), static_cast<int>(width), MPI_INT64_T, all.data(),
                static_cast<int>(width), MPI_INT64_T, comm.handle());

  // Error texts: gathered only if some rank has one (every rank sees the same lengths).
  std::vector<int> lengths(static_cast<std::size_t>(p)), offsets(static_cast<std::size_t>(p));
  int total = 0;
  for (int r = 0; r < p; ++r) {
    lengths[static_cast<std::size_t>(r)] = static_cast<int>(all[static_cast<std::size_t>(r) * width + 1]);
    offsets[static_cast<std::size_t>(r)] = total;
    total += lengths[static_cast<std::size_t>(r)];
  }
  if (total > 0) {
    std::string texts(static_cast<std::size_t>(total), '\0');
    MPI_Allgatherv(local_error.data(), static_cast<int>(local_error.size()), MPI_CHAR, texts.data(),
                   lengths.data(), offsets.data(), MPI_CHAR, comm.handle());
    for (int r = 0; r < p; ++r)
      if (lengths[static_cast<std::size_t>(r)] > 0)
        raise_invalid_argument(detail::concat(
            where, ": rank ", r, ": ",
            texts.substr(static_cast<std::size_t>(offsets[static_cast<std::size_t>(r)]),
                         static_cast<std::size_t>(lengths[static_cast<std::size_t>(r)]))));
  }
  for (int r = 1; r < p; ++r) {
    const std::int64_t* row = all.data() + static_cast<std::size_t>(r) * width;
    if (row[0] != all[0])
      raise_invalid_argument(detail::concat(where, ": ranks disagree on the number of agreed values: rank 0 has ",
                                            all[0], ", rank ", r, " has ", row[0]));
  }
  for (std::size_t i = 0; i < agreed.size(); ++i)
    for (int r = 1; r < p; ++r) {
      const std::int64_t a = all[i + 2], b = all[static_cast<std::size_t>(r) * width + i + 2];
      if (a != b)
        raise_invalid_argument(detail::concat(where, ": ranks disagree on ", agreed[i].name,
                                              ": rank 0 has ", a, ", rank ", r, " has ", b));
    }
}

/// Runs a local validation (a callable that may raise sparse_attn::invalid_argument) and returns
/// its message, or an empty string if it passed: the `local_error` of check_collectively.
/// @param validate the callable; runs on this rank only, performs no MPI calls.
/// @return the exception's what(), or "" when it returned normally.
template <class F>
std::string local_error_of(F&& validate) {
#if SPARSE_ATTN_EXCEPTIONS
  try {
    validate();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return {};
#else
  validate();  // without exceptions a local error already went to the error handler
  return {};
#endif
}

}  // namespace dist
SPARSE_ATTN_NAMESPACE_END
