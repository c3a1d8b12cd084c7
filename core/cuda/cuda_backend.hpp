// The CUDA backend: one GPU per rank, weights and activations in the model's dtype (fp32, fp16
// or bf16) on the device, kernels/cuda for every op and cuBLASLt for matrix products, NCCL for
// the all-reduce (or, inference.all_reduce = "auto", the one-shot kernel over peer memory for
// small messages) and the logits' all-gather.
#pragma once

#include <nccl.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/backend/backend.hpp"
#include "core/comm/communicator.hpp"
#include "core/comm/launch.hpp"
#include "kernels/cuda/ops.hpp"

namespace tpe::backend {

// "float32" | "float16" | "bfloat16".
cuda::DType cuda_dtype(const std::string& name);

// The NCCL communicators of this process's ranks: all of them when one process drives every GPU
// (rank r on GPU r), or its own when a launcher started one process per GPU.
class NcclGroup {
 public:
  explicit NcclGroup(int world);
  explicit NcclGroup(const comm::LaunchEnv& launch);
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  ncclComm_t comm(int rank) const { return comms_[rank]; }
  // Aborts rank's communicator (a peer failed or hung); it is not destroyed a second time.
  void abort(int rank);

 private:
  std::vector<ncclComm_t> comms_;
};

// Fails with a message naming both numbers when this process would need more GPUs than it sees.
void check_gpu_count(int needed);
// Fails, before anything is allocated, when GPU `device` has less free memory than `bytes` (the
// plan's weight bytes for the rank it serves).
void check_fits(int device, int64_t bytes);

class CudaBackend final : public Backend {
 public:
  // Rank `rank` on GPU `device`; nccl is null for a single rank. group is the host-side group of
  // this process's ranks: when one fails, a wait on this device gives up (and aborts the
  // communicator) instead of hanging. peer_all_reduce: connect() sets up the one-shot all-reduce
  // over peer memory for small messages where every rank can address every other's memory.
  CudaBackend(int rank, int device, cuda::DType dtype, NcclGroup* nccl, comm::ThreadGroup& group,
              bool peer_all_reduce = false);
  ~CudaBackend() override;

  void bind_thread() override;
  Buffer load(int64_t rows, int64_t cols, const RowFill& fill) override;
  void end_loading() override;
  Buffer alloc(int64_t rows, int64_t cols) override;
  int64_t element_bytes() const override;
  MemoryUse memory_use() override;
  Tensor to_host(const Buffer& x) override;
  double copy_bandwidth_gbs() override;
  std::string connect() override;

  void reserve_inputs(int64_t max_tokens, int64_t max_logit_rows,
                      std::vector<RopeSpec> ropes) override;
  void begin(const Batch& batch) override;
  void embedding(const Buffer& table, Range vocab, Ids ids, Buffer& out) override;
  void norm(tpe_norm_kind kind, const Buffer& x, const Buffer& w, const Buffer* b, float eps,
            Buffer& y) override;
  void linear(const Buffer& x, const Buffer& w, const Buffer* bias, Buffer& y) override;
  void gather_columns(const Buffer& x, const IndexSet& cols, Buffer& out) override;
  void rotary(Buffer& x, int rope) override;
  void attention(const Buffer& q, const Buffer& k, const Buffer& v, KvLayer& cache,
                 const AttentionShape& shape, Buffer& out) override;
  void rotary_attention(Buffer& q, Buffer& k, const Buffer& v, KvLayer& cache,
                        const AttentionShape& shape, int rope, Buffer& out) override;
  void add_norm(tpe_norm_kind kind, const Buffer& a, const Buffer& b, const Buffer& w,
                const Buffer* bias, float eps, Buffer& sum, Buffer& y) override;
  void activation(tpe_activation act, Buffer& x) override;
  void linear_activation(tpe_activation act, const Buffer& x, const Buffer& w, const Buffer* bias,
                         Buffer& y) override;
  void gated_activation(tpe_activation act, const Buffer& gate, const Buffer& up,
                        Buffer& out) override;
  void add(const Buffer& a, const Buffer& b, Buffer& out) override;
  void mul(const Buffer& a, const Buffer& b, Buffer& out) override;
  void copy(const Buffer& src, Buffer& dst) override;
  void select_rows(const Buffer& x, Buffer& out) override;
  std::vector<int64_t> argmax_rows(const Buffer& x) override;
  TopRows top_rows(const Buffer& x, int64_t k) override;
  void all_reduce(Buffer& x) override;
  void all_reduce_norm(tpe_norm_kind kind, Buffer& x, const Buffer& w, const Buffer* b, float eps,
                       Buffer& y) override;
  void broadcast(std::vector<int64_t>& values) override;
  void gather_vocab(const Buffer& local, const std::vector<Range>& vocab, Buffer& full) override;
  bool can_replay() const override { return true; }
  void record_begin() override;
  void record_end(int key) override;
  bool replay(int key) override;
  void forget_recordings() override;
  void profile_begin() override;
  void profile_mark() override;
  std::vector<double> profile_end() override;

 private:
  class Pool;
  class Stager;
  struct Peers;
  // The one-shot all-reduce's regions, mapped on every rank; the reason it cannot run if not.
  std::string connect_peers();
  // Every rank's `size` bytes, in rank order (an NCCL all-gather).
  std::vector<char> all_gather_bytes(const void* data, size_t size, int world);
  // Whether the one-shot all-reduce is connected and x fits its staging.
  bool one_shot_takes(const Buffer& x) const;
  // Waits for the stream; a NCCL error, another rank's failure or TPENGINE_NCCL_TIMEOUT seconds
  // (default 600) of no progress aborts the communicator and throws, naming the cause.
  void sync(const char* what);
  // Holds the stream (profiling) until release_queue(), which sync() calls first.
  void hold_queue();
  void release_queue();
  void record_mark();
  // Attention over the cache (the pass's keys and values already appended); n_kv local heads.
  void attend(const Buffer& q, int64_t n_kv, KvLayer& cache, const AttentionShape& shape,
              Buffer& out);
  // The split count for an attention call of these shapes, growing the scratch for its partial
  // results and its counters when not recording (recorded steps are forgotten: they refer to the
  // old scratch); while recording, what the scratch holds.
  int attention_splits(int64_t tokens, int64_t n_q, int64_t head_dim, int64_t max_len, int64_t n_kv,
                       int64_t group);
  // Whether prefill_scratch_ holds `bytes`, grown (at least doubled) when not recording.
  bool prefill_scratch_fits(size_t bytes);

  int rank_;
  int device_;
  cuda::DType dtype_;
  NcclGroup* nccl_;
  ncclComm_t comm_;
  comm::ThreadGroup& group_;
  bool peer_all_reduce_;
  std::unique_ptr<Peers> peers_;  // set by connect() when the one-shot all-reduce runs
  cudaStream_t stream_ = nullptr;
  std::shared_ptr<Pool> pool_;
  std::unique_ptr<Stager> stager_;  // while weights are loading
  std::unique_ptr<cuda::Gemm> gemm_;
  // The pass's inputs: one fixed device buffer, filled from a pinned mirror by one copy.
  std::vector<RopeSpec> ropes_;
  Buffer inputs_;
  void* inputs_host_ = nullptr;
  size_t inputs_bytes_ = 0;
  int64_t max_logit_rows_ = 0;
  const int32_t* ids_ = nullptr;
  const int32_t* token_types_ = nullptr;
  const int32_t* second_ids_ = nullptr;
  const int32_t* second_types_ = nullptr;
  const int32_t* slots_ = nullptr;
  const int32_t* positions_ = nullptr;
  const int32_t* segment_of_ = nullptr;
  const int32_t* logit_rows_ = nullptr;
  int64_t logit_row_count_ = 0;
  std::vector<const float*> rope_tables_;      // per rotary parameter set
  Buffer gather_scratch_;                      // the logits' all-gather
  Buffer attention_scratch_;                   // split-KV attention's partial results (fp32)
  Buffer attention_counters_;                  // and its blocks done (zeroed once, left zero)
  Buffer prefill_scratch_;                     // padded heads of tensor-core prefill, if any
  std::vector<Batch::Segment> segments_;       // the pass's, for prefill attention per sequence
  std::map<const IndexSet*, Buffer> columns_;  // gather lists, by the program's sets
  std::map<int, cudaGraphExec_t> recordings_;  // decode steps, by batch size
  // Profiling: the host's go flag (pinned, mapped), its device address, and the step events.
  volatile int* go_ = nullptr;
  const volatile int* go_device_ = nullptr;
  bool holding_ = false;
  int held_steps_ = 0;
  std::vector<cudaEvent_t> marks_;
  size_t marks_used_ = 0;
  std::vector<size_t> chunk_starts_;  // marks that open a held chunk, not ending a step
};

}  // namespace tpe::backend
