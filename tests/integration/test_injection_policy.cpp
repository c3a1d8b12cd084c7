// The legacy injection policy against automatic discovery, its refusals, and the collectives the
// plans issue (GPT-NeoX's parallel residual: one all-reduce per layer), counted both in the plan
// and at run time.
#include <gtest/gtest.h>

#include "core/common/error.hpp"
#include "core/runtime/engine.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe::test {
namespace {

runtime::Model prepare(const std::string& fixture, int tp,
                       std::optional<config::InjectionPolicy> injection = std::nullopt) {
  config::RunConfig run;
  run.model_path = fixture_dir(fixture);
  run.tp_size = tp;
  run.injection_policy = std::move(injection);
  return runtime::prepare(run);
}

const config::InjectionPolicy kLlama = {
    {"LlamaDecoderLayer", {"self_attn.o_proj", "mlp.down_proj"}}};
const config::InjectionPolicy kNeox = {{"GPTNeoXLayer", {"attention.dense", "mlp.dense_4h_to_h"}}};

TEST(InjectionPolicy, EqualsAutomaticPlan) {
  for (int tp = 1; tp <= 4; ++tp) {
    for (const auto& [fixture, policy] : {std::pair{"llama_gqa", kLlama},
                                          {"llama_6h2kv", kLlama},
                                          {"neox_parallel", kNeox},
                                          {"neox_sequential", kNeox}}) {
      const runtime::Model automatic = prepare(fixture, tp);
      const runtime::Model injected = prepare(fixture, tp, policy);
      EXPECT_TRUE(automatic.plan == injected.plan) << fixture << " tp " << tp;
    }
  }
}

void expect_refused(const std::string& fixture, const config::InjectionPolicy& policy,
                    const std::string& fragment) {
  try {
    prepare(fixture, 2, policy);
    ADD_FAILURE() << "injection policy accepted; expected an error containing: " << fragment;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(InjectionPolicy, RefusesMissingLayer) {
  expect_refused("llama_mha", {{"LlamaDecoderLayer", {"self_attn.o_proj", "mlp.down_projection"}}},
                 "mlp.down_projection");
  expect_refused("llama_mha", {{"LlamaBlock", {"self_attn.o_proj"}}}, "LlamaBlock");
}

TEST(InjectionPolicy, RefusesInconsistentSplit) {
  // down_proj reads the split MLP activations, so it must be row-parallel.
  expect_refused("llama_mha", {{"LlamaDecoderLayer", {"self_attn.o_proj"}}},
                 "model.layers.0.mlp.down_proj");
  // q_proj reads the replicated normed input: row-parallel makes no sense there.
  expect_refused("llama_mha",
                 {{"LlamaDecoderLayer", {"self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"}}},
                 "model.layers.0.self_attn.q_proj");
  expect_refused("neox_parallel", {{"GPTNeoXLayer", {"attention.dense"}}},
                 "gpt_neox.layers.0.mlp.dense_4h_to_h");
}

int blocks_of(const runtime::Model& m) { return static_cast<int>(m.graph.blocks.size()); }

TEST(Collectives, ParallelResidualHasOneAllReducePerLayer) {
  for (int tp = 2; tp <= 4; ++tp) {
    const runtime::Model model = prepare("neox_parallel", tp);
    const std::vector<int> per_block = parallel::all_reduces_per_block(model.graph, model.plan);
    for (int b = 0; b < blocks_of(model); ++b) EXPECT_EQ(per_block[b], 1) << "block " << b;
    EXPECT_EQ(per_block.back(), 1);  // the vocabulary-parallel embedding's sum
  }
}

TEST(Collectives, SequentialBlocksHaveTwoAllReducesPerLayer) {
  for (const char* fixture : {"neox_sequential", "llama_mha"}) {
    const runtime::Model model = prepare(fixture, 2);
    const std::vector<int> per_block = parallel::all_reduces_per_block(model.graph, model.plan);
    for (int b = 0; b < blocks_of(model); ++b) EXPECT_EQ(per_block[b], 2) << fixture;
  }
}

TEST(Collectives, RunTimeCountMatchesPlan) {
  const Reference ref = load_reference("neox_parallel");
  runtime::Engine engine(prepare("neox_parallel", 2), /*quiet=*/true);
  engine.prompt_logits(ref.prompts);
  const int layers = blocks_of(engine.model());
  EXPECT_EQ(engine.all_reduce_count(), layers + 1);  // one per layer, one for the embedding
}

TEST(Collectives, NoneAtTpOne) {
  const runtime::Model model = prepare("llama_mha", 1);
  for (const parallel::Step& s : model.plan.steps) {
    EXPECT_EQ(s.kind, parallel::Step::Kind::kOp);
  }
}

}  // namespace
}  // namespace tpe::test
