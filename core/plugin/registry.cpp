#include "core/plugin/registry.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/common/error.hpp"
#include "core/plugin/abi_struct.hpp"
#include "core/plugin/boost_dll.hpp"
#include "core/plugin/isolate.hpp"

namespace tpe::plugin {
namespace fs = std::filesystem;

const char* origin_name(Origin origin) {
  switch (origin) {
    case Origin::kConfig:
      return "config policy.search_paths";
    case Origin::kEnvironment:
      return "TPENGINE_POLICY_PATH";
    case Origin::kBuiltin:
      return "built-in";
  }
  return "?";
}

std::vector<SearchDir> Registry::default_search_path(const std::vector<fs::path>& config_paths) {
  std::vector<SearchDir> dirs;
  for (const fs::path& p : config_paths) dirs.push_back({p, Origin::kConfig});
  if (const char* env = std::getenv("TPENGINE_POLICY_PATH")) {
    std::string_view rest = env;
    while (!rest.empty()) {
      const size_t colon = rest.find(':');
      const std::string_view item = rest.substr(0, colon);
      if (!item.empty()) dirs.push_back({fs::path(item), Origin::kEnvironment});
      rest = colon == std::string_view::npos ? std::string_view() : rest.substr(colon + 1);
    }
  }
  // An installed engine (or a bundle, tools/bundle.sh) finds its plugins beside it
  // (bin/../lib/tpengine/policies) and only there; a build-tree one in the build's policies
  // folder.
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  const fs::path installed = exe.parent_path().parent_path() / "lib" / "tpengine" / "policies";
  if (!ec && fs::is_directory(installed, ec)) {
    dirs.push_back({installed, Origin::kBuiltin});
  } else {
    dirs.push_back({fs::path(TPE_POLICY_BUILD_DIR), Origin::kBuiltin});
  }
  return dirs;
}

namespace {

bool has_elf_header(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  char magic[4] = {};
  in.read(magic, 4);
  return in.gcount() == 4 && magic[0] == 0x7f && magic[1] == 'E' && magic[2] == 'L' &&
         magic[3] == 'F';
}

// A plugin's strings are kept escaped and capped (printable): they are printed in listings,
// plans and messages.
std::vector<std::string> string_list(const char* const* list) {
  std::vector<std::string> out;
  for (; list != nullptr && *list != nullptr; ++list) out.push_back(printable(*list));
  return out;
}

}  // namespace

Policy Registry::load(const fs::path& file, Origin origin) {
  const std::string where = fmt::format("plugin {}", file.string());
  if (!has_elf_header(file)) fail("{}: not a shared library (no ELF header)", where);
  auto library = std::make_shared<boost::dll::shared_library>();
  try {
    library->load(file, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& e) {
    fail("{}: cannot be loaded: {}", where, e.what());
  }
  if (!library->has(TPE_POLICY_ENTRY_SYMBOL)) {
    fail("{}: does not export {}; is it a tpengine policy?", where, TPE_POLICY_ENTRY_SYMBOL);
  }
  auto entry = library->get<std::remove_pointer_t<tpe_policy_entry_fn>>(TPE_POLICY_ENTRY_SYMBOL);
  const tpe_policy_desc* desc = nullptr;
  try {
    desc = entry(TPE_ABI_MAJOR, TPE_ABI_MINOR);
  } catch (...) {
    fail("{}: {} threw an exception", where, TPE_POLICY_ENTRY_SYMBOL);
  }
  if (desc == nullptr) {
    fail("{}: {} returned NULL: the plugin cannot serve policy ABI {}.{}", where,
         TPE_POLICY_ENTRY_SYMBOL, TPE_ABI_MAJOR, TPE_ABI_MINOR);
  }
  // struct_size, abi_major and abi_minor lead every descriptor of every major.
  if (desc->abi_major != TPE_ABI_MAJOR) {
    fail(
        "{}: built for policy ABI {}.{}, this tpengine speaks {}.{}; rebuild it against the "
        "tpengine {} SDK",
        where, desc->abi_major, desc->abi_minor, TPE_ABI_MAJOR, TPE_ABI_MINOR, TPE_ABI_MAJOR);
  }
  // The host's copy: the members the plugin's struct_size covers, defaults for those it lacks
  // (an older minor); a newer minor's members past what this host knows are not read.
  tpe_policy_desc copy{};
  try {
    copy = read_struct(desc);
  } catch (const Error& e) {
    fail("{}: {}", where, e.what());
  }
  if (copy.name == nullptr || *copy.name == '\0' || copy.build == nullptr ||
      copy.model_types == nullptr) {
    fail("{}: descriptor lacks a name, model_types or build function", where);
  }
  Policy policy;
  policy.file = file;
  policy.origin = origin;
  policy.name = printable(copy.name);
  policy.version = copy.version != nullptr ? printable(copy.version) : "";
  if (copy.description != nullptr) policy.description = printable(copy.description);
  policy.abi_major = copy.abi_major;
  policy.abi_minor = copy.abi_minor;
  policy.model_types = string_list(copy.model_types);
  policy.architectures = string_list(copy.architectures);
  for (const tpe_injection_rule* rule = copy.injection_policy;
       rule != nullptr && rule->block_class != nullptr; ++rule) {
    policy.injection_policy.emplace_back(rule->block_class, string_list(rule->row_parallel));
  }
  policy.desc = copy;
  policy.library = std::move(library);
  return policy;
}

namespace {

// What the parent keeps of a plugin a child loaded: its descriptor's data (strings already
// escaped by load), not its library.
std::string metadata_json(const Policy& p) {
  nlohmann::json rules = nlohmann::json::array();
  for (const auto& [cls, linears] : p.injection_policy) rules.push_back({cls, linears});
  return nlohmann::json{{"name", p.name},
                        {"version", p.version},
                        {"description", p.description},
                        {"abi", {p.abi_major, p.abi_minor}},
                        {"model_types", p.model_types},
                        {"architectures", p.architectures},
                        {"injection_policy", rules}}
      .dump();
}

Policy from_metadata(const std::string& text, const fs::path& file, Origin origin) {
  Policy p;
  p.file = file;
  p.origin = origin;
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    p.name = j.at("name").get<std::string>();
    p.version = j.at("version").get<std::string>();
    p.description = j.at("description").get<std::string>();
    p.abi_major = j.at("abi").at(0).get<uint16_t>();
    p.abi_minor = j.at("abi").at(1).get<uint16_t>();
    p.model_types = j.at("model_types").get<std::vector<std::string>>();
    p.architectures = j.at("architectures").get<std::vector<std::string>>();
    for (const auto& rule : j.at("injection_policy")) {
      p.injection_policy.emplace_back(rule.at(0).get<std::string>(),
                                      rule.at(1).get<std::vector<std::string>>());
    }
  } catch (const nlohmann::json::exception& e) {
    fail("plugin {}: its descriptor did not come back whole: {}", file.string(), e.what());
  }
  return p;
}

}  // namespace

Registry Registry::discover(const std::vector<SearchDir>& dirs, bool isolate, bool keep_broken) {
  Registry registry;
  registry.dirs_ = dirs;
  for (const SearchDir& dir : dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir.path, ec)) {
      if (dir.origin == Origin::kBuiltin) continue;
      fail("policy directory {} (from {}) does not exist", dir.path.string(),
           origin_name(dir.origin));
    }
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(dir.path)) {
      if (entry.is_regular_file() && entry.path().extension() == ".so") files.push_back(entry);
    }
    std::sort(files.begin(), files.end());
    for (const fs::path& file : files) {
      try {
        if (!isolate) {
          registry.policies_.push_back(load(file, dir.origin));
          continue;
        }
        const std::string metadata = run_in_child(
            fmt::format("plugin {}", file.string()), "loading",
            [&] { return metadata_json(load(file, dir.origin)); }, policy_timeout_seconds());
        registry.policies_.push_back(from_metadata(metadata, file, dir.origin));
      } catch (const Error& e) {
        if (!keep_broken) throw;
        registry.broken_.push_back({file, dir.origin, e.what()});
      }
    }
  }
  return registry;
}

Choice Registry::choose(const config::ModelConfig& config,
                        const std::optional<std::string>& forced) const {
  return candidates(config, forced).front();
}

std::vector<Choice> Registry::candidates(const config::ModelConfig& config,
                                         const std::optional<std::string>& forced) const {
  auto found = [&] {
    std::vector<std::string> items;
    for (const Policy& p : policies_) {
      items.push_back(fmt::format("{} [{}] ({})", p.name, fmt::join(p.model_types, ", "),
                                  printable(p.file.string())));
    }
    return items.empty() ? std::string("none") : fmt::format("{}", fmt::join(items, "; "));
  };
  if (forced) {
    for (const Policy& p : policies_) {
      if (p.name == *forced) {
        return {{&p, fmt::format("forced by policy.name = \"{}\"", printable(*forced))}};
      }
    }
    fail("policy '{}' was asked for but not found; policies found: {}", printable(*forced),
         found());
  }
  std::vector<Choice> out;
  const std::string model_type = config.model_type();
  for (const Policy& p : policies_) {
    if (std::find(p.model_types.begin(), p.model_types.end(), model_type) != p.model_types.end()) {
      out.push_back(
          {&p, fmt::format("serves model_type '{}'; {} in search order ({})", printable(model_type),
                           out.empty() ? "first" : "next", origin_name(p.origin))});
    }
  }
  for (const std::string& arch : config.architectures()) {
    for (const Policy& p : policies_) {
      const bool listed =
          std::any_of(out.begin(), out.end(), [&](const Choice& c) { return c.policy == &p; });
      if (!listed && std::find(p.architectures.begin(), p.architectures.end(), arch) !=
                         p.architectures.end()) {
        out.push_back(
            {&p, fmt::format("serves architecture '{}'; {} in search order ({})", printable(arch),
                             out.empty() ? "first" : "next", origin_name(p.origin))});
      }
    }
  }
  if (out.empty()) {
    fail("{}: no policy serves model_type '{}'; policies found: {}",
         printable(config.path().string()), printable(model_type), found());
  }
  return out;
}

}  // namespace tpe::plugin
