// One line for a JSON parser error, shared by every reader of JSON files.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

#include "core/common/error.hpp"

namespace tpe {

// nlohmann prefixes its messages with "[json.exception.parse_error.101] "; only the rest helps.
// (Mostly parse_error, but a number too large for a double is out_of_range.)
inline std::string json_error_message(const nlohmann::json::exception& e) {
  std::string_view what = e.what();
  if (const size_t end = what.find("] "); what.starts_with('[') && end != what.npos) {
    what.remove_prefix(end + 2);
  }
  return printable(what);
}

}  // namespace tpe
