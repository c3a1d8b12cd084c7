// FlashInfer's Hopper prefill (flashinfer/attention/hopper/prefill_sm90.cuh) instantiated for
// tpengine's arguments: included by the sm90_prefill_hd*.cu files only.
#pragma once

#include <flashinfer/attention/hopper/prefill_sm90.cuh>
#include <flashinfer/attention/hopper/variants.cuh>

#include "kernels/cuda/flashinfer/sm90_prefill.hpp"

namespace tpe::cuda::flashinfer_sm90 {

// The parameter block FlashInfer's kernel templates read (its single_prefill_sm90 binding's).
template <class T>
struct Params {
  using DTypeQ = T;
  using DTypeKV = T;
  using DTypeO = T;
  using IdType = int32_t;
  DTypeQ* q_ptr;
  DTypeKV* k_ptr;
  DTypeKV* v_ptr;
  DTypeO* o_ptr;
  float* lse_ptr;
  struct AdditionalParams {
    float logits_soft_cap;
    float sm_scale;
  } additional_params;
  int64_t q_stride_n, k_stride_n, v_stride_n, o_stride_n;
  int64_t q_stride_h, k_stride_h, v_stride_h, o_stride_h;
  int qo_len, kv_len, head_dim, num_qo_heads, num_kv_heads, group_size, window_left;
  bool causal;
};

template <int kHeadDim, class T>
cudaError_t run(const PrefillArgs& a, cudaStream_t stream) {
  Params<T> p{};
  p.q_ptr = static_cast<T*>(const_cast<void*>(a.q));
  p.k_ptr = static_cast<T*>(const_cast<void*>(a.k));
  p.v_ptr = static_cast<T*>(const_cast<void*>(a.v));
  p.o_ptr = static_cast<T*>(a.o);
  p.lse_ptr = nullptr;
  p.additional_params.sm_scale = a.sm_scale;
  p.q_stride_n = a.q_stride_n;
  p.q_stride_h = a.q_stride_h;
  p.k_stride_n = p.v_stride_n = a.kv_stride_n;
  p.k_stride_h = p.v_stride_h = a.kv_stride_h;
  p.o_stride_n = a.o_stride_n;
  p.o_stride_h = a.o_stride_h;
  p.qo_len = a.qo_len;
  p.kv_len = a.kv_len;
  p.head_dim = kHeadDim;
  p.num_qo_heads = a.num_qo_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.group_size = a.num_qo_heads / a.num_kv_heads;
  p.window_left = a.window_left;
  p.causal = true;
  using flashinfer::MaskMode;
  using flashinfer::StandardAttention;
  if (a.window_left >= 0) {
    return flashinfer::SinglePrefillWithKVCacheDispatched<kHeadDim, kHeadDim, MaskMode::kCausal,
                                                          true, StandardAttention>(p, stream);
  }
  return flashinfer::SinglePrefillWithKVCacheDispatched<kHeadDim, kHeadDim, MaskMode::kCausal,
                                                        false, StandardAttention>(p, stream);
}

template <int kHeadDim>
cudaError_t prefill(const PrefillArgs& a, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBF16:
      return run<kHeadDim, cutlass::bfloat16_t>(a, stream);
    case DType::kF16:
      return run<kHeadDim, cutlass::half_t>(a, stream);
    case DType::kF32:
      break;
  }
  return cudaErrorNotSupported;
}

}  // namespace tpe::cuda::flashinfer_sm90
