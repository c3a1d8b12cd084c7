// What a plan costs and how it reads to a person: weight and KV-cache bytes per rank, and the
// text `tpengine plan` prints. Computed from the graph and plan alone, before any weight is read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/graph/graph.hpp"
#include "core/parallel/plan.hpp"

namespace tpe::parallel {

struct RankMemory {
  int64_t weight_elements = 0;        // a tensor shared by two ops (tied embeddings) counts once
  int64_t kv_elements_per_token = 0;  // keys and values over all layers, per token of a sequence
};

std::vector<RankMemory> rank_memory(const graph::Graph& graph, const Plan& plan);

struct ReportOptions {
  int64_t dtype_bytes = 4;
  int64_t batch = 1;
  int64_t seq_len = 2048;
};

std::string format_plan(const graph::Graph& graph, const Plan& plan, const ReportOptions& options);

}  // namespace tpe::parallel
