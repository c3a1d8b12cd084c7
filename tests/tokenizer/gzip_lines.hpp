// Lines of a gzip-compressed text file (the committed corpus and expected outputs).
#pragma once

#include <zlib.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace tpe::tokenizer::testing {

inline std::vector<std::string> read_gzip_lines(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) throw std::runtime_error("cannot open " + path);
  std::vector<std::string> lines;
  std::string line;
  char buffer[1 << 16];
  while (gzgets(file, buffer, sizeof(buffer)) != nullptr) {
    line += buffer;
    if (!line.empty() && line.back() == '\n') {
      line.pop_back();
      lines.push_back(std::move(line));
      line.clear();
    }
  }
  if (!line.empty()) lines.push_back(std::move(line));
  gzclose(file);
  return lines;
}

}  // namespace tpe::tokenizer::testing
