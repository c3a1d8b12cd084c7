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

// Text quoted from a file or a plugin (names, keys, values, messages) may hold control
// characters and be of any length: control characters are escaped, so every message stays one
// line and no terminal sequence reaches the terminal, and text past kPrintableLimit bytes is cut
// (at a character boundary) with its length said.
inline constexpr size_t kPrintableLimit = 1024;

inline std::string printable(std::string_view text) {
  std::string out;
  size_t keep = text.size();
  if (keep > kPrintableLimit) {
    keep = kPrintableLimit;
    while (keep > 0 && (static_cast<unsigned char>(text[keep]) & 0xC0) == 0x80) --keep;
  }
  out.reserve(keep);
  for (const char c : text.substr(0, keep)) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) {
      out += fmt::format("\\x{:02x}", byte);
    } else {
      out += c;
    }
  }
  if (keep < text.size()) out += fmt::format("... ({} bytes)", text.size());
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
