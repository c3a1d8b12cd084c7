#include "core/parallel/plan.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <optional>
#include <set>

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

using ops::Layout;

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

// Where feature i of part `part` sits in the fused value. Every layout is groups holding, part
// after part, their share of every part: concatenated parts are one group, interleaved heads one
// group per head, Falcon's grouped qkv one group per kv head.
int64_t fused_index(const Op& op, size_t part, int64_t i) {
  const int64_t groups = op.layout == TPE_SPLIT_CONCAT ? 1 : op.n_heads;
  int64_t group_width = 0, before = 0;
  for (size_t p = 0; p < op.part_widths.size(); ++p) {
    if (p < part) before += op.part_widths[p] / groups;
    group_width += op.part_widths[p] / groups;
  }
  const int64_t share = op.part_widths[part] / groups;
  return (i / share) * group_width + before + i % share;
}

class Planner final : public ops::Sharding {
 public:
  Planner(const Graph& graph, int world, const config::InjectionPolicy* injection)
      : g_(graph), world_(world), injection_(injection), classes_(graph.values.size()) {
    plan_.world = world;
    plan_.state.assign(g_.values.size(), State::kReplicated);
    plan_.linear_kind.assign(g_.ops.size(), LinearKind::kNone);
    plan_.shard.assign(g_.values.size(), {});
    plan_.split_parts.assign(g_.ops.size(), {});
    plan_.add_replicated_input.assign(g_.ops.size(), -1);
    const int64_t vocab = g_.values[g_.logits].width;
    if (vocab < world) {
      fail("tp_size {} is more ranks than the vocabulary's {} rows: use a smaller tp_size", world,
           vocab);
    }
    for (int r = 0; r < world; ++r) plan_.vocab.push_back(deal(vocab, world, r));
  }

  Plan run() {
    if (injection_ != nullptr) check_injection_names();
    const Plan fresh = plan_;
    for (;;) {
      try {
        current_ = plan_.state;
        for (int i = 0; i < static_cast<int>(g_.ops.size()); ++i) {
          ops::traits(g_.ops[i].kind).shard(*this, i);
          plan_.steps.push_back({Step::Kind::kOp, i, g_.ops[i].block});
        }
        break;
      } catch (const Replan&) {  // a linear joined replicated_: start over
        plan_ = fresh;
        classes_ = UnionFind(g_.values.size());
      }
    }
    assign_layouts();
    return std::move(plan_);
  }

  // ---- ops::Sharding -----------------------------------------------------------------------
  const Graph& graph() const override { return g_; }
  int world() const override { return world_; }
  State state(int value) const override { return current_[value]; }

  void need_replicated(int value, int consumer) override {
    if (current_[value] == State::kPartial) {
      // One rank's summand is already the whole value.
      if (world_ > 1) {
        const int producer_block = g_.ops[g_.values[value].producer].block;
        plan_.steps.push_back({Step::Kind::kAllReduce, value, producer_block});
      }
      current_[value] = State::kReplicated;
    } else if (current_[value] == State::kSplit) {
      replicate_producer(value, consumer);
      fail(
          "{} needs the whole of a value that is split across ranks (produced by {}); "
          "gathering it is not supported",
          g_.describe(consumer), g_.describe(g_.values[value].producer));
    }
  }

  void produce(int op, State state) override {
    for (int v : g_.ops[op].outputs) plan_.state[v] = current_[v] = state;
  }

  void same_layout(int a, int b) override { classes_.unite(a, b); }

  void add_once(int op, int k) override { plan_.add_replicated_input[op] = k; }

  // ---- linears and the injection policy --------------------------------------------------
  const std::vector<std::string>* injection_rule(int index) const {
    if (injection_ == nullptr || g_.ops[index].block < 0) return nullptr;
    auto it = injection_->find(g_.blocks[g_.ops[index].block].cls);
    return it == injection_->end() ? nullptr : &it->second;
  }

  LinearKind plan_linear(int index) override {
    const Op& op = g_.ops[index];
    const int x = op.inputs[0];
    const std::vector<std::string>* rule = injection_rule(index);
    if (rule == nullptr) {
      if (current_[x] == State::kPartial) need_replicated(x, index);
      if (replicated_.count(index) != 0) return plan_.linear_kind[index] = LinearKind::kReplicated;
      return plan_.linear_kind[index] =
                 current_[x] == State::kSplit ? LinearKind::kRow : LinearKind::kColumn;
    }
    const std::string rel = g_.relative_name(index);
    const bool row = std::find(rule->begin(), rule->end(), rel) != rule->end();
    const std::string producer = g_.describe(g_.values[x].producer);
    if (row && current_[x] != State::kSplit) {
      fail(
          "injection policy makes {} row-parallel (all-reduced), but its input from {} is {}, "
          "not split: remove '{}' from the policy's {} list",
          g_.describe(index), producer, ops::state_name(current_[x]), rel, g_.blocks[op.block].cls);
    }
    if (!row && current_[x] == State::kSplit) {
      fail(
          "injection policy leaves {} column-parallel, but its input from {} is split across "
          "ranks: add '{}' to the policy's {} list",
          g_.describe(index), producer, rel, g_.blocks[op.block].cls);
    }
    if (current_[x] == State::kPartial) need_replicated(x, index);
    return plan_.linear_kind[index] = row ? LinearKind::kRow : LinearKind::kColumn;
  }

  // A column-parallel linear (chosen by the automatic rule, on a whole input) whose output is
  // needed whole runs replicated instead: OPT-350m's project_in / project_out. The states of
  // everything after it may change, so planning starts over.
  void replicate_producer(int value, int /*consumer*/) override {
    const int producer = g_.values[value].producer;
    if (g_.ops[producer].kind != OpKind::kLinear || injection_rule(producer) != nullptr ||
        plan_.linear_kind[producer] != LinearKind::kColumn) {
      return;
    }
    replicated_.insert(producer);
    throw Replan{};
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
  void set_layout(int value, const Layout& layout, int op) override {
    auto [it, inserted] = layouts_.emplace(classes_.find(value), layout);
    if (!inserted && it->second != layout) {
      fail("{}: its inputs are split in two incompatible ways", g_.describe(op));
    }
  }

  const Layout* layout_of(int value) {
    auto it = layouts_.find(classes_.find(value));
    return it == layouts_.end() ? nullptr : &it->second;
  }

  const Layout& layout(int value) override {
    const Layout* l = layout_of(value);
    TPE_CHECK(l != nullptr, "a split value has no layout yet");
    return *l;
  }

  // Each op kind's layout rule in its phase (ops::OpTraits::layout_phase): layouts an op fixes,
  // then those derived from them; then every other split value is dealt out on a grain, and the
  // checks run.
  void run_layout_phase(int phase) {
    for (int i = 0; i < static_cast<int>(g_.ops.size()); ++i) {
      const ops::OpTraits& t = ops::traits(g_.ops[i].kind);
      if (t.layout != nullptr && t.layout_phase == phase) t.layout(*this, i);
    }
  }

  void assign_layouts() {
    run_layout_phase(0);
    run_layout_phase(1);
    for (size_t v = 0; v < g_.values.size(); ++v) {
      if (plan_.state[v] != State::kSplit) continue;
      const int value = static_cast<int>(v);
      if (layout_of(value) == nullptr) {
        layouts_.emplace(classes_.find(value), grain_layout(g_.values[v].width, world_));
      }
      plan_.shard[v] = *layout_of(value);
      for (int r = 0; r < world_; ++r) {
        if (index_count(plan_.shard[v][r]) > 0) continue;
        fail(
            "tp_size {} is more ranks than {} can be split over: rank {} would hold none of its "
            "{} features; use a smaller tp_size",
            world_, g_.describe(g_.values[v].producer), r, g_.values[v].width);
      }
    }
    run_layout_phase(2);
  }

  void compose_split(int index) override {
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

  const Graph& g_;
  int world_;
  const config::InjectionPolicy* injection_;
  UnionFind classes_;
  std::set<int> replicated_;  // linears that run replicated
  struct Replan {};
  std::map<int, Layout> layouts_;  // by class root
  std::vector<State> current_;
  Plan plan_;
};

}  // namespace

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
