#include "core/parallel/plan.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <optional>

#include "core/common/error.hpp"

namespace tpe::parallel {
namespace {

using graph::Graph;
using graph::Op;
using graph::OpKind;

// Split values whose layouts must agree (elementwise ops, rotary) share a class.
class UnionFind {
 public:
  explicit UnionFind(size_t n) : parent_(n) { std::iota(parent_.begin(), parent_.end(), 0); }
  int find(int x) {
    while (parent_[x] != x) x = parent_[x] = parent_[parent_[x]];
    return x;
  }
  void unite(int a, int b) { parent_[find(a)] = find(b); }

 private:
  std::vector<int> parent_;
};

using Layout = std::vector<IndexSet>;  // per rank

Layout contiguous_units(int64_t units, int64_t unit_size, int world) {
  Layout layout(world);
  for (int r = 0; r < world; ++r) {
    const Range u = deal(units, world, r);
    index_append(layout[r], u.begin * unit_size, u.end * unit_size);
  }
  return layout;
}

// The default split of a width no attention constrains: contiguous granules of the largest
// power of two up to 64 that divides the width and leaves every rank at least one granule.
Layout grain_layout(int64_t width, int world) {
  int64_t grain = 64;
  while (grain > 1 && (width % grain != 0 || width / grain < world)) grain /= 2;
  return contiguous_units(width / grain, grain, world);
}

// q heads travel with the kv head they read. With at least as many kv heads as ranks, kv heads
// are dealt out and each rank takes their q heads; otherwise q heads are dealt out and each rank
// holds (replicates) the kv heads its q heads need.
std::pair<Layout, Layout> head_layouts(const tpe_attention_desc& a, int world) {
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
  return {q, kv};
}

// Where feature i of part `part` sits in the fused value.
int64_t fused_index(const Op& op, size_t part, int64_t i) {
  if (op.layout == TPE_SPLIT_CONCAT) {
    int64_t offset = 0;
    for (size_t p = 0; p < part; ++p) offset += op.part_widths[p];
    return offset + i;
  }
  const int64_t hd = op.head_dim;
  const int64_t n_parts = static_cast<int64_t>(op.part_widths.size());
  return (i / hd) * n_parts * hd + static_cast<int64_t>(part) * hd + i % hd;
}

class Planner {
 public:
  Planner(const Graph& graph, int world, const config::InjectionPolicy* injection)
      : g_(graph), world_(world), injection_(injection), classes_(graph.values.size()) {
    plan_.world = world;
    plan_.state.assign(g_.values.size(), State::kReplicated);
    plan_.linear_kind.assign(g_.ops.size(), LinearKind::kNone);
    plan_.shard.assign(g_.values.size(), {});
    plan_.split_parts.assign(g_.ops.size(), {});
    plan_.add_replicated_input.assign(g_.ops.size(), -1);
    for (int r = 0; r < world; ++r) {
      plan_.vocab.push_back(deal(vocab_size(), world, r));
    }
  }

  Plan run() {
    if (injection_ != nullptr) check_injection_names();
    current_ = plan_.state;
    for (int i = 0; i < static_cast<int>(g_.ops.size()); ++i) propagate(i);
    assign_layouts();
    return std::move(plan_);
  }

 private:
  int64_t vocab_size() const {
    for (const Op& op : g_.ops) {
      if (op.kind == OpKind::kLmHead) return op.out_features;
    }
    return 0;
  }

  // ---- states, in program order ----------------------------------------------------------
  void need_replicated(int value, int consumer) {
    if (current_[value] == State::kPartial) {
      // One rank's summand is already the whole value.
      if (world_ > 1) {
        const int producer_block = g_.ops[g_.values[value].producer].block;
        plan_.steps.push_back({Step::Kind::kAllReduce, value, producer_block});
      }
      current_[value] = State::kReplicated;
    } else if (current_[value] == State::kSplit) {
      fail(
          "{} needs the whole of a value that is split across ranks (produced by {}); "
          "gathering it is not supported",
          g_.describe(consumer), g_.describe(g_.values[value].producer));
    }
  }

  void produce(const Op& op, State state) {
    for (int v : op.outputs) plan_.state[v] = current_[v] = state;
  }

  void propagate(int index) {
    const Op& op = g_.ops[index];
    const auto in = [&](size_t k) { return current_[op.inputs[k]]; };
    switch (op.kind) {
      case OpKind::kInputIds:
        break;
      case OpKind::kEmbedding:
        break;
      case OpKind::kNorm:
      case OpKind::kLmHead:
        need_replicated(op.inputs[0], index);
        break;
      case OpKind::kLinear:
        plan_linear(index);
        break;
      case OpKind::kSplit:
        if (in(0) != State::kSplit) {
          fail("{}: a fused value must come straight from a linear projection", g_.describe(index));
        }
        break;
      case OpKind::kRotary:
      case OpKind::kActivation:
        if (in(0) == State::kPartial) need_replicated(op.inputs[0], index);
        break;
      case OpKind::kAttention:
        for (size_t k = 0; k < 3; ++k) {
          if (in(k) != State::kSplit) {
            fail("{}: its q, k and v must come from linear projections (input {} is {})",
                 g_.describe(index), k, state_name(in(k)));
          }
        }
        break;
      case OpKind::kMul:
      case OpKind::kAdd:
        plan_binary(index);
        break;
    }
    plan_.steps.push_back({Step::Kind::kOp, index, op.block});
    finish_op(index);
  }

  void plan_binary(int index) {
    const Op& op = g_.ops[index];
    const State a = current_[op.inputs[0]], b = current_[op.inputs[1]];
    if (op.kind == OpKind::kAdd && (a == State::kPartial || b == State::kPartial)) {
      if (a == State::kSplit || b == State::kSplit) {
        need_replicated(a == State::kPartial ? op.inputs[0] : op.inputs[1], index);
      } else {
        return;  // P + P, P + R: stays partial
      }
    } else if (op.kind == OpKind::kMul) {
      for (int v : op.inputs) {
        if (current_[v] == State::kPartial) need_replicated(v, index);
      }
    }
    if ((current_[op.inputs[0]] == State::kSplit) != (current_[op.inputs[1]] == State::kSplit)) {
      fail("{}: one input is split across ranks and the other is not (producers {} and {})",
           g_.describe(index), g_.describe(g_.values[op.inputs[0]].producer),
           g_.describe(g_.values[op.inputs[1]].producer));
    }
  }

  void finish_op(int index) {
    const Op& op = g_.ops[index];
    switch (op.kind) {
      case OpKind::kInputIds:
        produce(op, State::kReplicated);
        break;
      case OpKind::kEmbedding:
        produce(op, State::kPartial);
        break;  // vocabulary-parallel
      case OpKind::kNorm:
      case OpKind::kLmHead:
        produce(op, State::kReplicated);
        break;
      case OpKind::kLinear:
        produce(op,
                plan_.linear_kind[index] == LinearKind::kColumn ? State::kSplit : State::kPartial);
        break;
      case OpKind::kSplit:
      case OpKind::kRotary:
      case OpKind::kActivation:
        produce(op, current_[op.inputs[0]]);
        if (current_[op.inputs[0]] == State::kSplit && op.kind != OpKind::kSplit) {
          classes_.unite(op.outputs[0], op.inputs[0]);
        }
        break;
      case OpKind::kAttention:
        produce(op, State::kSplit);
        break;
      case OpKind::kMul:
      case OpKind::kAdd: {
        const State a = current_[op.inputs[0]], b = current_[op.inputs[1]];
        if (a == State::kPartial || b == State::kPartial) {
          produce(op, State::kPartial);
          if (a != b) plan_.add_replicated_input[index] = a == State::kPartial ? 1 : 0;
        } else {
          produce(op, a);
          if (a == State::kSplit) {
            classes_.unite(op.inputs[0], op.inputs[1]);
            classes_.unite(op.outputs[0], op.inputs[0]);
          }
        }
        break;
      }
    }
  }

  // ---- linears and the injection policy --------------------------------------------------
  const std::vector<std::string>* injection_rule(int index) const {
    if (injection_ == nullptr || g_.ops[index].block < 0) return nullptr;
    auto it = injection_->find(g_.blocks[g_.ops[index].block].cls);
    return it == injection_->end() ? nullptr : &it->second;
  }

  void plan_linear(int index) {
    const Op& op = g_.ops[index];
    const int x = op.inputs[0];
    const std::vector<std::string>* rule = injection_rule(index);
    if (rule == nullptr) {
      if (current_[x] == State::kPartial) need_replicated(x, index);
      plan_.linear_kind[index] =
          current_[x] == State::kSplit ? LinearKind::kRow : LinearKind::kColumn;
      return;
    }
    const std::string rel = g_.relative_name(index);
    const bool row = std::find(rule->begin(), rule->end(), rel) != rule->end();
    const std::string producer = g_.describe(g_.values[x].producer);
    if (row && current_[x] != State::kSplit) {
      fail(
          "injection policy makes {} row-parallel (all-reduced), but its input from {} is {}, "
          "not split: remove '{}' from the policy's {} list",
          g_.describe(index), producer, state_name(current_[x]), rel, g_.blocks[op.block].cls);
    }
    if (!row && current_[x] == State::kSplit) {
      fail(
          "injection policy leaves {} column-parallel, but its input from {} is split across "
          "ranks: add '{}' to the policy's {} list",
          g_.describe(index), producer, rel, g_.blocks[op.block].cls);
    }
    if (current_[x] == State::kPartial) need_replicated(x, index);
    plan_.linear_kind[index] = row ? LinearKind::kRow : LinearKind::kColumn;
  }

  void check_injection_names() const {
    for (const auto& [cls, names] : *injection_) {
      bool found_block = false;
      for (size_t b = 0; b < g_.blocks.size(); ++b) {
        if (g_.blocks[b].cls != cls) continue;
        found_block = true;
        for (const std::string& name : names) {
          bool found = false;
          for (size_t i = 0; i < g_.ops.size() && !found; ++i) {
            found = g_.ops[i].kind == OpKind::kLinear && g_.ops[i].block == static_cast<int>(b) &&
                    g_.relative_name(static_cast<int>(i)) == name;
          }
          if (!found) {
            fail("injection policy names layer '{}' in {}, but {} {} has no linear '{}.{}'", name,
                 cls, cls, g_.blocks[b].prefix, g_.blocks[b].prefix, name);
          }
        }
      }
      if (!found_block) {
        std::vector<std::string> classes;
        for (const auto& block : g_.blocks) {
          if (std::find(classes.begin(), classes.end(), block.cls) == classes.end()) {
            classes.push_back(block.cls);
          }
        }
        fail("injection policy names block class '{}', which the model does not have (it has: {})",
             cls, fmt::join(classes, ", "));
      }
    }
  }

  // ---- layouts of split values -----------------------------------------------------------
  void set_layout(int value, const Layout& layout, int op) {
    auto [it, inserted] = layouts_.emplace(classes_.find(value), layout);
    if (!inserted && it->second != layout) {
      fail("{}: its inputs are split in two incompatible ways", g_.describe(op));
    }
  }

  const Layout* layout_of(int value) {
    auto it = layouts_.find(classes_.find(value));
    return it == layouts_.end() ? nullptr : &it->second;
  }

  void assign_layouts() {
    for (int i = 0; i < static_cast<int>(g_.ops.size()); ++i) {
      const Op& op = g_.ops[i];
      if (op.kind != OpKind::kAttention) continue;
      auto [q, kv] = head_layouts(op.attention, world_);
      set_layout(op.inputs[0], q, i);
      set_layout(op.inputs[1], kv, i);
      set_layout(op.inputs[2], kv, i);
      set_layout(op.outputs[0], q, i);
    }
    for (int i = 0; i < static_cast<int>(g_.ops.size()); ++i) {
      if (g_.ops[i].kind == OpKind::kSplit) compose_split(i);
    }
    for (size_t v = 0; v < g_.values.size(); ++v) {
      if (plan_.state[v] != State::kSplit) continue;
      const int value = static_cast<int>(v);
      if (layout_of(value) == nullptr) {
        layouts_.emplace(classes_.find(value), grain_layout(g_.values[v].width, world_));
      }
      plan_.shard[v] = *layout_of(value);
    }
    for (int i = 0; i < static_cast<int>(g_.ops.size()); ++i) {
      if (g_.ops[i].kind == OpKind::kRotary && plan_.state[g_.ops[i].inputs[0]] == State::kSplit) {
        check_head_aligned(i);
      }
    }
  }

  void compose_split(int index) {
    const Op& op = g_.ops[index];
    if (layout_of(op.inputs[0]) != nullptr) {
      fail("{}: the fused value is constrained by another op; split it before using it",
           g_.describe(index));
    }
    for (size_t p = 0; p < op.outputs.size(); ++p) {
      if (layout_of(op.outputs[p]) == nullptr) {
        layouts_.emplace(classes_.find(op.outputs[p]),
                         grain_layout(g_.values[op.outputs[p]].width, world_));
      }
    }
    Layout fused(world_);
    plan_.split_parts[index].assign(world_, std::vector<IndexSet>(op.outputs.size()));
    for (int r = 0; r < world_; ++r) {
      // (fused index, part) of every feature the rank holds, in fused order.
      std::vector<std::pair<int64_t, size_t>> held;
      for (size_t p = 0; p < op.outputs.size(); ++p) {
        for (const Range& range : (*layout_of(op.outputs[p]))[r]) {
          for (int64_t i = range.begin; i < range.end; ++i) {
            held.emplace_back(fused_index(op, p, i), p);
          }
        }
      }
      std::sort(held.begin(), held.end());
      for (size_t pos = 0; pos < held.size(); ++pos) {
        index_append(fused[r], held[pos].first, held[pos].first + 1);
        const int64_t local = static_cast<int64_t>(pos);
        index_append(plan_.split_parts[index][r][held[pos].second], local, local + 1);
      }
    }
    layouts_.emplace(classes_.find(op.inputs[0]), fused);
  }

  void check_head_aligned(int index) {
    const Op& op = g_.ops[index];
    for (const IndexSet& set : *layout_of(op.inputs[0])) {
      for (const Range& r : set) {
        if (r.begin % op.head_dim != 0 || r.end % op.head_dim != 0) {
          fail("{}: its input is split inside a head; rotary needs whole heads on each rank",
               g_.describe(index));
        }
      }
    }
  }

  const Graph& g_;
  int world_;
  const config::InjectionPolicy* injection_;
  UnionFind classes_;
  std::map<int, Layout> layouts_;  // by class root
  std::vector<State> current_;
  Plan plan_;
};

}  // namespace

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

const char* linear_kind_name(LinearKind kind) {
  switch (kind) {
    case LinearKind::kNone:
      return "none";
    case LinearKind::kColumn:
      return "column";
    case LinearKind::kRow:
      return "row";
  }
  return "?";
}

Plan make_plan(const Graph& graph, int world, const config::InjectionPolicy* injection_policy) {
  if (world < 1) fail("tp_size must be at least 1, got {}", world);
  return Planner(graph, world, injection_policy).run();
}

std::vector<int> all_reduces_per_block(const Graph& graph, const Plan& plan) {
  std::vector<int> counts(graph.blocks.size() + 1, 0);  // last slot: outside blocks
  for (const Step& s : plan.steps) {
    if (s.kind == Step::Kind::kAllReduce) {
      ++counts[s.block >= 0 ? s.block : graph.blocks.size()];
    }
  }
  return counts;
}

IndexSet held_features(const Graph& graph, const Plan& plan, int value, int rank) {
  if (plan.state[value] == State::kSplit) return plan.shard[value][rank];
  return {{0, graph.values[value].width}};
}

}  // namespace tpe::parallel
