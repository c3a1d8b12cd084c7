// Each rank's program on the fixtures' real graphs: the memory plan never lets two live values
// share bytes, prompts run in chunks give transformers' logits and tokens, the arena `tpengine
// plan` predicts is what a run holds, and the KV cache refuses passes that do not continue it.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <algorithm>

#include "core/common/error.hpp"
#include "core/program/program.hpp"
#include "core/program/report.hpp"
#include "core/runtime/engine.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe::test {
namespace {

config::RunConfig cpu_run(const std::string& fixture, int tp) {
  config::RunConfig run;
  run.model_path = fixture_dir(fixture);
  run.tp_size = tp;
  return run;
}

// Liveness recomputed here from the instructions alone: a value's memory is in use from the
// first instruction that touches any value sharing it to the last (the logits: to the end).
void expect_live_values_disjoint(program::Program& p, const program::Limits& limits,
                                 const std::string& label) {
  program::plan_memory(p, limits);
  const int n = static_cast<int>(p.instrs.size());
  std::vector<int> first(p.values.size(), n + 1), last(p.values.size(), -1);
  for (int i = 0; i < n; ++i) {
    std::vector<int> touched = p.instrs[i].in;
    touched.push_back(p.instrs[i].out);
    for (int v : touched) {
      const int root = p.storage(v);
      first[root] = std::min(first[root], i);
      last[root] = std::max(last[root], i);
    }
  }
  last[p.storage(p.logits)] = n;
  std::vector<int> roots;
  for (size_t v = 0; v < p.values.size(); ++v) {
    if (p.values[v].stored && p.storage(static_cast<int>(v)) == static_cast<int>(v) &&
        last[v] >= 0) {
      roots.push_back(static_cast<int>(v));
    }
  }
  for (int a : roots) {
    const int64_t a_end = p.values[a].offset + p.bytes(a, limits);
    ASSERT_LE(a_end, p.arena_bytes) << label << " value " << a;
    for (int b : roots) {
      if (b <= a || last[a] < first[b] || last[b] < first[a]) continue;  // not live together
      const int64_t b_end = p.values[b].offset + p.bytes(b, limits);
      const bool disjoint = a_end <= p.values[b].offset || b_end <= p.values[a].offset;
      ASSERT_TRUE(disjoint) << label << ": values " << a << " and " << b
                            << " overlap while both are live";
    }
  }
}

TEST(MemoryPlan, LiveValuesNeverShareBytes) {
  const program::Limits limits{7, 3, 4};
  for (const std::string& fixture : fixture_names()) {
    for (int tp = 1; tp <= 4; ++tp) {
      const runtime::Model model = runtime::prepare(cpu_run(fixture, tp));
      for (int rank = 0; rank < tp; ++rank) {
        for (const bool fuse : {false, true}) {
          program::Program p = program::lower(model.graph, model.plan, rank,
                                              fuse ? program::all_passes() : program::Passes());
          expect_live_values_disjoint(
              p, limits,
              fmt::format("{} tp {} rank {}{}", fixture, tp, rank, fuse ? " fused" : ""));
        }
      }
    }
  }
}

// The fused path's passes do fire: per Llama layer one merged q/k/v product, one merged gate/up
// product feeding one gated activation, and no activation of its own; the rank loads exactly
// the plain program's weight elements (the merged slices replace their parts, nothing twice).
// A fused projection whose parts are already views (Falcon's, NeoX's query_key_value) is left
// as it is, so Falcon's parallel block keeps its qkv and MLP products apart; their MLP up
// projection takes the activation into its epilogue (no activation instruction is left in any
// of the four). Every norm that
// reads a residual sum is one instruction with its add at TP 1 (Llama: both norms of every layer
// but the first's input norm, plus the final norm); at TP > 1 the sum is made on the partial
// values and all-reduced, so the norm is one instruction with the all-reduce instead (Llama:
// every norm; Falcon and GPT-NeoX, whose parallel blocks read one all-reduce with one norm or
// two: one per layer, plus the final norm). No rotary is left outside attention.
TEST(FusedProgram, MergesProjectionsAndGatesTheMlp) {
  struct Expect {
    const char* fixture;
    int linears_per_layer;  // plain's count in parentheses below
    int linear_activations_per_layer;
    int gated_per_layer;
    int add_norms_per_layer;         // the layers' norms and the final one, less those of no sum
    int all_reduce_norms_per_layer;  // TP > 1, and the final norm
  };
  for (const Expect& e : {Expect{"llama_gqa", 4, 0, 1, 2, 2},   // (7: q k v o gate up down)
                          Expect{"qwen2_bias", 4, 0, 1, 2, 2},  // (7, q/k/v biases merged too)
                          Expect{"falcon_mqa", 3, 1, 0, 1, 1},  // (4: qkv dense h_to_4h 4h_to_h)
                          Expect{"neox_parallel", 3, 1, 0, 1, 1}}) {  // nothing shares an input
    for (int tp = 1; tp <= 4; ++tp) {
      const runtime::Model model = runtime::prepare(cpu_run(e.fixture, tp));
      const int layers = static_cast<int>(model.graph.blocks.size());
      for (int rank = 0; rank < tp; ++rank) {
        SCOPED_TRACE(testing::Message() << e.fixture << " tp " << tp << " rank " << rank);
        const program::Program plain = program::lower(model.graph, model.plan, rank);
        const program::Program fused =
            program::lower(model.graph, model.plan, rank, program::all_passes());
        const auto count = [&](const program::Program& p, program::Code code) {
          int n = 0;
          for (const auto& i : p.instrs) {
            n += i.code == code && (code != program::Code::kLinear ||
                                    model.graph.ops[i.op].kind == graph::OpKind::kLinear);
          }
          return n;
        };
        const auto elements = [](const program::Program& p) {
          int64_t n = 0;
          for (const auto& w : p.weights) n += w.elements();
          return n;
        };
        EXPECT_EQ(count(fused, program::Code::kLinear), e.linears_per_layer * layers);
        EXPECT_EQ(count(fused, program::Code::kLinearActivation),
                  e.linear_activations_per_layer * layers);
        EXPECT_EQ(count(fused, program::Code::kGatedActivation), e.gated_per_layer * layers);
        EXPECT_EQ(count(fused, program::Code::kActivation), 0);
        EXPECT_EQ(elements(fused), elements(plain));
        // The first layer's input norm reads the embedding, no sum.
        const int add_norms = tp == 1 ? e.add_norms_per_layer * layers : 0;
        const int all_reduce_norms = tp == 1 ? 0 : e.all_reduce_norms_per_layer * layers + 1;
        EXPECT_EQ(count(fused, program::Code::kAddNorm), add_norms);
        EXPECT_EQ(count(fused, program::Code::kAllReduceNorm), all_reduce_norms);
        EXPECT_EQ(count(fused, program::Code::kNorm) + add_norms + all_reduce_norms,
                  count(plain, program::Code::kNorm));
        EXPECT_EQ(count(fused, program::Code::kAllReduce) + all_reduce_norms,
                  count(plain, program::Code::kAllReduce));
        EXPECT_EQ(count(fused, program::Code::kRotary), 0);
        EXPECT_GT(count(plain, program::Code::kRotary), 0);
      }
    }
  }
}

// Each pass can be left out for a measurement, and then its rewrite is not made while the
// others still are: the instructions it would have replaced are the plain program's. The run
// config's names reach the programs (inference.fused_passes).
TEST(FusedProgram, EachPassCanBeLeftOut) {
  using program::Code;
  using program::Pass;
  const auto count = [](const program::Program& p, Code code) {
    return std::count_if(p.instrs.begin(), p.instrs.end(),
                         [code](const program::Instr& i) { return i.code == code; });
  };
  for (const auto& [fixture, tp] : {std::pair{"llama_gqa", 1}, std::pair{"neox_parallel", 1},
                                    std::pair{"llama_gqa", 2}, std::pair{"neox_parallel", 2}}) {
    const runtime::Model model = runtime::prepare(cpu_run(fixture, tp));
    const program::Program plain = program::lower(model.graph, model.plan, 0);
    const program::Program all = program::lower(model.graph, model.plan, 0, program::all_passes());
    for (size_t pass = 0; pass < program::kPassNames.size(); ++pass) {
      SCOPED_TRACE(testing::Message()
                   << fixture << " tp " << tp << " without " << program::kPassNames[pass]);
      const program::Program p =
          program::lower(model.graph, model.plan, 0, program::all_passes().reset(pass));
      switch (static_cast<Pass>(pass)) {
        case Pass::kMergeLinears:
          EXPECT_EQ(count(p, Code::kLinear) + count(p, Code::kLinearActivation),
                    count(plain, Code::kLinear));
          EXPECT_EQ(count(p, Code::kGatedActivation), 0);  // it needs the merged views
          break;
        case Pass::kLinearActivation:
          EXPECT_EQ(count(p, Code::kLinearActivation), 0);
          EXPECT_EQ(count(p, Code::kActivation) + count(p, Code::kGatedActivation),
                    count(plain, Code::kActivation));
          break;
        case Pass::kGatedActivation:
          EXPECT_EQ(count(p, Code::kGatedActivation), 0);
          EXPECT_EQ(count(p, Code::kMul), count(plain, Code::kMul));
          break;
        case Pass::kAddNorm:
          EXPECT_EQ(count(p, Code::kAddNorm), 0);
          EXPECT_EQ(count(p, Code::kNorm) + count(p, Code::kAllReduceNorm),
                    count(plain, Code::kNorm));
          break;
        case Pass::kRotaryAttention:
          EXPECT_EQ(count(p, Code::kRotary), count(plain, Code::kRotary));
          break;
        case Pass::kAllReduceNorm:
          EXPECT_EQ(count(p, Code::kAllReduceNorm), 0);
          EXPECT_EQ(count(p, Code::kAllReduce), count(plain, Code::kAllReduce));
          EXPECT_EQ(count(p, Code::kNorm) + count(p, Code::kAddNorm), count(plain, Code::kNorm));
          break;
      }
      // What the other passes make is made as with all of them (unmerged, Llama's gate
      // projection takes its activation into the epilogue instead).
      const Pass left_out = static_cast<Pass>(pass);
      const std::pair<Code, std::vector<Pass>> made_by[] = {
          {Code::kLinearActivation, {Pass::kMergeLinears, Pass::kLinearActivation}},
          {Code::kGatedActivation, {Pass::kMergeLinears, Pass::kGatedActivation}},
          {Code::kAddNorm, {Pass::kAddNorm}},
          {Code::kAllReduceNorm, {Pass::kAllReduceNorm}}};
      for (const auto& [code, passes] : made_by) {
        if (std::find(passes.begin(), passes.end(), left_out) != passes.end()) continue;
        EXPECT_EQ(count(p, code), count(all, code)) << program::code_name(code);
      }
    }
    if (tp == 2) {
      EXPECT_GT(count(all, Code::kAllReduceNorm), 0);
    }
    config::RunConfig run = cpu_run(fixture, tp);
    run.kernel_inject = true;
    run.fused_passes = {"rotary_attention", "add_norm"};
    EXPECT_EQ(runtime::prepare(run).passes, program::Passes()
                                                .set(static_cast<size_t>(Pass::kAddNorm))
                                                .set(static_cast<size_t>(Pass::kRotaryAttention)));
    run.fused_passes.reset();
    EXPECT_EQ(runtime::prepare(run).passes, program::all_passes());
    run.kernel_inject = false;
    EXPECT_EQ(runtime::prepare(run).passes, program::Passes());
  }
}

// Passes of 3 tokens: prompts straddle passes, sliding windows span them, and dynamic NTK rope
// must use the whole prompt's length in every chunk.
TEST(ChunkedPrefill, ChunksOfThreeTokensMatchTransformers) {
  for (const char* fixture :
       {"llama_dynamic_rope", "mistral_window", "neox_parallel", "llama_gqa", "qwen2_bias"}) {
    const Reference ref = load_reference(fixture);
    for (int tp : {1, 3}) {
      config::RunConfig run = cpu_run(fixture, tp);
      run.prefill_chunk = 3;
      run.max_batch = static_cast<int64_t>(ref.prompts.size());
      runtime::Engine engine(runtime::prepare(run), /*quiet=*/true);
      EXPECT_LE(logits_error(engine.prompt_logits(ref.prompts), ref.logits), 1e-4f)
          << fixture << " tp " << tp;
      runtime::GenerationParams params;
      params.max_new_tokens = 16;
      EXPECT_EQ(engine.generate(ref.prompts, params), ref.greedy) << fixture << " tp " << tp;
    }
  }
}

// What `tpengine plan` predicts (program::rank_memory at the run's limits) against what the CPU
// backend held at its peak beside weights and KV cache during a generation, whatever the
// prompt's length.
TEST(MemoryPlan, PlannedArenaIsWhatARunHolds) {
  for (const char* fixture : {"llama_6h2kv", "neox_parallel"}) {
    for (int tp = 1; tp <= 3; ++tp) {
      config::RunConfig run = cpu_run(fixture, tp);
      run.prefill_chunk = 8;
      run.max_batch = 2;
      const runtime::Model model = runtime::prepare(run);
      const auto planned = program::rank_memory(model.graph, model.plan, model.limits);
      runtime::Engine engine(runtime::prepare(run), /*quiet=*/true);
      runtime::GenerationParams params;
      params.max_new_tokens = 3;
      for (int64_t length : {5, 40}) {
        engine.reset_memory_peak();
        std::vector<int64_t> prompt;
        for (int64_t i = 0; i < length; ++i) prompt.push_back((i * 7) % 50);
        engine.generate({prompt, {3, 4}}, params);
        const auto measured = engine.memory();
        for (int r = 0; r < tp; ++r) {
          EXPECT_GT(planned[r].arena_bytes, 0);
          EXPECT_NEAR(static_cast<double>(measured[r].workspace),
                      static_cast<double>(planned[r].arena_bytes), 0.1 * planned[r].arena_bytes)
              << fixture << " tp " << tp << " rank " << r << " prompt " << length;
        }
      }
    }
  }
}

TEST(MemoryPlan, MoreSequencesThanMaxBatchIsRefusedNamingTheKey) {
  config::RunConfig run = cpu_run("llama_mha", 1);
  run.max_batch = 1;
  runtime::Engine engine(runtime::prepare(run), /*quiet=*/true);
  try {
    engine.generate({{1, 2}, {3}}, {});
    ADD_FAILURE() << "two prompts accepted with max_batch = 1";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("inference.max_batch"), std::string::npos) << e.what();
  }
}

// GPT-NeoX's fused query_key_value is split by views: no column gather runs, and q, k and v are
// runs of the projection's output (its weight rows grouped part by part at load). The fixtures'
// logits against transformers are what show the views read the right columns.
TEST(Program, FusedQkvIsSplitByViewsNotCopies) {
  for (const char* fixture : {"neox_parallel", "neox_sequential"}) {
    for (int tp = 1; tp <= 4; ++tp) {
      const runtime::Model model = runtime::prepare(cpu_run(fixture, tp));
      for (int rank = 0; rank < tp; ++rank) {
        const program::Program p = program::lower(model.graph, model.plan, rank);
        int gathers = 0, views = 0;
        for (const auto& i : p.instrs) gathers += i.code == program::Code::kGather;
        for (const auto& v : p.values) views += v.ld != 0;
        EXPECT_EQ(gathers, 0) << fixture << " tp " << tp;
        EXPECT_GE(views, 3 * static_cast<int>(model.graph.blocks.size()))
            << fixture << " tp " << tp;
      }
    }
  }
}

}  // namespace
}  // namespace tpe::test
