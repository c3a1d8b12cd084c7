// FlashInfer's batch decode on tpengine's cache layout, for tpe_gpu_bench's rows beside our
// split-KV kernels, planned as FlashInfer plans for CUDA graphs, either way its decode wrapper
// runs: the CUDA-core decode kernel, or (use_tensor_cores) its FA2 paged prefill kernel with one
// query per sequence, each with the merge of its KV chunks. A bench, not a kernel the engine runs
// (docs/design.md says why).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

namespace tpe::bench {

class FlashInferDecode {
 public:
  // `seqs` sequences of one new token each, whose caches are [seqs][ctx][n_kv][128] in bf16
  // (tpengine's, cut by FlashInfer into pages of 16 positions) and full; planned here once.
  FlashInferDecode(int64_t seqs, int64_t ctx, int64_t n_q, int64_t n_kv, float scale,
                   bool tensor_cores, cudaStream_t stream);
  ~FlashInferDecode();
  FlashInferDecode(const FlashInferDecode&) = delete;
  FlashInferDecode& operator=(const FlashInferDecode&) = delete;

  // q [seqs][n_q][128] -> out [seqs][n_q][128], bf16; enqueues only (a graph may record it).
  void run(const void* q, const void* k_cache, const void* v_cache, void* out,
           cudaStream_t stream) const;
  // Which kernel, what the plan chose: its grid's rows and whether the KV is split.
  std::string plan() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tpe::bench
