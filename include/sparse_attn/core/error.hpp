/// @file
/// Error model: every validation failure raises sparse_attn::invalid_argument (a subclass of
/// std::invalid_argument) whose message names the argument, what was wrong and what is allowed.
///
/// With exceptions (the default) it is thrown. Under -fno-exceptions the headers still compile and
/// every error goes to the error handler instead: a function the caller sets with
/// set_error_handler(); the default prints "sparse_attn: <message>" to stderr and aborts. A handler
/// must not return (it may longjmp, or end the process); if it does, the library aborts.
/// See docs/DESIGN.md, section "Errors".
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

SPARSE_ATTN_NAMESPACE_BEGIN

/// Thrown when an argument (shape, stride, option, index list) is outside what is allowed.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Receives the message of an error when exceptions are off (-fno-exceptions). Must not return.
using ErrorHandler = void (*)(const char* message);

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

inline void default_error_handler(const char* message) {
  std::fprintf(stderr, "sparse_attn: %s\n", message);
  std::abort();
}

inline ErrorHandler& error_handler_slot() {
  static ErrorHandler handler = &default_error_handler;
  return handler;
}
}  // namespace detail

/// Sets the handler used under -fno-exceptions (nullptr restores the default: print and abort);
/// returns the previous one. With exceptions on, errors are thrown and the handler is unused.
/// @param handler the new handler, or nullptr for the default.
/// @return the handler that was installed before.
/// Not thread-safe: the handler is one unsynchronised process-wide slot (per ISA namespace), so
/// set it before other threads call the library.
inline ErrorHandler set_error_handler(ErrorHandler handler) noexcept {
  ErrorHandler old = detail::error_handler_slot();
  detail::error_handler_slot() = handler != nullptr ? handler : &detail::default_error_handler;
  return old;
}

/// Raises sparse_attn::invalid_argument(message): throws it, or (-fno-exceptions) calls the error
/// handler and aborts if the handler returns.
/// @param message the full message (what() of the exception).
/// @throws sparse_attn::invalid_argument always (with exceptions on).
[[noreturn]] inline void raise_invalid_argument(const std::string& message) {
#if SPARSE_ATTN_EXCEPTIONS
  throw invalid_argument(message);
#else
  detail::error_handler_slot()(message.c_str());
  std::abort();
#endif
}

/// Raises sparse_attn::invalid_argument("<where>: <message pieces>") when cond is false. Leading
/// ':' and ' ' of the pieces are dropped, so callers may or may not start them with ": ".
/// @tparam Args types streamable with operator<<.
/// @param cond the condition that must hold.
/// @param where the entry point or argument, prefix of the message.
/// @param what pieces of the message, concatenated with an std::ostringstream only on failure
///        (the success path allocates nothing).
/// @throws sparse_attn::invalid_argument when cond is false.
template <class... Args>
inline void require(bool cond, const char* where, const Args&... what) {
  if (cond) return;
  std::string msg = detail::concat(what...);
  msg.erase(0, msg.find_first_not_of(": "));
  raise_invalid_argument(std::string(where) + ": " + msg);
}

SPARSE_ATTN_NAMESPACE_END
