#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>

#include "core/common/error.hpp"
#include "core/config/run_config.hpp"

namespace {

namespace fs = std::filesystem;
using tpe::config::parse_run_config;
using tpe::config::RunConfig;

RunConfig parse(const std::string& text) { return parse_run_config(text, "cfg.toml", "/base"); }

// Parses `text` as cfg.toml, expecting a one-line tpe::Error that contains every one of `parts`.
void expect_error(const std::string& text, std::initializer_list<std::string> parts) {
  try {
    (void)parse(text);
    ADD_FAILURE() << "no tpe::Error for:\n" << text;
  } catch (const tpe::Error& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    }
  }
}

constexpr const char* kFull = R"(# every key
[model]
path = "models/x"
dtype = "bfloat16"

[parallel]
tp_size = 2

[inference]
device = "cpu"
kernel_inject = true
prefill_chunk = 512
max_batch = 4
cuda_graph = false
all_reduce = "auto"

[generation]
max_new_tokens = 32
do_sample = true
temperature = 0.7
top_k = 50
top_p = 0.9
repetition_penalty = 1.1
seed = 42
stop_token_ids = [2, 7]
ignore_eos = false

[policy]
name = "llama"
search_paths = ["./my_policies", "/opt/policies"]

[policy.injection_policy]
LlamaDecoderLayer = ["self_attn.o_proj", "mlp.down_proj"]
GPTNeoXLayer = ["attention.dense"]
)";

TEST(RunConfig, ReadsEveryKey) {
  const RunConfig config = parse(kFull);
  EXPECT_EQ(config.model_path, fs::path("/base/models/x"));
  EXPECT_EQ(config.dtype, "bfloat16");
  EXPECT_EQ(config.tp_size, 2);
  EXPECT_EQ(config.device, "cpu");
  EXPECT_EQ(config.kernel_inject, std::optional<bool>(true));
  EXPECT_EQ(config.prefill_chunk, 512);
  EXPECT_EQ(config.max_batch, 4);
  EXPECT_FALSE(config.cuda_graph);
  EXPECT_EQ(config.all_reduce, "auto");
  const auto& g = config.generation;
  EXPECT_EQ(g.max_new_tokens, 32);
  EXPECT_EQ(g.do_sample, true);
  EXPECT_DOUBLE_EQ(g.temperature.value(), 0.7);
  EXPECT_EQ(g.top_k, 50);
  EXPECT_DOUBLE_EQ(g.top_p.value(), 0.9);
  EXPECT_DOUBLE_EQ(g.repetition_penalty.value(), 1.1);
  EXPECT_EQ(g.seed, 42u);
  EXPECT_EQ(g.stop_token_ids, (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(g.ignore_eos, false);
  EXPECT_EQ(config.policy_name, "llama");
  EXPECT_EQ(config.policy_search_paths,
            (std::vector<fs::path>{"/base/./my_policies", "/opt/policies"}));
  const tpe::config::InjectionPolicy expected{
      {"LlamaDecoderLayer", {"self_attn.o_proj", "mlp.down_proj"}},
      {"GPTNeoXLayer", {"attention.dense"}}};
  EXPECT_EQ(config.injection_policy, expected);
}

TEST(RunConfig, EmptyFileGivesDefaults) {
  const RunConfig config = parse("");
  EXPECT_TRUE(config.model_path.empty());
  EXPECT_EQ(config.dtype, "auto");
  EXPECT_EQ(config.tp_size, 1);
  EXPECT_EQ(config.device, "cpu");
  EXPECT_FALSE(config.kernel_inject.has_value());  // auto
  EXPECT_EQ(config.prefill_chunk, 2048);
  EXPECT_EQ(config.max_batch, 32);
  EXPECT_TRUE(config.cuda_graph);
  EXPECT_EQ(config.all_reduce, "nccl");
  EXPECT_FALSE(config.policy_name.has_value());
  EXPECT_TRUE(config.policy_search_paths.empty());
  EXPECT_FALSE(config.injection_policy.has_value());
  EXPECT_TRUE(config.isolate_policies);
  EXPECT_FALSE(config.generation.max_new_tokens.has_value());
  EXPECT_FALSE(config.generation.temperature.has_value());
  EXPECT_FALSE(config.generation.stop_token_ids.has_value());
}

TEST(RunConfig, PluginsRunInProcessOnlyWhenAsked) {
  EXPECT_FALSE(parse("[policy]\nisolate = false\n").isolate_policies);
  expect_error("[policy]\nisolate = 0\n", {"cfg.toml:2: key 'policy.isolate' must be a boolean"});
}

TEST(RunConfig, PolicyShorthandForcesAPlugin) {
  EXPECT_EQ(parse("policy = \"gpt_neox\"\n").policy_name, "gpt_neox");
  expect_error("policy = 3\n", {"cfg.toml:1: key 'policy' must be a table, not an integer"});
}

TEST(RunConfig, AcceptsOtherSpellingsOfTheSameValues) {
  const RunConfig config = parse(R"(
model = { path = "/abs/model" }
parallel.tp_size = 1024
generation.temperature = 2
generation.top_p = 1
generation.stop_token_ids = []
[policy.injection_policy]
)");
  EXPECT_EQ(config.model_path, fs::path("/abs/model"));
  EXPECT_EQ(config.tp_size, 1024);
  EXPECT_DOUBLE_EQ(config.generation.temperature.value(), 2.0);
  EXPECT_DOUBLE_EQ(config.generation.top_p.value(), 1.0);
  EXPECT_EQ(config.generation.stop_token_ids, std::vector<int64_t>{});
  EXPECT_EQ(config.injection_policy, tpe::config::InjectionPolicy{});
}

TEST(RunConfig, RelativePathsStayRelativeWithoutBaseDir) {
  const RunConfig config = parse_run_config("[model]\npath = \"m\"\n", "cfg.toml", "");
  EXPECT_EQ(config.model_path, fs::path("m"));
}

TEST(RunConfig, UnknownKeys) {
  expect_error("[parallel]\n\ntp = 2\n", {"cfg.toml:3: unknown key 'parallel.tp'"});
  expect_error("[model]\npath = \"m\"\n\n\n[foo]\nx = 1\n", {"cfg.toml:5: unknown key 'foo'"});
  expect_error("bar = 1\n", {"cfg.toml:1: unknown key 'bar'"});
  expect_error("\ngeneration.top_q = 1\n", {"cfg.toml:2: unknown key 'generation.top_q'"});
  expect_error("model = { pth = \"m\" }\n", {"cfg.toml:1: unknown key 'model.pth'"});
  expect_error("[policy.other]\n", {"cfg.toml:1: unknown key 'policy.other'"});
}

TEST(RunConfig, WrongTypes) {
  expect_error("[parallel]\n\ntp_size = \"2\"\n",
               {"cfg.toml:3: key 'parallel.tp_size' must be an integer, not a string"});
  expect_error("[parallel]\ntp_size = 2.0\n",
               {"cfg.toml:2: key 'parallel.tp_size' must be an integer, not a float"});
  expect_error("model = 3\n", {"cfg.toml:1: key 'model' must be a table, not an integer"});
  expect_error("[model]\npath = [\"a\"]\n",
               {"cfg.toml:2: key 'model.path' must be a string, not an array"});
  expect_error("[inference]\nkernel_inject = \"yes\"\n",
               {"cfg.toml:2: key 'inference.kernel_inject' must be true, false or \"auto\", not a "
                "string"});
  EXPECT_FALSE(parse("[inference]\nkernel_inject = \"auto\"\n").kernel_inject.has_value());
  EXPECT_EQ(parse("[inference]\nkernel_inject = false\n").kernel_inject,
            std::optional<bool>(false));
  EXPECT_FALSE(parse("[inference]\n").fused_passes.has_value());  // all of them
  EXPECT_EQ(parse("[inference]\nfused_passes = [\"add_norm\", \"x\"]\n").fused_passes,
            std::optional<std::vector<std::string>>({"add_norm", "x"}));  // the engine checks names
  expect_error("[inference]\nfused_passes = \"add_norm\"\n",
               {"cfg.toml:2: key 'inference.fused_passes' must be an array, not a string"});
  expect_error("[generation]\ntemperature = \"hot\"\n",
               {"cfg.toml:2: key 'generation.temperature' must be a number, not a string"});
  expect_error("[generation]\ndo_sample = 1979-05-27\n",
               {"cfg.toml:2: key 'generation.do_sample' must be a boolean, not a date"});
  expect_error("[generation]\nstop_token_ids = 2\n",
               {"cfg.toml:2: key 'generation.stop_token_ids' must be an array, not an integer"});
  expect_error("[generation]\nstop_token_ids = [\n  2,\n  \"7\",\n]\n",
               {"cfg.toml:4: key 'generation.stop_token_ids[1]' must be an integer, not a string"});
  expect_error("[policy]\nsearch_paths = \"p\"\n",
               {"cfg.toml:2: key 'policy.search_paths' must be an array, not a string"});
  expect_error("[policy]\ninjection_policy = [\"x\"]\n",
               {"cfg.toml:2: key 'policy.injection_policy' must be a table, not an array"});
  expect_error("[policy.injection_policy]\nLlamaDecoderLayer = \"mlp.down_proj\"\n",
               {"cfg.toml:2: key 'policy.injection_policy.LlamaDecoderLayer' must be an array"});
  expect_error("[policy.injection_policy]\nBlock = [\"a\", 3]\n",
               {"cfg.toml:2: key 'policy.injection_policy.Block[1]' must be a string, not an "
                "integer"});
}

TEST(RunConfig, ValuesOutOfRange) {
  expect_error("[inference]\nprefill_chunk = 0\n",
               {"cfg.toml:2: key 'inference.prefill_chunk' must be in [1, 1048576], got 0"});
  expect_error("[inference]\nmax_batch = -3\n",
               {"cfg.toml:2: key 'inference.max_batch' must be in [1, 65536], got -3"});
  expect_error("[inference]\ncuda_graph = 1\n",
               {"cfg.toml:2: key 'inference.cuda_graph' must be a boolean, not an integer"});
  expect_error("[parallel]\ntp_size = 0\n",
               {"cfg.toml:2: key 'parallel.tp_size' must be in [1, 1024], got 0"});
  expect_error("[parallel]\ntp_size = 1025\n", {"must be in [1, 1024], got 1025"});
  expect_error("[generation]\n\n\n\n\n\ntop_p = 1.5\n",
               {"cfg.toml:7: key 'generation.top_p' must be in (0, 1], got 1.5"});
  expect_error("[generation]\ntop_p = 0.0\n", {"key 'generation.top_p' must be in (0, 1], got 0"});
  expect_error("[generation]\ntemperature = 0\n",
               {"cfg.toml:2: key 'generation.temperature' must be finite and > 0, got 0"});
  expect_error("[generation]\ntemperature = nan\n", {"'generation.temperature'", "got nan"});
  expect_error("[generation]\ntemperature = inf\n", {"'generation.temperature'", "got inf"});
  expect_error("[generation]\nrepetition_penalty = -1.0\n",
               {"key 'generation.repetition_penalty' must be finite and > 0, got -1"});
  expect_error("[generation]\nmax_new_tokens = -1\n",
               {"cfg.toml:2: key 'generation.max_new_tokens' must be >= 0, got -1"});
  expect_error("[generation]\ntop_k = -5\n", {"key 'generation.top_k' must be >= 0, got -5"});
  expect_error("[generation]\nseed = -1\n", {"key 'generation.seed' must be >= 0, got -1"});
  expect_error("[generation]\nstop_token_ids = [1, -2]\n",
               {"key 'generation.stop_token_ids[1]' must be >= 0, got -2"});
  expect_error("[model]\ndtype = \"fp16\"\n",
               {"cfg.toml:2: key 'model.dtype' must be one of auto, float32, float16, bfloat16, "
                "got 'fp16'"});
  expect_error("[inference]\ndevice = \"tpu\"\n",
               {"cfg.toml:2: key 'inference.device' must be one of cpu, cuda, got 'tpu'"});
  expect_error("[inference]\nall_reduce = \"nvls\"\n",
               {"cfg.toml:2: key 'inference.all_reduce' must be one of auto, nccl, got 'nvls'"});
  expect_error("[model]\npath = \"\"\n", {"cfg.toml:2: key 'model.path' must not be empty"});
  expect_error("[policy]\nname = \"\"\n", {"cfg.toml:2: key 'policy.name' must not be empty"});
}

TEST(RunConfig, SyntaxErrorsCarryTheirLine) {
  expect_error("[model]\npath = \"m\"\n[parallel]\ntp_size = = 2\n",
               {"cfg.toml:4: Error while parsing value"});
  expect_error("[parallel]\ntp_size = 2\ntp_size = 3\n",
               {"cfg.toml:3: ", "cannot redefine", "'tp_size'"});
  expect_error("[model]\npath = \"unterminated\n", {"cfg.toml:2: Error while parsing string"});
  expect_error("[model\n", {"cfg.toml:1: Error while parsing table header"});
}

TEST(RunConfig, ControlCharactersStayOutOfMessages) {
  expect_error("\"a\\nb\" = 1\n", {"cfg.toml:1: unknown key 'a\\x0ab'"});
  expect_error("[inference]\ndevice = \"cp\\nu\"\n", {"got 'cp\\x0au'"});
  expect_error("[model]\npath = \"a\\u0000b\"\n",
               {"cfg.toml:2: key 'model.path' must not contain a NUL character"});
}

// Inputs that reach failed preconditions and "unreachable" code inside toml++ 3.3.0 (upstream
// issues #190 and #295, pull request #301); the packaged library still answers with an error.
TEST(RunConfig, TomlppEdgeCasesStayErrors) {
  expect_error("[[[1]]]\n", {"cfg.toml:1: Error while parsing key"});
  expect_error("[\n", {"cfg.toml:1: Error while parsing key"});
  expect_error("\xcc\xaa", {"cfg.toml:1: "});
  expect_error("model\xd2\x89 = 1\n", {"cfg.toml:1: "});
  expect_error("s = \"\"\"\\\n\xc2\xa7\"\"\"\n", {"cfg.toml:1: unknown key 's'"});
}

// A fresh folder holding cfg.toml, removed at the end of the test.
class TomlDir {
 public:
  TomlDir() {
    std::string pattern = (fs::temp_directory_path() / "tpe_run_config_XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TomlDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TomlDir(const TomlDir&) = delete;
  TomlDir& operator=(const TomlDir&) = delete;

  fs::path write(const std::string& text) const {
    std::ofstream(path_ / "cfg.toml") << text;
    return path_ / "cfg.toml";
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

TEST(RunConfig, LoadResolvesAgainstTheFilesFolder) {
  const TomlDir dir;
  const fs::path file =
      dir.write("[model]\npath = \"models/x\"\n[policy]\nsearch_paths = [\"p\"]\n");
  const RunConfig config = tpe::config::load_run_config(file);
  EXPECT_EQ(config.model_path, dir.path() / "models/x");
  EXPECT_EQ(config.policy_search_paths, std::vector<fs::path>{dir.path() / "p"});
}

TEST(RunConfig, LoadErrorsNameThePath) {
  const TomlDir dir;
  const fs::path file = dir.write("[parallel]\ntp_size = 0\n");
  try {
    (void)tpe::config::load_run_config(file);
    ADD_FAILURE() << "no error";
  } catch (const tpe::Error& e) {
    EXPECT_EQ(std::string(e.what()), file.string() +
                                         ":2: key 'parallel.tp_size' must be in [1, "
                                         "1024], got 0");
  }
  for (const auto& [bad, why] : {std::pair{dir.path() / "absent.toml", ": not found"},
                                 std::pair{dir.path(), ": is a directory, not a file"}}) {
    try {
      (void)tpe::config::load_run_config(bad);
      ADD_FAILURE() << "no error for " << bad;
    } catch (const tpe::Error& e) {
      EXPECT_EQ(std::string(e.what()), bad.string() + why);
    }
  }
}

}  // namespace
