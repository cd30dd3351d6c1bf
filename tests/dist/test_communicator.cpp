// dist::check_collectively: bad or inconsistent arguments raise the same invalid_argument on every
// rank, and no rank is left inside a collective (the barrier after each case would hang if one
// were; ctest's timeout turns a hang into a failure).
#include <sparse_attn/dist/communicator.hpp>

#include <gtest/gtest.h>

#include "same_error_everywhere.hpp"

#include <string>
#include <vector>

using namespace sparse_attn;

namespace {
// check_collectively's outcome on every rank (same_error_everywhere.hpp).
std::string outcome_everywhere(const dist::Communicator& comm, const std::vector<dist::Agreed>& agreed,
                               const std::string& local_error) {
  return same_error_everywhere(comm, [&] { dist::check_collectively(comm, "test", agreed, local_error); });
}
}  // namespace

TEST(CheckCollectively, AgreementPassesOnEveryRank) {
  dist::Communicator comm;
  EXPECT_EQ(outcome_everywhere(comm, {{"head_dim", 128}, dist::agreed_double("cr", 10.0)}, ""), "");
}

TEST(CheckCollectively, DisagreementNamesTheValueAndTheRank) {
  dist::Communicator comm;
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const std::int64_t d = comm.rank() == comm.size() - 1 ? 64 : 128;
  const std::string m = outcome_everywhere(comm, {{"heads", 8}, {"head_dim", d}}, "");
  EXPECT_EQ(m, "test: ranks disagree on head_dim: rank 0 has 128, rank " +
                   std::to_string(comm.size() - 1) + " has 64");
}

TEST(CheckCollectively, OneRanksLocalErrorReachesEveryRank) {
  dist::Communicator comm;
  const int bad = comm.size() / 2;
  const std::string local = comm.rank() == bad ? "k: 3 tokens, the shard needs >= 16" : "";
  const std::string m = outcome_everywhere(comm, {{"heads", 8}}, local);
  EXPECT_EQ(m, "test: rank " + std::to_string(bad) + ": k: 3 tokens, the shard needs >= 16");
}

TEST(CheckCollectively, LowestFailingRankWinsAndErrorsBeatDisagreement) {
  dist::Communicator comm;
  const std::string local = "rank-specific " + std::to_string(comm.rank());
  const std::string m = outcome_everywhere(comm, {{"heads", comm.rank()}}, local);
  EXPECT_EQ(m, "test: rank 0: rank-specific 0");
}

TEST(CheckCollectively, DifferentListLengthsAreADisagreement) {
  dist::Communicator comm;
  if (comm.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<dist::Agreed> agreed{{"heads", 8}};
  if (comm.rank() == 1) agreed.push_back({"extra", 1});
  const std::string m = outcome_everywhere(comm, agreed, "");
  EXPECT_EQ(m, "test: ranks disagree on the number of agreed values: rank 0 has 1, rank 1 has 2");
}

TEST(CheckCollectively, LocalErrorOfCatchesOnlyValidation) {
  EXPECT_EQ(dist::local_error_of([] {}), "");
  EXPECT_EQ(dist::local_error_of([] { raise_invalid_argument("x: bad"); }), "x: bad");
}
