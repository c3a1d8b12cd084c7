// Policy plugins: finding them on the search paths, loading them with Boost.DLL, checking their
// ABI, choosing one for a model, and calling its build function through the host API. This is
// the one place that knows the plugin ABI. May not touch: planning, weights, execution.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <tpengine/policy.h>

#include "core/config/model_config.hpp"
#include "core/graph/graph.hpp"

namespace tpe::plugin {

// Where a search directory came from; user directories beat the built-in one.
enum class Origin { kConfig, kEnvironment, kBuiltin };
const char* origin_name(Origin origin);

struct SearchDir {
  std::filesystem::path path;
  Origin origin = Origin::kBuiltin;
};

struct Policy {
  std::filesystem::path file;
  Origin origin = Origin::kBuiltin;
  std::string name;
  std::string version;
  std::string description;  // since ABI 1.1; empty for older plugins
  uint16_t abi_major = 0;
  uint16_t abi_minor = 0;
  std::vector<std::string> model_types;
  std::vector<std::string> architectures;
  // Block class -> row-parallel linears, as the plugin declares (empty if it leaves it to the
  // core).
  std::vector<std::pair<std::string, std::vector<std::string>>> injection_policy;
  // The host's copy of the plugin's descriptor, read up to its struct_size (abi_struct.hpp);
  // its pointers point into the library.
  tpe_policy_desc desc{};
  std::shared_ptr<void> library;  // keeps the shared library loaded; null when isolated
};

// A plugin file that could not be loaded (isolated discovery goes on past it).
struct Broken {
  std::filesystem::path file;
  Origin origin = Origin::kBuiltin;
  std::string reason;  // the one-line error
};

struct Choice {
  const Policy* policy = nullptr;
  std::string reason;  // "model_type 'llama' (user directory beats built-in ...)"
};

class Registry {
 public:
  // The default search path: the TOML's policy paths, then TPENGINE_POLICY_PATH (':'-separated),
  // then the built-in plugins of this build.
  static std::vector<SearchDir> default_search_path(
      const std::vector<std::filesystem::path>& config_paths);

  // Loads every *.so in the directories (missing directories are skipped, a directory named by
  // the user that does not exist is an error). A file that fails to load is an error naming it,
  // or, with keep_broken, listed in broken(). isolate: each plugin is loaded in a child process
  // (isolate.hpp), which reads its descriptor; this process never loads it, and build_graph
  // builds it in a child too.
  static Registry discover(const std::vector<SearchDir>& dirs, bool isolate = false,
                           bool keep_broken = false);
  // Loads one plugin file; tpe::Error naming the file on any defect.
  static Policy load(const std::filesystem::path& file, Origin origin);

  const std::vector<Policy>& policies() const { return policies_; }
  const std::vector<Broken>& broken() const { return broken_; }
  const std::vector<SearchDir>& search_path() const { return dirs_; }

  // The plugin for a model: the forced name if given, else the first plugin (in search order)
  // serving config.json's model_type, else one listing one of its architectures. tpe::Error
  // listing the policies found when none fits.
  Choice choose(const config::ModelConfig& config, const std::optional<std::string>& forced) const;
  // Every plugin that could serve the model, best first (choose's order): the forced one, or
  // those serving its model_type, then those listing one of its architectures. Never empty.
  std::vector<Choice> candidates(const config::ModelConfig& config,
                                 const std::optional<std::string>& forced) const;

 private:
  std::vector<SearchDir> dirs_;
  std::vector<Policy> policies_;
  std::vector<Broken> broken_;
};

// Runs the policy's build function against the model's config. Errors the plugin reports (or an
// exception escaping it) become tpe::Error prefixed with the plugin's name and file. A policy
// discovered isolated is loaded and built in a child process, and its graph replayed here; a
// crash or hang there is a ChildFailure naming the plugin.
graph::Graph build_graph(const Policy& policy, const config::ModelConfig& config);

}  // namespace tpe::plugin
