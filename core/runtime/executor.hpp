// One rank's share of the model: its weight slices, its KV cache, and the forward pass over the
// plan's steps. The executor decides what each step means for this rank (which slice, which
// columns, which heads, who adds a replicated addend); its Backend does the arithmetic and the
// collectives. Owns: running a plan. May not touch: plugins, planning.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/common/tensor.hpp"
#include "core/graph/graph.hpp"
#include "core/parallel/plan.hpp"
#include "core/runtime/backend.hpp"

namespace tpe::runtime {

class Executor {
 public:
  Executor(const graph::Graph& graph, const parallel::Plan& plan, int rank,
           std::unique_ptr<Backend> backend);

  // Writes one tensor's slice as fp32 into out: (name, full shape, rows, cols, out), empty sets
  // meaning all. Called from several threads at once, for pieces of a slice.
  using WeightReader = std::function<void(const std::string&, std::span<const int64_t>,
                                          const IndexSet&, const IndexSet&, std::span<float>)>;

  // Reads this rank's slices and hands them to the backend; on_tensor is called after each.
  void load(const WeightReader& reader, const std::function<void()>& on_tensor);
  // Drops the cache and makes room for `slots` sequences of up to max_len tokens (none for 0).
  void reset_cache(int slots, int64_t max_len);

  // Returns the full logits [batch.logit_rows.size(), vocab] (gathered over ranks) on the host;
  // with `profile`, also the time of each step.
  Tensor forward(const Batch& batch, std::vector<StepTime>* profile = nullptr);

  int64_t weight_bytes() const;
  int64_t kv_cache_bytes() const;
  Backend& backend() { return *backend_; }
  int rank() const { return rank_; }
  // Rank 0's values to every rank.
  void broadcast(std::vector<int64_t>& values) { backend_->broadcast(values); }
  double copy_bandwidth_gbs();

 private:
  struct Weights {
    std::shared_ptr<const Buffer> w, b;
  };
  void load_all(const WeightReader& reader, const std::function<void()>& on_tensor);
  void run_op(int op, const Batch& batch, std::vector<Buffer>& values);
  std::string step_label(const parallel::Step& step) const;
  std::shared_ptr<const Buffer> read(const WeightReader& reader, const std::string& name,
                                     std::vector<int64_t> shape, const IndexSet& rows,
                                     const IndexSet& cols);

  const graph::Graph& graph_;
  const parallel::Plan& plan_;
  int rank_;
  std::unique_ptr<Backend> backend_;
  std::vector<Weights> weights_;                                 // per op
  std::map<std::string, std::shared_ptr<const Buffer>> loaded_;  // slices shared by ops
  std::vector<KvCache> caches_;                                  // per attention op
};

}  // namespace tpe::runtime
