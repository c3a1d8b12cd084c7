#include "core/graph/graph.hpp"

#include <cmath>

#include <fmt/format.h>

#include "core/common/error.hpp"

namespace tpe::graph {

const char* op_kind_name(OpKind kind) {
  switch (kind) {
    case OpKind::kInputIds:
      return "input_ids";
    case OpKind::kEmbedding:
      return "embedding";
    case OpKind::kNorm:
      return "norm";
    case OpKind::kLinear:
      return "linear";
    case OpKind::kSplit:
      return "split";
    case OpKind::kRotary:
      return "rotary";
    case OpKind::kAttention:
      return "attention";
    case OpKind::kActivation:
      return "activation";
    case OpKind::kMul:
      return "mul";
    case OpKind::kAdd:
      return "add";
    case OpKind::kLmHead:
      return "lm_head";
  }
  return "?";
}

std::string Graph::describe(int op) const {
  const Op& o = ops[op];
  std::string where = o.block >= 0
                          ? fmt::format(" in {} {}", blocks[o.block].cls, blocks[o.block].prefix)
                          : std::string();
  if (!o.name.empty()) return fmt::format("{} '{}'{}", op_kind_name(o.kind), o.name, where);
  return fmt::format("{} #{}{}", op_kind_name(o.kind), op, where);
}

std::string Graph::relative_name(int op) const {
  const Op& o = ops[op];
  if (o.block < 0) return o.name;
  const std::string& prefix = blocks[o.block].prefix;
  if (o.name.size() > prefix.size() + 1 && o.name.compare(0, prefix.size(), prefix) == 0 &&
      o.name[prefix.size()] == '.') {
    return o.name.substr(prefix.size() + 1);
  }
  return o.name;
}

int Graph::num_attention_ops() const {
  int n = 0;
  for (const Op& o : ops) n += o.kind == OpKind::kAttention;
  return n;
}

bool GraphBuilder::valid(int v) {
  if (v >= 0 && v < static_cast<int>(graph_.values.size())) return true;
  // -1 is what a failed call returned: its error is recorded already.
  if (v != -1 || !error_) {
    set_error(
        fmt::format("an op was given value {}, which no earlier op produced (the graph has "
                    "{} values)",
                    v, graph_.values.size()));
  }
  return false;
}

void GraphBuilder::set_error(const std::string& message) {
  if (!error_) error_ = message;
}

bool GraphBuilder::check(bool ok, const std::string& message) {
  if (!ok) set_error(message);
  return ok;
}

int GraphBuilder::add_op(Op op, std::vector<int64_t> output_widths, int stream) {
  op.block = current_block_;
  if (stream < 0) stream = op.inputs.empty() ? 0 : graph_.values[op.inputs[0]].stream;
  const int index = static_cast<int>(graph_.ops.size());
  for (int64_t width : output_widths) {
    op.outputs.push_back(static_cast<int>(graph_.values.size()));
    graph_.values.push_back({width, index, stream});
  }
  graph_.ops.push_back(std::move(op));
  return graph_.ops.back().outputs.empty() ? -1 : graph_.ops.back().outputs[0];
}

int GraphBuilder::input(InputKind kind, int stream) {
  if (!check(stream >= 0 && stream < kStreams,
             fmt::format("input: stream {} is not 0 or 1", stream))) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kInputIds;
  op.input = kind;
  return add_op(std::move(op), {1}, stream);
}

int GraphBuilder::position_ids(int64_t offset) {
  if (!check(offset >= 0 && offset < (int64_t{1} << 24),
             fmt::format("position_ids: offset {} must be in [0, 2^24)", offset))) {
    return -1;
  }
  const int v = input(InputKind::kPositions, 0);
  graph_.ops.back().offset = offset;
  return v;
}

int GraphBuilder::embedding(int ids, const std::string& weight, int64_t vocab, int64_t width) {
  if (!valid(ids)) return -1;
  const Op& input = graph_.ops[graph_.values[ids].producer];
  if (!check(input.kind == OpKind::kInputIds,
             fmt::format("embedding '{}': its input must be token ids, token types or positions",
                         weight)) ||
      !check(vocab > 0 && width > 0,
             fmt::format("embedding '{}': vocab {} and width {} must be positive", weight, vocab,
                         width)) ||
      !check(input.offset < vocab,
             fmt::format("embedding '{}': position offset {} leaves none of its {} rows", weight,
                         input.offset, vocab))) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kEmbedding;
  op.inputs = {ids};
  op.name = weight;
  op.in_features = width;
  op.out_features = vocab;
  return add_op(std::move(op), {width});
}

int GraphBuilder::norm(int x, tpe_norm_kind kind, const std::string& prefix, bool has_bias,
                       double eps) {
  if (!valid(x)) return -1;
  if (!check(kind == TPE_NORM_RMS || kind == TPE_NORM_LAYER,
             fmt::format("norm '{}': unknown norm kind {}", prefix, static_cast<int>(kind))) ||
      !check(eps >= 0, fmt::format("norm '{}': eps {} is negative", prefix, eps))) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kNorm;
  op.inputs = {x};
  op.name = prefix;
  op.norm_kind = kind;
  op.has_bias = has_bias;
  op.eps = eps;
  return add_op(std::move(op), {graph_.values[x].width});
}

int GraphBuilder::linear(int x, const std::string& prefix, int64_t in_features,
                         int64_t out_features, bool has_bias, bool transposed) {
  if (!valid(x)) return -1;
  if (!check(in_features == graph_.values[x].width,
             fmt::format("linear '{}': in_features {} does not match its input's width {}", prefix,
                         in_features, graph_.values[x].width)) ||
      !check(out_features > 0,
             fmt::format("linear '{}': out_features {} must be positive", prefix, out_features))) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kLinear;
  op.inputs = {x};
  op.name = prefix;
  op.in_features = in_features;
  op.out_features = out_features;
  op.has_bias = has_bias;
  op.transposed = transposed;
  return add_op(std::move(op), {out_features});
}

bool GraphBuilder::split(int x, tpe_split_layout layout, const std::vector<int64_t>& part_widths,
                         int64_t n_heads, int64_t head_dim, std::vector<int>& parts) {
  parts.clear();
  if (!valid(x)) return false;
  const int64_t width = graph_.values[x].width;
  const std::string what = fmt::format("split of value #{}", x);
  if (!check(!part_widths.empty(), what + ": no parts")) return false;
  std::vector<int64_t> widths = part_widths;
  if (layout == TPE_SPLIT_CONCAT) {
    int64_t sum = 0;
    for (int64_t w : widths) {
      if (!check(w > 0, what + ": part widths must be positive")) return false;
      sum += w;
    }
    if (!check(sum == width,
               fmt::format("{}: parts add up to {}, the value is {} wide", what, sum, width))) {
      return false;
    }
  } else if (layout == TPE_SPLIT_INTERLEAVED_HEADS) {
    if (!check(n_heads > 0 && head_dim > 0, what + ": n_heads and head_dim must be positive"))
      return false;
    const int64_t n_parts = static_cast<int64_t>(widths.size());
    if (!check(n_parts * n_heads * head_dim == width,
               fmt::format("{}: {} parts x {} heads x {} head_dim != width {}", what, n_parts,
                           n_heads, head_dim, width))) {
      return false;
    }
    widths.assign(widths.size(), n_heads * head_dim);
  } else if (layout == TPE_SPLIT_GROUPED) {
    if (!check(n_heads > 0, what + ": the number of groups (n_heads) must be positive")) {
      return false;
    }
    int64_t sum = 0;
    for (int64_t w : widths) {
      if (!check(w > 0 && w % n_heads == 0 && (head_dim <= 0 || (w / n_heads) % head_dim == 0),
                 fmt::format("{}: part width {} is not {} groups of whole {}-wide heads", what, w,
                             n_heads, head_dim))) {
        return false;
      }
      sum += w;
    }
    if (!check(sum == width,
               fmt::format("{}: parts add up to {}, the value is {} wide", what, sum, width))) {
      return false;
    }
  } else {
    return check(false, fmt::format("{}: unknown layout {}", what, static_cast<int>(layout)));
  }
  Op op;
  op.kind = OpKind::kSplit;
  op.inputs = {x};
  op.layout = layout;
  op.part_widths = widths;
  op.n_heads = n_heads;
  op.head_dim = head_dim;
  add_op(std::move(op), widths);
  parts = graph_.ops.back().outputs;
  return true;
}

int GraphBuilder::rotary(int x, int64_t n_heads, int64_t head_dim, const tpe_rope_desc& rope) {
  if (!valid(x)) return -1;
  const std::string what = fmt::format("rotary of value #{}", x);
  if (!check(n_heads > 0 && head_dim > 0 && n_heads * head_dim == graph_.values[x].width,
             fmt::format("{}: {} heads x {} head_dim != width {}", what, n_heads, head_dim,
                         graph_.values[x].width)) ||
      !check(rope.theta > 0, fmt::format("{}: rope theta {} must be positive", what, rope.theta)) ||
      !check(rope.partial_rotary_factor > 0 && rope.partial_rotary_factor <= 1,
             fmt::format("{}: partial_rotary_factor {} must be in (0, 1]", what,
                         rope.partial_rotary_factor))) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kRotary;
  op.inputs = {x};
  op.n_heads = n_heads;
  op.head_dim = head_dim;
  op.rope = rope;
  return add_op(std::move(op), {graph_.values[x].width});
}

int GraphBuilder::attention(int q, int k, int v, const tpe_attention_desc& desc) {
  if (!valid(q) || !valid(k) || !valid(v)) return -1;
  const std::string what = "attention";
  const int64_t hd = desc.head_dim;
  if (!check(desc.n_heads > 0 && desc.n_kv_heads > 0 && hd > 0,
             what + ": n_heads, n_kv_heads and head_dim must be positive") ||
      !check(desc.n_heads % desc.n_kv_heads == 0,
             fmt::format("{}: n_heads {} is not a multiple of n_kv_heads {}", what, desc.n_heads,
                         desc.n_kv_heads)) ||
      !check(graph_.values[q].width == desc.n_heads * hd,
             fmt::format("{}: q is {} wide, expected {} heads x {}", what, graph_.values[q].width,
                         desc.n_heads, hd)) ||
      !check(graph_.values[k].width == desc.n_kv_heads * hd &&
                 graph_.values[v].width == desc.n_kv_heads * hd,
             fmt::format("{}: k and v must be {} kv heads x {} wide", what, desc.n_kv_heads, hd)) ||
      !check(desc.sliding_window >= 0, what + ": sliding_window must be >= 0") ||
      !check(std::isfinite(desc.alibi_max_bias) && desc.alibi_max_bias >= 0 &&
                 desc.alibi_max_bias <= 64 && std::isfinite(desc.alibi_slope_scale) &&
                 desc.alibi_slope_scale >= 0,
             fmt::format("{}: alibi_max_bias {} must be in [0, 64] and alibi_slope_scale {} >= 0",
                         what, desc.alibi_max_bias, desc.alibi_slope_scale)) ||
      !check(desc.alibi_max_bias == 0 || graph_.values[k].stream == graph_.values[q].stream,
             what + ": cross-attention (k and v from another stream) has no ALiBi") ||
      !check(graph_.values[k].stream == graph_.values[v].stream,
             what + ": k and v must belong to one token stream") ||
      !check(graph_.values[k].stream == graph_.values[q].stream || desc.sliding_window == 0,
             what + ": cross-attention (k and v from another stream) has no sliding window")) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kAttention;
  op.inputs = {q, k, v};
  op.attention = desc;
  op.attention.struct_size = sizeof(tpe_attention_desc);
  return add_op(std::move(op), {desc.n_heads * hd});
}

int GraphBuilder::activation(int x, tpe_activation act) {
  if (!valid(x)) return -1;
  if (!check(act >= TPE_ACT_SILU && act <= TPE_ACT_RELU,
             fmt::format("activation: unknown kind {}", static_cast<int>(act)))) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kActivation;
  op.inputs = {x};
  op.activation = act;
  return add_op(std::move(op), {graph_.values[x].width});
}

int GraphBuilder::elementwise(OpKind kind, int a, int b) {
  if (!valid(a) || !valid(b)) return -1;
  if (!check(graph_.values[a].width == graph_.values[b].width,
             fmt::format("{}: widths {} and {} differ", op_kind_name(kind), graph_.values[a].width,
                         graph_.values[b].width)) ||
      !check(graph_.values[a].stream == graph_.values[b].stream,
             fmt::format("{}: its inputs belong to different token streams", op_kind_name(kind)))) {
    return -1;
  }
  Op op;
  op.kind = kind;
  op.inputs = {a, b};
  return add_op(std::move(op), {graph_.values[a].width});
}

int GraphBuilder::mul(int a, int b) { return elementwise(OpKind::kMul, a, b); }

int GraphBuilder::add(int a, int b) { return elementwise(OpKind::kAdd, a, b); }

int GraphBuilder::lm_head(int x, const std::string& weight, int64_t vocab, int64_t width) {
  if (!valid(x)) return -1;
  if (!check(graph_.logits < 0, fmt::format("lm_head '{}': the graph has one already", weight)) ||
      !check(width == graph_.values[x].width,
             fmt::format("lm_head '{}': width {} does not match its input's width {}", weight,
                         width, graph_.values[x].width)) ||
      !check(vocab > 0, fmt::format("lm_head '{}': vocab must be positive", weight)) ||
      !check(graph_.values[x].stream == 0,
             fmt::format("lm_head '{}': logits are of stream 0's tokens", weight))) {
    return -1;
  }
  Op op;
  op.kind = OpKind::kLmHead;
  op.inputs = {x};
  op.name = weight;
  op.in_features = width;
  op.out_features = vocab;
  graph_.logits = add_op(std::move(op), {vocab});
  return graph_.logits;
}

void GraphBuilder::begin_block(const std::string& cls, const std::string& prefix) {
  if (!check(
          current_block_ < 0,
          fmt::format("begin_block '{}' '{}': block '{}' is still open", cls, prefix,
                      current_block_ < 0 ? std::string() : graph_.blocks[current_block_].prefix)) ||
      !check(!cls.empty(), fmt::format("begin_block at '{}': empty block class", prefix))) {
    return;
  }
  current_block_ = static_cast<int>(graph_.blocks.size());
  graph_.blocks.push_back({cls, prefix});
}

void GraphBuilder::end_block() {
  check(current_block_ >= 0, "end_block without begin_block");
  current_block_ = -1;
}

Graph GraphBuilder::finish() {
  if (error_) throw Error(*error_);
  if (current_block_ >= 0) fail("block '{}' was never ended", graph_.blocks[current_block_].prefix);
  if (graph_.logits < 0) fail("the graph has no lm_head");
  return std::move(graph_);
}

}  // namespace tpe::graph
