// libFuzzer target: arbitrary bytes as a run-config TOML file. Any input must either parse into
// a config that honours the schema's ranges or throw one tpe::Error with a one-line message.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/common/error.hpp"
#include "core/config/run_config.hpp"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

void check_ranges(const tpe::config::RunConfig& config) {
  const auto& g = config.generation;
  check(config.tp_size >= 1 && config.tp_size <= 1024);
  check(config.all_reduce == "auto" || config.all_reduce == "nccl");
  check(!g.max_new_tokens || *g.max_new_tokens >= 0);
  check(!g.temperature || (std::isfinite(*g.temperature) && *g.temperature > 0));
  check(!g.top_k || *g.top_k >= 0);
  check(!g.top_p || (*g.top_p > 0 && *g.top_p <= 1));
  check(!g.repetition_penalty ||
        (std::isfinite(*g.repetition_penalty) && *g.repetition_penalty > 0));
  if (g.stop_token_ids) {
    for (const int64_t id : *g.stop_token_ids) check(id >= 0);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    check_ranges(tpe::config::parse_run_config(text, "fuzz.toml", "/base"));
  } catch (const tpe::Error& e) {
    const std::string_view message = e.what();
    check(message.starts_with("fuzz.toml") && message.find('\n') == std::string_view::npos);
  }
  return 0;
}
