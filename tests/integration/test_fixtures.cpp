// Every fixture at TP = 1..4 against transformers: logits within 1e-4 x max |logit| (fp32) and
// identical 16-token greedy continuations, the prompts run as one ragged batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/program/report.hpp"
#include "core/runtime/engine.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe::test {
namespace {

struct Case {
  std::string fixture;
  int tp;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.fixture << " at TP " << c.tp; }

std::string case_name(const testing::TestParamInfo<Case>& info) {
  return info.param.fixture + "_tp" + std::to_string(info.param.tp);
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const std::string& name : fixture_names()) {
    for (int tp = 1; tp <= 4; ++tp) cases.push_back({name, tp});
  }
  return cases;
}

runtime::Engine make_engine(const std::string& fixture, int tp) {
  config::RunConfig run;
  run.model_path = fixture_dir(fixture);
  run.tp_size = tp;
  return runtime::Engine(runtime::prepare(run), /*quiet=*/true);
}

class FixtureTest : public testing::TestWithParam<Case> {};

TEST_P(FixtureTest, LogitsMatchTransformers) {
  const Reference ref = load_reference(GetParam().fixture);
  runtime::Engine engine = make_engine(GetParam().fixture, GetParam().tp);
  const std::vector<Tensor> logits = engine.prompt_logits(ref.prompts);
  ASSERT_EQ(logits.size(), ref.logits.size());
  for (size_t p = 0; p < logits.size(); ++p) {
    ASSERT_EQ(logits[p].shape, ref.logits[p].shape) << "prompt " << p;
    float max_ref = 0, max_diff = 0;
    for (size_t i = 0; i < ref.logits[p].data.size(); ++i) {
      max_ref = std::max(max_ref, std::abs(ref.logits[p].data[i]));
      max_diff = std::max(max_diff, std::abs(ref.logits[p].data[i] - logits[p].data[i]));
    }
    EXPECT_LE(max_diff, 1e-4f * max_ref)
        << "prompt " << p << ": max |diff| " << max_diff << ", max |logit| " << max_ref;
  }
}

TEST_P(FixtureTest, GreedyContinuationMatchesTransformers) {
  const Reference ref = load_reference(GetParam().fixture);
  runtime::Engine engine = make_engine(GetParam().fixture, GetParam().tp);
  runtime::GenerationParams params;
  params.max_new_tokens = static_cast<int64_t>(ref.greedy[0].size());
  EXPECT_EQ(engine.generate(ref.prompts, params), ref.greedy);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureTest, testing::ValuesIn(all_cases()), case_name);

}  // namespace
}  // namespace tpe::test

namespace tpe::test {
namespace {

TEST(Generation, StopTokenEndsTheSequenceAndIsKept) {
  const Reference ref = load_reference("llama_gqa");
  runtime::Engine engine = make_engine("llama_gqa", 2);
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
  runtime::Engine tp1 = make_engine("neox_parallel", 1);
  const auto reference = tp1.generate(ref.prompts, params);
  EXPECT_EQ(tp1.generate(ref.prompts, params), reference);  // same seed, same tokens
  for (int tp = 2; tp <= 4; ++tp) {
    runtime::Engine engine = make_engine("neox_parallel", tp);
    EXPECT_EQ(engine.generate(ref.prompts, params), reference) << "tp " << tp;
  }
  params.seed = 99;
  EXPECT_NE(tp1.generate(ref.prompts, params), reference);
  EXPECT_NE(reference[0], ref.greedy[0]);  // the settings above really sample
}

TEST(Generation, WeightBytesMatchThePlan) {
  for (int tp = 1; tp <= 4; ++tp) {
    runtime::Engine engine = make_engine("llama_6h2kv", tp);
    const auto memory = program::rank_memory(engine.model().graph, engine.model().plan);
    const auto bytes = engine.weight_bytes();
    for (int r = 0; r < tp; ++r) EXPECT_EQ(bytes[r], memory[r].weight_elements * 4) << tp << r;
  }
}

}  // namespace
}  // namespace tpe::test

namespace tpe::test {
namespace {

TEST(RandomWeights, EveryTpSizeRunsTheSameRandomModel) {
  for (const char* fixture : {"llama_6h2kv", "neox_parallel"}) {
    const Reference ref = load_reference(fixture);
    runtime::GenerationParams params;
    params.max_new_tokens = 8;
    std::vector<std::vector<int64_t>> tp1;
    std::vector<Tensor> logits1;
    for (int tp = 1; tp <= 3; ++tp) {
      config::RunConfig run;
      run.model_path = fixture_dir(fixture);
      run.tp_size = tp;
      runtime::Engine engine(runtime::prepare(run), /*quiet=*/true, /*random_weights_seed=*/7);
      const auto logits = engine.prompt_logits(ref.prompts);
      const auto tokens = engine.generate(ref.prompts, params);
      if (tp == 1) {
        tp1 = tokens;
        logits1 = logits;
        EXPECT_NE(tokens, std::vector<std::vector<int64_t>>(ref.greedy.size()));
        continue;
      }
      EXPECT_EQ(tokens, tp1) << fixture << " tp " << tp;
      for (size_t p = 0; p < logits.size(); ++p) {
        for (size_t i = 0; i < logits[p].data.size(); ++i) {
          ASSERT_NEAR(logits[p].data[i], logits1[p].data[i], 1e-4f) << fixture << " tp " << tp;
        }
      }
    }
  }
}

}  // namespace
}  // namespace tpe::test
