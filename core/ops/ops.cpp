#include "core/ops/ops.hpp"

#include <cmath>

#include "core/common/error.hpp"

namespace tpe::ops {

using graph::Op;
using graph::OpKind;

const char* state_name(State state) {
  switch (state) {
    case State::kReplicated:
      return "replicated";
    case State::kSplit:
      return "split";
    case State::kPartial:
      return "partial";
  }
  return "?";
}

const char* code_name(Code code) {
  switch (code) {
    case Code::kEmbedding:
      return "embedding";
    case Code::kNorm:
      return "norm";
    case Code::kLinear:
      return "linear";
    case Code::kGather:
      return "gather";
    case Code::kRotary:
      return "rotary";
    case Code::kAttention:
      return "attention";
    case Code::kActivation:
      return "activation";
    case Code::kAdd:
      return "add";
    case Code::kMul:
      return "mul";
    case Code::kCopy:
      return "copy";
    case Code::kSelectRows:
      return "select_rows";
    case Code::kGatherVocab:
      return "gather_vocab";
    case Code::kAllReduce:
      return "all_reduce";
    case Code::kAddNorm:
      return "add_norm";
    case Code::kAllReduceNorm:
      return "all_reduce_norm";
    case Code::kLinearActivation:
      return "linear_activation";
    case Code::kGatedActivation:
      return "gated_activation";
  }
  return "?";
}

int64_t Weight::local_rows() const {
  if (!concat.empty()) {
    int64_t n = 0;
    for (const Weight& part : concat) n += part.local_rows();
    return n;
  }
  return rows.empty() ? shape[0] : index_count(rows);
}

std::vector<int64_t> Weight::stored_shape() const {
  return transposed ? std::vector<int64_t>{shape[1], shape[0]} : shape;
}

int64_t Weight::local_cols() const {
  if (!concat.empty()) return concat[0].local_cols();
  if (shape.size() < 2) return 1;
  return cols.empty() ? shape[1] : index_count(cols);
}

Instr make_instr(Code code, int op, std::vector<int> in, int out) {
  Instr i;
  i.code = code;
  i.op = op;
  i.in = std::move(in);
  i.out = out;
  return i;
}

namespace {

const Op& op_of(const Sharding& s, int op) { return s.graph().ops[op]; }
const Op& op_of(const Lowering& l, int op) { return l.graph().ops[op]; }

// ---- input_ids: the batch's token ids, the same on every rank --------------------------------
void shard_input_ids(Sharding& s, int op) { s.produce(op, State::kReplicated); }
// No instruction: the ids live in the pass's inputs, not in the arena.
void lower_input(Lowering& l, int op) { l.value(op_of(l, op).outputs[0]).stored = false; }

// A split reads its fused input as views rather than copies when the input comes from a
// column-parallel linear that only this split reads: the linear's weight rows are then grouped
// part by part (column_rows), so that each part is a run of the fused output's columns.
bool split_as_views(const Lowering& l, int split) {
  const int fused = op_of(l, split).inputs[0];
  const int producer = l.graph().values[fused].producer;
  return op_of(l, producer).kind == OpKind::kLinear &&
         l.linear_kind(producer) == LinearKind::kColumn &&
         l.readers(fused) == std::vector<int>{split};
}

// The weight rows of a column-parallel linear, in the order of its local output columns.
IndexSet column_rows(const Lowering& l, int linear) {
  const int out = op_of(l, linear).outputs[0];
  const std::vector<int>& readers = l.readers(out);
  if (readers.size() != 1 || op_of(l, readers[0]).kind != OpKind::kSplit ||
      !split_as_views(l, readers[0])) {
    return l.held(out);
  }
  std::vector<int64_t> features;  // the fused feature of each local column, in order
  for (const Range& r : l.held(out)) {
    for (int64_t f = r.begin; f < r.end; ++f) features.push_back(f);
  }
  IndexSet rows;  // part by part
  for (size_t part = 0; part < op_of(l, readers[0]).outputs.size(); ++part) {
    for (const Range& c : l.split_part(readers[0], part)) {
      for (int64_t i = c.begin; i < c.end; ++i) {
        const int64_t f = features[static_cast<size_t>(i)];
        index_append(rows, f, f + 1);
      }
    }
  }
  return rows;
}

// ---- embedding: vocabulary-parallel; each rank contributes the rows it owns (a partial sum) ---
void shard_embedding(Sharding& s, int op) { s.produce(op, State::kPartial); }

void lower_embedding(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  const Op& input = l.graph().ops[l.graph().values[op.inputs[0]].producer];
  // Each table is dealt out by its own rows (a token-type or encoder table is not the lm_head's
  // vocabulary); the lm_head's table is dealt the same way, so a tied pair shares its slice. A
  // position table with an offset holds position p in row p + offset: its rows [offset, vocab)
  // are dealt, and the instruction's range is in positions.
  const int64_t offset = input.offset;
  const Range vocab = deal(op.out_features - offset, l.world(), l.rank());
  Instr i = make_instr(Code::kEmbedding, index, {op.inputs[0]}, op.outputs[0]);
  i.vocab = vocab;
  const bool types = input.input == graph::InputKind::kTokenTypes;
  const bool second = l.graph().values[op.inputs[0]].stream == 1;
  i.ids = input.input == graph::InputKind::kPositions ? backend::Ids::kPositions
          : second ? (types ? backend::Ids::kSecondTokenTypes : backend::Ids::kSecondTokens)
                   : (types ? backend::Ids::kTokenTypes : backend::Ids::kTokens);
  i.weight = l.weight({op.name,
                       {op.out_features, op.in_features},
                       {{vocab.begin + offset, vocab.end + offset}},
                       {}});
  l.emit(std::move(i));
}

// ---- norm: needs the whole row ----------------------------------------------------------------
void shard_whole_row(Sharding& s, int op) {
  s.need_replicated(op_of(s, op).inputs[0], op);
  s.produce(op, State::kReplicated);
}

void lower_norm(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  const int64_t width = l.graph().values[op.inputs[0]].width;
  Instr i = make_instr(Code::kNorm, index, {op.inputs[0]}, op.outputs[0]);
  i.weight = l.weight({op.name + ".weight", {width}, {}, {}});
  if (op.has_bias) i.bias = l.weight({op.name + ".bias", {width}, {}, {}});
  l.emit(std::move(i));
}

// ---- linear: column-parallel on a whole input (output split), row-parallel on a split one
// (output partial) ------------------------------------------------------------------------------
void shard_linear(Sharding& s, int op) {
  const LinearKind kind = s.plan_linear(op);
  s.produce(op, kind == LinearKind::kColumn ? State::kSplit
                : kind == LinearKind::kRow  ? State::kPartial
                                            : State::kReplicated);
}

void lower_linear(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  const std::vector<int64_t> shape = {op.out_features, op.in_features};
  const std::string weight = op.name + ".weight", bias = op.name + ".bias";
  Instr i = make_instr(Code::kLinear, index, {op.inputs[0]}, op.outputs[0]);
  switch (l.linear_kind(index)) {
    case LinearKind::kColumn: {
      const IndexSet rows = column_rows(l, index);
      i.weight = l.weight({weight, shape, rows, {}, op.transposed});
      if (op.has_bias) i.bias = l.weight({bias, {op.out_features}, rows, {}});
      break;
    }
    case LinearKind::kRow:
      i.weight = l.weight({weight, shape, {}, l.held(op.inputs[0]), op.transposed});
      // A row-parallel output is a sum over ranks: its bias is added once, by rank 0.
      if (op.has_bias && l.rank() == 0) i.bias = l.weight({bias, {op.out_features}, {}, {}});
      break;
    default:  // replicated
      i.weight = l.weight({weight, shape, {}, {}, op.transposed});
      if (op.has_bias) i.bias = l.weight({bias, {op.out_features}, {}, {}});
  }
  l.emit(std::move(i));
}

// ---- split: the parts of a fused projection; layouts composed through the declared layout ----
void shard_split(Sharding& s, int op) {
  const State in = s.state(op_of(s, op).inputs[0]);
  if (in != State::kSplit) {
    fail("{}: a fused value must come straight from a linear projection", s.graph().describe(op));
  }
  s.produce(op, in);
}

void layout_split(Sharding& s, int op) { s.compose_split(op); }

void lower_split(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  if (split_as_views(l, index)) {  // no instruction: each part is a run of the fused columns
    int64_t offset = 0;
    for (size_t part = 0; part < op.outputs.size(); ++part) {
      l.view(op.outputs[part], op.inputs[0], offset);
      offset += index_count(l.split_part(index, part));
    }
    return;
  }
  for (size_t part = 0; part < op.outputs.size(); ++part) {
    Instr i = make_instr(Code::kGather, index, {op.inputs[0]}, op.outputs[part]);
    i.cols = l.split_part(index, part);
    l.emit(std::move(i));
  }
}

// ---- rotary and activations: per feature, keep the input's split --------------------------------
void shard_per_feature(Sharding& s, int op) {
  const Op& o = op_of(s, op);
  if (s.state(o.inputs[0]) == State::kPartial) s.need_replicated(o.inputs[0], op);
  const State in = s.state(o.inputs[0]);
  s.produce(op, in);
  if (in == State::kSplit) s.same_layout(o.outputs[0], o.inputs[0]);
}

// Rotary mixes features within a head: every rank must hold whole heads.
void layout_rotary(Sharding& s, int op) {
  const Op& o = op_of(s, op);
  if (s.state(o.inputs[0]) != State::kSplit) return;
  for (const IndexSet& set : s.layout(o.inputs[0])) {
    for (const Range& r : set) {
      if (r.begin % o.head_dim != 0 || r.end % o.head_dim != 0) {
        fail("{}: its input is split inside a head; rotary needs whole heads on each rank",
             s.graph().describe(op));
      }
    }
  }
}

void lower_rotary(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  Instr i = make_instr(Code::kRotary, index, {op.inputs[0]}, op.outputs[0]);
  i.rope = l.rope(op.rope, op.head_dim);
  l.emit(std::move(i));
}

void lower_activation(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  l.emit(make_instr(Code::kActivation, index, {op.inputs[0]}, op.outputs[0]));
}

// ---- attention: split by heads, q heads travelling with the kv head they read ------------------
void shard_attention(Sharding& s, int op) {
  const Op& o = op_of(s, op);
  for (size_t k = 0; k < 3; ++k) {
    const State in = s.state(o.inputs[k]);
    if (in != State::kSplit) {
      fail("{}: its q, k and v must come from linear projections (input {} is {})",
           s.graph().describe(op), k, state_name(in));
    }
  }
  s.produce(op, State::kSplit);
}

// With at least as many kv heads as ranks, kv heads are dealt out and each rank takes their q
// heads; otherwise q heads are dealt out and each rank holds (replicates) the kv heads its q
// heads need.
void layout_attention(Sharding& s, int op) {
  const Op& o = op_of(s, op);
  const tpe_attention_desc& a = o.attention;
  const int world = s.world();
  const int64_t group = a.n_heads / a.n_kv_heads;
  Layout q(world), kv(world);
  for (int r = 0; r < world; ++r) {
    Range qh, kvh;
    if (a.n_kv_heads >= world) {
      kvh = deal(a.n_kv_heads, world, r);
      qh = {kvh.begin * group, kvh.end * group};
    } else {
      qh = deal(a.n_heads, world, r);
      kvh = qh.size() == 0 ? Range{0, 0} : Range{qh.begin / group, (qh.end - 1) / group + 1};
    }
    index_append(q[r], qh.begin * a.head_dim, qh.end * a.head_dim);
    index_append(kv[r], kvh.begin * a.head_dim, kvh.end * a.head_dim);
  }
  s.set_layout(o.inputs[0], q, op);
  s.set_layout(o.inputs[1], kv, op);
  s.set_layout(o.inputs[2], kv, op);
  s.set_layout(o.outputs[0], q, op);
}

void lower_attention(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  const tpe_attention_desc& a = op.attention;
  const IndexSet& q_set = l.held(op.inputs[0]);
  const IndexSet& kv_set = l.held(op.inputs[1]);
  Instr i = make_instr(Code::kAttention, index, {op.inputs[0], op.inputs[1], op.inputs[2]},
                       op.outputs[0]);
  i.attention.head_dim = a.head_dim;
  i.attention.first_q = q_set.empty() ? 0 : q_set.front().begin / a.head_dim;
  i.attention.first_kv = kv_set.empty() ? 0 : kv_set.front().begin / a.head_dim;
  i.attention.group = a.n_heads / a.n_kv_heads;
  i.attention.scale =
      a.scale > 0 ? static_cast<float>(a.scale) : 1.0f / std::sqrt(static_cast<float>(a.head_dim));
  i.attention.window = a.sliding_window;
  i.attention.alibi_max_bias = static_cast<float>(a.alibi_max_bias);
  i.attention.alibi_scale =
      a.alibi_slope_scale > 0 ? static_cast<float>(a.alibi_slope_scale) : 1.0f;
  i.attention.alibi_heads = a.n_heads;
  i.attention.cross =
      l.graph().values[op.inputs[1]].stream != l.graph().values[op.inputs[0]].stream;
  i.cache = l.kv_layer(index_count(kv_set), i.attention.cross);
  l.emit(std::move(i));
}

// ---- add and mul: partial sums stay partial through adds (P + P, P + R: the replicated addend
// counted once); a product needs whole factors; split inputs must agree --------------------------
void shard_elementwise(Sharding& s, int op) {
  const Op& o = op_of(s, op);
  const int x = o.inputs[0], y = o.inputs[1];
  const auto partial = [&](int v) { return s.state(v) == State::kPartial; };
  const auto split = [&](int v) { return s.state(v) == State::kSplit; };
  const bool partial_add = o.kind == OpKind::kAdd && (partial(x) || partial(y));
  if (partial_add && (split(x) || split(y))) {
    s.need_replicated(partial(x) ? x : y, op);
  } else if (o.kind == OpKind::kMul) {
    for (int v : o.inputs) {
      if (partial(v)) s.need_replicated(v, op);
    }
  }
  if (!partial(x) && !partial(y) && split(x) != split(y)) {
    s.replicate_producer(split(x) ? x : y, op);
    fail("{}: one input is split across ranks and the other is not (producers {} and {})",
         s.graph().describe(op), s.graph().describe(s.graph().values[x].producer),
         s.graph().describe(s.graph().values[y].producer));
  }
  if (partial(x) || partial(y)) {
    s.produce(op, State::kPartial);
    if (s.state(x) != s.state(y)) s.add_once(op, partial(x) ? 1 : 0);
  } else {
    s.produce(op, s.state(x));
    if (split(x)) {
      s.same_layout(x, y);
      s.same_layout(o.outputs[0], x);
    }
  }
}

void lower_elementwise(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  const int once = l.rank() != 0 ? l.added_once(index) : -1;
  if (once >= 0) {  // the replicated addend counts once, on rank 0
    l.emit(make_instr(Code::kCopy, index, {op.inputs[1 - once]}, op.outputs[0]));
  } else {
    l.emit(make_instr(op.kind == OpKind::kAdd ? Code::kAdd : Code::kMul, index,
                      {op.inputs[0], op.inputs[1]}, op.outputs[0]));
  }
}

// ---- lm_head: vocabulary-parallel over the rows whose logits are wanted, then gathered ---------
void lower_lm_head(Lowering& l, int index) {
  const Op& op = op_of(l, index);
  const int out = op.outputs[0];
  const Range vocab = l.vocab();
  const int picked = l.new_value(l.graph().values[op.inputs[0]].width, Rows::kLogitRows);
  l.emit(make_instr(Code::kSelectRows, index, {op.inputs[0]}, picked));
  l.value(out).rows = Rows::kLogitRows;
  l.value(out).width = op.out_features;
  l.set_logits(out, op.out_features);
  const int local = l.world() > 1 ? l.new_value(vocab.size(), Rows::kLogitRows) : out;
  Instr product = make_instr(Code::kLinear, index, {picked}, local);
  product.weight =
      l.weight({op.name, {op.out_features, op.in_features}, {{vocab.begin, vocab.end}}, {}});
  l.emit(std::move(product));
  if (local != out) l.emit(make_instr(Code::kGatherVocab, index, {local}, out));
}

// One entry per op kind, in OpKind's order.
constexpr OpTraits kTraits[] = {
    /* kInputIds   */ {shard_input_ids, nullptr, 0, lower_input},
    /* kEmbedding  */ {shard_embedding, nullptr, 0, lower_embedding},
    /* kNorm       */ {shard_whole_row, nullptr, 0, lower_norm},
    /* kLinear     */ {shard_linear, nullptr, 0, lower_linear},
    /* kSplit      */ {shard_split, layout_split, 1, lower_split},
    /* kRotary     */ {shard_per_feature, layout_rotary, 2, lower_rotary},
    /* kAttention  */ {shard_attention, layout_attention, 0, lower_attention},
    /* kActivation */ {shard_per_feature, nullptr, 0, lower_activation},
    /* kMul        */ {shard_elementwise, nullptr, 0, lower_elementwise},
    /* kAdd        */ {shard_elementwise, nullptr, 0, lower_elementwise},
    /* kLmHead     */ {shard_whole_row, nullptr, 0, lower_lm_head},
};
static_assert(std::size(kTraits) == static_cast<size_t>(OpKind::kLmHead) + 1,
              "one traits entry per op kind");

}  // namespace

const OpTraits& traits(OpKind kind) { return kTraits[static_cast<size_t>(kind)]; }

}  // namespace tpe::ops
