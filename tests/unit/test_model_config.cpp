#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>

#include "core/common/error.hpp"
#include "core/config/model_config.hpp"
#include "tests/unit/expect_error.hpp"

namespace {

namespace fs = std::filesystem;
using tpe::config::ModelConfig;

// A fresh model folder, removed with everything in it at the end of the test.
class ModelDir {
 public:
  ModelDir() {
    std::string pattern = (fs::temp_directory_path() / "tpe_model_config_XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~ModelDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  ModelDir(const ModelDir&) = delete;
  ModelDir& operator=(const ModelDir&) = delete;

  const fs::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name) << text;
  }
  ModelConfig load_config(const std::string& config_json) const {
    write("config.json", config_json);
    return ModelConfig::load(path_);
  }

 private:
  fs::path path_;
};

// Runs `action`, expecting a one-line tpe::Error that contains every one of `parts`.
using tpe::testing::expect_error;

void expect_rope_error(const std::string& config_json, std::initializer_list<std::string> parts) {
  const ModelDir dir;
  const ModelConfig config = dir.load_config(config_json);
  expect_error([&] { (void)config.rope(); }, parts);
}

// A tiny Llama as transformers 5.x saves it.
constexpr const char* kLlama5 = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 1,
  "dtype": "float32",
  "eos_token_id": 2,
  "head_dim": 16,
  "hidden_act": "silu",
  "hidden_size": 64,
  "max_position_embeddings": 128,
  "model_type": "llama",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pad_token_id": null,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 64, "rope_theta": 10000.0,
                      "rope_type": "llama3"},
  "tie_word_embeddings": false,
  "transformers_version": "5.0.0",
  "vocab_size": 256
})";

// GPT-NeoX as transformers 5.x saves it.
constexpr const char* kNeox5 = R"({
  "architectures": ["GPTNeoXForCausalLM"],
  "dtype": "float16",
  "hidden_size": 64,
  "max_position_embeddings": 128,
  "model_type": "gpt_neox",
  "num_attention_heads": 4,
  "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"},
  "use_parallel_residual": true,
  "vocab_size": 256
})";

// Llama 3.1 as transformers 4.x saves it.
constexpr const char* kLlama4 = R"({
  "architectures": ["LlamaForCausalLM"],
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "max_position_embeddings": 131072,
  "model_type": "llama",
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0"
})";

// GPT-NeoX (Pythia) as transformers 4.x saves it.
constexpr const char* kNeox4 = R"({
  "architectures": ["GPTNeoXForCausalLM"],
  "bos_token_id": 0,
  "eos_token_id": 0,
  "max_position_embeddings": 2048,
  "model_type": "gpt_neox",
  "rope_scaling": null,
  "rotary_emb_base": 10000,
  "rotary_pct": 0.25,
  "torch_dtype": "float16",
  "transformers_version": "4.24.0"
})";

TEST(ModelConfig, ReadsTransformers5Llama3Rope) {
  const ModelDir dir;
  const ModelConfig config = dir.load_config(kLlama5);
  EXPECT_EQ(config.model_type(), "llama");
  EXPECT_EQ(config.architectures(), std::vector<std::string>{"LlamaForCausalLM"});
  EXPECT_EQ(config.path(), dir.path() / "config.json");
  const tpe_rope_desc rope = config.rope();
  EXPECT_EQ(rope.struct_size, sizeof(tpe_rope_desc));
  EXPECT_EQ(rope.type, TPE_ROPE_LLAMA3);
  EXPECT_DOUBLE_EQ(rope.theta, 10000.0);
  EXPECT_DOUBLE_EQ(rope.partial_rotary_factor, 1.0);
  EXPECT_DOUBLE_EQ(rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(rope.high_freq_factor, 4.0);
  EXPECT_EQ(rope.original_max_position_embeddings, 64);
  EXPECT_EQ(config.dtype(), "float32");
}

TEST(ModelConfig, ReadsTransformers5NeoxPartialRotary) {
  const ModelDir dir;
  const tpe_rope_desc rope = dir.load_config(kNeox5).rope();
  EXPECT_EQ(rope.type, TPE_ROPE_DEFAULT);
  EXPECT_DOUBLE_EQ(rope.theta, 10000.0);
  EXPECT_DOUBLE_EQ(rope.partial_rotary_factor, 0.5);
  EXPECT_DOUBLE_EQ(rope.factor, 1.0);
}

TEST(ModelConfig, ReadsTransformers4Llama3Rope) {
  const ModelDir dir;
  const ModelConfig config = dir.load_config(kLlama4);
  const tpe_rope_desc rope = config.rope();
  EXPECT_EQ(rope.type, TPE_ROPE_LLAMA3);
  EXPECT_DOUBLE_EQ(rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(rope.high_freq_factor, 4.0);
  EXPECT_EQ(rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(config.dtype(), "bfloat16");
}

TEST(ModelConfig, ReadsTransformers4NeoxRotaryPctAndBase) {
  const ModelDir dir;
  const ModelConfig config = dir.load_config(kNeox4);
  const tpe_rope_desc rope = config.rope();
  EXPECT_EQ(rope.type, TPE_ROPE_DEFAULT);
  EXPECT_DOUBLE_EQ(rope.theta, 10000.0);
  EXPECT_DOUBLE_EQ(rope.partial_rotary_factor, 0.25);
  EXPECT_EQ(config.dtype(), "float16");
}

TEST(ModelConfig, ReadsOldLinearScalingWithTypeKey) {
  const ModelDir dir;
  const tpe_rope_desc rope =
      dir.load_config(
             R"({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}})")
          .rope();
  EXPECT_EQ(rope.type, TPE_ROPE_LINEAR);
  EXPECT_DOUBLE_EQ(rope.factor, 2.0);
  EXPECT_DOUBLE_EQ(rope.theta, 10000.0);
}

TEST(ModelConfig, DynamicTakesOriginalMaxFromTopLevelWhenAbsent) {
  const ModelDir dir;
  const tpe_rope_desc rope = dir.load_config(R"({"model_type": "llama",
      "max_position_embeddings": 2048, "rope_scaling": {"type": "dynamic", "factor": 2.0}})")
                                 .rope();
  EXPECT_EQ(rope.type, TPE_ROPE_DYNAMIC);
  EXPECT_DOUBLE_EQ(rope.factor, 2.0);
  EXPECT_EQ(rope.original_max_position_embeddings, 2048);
}

// transformers' _compute_dynamic_ntk_parameters reads config.max_position_embeddings only.
TEST(ModelConfig, DynamicScalesAgainstMaxPositionEmbeddings) {
  const ModelDir dir;
  const tpe_rope_desc rope = dir.load_config(R"({"model_type": "llama",
      "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "dynamic",
      "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 1024.0}})")
                                 .rope();
  EXPECT_EQ(rope.original_max_position_embeddings, 4096);
}

TEST(ModelConfig, RopeDefaultsWithoutAnyRopeKeys) {
  const ModelDir dir;
  const tpe_rope_desc rope = dir.load_config(R"({"model_type": "llama"})").rope();
  EXPECT_EQ(rope.struct_size, sizeof(tpe_rope_desc));
  EXPECT_EQ(rope.type, TPE_ROPE_DEFAULT);
  EXPECT_DOUBLE_EQ(rope.theta, 10000.0);
  EXPECT_DOUBLE_EQ(rope.partial_rotary_factor, 1.0);
  EXPECT_DOUBLE_EQ(rope.factor, 1.0);
}

TEST(ModelConfig, RopeNullScalingWithTopLevelTheta) {
  const ModelDir dir;
  const tpe_rope_desc rope = dir.load_config(R"({"model_type": "qwen2", "rope_scaling": null,
      "rope_theta": 1000000.0, "partial_rotary_factor": 0.5})")
                                 .rope();
  EXPECT_EQ(rope.type, TPE_ROPE_DEFAULT);
  EXPECT_DOUBLE_EQ(rope.theta, 1000000.0);
  EXPECT_DOUBLE_EQ(rope.partial_rotary_factor, 0.5);
}

TEST(ModelConfig, RejectsUnsupportedRopeTypes) {
  expect_rope_error(
      R"({"model_type": "qwen2", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})",
      {"config.json: rope type 'yarn' is not supported",
       "(supported: default, linear, dynamic, llama3)"});
  expect_rope_error(R"({"model_type": "phi3", "rope_scaling": {"type": "longrope"}})",
                    {"config.json", "rope type 'longrope' is not supported"});
}

TEST(ModelConfig, RejectsMissingRopeParameters) {
  expect_rope_error(R"({"model_type": "llama", "rope_parameters": {"rope_type": "llama3",
      "factor": 8.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 64}})",
                    {"config.json: missing key 'rope_parameters.high_freq_factor'", "'llama3'"});
  expect_rope_error(R"({"model_type": "llama", "rope_scaling": {"rope_type": "llama3",
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}})",
                    {"config.json: missing key 'rope_scaling.original_max_position_embeddings'"});
  expect_rope_error(R"({"model_type": "llama", "rope_scaling": {"type": "linear"}})",
                    {"config.json: missing key 'rope_scaling.factor'", "'linear'"});
  expect_rope_error(R"({"model_type": "llama", "rope_scaling": {"type": "dynamic", "factor": 2}})",
                    {"config.json: missing key 'max_position_embeddings'", "'dynamic'"});
}

TEST(ModelConfig, RejectsBadRopeValues) {
  expect_rope_error(R"({"model_type": "llama", "rope_scaling": "linear"})",
                    {"config.json: key 'rope_scaling' must be an object"});
  expect_rope_error(R"({"model_type": "llama", "rope_theta": -1})",
                    {"config.json: key 'rope_theta' must be > 0, got -1"});
  expect_rope_error(R"({"model_type": "llama", "rope_theta": "10000"})",
                    {"config.json: key 'rope_theta' must be a number"});
  expect_rope_error(R"({"model_type": "gpt_neox", "rotary_pct": 1.5})",
                    {"config.json: key 'rotary_pct' must be in (0, 1], got 1.5"});
  expect_rope_error(R"({"model_type": "llama", "rope_parameters": {"rope_type": 3}})",
                    {"config.json: key 'rope_parameters.rope_type' must be a string"});
  expect_rope_error(R"({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 0}})",
                    {"config.json: key 'rope_scaling.factor' must be > 0, got 0"});
  expect_rope_error(R"({"model_type": "llama", "rope_scaling": {"type": "ya\nrn"}})",
                    {"rope type 'ya\\x0arn'"});
  expect_rope_error(R"({"model_type": "gemma3_text", "rope_parameters": {
      "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}})",
                    {"config.json: key 'rope_parameters.full_attention' holds rope parameters "
                     "per layer type, which are not supported"});
}

TEST(ModelConfig, DtypeSpellings) {
  const ModelDir dir;
  EXPECT_EQ(dir.load_config(R"({"model_type": "x"})").dtype(), "float32");
  EXPECT_EQ(dir.load_config(R"({"model_type": "x", "torch_dtype": "torch.float16"})").dtype(),
            "float16");
  EXPECT_EQ(dir.load_config(R"({"model_type": "x", "dtype": "bfloat16", "torch_dtype": "float32"})")
                .dtype(),
            "bfloat16");
  EXPECT_EQ(
      dir.load_config(R"({"model_type": "x", "dtype": null, "torch_dtype": "float16"})").dtype(),
      "float16");
  const ModelConfig f64 = dir.load_config(R"({"model_type": "x", "torch_dtype": "float64"})");
  expect_error([&] { (void)f64.dtype(); },
               {"config.json: key 'torch_dtype' has unsupported value 'float64'"});
  const ModelConfig number = dir.load_config(R"({"model_type": "x", "dtype": 16})");
  expect_error([&] { (void)number.dtype(); }, {"config.json: key 'dtype' must be a string"});
}

TEST(ModelConfig, LookupsFollowDottedPaths) {
  const ModelDir dir;
  const ModelConfig config = dir.load_config(kLlama4);
  double factor = 0;
  EXPECT_EQ(config.get_float("rope_scaling.factor", factor), TPE_FOUND);
  EXPECT_DOUBLE_EQ(factor, 8.0);
  std::string type;
  EXPECT_EQ(config.get_string("rope_scaling.rope_type", type), TPE_FOUND);
  EXPECT_EQ(type, "llama3");
  int64_t value = 0;
  EXPECT_EQ(config.get_int("rope_scaling.missing", value), TPE_MISSING);
  EXPECT_EQ(config.get_int("nope.factor", value), TPE_MISSING);
  EXPECT_EQ(config.get_int("rope_theta.factor", value), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_int("", value), TPE_MISSING);
}

TEST(ModelConfig, LookupTypeRules) {
  const ModelDir dir;
  const ModelConfig config = dir.load_config(R"({"model_type": "x", "whole": 2048.0,
      "fraction": 0.5, "count": 7, "flag": true, "nothing": null, "parent": null, "name": "n",
      "huge": 1e300, "unsigned": 18446744073709551615, "negative": -3})");
  int64_t i = 0;
  double d = 0;
  bool b = false;
  std::string s;
  EXPECT_EQ(config.get_int("whole", i), TPE_FOUND);
  EXPECT_EQ(i, 2048);
  EXPECT_EQ(config.get_int("negative", i), TPE_FOUND);
  EXPECT_EQ(i, -3);
  EXPECT_EQ(config.get_int("fraction", i), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_int("flag", i), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_int("huge", i), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_int("unsigned", i), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_int("nothing", i), TPE_MISSING);
  EXPECT_EQ(config.get_int("parent.child", i), TPE_MISSING);
  EXPECT_EQ(config.get_float("count", d), TPE_FOUND);
  EXPECT_DOUBLE_EQ(d, 7.0);
  EXPECT_EQ(config.get_float("unsigned", d), TPE_FOUND);
  EXPECT_EQ(config.get_float("flag", d), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_float("name", d), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_bool("flag", b), TPE_FOUND);
  EXPECT_TRUE(b);
  EXPECT_EQ(config.get_bool("count", b), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_string("name", s), TPE_FOUND);
  EXPECT_EQ(s, "n");
  EXPECT_EQ(config.get_string("count", s), TPE_WRONG_TYPE);
  EXPECT_EQ(config.get_string("nothing", s), TPE_MISSING);
}

TEST(ModelConfig, LoadErrors) {
  const ModelDir dir;
  expect_error([&] { (void)ModelConfig::load(dir.path() / "absent"); },
               {(dir.path() / "absent" / "config.json").string() + ": not found"});
  fs::create_directory(dir.path() / "folder");
  fs::create_directory(dir.path() / "folder" / "config.json");
  expect_error([&] { (void)ModelConfig::load(dir.path() / "folder"); },
               {(dir.path() / "folder" / "config.json").string() + ": is a directory, not a file"});
  dir.write("config.json", R"({"model_type": "llama",)");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("config.json") + ": not valid JSON: ", "unexpected end of input"});
  dir.write("config.json", "{\n  \"model_type\": \"llama\"\n  \"x\": 1\n}");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("config.json") + ": not valid JSON: ", "line 3"});
  dir.write("config.json", R"(["llama"])");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("config.json") + ": expected a JSON object"});
  dir.write("config.json", R"({"hidden_size": 64})");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("config.json") + ": missing key 'model_type'"});
  dir.write("config.json", R"({"model_type": null})");
  expect_error([&] { (void)ModelConfig::load(dir.path()); }, {"missing key 'model_type'"});
  dir.write("config.json", R"({"model_type": 3})");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("config.json") + ": key 'model_type' must be a string"});
}

TEST(ModelConfig, JsonParserPrefixIsDropped) {
  const ModelDir dir;
  dir.write("config.json", "{");
  try {
    (void)ModelConfig::load(dir.path());
    ADD_FAILURE() << "no error";
  } catch (const tpe::Error& e) {
    EXPECT_EQ(std::string(e.what()).find("[json.exception"), std::string::npos) << e.what();
  }
}

TEST(ModelConfig, ArchitecturesMustBeStrings) {
  const ModelDir dir;
  EXPECT_TRUE(dir.load_config(R"({"model_type": "x"})").architectures().empty());
  const ModelConfig config = dir.load_config(R"({"model_type": "x", "architectures": [1]})");
  expect_error([&] { (void)config.architectures(); },
               {"config.json: key 'architectures' must be a list of strings"});
  const ModelConfig single = dir.load_config(R"({"model_type": "x", "architectures": "X"})");
  expect_error([&] { (void)single.architectures(); }, {"key 'architectures'"});
}

TEST(ModelConfig, GenerationFromGenerationConfigJson) {
  const ModelDir dir;
  dir.write("generation_config.json", R"({
  "bos_token_id": 128000,
  "do_sample": true,
  "eos_token_id": [128001, 128008, 128009],
  "temperature": 0.6,
  "top_p": 0.9,
  "transformers_version": "4.45.0.dev0"
})");
  // config.json's generation keys are ignored once generation_config.json exists.
  const ModelConfig config = dir.load_config(R"({"model_type": "llama", "eos_token_id": 5,
      "top_k": 3, "max_new_tokens": 9})");
  const auto& g = config.generation();
  EXPECT_EQ(g.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(g.bos_token_id, 128000);
  EXPECT_FALSE(g.pad_token_id.has_value());
  EXPECT_EQ(g.do_sample, true);
  EXPECT_DOUBLE_EQ(g.temperature.value(), 0.6);
  EXPECT_DOUBLE_EQ(g.top_p.value(), 0.9);
  EXPECT_FALSE(g.top_k.has_value());
  EXPECT_FALSE(g.max_new_tokens.has_value());
  EXPECT_FALSE(g.repetition_penalty.has_value());
}

TEST(ModelConfig, GenerationFallsBackToConfigJson) {
  const ModelDir dir;
  const ModelConfig config = dir.load_config(R"({"model_type": "gpt2", "eos_token_id": 50256,
      "bos_token_id": 50256, "pad_token_id": -1, "do_sample": false, "temperature": 1,
      "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.1, "max_new_tokens": 20.0})");
  const auto& g = config.generation();
  EXPECT_EQ(g.eos_token_ids, std::vector<int64_t>{50256});
  EXPECT_EQ(g.bos_token_id, 50256);
  EXPECT_EQ(g.pad_token_id, -1);
  EXPECT_EQ(g.do_sample, false);
  EXPECT_DOUBLE_EQ(g.temperature.value(), 1.0);
  EXPECT_EQ(g.top_k, 50);
  EXPECT_DOUBLE_EQ(g.top_p.value(), 1.0);
  EXPECT_DOUBLE_EQ(g.repetition_penalty.value(), 1.1);
  EXPECT_EQ(g.max_new_tokens, 20);
}

TEST(ModelConfig, GenerationConfigErrors) {
  const ModelDir dir;
  dir.write("config.json", R"({"model_type": "llama"})");
  dir.write("generation_config.json", R"({"eos_token_id": )");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("generation_config.json") + ": not valid JSON: "});
  dir.write("generation_config.json", "[]");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("generation_config.json") + ": expected a JSON object"});
  dir.write("generation_config.json", R"({"top_k": "50"})");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("generation_config.json") + ": key 'top_k' must be an integer"});
  dir.write("generation_config.json", R"({"eos_token_id": [2, "x"]})");
  expect_error([&] { (void)ModelConfig::load(dir.path()); },
               {dir.file("generation_config.json") +
                ": key 'eos_token_id' must be an integer or a list of integers"});
  dir.write("generation_config.json", R"({"do_sample": 1})");
  expect_error([&] { (void)ModelConfig::load(dir.path()); }, {"key 'do_sample' must be a boolean"});
}

TEST(ModelConfig, FromJsonNamesItsSource) {
  const ModelConfig config =
      ModelConfig::from_json(nlohmann::json::parse(kNeox4), "memory/config.json");
  EXPECT_EQ(config.path(), "memory/config.json");
  EXPECT_EQ(config.model_type(), "gpt_neox");
  EXPECT_EQ(config.generation().eos_token_ids, std::vector<int64_t>{0});
  expect_error([] { (void)ModelConfig::from_json(nlohmann::json(3), "memory/config.json"); },
               {"memory/config.json: expected a JSON object"});
  expect_error([] { (void)ModelConfig::from_json(nlohmann::json::object(), "m/config.json"); },
               {"m/config.json: missing key 'model_type'"});
}

}  // namespace
