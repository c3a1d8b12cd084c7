// Every fixture at TP = 1..4 against transformers: logits within 1e-4 x max |logit| (fp32) and
// identical 16-token greedy continuations, the prompts run as one ragged batch.
#include <gtest/gtest.h>

#include <cmath>

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
    EXPECT_LE(max_diff, 1e-4f * max_ref) << "prompt " << p << ": max |diff| " << max_diff
                                         << ", max |logit| " << max_ref;
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
