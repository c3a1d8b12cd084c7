#include "core/config/run_config.hpp"

#include <cmath>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <string_view>
#include <system_error>
#include <utility>

#include <fmt/ranges.h>
#include <toml++/toml.h>

#include "core/common/error.hpp"
#include "core/common/text_file.hpp"

namespace tpe::config {
namespace {

namespace fs = std::filesystem;

std::string_view type_name(toml::node_type type) {
  switch (type) {
    case toml::node_type::table:
      return "a table";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a float";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
    case toml::node_type::none:
      break;
  }
  return "nothing";
}

// Reads a parsed document into a RunConfig. Every error names SOURCE:LINE and the dotted key.
class Parser {
 public:
  Parser(const std::string& source, const fs::path& base_dir)
      : source_(source), base_dir_(base_dir) {}

  RunConfig parse(const toml::table& root) {
    RunConfig config;
    walk(root, "",
         {{"model", section(model_fields(config))},
          {"parallel", section(parallel_fields(config))},
          {"inference", section(inference_fields(config))},
          {"generation", section(generation_fields(config.generation))},
          // `policy = "name"` is shorthand for [policy] name = "name".
          {"policy", [this, &config, policy = section(policy_fields(config))](
                         const toml::node& node, const std::string& key) {
             if (node.is_string()) {
               config.policy_name = string(node, key);
             } else {
               policy(node, key);
             }
           }}});
    return config;
  }

 private:
  using Field = std::function<void(const toml::node& node, const std::string& key)>;
  using Fields = std::map<std::string, Field, std::less<>>;

  template <typename... Args>
  [[noreturn]] void fail_at(const toml::node& node, fmt::format_string<Args...> format,
                            Args&&... args) const {
    fail_at(node.source(), format, std::forward<Args>(args)...);
  }
  template <typename... Args>
  [[noreturn]] void fail_at(const toml::source_region& where, fmt::format_string<Args...> format,
                            Args&&... args) const {
    fail("{}:{}: {}", source_, where.begin.line, fmt::format(format, std::forward<Args>(args)...));
  }

  void walk(const toml::table& table, const std::string& prefix, const Fields& fields) const {
    for (auto&& [name, node] : table) {
      const std::string key = prefix.empty() ? std::string(name) : prefix + "." + std::string(name);
      const auto field = fields.find(name.str());
      if (field == fields.end()) fail_at(name.source(), "unknown key '{}'", printable(key));
      field->second(node, key);
    }
  }

  Field section(Fields fields) const {
    return [this, fields = std::move(fields)](const toml::node& node, const std::string& key) {
      walk(table(node, key), key, fields);
    };
  }

  [[noreturn]] void fail_type(const toml::node& node, const std::string& key,
                              std::string_view expected) const {
    fail_at(node, "key '{}' must be {}, not {}", printable(key), expected, type_name(node.type()));
  }

  const toml::table& table(const toml::node& node, const std::string& key) const {
    if (!node.is_table()) fail_type(node, key, "a table");
    return *node.as_table();
  }

  bool boolean(const toml::node& node, const std::string& key) const {
    if (!node.is_boolean()) fail_type(node, key, "a boolean");
    return node.as_boolean()->get();
  }

  std::string string(const toml::node& node, const std::string& key) const {
    if (!node.is_string()) fail_type(node, key, "a string");
    const std::string& value = node.as_string()->get();
    if (value.empty()) fail_at(node, "key '{}' must not be empty", printable(key));
    return value;
  }

  std::string one_of(const toml::node& node, const std::string& key,
                     std::initializer_list<std::string_view> choices) const {
    std::string value = string(node, key);
    for (const std::string_view choice : choices) {
      if (value == choice) return value;
    }
    fail_at(node, "key '{}' must be one of {}, got '{}'", printable(key), fmt::join(choices, ", "),
            printable(value));
  }

  // The OS would cut a path at a NUL and open another file than the one written.
  fs::path path(const toml::node& node, const std::string& key) const {
    const std::string value = string(node, key);
    if (value.find('\0') != std::string::npos) {
      fail_at(node, "key '{}' must not contain a NUL character", printable(key));
    }
    return base_dir_ / fs::path(value);
  }

  int64_t integer(const toml::node& node, const std::string& key, int64_t min,
                  int64_t max = std::numeric_limits<int64_t>::max()) const {
    if (!node.is_integer()) fail_type(node, key, "an integer");
    const int64_t value = node.as_integer()->get();
    if (value >= min && value <= max) return value;
    if (max == std::numeric_limits<int64_t>::max()) {
      fail_at(node, "key '{}' must be >= {}, got {}", printable(key), min, value);
    }
    fail_at(node, "key '{}' must be in [{}, {}], got {}", printable(key), min, max, value);
  }

  // A float in (0, max]; integer literals count, as "temperature = 1" is a natural spelling.
  double positive(const toml::node& node, const std::string& key,
                  double max = std::numeric_limits<double>::infinity()) const {
    double value = 0;
    if (node.is_integer()) {
      value = static_cast<double>(node.as_integer()->get());
    } else if (node.is_floating_point()) {
      value = node.as_floating_point()->get();
    } else {
      fail_type(node, key, "a number");
    }
    if (value > 0 && value <= max && std::isfinite(value)) return value;
    if (std::isinf(max)) {
      fail_at(node, "key '{}' must be finite and > 0, got {}", printable(key), value);
    }
    fail_at(node, "key '{}' must be in (0, {}], got {}", printable(key), max, value);
  }

  template <typename T, typename Element>
  std::vector<T> array(const toml::node& node, const std::string& key, Element element) const {
    if (!node.is_array()) fail_type(node, key, "an array");
    std::vector<T> values;
    const toml::array& items = *node.as_array();
    for (size_t i = 0; i < items.size(); ++i) {
      values.push_back(element(items[i], fmt::format("{}[{}]", key, i)));
    }
    return values;
  }

  std::vector<std::string> strings(const toml::node& node, const std::string& key) const {
    return array<std::string>(node, key, [this](const toml::node& item, const std::string& name) {
      return string(item, name);
    });
  }

  Fields model_fields(RunConfig& config) const {
    return {{"path", [this, &config](const auto& node,
                                     const auto& key) { config.model_path = path(node, key); }},
            {"dtype", [this, &config](const auto& node, const auto& key) {
               config.dtype = one_of(node, key, {"auto", "float32", "float16", "bfloat16"});
             }}};
  }

  Fields parallel_fields(RunConfig& config) const {
    return {{"tp_size", [this, &config](const auto& node, const auto& key) {
               config.tp_size = static_cast<int>(integer(node, key, 1, 1024));
             }}};
  }

  Fields inference_fields(RunConfig& config) const {
    return {{"device",
             [this, &config](const auto& node, const auto& key) {
               config.device = one_of(node, key, {"cpu", "cuda"});
             }},
            {"kernel_inject",
             [this, &config](const auto& node, const auto& key) {
               if (node.is_string() && node.as_string()->get() == "auto") {
                 config.kernel_inject.reset();
               } else if (node.is_boolean()) {
                 config.kernel_inject = node.as_boolean()->get();
               } else {
                 fail_type(node, key, "true, false or \"auto\"");
               }
             }},
            {"fused_passes",
             [this, &config](const auto& node, const auto& key) {
               config.fused_passes = strings(node, key);
             }},
            {"prefill_chunk",
             [this, &config](const auto& node, const auto& key) {
               config.prefill_chunk = integer(node, key, 1, int64_t{1} << 20);
             }},
            {"max_batch",
             [this, &config](const auto& node, const auto& key) {
               config.max_batch = integer(node, key, 1, int64_t{1} << 16);
             }},
            {"cuda_graph",
             [this, &config](const auto& node, const auto& key) {
               config.cuda_graph = boolean(node, key);
             }},
            {"all_reduce",
             [this, &config](const auto& node, const auto& key) {
               config.all_reduce = one_of(node, key, {"auto", "nccl"});
             }},
            {"allow_long_context", [this, &config](const auto& node, const auto& key) {
               config.allow_long_context = boolean(node, key);
             }}};
  }

  Fields generation_fields(GenerationSettings& g) const {
    return {{"max_new_tokens",
             [this, &g](const auto& node, const auto& key) {
               g.max_new_tokens = integer(node, key, 0);
             }},
            {"do_sample",
             [this, &g](const auto& node, const auto& key) { g.do_sample = boolean(node, key); }},
            {"temperature", [this, &g](const auto& node,
                                       const auto& key) { g.temperature = positive(node, key); }},
            {"top_k",
             [this, &g](const auto& node, const auto& key) { g.top_k = integer(node, key, 0); }},
            {"top_p",
             [this, &g](const auto& node, const auto& key) { g.top_p = positive(node, key, 1.0); }},
            {"repetition_penalty",
             [this, &g](const auto& node, const auto& key) {
               g.repetition_penalty = positive(node, key);
             }},
            {"seed",
             [this, &g](const auto& node, const auto& key) {
               g.seed = static_cast<uint64_t>(integer(node, key, 0));
             }},
            {"stop_token_ids",
             [this, &g](const auto& node, const auto& key) {
               g.stop_token_ids = array<int64_t>(
                   node, key,
                   [this](const auto& item, const auto& name) { return integer(item, name, 0); });
             }},
            {"ignore_eos",
             [this, &g](const auto& node, const auto& key) { g.ignore_eos = boolean(node, key); }}};
  }

  Fields policy_fields(RunConfig& config) const {
    return {{"name", [this, &config](const auto& node,
                                     const auto& key) { config.policy_name = string(node, key); }},
            {"search_paths",
             [this, &config](const auto& node, const auto& key) {
               config.policy_search_paths = array<fs::path>(
                   node, key,
                   [this](const auto& item, const auto& name) { return path(item, name); });
             }},
            {"injection_policy",
             [this, &config](const auto& node, const auto& key) {
               config.injection_policy = injection_policy(node, key);
             }},
            {"isolate", [this, &config](const auto& node, const auto& key) {
               config.isolate_policies = boolean(node, key);
             }}};
  }

  // Block class names are the user's, so any key is allowed here.
  InjectionPolicy injection_policy(const toml::node& node, const std::string& key) const {
    InjectionPolicy policy;
    for (auto&& [block_class, linears] : table(node, key)) {
      policy[std::string(block_class)] = strings(linears, key + "." + std::string(block_class));
    }
    return policy;
  }

  const std::string& source_;
  const fs::path& base_dir_;
};

}  // namespace

RunConfig parse_run_config(std::string_view toml_text, const std::string& source,
                           const std::filesystem::path& base_dir) {
  toml::table root;
  try {
    root = toml::parse(toml_text, source);
  } catch (const toml::parse_error& e) {
    fail("{}:{}: {}", source, e.source().begin.line, printable(e.description()));
  } catch (const std::exception& e) {
    fail("{}: {}", source, printable(e.what()));
  }
  return Parser(source, base_dir).parse(root);
}

RunConfig load_run_config(const std::filesystem::path& toml_file) {
  const std::string text = read_text_file(toml_file, kConfigFileLimit);
  return parse_run_config(text, toml_file.string(), toml_file.parent_path());
}

}  // namespace tpe::config
