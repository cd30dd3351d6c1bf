// The selection contract (methods/budget.hpp, selector.hpp, registry.hpp): Budget validation, the
// one CR -> count conversion and budget search, the reachability rule, and the registry (every
// method by name, its parameters, settings by name, clear errors).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <sparse_attn/reference.hpp>
#include <sparse_attn/sparse_attn.hpp>
#include <string>
#include <vector>

using namespace sparse_attn;
using methods::Budget;

namespace {

std::vector<float> contract_data(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

}  // namespace

TEST(Budget, FactoriesValidate) {
  EXPECT_NO_THROW(Budget::compression(1.0));
  EXPECT_NO_THROW(Budget::compression(10.0, 0.0));
  EXPECT_NO_THROW(Budget::count(1));
  EXPECT_NO_THROW(Budget::mass(1.0));
  EXPECT_THROW(Budget::compression(0.5), invalid_argument);
  EXPECT_THROW(Budget::compression(std::numeric_limits<double>::quiet_NaN()), invalid_argument);
  EXPECT_THROW(Budget::compression(std::numeric_limits<double>::infinity()), invalid_argument);
  EXPECT_THROW(Budget::compression(10.0, 1.0), invalid_argument);
  EXPECT_THROW(Budget::compression(10.0, -0.1), invalid_argument);
  EXPECT_THROW(Budget::count(0), invalid_argument);
  EXPECT_THROW(Budget::count(-3), invalid_argument);
  EXPECT_THROW(Budget::mass(0.0), invalid_argument);
  EXPECT_THROW(Budget::mass(1.01), invalid_argument);
  EXPECT_THROW(Budget::mass(std::numeric_limits<double>::quiet_NaN()), invalid_argument);
  // A default Budget is dense.
  const Budget b;
  EXPECT_TRUE(b.is_compression());
  EXPECT_EQ(b.target_compression(), 1.0);
  EXPECT_EQ(Budget::compression(10).str(), "cr=10");
  EXPECT_EQ(Budget::count(512).str(), "count=512");
  EXPECT_EQ(Budget::mass(0.9).str(), "mass=0.9");
}

TEST(Budget, ErrorsSayWhatIsAllowed) {
  try {
    Budget::mass(2.0);
    FAIL() << "no throw";
  } catch (const invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("(0, 1]"), std::string::npos) << e.what();
  }
  try {
    methods::require_budget_kind(Budget::mass(0.5), true, true, false, "methods::SlidingWindow");
    FAIL() << "no throw";
  } catch (const invalid_argument& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("mass"), std::string::npos) << w;
    EXPECT_NE(w.find("compression"), std::string::npos) << w;
  }
}

TEST(Budget, CountForCompressionIsTheFewestNotSparserThanAsked) {
  EXPECT_EQ(methods::count_for_compression(100, 10.0), 10);   // exact quotient stays
  EXPECT_EQ(methods::count_for_compression(101, 10.0), 11);   // ceil
  EXPECT_EQ(methods::count_for_compression(100, 1.0), 100);   // CR 1: everything
  EXPECT_EQ(methods::count_for_compression(5, 1000.0), 1);    // at least one unit
  EXPECT_EQ(methods::count_for_compression(0, 10.0), 0);      // nothing to keep
  for (index_t total : {1, 7, 100, 4097, 131072})
    for (double cr : {1.0, 1.5, 2.0, 3.0, 7.3, 10.0, 20.0}) {
      const index_t c = methods::count_for_compression(total, cr);
      ASSERT_GE(c, 1);
      ASSERT_LE(c, total);
      // Not sparser than asked, and one unit fewer would be (unless c is the floor of 1).
      EXPECT_LE(static_cast<double>(total) / static_cast<double>(c), cr + 1e-9);
      if (c > 1) {
        EXPECT_GT(static_cast<double>(total) / static_cast<double>(c - 1), cr - 1e-9);
      }
    }
}

TEST(Budget, NearestBudgetPicksTheCloserNeighbour) {
  // pairs(x) = x^2 over [1, 100], dense = 10000: CR(x) = 10000 / x^2.
  auto pairs = [](index_t x) { return x * x; };
  for (double target : {1.0, 1.7, 2.0, 5.0, 10.0, 33.0, 100.0, 5000.0, 1e6}) {
    const index_t x = methods::nearest_budget(1, 100, 10000, target, pairs);
    const double d = std::fabs(std::log(10000.0 / static_cast<double>(pairs(x)) / target));
    for (index_t y = 1; y <= 100; ++y) {
      const double dy = std::fabs(std::log(10000.0 / static_cast<double>(pairs(y)) / target));
      EXPECT_LE(d, dy + 1e-12) << "target " << target << " x " << x << " y " << y;
    }
  }
  EXPECT_EQ(methods::nearest_budget(1, 100, 10000, 1.0, pairs), 100);  // CR 1 is dense
  EXPECT_EQ(methods::nearest_budget(3, 3, 10000, 7.0, pairs), 3);      // one candidate
  EXPECT_EQ(methods::nearest_budget(1, 100, 0, 7.0, pairs), 1);        // nothing to attend
}

TEST(Budget, ReachableMeansWithinToleranceOnEitherSide) {
  const Budget b = Budget::compression(10.0);  // 10%
  EXPECT_TRUE(methods::is_reachable(b, 10.0));
  EXPECT_TRUE(methods::is_reachable(b, 9.0));
  EXPECT_TRUE(methods::is_reachable(b, 11.0));
  EXPECT_FALSE(methods::is_reachable(b, 8.78));  // block-sparse's old "reachable" answer
  EXPECT_FALSE(methods::is_reachable(b, 11.2));
  EXPECT_FALSE(methods::is_reachable(b, std::numeric_limits<double>::infinity()));
  EXPECT_TRUE(methods::is_reachable(Budget::compression(10.0, 0.5), 5.0));
  // Count and mass budgets: honoured or not.
  EXPECT_TRUE(methods::is_reachable(Budget::count(8), 123.0, true));
  EXPECT_FALSE(methods::is_reachable(Budget::count(8), 123.0, false));
  EXPECT_FALSE(methods::is_reachable(Budget::mass(0.9), 2.0, false));
}

TEST(Registry, ListsEveryMethodWithItsParameters) {
  std::set<std::string> prefill, decode;
  for (const auto& m : methods::prefill_methods()) {
    EXPECT_TRUE(prefill.insert(m.name).second) << "duplicate " << m.name;
    EXPECT_FALSE(m.summary.empty()) << m.name;
    for (const auto& p : m.params) {
      EXPECT_FALSE(p.default_value.empty()) << m.name << "." << p.name;
      EXPECT_FALSE(p.help.empty()) << m.name << "." << p.name;
    }
  }
  for (const auto& m : methods::decode_methods()) EXPECT_TRUE(decode.insert(m.name).second);
  for (const char* n : {"dense", "sliding_window", "tri_shape", "block_sparse", "vertical_slash",
                        "vertical_slash_tiled", "flex_prefill", "xattention", "user_mask"})
    EXPECT_EQ(prefill.count(n), 1u) << n;
  for (const char* n : {"dense", "streaming", "quest", "quest_head", "snapkv", "ada_snapkv", "h2o"})
    EXPECT_EQ(decode.count(n), 1u) << n;
  for (const auto& m : methods::decode_methods()) {  // quest_head: Quest's switches on
    if (m.name != "quest_head") continue;
    ASSERT_EQ(m.params.size(), 3u);
    for (const auto& p : m.params)
      EXPECT_EQ(p.default_value, p.name == "shared_floor" ? "0.2" : "true") << p.name;
  }
  EXPECT_EQ(methods::prefill_methods().front().name, "dense");
  EXPECT_EQ(methods::decode_methods().front().name, "dense");
  EXPECT_TRUE(methods::is_prefill_method("block_sparse"));
  EXPECT_FALSE(methods::is_prefill_method("quest"));
  EXPECT_TRUE(methods::is_decode_method("quest"));
}

TEST(Registry, SettingsByNameAndTheirErrors) {
  // A setting reaches the method: block_sparse with block=32 selects on 32 x 32 tiles.
  const index_t H = 2, n = 256, d = 16;
  const auto qd = contract_data(static_cast<std::size_t>(H * n * d), 1);
  const auto kd = contract_data(static_cast<std::size_t>(H * n * d), 2);
  const TensorView<const float> q(qd.data(), H, n, d), k(kd.data(), H, n, d);
  const index_t block = methods::with_prefill_method(
      "block_sparse", {{"block", "32"}}, [&](const auto& m) -> index_t {
        auto sel = m.select(q, k, Budget::compression(2.0));
        return sel.mask.shape().block_k;
      });
  EXPECT_EQ(block, 32);
  // Unknown method: the error lists the known ones.
  try {
    methods::with_prefill_method("nope", {}, [](const auto&) { return 0; });
    FAIL() << "no throw";
  } catch (const invalid_argument& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("nope"), std::string::npos) << w;
    EXPECT_NE(w.find("block_sparse"), std::string::npos) << w;
  }
  // Unknown parameter: the error names the method's parameters.
  try {
    methods::with_prefill_method("block_sparse", {{"windwo", "3"}}, [](const auto&) { return 0; });
    FAIL() << "no throw";
  } catch (const invalid_argument& e) {
    const std::string w = e.what();
    EXPECT_NE(w.find("windwo"), std::string::npos) << w;
    EXPECT_NE(w.find("block"), std::string::npos) << w;
  }
  // Unparsable value.
  EXPECT_THROW(methods::with_prefill_method("block_sparse", {{"block", "3x"}},
                                            [](const auto&) { return 0; }),
               invalid_argument);
  EXPECT_THROW(methods::with_decode_method("quest", {{"per_query_head", "maybe"}},
                                           [](const auto&) { return 0; }),
               invalid_argument);
}

// Every registered prefill method through the registry, at a target it can reach on n = 4096:
// reachable, achieved CR within 10%, and the executed mask's output equals the float64 oracle
// over the same mask.
TEST(Registry, EveryPrefillMethodMeetsAReachableTarget) {
  const index_t H = 2, n = 4096, d = 32;
  const auto qd = contract_data(static_cast<std::size_t>(H * n * d), 3);
  const auto kd = contract_data(static_cast<std::size_t>(H * n * d), 4);
  const TensorView<const float> q(qd.data(), H, n, d), k(kd.data(), H, n, d);
  for (const auto& info : methods::prefill_methods()) {
    if (info.needs_user_mask) continue;
    const double target = info.name == "dense" ? 1.0 : 4.0;
    const auto stats = methods::with_prefill_method(info.name, {}, [&](const auto& m) {
      return m.select(q, k, Budget::compression(target)).stats;
    });
    EXPECT_TRUE(stats.reachable) << info.name << " achieved " << stats.compression();
    EXPECT_NEAR(stats.compression() / target, 1.0, 0.10) << info.name;
    EXPECT_EQ(stats.target.target_compression(), target) << info.name;
    EXPECT_GE(stats.select_ms, 0.0);
  }
}
