// The engine on GPUs against transformers: every fixture at TP 1 in fp32 within 1e-3 x max
// |logit| with transformers' greedy tokens; in bf16 and fp16 the same first 8 greedy tokens as
// fp32; and TP 2 (where two GPUs exist) equal to TP 1. Skipped, with the reason, without GPUs.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/common/error.hpp"

#include "core/runtime/engine.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe::test {
namespace {

int gpu_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

runtime::Engine make_engine(const std::string& fixture, int tp, const std::string& dtype) {
  config::RunConfig run;
  run.model_path = fixture_dir(fixture);
  run.tp_size = tp;
  run.device = "cuda";
  run.dtype = dtype;
  return runtime::Engine(runtime::prepare(run), /*quiet=*/true);
}

// max |a - b| / max |b| over all prompts.
float relative_error(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  float diff = 0, scale = 0;
  for (size_t p = 0; p < b.size(); ++p) {
    for (size_t i = 0; i < b[p].data.size(); ++i) {
      diff = std::max(diff, std::abs(a[p].data[i] - b[p].data[i]));
      scale = std::max(scale, std::abs(b[p].data[i]));
    }
  }
  return diff / scale;
}

class GpuFixture : public testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (gpu_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(GpuFixture, Fp32MatchesTransformers) {
  const Reference ref = load_reference(GetParam());
  runtime::Engine engine = make_engine(GetParam(), 1, "float32");
  const float error = relative_error(engine.prompt_logits(ref.prompts), ref.logits);
  EXPECT_LE(error, 1e-3f);
  runtime::GenerationParams params;
  params.max_new_tokens = 16;
  EXPECT_EQ(engine.generate(ref.prompts, params), ref.greedy);
  RecordProperty("max_rel_error", std::to_string(error));
}

TEST_P(GpuFixture, HalfPrecisionKeepsTheFirstEightGreedyTokens) {
  const Reference ref = load_reference(GetParam());
  runtime::GenerationParams params;
  params.max_new_tokens = 8;
  for (const char* dtype : {"bfloat16", "float16"}) {
    runtime::Engine engine = make_engine(GetParam(), 1, dtype);
    const auto out = engine.generate(ref.prompts, params);
    for (size_t p = 0; p < out.size(); ++p) {
      const std::vector<int64_t> first8(ref.greedy[p].begin(), ref.greedy[p].begin() + 8);
      EXPECT_EQ(out[p], first8) << dtype << " prompt " << p;
    }
    EXPECT_LE(relative_error(engine.prompt_logits(ref.prompts), ref.logits), 3e-2f) << dtype;
  }
}

TEST_P(GpuFixture, TwoGpusEqualOne) {
  if (gpu_count() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpu_count();
  const Reference ref = load_reference(GetParam());
  runtime::GenerationParams params;
  params.max_new_tokens = 16;
  for (const char* dtype : {"float32", "bfloat16"}) {
    runtime::Engine one = make_engine(GetParam(), 1, dtype);
    runtime::Engine two = make_engine(GetParam(), 2, dtype);
    const float tolerance = std::string(dtype) == "float32" ? 1e-4f : 3e-2f;
    EXPECT_LE(relative_error(two.prompt_logits(ref.prompts), one.prompt_logits(ref.prompts)),
              tolerance)
        << dtype;
    if (std::string(dtype) == "float32") {
      EXPECT_EQ(two.generate(ref.prompts, params), ref.greedy);
    }
  }
}

TEST(GpuErrors, MoreRanksThanGpus) {
  const int gpus = gpu_count();
  if (gpus == 0) GTEST_SKIP() << "no CUDA device";
  try {
    make_engine("llama_mha", gpus + 1, "float32");
    ADD_FAILURE() << "tp_size above the GPU count was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("needs {} GPUs", gpus + 1)), std::string::npos)
        << e.what();
  }
}

TEST(GpuErrors, ModelThatDoesNotFitIsRefusedBeforeAllocating) {
  if (gpu_count() == 0) GTEST_SKIP() << "no CUDA device";
  // A Llama shape of about 430 GB in bf16: no single GPU holds it.
  const auto dir = std::filesystem::temp_directory_path() / "tpe_gpu_too_big";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({"model_type": "llama", "hidden_size": 16384,
      "intermediate_size": 53248, "num_hidden_layers": 120, "num_attention_heads": 128,
      "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5})";
  config::RunConfig run;
  run.model_path = dir;
  run.device = "cuda";
  run.dtype = "bfloat16";
  try {
    runtime::Engine engine(runtime::prepare(run), /*quiet=*/true, /*random_weights_seed=*/1);
    ADD_FAILURE() << "a model larger than the GPU was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("GPU 0 needs"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("use a larger --tp"), std::string::npos) << e.what();
  }
}

std::string fixture_name(const testing::TestParamInfo<std::string>& param) { return param.param; }

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuFixture, testing::ValuesIn(fixture_names()), fixture_name);

}  // namespace
}  // namespace tpe::test
