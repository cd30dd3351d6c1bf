/// @file
/// The one registry of methods: names, summaries, budget units and parameters (with defaults) of
/// every prefill and decode method, and the only place where a method name becomes a method. The
/// tool (attend, decode, eval, frontier), the evaluator, the pipeline's users and the benchmarks
/// all go through it.
///
/// A method is a struct of the selection contract (methods/selector.hpp). The registry is two
/// compile-time lists of those types; with_prefill_method(name, settings, f) finds the type whose
/// `name` matches, default-constructs it, applies the "key=value" settings through its
/// visit_params(), and calls f(method) with the concrete type, so the caller's code is instantiated
/// for every method and nothing is type-erased. Adding a method: one file under methods/, its type
/// in one of the lists below, its tests (docs/METHODS.md, section "Adding a method").
///
/// Everything here is stateless: the functions may be called concurrently from any thread.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cerrno>
#include <cstdlib>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "sparse_attn/core/error.hpp"
#include "sparse_attn/methods/ada_snapkv.hpp"
#include "sparse_attn/methods/block_sparse.hpp"
#include "sparse_attn/methods/budget.hpp"
#include "sparse_attn/methods/decode_policy.hpp"
#include "sparse_attn/methods/dense.hpp"
#include "sparse_attn/methods/flex_prefill.hpp"
#include "sparse_attn/methods/h2o.hpp"
#include "sparse_attn/methods/quest.hpp"
#include "sparse_attn/methods/sliding_window.hpp"
#include "sparse_attn/methods/snapkv.hpp"
#include "sparse_attn/methods/streaming.hpp"
#include "sparse_attn/methods/user_mask.hpp"
#include "sparse_attn/methods/vertical_slash.hpp"
#include "sparse_attn/methods/xattention.hpp"

SPARSE_ATTN_NAMESPACE_BEGIN
namespace methods {

/// A compile-time list of method types (the registry's two lists).
/// @tparam M  method structs of the selection contract (methods/selector.hpp).
template <class... M>
struct MethodList {};

/// Every prefill method, dense first (the evaluator's and the frontier's order).
using PrefillMethods = MethodList<Dense, SlidingWindow, TriShape, BlockSparse, VerticalSlash,
                                  VerticalSlashTiled, FlexPrefill, XAttention, UserMask>;
/// Every decode method, dense first.
using DecodeMethods =
    MethodList<Dense, StreamingLLM, Quest, QuestHead, SnapKV, AdaSnapKV, H2O>;

/// "key=value" parameter settings, applied in order.
using ParamSettings = std::vector<std::pair<std::string, std::string>>;

/// One parameter of a method, as the registry lists it.
struct ParamInfo {
  /// The parameter's name: the key of "key=value" settings.
  std::string name, default_value, help;
  /// @var default_value
  /// The default as text, as set_params() parses it ("64", "0.5", "true").
  /// @var help
  /// A one-line description of the parameter.
};
/// One method as the registry lists it (the tool's --help, the evaluator's reports).
struct MethodInfo {
  /// The registry name.
  std::string name, summary;
  /// @var summary
  /// A one-line description of the method.
  BudgetUnit unit = BudgetUnit::none;  ///< what a count budget counts (none: no count budgets)
  std::vector<ParamInfo> params;       ///< every parameter, in declaration order, with defaults
  /// Selects from a mask the caller supplies (user_mask), not from Q/K.
  bool needs_user_mask = false;
  /// Takes attention-mass budgets (Budget::mass; the method's `static constexpr bool
  /// takes_mass = true`).
  bool takes_mass = false;
};

/// @cond SPARSE_ATTN_INTERNAL
namespace detail_registry {

template <class T>
std::string to_text(const T& v) {
  std::ostringstream os;
  if constexpr (std::is_same_v<T, bool>)
    os << (v ? "true" : "false");
  else
    os << v;
  return os.str();
}

// Parses `text` into v (index_t / int / double / float / bool), the whole string or nothing.
template <class T>
bool parse(const std::string& text, T& v) {
  if (text.empty()) return false;
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "true" || text == "1") return v = true, true;
    if (text == "false" || text == "0") return v = false, true;
    return false;
  } else if constexpr (std::is_integral_v<T>) {
    errno = 0;
    char* end = nullptr;
    const long long x = std::strtoll(text.c_str(), &end, 10);
    if (errno != 0 || *end != '\0' || x < static_cast<long long>(std::numeric_limits<T>::min()) ||
        x > static_cast<long long>(std::numeric_limits<T>::max()))
      return false;
    v = static_cast<T>(x);
    return true;
  } else {
    errno = 0;
    char* end = nullptr;
    const double x = std::strtod(text.c_str(), &end);
    if (errno != 0 || *end != '\0') return false;
    v = static_cast<T>(x);
    return true;
  }
}

template <class M, class = void>
struct takes_user_mask : std::false_type {};
template <class M>
struct takes_user_mask<M, std::void_t<decltype(M::takes_user_mask)>>
    : std::bool_constant<M::takes_user_mask> {};

template <class M, class = void>
struct takes_mass : std::false_type {};
template <class M>
struct takes_mass<M, std::void_t<decltype(M::takes_mass)>> : std::bool_constant<M::takes_mass> {};

template <class M>
MethodInfo info() {
  MethodInfo mi;
  mi.name = M::name;
  mi.summary = M::summary;
  mi.unit = M::unit;
  if constexpr (takes_user_mask<M>::value) mi.needs_user_mask = true;
  if constexpr (takes_mass<M>::value) mi.takes_mass = true;
  M m;
  m.visit_params([&](const char* name, auto& value, const char* help) {
    mi.params.push_back({name, to_text(value), help});
  });
  return mi;
}

template <class... M>
std::vector<MethodInfo> infos(MethodList<M...>) {
  return {info<M>()...};
}

template <class... M>
std::string names(MethodList<M...>) {
  std::string s;
  ((s += (s.empty() ? "" : ", "), s += M::name), ...);
  return s;
}

template <class F, class All, class First, class... Rest>
decltype(auto) find_in(std::string_view name, F&& f, const char* what, All all,
                       MethodList<First, Rest...>) {
  if (name == First::name) return f(static_cast<First*>(nullptr));
  if constexpr (sizeof...(Rest) > 0) {
    return find_in(name, std::forward<F>(f), what, all, MethodList<Rest...>{});
  } else {
    require(false, "methods registry", ": unknown ", what, " method '", std::string(name),
            "'; known: ", names(all));
    return f(static_cast<First*>(nullptr));  // not reached; keeps the return type
  }
}

template <class F, class... M>
decltype(auto) find(std::string_view name, F&& f, const char* what, MethodList<M...> all) {
  return find_in(name, std::forward<F>(f), what, all, all);
}

}  // namespace detail_registry
/// @endcond

/// Applies "key=value" settings to method m's parameters. Unknown keys and unparsable values are
/// sparse_attn::invalid_argument naming the method, the key and its allowed parameters. Values
/// are parsed whole: integers in base 10 within the member's range, floating point by strtod,
/// switches as true/false/1/0. Ranges (block >= 1, ...) are checked by the method's select().
/// @param m         the method to configure; settings applied so far stay applied if a later
///                  one throws.
/// @param settings  (key, value) pairs, applied in order (a repeated key: the last wins).
/// @throws sparse_attn::invalid_argument on an unknown key or an unparsable value.
/// O(settings x parameters); allocates the error message and the list of known keys.
template <class M>
void set_params(M& m, const ParamSettings& settings) {
  for (const auto& setting : settings) {
    const std::string& key = setting.first;  // (not structured bindings: C++17 lambdas cannot
    const std::string& text = setting.second;  // capture those)
    bool found = false, ok = false;
    std::string known;
    m.visit_params([&](const char* name, auto& value, const char*) {
      known += known.empty() ? name : std::string(", ") + name;
      if (key == name) {
        found = true;
        ok = detail_registry::parse(text, value);
      }
    });
    require(found, M::name, ": unknown parameter '", key, "'; its parameters: ",
            known.empty() ? std::string("none") : known);
    require(ok, M::name, ": parameter ", key, "=", text, " is not a valid ",
            "value (numbers for counts and ratios, true/false for switches)");
  }
}

/// The parameters of a configured method, in declaration order: (name, value as text).
/// @param configured  the method.
/// @return the settings, values as std::ostream prints them (doubles to 6 significant digits,
///         switches as true/false), which set_params() accepts. Allocates the strings.
template <class M>
ParamSettings param_values(const M& configured) {
  M m = configured;  // visit_params hands out references: visit a copy
  ParamSettings out;
  m.visit_params([&](const char* name, auto& value, const char*) {
    out.emplace_back(name, detail_registry::to_text(value));
  });
  return out;
}

/// Does method type M select from a mask the caller supplies (user_mask) rather than from Q/K?
template <class M>
inline constexpr bool takes_user_mask_v = detail_registry::takes_user_mask<M>::value;

/// Every prefill method with its summary, budget unit and parameters (defaults).
/// @return one MethodInfo per method of PrefillMethods, in its order (built on every call).
inline std::vector<MethodInfo> prefill_methods() { return detail_registry::infos(PrefillMethods{}); }
/// Every decode method with its summary, budget unit and parameters (defaults).
/// @return one MethodInfo per method of DecodeMethods, in its order (built on every call).
inline std::vector<MethodInfo> decode_methods() { return detail_registry::infos(DecodeMethods{}); }

/// @cond SPARSE_ATTN_INTERNAL
namespace detail_registry {
template <class List, class F>
decltype(auto) with_method(List list, const char* what, std::string_view name,
                           const ParamSettings& settings, F&& f) {
  return find(
      name,
      [&](auto* tag) -> decltype(auto) {
        std::remove_pointer_t<decltype(tag)> m;
        set_params(m, settings);
        return f(m);
      },
      what, list);
}
}  // namespace detail_registry
/// @endcond

/// Calls f(method) with the prefill method registered as `name`, default-constructed and then
/// configured by `settings`; returns what f returns (the same type for every method). f is
/// instantiated for every prefill method.
/// @param name      a registry name ("dense", "sliding_window", "block_sparse", ...).
/// @param settings  "key=value" parameter settings (set_params()).
/// @param f         callable f(const M& or M& method) for every method type M.
/// @return what f returns.
/// @throws sparse_attn::invalid_argument if no prefill method is called `name` (the message
///         lists the known ones) or a setting is refused; whatever f throws.
/// O(methods + settings x parameters) besides f.
template <class F>
decltype(auto) with_prefill_method(std::string_view name, const ParamSettings& settings, F&& f) {
  return detail_registry::with_method(PrefillMethods{}, "prefill", name, settings,
                                      std::forward<F>(f));
}

/// The same for decode methods: f(method) with the decode method registered as `name`.
/// @param name      a registry name ("dense", "streaming", "quest", "snapkv", ...).
/// @param settings  "key=value" parameter settings (set_params()).
/// @param f         callable f(method) for every decode method type.
/// @return what f returns.
/// @throws sparse_attn::invalid_argument if no decode method is called `name` or a setting is
///         refused; whatever f throws.
template <class F>
decltype(auto) with_decode_method(std::string_view name, const ParamSettings& settings, F&& f) {
  return detail_registry::with_method(DecodeMethods{}, "decode", name, settings,
                                      std::forward<F>(f));
}

/// The decode policy (methods/decode_policy.hpp) of method `name` at `budget`, for a cache type
/// and query dtype: what the pipeline, the evaluator and the tool run.
/// @tparam Cache    the KV cache type.
/// @tparam TQ       the query element type.
/// @param name      a decode method's registry name.
/// @param settings  "key=value" parameter settings.
/// @param budget    the budget of the policy.
/// @return the policy (make_policy()).
/// @throws sparse_attn::invalid_argument as with_decode_method() and make_policy().
template <class Cache, class TQ>
std::unique_ptr<DecodePolicy<Cache, TQ>> make_decode_policy(std::string_view name,
                                                            const ParamSettings& settings,
                                                            const Budget& budget) {
  return with_decode_method(name, settings, [&](const auto& m) {
    return make_policy<Cache, TQ>(m, budget);
  });
}

/// @param name  a method name.
/// @return whether a prefill method is registered as `name`. Builds the list (allocates).
inline bool is_prefill_method(std::string_view name) {
  for (const MethodInfo& m : prefill_methods())
    if (m.name == name) return true;
  return false;
}
/// @param name  a method name.
/// @return whether a decode method is registered as `name`. Builds the list (allocates).
inline bool is_decode_method(std::string_view name) {
  for (const MethodInfo& m : decode_methods())
    if (m.name == name) return true;
  return false;
}

}  // namespace methods
SPARSE_ATTN_NAMESPACE_END
