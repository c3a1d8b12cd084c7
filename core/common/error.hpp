// The one error type of the engine. Every error a user can cause is a tpe::Error whose message
// is one line naming the file, tensor, layer, key or plugin involved; the CLI prints it and exits
// non-zero. Internal invariants use TPE_CHECK, which also throws (with the source location) so
// that a broken invariant in one rank thread unwinds cleanly instead of aborting the process.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>

namespace tpe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Text quoted from a file (names, keys, values) may hold control characters; escaping them keeps
// every message on one line whatever the file contains.
inline std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      out += fmt::format("\\x{:02x}", byte);
    } else {
      out += c;
    }
  }
  return out;
}

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace tpe

#define TPE_CHECK(cond, ...)                                                                       \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      throw ::tpe::Error(::fmt::format("internal error at {}:{}: check '{}' failed: {}", __FILE__, \
                                       __LINE__, #cond, ::fmt::format(__VA_ARGS__)));              \
    }                                                                                              \
  } while (0)
