#include "core/config/model_config.hpp"

#include <cmath>
#include <iterator>
#include <limits>
#include <string_view>
#include <system_error>
#include <utility>

#include "core/common/error.hpp"
#include "core/common/json_error.hpp"
#include "core/common/text_file.hpp"

namespace tpe::config {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json parse_json_file(const fs::path& file) {
  const std::string text = read_text_file(file, kConfigFileLimit);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", file.string(), json_error_message(e));
  }
}

void require_object(const json& root, const fs::path& file) {
  if (!root.is_object()) fail("{}: expected a JSON object", file.string());
}

// Null counts as missing anywhere along the path, as transformers writes "rope_scaling": null.
tpe_lookup find(const json& root, const std::string& key, const json*& out) {
  const json* node = &root;
  size_t begin = 0;
  while (true) {
    if (node->is_null()) return TPE_MISSING;
    if (!node->is_object()) return TPE_WRONG_TYPE;
    const size_t dot = std::min(key.find('.', begin), key.size());
    const auto it = node->find(key.substr(begin, dot - begin));
    if (it == node->end()) return TPE_MISSING;
    node = &*it;
    if (dot == key.size()) break;
    begin = dot + 1;
  }
  out = node;
  return node->is_null() ? TPE_MISSING : TPE_FOUND;
}

// Transformers writes some integers as floats ("max_position_embeddings": 2048.0).
tpe_lookup convert(const json& node, int64_t& out) {
  constexpr double kTwoTo63 = 9223372036854775808.0;
  if (node.is_number_unsigned()) {
    const auto value = node.get<uint64_t>();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return TPE_WRONG_TYPE;
    out = static_cast<int64_t>(value);
    return TPE_FOUND;
  }
  if (node.is_number_integer()) {
    out = node.get<int64_t>();
    return TPE_FOUND;
  }
  if (!node.is_number_float()) return TPE_WRONG_TYPE;
  const auto value = node.get<double>();
  if (!std::isfinite(value) || std::trunc(value) != value || value < -kTwoTo63 ||
      value >= kTwoTo63) {
    return TPE_WRONG_TYPE;
  }
  out = static_cast<int64_t>(value);
  return TPE_FOUND;
}

tpe_lookup convert(const json& node, double& out) {
  if (!node.is_number()) return TPE_WRONG_TYPE;
  out = node.get<double>();
  return TPE_FOUND;
}

tpe_lookup convert(const json& node, bool& out) {
  if (!node.is_boolean()) return TPE_WRONG_TYPE;
  out = node.get<bool>();
  return TPE_FOUND;
}

tpe_lookup convert(const json& node, std::string& out) {
  if (!node.is_string()) return TPE_WRONG_TYPE;
  out = node.get<std::string>();
  return TPE_FOUND;
}

template <typename T>
tpe_lookup lookup(const json& root, const std::string& key, T& out) {
  const json* node = nullptr;
  const tpe_lookup found = find(root, key, node);
  return found == TPE_FOUND ? convert(*node, out) : found;
}

const char* type_name(int64_t) { return "an integer"; }
const char* type_name(double) { return "a number"; }
const char* type_name(bool) { return "a boolean"; }
const char* type_name(const std::string&) { return "a string"; }

// Typed access to one JSON file for the engine's own reading, where a wrong type is an error.
class Reader {
 public:
  Reader(const json& root, const fs::path& file) : root_(root), file_(file) {}

  const json& root() const { return root_; }

  template <typename T>
  std::optional<T> optional(const std::string& key) const {
    T value{};
    const tpe_lookup found = lookup(root_, key, value);
    if (found == TPE_WRONG_TYPE) fail_key(key, fmt::format("must be {}", type_name(value)));
    if (found == TPE_MISSING) return std::nullopt;
    return value;
  }

  // The first of `keys` present, with the key it came from.
  template <typename T>
  std::optional<std::pair<std::string, T>> first_of(const std::vector<std::string>& keys) const {
    for (const std::string& key : keys) {
      if (auto value = optional<T>(key)) return std::pair{key, std::move(*value)};
    }
    return std::nullopt;
  }

  [[noreturn]] void fail_key(const std::string& key, std::string_view what) const {
    fail("{}: key '{}' {}", file_.string(), key, what);
  }
  [[noreturn]] void fail_missing(const std::string& key, std::string_view why) const {
    fail("{}: missing key '{}' ({})", file_.string(), key, why);
  }

 private:
  const json& root_;
  const fs::path& file_;
};

std::vector<int64_t> read_eos_token_ids(const Reader& reader) {
  const std::string key = "eos_token_id";
  const json* node = nullptr;
  if (find(reader.root(), key, node) != TPE_FOUND) return {};
  std::vector<int64_t> ids;
  const auto add = [&](const json& item) {
    int64_t id = 0;
    if (convert(item, id) != TPE_FOUND) {
      reader.fail_key(key, "must be an integer or a list of integers");
    }
    ids.push_back(id);
  };
  if (node->is_array()) {
    for (const json& item : *node) add(item);
  } else {
    add(*node);
  }
  return ids;
}

GenerationDefaults read_generation(const json& root, const fs::path& file) {
  const Reader reader(root, file);
  GenerationDefaults defaults;
  defaults.eos_token_ids = read_eos_token_ids(reader);
  defaults.bos_token_id = reader.optional<int64_t>("bos_token_id");
  defaults.pad_token_id = reader.optional<int64_t>("pad_token_id");
  defaults.do_sample = reader.optional<bool>("do_sample");
  defaults.temperature = reader.optional<double>("temperature");
  defaults.top_k = reader.optional<int64_t>("top_k");
  defaults.top_p = reader.optional<double>("top_p");
  defaults.repetition_penalty = reader.optional<double>("repetition_penalty");
  defaults.max_new_tokens = reader.optional<int64_t>("max_new_tokens");
  return defaults;
}

// 5.x keeps every rotary parameter in rope_parameters; 4.x keeps the scaling in rope_scaling and
// theta and the partial factor at top level. Returns the object's key, if there is one.
std::optional<std::string> rope_object(const Reader& reader) {
  for (const std::string key : {"rope_parameters", "rope_scaling"}) {
    const auto it = reader.root().find(key);
    if (it == reader.root().end() || it->is_null()) continue;
    if (!it->is_object()) reader.fail_key(key, "must be an object");
    return key;
  }
  return std::nullopt;
}

// `name` inside the rope object (when there is one), then the top-level fallbacks.
std::vector<std::string> rope_keys(const std::optional<std::string>& object, const char* name,
                                   std::initializer_list<const char*> fallbacks = {}) {
  std::vector<std::string> keys;
  if (object) keys.push_back(*object + "." + name);
  keys.insert(keys.end(), fallbacks.begin(), fallbacks.end());
  return keys;
}

// rope_type, or the older "type"; "default" when neither is there.
std::string rope_type_name(const Reader& reader, const std::optional<std::string>& object) {
  if (!object) return "default";
  if (auto found = reader.first_of<std::string>({*object + ".rope_type", *object + ".type"})) {
    return found->second;
  }
  // Models with several attention layer types (Gemma 3) nest one rope object per type.
  for (const auto& [name, value] : reader.root().at(*object).items()) {
    if (value.is_object()) {
      reader.fail_key(*object + "." + printable(name),
                      "holds rope parameters per layer type, which are not supported");
    }
  }
  return "default";
}

tpe_rope_type parse_rope_type(const std::string& name, const fs::path& file) {
  if (name == "default") return TPE_ROPE_DEFAULT;
  if (name == "linear") return TPE_ROPE_LINEAR;
  if (name == "dynamic") return TPE_ROPE_DYNAMIC;
  if (name == "llama3") return TPE_ROPE_LLAMA3;
  fail("{}: rope type '{}' is not supported (supported: default, linear, dynamic, llama3)",
       file.string(), printable(name));
}

// A rotary parameter in (0, max]; `fallback` when absent, or an error naming `required_by`.
template <typename T>
T rope_param(const Reader& reader, const std::vector<std::string>& keys, std::optional<T> fallback,
             const std::string& required_by = {},
             double max = std::numeric_limits<double>::infinity()) {
  const auto found = reader.first_of<T>(keys);
  if (!found) {
    if (!fallback) {
      reader.fail_missing(keys.front(), fmt::format("needed by rope type '{}'", required_by));
    }
    return *fallback;
  }
  const auto value = static_cast<double>(found->second);
  if (!(value > 0 && value <= max)) {
    reader.fail_key(found->first, std::isinf(max)
                                      ? fmt::format("must be > 0, got {}", value)
                                      : fmt::format("must be in (0, {}], got {}", max, value));
  }
  return found->second;
}

}  // namespace

ModelConfig ModelConfig::load(const std::filesystem::path& model_dir) {
  const fs::path config_file = model_dir / "config.json";
  ModelConfig config = from_json(parse_json_file(config_file), config_file);
  // transformers reads generation_config.json whole when it exists and ignores config.json's
  // generation keys then.
  const fs::path generation_file = model_dir / "generation_config.json";
  std::error_code ec;
  if (fs::exists(generation_file, ec)) {
    const nlohmann::json root = parse_json_file(generation_file);
    require_object(root, generation_file);
    config.generation_ = read_generation(root, generation_file);
  }
  return config;
}

ModelConfig ModelConfig::from_json(nlohmann::json config, std::filesystem::path source) {
  require_object(config, source);
  if (!Reader(config, source).optional<std::string>("model_type")) {
    fail("{}: missing key 'model_type'", source.string());
  }
  ModelConfig result;
  result.generation_ = read_generation(config, source);
  result.json_ = std::move(config);
  result.path_ = std::move(source);
  return result;
}

std::string ModelConfig::model_type() const { return json_.at("model_type").get<std::string>(); }

std::vector<std::string> ModelConfig::architectures() const {
  const nlohmann::json* node = nullptr;
  if (find(json_, "architectures", node) != TPE_FOUND) return {};
  const auto fail_type = [this] {
    Reader(json_, path_).fail_key("architectures", "must be a list of strings");
  };
  if (!node->is_array()) fail_type();
  std::vector<std::string> names;
  for (const nlohmann::json& item : *node) {
    if (!item.is_string()) fail_type();
    names.push_back(item.get<std::string>());
  }
  return names;
}

tpe_lookup ModelConfig::get_int(const std::string& key, int64_t& out) const {
  return lookup(json_, key, out);
}

tpe_lookup ModelConfig::get_float(const std::string& key, double& out) const {
  return lookup(json_, key, out);
}

tpe_lookup ModelConfig::get_bool(const std::string& key, bool& out) const {
  return lookup(json_, key, out);
}

tpe_lookup ModelConfig::get_string(const std::string& key, std::string& out) const {
  return lookup(json_, key, out);
}

tpe_rope_desc ModelConfig::rope() const {
  const Reader reader(json_, path_);
  const std::optional<std::string> object = rope_object(reader);
  const std::string type = rope_type_name(reader, object);
  tpe_rope_desc desc{};
  desc.struct_size = sizeof(tpe_rope_desc);
  desc.type = parse_rope_type(type, path_);
  desc.theta = rope_param<double>(
      reader, rope_keys(object, "rope_theta", {"rope_theta", "rotary_emb_base"}), 10000.0);
  desc.partial_rotary_factor = rope_param<double>(
      reader, rope_keys(object, "partial_rotary_factor", {"partial_rotary_factor", "rotary_pct"}),
      1.0, {}, 1.0);
  desc.factor = 1.0;
  if (desc.type == TPE_ROPE_DEFAULT) return desc;
  desc.factor = rope_param<double>(reader, rope_keys(object, "factor"), std::nullopt, type);
  if (desc.type == TPE_ROPE_LLAMA3) {
    desc.low_freq_factor =
        rope_param<double>(reader, rope_keys(object, "low_freq_factor"), std::nullopt, type);
    desc.high_freq_factor =
        rope_param<double>(reader, rope_keys(object, "high_freq_factor"), std::nullopt, type);
  }
  if (desc.type == TPE_ROPE_LLAMA3) {
    desc.original_max_position_embeddings = rope_param<int64_t>(
        reader, rope_keys(object, "original_max_position_embeddings"), std::nullopt, type);
  } else if (desc.type == TPE_ROPE_DYNAMIC) {
    // transformers scales dynamic NTK against max_position_embeddings, whatever the rope object
    // says about an original length.
    desc.original_max_position_embeddings =
        rope_param<int64_t>(reader, {"max_position_embeddings"}, std::nullopt, type);
  }
  return desc;
}

std::string ModelConfig::dtype() const {
  const auto found = Reader(json_, path_).first_of<std::string>({"dtype", "torch_dtype"});
  if (!found) return "float32";
  std::string_view name = found->second;
  if (name.starts_with("torch.")) name.remove_prefix(std::string_view("torch.").size());
  if (name == "float32" || name == "float16" || name == "bfloat16") return std::string(name);
  Reader(json_, path_)
      .fail_key(found->first,
                fmt::format("has unsupported value '{}' (supported: float32, float16, bfloat16)",
                            printable(found->second)));
}

}  // namespace tpe::config
