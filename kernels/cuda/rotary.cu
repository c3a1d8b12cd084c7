// Rotate-half rotary embedding, in place: a row of blocks per token, one thread per (head, pair),
// so that a single decode token still spreads over many SMs.
#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

using detail::from_float;
using detail::to_float;

constexpr int kThreads = 128;

template <class T>
__global__ void rotary_kernel(T* x, int64_t ld, int64_t n_heads, int64_t head_dim, int64_t half,
                              const int32_t* positions, const int32_t* table,
                              const float* inv_freq) {
  const int64_t t = blockIdx.x;
  const int64_t p = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (p >= n_heads * half) return;
  // transformers: freqs = position.float() * inv_freq, then cos and sin, all fp32. The precise
  // sincosf: positions reach the thousands of radians, where __sinf/__cosf lose all accuracy.
  const auto pos = static_cast<float>(positions[t]);
  const float* freq = inv_freq + (table != nullptr ? int64_t{table[t]} * half : 0);
  const int64_t i = p % half;
  T* head = x + t * ld + (p / half) * head_dim;
  float sin_v;
  float cos_v;
  sincosf(pos * freq[i], &sin_v, &cos_v);
  const float x1 = to_float(head[i]);
  const float x2 = to_float(head[i + half]);
  head[i] = from_float<T>(x1 * cos_v - x2 * sin_v);
  head[i + half] = from_float<T>(x2 * cos_v + x1 * sin_v);
}

}  // namespace

void rotary(void* x, int64_t tokens, int64_t n_heads, int64_t head_dim, int64_t rotary_dim,
            const int32_t* positions, const int32_t* table, const float* inv_freq, DType dtype,
            cudaStream_t stream, int64_t ld) {
  if (ld == 0) ld = n_heads * head_dim;
  TPE_CUDA_REQUIRE(ld >= n_heads * head_dim, "rotary", "row stride below the row's width");
  TPE_CUDA_REQUIRE(tokens >= 0 && n_heads >= 0 && head_dim >= 0, "rotary", "negative size");
  TPE_CUDA_REQUIRE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary",
                   "rotary_dim must be even and at most head_dim");
  const int64_t blocks_per_token = (n_heads * (rotary_dim / 2) + kThreads - 1) / kThreads;
  TPE_CUDA_REQUIRE(tokens <= int64_t{0x7fffffff} && blocks_per_token <= 65535, "rotary",
                   "more tokens or heads than one grid can hold");
  if (tokens == 0 || n_heads == 0 || rotary_dim == 0) return;
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(blocks_per_token));
  detail::dispatch(dtype, "rotary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rotary_kernel<<<grid, kThreads, 0, stream>>>(static_cast<T*>(x), ld, n_heads, head_dim,
                                                 rotary_dim / 2, positions, table, inv_freq);
    TPE_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tpe::cuda
