// FlashInfer's FlashAttention-2 prefill (flashinfer/attention/prefill.cuh: mma.sync, sm_80 and
// newer) instantiated for tpengine's arguments, for the head dims its Hopper kernel lacks:
// included by the fa2_prefill_hd*.cu files only.
#pragma once

#include <flashinfer/attention/prefill.cuh>
#include <flashinfer/attention/variants.cuh>

#include "kernels/cuda/flashinfer/prefill.hpp"

namespace tpe::cuda::fi::fa2 {

// The parameter block FlashInfer's FA2 kernel templates read (its single_prefill binding's).
template <class T>
struct Params {
  using DTypeQ = T;
  using DTypeKV = T;
  using DTypeO = T;
  using IdType = int32_t;
  DTypeQ* q;
  DTypeKV* k;
  DTypeKV* v;
  DTypeO* o;
  float* lse;
  ::flashinfer::uint_fastdiv group_size;
  uint8_t* maybe_custom_mask;
  float* maybe_alibi_slopes;
  double logits_soft_cap;
  double sm_scale;
  double rope_rcp_scale;
  double rope_rcp_theta;
  uint32_t qo_len, kv_len, num_qo_heads, num_kv_heads;
  uint32_t q_stride_n, q_stride_h, k_stride_n, k_stride_h, v_stride_n, v_stride_h;
  uint32_t head_dim;
  int32_t window_left;
  bool partition_kv;
  __host__ __device__ __forceinline__ uint32_t get_qo_len(uint32_t) const { return qo_len; }
  __host__ __device__ __forceinline__ uint32_t get_kv_len(uint32_t) const { return kv_len; }
};

template <int kHeadDim, class T, bool kWindow>
cudaError_t run(const PrefillArgs& a, cudaStream_t stream) {
  Params<T> p{};
  p.q = static_cast<T*>(const_cast<void*>(a.q));
  p.k = static_cast<T*>(const_cast<void*>(a.k));
  p.v = static_cast<T*>(const_cast<void*>(a.v));
  p.o = static_cast<T*>(a.o);
  p.lse = nullptr;
  p.group_size = ::flashinfer::uint_fastdiv(static_cast<uint32_t>(a.num_qo_heads / a.num_kv_heads));
  p.sm_scale = a.sm_scale;
  p.rope_rcp_scale = 1.0;
  p.rope_rcp_theta = 1.0;
  p.qo_len = static_cast<uint32_t>(a.qo_len);
  p.kv_len = static_cast<uint32_t>(a.kv_len);
  p.num_qo_heads = static_cast<uint32_t>(a.num_qo_heads);
  p.num_kv_heads = static_cast<uint32_t>(a.num_kv_heads);
  p.q_stride_n = static_cast<uint32_t>(a.q_stride_n);
  p.q_stride_h = static_cast<uint32_t>(a.q_stride_h);
  p.k_stride_n = p.v_stride_n = static_cast<uint32_t>(a.kv_stride_n);
  p.k_stride_h = p.v_stride_h = static_cast<uint32_t>(a.kv_stride_h);
  p.head_dim = kHeadDim;
  p.window_left = a.window_left;
  p.partition_kv = false;
  using ::flashinfer::MaskMode;
  using ::flashinfer::PosEncodingMode;
  using Variant = ::flashinfer::DefaultAttention<false, kWindow, false, false>;
  // No scratch: FlashInfer then never splits the keys (its split would need a merge buffer).
  return ::flashinfer::SinglePrefillWithKVCacheDispatched<
      kHeadDim, kHeadDim, PosEncodingMode::kNone, false, MaskMode::kCausal, false, Variant>(
      p, nullptr, stream);
}

template <int kHeadDim, class T>
cudaError_t run(const PrefillArgs& a, cudaStream_t stream) {
  return a.window_left >= 0 ? run<kHeadDim, T, true>(a, stream)
                            : run<kHeadDim, T, false>(a, stream);
}

}  // namespace tpe::cuda::fi::fa2

namespace tpe::cuda::fi {

template <int kHeadDim>
cudaError_t fa2_prefill(const PrefillArgs& a, DType dtype, cudaStream_t stream) {
  if (a.o_stride_h != kHeadDim || a.o_stride_n != int64_t{a.num_qo_heads} * kHeadDim) {
    return cudaErrorInvalidValue;  // the kernel writes o densely
  }
  switch (dtype) {
    case DType::kBF16:
      return fa2::run<kHeadDim, __nv_bfloat16>(a, stream);
    case DType::kF16:
      return fa2::run<kHeadDim, __half>(a, stream);
    case DType::kF32:
      break;
  }
  return cudaErrorNotSupported;
}

}  // namespace tpe::cuda::fi
