// The engine on GPUs against transformers: every fixture at TP 1 in fp32 within 1e-3 x max
// |logit| with transformers' greedy tokens; in bf16 and fp16 the same first 8 greedy tokens as
// fp32; decode steps replayed from CUDA graphs equal to op by op; prompts in chunks; TP 2 and 4
// (where the GPUs exist) equal to TP 1; staged loading, its errors, and bench's memory split
// (against the memory plan) and step profile. Skipped, with the reason, without GPUs.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/common/error.hpp"
#include "core/io/safetensors.hpp"
#include "core/program/report.hpp"
#include "core/runtime/engine.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe::test {
namespace {

int gpu_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

config::RunConfig cuda_run(const std::string& fixture, int tp, const std::string& dtype) {
  config::RunConfig run;
  run.model_path = fixture_dir(fixture);
  run.tp_size = tp;
  run.device = "cuda";
  run.dtype = dtype;
  return run;
}

runtime::Engine make_engine(const std::string& fixture, int tp, const std::string& dtype) {
  return runtime::Engine(runtime::prepare(cuda_run(fixture, tp, dtype)), /*quiet=*/true);
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
  const float error = logits_error(engine.prompt_logits(ref.prompts), ref.logits);
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
    EXPECT_LE(logits_error(engine.prompt_logits(ref.prompts), ref.logits), 3e-2f) << dtype;
  }
}

// TP = tp against TP = 1 in one process, the all-reduce by NCCL and then by the one-shot kernel
// over peer memory (inference.all_reduce = "auto"; decode steps replayed as graphs): fp32 within
// 1e-4, bf16 within 3e-2 of the largest logit, and in fp32 transformers' 16 greedy tokens.
void expect_tp_equals_one(const std::string& fixture, int tp) {
  const Reference ref = load_reference(fixture);
  runtime::GenerationParams params;
  params.max_new_tokens = 16;
  for (const char* dtype : {"float32", "bfloat16"}) {
    runtime::Engine one = make_engine(fixture, 1, dtype);
    const float tolerance = std::string(dtype) == "float32" ? 1e-4f : 3e-2f;
    for (const std::string all_reduce : {"nccl", "auto"}) {
      config::RunConfig run = cuda_run(fixture, tp, dtype);
      run.all_reduce = all_reduce;
      runtime::Engine many(runtime::prepare(run), /*quiet=*/true);
      if (all_reduce == "auto" && many.collectives().rfind("one-shot", 0) != 0) {
        GTEST_SKIP() << "the one-shot all-reduce cannot run here: " << many.collectives();
      }
      EXPECT_LE(logits_error(many.prompt_logits(ref.prompts), one.prompt_logits(ref.prompts)),
                tolerance)
          << dtype << " " << many.collectives();
      if (std::string(dtype) == "float32") {
        EXPECT_EQ(many.generate(ref.prompts, params), ref.greedy) << many.collectives();
      }
    }
  }
}

// Decode steps replayed from a CUDA graph compute what the same steps run op by op compute: the
// same tokens, and the replays really happened. Batches of different sizes as sequences stop
// (the stop token is the op-by-op run's 5th token of the first prompt) each get a recording.
// The fused path (kernel_inject; the default on CUDA) against the plain one, on one GPU: fp32
// logits both within 1e-4 x max |logit| of transformers; in bf16 and fp16 the fused path's 16
// greedy tokens are the plain path's (the two differ only in which kernels run, and the merged
// products and the gated activation round as the plain ones do).
TEST_P(GpuFixture, FusedMatchesPlain) {
  const Reference ref = load_reference(GetParam());
  for (const char* dtype : {"float32", "bfloat16", "float16"}) {
    SCOPED_TRACE(dtype);
    config::RunConfig run = cuda_run(GetParam(), 1, dtype);
    run.kernel_inject = false;
    runtime::Engine plain(runtime::prepare(run), /*quiet=*/true);
    run.kernel_inject = true;
    runtime::Engine fused(runtime::prepare(run), /*quiet=*/true);
    ASSERT_EQ(fused.model().passes, program::all_passes());
    ASSERT_TRUE(plain.model().passes.none());
    runtime::GenerationParams params;
    params.max_new_tokens = 16;
    if (std::string(dtype) == "float32") {
      EXPECT_LE(logits_error(fused.prompt_logits(ref.prompts), ref.logits), 1e-4f);
      EXPECT_LE(logits_error(plain.prompt_logits(ref.prompts), ref.logits), 1e-4f);
    }
    EXPECT_EQ(fused.generate(ref.prompts, params), plain.generate(ref.prompts, params));
  }
}

// Sampling with a top-k filter draws among each row's largest logits (top_k and a quarter, at least
// 64), chosen on the device (top_rows); asking for log-probabilities sends the whole rows to the
// host sampler instead, over the same logits: the tokens must be the same, bf16 and fp32, with
// top_k 5 and 40 (64 candidates) and 100 (125: most or all of a fixture's vocabulary), decode
// steps replayed as graphs.
TEST_P(GpuFixture, TopKSamplingFromDeviceCandidatesEqualsWholeRows) {
  const Reference ref = load_reference(GetParam());
  for (const char* dtype : {"float32", "bfloat16"}) {
    runtime::Engine engine = make_engine(GetParam(), 1, dtype);
    for (const int64_t top_k : {int64_t{5}, int64_t{40}, int64_t{100}}) {
      SCOPED_TRACE(std::string(dtype) + " top_k " + std::to_string(top_k));
      const runtime::GenerationParams params = top_k_sampling(top_k, 12);
      std::vector<std::vector<TokenLogprob>> logprobs;
      const auto whole = engine.generate(ref.prompts, params, {}, nullptr, &logprobs);
      EXPECT_EQ(engine.generate(ref.prompts, params), whole);
    }
  }
}

TEST_P(GpuFixture, GraphReplayEqualsOpByOp) {
  const Reference ref = load_reference(GetParam());
  runtime::GenerationParams params;
  params.max_new_tokens = 12;
  config::RunConfig run = cuda_run(GetParam(), 1, "bfloat16");
  run.cuda_graph = false;
  runtime::Engine op_by_op(runtime::prepare(run), true);
  const auto expected = op_by_op.generate(ref.prompts, params);
  EXPECT_EQ(op_by_op.replays(), 0);
  run.cuda_graph = true;
  runtime::Engine replayed(runtime::prepare(run), true);
  EXPECT_EQ(replayed.generate(ref.prompts, params), expected);
  EXPECT_EQ(replayed.generate(ref.prompts, params), expected);  // the recordings again
  EXPECT_GT(replayed.replays(), 2 * (params.max_new_tokens - 3));
  params.stop_token_ids = {expected[0][4]};
  EXPECT_EQ(replayed.generate(ref.prompts, params), op_by_op.generate(ref.prompts, params));
}

// A prompt run in passes of 3 tokens (so prompts straddle passes) gives transformers' logits,
// including dynamic NTK rope, whose frequencies depend on the whole prompt's length.
TEST(GpuChunkedPrefill, ChunksOfThreeTokensMatchTransformers) {
  if (gpu_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const char* fixture : {"llama_dynamic_rope", "neox_parallel"}) {
    const Reference ref = load_reference(fixture);
    config::RunConfig run = cuda_run(fixture, 1, "float32");
    run.prefill_chunk = 3;
    run.max_batch = 3;
    runtime::Engine engine(runtime::prepare(run), true);
    EXPECT_LE(logits_error(engine.prompt_logits(ref.prompts), ref.logits), 1e-3f) << fixture;
    runtime::GenerationParams params;
    params.max_new_tokens = 16;
    EXPECT_EQ(engine.generate(ref.prompts, params), ref.greedy) << fixture;
  }
}

TEST_P(GpuFixture, TwoGpusEqualOne) {
  if (gpu_count() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpu_count();
  expect_tp_equals_one(GetParam(), 2);
}

TEST_P(GpuFixture, FourGpusEqualOne) {
  if (gpu_count() < 4) GTEST_SKIP() << "needs 4 GPUs, found " << gpu_count();
  expect_tp_equals_one(GetParam(), 4);
}

// Weights travel through pinned staging slots in pieces of whole rows. With slots of 4 KiB
// every matrix is cut into many pieces and the ring of slots wraps many times; the weights
// must arrive exactly as when each tensor is one piece.
TEST(GpuLoading, SmallStagingSlotsGiveTheSameModel) {
  if (gpu_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Reference ref = load_reference("llama_gqa");
  for (const char* dtype : {"float32", "bfloat16"}) {
    runtime::Engine whole = make_engine("llama_gqa", 1, dtype);
    setenv("TPENGINE_LOAD_STAGING_MB", "0.004", 1);
    runtime::Engine pieces = make_engine("llama_gqa", 1, dtype);
    unsetenv("TPENGINE_LOAD_STAGING_MB");
    const auto a = whole.prompt_logits(ref.prompts), b = pieces.prompt_logits(ref.prompts);
    for (size_t p = 0; p < a.size(); ++p) EXPECT_EQ(a[p].data, b[p].data) << dtype;
  }
}

// A piece that cannot be read (here: the config's MLP width no longer matches the checkpoint)
// fails on a loader thread; the error reaches the caller, naming the tensor, and nothing hangs.
TEST(GpuLoading, AReadErrorOnALoaderThreadIsReported) {
  if (gpu_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto dir = std::filesystem::temp_directory_path() / "tpe_gpu_bad_shape";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::filesystem::copy(fixture_dir("llama_mha") / "model.safetensors", dir / "model.safetensors");
  std::ifstream in(fixture_dir("llama_mha") / "config.json");
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string key = "\"intermediate_size\": ";
  const size_t at = config.find(key);
  ASSERT_NE(at, std::string::npos);
  const size_t end = config.find_first_of(",\n}", at + key.size());
  config.replace(at + key.size(), end - at - key.size(), "8");
  std::ofstream(dir / "config.json") << config;
  config::RunConfig run;
  run.model_path = dir;
  run.device = "cuda";
  run.dtype = "bfloat16";
  try {
    runtime::Engine engine(runtime::prepare(run), /*quiet=*/true);
    ADD_FAILURE() << "a checkpoint of other shapes was loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mlp."), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("has shape"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

// bench's figures on a GPU: the memory split adds up and one decode step is timed op by op.
TEST(GpuBench, MemorySplitAndStepProfile) {
  if (gpu_count() == 0) GTEST_SKIP() << "no CUDA device";
  runtime::Engine engine = make_engine("llama_gqa", 1, "bfloat16");
  const Reference ref = load_reference("llama_gqa");
  runtime::GenerationParams params;
  params.max_new_tokens = 6;
  runtime::Engine::StepProfile profile;
  profile.step = 3;
  engine.reset_memory_peak();
  engine.generate(ref.prompts, params, {}, &profile);
  const auto memory = engine.memory();
  ASSERT_EQ(memory.size(), 1u);
  // At TP 1 the GPU holds every tensor of the checkpoint whole, in bf16: counted from the file,
  // not from the engine (memory() and weight_bytes() both report the engine's own count).
  int64_t elements = 0;
  const io::Checkpoint checkpoint = io::Checkpoint::open(fixture_dir("llama_gqa"));
  for (const io::TensorInfo* t : checkpoint.tensors()) {
    int64_t n = 1;
    for (const int64_t d : t->shape) n *= d;
    elements += n;
  }
  EXPECT_EQ(memory[0].weights, 2 * elements);
  EXPECT_EQ(engine.weight_bytes()[0], 2 * elements);
  int64_t longest = 0;
  for (const auto& p : ref.prompts) longest = std::max<int64_t>(longest, p.size());
  const auto& m = engine.model();
  const auto per_token = program::rank_memory(m.graph, m.plan)[0].kv_elements_per_token;
  EXPECT_EQ(memory[0].kv_cache, per_token * 2 /* bf16 */ *
                                    static_cast<int64_t>(ref.prompts.size()) *
                                    (longest + params.max_new_tokens));
  // Workspace is the activation arena plus the pass's inputs and the logits' fp32 copy.
  EXPECT_GE(memory[0].workspace, memory[0].planned_arena);
  EXPECT_LE(memory[0].workspace, memory[0].planned_arena * 11 / 10);
  EXPECT_EQ(memory[0].planned_arena,
            program::rank_memory(m.graph, m.plan, m.limits, m.passes)[0].arena_bytes);
  EXPECT_GT(memory[0].device_in_use, memory[0].weights + memory[0].kv_cache);
  ASSERT_EQ(profile.times.size(), program::lower(m.graph, m.plan, 0, m.passes).instrs.size());
  double total = 0;
  int attention = 0;
  for (const runtime::StepTime& t : profile.times) {
    EXPECT_GE(t.ms, 0.0) << t.label;
    total += t.ms;
    attention += t.label == "attention" || t.label == "rotary+attention";
  }
  EXPECT_GT(total, 0.0);
  EXPECT_EQ(attention, m.graph.num_attention_ops());
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
