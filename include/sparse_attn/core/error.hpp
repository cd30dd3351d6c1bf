// Error model: every validation failure throws a subclass of std::invalid_argument (bad shapes,
// options or data) whose message names the argument, what was wrong and what is allowed.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace sparse_attn {

/// Thrown when an argument (shape, stride, option, index list) is outside what is allowed.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

/// Throws sparse_attn::invalid_argument("<where>: <message pieces>") when cond is false. Leading
/// ':' and ' ' of the pieces are dropped, so callers may or may not start them with ": ".
template <class... Args>
inline void require(bool cond, const char* where, const Args&... what) {
  if (cond) return;
  std::string msg = detail::concat(what...);
  msg.erase(0, msg.find_first_not_of(": "));
  throw invalid_argument(std::string(where) + ": " + msg);
}

}  // namespace sparse_attn
