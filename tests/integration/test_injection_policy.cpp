// The legacy injection policy: an engine planned by it computes transformers' logits, every
// linear is the kind the policy names, inconsistent policies are refused; and the collectives
// the plans issue (GPT-NeoX's parallel residual: one all-reduce per layer), counted both in the
// plan and at run time.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

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

int blocks_of(const runtime::Model& m) { return static_cast<int>(m.graph.blocks.size()); }

const config::InjectionPolicy kLlama = {
    {"LlamaDecoderLayer", {"self_attn.o_proj", "mlp.down_proj"}}};
const config::InjectionPolicy kNeox = {{"GPTNeoXLayer", {"attention.dense", "mlp.dense_4h_to_h"}}};
const config::InjectionPolicy kBloom = {
    {"BloomBlock", {"self_attention.dense", "mlp.dense_4h_to_h"}}};
const config::InjectionPolicy kGpt2 = {{"GPT2Block", {"attn.c_proj", "mlp.c_proj"}}};
const config::InjectionPolicy kBigCode = {{"GPTBigCodeBlock", {"attn.c_proj", "mlp.c_proj"}}};
const config::InjectionPolicy kOpt = {{"OPTDecoderLayer", {"self_attn.out_proj", "fc2"}}};
const config::InjectionPolicy kFalcon = {
    {"FalconDecoderLayer", {"self_attention.dense", "mlp.dense_4h_to_h"}}};

// The fixtures the explicit policies are run on: Llama (GQA, and 6 q / 2 kv heads uneven over
// 4 ranks), GPT-NeoX (parallel and sequential residual, biases everywhere), and one config of
// each later family (DeepSpeed's AutoTP would name the same layers for them).
const std::pair<const char*, const config::InjectionPolicy*> kCases[] = {
    {"llama_gqa", &kLlama},         {"llama_6h2kv", &kLlama}, {"neox_parallel", &kNeox},
    {"neox_sequential", &kNeox},    {"bloom", &kBloom},       {"gpt2", &kGpt2},
    {"gpt_bigcode_mqa", &kBigCode}, {"opt", &kOpt},           {"falcon_grouped", &kFalcon}};

// An engine planned by the explicit policy computes transformers' logits (1e-4 x max |logit|,
// as the fixture tests) at every TP size.
TEST(InjectionPolicy, FollowedPlanComputesTransformersLogits) {
  for (const auto& [fixture, policy] : kCases) {
    const Reference ref = load_reference(fixture);
    for (int tp = 1; tp <= 4; ++tp) {
      SCOPED_TRACE(testing::Message() << fixture << " at TP " << tp);
      runtime::Engine engine(prepare(fixture, tp, *policy), /*quiet=*/true);
      ASSERT_TRUE(engine.model().injection_policy == *policy);
      EXPECT_LE(logits_error(engine.prompt_logits(ref.prompts), ref.logits), 1e-4f);
    }
  }
}

// Every linear is of the kind the policy's text names: row-parallel when its name relative to
// its block's prefix is in the list of its block's class, column-parallel otherwise. Worked out
// here from the policy and the names in the graph, not by the planner.
TEST(InjectionPolicy, EveryLinearIsTheKindThePolicyNames) {
  for (const auto& [fixture, policy] : kCases) {
    for (int tp = 1; tp <= 4; ++tp) {
      SCOPED_TRACE(testing::Message() << fixture << " at TP " << tp);
      const runtime::Model model = prepare(fixture, tp, *policy);
      const graph::Graph& g = model.graph;
      int rows = 0, columns = 0;
      for (size_t i = 0; i < g.ops.size(); ++i) {
        const graph::Op& op = g.ops[i];
        if (op.kind != graph::OpKind::kLinear) continue;
        ASSERT_GE(op.block, 0) << op.name << " is outside any block";
        const graph::Block& block = g.blocks[op.block];
        ASSERT_EQ(op.name.rfind(block.prefix + ".", 0), 0u) << op.name << " in " << block.prefix;
        const std::string relative = op.name.substr(block.prefix.size() + 1);
        const auto rule = policy->find(block.cls);
        ASSERT_NE(rule, policy->end()) << block.cls;
        const bool named =
            std::find(rule->second.begin(), rule->second.end(), relative) != rule->second.end();
        EXPECT_EQ(model.plan.linear_kind[i],
                  named ? parallel::LinearKind::kRow : parallel::LinearKind::kColumn)
            << op.name;
        (named ? rows : columns) += 1;
      }
      // Each named linear exists once per layer; the others (q/k/v or query_key_value, and the
      // MLP's up projections) are column-parallel.
      EXPECT_EQ(rows, 2 * blocks_of(model));
      EXPECT_GE(columns, 2 * blocks_of(model));
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

TEST(Collectives, ParallelResidualHasOneAllReducePerLayer) {
  for (int tp = 2; tp <= 4; ++tp) {
    for (const char* fixture : {"neox_parallel", "falcon_mqa", "falcon_grouped"}) {
      SCOPED_TRACE(testing::Message() << fixture << " at TP " << tp);
      const runtime::Model model = prepare(fixture, tp);
      const std::vector<int> per_block = parallel::all_reduces_per_block(model.graph, model.plan);
      for (int b = 0; b < blocks_of(model); ++b) EXPECT_EQ(per_block[b], 1) << "block " << b;
      EXPECT_EQ(per_block.back(), 1);  // the vocabulary-parallel embedding's sum
    }
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
