// Every fixture at TP = 1..4 against transformers: logits within 1e-4 x max |logit| (fp32) and
// identical 16-token greedy continuations, the prompts run as one ragged batch. Fixtures with a
// model-f32.gguf (the same weights as llama.cpp's converter writes them) run from that file too,
// against the same reference.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/common/error.hpp"
#include "core/io/safetensors.hpp"
#include "core/program/report.hpp"
#include "core/runtime/engine.hpp"
#include "core/runtime/random_weights.hpp"
#include "core/runtime/sampler.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe::test {
namespace {

constexpr const char* kGguf = "model-f32.gguf";

struct Case {
  std::string fixture;
  int tp;
  bool gguf = false;   // from the fixture's model-f32.gguf instead of its safetensors
  bool fused = false;  // kernel_inject = true: the fused path's program (on the CPU backend)
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.fixture << (c.gguf ? " (GGUF)" : "") << (c.fused ? " fused" : "") << " at TP " << c.tp;
}

std::string case_name(const testing::TestParamInfo<Case>& info) {
  return info.param.fixture + (info.param.gguf ? "_gguf" : "") +
         (info.param.fused ? "_fused" : "") + "_tp" + std::to_string(info.param.tp);
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const std::string& name : fixture_names()) {
    const bool gguf = std::filesystem::exists(fixture_dir(name) / kGguf);
    for (int tp = 1; tp <= 4; ++tp) {
      cases.push_back({name, tp});
      cases.push_back({name, tp, false, true});
      if (gguf) cases.push_back({name, tp, true});
    }
  }
  return cases;
}

runtime::Engine make_engine(const Case& c) {
  config::RunConfig run;
  run.model_path = c.gguf ? fixture_dir(c.fixture) / kGguf : fixture_dir(c.fixture);
  run.tp_size = c.tp;
  run.kernel_inject = c.fused;
  return runtime::Engine(runtime::prepare(run), /*quiet=*/true);
}

class FixtureTest : public testing::TestWithParam<Case> {};

TEST_P(FixtureTest, LogitsMatchTransformers) {
  const Reference ref = load_reference(GetParam().fixture);
  runtime::Engine engine = make_engine(GetParam());
  EXPECT_LE(logits_error(engine.prompt_logits(ref.prompts), ref.logits), 1e-4f);
}

TEST_P(FixtureTest, GreedyContinuationMatchesTransformers) {
  const Reference ref = load_reference(GetParam().fixture);
  runtime::Engine engine = make_engine(GetParam());
  runtime::GenerationParams params;
  params.max_new_tokens = static_cast<int64_t>(ref.greedy[0].size());
  EXPECT_EQ(engine.generate(ref.prompts, params), ref.greedy);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureTest, testing::ValuesIn(all_cases()), case_name);

// The first generated token's log-probability and its alternatives: the log-softmax of
// transformers' logits at the prompt's last position, best first.
TEST(Generation, LogprobsOfTheFirstTokenAreTransformers) {
  const Reference ref = load_reference("llama_gqa");
  runtime::Engine engine = make_engine({"llama_gqa", 2});
  runtime::GenerationParams params;
  params.max_new_tokens = 3;
  params.top_logprobs = 4;
  std::vector<std::vector<TokenLogprob>> logprobs;
  const auto out = engine.generate(ref.prompts, params, {}, nullptr, &logprobs);
  ASSERT_EQ(logprobs.size(), ref.prompts.size());
  for (size_t p = 0; p < ref.prompts.size(); ++p) {
    ASSERT_EQ(logprobs[p].size(), out[p].size());
    const Tensor& logits = ref.logits[p];
    const float* last = logits.row(logits.shape[0] - 1);
    const int64_t vocab = logits.shape[1];
    double max = last[0];
    for (int64_t v = 0; v < vocab; ++v) max = std::max(max, static_cast<double>(last[v]));
    double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(last[v] - max);
    std::vector<std::pair<double, int64_t>> want;
    for (int64_t v = 0; v < vocab; ++v) want.emplace_back(last[v] - max - std::log(sum), v);
    std::sort(want.begin(), want.end(),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    const TokenLogprob& first = logprobs[p][0];
    EXPECT_EQ(first.id, ref.greedy[p][0]);
    EXPECT_NEAR(first.logprob, want[0].first, 1e-4) << p;
    ASSERT_EQ(first.top.size(), 4u);
    for (size_t k = 0; k < 4; ++k) {
      EXPECT_EQ(first.top[k].first, want[k].second) << p << " " << k;
      EXPECT_NEAR(first.top[k].second, want[k].first, 1e-4) << p << " " << k;
    }
    // Greedy: each chosen token is its step's most likely one.
    for (const TokenLogprob& t : logprobs[p]) EXPECT_EQ(t.top[0].first, t.id);
  }
}

}  // namespace
}  // namespace tpe::test

namespace tpe::test {
namespace {

TEST(Generation, StopTokenEndsTheSequenceAndIsKept) {
  const Reference ref = load_reference("llama_gqa");
  runtime::Engine engine = make_engine({"llama_gqa", 2});
  runtime::GenerationParams params;
  params.max_new_tokens = 16;
  params.stop_token_ids = {ref.greedy[0][3]};
  const auto out = engine.generate(ref.prompts, params);
  // Sequence 0 stops at its 4th token (or earlier, if that id came before); sequence 1 runs on
  // unless it meets the same id.
  const auto& g0 = ref.greedy[0];
  const size_t stop0 = std::find(g0.begin(), g0.end(), g0[3]) - g0.begin() + 1;
  EXPECT_EQ(out[0], std::vector<int64_t>(g0.begin(), g0.begin() + stop0));
  const auto& g1 = ref.greedy[1];
  const auto hit = std::find(g1.begin(), g1.end(), g0[3]);
  const size_t stop1 = hit == g1.end() ? g1.size() : hit - g1.begin() + 1;
  EXPECT_EQ(out[1], std::vector<int64_t>(g1.begin(), g1.begin() + stop1));
}

// The tokens generate() should give for a prompt, recomputed from scratch: at every step the
// whole sequence's logits (prompt_logits), and the sampler over the last row.
std::vector<int64_t> from_scratch(runtime::Engine& engine, std::vector<int64_t> sequence,
                                  const runtime::GenerationParams& params, Sampler& sampler) {
  for (int64_t step = 0; step < params.max_new_tokens; ++step) {
    const Tensor logits = engine.prompt_logits({sequence})[0];
    std::vector<float> last(logits.row(logits.rows() - 1),
                            logits.row(logits.rows() - 1) + logits.cols());
    sequence.push_back(sampler.sample(last, sequence, params.sampling));
  }
  return {sequence.end() - params.max_new_tokens, sequence.end()};
}

// Plain greedy decoding picks its tokens where the logits are (Backend::argmax_rows); with a
// repetition penalty it must not: each token is the sampler's greedy choice over the penalised
// logits of the whole sequence so far, recomputed here from scratch by prompt_logits (fused
// program, TP 1 and 2). The penalty must change the tokens, or the test would show nothing.
TEST(Generation, GreedyWithARepetitionPenaltyUsesTheSampler) {
  const Reference ref = load_reference("llama_gqa");
  runtime::GenerationParams params;
  params.max_new_tokens = 8;
  params.sampling.repetition_penalty = 3.0;
  for (int tp : {1, 2}) {
    runtime::Engine engine = make_engine({"llama_gqa", tp, false, true});
    const auto out = engine.generate(ref.prompts, params);
    ASSERT_EQ(out.size(), ref.prompts.size());
    Sampler sampler(0);
    bool changed = false;
    for (size_t p = 0; p < ref.prompts.size(); ++p) {
      const std::vector<int64_t> expected = from_scratch(engine, ref.prompts[p], params, sampler);
      EXPECT_EQ(out[p], expected) << "prompt " << p << " tp " << tp;
      changed = changed || !std::equal(expected.begin(), expected.end(), ref.greedy[p].begin());
    }
    EXPECT_TRUE(changed) << "the penalty changed no token: a weaker test than it claims";
  }
}

// Sampling with a top-k filter takes each row's largest logits from the backend (top_k and
// a quarter, at least 64: Backend::top_rows) and draws among them (Sampler::sample_top): the tokens
// must be those the sampler draws from the whole rows, recomputed here from scratch by
// prompt_logits with the same per-sequence generators (fused program, TP 1 and 2). Of the fixture's
// 128-token vocabulary top_k 5 and 40 take 64 candidates, 100 takes 125.
TEST(Generation, TopKSamplingFromCandidatesIsTheWholeRowsDraw) {
  const Reference ref = load_reference("llama_gqa");
  for (const int64_t top_k : {int64_t{5}, int64_t{40}, int64_t{100}}) {
    const runtime::GenerationParams params = top_k_sampling(top_k, 8);
    for (int tp : {1, 2}) {
      runtime::Engine engine = make_engine({"llama_gqa", tp, false, true});
      const auto out = engine.generate(ref.prompts, params);
      ASSERT_EQ(out.size(), ref.prompts.size());
      for (size_t p = 0; p < ref.prompts.size(); ++p) {
        Sampler sampler(runtime::sequence_seed(params.seed, p));
        EXPECT_EQ(out[p], from_scratch(engine, ref.prompts[p], params, sampler))
            << "prompt " << p << " tp " << tp << " top_k " << top_k;
      }
    }
  }
}

TEST(Generation, SampledTokensDependOnlyOnTheSeed) {
  const Reference ref = load_reference("neox_parallel");
  runtime::GenerationParams params;
  params.max_new_tokens = 12;
  params.sampling.do_sample = true;
  params.sampling.temperature = 1.5;
  params.sampling.top_k = 40;
  params.sampling.top_p = 0.95;
  params.sampling.repetition_penalty = 1.2;
  params.seed = 1234;
  runtime::Engine tp1 = make_engine({"neox_parallel", 1});
  const auto reference = tp1.generate(ref.prompts, params);
  EXPECT_EQ(tp1.generate(ref.prompts, params), reference);  // same seed, same tokens
  for (int tp = 2; tp <= 4; ++tp) {
    runtime::Engine engine = make_engine({"neox_parallel", tp});
    EXPECT_EQ(engine.generate(ref.prompts, params), reference) << "tp " << tp;
  }
  params.seed = 99;
  EXPECT_NE(tp1.generate(ref.prompts, params), reference);
  EXPECT_NE(reference[0], ref.greedy[0]);  // the settings above really sample
}

// The bytes each rank loads, against the plan's figure and against the checkpoint itself: at
// TP 1 every tensor whole; at TP 2 (llama_6h2kv's two kv heads are not replicated there) every
// tensor once, plus a copy of each norm scale (the 1-D tensors) for the second rank.
TEST(Generation, WeightBytesMatchThePlanAndTheCheckpoint) {
  int64_t elements = 0, vector_elements = 0;
  const io::Checkpoint checkpoint = io::Checkpoint::open(fixture_dir("llama_6h2kv"));
  for (const io::TensorInfo* t : checkpoint.tensors()) {
    int64_t n = 1;
    for (const int64_t d : t->shape) n *= d;
    elements += n;
    if (t->shape.size() == 1) vector_elements += n;
  }
  for (int tp = 1; tp <= 4; ++tp) {
    runtime::Engine engine = make_engine({"llama_6h2kv", tp});
    const auto memory = program::rank_memory(engine.model().graph, engine.model().plan);
    const auto bytes = engine.weight_bytes();
    int64_t total = 0;
    for (int r = 0; r < tp; ++r) {
      EXPECT_EQ(bytes[r], memory[r].weight_elements * 4) << tp << r;
      total += bytes[r];
    }
    if (tp <= 2) {
      EXPECT_EQ(total, 4 * (elements + (tp - 1) * vector_elements)) << "tp " << tp;
    }
  }
}

}  // namespace
}  // namespace tpe::test

namespace tpe::test {
namespace {

// The checkpoint `--random-weights` stands for: every tensor of the fixture's checkpoint, whole,
// as random_weights(seed, name, shape) makes it, in F32, beside the fixture's config.json.
void write_random_checkpoint(const std::string& fixture, uint64_t seed,
                             const std::filesystem::path& dir) {
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  for (const char* file : {"config.json", "generation_config.json"}) {
    if (std::filesystem::exists(fixture_dir(fixture) / file)) {
      std::filesystem::copy_file(fixture_dir(fixture) / file, dir / file);
    }
  }
  nlohmann::json header = nlohmann::json::object();
  std::vector<float> data;
  const io::Checkpoint checkpoint = io::Checkpoint::open(fixture_dir(fixture));
  for (const io::TensorInfo* t : checkpoint.tensors()) {
    int64_t n = 1;
    for (const int64_t d : t->shape) n *= d;
    const auto begin = static_cast<int64_t>(data.size());
    data.resize(data.size() + static_cast<size_t>(n));
    runtime::random_weights(seed, t->name, t->shape, {}, {},
                            std::span<float>(data.data() + begin, static_cast<size_t>(n)));
    header[t->name] = {
        {"dtype", "F32"}, {"shape", t->shape}, {"data_offsets", {4 * begin, 4 * (begin + n)}}};
  }
  std::string text = header.dump();
  text.resize((text.size() + 7) / 8 * 8, ' ');  // the data section 8-byte aligned
  std::ofstream out(dir / "model.safetensors", std::ios::binary);
  const uint64_t length = text.size();
  out.write(reinterpret_cast<const char*>(&length), sizeof(length));
  out << text;
  out.write(reinterpret_cast<const char*>(data.data()),
            static_cast<std::streamsize>(data.size() * sizeof(float)));
}

// max |a - b| over max |b|, over all prompts.
float relative_difference(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  float diff = 0, scale = 0;
  for (size_t p = 0; p < b.size(); ++p) {
    EXPECT_EQ(a[p].shape, b[p].shape);
    for (size_t i = 0; i < b[p].data.size() && i < a[p].data.size(); ++i) {
      diff = std::max(diff, std::abs(a[p].data[i] - b[p].data[i]));
      scale = std::max(scale, std::abs(b[p].data[i]));
    }
  }
  return diff / scale;
}

// A random-weight model at TP 1, 2 and 3 computes what the checkpoint of its random tensors,
// loaded as any checkpoint, computes: the same logits (1e-4 x max |logit|) and greedy tokens.
TEST(RandomWeights, EveryTpSizeRunsTheCheckpointOfTheRandomTensors) {
  // GPT-2's Conv1D weights are generated as stored ([in, out]) and transposed at load, as read.
  for (const char* fixture : {"llama_6h2kv", "neox_parallel", "gpt2"}) {
    SCOPED_TRACE(fixture);
    const Reference ref = load_reference(fixture);
    const auto dir = std::filesystem::temp_directory_path() /
                     (std::string("tpe_random_") + fixture + "_" + std::to_string(getpid()));
    write_random_checkpoint(fixture, 7, dir);
    runtime::GenerationParams params;
    params.max_new_tokens = 8;
    config::RunConfig written_run;
    written_run.model_path = dir;
    runtime::Engine written(runtime::prepare(written_run), /*quiet=*/true);
    const std::vector<Tensor> expected = written.prompt_logits(ref.prompts);
    const auto expected_tokens = written.generate(ref.prompts, params);
    // These are other weights than the fixture's: transformers' logits for those are far off.
    EXPECT_GT(relative_difference(expected, ref.logits), 0.1f);
    for (int tp = 1; tp <= 3; ++tp) {
      config::RunConfig run;
      run.model_path = fixture_dir(fixture);
      run.tp_size = tp;
      runtime::Engine engine(runtime::prepare(run), /*quiet=*/true, /*random_weights_seed=*/7);
      EXPECT_LE(relative_difference(engine.prompt_logits(ref.prompts), expected), 1e-4f)
          << "tp " << tp;
      EXPECT_EQ(engine.generate(ref.prompts, params), expected_tokens) << "tp " << tp;
    }
    std::filesystem::remove_all(dir);
  }
}

// A learned position table ends the context: a sequence past its rows is refused, named, even
// with allow_long_context (which lifts max_position_embeddings for rotary models); one that
// fits is not. GPT-2's table has n_positions = 64 rows; OPT's 66, from row 2.
TEST(LearnedPositions, ASequencePastTheTableIsRefusedWhateverTheOptions) {
  for (const char* fixture : {"gpt2", "opt"}) {
    SCOPED_TRACE(fixture);
    config::RunConfig run;
    run.model_path = fixture_dir(fixture);
    run.allow_long_context = true;
    runtime::Engine engine(runtime::prepare(run), /*quiet=*/true);
    EXPECT_EQ(engine.model().learned_positions, 64);
    runtime::GenerationParams params;
    params.max_new_tokens = 4;
    const std::vector<std::vector<int64_t>> fits = {std::vector<int64_t>(60, 5)};
    EXPECT_EQ(engine.generate(fits, params)[0].size(), 4u);
    const std::vector<std::vector<int64_t>> too_long = {std::vector<int64_t>(61, 5)};
    try {
      engine.generate(too_long, params);
      ADD_FAILURE() << "65 positions accepted";
    } catch (const Error& e) {
      EXPECT_NE(
          std::string(e.what()).find("more than the 64 of the model's learned position table"),
          std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace tpe::test
