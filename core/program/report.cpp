#include "core/program/report.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>

namespace tpe::program {

namespace {

std::string shape(const Weight& w) {
  return w.shape.size() > 1 ? fmt::format("[{}, {}]", w.local_rows(), w.local_cols())
                            : fmt::format("[{}]", w.local_rows());
}

std::string bytes(int64_t n) {
  if (n >= (int64_t{1} << 30)) return fmt::format("{:.2f} GiB", static_cast<double>(n) / (1 << 30));
  if (n >= (int64_t{1} << 20)) return fmt::format("{:.2f} MiB", static_cast<double>(n) / (1 << 20));
  if (n >= (int64_t{1} << 10)) return fmt::format("{:.1f} KiB", static_cast<double>(n) / (1 << 10));
  return fmt::format("{} B", n);
}

std::vector<Program> programs(const graph::Graph& g, const parallel::Plan& plan,
                              const Limits& limits, Passes passes) {
  std::vector<Program> out;
  for (int r = 0; r < plan.world; ++r) {
    out.push_back(lower(g, plan, r, passes));
    plan_memory(out.back(), limits);
  }
  return out;
}

RankMemory memory_of(const Program& p) {
  RankMemory m;
  for (const Weight& w : p.weights) m.weight_elements += w.elements();
  for (const Program::CacheLayer& c : p.cache_layers) {
    if (!c.cross) m.kv_elements_per_token += 2 * c.width;  // cross layers grow with stream 1
  }
  m.arena_bytes = p.arena_bytes;
  return m;
}

}  // namespace

std::vector<RankMemory> rank_memory(const graph::Graph& g, const parallel::Plan& plan,
                                    const Limits& limits, Passes passes) {
  std::vector<RankMemory> memory;
  for (const Program& p : programs(g, plan, limits, passes)) memory.push_back(memory_of(p));
  return memory;
}

std::string format_plan(const graph::Graph& g, const parallel::Plan& plan, const ReportOptions& o) {
  const std::vector<Program> ranks = programs(g, plan, o.limits, o.passes);
  std::string out;
  auto line = [&out](const std::string& s) { out += s + "\n"; };
  line(fmt::format("tensor parallelism over {} rank(s)", plan.world));
  line("");
  line("linears (per-rank weight shard shapes, rank 0 .. N-1):");
  // The matrix each op multiplies by, per rank (ranks may lower an op to different instructions:
  // a replicated addend is rank 0's alone).
  std::vector<std::map<int, int>> matrix(ranks.size());
  for (size_t r = 0; r < ranks.size(); ++r) {
    for (const Instr& instr : ranks[r].instrs) {
      if (instr.weight >= 0 && instr.code != Code::kNorm) matrix[r][instr.op] = instr.weight;
    }
  }
  for (const auto& [op_index, weight] : matrix[0]) {
    const graph::Op& op = g.ops[op_index];
    // Embedding and lm_head are no linears to the planner: they split by vocabulary rows.
    const parallel::LinearKind linear = plan.linear_kind[op_index];
    const char* kind = linear == parallel::LinearKind::kNone     ? "vocab"
                       : linear == parallel::LinearKind::kColumn ? "column"
                       : linear == parallel::LinearKind::kRow    ? "row"
                                                                 : "whole";
    std::vector<std::string> shapes;
    for (size_t r = 0; r < ranks.size(); ++r) {
      shapes.push_back(shape(ranks[r].weights[matrix[r].at(op_index)]));
    }
    line(fmt::format("  {:<48} {:<7} {}", op.name, kind, fmt::join(shapes, " ")));
  }
  line("");
  line("collectives per forward pass:");
  const std::vector<int> reduces = parallel::all_reduces_per_block(g, plan);
  for (size_t b = 0; b < g.blocks.size(); ++b) {
    line(fmt::format("  {:<32} {} all-reduce(s)", g.blocks[b].cls + " " + g.blocks[b].prefix,
                     reduces[b]));
  }
  if (reduces.back() > 0)
    line(fmt::format("  {:<32} {} all-reduce(s)", "(outside blocks)", reduces.back()));
  if (plan.world > 1)
    line(fmt::format("  {:<32} 1 all-gather (logits of the positions sampled)", "lm_head"));
  line("");
  const int64_t e = o.limits.element_bytes;
  line(fmt::format(
      "memory per rank ({} bytes per element; KV cache for batch {} x {} tokens; activations for "
      "passes of up to {} tokens and {} logit rows):",
      e, o.batch, o.seq_len, o.limits.tokens, o.limits.logit_rows));
  for (const Program& p : ranks) {
    const RankMemory m = memory_of(p);
    const int64_t kv = m.kv_elements_per_token * e * o.batch * o.seq_len;
    line(fmt::format("  rank {}: weights {}, KV cache {} ({} per token), activation arena {}",
                     p.rank, bytes(m.weight_elements * e), bytes(kv),
                     bytes(m.kv_elements_per_token * e), bytes(m.arena_bytes)));
  }
  return out;
}

}  // namespace tpe::program
