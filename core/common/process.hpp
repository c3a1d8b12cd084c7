// Figures the kernel keeps about this process (Linux /proc/self/status).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>

namespace tpe {

// A "Name:  123 kB" field of /proc/self/status in KiB ("VmRSS", "VmHWM": resident now, at
// most), or -1 where there is no such field.
inline int64_t proc_status_kib(std::string_view field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() > field.size() && line.compare(0, field.size(), field) == 0 &&
        line[field.size()] == ':') {
      return std::stoll(line.substr(field.size() + 1));
    }
  }
  return -1;
}

}  // namespace tpe
