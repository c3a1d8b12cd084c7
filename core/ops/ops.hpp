// The op traits table: for each graph op kind, in one place, how it splits across ranks (its
// sharding rule, and the layout it imposes on split values) and how one rank runs it (its
// lowering: the weight slices it loads, the buffers it writes, the instructions it becomes). The
// planner (core/parallel) and the lowering (core/program) drive these rules through the two
// interfaces below and switch on no op kind themselves; adding an op kind is one entry here, its
// kernels and its tests. The vocabulary both sides speak (value states, instructions) lives here
// too. Owns: per-kind rules. May not touch: the drivers' bookkeeping (all-reduce placement,
// layouts' unions, memory), weights' bytes, devices.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/backend/backend.hpp"
#include "core/common/index_set.hpp"
#include "core/graph/graph.hpp"

namespace tpe::ops {

// ---- the planner's vocabulary ----------------------------------------------------------------
// Every value is replicated (R), split (S: each rank holds an index set of its features) or
// partial (P: each rank holds a summand).
enum class State { kReplicated, kSplit, kPartial };
// A replicated linear: every rank holds the whole weight and computes the whole output (a small
// projection whose output is needed whole, where no split of it could be used).
enum class LinearKind { kNone, kColumn, kRow, kReplicated };
const char* state_name(State state);

using Layout = std::vector<IndexSet>;  // per rank: the features it holds

// What a sharding rule may ask of the planner.
class Sharding {
 public:
  virtual ~Sharding() = default;
  virtual const graph::Graph& graph() const = 0;
  virtual int world() const = 0;
  virtual State state(int value) const = 0;
  // The value must be whole on every rank before `op` reads it: a partial one is all-reduced
  // here; a split one cannot be (an error naming both ops).
  virtual void need_replicated(int value, int op) = 0;
  virtual void produce(int op, State state) = 0;
  // Two split values whose layouts must agree (elementwise ops, rotary).
  virtual void same_layout(int a, int b) = 0;
  // Column- or row-parallel for a linear, from its input's state or the injection policy (whose
  // inconsistencies it reports), or replicated where the planner found that its output must be
  // whole; makes a partial input whole first.
  virtual LinearKind plan_linear(int op) = 0;
  // A split value that `op` needs whole: if a column-parallel linear made it, the planner plans
  // again with that linear replicated (and does not return); otherwise it returns.
  virtual void replicate_producer(int value, int op) = 0;
  // A replicated addend of a partial sum is added by rank 0 only: input `k` of `op`.
  virtual void add_once(int op, int k) = 0;

  // Layouts (after all states are known): fix one, read one, and compose a fused value's from
  // its parts' through the split op's declared layout.
  virtual void set_layout(int value, const Layout& layout, int op) = 0;
  virtual const Layout& layout(int value) = 0;
  virtual void compose_split(int op) = 0;
};

// ---- the program's vocabulary ----------------------------------------------------------------
enum class Code {
  kEmbedding,    // out = the rank's vocabulary rows of weight for the pass's ids, zeros elsewhere
  kNorm,         // out = norm(in[0]) * weight (+ bias)
  kLinear,       // out = in[0] · weight^T (+ bias)
  kGather,       // out = columns `cols` of in[0] (a part of a fused projection)
  kRotary,       // out = in[0] rotated by position (in place when out aliases in[0])
  kAttention,    // appends in[1], in[2] to KV layer `cache`, then out = attention of in[0];
                 // with `rope` (fused path), in[0] and in[1] are rotated in place first
  kActivation,   // out = act(in[0]) (in place when out aliases in[0])
  kAdd,          // out = in[0] + in[1]
  kMul,          // out = in[0] * in[1]
  kCopy,         // out = in[0]: a replicated addend that only rank 0 adds
  kSelectRows,   // out = the pass's logit rows of in[0]
  kGatherVocab,  // out = every rank's vocabulary slice in[0], side by side
  kAllReduce,    // in[0] summed over ranks, in place (out == in[0])
  // Fused path only (program rewrite passes):
  kLinearActivation,  // out = act(in[0] · weight^T (+ bias)); `op` is the activation
  kGatedActivation,   // out = act(in[0]) * in[1], both views of one fused projection
  kAddNorm,           // sum = in[0] + in[1] (rounded), then out = norm(sum) * weight (+ bias)
  kAllReduceNorm,     // in[0] (= sum) all-reduced in place, then out = norm(sum) * weight (+ bias)
};
const char* code_name(Code code);

// How many rows a buffer has in a pass: one per token (of stream 0 or of the second stream), or
// one per logit row wanted.
enum class Rows { kTokens, kLogitRows, kSecondTokens };

struct Value {
  int64_t width = 0;  // local columns
  Rows rows = Rows::kTokens;
  bool stored = true;  // false for the token ids, which live in the pass's inputs
  int alias = -1;      // shares this value's memory (in-place ops, views)
  // A view: columns [col_offset, col_offset + width) of the value it aliases, whose rows are ld
  // elements apart (0: not a view).
  int64_t col_offset = 0;
  int64_t ld = 0;
  int64_t offset = 0;  // bytes into the arena, set by the memory plan
};

// A weight slice as the rank loads it: rows (and, for 2-D tensors, cols) of the full tensor,
// empty meaning all.
struct Weight {
  std::string tensor;
  std::vector<int64_t> shape;  // of the full tensor, as the kernels see it
  IndexSet rows, cols;
  // Stored as [shape[1], shape[0]] (GPT-2's Conv1D): the loader transposes the slice.
  bool transposed = false;
  // Fused path: the weight is these slices' rows one after another (merged projections), and
  // tensor, shape, rows and cols above are unused.
  std::vector<Weight> concat = {};
  std::vector<int64_t> stored_shape() const;
  int64_t local_rows() const;
  int64_t local_cols() const;  // 1 for 1-D tensors
  int64_t elements() const { return local_rows() * local_cols(); }
};

struct Instr {
  Code code = Code::kCopy;
  int op = -1;  // the graph op it lowers, -1 for a collective
  std::vector<int> in;
  int out = -1;
  int weight = -1, bias = -1;                // Program::weights
  int cache = -1;                            // Program::cache_layers
  int rope = -1;                             // Program::ropes (kAttention: fused path's rotary)
  int sum = -1;                              // kAddNorm, kAllReduceNorm: the sum's value
  IndexSet cols;                             // kGather
  backend::AttentionShape attention;         // kAttention
  backend::Ids ids = backend::Ids::kTokens;  // kEmbedding: which ids it looks up
  Range vocab;                               // kEmbedding: the table rows this rank holds
  std::string label;                         // set by a rewrite pass: what the instruction does
};
Instr make_instr(Code code, int op, std::vector<int> in, int out);

// What a lowering rule may ask of the program being built for one rank.
class Lowering {
 public:
  virtual ~Lowering() = default;
  virtual const graph::Graph& graph() const = 0;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // The features this rank holds of a value (all, unless split).
  virtual const IndexSet& held(int value) const = 0;
  virtual Range vocab() const = 0;  // this rank's rows of the embedding and lm_head
  virtual LinearKind linear_kind(int op) const = 0;
  // For a split op: the columns of this rank's fused input that make up part `part`.
  virtual const IndexSet& split_part(int op, size_t part) const = 0;
  // The input of an add whose replicated addend only rank 0 adds, or -1.
  virtual int added_once(int op) const = 0;
  // The ops that read a value.
  virtual const std::vector<int>& readers(int value) const = 0;
  // `value` becomes columns [col_offset, col_offset + its width) of `of`.
  virtual void view(int value, int of, int64_t col_offset) = 0;

  // The slice's index among the rank's weights (one per distinct slice).
  virtual int weight(Weight slice) = 0;
  virtual int new_value(int64_t width, Rows rows) = 0;
  virtual Value& value(int v) = 0;
  virtual int rope(const tpe_rope_desc& desc, int64_t head_dim) = 0;
  // A KV-cache layer of `width` local columns; cross: it holds the second stream's keys.
  virtual int kv_layer(int64_t width, bool cross) = 0;
  virtual void set_logits(int value, int64_t vocab_size) = 0;
  virtual void emit(Instr instr) = 0;
};

// ---- the table -------------------------------------------------------------------------------
struct OpTraits {
  // Sharding: checks the inputs' states, asks for what must be whole, produces the outputs'.
  void (*shard)(Sharding& s, int op);
  // Layouts, in phases: 0 fixes layouts from the op's own structure (attention heads), 1
  // derives them from others (fused splits), 2 checks them (rotary's whole heads). Null: none.
  void (*layout)(Sharding& s, int op);
  int layout_phase;
  void (*lower)(Lowering& l, int op);
};

const OpTraits& traits(graph::OpKind kind);

}  // namespace tpe::ops
