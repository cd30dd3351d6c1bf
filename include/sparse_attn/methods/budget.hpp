/// @file
/// How much attention a method keeps: one Budget type for every method, the one conversion of a
/// target compression ratio (CR) to a count, the one budget search, and the one reachability rule.
///
/// A Budget is one of
///   compression(c)  a target CR c >= 1: dense pairs / kept pairs (prefill), dense (row, key) pairs
///                   / read pairs (decode selection), or tokens / kept tokens (eviction).
///                   The method picks the budget whose achieved CR is nearest to c.
///   count(n)        n >= 1 units of the method's own unit (Method::unit: tokens, blocks, pages,
///                   lines), used as given.
///   mass(p, floor, cap)
///                   p in (0, 1]: keep, per head (and per query block where the method selects per
///                   query block), the fewest units whose *estimated* attention mass reaches p,
///                   but never fewer than `floor` nor more than `cap` units (counted like
///                   count(n): the same units, forced ones included). The achieved CR then varies
///                   per head and per input; the selection's statistics report it.
///
/// Rounding, in one place:
///   * A CR that converts to a count of interchangeable units (tokens of a cache, pages) uses
///     count_for_compression(): c = ceil(total / CR), the fewest units not sparser than asked; the
///     achieved CR total / c is in (CR * (1 - 1/c), CR].
///   * A CR that needs a search over a budget whose pair count is not linear in it (sliding
///     window's W, block-sparse's k, Vertical-Slash's V/S) uses nearest_budget(): of the two
///     budgets around the target it returns the one whose CR is nearer in log ratio
///     (|log(CR / target)|; ties toward the denser one).
/// Reachability, in one place (is_reachable): a compression target is reachable iff the achieved
/// CR is within the budget's tolerance (default 10%) of it, on either side; count and mass budgets
/// are reachable iff the method could keep what was asked (no forced units above the count; for
/// mass, no forced units above the cap). Every selection result says so in
/// SelectionStats::reachable.
///
/// Everything here is a value type or a pure function: no shared state, safe to call from any
/// number of threads. See docs/METHODS.md, section "Budget".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/core/tensor.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// What a count budget counts, per method (each method's static `unit`).
enum class BudgetUnit {
  none,    ///< the method takes no count budget (dense, FlexPrefill, user masks)
  tokens,  ///< cache tokens (per KV head unless documented otherwise) or window tokens
  blocks,  ///< key blocks per query block
  pages,   ///< cache pages
  lines,   ///< Vertical-Slash vertical columns + slash diagonals
};

/// The unit's name as the registry and the tool print it ("tokens", "blocks", ...; "none").
/// @param u  the unit.
/// @return a static string (never null). O(1), no allocation, thread-safe.
inline const char* to_string(BudgetUnit u) {
  switch (u) {
    case BudgetUnit::tokens: return "tokens";
    case BudgetUnit::blocks: return "blocks";
    case BudgetUnit::pages: return "pages";
    case BudgetUnit::lines: return "lines";
    default: return "none";
  }
}

/// The default relative tolerance of a compression budget: an achieved CR within 10% of the
/// target (either side) is reachable.
inline constexpr double kDefaultCompressionTolerance = 0.10;

/// How much a method keeps: a target compression ratio, a count of the method's units, or an
/// attention-mass target (see the file comment for the rounding and reachability rules).
///
/// A small value type (a kind, two doubles and a mass budget's floor and cap): copying is free,
/// nothing is allocated, and
/// const member functions may be called from any number of threads. The factories validate
/// their arguments; a Budget is immutable afterwards.
class Budget {
 public:
  /// Which of the three ways of asking the budget holds.
  enum class Kind {
    compression,  ///< a target compression ratio (dense / kept), >= 1
    count,        ///< a whole number >= 1 of the method's units (BudgetUnit)
    mass          ///< an estimated attention-mass target p in (0, 1]
  };

  /// Dense: compression(1) with the default tolerance.
  Budget() = default;

  /// A target compression ratio.
  /// @param cr         target CR = dense pairs / kept pairs (prefill), dense (row, key) pairs /
  ///                   read pairs (decode selection) or tokens / kept tokens (eviction); finite
  ///                   and >= 1 (1 = dense).
  /// @param tolerance  relative tolerance of the reachability rule, in [0, 1): the budget is
  ///                   reachable iff |achieved / cr - 1| <= tolerance.
  /// @return the budget.
  /// @throws sparse_attn::invalid_argument if cr is not finite or < 1, or tolerance is not in
  ///         [0, 1).
  static Budget compression(double cr, double tolerance = kDefaultCompressionTolerance) {
    Budget b;
    b.kind_ = Kind::compression;
    b.value_ = cr;
    b.tolerance_ = tolerance;
    b.validate("Budget::compression");
    return b;
  }
  /// A count of the method's own units (Method::unit: tokens, blocks, pages or lines), used as
  /// given.
  /// @param n  units, >= 1 (and < 9e15, exact as a double).
  /// @return the budget.
  /// @throws sparse_attn::invalid_argument if n < 1 or n >= 9e15.
  static Budget count(index_t n) {
    Budget b;
    b.kind_ = Kind::count;
    b.value_ = static_cast<double>(n);
    b.validate("Budget::count");
    return b;
  }
  /// No cap on a mass budget: mass(p, floor) keeps as many units as the mass needs.
  static constexpr index_t kNoCap = std::numeric_limits<index_t>::max();

  /// An attention-mass target: per head (and query block, where the method selects per query
  /// block), the fewest units whose estimated attention mass reaches p, clamped to
  /// [floor, cap] units.
  ///
  /// floor and cap are in the method's unit (Method::unit) and count like count(n) does (forced
  /// units included; a method that converts tokens to pages converts them the same way): the
  /// floor keeps a head whose estimate is sharp from being starved, the cap keeps a diffuse head
  /// from turning dense. A cap below the forced units cannot be honoured: the forced units are
  /// kept and the selection is not reachable.
  /// @param p      mass fraction in (0, 1] (1 = every legal unit, i.e. dense, up to the cap).
  /// @param floor  fewest units kept, >= 0 (0: no floor).
  /// @param cap    most units kept, >= max(floor, 1) (kNoCap: no cap).
  /// @return the budget.
  /// @throws sparse_attn::invalid_argument if p is not in (0, 1] (NaN included), floor < 0 or
  ///         cap < max(floor, 1).
  static Budget mass(double p, index_t floor = 0, index_t cap = kNoCap) {
    Budget b;
    b.kind_ = Kind::mass;
    b.value_ = p;
    b.floor_ = floor;
    b.cap_ = cap;
    b.validate("Budget::mass");
    return b;
  }

  /// @return which kind of budget this is.
  Kind kind() const { return kind_; }
  /// @return true for a compression budget.
  bool is_compression() const { return kind_ == Kind::compression; }
  /// @return true for a count budget.
  bool is_count() const { return kind_ == Kind::count; }
  /// @return true for a mass budget.
  bool is_mass() const { return kind_ == Kind::mass; }
  /// @return the target CR (compression budgets; meaningless for the other kinds).
  double target_compression() const { return value_; }
  /// @return the count in the method's units (count budgets; meaningless for the other kinds).
  index_t units() const { return static_cast<index_t>(value_); }
  /// @return the mass target p (mass budgets; meaningless for the other kinds).
  double mass_target() const { return value_; }
  /// @return the relative CR tolerance of the reachability rule (compression budgets).
  double tolerance() const { return tolerance_; }
  /// @return the fewest units a mass budget keeps (0: no floor; 0 for the other kinds).
  index_t mass_floor() const { return floor_; }
  /// @return the most units a mass budget keeps (kNoCap: no cap; kNoCap for the other kinds).
  index_t mass_cap() const { return cap_; }
  /// A mass budget's unit count clamped to its floor and cap.
  /// @param units  the count the mass asked for, in the method's units.
  /// @return min(max(units, floor), cap). O(1), never throws.
  index_t clamp_to_mass_limits(index_t units) const {
    return std::min(std::max(units, floor_), cap_);
  }

  /// Checks the budget's invariants (a default or factory-made Budget always passes; this guards
  /// values patched in by hand or parsed from text). Every method's select() calls it through
  /// require_budget_kind().
  /// @param where  prefix of the error message (the caller's name).
  /// @throws sparse_attn::invalid_argument naming `where` when the value is outside its kind's
  ///         range (see compression(), count(), mass()).
  void validate(const char* where) const {
    switch (kind_) {
      case Kind::compression:
        require(std::isfinite(value_) && value_ >= 1.0, where,
                ": a compression budget needs a finite target CR >= 1, got ", value_);
        require(std::isfinite(tolerance_) && tolerance_ >= 0.0 && tolerance_ < 1.0, where,
                ": the CR tolerance must be in [0, 1), got ", tolerance_);
        break;
      case Kind::count:
        require(value_ >= 1.0 && value_ == std::floor(value_) && value_ < 9.0e15, where,
                ": a count budget needs a whole number of units >= 1, got ", value_);
        break;
      case Kind::mass:
        require(value_ > 0.0 && value_ <= 1.0, where,
                ": a mass budget needs p in (0, 1], got ", value_);
        require(floor_ >= 0 && cap_ >= std::max<index_t>(floor_, 1), where,
                ": a mass budget needs 0 <= floor <= cap and cap >= 1, got floor ", floor_,
                " and cap ", cap_);
        break;
    }
  }

  /// The budget as text: "cr=10", "count=512", "mass=0.9", with a mass budget's limits when set
  /// ("mass=0.9,floor=64,cap=1024"; the tool's and the reports' form).
  /// @return a new string (allocates).
  std::string str() const {
    std::ostringstream os;
    os << (kind_ == Kind::compression ? "cr=" : kind_ == Kind::count ? "count=" : "mass=");
    if (kind_ == Kind::count)
      os << units();
    else
      os << value_;
    if (kind_ == Kind::mass && floor_ > 0) os << ",floor=" << floor_;
    if (kind_ == Kind::mass && cap_ != kNoCap) os << ",cap=" << cap_;
    return os.str();
  }

 private:
  Kind kind_ = Kind::compression;
  double value_ = 1.0;
  double tolerance_ = kDefaultCompressionTolerance;
  index_t floor_ = 0, cap_ = kNoCap;  // mass budgets' limits, in the method's units
};

/// Validates `b` and checks that its kind is one the method supports. Every select() starts
/// with it. O(1); allocates only the error message.
/// @param b            the budget asked for.
/// @param compression  the method accepts compression budgets.
/// @param count        the method accepts count budgets.
/// @param mass         the method accepts mass budgets.
/// @param name         the method (or function) named in the message.
/// @throws sparse_attn::invalid_argument if `b` is malformed (Budget::validate) or of a kind the
///         method does not take; the message lists the kinds it takes.
inline void require_budget_kind(const Budget& b, bool compression, bool count, bool mass,
                                const char* name) {
  b.validate(name);
  const bool ok = (b.is_compression() && compression) || (b.is_count() && count) ||
                  (b.is_mass() && mass);
  std::string kinds;
  for (const auto& [takes, kind] : {std::pair<bool, const char*>{compression, "compression"},
                                    {count, "count"}, {mass, "mass"}})
    if (takes) kinds += (kinds.empty() ? "" : " or ") + std::string(kind);
  require(ok, name, ": ", b.is_compression() ? "a compression" : b.is_count() ? "a count" : "a mass",
          " budget is not supported; this method takes ", kinds, " budgets");
}

/// The one CR -> count conversion: c = ceil(total / cr) clamped to [min(1, total), total]
/// (total = 0 gives 0), the fewest units not sparser than asked. The 1e-9 guard keeps exact
/// quotients (total = c * cr) at c.
/// @param total  interchangeable units available (tokens of a cache, pages), >= 0.
/// @param cr     target compression ratio (> 0; callers pass a validated Budget's, >= 1).
/// @return the count, in [min(1, total), total]. O(1), no allocation, never throws.
inline index_t count_for_compression(index_t total, double cr) {
  if (total <= 0) return 0;
  const double c = std::ceil(static_cast<double>(total) / cr - 1e-9);
  if (!(c >= 1.0)) return 1;
  return c >= static_cast<double>(total) ? total : static_cast<index_t>(c);
}

/// The compression ratio dense / kept, with 0 kept = +inf unless dense is 0 too (then 1).
/// @param dense  pairs (or tokens) of the dense computation, >= 0.
/// @param kept   pairs (or tokens) kept, >= 0.
/// @return the ratio (1 when both are 0). O(1), never throws.
inline double compression_of(index_t dense, index_t kept) {
  if (kept == 0) return dense == 0 ? 1.0 : std::numeric_limits<double>::infinity();
  return static_cast<double>(dense) / static_cast<double>(kept);
}

/// The one reachability rule: is the achieved CR within the compression budget's tolerance
/// (either side)? Count and mass budgets: `honoured`.
/// @param b            the budget asked for.
/// @param achieved_cr  the selection's CR (dense / kept); a non-finite CR is never reachable.
/// @param honoured     count and mass budgets: the method kept what was asked (e.g. no forced
///                     units above the count).
/// @return whether the target was met. O(1), never throws.
inline bool is_reachable(const Budget& b, double achieved_cr, bool honoured = true) {
  if (!b.is_compression()) return honoured;
  if (!std::isfinite(achieved_cr)) return false;
  return std::fabs(achieved_cr / b.target_compression() - 1.0) <= b.tolerance() + 1e-12;
}

/// The budget search: pairs(x) non-decreasing on [lo, hi] (x = a window, a block count, ...).
/// Returns the x whose CR dense_pairs / pairs(x) is nearest to `target` in log ratio: the
/// smallest x whose CR does not exceed the target, or the one before it when that one is nearer
/// (ties toward the denser x). dense_pairs = 0 returns lo. O(log(hi - lo)) calls of pairs().
/// @tparam Pairs       callable `index_t(index_t x)`: the pairs kept at budget x.
/// @param lo           smallest budget searched.
/// @param hi           largest budget searched (hi <= lo returns lo).
/// @param dense_pairs  pairs of the dense computation.
/// @param target       target CR (> 0).
/// @param pairs        the pair count; must be non-decreasing on [lo, hi].
/// @return the budget x in [lo, hi]. Allocates nothing itself; throws only what pairs() throws.
template <class Pairs>
index_t nearest_budget(index_t lo, index_t hi, index_t dense_pairs, double target, Pairs&& pairs) {
  if (dense_pairs == 0 || hi <= lo) return lo;
  const double want = static_cast<double>(dense_pairs) / target;
  index_t a = lo, b = hi;
  while (a < b) {  // invariant: pairs(b) >= want or b == hi
    const index_t mid = a + (b - a) / 2;
    if (static_cast<double>(pairs(mid)) >= want)
      b = mid;
    else
      a = mid + 1;
  }
  if (a == lo) return a;
  auto dist = [&](index_t x) {
    return std::fabs(std::log(compression_of(dense_pairs, pairs(x)) / target));
  };
  return dist(a - 1) < dist(a) ? a - 1 : a;
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
