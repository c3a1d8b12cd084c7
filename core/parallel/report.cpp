#include "core/parallel/report.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <set>

namespace tpe::parallel {

using graph::Op;
using graph::OpKind;

namespace {

struct Slice {
  std::string tensor;
  int64_t rows = 0, cols = 0;  // cols = 0 for 1-D
};

// The weight slices rank r holds for op i, as the loader reads them.
std::vector<Slice> op_slices(const graph::Graph& g, const Plan& plan, size_t i, int r) {
  const Op& op = g.ops[i];
  switch (op.kind) {
    case OpKind::kEmbedding:
    case OpKind::kLmHead:
      return {{op.name, plan.vocab[r].size(), op.in_features}};
    case OpKind::kNorm: {
      const int64_t width = g.values[op.inputs[0]].width;
      std::vector<Slice> s = {{op.name + ".weight", width, 0}};
      if (op.has_bias) s.push_back({op.name + ".bias", width, 0});
      return s;
    }
    case OpKind::kLinear: {
      if (plan.linear_kind[i] == LinearKind::kColumn) {
        const int64_t rows = index_count(plan.shard[op.outputs[0]][r]);
        std::vector<Slice> s = {{op.name + ".weight", rows, op.in_features}};
        if (op.has_bias) s.push_back({op.name + ".bias", rows, 0});
        return s;
      }
      std::vector<Slice> s = {
          {op.name + ".weight", op.out_features, index_count(plan.shard[op.inputs[0]][r])}};
      if (op.has_bias && r == 0) s.push_back({op.name + ".bias", op.out_features, 0});
      return s;
    }
    default:
      return {};
  }
}

std::string shape(const Slice& s) {
  return s.cols > 0 ? fmt::format("[{}, {}]", s.rows, s.cols) : fmt::format("[{}]", s.rows);
}

std::string bytes(int64_t n) {
  if (n >= (int64_t{1} << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(n) / (1 << 30));
  if (n >= (int64_t{1} << 20)) return fmt::format("{:.2f} MiB", static_cast<double>(n) / (1 << 20));
  if (n >= (int64_t{1} << 10)) return fmt::format("{:.1f} KiB", static_cast<double>(n) / (1 << 10));
  return fmt::format("{} B", n);
}

}  // namespace

std::vector<RankMemory> rank_memory(const graph::Graph& g, const Plan& plan) {
  std::vector<RankMemory> memory(plan.world);
  for (int r = 0; r < plan.world; ++r) {
    std::set<std::string> seen;
    for (size_t i = 0; i < g.ops.size(); ++i) {
      for (const Slice& s : op_slices(g, plan, i, r)) {
        if (seen.insert(s.tensor).second) {
          memory[r].weight_elements += s.rows * (s.cols > 0 ? s.cols : 1);
        }
      }
      if (g.ops[i].kind == OpKind::kAttention) {
        memory[r].kv_elements_per_token += 2 * index_count(plan.shard[g.ops[i].inputs[1]][r]);
      }
    }
  }
  return memory;
}

std::string format_plan(const graph::Graph& g, const Plan& plan, const ReportOptions& o) {
  std::string out;
  auto line = [&out](const std::string& s) { out += s + "\n"; };
  line(fmt::format("tensor parallelism over {} rank(s)", plan.world));
  line("");
  line("linears (per-rank weight shard shapes, rank 0 .. N-1):");
  for (size_t i = 0; i < g.ops.size(); ++i) {
    const Op& op = g.ops[i];
    std::string kind;
    if (op.kind == OpKind::kLinear) {
      kind = plan.linear_kind[i] == LinearKind::kColumn ? "column" : "row";
    } else if (op.kind == OpKind::kEmbedding || op.kind == OpKind::kLmHead) {
      kind = "vocab";
    } else {
      continue;
    }
    std::vector<std::string> shapes;
    for (int r = 0; r < plan.world; ++r) shapes.push_back(shape(op_slices(g, plan, i, r)[0]));
    line(fmt::format("  {:<48} {:<7} {}", op.name, kind, fmt::join(shapes, " ")));
  }
  line("");
  line("collectives per forward pass:");
  const std::vector<int> reduces = all_reduces_per_block(g, plan);
  for (size_t b = 0; b < g.blocks.size(); ++b) {
    line(fmt::format("  {:<32} {} all-reduce(s)", g.blocks[b].cls + " " + g.blocks[b].prefix,
                     reduces[b]));
  }
  if (reduces.back() > 0)
    line(fmt::format("  {:<32} {} all-reduce(s)", "(outside blocks)", reduces.back()));
  if (plan.world > 1)
    line(fmt::format("  {:<32} 1 all-gather (logits of the positions sampled)", "lm_head"));
  line("");
  const std::vector<RankMemory> memory = rank_memory(g, plan);
  line(fmt::format("memory per rank ({} bytes per element; KV cache for batch {} x {} tokens):",
                   o.dtype_bytes, o.batch, o.seq_len));
  for (int r = 0; r < plan.world; ++r) {
    const int64_t kv = memory[r].kv_elements_per_token * o.dtype_bytes * o.batch * o.seq_len;
    line(fmt::format("  rank {}: weights {}, KV cache {} ({} per token)", r,
                     bytes(memory[r].weight_elements * o.dtype_bytes), bytes(kv),
                     bytes(memory[r].kv_elements_per_token * o.dtype_bytes)));
  }
  return out;
}

}  // namespace tpe::parallel
