// Automatic tensor parallelism: sharding propagation over the graph. Every value is Replicated,
// Split (each rank holds an index set of its features) or Partial (each rank holds a summand).
// Each op kind's rule (core/ops: linear(R) column-parallel, linear(S) row-parallel, attention by
// heads, add(P, P) and add(P, R) staying P, ...) runs in program order; the planner places an
// all-reduce exactly where a P value is first needed whole, unites the layouts that must agree,
// deals out the rest, composes fused weights' layouts, and applies an explicit injection policy,
// checked against the graph. Owns: deciding splits and collectives. May not touch: weights,
// devices.
#pragma once

#include <string>
#include <vector>

#include "core/common/index_set.hpp"
#include "core/config/run_config.hpp"
#include "core/graph/graph.hpp"
#include "core/ops/ops.hpp"

namespace tpe::parallel {

using ops::LinearKind;
using ops::State;

struct Step {
  enum class Kind { kOp, kAllReduce };
  Kind kind = Kind::kOp;
  int index = 0;   // op index, or the value all-reduced
  int block = -1;  // the block a collective is counted in: its value's producer's
  bool operator==(const Step&) const = default;
};

struct Plan {
  int world = 1;
  std::vector<Step> steps;                   // ops in order, collectives where needed
  std::vector<State> state;                  // per value, as produced
  std::vector<LinearKind> linear_kind;       // per op
  std::vector<std::vector<IndexSet>> shard;  // [value][rank] features held, split values only
  // [op][rank][part]: for a split op, the columns of the rank's local fused input that make
  // up each part.
  std::vector<std::vector<std::vector<IndexSet>>> split_parts;
  // Per add op: the input that is replicated while the other is partial (added by rank 0
  // only), or -1.
  std::vector<int> add_replicated_input;
  std::vector<Range> vocab;  // per rank: rows of the embedding and lm_head
  bool operator==(const Plan&) const = default;
};

// Plans `graph` over `world` ranks. With an injection policy (block class -> row-parallel
// linears relative to the block), those blocks follow it, and any inconsistency is a tpe::Error
// naming the layer.
Plan make_plan(const graph::Graph& graph, int world,
               const config::InjectionPolicy* injection_policy = nullptr);

// How many all-reduces the plan issues per forward pass, by block index; the last entry counts
// those outside any block.
std::vector<int> all_reduces_per_block(const graph::Graph& graph, const Plan& plan);

// The columns (global feature indices) rank holds of value v: its shard if split, else all.
IndexSet held_features(const graph::Graph& graph, const Plan& plan, int value, int rank);

}  // namespace tpe::parallel
