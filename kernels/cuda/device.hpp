// Device-side helpers shared by the kernel sources (.cu only): dtype conversion, dispatch from
// the runtime DType to a template parameter, activations, vector packs and block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/check.hpp"
#include "kernels/cuda/ops.hpp"

namespace tpe::cuda::detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even: the one rounding every kernel does, on the way out.
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The activations follow the operation order of kernels/cpu (torch's fp32 kernels); the precise
// expf/erff/tanhf, not the fast intrinsics. The constants are kernels/cpu's, rounded to float.
__device__ __forceinline__ float activate(tpe_activation act, float v) {
  constexpr float kInvSqrt2 = 0.70710678118654752440f;     // 1 / sqrt(2)
  constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  switch (act) {
    case TPE_ACT_SILU:
      return v / (1.0f + expf(-v));
    case TPE_ACT_GELU:
      return 0.5f * v * (1.0f + erff(v * kInvSqrt2));
    case TPE_ACT_GELU_TANH:
      return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + kKappa * (v * v * v))));
    case TPE_ACT_RELU:
      return v < 0.0f ? 0.0f : v;  // NaN passes through, as in torch
  }
  return v;
}

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the element type of `dtype`; one instantiation per dtype.
template <class F>
void dispatch(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(TypeTag<float>{});
    case DType::kF16:
      return f(TypeTag<__half>{});
    case DType::kBF16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  throw_bad_argument(op, "unknown dtype");
}

// kW consecutive elements moved as one load or store (16 bytes for the vector paths).
template <class T, int kW>
struct alignas(sizeof(T) * kW) Pack {
  T v[kW];
};

template <class T>
inline constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

inline bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Calls f(std::integral_constant<int, W>{}) with W = kVecWidth<T> when every pointer is 16-byte
// aligned and `multiple_of` is a multiple of it, else W = 1 (the scalar path).
template <class T, class F, class... Ptrs>
void dispatch_width(int64_t multiple_of, F&& f, const Ptrs*... ptrs) {
  constexpr int kW = kVecWidth<T>;
  const bool vec = multiple_of % kW == 0 && (... && (ptrs == nullptr || aligned_to(ptrs, 16)));
  if (vec) return f(std::integral_constant<int, kW>{});
  return f(std::integral_constant<int, 1>{});
}

// Grid for a grid-stride loop over `work` items: enough blocks to cover it, capped so that huge
// tensors loop instead of launching millions of blocks.
inline unsigned grid_for(int64_t work, int threads) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  return static_cast<unsigned>(std::clamp<int64_t>((work + threads - 1) / threads, 1, kMaxBlocks));
}

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduces v over the block (blockDim.x a multiple of 32); every thread gets the result.
// scratch: 32 floats of shared memory, reusable by the next call thanks to the leading barrier.
template <class Op>
__device__ float block_reduce(float v, float* scratch, Op op, float identity) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned warp = threadIdx.x / 32;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : identity;
  return warp_reduce(v, op);
}

}  // namespace tpe::cuda::detail
