// Shared by the MPI tests: runs a collective call on every rank and returns the
// sparse_attn::invalid_argument message it raised (or "" if it returned), after a barrier that
// proves no rank was left inside a collective, and checks that every rank got rank 0's message.
#pragma once
#include <sparse_attn/core/error.hpp>
#include <sparse_attn/dist/communicator.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <string>

template <class F>
std::string same_error_everywhere(const sparse_attn::dist::Communicator& comm, F&& call) {
  std::string message;
  try {
    call();
  } catch (const sparse_attn::invalid_argument& e) {
    message = e.what();
  }
  MPI_Barrier(comm.handle());
  int len0 = static_cast<int>(message.size());
  MPI_Bcast(&len0, 1, MPI_INT, 0, comm.handle());
  std::string m0 = message;
  m0.resize(static_cast<std::size_t>(len0));
  MPI_Bcast(m0.data(), len0, MPI_CHAR, 0, comm.handle());
  EXPECT_EQ(message, m0) << "rank " << comm.rank() << " raised a different message than rank 0";
  return message;
}
