// A small file read whole (a config, a tokenizer, a template, an index): one place that refuses
// what would block, never end or read as nothing. Only a regular file is read (a FIFO blocks,
// /dev/zero never ends, a directory reads as empty), and at most `max_bytes`; each refusal is a
// tpe::Error naming the file.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "core/common/error.hpp"

namespace tpe {

inline constexpr uint64_t kConfigFileLimit = uint64_t{16} << 20;      // config.json, TOML, ...
inline constexpr uint64_t kTokenizerFileLimit = uint64_t{256} << 20;  // tokenizer.json

inline std::string read_text_file(const std::filesystem::path& path, uint64_t max_bytes) {
  namespace fs = std::filesystem;
  const std::string name = printable(path.string());
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);  // follows symbolic links
  if (!fs::exists(status)) fail("{}: not found", name);
  if (fs::is_directory(status)) fail("{}: is a directory, not a file", name);
  if (!fs::is_regular_file(status)) {
    fail("{}: not a regular file (a FIFO, socket or device), so not read", name);
  }
  const uint64_t size = fs::file_size(path, ec);
  if (!ec && size > max_bytes) {
    fail("{}: {} bytes, more than the {} MiB such a file may have", name, size, max_bytes >> 20);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open: {}", name, std::strerror(errno));
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (in.bad()) fail("{}: cannot read: {}", name, std::strerror(errno));
  if (text.size() > max_bytes) fail("{}: grew past {} MiB while read", name, max_bytes >> 20);
  return text;
}

}  // namespace tpe
