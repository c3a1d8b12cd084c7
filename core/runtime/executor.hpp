// One rank at run time: its program (core/program), its weight slices, its KV cache and its
// activation arena, and the forward pass that runs the program's instructions on a Backend. A
// decode step the backend can record is recorded once per batch size and replayed (CUDA graphs).
// Owns: running a program. May not touch: plugins, planning, lowering decisions.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/backend/backend.hpp"
#include "core/common/tensor.hpp"
#include "core/graph/graph.hpp"
#include "core/program/program.hpp"
#include "core/runtime/kv_cache.hpp"

namespace tpe::runtime {

// One instruction of a profiled forward pass and its time (see Backend::profile_begin).
struct StepTime {
  std::string label;  // "linear self_attn.q_proj", "all_reduce", ...: the same in every layer
  double ms = 0;
};

class Executor {
 public:
  // `program` must have its memory planned; `replay` allows recording decode steps.
  Executor(const graph::Graph& graph, program::Program program,
           std::unique_ptr<backend::Backend> backend, bool replay);

  // Writes one tensor's slice as fp32 into out: (name, full shape, rows, cols, out), empty sets
  // meaning all. Called from several threads at once, for pieces of a slice.
  using WeightReader = std::function<void(const std::string&, std::span<const int64_t>,
                                          const IndexSet&, const IndexSet&, std::span<float>)>;

  // Reads this rank's slices and hands them to the backend (on_tensor is called after each),
  // then takes the activation arena and the per-pass input buffers.
  void load(const WeightReader& reader, const std::function<void()>& on_tensor);
  // Room for `slots` sequences of up to max_len tokens (and second_max_len tokens of a second
  // stream, for models with cross-attention), all empty; 0 slots frees the cache.
  void reset_cache(int slots, int64_t max_len, int64_t second_max_len = 0);

  // Runs one pass and returns the full logits [batch.logit_rows.size(), vocab] (gathered over
  // ranks) on the host; with `profile`, also the time of each instruction.
  Tensor forward(const backend::Batch& batch, std::vector<StepTime>* profile = nullptr);
  // Runs one pass and returns, per logit row, the index of its largest logit (the first among
  // equals; -1 for a row with a NaN or an infinity), chosen where the logits are: greedy
  // decoding without copying them to the host.
  std::vector<int64_t> forward_greedy(const backend::Batch& batch,
                                      std::vector<StepTime>* profile = nullptr);
  // Runs one pass and returns sampling's candidates: per logit row, its k largest logits and
  // their ids (Backend::top_rows), chosen where the logits are. logits() then still has the whole
  // rows, until the next pass.
  backend::TopRows forward_top(const backend::Batch& batch, int64_t k,
                               std::vector<StepTime>* profile = nullptr);
  // The last pass's logits [its logit rows, vocab] on the host.
  Tensor logits();

  const program::Program& program() const { return program_; }
  int64_t weight_bytes() const;
  int64_t kv_cache_bytes() const { return cache_.bytes(backend_->element_bytes()); }
  backend::Backend& backend() { return *backend_; }
  int rank() const { return program_.rank; }
  // Decode steps replayed from a recording so far.
  int64_t replays() const { return replays_; }
  // How the all-reduce runs (Backend::connect), once loaded; empty: the backend's default.
  const std::string& collectives() const { return collectives_; }
  // Rank 0's values to every rank.
  void broadcast(std::vector<int64_t>& values) { backend_->broadcast(values); }
  double copy_bandwidth_gbs();

 private:
  void pass(const backend::Batch& batch, std::vector<StepTime>* profile);
  void run(const backend::Batch& batch, bool profile);
  // Fails, naming the embedding, when ids of the pass are missing or out of its table's range.
  void check_ids(const backend::Batch& batch) const;
  void run_instr(const program::Instr& instr);

  const graph::Graph& graph_;
  program::Program program_;
  std::unique_ptr<backend::Backend> backend_;
  bool replay_;
  std::vector<std::shared_ptr<const backend::Buffer>> weights_;  // per program weight
  backend::Buffer arena_;
  std::vector<backend::Buffer> views_;  // per value: its place in the arena, this pass's rows
  KvCache cache_;
  // Decode batch sizes run once since the cache moved (recorded the next time), and recorded.
  std::map<int, bool> recorded_;
  uint64_t recorded_generation_ = 0;
  int64_t replays_ = 0;
  std::string collectives_;
};

}  // namespace tpe::runtime
