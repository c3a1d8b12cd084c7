// The graph IR: what a policy plugin describes of its architecture, before any split or load.
// Every value is a [tokens, width] activation; ops are kept in program order (a valid
// topological order) and grouped into blocks named like the HF module class. Owns: the IR and
// its validation. May not touch: plugins (core/plugin fills it), ranks, devices, weights.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <tpengine/policy.h>

namespace tpe::graph {

// What an input op reads from a pass's inputs (backend::Batch): token ids or types, or each
// token's position in its sequence (plus the op's offset), for learned position tables.
enum class InputKind { kTokenIds, kTokenTypes, kPositions };

// Every value belongs to one token stream: 0, the tokens being generated (or scored), or 1, a
// second stream that the first attends to (an encoder's tokens, for cross-attention).
constexpr int kStreams = 2;

enum class OpKind {
  kInputIds,
  kEmbedding,
  kNorm,
  kLinear,
  kSplit,
  kRotary,
  kAttention,
  kActivation,
  kMul,
  kAdd,
  kLmHead
};

const char* op_kind_name(OpKind kind);

struct Op {
  OpKind kind = OpKind::kInputIds;
  std::vector<int> inputs;   // value ids
  std::vector<int> outputs;  // value ids; several for kSplit
  int block = -1;            // index into Graph::blocks, -1 outside any block
  // kLinear, kNorm: the checkpoint prefix (weights are name + ".weight"/".bias");
  // kEmbedding, kLmHead: the full weight tensor name.
  std::string name;
  int64_t in_features = 0;   // kLinear; kEmbedding/kLmHead: width
  int64_t out_features = 0;  // kLinear; kEmbedding/kLmHead: vocab
  bool has_bias = false;     // kLinear, kNorm
  bool transposed = false;   // kLinear: the weight is stored [in_features, out_features]
  tpe_norm_kind norm_kind = TPE_NORM_RMS;
  double eps = 0;
  tpe_activation activation = TPE_ACT_SILU;
  tpe_split_layout layout = TPE_SPLIT_CONCAT;  // kSplit
  std::vector<int64_t> part_widths;            // kSplit
  int64_t n_heads = 0;                         // kSplit (interleaved), kRotary
  int64_t head_dim = 0;                        // kSplit (interleaved), kRotary
  tpe_rope_desc rope{};                        // kRotary
  tpe_attention_desc attention{};              // kAttention
  InputKind input = InputKind::kTokenIds;      // kInputIds
  int64_t offset = 0;                          // kInputIds of positions: added to each position
};

struct Value {
  int64_t width = 0;
  int producer = -1;  // op index
  int stream = 0;     // whose tokens its rows are
};

struct Block {
  std::string cls;     // "LlamaDecoderLayer"
  std::string prefix;  // "model.layers.3"
};

struct Graph {
  std::vector<Op> ops;
  std::vector<Value> values;
  std::vector<Block> blocks;
  int logits = -1;  // the value the lm_head produced

  // "model.layers.3.self_attn.o_proj (linear, LlamaDecoderLayer model.layers.3)"
  std::string describe(int op) const;
  // Names relative to the op's block prefix ("self_attn.o_proj"), or the full name outside one.
  std::string relative_name(int op) const;
  int num_attention_ops() const;
};

// Builds a graph op by op with the host API's argument checks; every check failure is recorded
// as the first error, and later calls given an invalid value return invalid values.
class GraphBuilder {
 public:
  int input_ids() { return input(InputKind::kTokenIds, 0); }
  // The token ids or token types of stream `stream` (0 or 1): one row per token of that stream.
  int input(InputKind kind, int stream);
  // Each stream-0 token's position plus offset.
  int position_ids(int64_t offset);
  int embedding(int ids, const std::string& weight, int64_t vocab, int64_t width);
  int norm(int x, tpe_norm_kind kind, const std::string& prefix, bool has_bias, double eps);
  int linear(int x, const std::string& prefix, int64_t in_features, int64_t out_features,
             bool has_bias, bool transposed = false);
  // Returns false on error; parts receives n_parts values.
  bool split(int x, tpe_split_layout layout, const std::vector<int64_t>& part_widths,
             int64_t n_heads, int64_t head_dim, std::vector<int>& parts);
  int rotary(int x, int64_t n_heads, int64_t head_dim, const tpe_rope_desc& rope);
  int attention(int q, int k, int v, const tpe_attention_desc& desc);
  int activation(int x, tpe_activation act);
  int mul(int a, int b);
  int add(int a, int b);
  int lm_head(int x, const std::string& weight, int64_t vocab, int64_t width);
  void begin_block(const std::string& cls, const std::string& prefix);
  void end_block();

  void set_error(const std::string& message);
  const std::optional<std::string>& error() const { return error_; }
  // The finished graph; fails (tpe::Error) if an error was recorded, no lm_head was built, or a
  // block was left open.
  Graph finish();

 private:
  // Whether v is a value an earlier op produced. An invalid one that no recorded error explains
  // (a policy passing a made-up value) is recorded as the error.
  bool valid(int v);
  bool check(bool ok, const std::string& message);
  // Outputs take the stream of the op's first input (an input op's: its own).
  int add_op(graph::Op op, std::vector<int64_t> output_widths, int stream = -1);
  int elementwise(OpKind kind, int a, int b);
  Graph graph_;
  int current_block_ = -1;
  std::optional<std::string> error_;
};

}  // namespace tpe::graph
