// SmolLM2-135M-Instruct from its GGUF file (Q4_1, dequantized to fp32) against transformers
// loading the same file (tests/real/smollm2, made by tools/make_real_refs.py): the prompts'
// ids from the GGUF's tokenizer, the last position's logits within 1e-4 x max |logit|, and 32
// greedy tokens, at TP 1, 2 and 3 on the CPU; on one GPU (RealSmolLm2Cuda, built with CUDA) the
// same in fp32 and the first 16 greedy tokens in bf16. The file is fetched by
// tools/fetch-smollm2.sh; smollm2.sh passes its path in TPE_SMOLLM2_GGUF.
#include <gtest/gtest.h>
#ifdef TPE_REAL_CUDA
#include <cuda_runtime_api.h>
#endif

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/io/safetensors.hpp"
#include "core/runtime/engine.hpp"
#include "core/tokenizer/chat_template.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe::test {
namespace {

namespace fs = std::filesystem;

fs::path model_file() {
  const char* path = std::getenv("TPE_SMOLLM2_GGUF");
  if (path == nullptr) {
    ADD_FAILURE() << "TPE_SMOLLM2_GGUF is not set: run tests/real/smollm2.sh";
    return {};
  }
  return path;
}

struct RealReference {
  std::vector<std::string> texts;
  std::vector<std::vector<int64_t>> prompts;
  std::vector<std::vector<int64_t>> greedy;
  std::vector<Tensor> last_logits;  // per prompt [1, vocab]
};

RealReference load() {
  const fs::path dir = fs::path(TPE_REAL_DIR) / "smollm2";
  std::ifstream in(dir / "reference.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  RealReference ref;
  ref.texts = j.at("texts").get<std::vector<std::string>>();
  ref.prompts = j.at("prompts").get<std::vector<std::vector<int64_t>>>();
  ref.greedy = j.at("greedy").get<std::vector<std::vector<int64_t>>>();
  const auto file = io::SafetensorsFile::open(dir / "reference.safetensors");
  for (size_t i = 0; i < ref.prompts.size(); ++i) {
    const io::TensorInfo* info = file->find("last." + std::to_string(i));
    EXPECT_NE(info, nullptr) << i;
    if (info == nullptr) continue;
    Tensor t({1, info->shape[0]});
    t.data = file->read_f32(*info, info->shape, {}, {});
    ref.last_logits.push_back(std::move(t));
  }
  return ref;
}

TEST(RealSmolLm2, TokenizerFromTheGgufGivesTransformersIds) {
  const RealReference ref = load();
  const tokenizer::Tokenizer tokenizer = runtime::load_tokenizer(model_file());
  for (size_t i = 0; i < ref.texts.size(); ++i) {
    const std::vector<uint32_t> ids = tokenizer.encode(ref.texts[i]);
    EXPECT_EQ(std::vector<int64_t>(ids.begin(), ids.end()), ref.prompts[i]) << ref.texts[i];
  }
}

config::RunConfig real_run(int tp, const std::string& device, const std::string& dtype) {
  config::RunConfig run;
  run.model_path = model_file();
  run.tp_size = tp;
  run.device = device;
  run.dtype = dtype;
  return run;
}

// Each prompt's last-position logits, [1, vocab].
std::vector<Tensor> last_logits(runtime::Engine& engine, const RealReference& ref) {
  std::vector<Tensor> last;
  for (const Tensor& all : engine.prompt_logits(ref.prompts)) {
    Tensor t({1, all.shape[1]});
    t.data.assign(all.data.end() - all.shape[1], all.data.end());
    last.push_back(std::move(t));
  }
  return last;
}

// The last position's logits of each prompt within tolerance x max |logit| of transformers',
// and its greedy tokens (the first max_new).
void expect_transformers(runtime::Engine& engine, const RealReference& ref, float tolerance,
                         size_t max_new) {
  const float error = logits_error(last_logits(engine, ref), ref.last_logits);
  EXPECT_LE(error, tolerance);
  testing::Test::RecordProperty("max_rel_error", std::to_string(error));
  runtime::GenerationParams params;
  params.max_new_tokens = static_cast<int64_t>(max_new);
  const auto out = engine.generate(ref.prompts, params);
  ASSERT_EQ(out.size(), ref.greedy.size());
  for (size_t p = 0; p < out.size(); ++p) {
    const std::vector<int64_t> want(ref.greedy[p].begin(), ref.greedy[p].begin() + max_new);
    EXPECT_EQ(out[p], want) << "prompt " << p << ": " << ref.texts[p];
  }
}

class RealSmolLm2Tp : public testing::TestWithParam<int> {};

TEST_P(RealSmolLm2Tp, LogitsAndGreedyTokensMatchTransformers) {
  const RealReference ref = load();
  runtime::Engine engine(runtime::prepare(real_run(GetParam(), "cpu", "auto")), /*quiet=*/true);
  expect_transformers(engine, ref, 1e-4f, ref.greedy[0].size());
}

INSTANTIATE_TEST_SUITE_P(Tp, RealSmolLm2Tp, testing::Values(1, 2, 3));

#ifdef TPE_REAL_CUDA
class RealSmolLm2Cuda : public testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(RealSmolLm2Cuda, Fp32LogitsAndGreedyTokensMatchTransformers) {
  const RealReference ref = load();
  runtime::Engine engine(runtime::prepare(real_run(1, "cuda", "float32")), /*quiet=*/true);
  expect_transformers(engine, ref, 1e-4f, ref.greedy[0].size());
}

// bf16 rounds every weight and activation: its logits are compared at bf16's precision, and its
// first 16 greedy tokens with transformers' own in bf16. Those depend on the attention
// implementation where rounding flips a near tie (eager and sdpa disagree on 2 of the 5
// prompts), so each prompt's tokens must be one of the two.
TEST_F(RealSmolLm2Cuda, Bf16GreedyTokensAreTransformersBf16) {
  const RealReference ref = load();
  std::ifstream in(fs::path(TPE_REAL_DIR) / "smollm2" / "reference.json");
  const nlohmann::json bf16 = nlohmann::json::parse(in).at("greedy_bf16");
  const auto eager = bf16.at("eager").get<std::vector<std::vector<int64_t>>>();
  const auto sdpa = bf16.at("sdpa").get<std::vector<std::vector<int64_t>>>();
  runtime::Engine engine(runtime::prepare(real_run(1, "cuda", "bfloat16")), /*quiet=*/true);
  EXPECT_LE(logits_error(last_logits(engine, ref), ref.last_logits), 3e-2f);
  runtime::GenerationParams params;
  params.max_new_tokens = static_cast<int64_t>(eager[0].size());
  const auto out = engine.generate(ref.prompts, params);
  ASSERT_EQ(out.size(), eager.size());
  for (size_t p = 0; p < out.size(); ++p) {
    EXPECT_TRUE(out[p] == eager[p] || out[p] == sdpa[p])
        << "prompt " << p << " (" << ref.texts[p] << "): " << testing::PrintToString(out[p])
        << " is neither transformers' bf16 eager " << testing::PrintToString(eager[p])
        << " nor sdpa " << testing::PrintToString(sdpa[p]);
  }
}
#endif

// A chat turn: the model's template from the GGUF, rendered and encoded as apply_chat_template
// does, then its greedy answer.
TEST(RealSmolLm2, ChatTurnAsTransformers) {
  const fs::path dir = fs::path(TPE_REAL_DIR) / "smollm2";
  std::ifstream in(dir / "reference.json");
  const nlohmann::json chat = nlohmann::json::parse(in).at("chat");
  const runtime::ChatTemplate t = runtime::load_chat_template(model_file());
  const std::string text = tokenizer::render_chat_template(
      t.text, t.source, {{"user", chat.at("message").get<std::string>()}}, true, t.variables);
  const std::vector<uint32_t> ids =
      runtime::load_tokenizer(model_file()).encode(text, /*add_special_tokens=*/false);
  const std::vector<int64_t> prompt(ids.begin(), ids.end());
  EXPECT_EQ(prompt, chat.at("ids").get<std::vector<int64_t>>());
  config::RunConfig run;
  run.model_path = model_file();
  run.tp_size = 2;
  runtime::Engine engine(runtime::prepare(run), /*quiet=*/true);
  runtime::GenerationParams params;
  const auto want = chat.at("greedy").get<std::vector<int64_t>>();
  params.max_new_tokens = static_cast<int64_t>(want.size());
  EXPECT_EQ(engine.generate({prompt}, params)[0], want);
}

}  // namespace
}  // namespace tpe::test
