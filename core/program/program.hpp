// What one rank runs: the graph and its plan lowered, once at load, into a flat list of
// instructions over the rank's local buffers, the weight slices it loads, its KV-cache layers,
// and a memory plan that places every activation in one arena by liveness. Owns: lowering and
// the memory plan. May not touch: weights' bytes, devices, plugins; backends run instructions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <tpengine/policy.h>

#include "core/backend/backend.hpp"
#include "core/common/index_set.hpp"
#include "core/graph/graph.hpp"
#include "core/parallel/plan.hpp"

namespace tpe::program {

enum class Code {
  kEmbedding,    // out = the rank's vocabulary rows of weight for the pass's ids, zeros elsewhere
  kNorm,         // out = norm(in[0]) * weight (+ bias)
  kLinear,       // out = in[0] · weight^T (+ bias)
  kGather,       // out = columns `cols` of in[0] (a part of a fused projection)
  kRotary,       // out = in[0] rotated by position (in place when out aliases in[0])
  kAttention,    // appends in[1], in[2] to KV layer `cache`, then out = attention of in[0]
  kActivation,   // out = act(in[0]) (in place when out aliases in[0])
  kAdd,          // out = in[0] + in[1]
  kMul,          // out = in[0] * in[1]
  kCopy,         // out = in[0]: a replicated addend that only rank 0 adds
  kSelectRows,   // out = the pass's logit rows of in[0]
  kGatherVocab,  // out = every rank's vocabulary slice in[0], side by side
  kAllReduce,    // in[0] summed over ranks, in place (out == in[0])
};

const char* code_name(Code code);

// How many rows a buffer has in a pass: one per token, or one per logit row wanted.
enum class Rows { kTokens, kLogitRows };

struct Value {
  int64_t width = 0;  // local columns
  Rows rows = Rows::kTokens;
  bool stored = true;  // false for the token ids, which live in the pass's inputs
  int alias = -1;      // shares this value's memory (in-place ops)
  int64_t offset = 0;  // bytes into the arena, set by plan_memory
};

// A weight slice as the rank loads it: rows (and, for 2-D tensors, cols) of the full tensor,
// empty meaning all.
struct Weight {
  std::string tensor;
  std::vector<int64_t> shape;  // of the full tensor
  IndexSet rows, cols;
  int64_t local_rows() const;
  int64_t local_cols() const;  // 1 for 1-D tensors
  int64_t elements() const { return local_rows() * local_cols(); }
};

struct Instr {
  Code code = Code::kCopy;
  int op = -1;  // the graph op it lowers, -1 for a collective
  std::vector<int> in;
  int out = -1;
  int weight = -1, bias = -1;         // Program::weights
  int cache = -1;                     // Program::cache_widths
  int rope = -1;                      // Program::ropes
  IndexSet cols;                      // kGather
  backend::AttentionShape attention;  // kAttention
};

// The largest pass the memory plan is sized for.
struct Limits {
  int64_t tokens = 1;      // tokens of one forward pass (a prompt chunk, or a decode batch)
  int64_t logit_rows = 1;  // rows whose logits one pass returns
  int64_t element_bytes = 4;
  bool operator==(const Limits&) const = default;
};

struct Program {
  int rank = 0;
  int world = 1;
  std::vector<Value> values;
  std::vector<Instr> instrs;
  std::vector<Weight> weights;           // each slice once (tied embeddings share one)
  std::vector<int64_t> cache_widths;     // per KV-cache layer: local key (and value) width
  std::vector<backend::RopeSpec> ropes;  // the rotary parameter sets, shared by their instructions
  std::vector<Range> vocab;              // per rank: rows of the embedding and lm_head
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

// Lowers the plan for one rank.
Program lower(const graph::Graph& graph, const parallel::Plan& plan, int rank);

// Places every stored value in one arena by liveness (first fit, 256-byte aligned) for passes up
// to `limits`; sets each value's offset and the program's arena_bytes.
void plan_memory(Program& program, const Limits& limits);

// "linear self_attn.q_proj", "all_reduce": the same in every layer.
std::string instr_label(const graph::Graph& graph, const Program& program, const Instr& instr);

}  // namespace tpe::program
