// Arbitrary bytes as a model's config.json, run through what `tpengine plan` does before any
// weight is read: the config is read, the built-in policy serving its model_type builds the graph
// (the policies' own reads of the config are under test: a crash here is a crash of `plan` and
// `generate`), and the planner splits it over 1-4 ranks (the first byte picks how many). Every
// input must either plan or throw one tpe::Error with a one-line message that is not an internal
// (TPE_CHECK) one; a crash, a hang or an unbounded allocation is a finding.
#include <dlfcn.h>
#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string_view>

#include "core/common/error.hpp"
#include "core/runtime/engine.hpp"
#include "tests/fuzz/scratch.hpp"

namespace {

const tpe::fuzz::Scratch& scratch() {
  static const tpe::fuzz::Scratch dir("fuzz_model_plan");
  return dir;
}

// The plugins are instrumented too, and libFuzzer keeps reading their coverage counters: each
// is held open here for the process's life, so the registry's unloading after every input never
// unmaps them (dlopen counts references).
const bool plugins_pinned = [] {
  for (const auto& entry : std::filesystem::directory_iterator(TPE_POLICY_BUILD_DIR)) {
    if (entry.path().extension() == ".so" &&
        ::dlopen(entry.path().c_str(), RTLD_NOW | RTLD_LOCAL) == nullptr) {
      abort();
    }
  }
  return true;
}();

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  {
    std::ofstream out(scratch().dir() / "config.json", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data + 1), static_cast<std::streamsize>(size - 1));
  }
  tpe::config::RunConfig run;
  run.model_path = scratch().dir();
  run.tp_size = 1 + data[0] % 4;
  run.isolate_policies = false;  // the policies' crashes are findings: keep them in this process
  try {
    const tpe::runtime::Model model = tpe::runtime::prepare(run);
    if (model.plan.world != run.tp_size) abort();
  } catch (const tpe::Error& e) {
    const std::string_view message = e.what();
    if (message.find('\n') != std::string_view::npos) abort();
    if (message.starts_with("internal error")) abort();
  }
  return 0;
}
