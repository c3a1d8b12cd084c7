// Where a rank's tensors live and how its ops run. The executor interprets the plan (which
// slices, which collectives, which KV-cache slot) and calls a Backend for the arithmetic and the
// collectives, so CPU and CUDA share every decision and differ only in kernels and memory.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <tpengine/policy.h>

#include "core/common/index_set.hpp"
#include "core/common/tensor.hpp"

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

// A rank-local matrix [rows, cols] in the backend's memory and element type.
struct Buffer {
  std::shared_ptr<void> storage;  // owns the memory
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
};

// One attention op's keys and values for every slot: [slots * max_len, width] each.
struct KvCache {
  Buffer k, v;
  int64_t max_len = 0;
};

// How a rank's local q heads map to its local kv heads: local q head h reads local kv head
// (first_q + h) / group - first_kv.
struct AttentionShape {
  int64_t head_dim = 0;
  int64_t first_q = 0;
  int64_t group = 1;
  int64_t first_kv = 0;
  float scale = 1;
  int64_t window = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // ---- memory ----
  // Called first on every thread that uses this backend (a CUDA device is per-thread state).
  virtual void bind_thread() {}
  virtual Buffer upload(std::vector<float> values, int64_t rows, int64_t cols) = 0;
  // Uninitialised memory: every op writes the whole of its output.
  virtual Buffer alloc(int64_t rows, int64_t cols) = 0;
  virtual int64_t element_bytes() const = 0;
  virtual Tensor to_host(const Buffer& x) = 0;  // fp32
  // The memory bandwidth the weights are read at, from a large copy (bytes read + written per
  // second, GB/s): the roofline a decode step is measured against.
  virtual double copy_bandwidth_gbs() = 0;

  // ---- one forward pass ----
  // Makes the batch's token ids, positions and slots available to the ops below.
  virtual void begin(const Batch& batch) = 0;
  // Rows of table (vocabulary rows vocab.begin..end) for the batch's ids; zeros elsewhere.
  virtual void embedding(const Buffer& table, Range vocab, Buffer& out) = 0;
  virtual void norm(tpe_norm_kind kind, const Buffer& x, const Buffer& w, const Buffer* b,
                    float eps, Buffer& y) = 0;
  virtual void linear(const Buffer& x, const Buffer& w, const Buffer* bias, Buffer& y) = 0;
  virtual void gather_columns(const Buffer& x, const IndexSet& cols, Buffer& out) = 0;
  // Rotates x (heads of head_dim) by each token's position; frequencies per sequence.
  virtual void rotary(Buffer& x, int64_t head_dim, const tpe_rope_desc& rope) = 0;
  // Appends the batch's keys and values at their positions, then attends causally.
  virtual void attention(const Buffer& q, const Buffer& k, const Buffer& v, KvCache& cache,
                         const AttentionShape& shape, Buffer& out) = 0;
  virtual void activation(tpe_activation act, Buffer& x) = 0;
  virtual void add(const Buffer& a, const Buffer& b, Buffer& out) = 0;
  virtual void mul(const Buffer& a, const Buffer& b, Buffer& out) = 0;
  virtual void copy(const Buffer& src, Buffer& dst) = 0;
  virtual void select_rows(const Buffer& x, const std::vector<int64_t>& rows, Buffer& out) = 0;

  // ---- collectives over the tensor-parallel group ----
  virtual void all_reduce(Buffer& x) = 0;
  // Rank 0's values to every rank (the sampled tokens).
  virtual void broadcast(std::vector<int64_t>& values) = 0;
  // Every rank's [rows, vocab[r].size()] slice of the logits into full [rows, vocab].
  virtual void gather_vocab(const Buffer& local, const std::vector<Range>& vocab, Buffer& full) = 0;
};

}  // namespace tpe::runtime
