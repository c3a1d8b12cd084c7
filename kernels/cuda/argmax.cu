// Choices over rows of logits, one block per row. Greedy decoding's: each thread's best from a
// strided scan, then a block reduction that keeps the lower index among equal values. Sampling's
// candidates: the k largest of a row by a radix select of the k-th largest value (8 bits a pass,
// four passes over the row), then a pass writing the values above it and enough equal to it.
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

constexpr int kTopThreads = 512;

// A float's bits made to order as an unsigned integer (larger float, larger key; -0 below +0).
__device__ __forceinline__ uint32_t order_key(float v) {
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

template <class T>
__global__ void top_rows_kernel(const T* x, int64_t cols, int k, float* values, int32_t* ids,
                                uint8_t* finite_out) {
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_want;
  __shared__ int s_above;
  __shared__ int s_equal;
  const T* row = x + int64_t{blockIdx.x} * cols;
  const unsigned lane = threadIdx.x % 32;
  // The k-th largest key is the want-th largest of the keys whose bits under `mask` are `prefix`;
  // each pass fixes its next 8 bits from a histogram of those keys.
  uint32_t prefix = 0;
  uint32_t mask = 0;
  int want = k;
  bool finite = true;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = static_cast<int>(threadIdx.x); b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    // Whole warps step together (the bound is the block's), so that lanes of one bin add once:
    // logits share their top bits, and a shared counter per element would serialise on them.
    for (int64_t base = 0; base < cols; base += blockDim.x) {
      const int64_t c = base + threadIdx.x;
      const float v = c < cols ? to_float(row[c]) : 0.0f;
      if (shift == 24 && c < cols) finite = finite && isfinite(v);
      const uint32_t key = order_key(v);
      const bool counted = c < cols && (key & mask) == prefix;
      const unsigned bin = (key >> shift) & 255u;
      const unsigned peers = __match_any_sync(0xffffffffu, counted ? bin : 256u);
      if (counted && lane == static_cast<unsigned>(__ffs(peers) - 1)) {
        atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0;
      int b = 255;
      for (; b > 0 && above + static_cast<int>(hist[b]) < want; --b) above += hist[b];
      s_prefix = prefix | (static_cast<uint32_t>(b) << shift);
      s_want = want - above;
      s_above = 0;
      s_equal = 0;
    }
    __syncthreads();
    prefix = s_prefix;
    want = s_want;
    mask |= 255u << shift;
  }
  // prefix is now the k-th largest key: k - want keys lie above it, and want of those equal to it
  // complete the k.
  float* out_values = values + int64_t{blockIdx.x} * k;
  int32_t* out_ids = ids + int64_t{blockIdx.x} * k;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = to_float(row[c]);
    const uint32_t key = order_key(v);
    int at = -1;
    if (key > prefix) {
      at = atomicAdd(&s_above, 1);
    } else if (key == prefix) {
      const int e = atomicAdd(&s_equal, 1);
      if (e < want) at = k - want + e;
    }
    if (at >= 0) {
      out_values[at] = v;
      out_ids[at] = static_cast<int32_t>(c);
    }
  }
  finite = __syncthreads_and(finite) != 0;
  if (threadIdx.x == 0) finite_out[blockIdx.x] = finite ? 1 : 0;
}

}  // namespace

void top_rows(const void* x, int64_t rows, int64_t cols, int64_t k, DType dtype, float* values,
              int32_t* ids, uint8_t* finite, cudaStream_t stream) {
  TPE_CUDA_REQUIRE(rows >= 0 && k > 0 && k <= cols, "top_rows", "k must be in [1, cols]");
  TPE_CUDA_REQUIRE(rows <= int64_t{0x7fffffff} && cols <= int64_t{0x7fffffff}, "top_rows",
                   "more rows or columns than the kernel indexes");
  if (rows == 0) return;
  detail::dispatch(dtype, "top_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    top_rows_kernel<<<static_cast<unsigned>(rows), kTopThreads, 0, stream>>>(
        static_cast<const T*>(x), cols, static_cast<int>(k), values, ids, finite);
    TPE_CUDA_CHECK_LAUNCH();
  });
}

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
