// Greedy decoding's choice over a row of logits: one block per row, each thread's best from a
// strided scan, then a block reduction that keeps the lower index among equal values.
#include <cmath>

#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

using detail::to_float;

constexpr int kThreads = 1024;

struct Best {
  float value;
  int64_t index;
};

// b beats a: larger, or equal and earlier (an index of -1 has seen nothing).
__device__ __forceinline__ bool better(const Best& b, const Best& a) {
  if (b.index < 0) return false;
  if (a.index < 0) return true;
  return b.value > a.value || (b.value == a.value && b.index < a.index);
}

__device__ __forceinline__ Best warp_best(Best v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Best other{__shfl_xor_sync(0xffffffffu, v.value, offset),
                     __shfl_xor_sync(0xffffffffu, v.index, offset)};
    if (better(other, v)) v = other;
  }
  return v;
}

template <class T>
__global__ void argmax_rows_kernel(const T* x, int64_t cols, int64_t* out) {
  __shared__ Best scratch[32];
  const T* row = x + int64_t{blockIdx.x} * cols;
  Best best{0.0f, -1};
  bool finite = true;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_float(row[c]);
    finite = finite && isfinite(v);
    if (best.index < 0 || v > best.value) best = {v, c};
  }
  finite = __syncthreads_and(finite) != 0;
  best = warp_best(best);
  const unsigned lane = threadIdx.x % 32;
  const unsigned warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = best;
  __syncthreads();
  if (warp != 0) return;
  best = lane < blockDim.x / 32 ? scratch[lane] : Best{0.0f, -1};
  best = warp_best(best);
  if (lane == 0) out[blockIdx.x] = finite ? best.index : -1;
}

}  // namespace

void argmax_rows(const void* x, int64_t rows, int64_t cols, DType dtype, int64_t* out,
                 cudaStream_t stream) {
  TPE_CUDA_REQUIRE(rows >= 0 && cols > 0, "argmax_rows", "no columns, or negative rows");
  TPE_CUDA_REQUIRE(rows <= int64_t{0x7fffffff}, "argmax_rows", "more rows than one grid can hold");
  if (rows == 0) return;
  detail::dispatch(dtype, "argmax_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    argmax_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), cols, out);
    TPE_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tpe::cuda
