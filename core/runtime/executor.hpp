// One rank's share of the model: its weight slices, its KV cache, and the forward pass over the
// plan's steps with the CPU kernels. Owns: running a plan. May not touch: plugins, planning.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <vector>

#include <span>
#include <string>
#include "core/common/tensor.hpp"
#include "core/graph/graph.hpp"
#include "core/parallel/communicator.hpp"
#include "core/parallel/plan.hpp"

namespace tpe::runtime {

// The tokens of one forward pass, grouped by sequence.
struct Batch {
  struct Segment {
    int slot = 0;           // which sequence's KV cache
    int64_t start_pos = 0;  // position of its first token
    int64_t count = 0;
  };
  std::vector<int64_t> tokens;
  std::vector<Segment> segments;
  std::vector<int64_t> logit_rows;  // rows of `tokens` whose logits are wanted
};

class Executor {
 public:
  Executor(const graph::Graph& graph, const parallel::Plan& plan, int rank,
           parallel::ThreadGroup& group);

  // Reads one tensor's slice as fp32: (name, full shape, rows, cols), empty sets meaning all.
  using WeightReader = std::function<std::vector<float>(
      const std::string&, std::span<const int64_t>, const IndexSet&, const IndexSet&)>;

  // Reads this rank's slices; on_tensor is called after each tensor.
  void load(const WeightReader& reader, const std::function<void()>& on_tensor);
  // Drops the cache and makes room for `slots` sequences of up to max_len tokens.
  void reset_cache(int slots, int64_t max_len);
  // Returns the full logits [batch.logit_rows.size(), vocab] (gathered over ranks).
  Tensor forward(const Batch& batch);

  int64_t weight_bytes() const;

 private:
  struct Weights {
    std::shared_ptr<const std::vector<float>> w, b;
  };
  void run_op(int op, const Batch& batch, std::vector<Tensor>& values);
  void run_attention(int op, const Batch& batch, std::vector<Tensor>& values);
  std::shared_ptr<const std::vector<float>> read(const WeightReader& reader,
                                                 const std::string& name,
                                                 std::vector<int64_t> shape, const IndexSet& rows,
                                                 const IndexSet& cols);

  const graph::Graph& graph_;
  const parallel::Plan& plan_;
  int rank_;
  parallel::ThreadGroup& group_;
  std::vector<Weights> weights_;                                             // per op
  std::map<std::string, std::shared_ptr<const std::vector<float>>> loaded_;  // shared slices
  // Per attention op: per slot, keys and values [max_len, local kv width].
  std::vector<std::vector<std::vector<float>>> k_cache_, v_cache_;
  int64_t max_len_ = 0;
};

}  // namespace tpe::runtime
