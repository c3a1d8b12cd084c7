#include "core/program/program.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "core/common/error.hpp"

namespace tpe::program {

using graph::Op;
using graph::OpKind;
using parallel::LinearKind;
using parallel::Step;

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
  }
  return "?";
}

int64_t Weight::local_rows() const { return rows.empty() ? shape[0] : index_count(rows); }

int64_t Weight::local_cols() const {
  if (shape.size() < 2) return 1;
  return cols.empty() ? shape[1] : index_count(cols);
}

int64_t Program::bytes(int v, const Limits& l) const {
  const Value& value = values[v];
  if (!value.stored) return 0;
  const int64_t rows = value.rows == Rows::kTokens ? l.tokens : l.logit_rows;
  return (rows * value.width * l.element_bytes + 255) / 256 * 256;
}

int Program::storage(int v) const {
  while (values[v].alias >= 0) v = values[v].alias;
  return v;
}

namespace {

Instr make(Code code, int op, std::vector<int> in, int out) {
  Instr i;
  i.code = code;
  i.op = op;
  i.in = std::move(in);
  i.out = out;
  return i;
}

// A weight slice's identity: two ops reading the same slice (tied embeddings) share it.
std::string slice_key(const std::string& tensor, const IndexSet& rows, const IndexSet& cols) {
  std::string key = tensor;
  for (const Range& r : rows) key += "|r" + std::to_string(r.begin) + "-" + std::to_string(r.end);
  for (const Range& c : cols) key += "|c" + std::to_string(c.begin) + "-" + std::to_string(c.end);
  return key;
}

class Lowering {
 public:
  Lowering(const graph::Graph& g, const parallel::Plan& plan, int rank)
      : g_(g), plan_(plan), rank_(rank) {
    p_.rank = rank;
    p_.world = plan.world;
    p_.vocab = plan.vocab;
    for (size_t v = 0; v < g.values.size(); ++v) {
      Value value;
      value.width = index_count(parallel::held_features(g, plan, static_cast<int>(v), rank));
      value.stored = g.ops[g.values[v].producer].kind != OpKind::kInputIds;
      p_.values.push_back(value);
    }
  }

  Program run() {
    for (const Step& step : plan_.steps) {
      if (step.kind == Step::Kind::kAllReduce) {
        emit(make(Code::kAllReduce, -1, {step.index}, step.index));
      } else {
        lower_op(step.index);
      }
    }
    alias_in_place();
    return std::move(p_);
  }

 private:
  void emit(Instr instr) { p_.instrs.push_back(std::move(instr)); }

  int weight(const std::string& tensor, std::vector<int64_t> shape, IndexSet rows, IndexSet cols) {
    const std::string key = slice_key(tensor, rows, cols);
    auto it = weight_index_.find(key);
    if (it != weight_index_.end()) return it->second;
    const int index = static_cast<int>(p_.weights.size());
    p_.weights.push_back({tensor, std::move(shape), std::move(rows), std::move(cols)});
    weight_index_.emplace(key, index);
    return index;
  }

  int new_value(int64_t width, Rows rows) {
    p_.values.push_back({width, rows});
    return static_cast<int>(p_.values.size()) - 1;
  }

  void lower_op(int index) {
    const Op& op = g_.ops[index];
    const auto in = [&](size_t k) { return op.inputs[k]; };
    const int out = op.outputs.empty() ? -1 : op.outputs[0];
    const Range vocab = plan_.vocab[rank_];
    switch (op.kind) {
      case OpKind::kInputIds:
        break;
      case OpKind::kEmbedding: {
        Instr i = make(Code::kEmbedding, index, {in(0)}, out);
        i.weight =
            weight(op.name, {op.out_features, op.in_features}, {{vocab.begin, vocab.end}}, {});
        emit(std::move(i));
        break;
      }
      case OpKind::kNorm: {
        const int64_t width = g_.values[in(0)].width;
        Instr i = make(Code::kNorm, index, {in(0)}, out);
        i.weight = weight(op.name + ".weight", {width}, {}, {});
        if (op.has_bias) i.bias = weight(op.name + ".bias", {width}, {}, {});
        emit(std::move(i));
        break;
      }
      case OpKind::kLinear: {
        const std::vector<int64_t> shape = {op.out_features, op.in_features};
        Instr i = make(Code::kLinear, index, {in(0)}, out);
        if (plan_.linear_kind[index] == LinearKind::kColumn) {
          const IndexSet& rows = plan_.shard[out][rank_];
          i.weight = weight(op.name + ".weight", shape, rows, {});
          if (op.has_bias) i.bias = weight(op.name + ".bias", {op.out_features}, rows, {});
        } else {
          i.weight = weight(op.name + ".weight", shape, {}, plan_.shard[in(0)][rank_]);
          // A row-parallel output is a sum over ranks: its bias is added once, by rank 0.
          if (op.has_bias && rank_ == 0) {
            i.bias = weight(op.name + ".bias", {op.out_features}, {}, {});
          }
        }
        emit(std::move(i));
        break;
      }
      case OpKind::kSplit:
        for (size_t part = 0; part < op.outputs.size(); ++part) {
          Instr i = make(Code::kGather, index, {in(0)}, op.outputs[part]);
          i.cols = plan_.split_parts[index][rank_][part];
          emit(std::move(i));
        }
        break;
      case OpKind::kRotary: {
        Instr i = make(Code::kRotary, index, {in(0)}, out);
        i.rope = rope(op);
        emit(std::move(i));
        break;
      }
      case OpKind::kAttention: {
        const tpe_attention_desc& a = op.attention;
        const IndexSet& q_set = plan_.shard[in(0)][rank_];
        const IndexSet& kv_set = plan_.shard[in(1)][rank_];
        Instr i = make(Code::kAttention, index, {in(0), in(1), in(2)}, out);
        i.attention.head_dim = a.head_dim;
        i.attention.first_q = q_set.empty() ? 0 : q_set.front().begin / a.head_dim;
        i.attention.first_kv = kv_set.empty() ? 0 : kv_set.front().begin / a.head_dim;
        i.attention.group = a.n_heads / a.n_kv_heads;
        i.attention.scale = a.scale > 0 ? static_cast<float>(a.scale)
                                        : 1.0f / std::sqrt(static_cast<float>(a.head_dim));
        i.attention.window = a.sliding_window;
        i.cache = static_cast<int>(p_.cache_widths.size());
        p_.cache_widths.push_back(index_count(kv_set));
        emit(std::move(i));
        break;
      }
      case OpKind::kActivation:
        emit(make(Code::kActivation, index, {in(0)}, out));
        break;
      case OpKind::kMul:
      case OpKind::kAdd: {
        const int skip = rank_ != 0 ? plan_.add_replicated_input[index] : -1;
        if (skip >= 0) {  // the replicated addend counts once, on rank 0
          emit(make(Code::kCopy, index, {op.inputs[1 - skip]}, out));
        } else {
          emit(make(op.kind == OpKind::kAdd ? Code::kAdd : Code::kMul, index, {in(0), in(1)}, out));
        }
        break;
      }
      case OpKind::kLmHead: {
        const int picked = new_value(g_.values[in(0)].width, Rows::kLogitRows);
        emit(make(Code::kSelectRows, index, {in(0)}, picked));
        p_.values[out].rows = Rows::kLogitRows;
        p_.values[out].width = op.out_features;
        p_.vocab_size = op.out_features;
        p_.logits = out;
        const int local = plan_.world > 1 ? new_value(vocab.size(), Rows::kLogitRows) : out;
        Instr product = make(Code::kLinear, index, {picked}, local);
        product.weight =
            weight(op.name, {op.out_features, op.in_features}, {{vocab.begin, vocab.end}}, {});
        emit(std::move(product));
        if (local != out) emit(make(Code::kGatherVocab, index, {local}, out));
        break;
      }
    }
  }

  int rope(const Op& op) {
    for (size_t r = 0; r < p_.ropes.size(); ++r) {
      const backend::RopeSpec& known = p_.ropes[r];
      if (known.head_dim == op.head_dim &&
          std::memcmp(&known.desc, &op.rope, sizeof(tpe_rope_desc)) == 0) {
        return static_cast<int>(r);
      }
    }
    p_.ropes.push_back({op.rope, op.head_dim});
    return static_cast<int>(p_.ropes.size()) - 1;
  }

  // Elementwise ops whose input dies with them write over it: rotary and activations then run in
  // place, and a copy of a dying value is no copy at all.
  void alias_in_place() {
    const int n = static_cast<int>(p_.instrs.size());
    std::vector<int> last(p_.values.size(), -1);
    for (int i = 0; i < n; ++i) {
      for (int v : p_.instrs[i].in) last[v] = i;
    }
    last[p_.logits] = n;
    std::vector<int> group_last = last;  // per storage root, the last use of any value in it
    std::vector<Instr> kept;
    for (int i = 0; i < n; ++i) {
      Instr& instr = p_.instrs[i];
      const bool elementwise = instr.code == Code::kRotary || instr.code == Code::kActivation ||
                               instr.code == Code::kCopy || instr.code == Code::kAdd ||
                               instr.code == Code::kMul;
      if (elementwise && instr.out != p_.logits) {
        for (int v : instr.in) {
          const int root = p_.storage(v);
          if (!p_.values[v].stored || group_last[root] != i) continue;
          p_.values[instr.out].alias = root;
          group_last[root] = std::max(group_last[root], last[instr.out]);
          break;
        }
      }
      const bool no_op =
          instr.code == Code::kCopy && p_.storage(instr.out) == p_.storage(instr.in[0]);
      if (!no_op) kept.push_back(std::move(instr));
    }
    p_.instrs = std::move(kept);
  }

  const graph::Graph& g_;
  const parallel::Plan& plan_;
  int rank_;
  Program p_;
  std::map<std::string, int> weight_index_;
};

}  // namespace

Program lower(const graph::Graph& graph, const parallel::Plan& plan, int rank) {
  TPE_CHECK(rank >= 0 && rank < plan.world, "rank out of range");
  return Lowering(graph, plan, rank).run();
}

void plan_memory(Program& p, const Limits& limits) {
  TPE_CHECK(limits.tokens >= 1 && limits.logit_rows >= 1, "empty limits");
  const int n = static_cast<int>(p.instrs.size());
  // Each storage root lives from the first instruction that touches it to the last.
  std::vector<int> first(p.values.size(), n + 1), last(p.values.size(), -1);
  for (int i = 0; i < n; ++i) {
    const Instr& instr = p.instrs[i];
    auto touch = [&](int v) {
      const int root = p.storage(v);
      first[root] = std::min(first[root], i);
      last[root] = std::max(last[root], i);
    };
    for (int v : instr.in) touch(v);
    touch(instr.out);
  }
  last[p.storage(p.logits)] = n;  // read after the pass
  struct Block {
    int64_t offset, size;
    int value;
  };
  std::vector<Block> live;  // sorted by offset
  int64_t arena = 0;
  auto allocate = [&](int v) {
    const int64_t size = p.bytes(v, limits);
    int64_t offset = 0;
    auto pos = live.begin();
    for (; pos != live.end(); ++pos) {
      if (pos->offset - offset >= size) break;
      offset = std::max(offset, pos->offset + pos->size);
    }
    live.insert(pos, {offset, size, v});
    p.values[v].offset = offset;
    arena = std::max(arena, offset + size);
  };
  std::vector<std::vector<int>> starting(n + 1), ending(n + 1);
  for (size_t v = 0; v < p.values.size(); ++v) {
    if (!p.values[v].stored || p.values[v].alias >= 0 || last[v] < 0) continue;
    starting[first[v]].push_back(static_cast<int>(v));
    ending[last[v]].push_back(static_cast<int>(v));
  }
  for (int i = 0; i <= n; ++i) {
    for (int v : starting[i]) allocate(v);
    for (int v : ending[i]) {
      live.erase(
          std::find_if(live.begin(), live.end(), [v](const Block& b) { return b.value == v; }));
    }
  }
  for (size_t v = 0; v < p.values.size(); ++v) {
    if (p.values[v].alias >= 0)
      p.values[v].offset = p.values[p.storage(static_cast<int>(v))].offset;
  }
  p.limits = limits;
  p.arena_bytes = arena;
}

std::string instr_label(const graph::Graph& graph, const Program&, const Instr& instr) {
  if (instr.op < 0) return code_name(instr.code);
  const std::string name = graph.relative_name(instr.op);
  const std::string kind = graph::op_kind_name(graph.ops[instr.op].kind);
  return name.empty() ? kind : kind + " " + name;
}

}  // namespace tpe::program
