// What a plan costs and how it reads to a person: weight, KV-cache and activation-arena bytes per
// rank, and the text `tpengine plan` prints. Computed from each rank's program alone, before any
// weight is read, so the figures are the ones the runtime allocates.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/graph/graph.hpp"
#include "core/parallel/plan.hpp"
#include "core/program/program.hpp"

namespace tpe::program {

struct RankMemory {
  int64_t weight_elements = 0;        // a tensor shared by two ops (tied embeddings) counts once
  int64_t kv_elements_per_token = 0;  // keys and values over all layers, per token of a sequence
  int64_t arena_bytes = 0;            // activations of one pass at the limits asked for
};

// passes: of the fused path's programs (kernel_inject), whose arena differs.
std::vector<RankMemory> rank_memory(const graph::Graph& graph, const parallel::Plan& plan,
                                    const Limits& limits = {}, Passes passes = {});

struct ReportOptions {
  int64_t batch = 1;
  int64_t seq_len = 2048;
  Limits limits;  // the largest pass; its element_bytes is the model dtype's
  Passes passes;  // the fused path's passes the programs get (none: plain)
};

std::string format_plan(const graph::Graph& graph, const parallel::Plan& plan,
                        const ReportOptions& options);

}  // namespace tpe::program
