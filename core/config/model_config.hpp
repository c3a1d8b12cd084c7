// A checkpoint's config.json and generation_config.json, as transformers 4.x and 5.x write them.
// Lookups take dotted paths ("rope_scaling.factor") and report missing vs wrong type, so a policy
// can name the key it needed. Owns: reading those two files. May not touch: weights, graphs.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <tpengine/policy.h>
#include <nlohmann/json.hpp>

namespace tpe::config {

// Defaults for generation a user did not set, from generation_config.json (else config.json).
struct GenerationDefaults {
  std::vector<int64_t> eos_token_ids;
  std::optional<int64_t> bos_token_id;
  std::optional<int64_t> pad_token_id;
  std::optional<bool> do_sample;
  std::optional<double> temperature;
  std::optional<int64_t> top_k;
  std::optional<double> top_p;
  std::optional<double> repetition_penalty;
  std::optional<int64_t> max_new_tokens;
};

class ModelConfig {
 public:
  // Reads dir/config.json (required) and dir/generation_config.json (optional). Errors name the
  // file: missing, not JSON, not an object, no model_type.
  static ModelConfig load(const std::filesystem::path& model_dir);
  static ModelConfig from_json(nlohmann::json config, std::filesystem::path source);

  const std::filesystem::path& path() const { return path_; }  // config.json
  const nlohmann::json& json() const { return json_; }
  std::string model_type() const;
  std::vector<std::string> architectures() const;

  // Dotted-path lookups. A JSON null counts as missing. Integers are accepted as floats; floats
  // with an integral value are accepted as integers.
  tpe_lookup get_int(const std::string& key, int64_t& out) const;
  tpe_lookup get_float(const std::string& key, double& out) const;
  tpe_lookup get_bool(const std::string& key, bool& out) const;
  tpe_lookup get_string(const std::string& key, std::string& out) const;

  // Rotary parameters from rope_parameters (5.x) or rope_theta + rope_scaling + partial_rotary_
  // factor / rotary_pct (4.x). Throws tpe::Error naming config.json and the key on an unknown
  // rope type or a missing parameter of a known one.
  tpe_rope_desc rope() const;
  // "float32", "float16", "bfloat16" from dtype (5.x) or torch_dtype (4.x); "float32" if absent.
  std::string dtype() const;
  const GenerationDefaults& generation() const { return generation_; }

 private:
  std::filesystem::path path_;
  nlohmann::json json_;
  GenerationDefaults generation_;
};

}  // namespace tpe::config
