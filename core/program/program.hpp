// What one rank runs: the graph and its plan lowered, once at load, into a flat list of
// instructions over the rank's local buffers (each op kind's lowering rule is in core/ops), the
// weight slices it loads, its KV-cache layers, and a memory plan that places every activation in
// one arena by liveness. Owns: driving the lowering, in-place aliasing, the memory plan. May not
// touch: weights' bytes, devices, plugins; backends run instructions.
#pragma once

#include <array>
#include <bitset>
#include <cstdint>
#include <string>
#include <vector>

#include <tpengine/policy.h>

#include "core/backend/backend.hpp"
#include "core/common/index_set.hpp"
#include "core/graph/graph.hpp"
#include "core/ops/ops.hpp"
#include "core/parallel/plan.hpp"

namespace tpe::program {

using ops::Code;
using ops::code_name;
using ops::Instr;
using ops::Rows;
using ops::Value;
using ops::Weight;

// The largest pass the memory plan is sized for.
struct Limits {
  int64_t tokens = 1;      // tokens of one forward pass (a prompt chunk, or a decode batch)
  int64_t logit_rows = 1;  // rows whose logits one pass returns
  int64_t element_bytes = 4;
  int64_t second_tokens = 1;  // tokens of the second stream in one pass (graphs that have one)
};

struct Program {
  int rank = 0;
  int world = 1;
  std::vector<Value> values;
  std::vector<Instr> instrs;
  std::vector<Weight> weights;  // each slice once (tied embeddings share one)
  // Per KV-cache layer: local key (and value) width, and whether it holds the second stream's
  // keys (cross-attention).
  struct CacheLayer {
    int64_t width = 0;
    bool cross = false;
  };
  std::vector<CacheLayer> cache_layers;
  std::vector<backend::RopeSpec> ropes;  // the rotary parameter sets, shared by their instructions
  std::vector<Range> vocab;              // per rank: its rows of the lm_head (logits' slices)
  int64_t vocab_size = 0;
  int logits = -1;  // the value holding the full logits
  // Memory plan (plan_memory): the arena holds every stored value at its offset.
  Limits limits;
  int64_t arena_bytes = 0;

  // Bytes value v takes at `limits` (0 unless stored).
  int64_t bytes(int v, const Limits& limits) const;
  // The value whose memory v uses (v itself unless it aliases another).
  int storage(int v) const;
};

// The fused path's rewrite passes (kernel_inject), in the order they run:
//   merge_linears      linears reading one input as one matrix product (q/k/v, gate/up; their
//                      outputs become views of it);
//   linear_activation  a linear's bias and activation applied in its epilogue;
//   gated_activation   act(gate) * up of one merged projection as one instruction;
//   add_norm           a residual add and the norm reading its sum as one instruction;
//   rotary_attention   rotary of q and k moved into attention (with the KV append);
//   all_reduce_norm    at TP > 1, an all-reduce and a norm reading its sum as one instruction.
enum class Pass {
  kMergeLinears,
  kLinearActivation,
  kGatedActivation,
  kAddNorm,
  kRotaryAttention,
  kAllReduceNorm
};
inline constexpr std::array<const char*, 6> kPassNames = {"merge_linears",    "linear_activation",
                                                          "gated_activation", "add_norm",
                                                          "rotary_attention", "all_reduce_norm"};
// Which passes run, indexed by Pass; none is the plain path.
using Passes = std::bitset<kPassNames.size()>;
inline Passes all_passes() { return Passes().set(); }
// The passes of these names (a run config's fused_passes); tpe::Error naming an unknown one.
Passes passes_named(const std::vector<std::string>& names);

// Lowers the plan for one rank, then rewrites the program with `passes` (none: as lowered).
Program lower(const graph::Graph& graph, const parallel::Plan& plan, int rank, Passes passes = {});

// Places every stored value in one arena by liveness (first fit, 256-byte aligned) for passes up
// to `limits`; sets each value's offset and the program's arena_bytes.
void plan_memory(Program& program, const Limits& limits);

// "linear self_attn.q_proj", "all_reduce": the same in every layer.
std::string instr_label(const graph::Graph& graph, const Instr& instr);

}  // namespace tpe::program
