// The boundary to FlashInfer's Hopper prefill kernel: plain arguments on this side, so that only
// the sm90_prefill_hd*.cu files (built for sm_90a with FlashInfer's, CUTLASS's and CCCL's headers)
// include FlashInfer. kernels/cuda/prefill_attention.cpp is the caller.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/ops.hpp"

namespace tpe::cuda::flashinfer_sm90 {

// One sequence's queries against its keys, every pointer and stride in elements, heads of
// head_dim; q head h reads kv head h / (num_qo_heads / num_kv_heads); causal with the queries
// at the last qo_len of kv_len positions.
struct PrefillArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  int64_t q_stride_n = 0, q_stride_h = 0;
  int64_t kv_stride_n = 0, kv_stride_h = 0;
  int64_t o_stride_n = 0, o_stride_h = 0;
  int qo_len = 0;
  int kv_len = 0;
  int num_qo_heads = 0;
  int num_kv_heads = 0;
  int window_left = -1;  // keys j >= i - window_left for the query at i; -1: no window
  float sm_scale = 1;
};

// Instantiated for kHeadDim 64, 128 and 256 (one file each); dtype f16 or bf16.
template <int kHeadDim>
cudaError_t prefill(const PrefillArgs& args, DType dtype, cudaStream_t stream);

}  // namespace tpe::cuda::flashinfer_sm90
