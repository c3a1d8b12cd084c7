// Rotate-half rotary embedding, in place: a row of blocks per token, one thread per (head, pair),
// so that a single decode token still spreads over many SMs. The fused path's variant also writes
// the rotated keys and the values into the KV cache (rotary + KV append in one kernel).
#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

using detail::from_float;
using detail::to_float;

constexpr int kThreads = 128;

// Rotates the pair (i, i + half) of `head` by position pos (inv_freq: the token's frequencies)
// into out, which may be head itself. transformers: freqs = position.float() * inv_freq, then cos
// and sin, all fp32. The precise sincosf: positions reach the thousands of radians, where
// __sinf/__cosf lose all accuracy.
template <class T>
__device__ __forceinline__ void rotate_pair(const T* head, T* out, int64_t i, int64_t half,
                                            float pos, const float* inv_freq) {
  float sin_v;
  float cos_v;
  sincosf(pos * inv_freq[i], &sin_v, &cos_v);
  const float x1 = to_float(head[i]);
  const float x2 = to_float(head[i + half]);
  out[i] = from_float<T>(x1 * cos_v - x2 * sin_v);
  out[i + half] = from_float<T>(x2 * cos_v + x1 * sin_v);
}

template <class T>
__global__ void rotary_kernel(T* x, int64_t ld, int64_t n_heads, int64_t head_dim, int64_t half,
                              const int32_t* positions, const int32_t* table,
                              const float* inv_freq) {
  const int64_t t = blockIdx.x;
  const int64_t p = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (p >= n_heads * half) return;
  const float* freq = inv_freq + (table != nullptr ? int64_t{table[t]} * half : 0);
  T* head = x + t * ld + (p / half) * head_dim;
  rotate_pair(head, head, p % half, half, static_cast<float>(positions[t]), freq);
}

// Per token, items in turn: q's rotary pairs (rotated in place); per key head, its rotary pairs
// (rotated into the cache) then its features past rotary_dim (copied in units of tail_unit
// elements: kV when that tail is aligned to it, else 1); the values, copied in units of kV
// elements. Indices within a token fit in int (the grid's y extent bounds them).
template <class T, int kV>
__global__ void rope_kv_append_kernel(T* q, int64_t q_ld, int n_q, const T* k, int64_t k_ld,
                                      const T* v, int64_t v_ld, int n_kv, int head_dim, int half,
                                      int tail_unit, const int32_t* slots, const int32_t* positions,
                                      const int32_t* table, const float* inv_freq, T* k_cache,
                                      T* v_cache, int64_t max_len) {
  const int64_t t = blockIdx.x;
  int item = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  const auto pos = static_cast<float>(positions[t]);
  const float* freq = inv_freq + (table != nullptr ? int64_t{table[t]} * half : 0);
  if (item < n_q * half) {
    T* head = q + t * q_ld + (item / half) * head_dim;
    rotate_pair(head, head, item % half, half, pos, freq);
    return;
  }
  item -= n_q * half;
  const int width = n_kv * head_dim;
  const int64_t row = (int64_t{slots[t]} * max_len + positions[t]) * width;
  // A head's pairs, then the units of its features past rotary_dim.
  const int per_head = half + (head_dim - 2 * half) / tail_unit;
  using P = detail::Pack<T, kV>;
  if (item < n_kv * per_head) {
    const int head = item / per_head * head_dim;
    const int j = item % per_head;
    if (j < half) {
      rotate_pair(k + t * k_ld + head, k_cache + row + head, j, half, pos, freq);
      return;
    }
    const int64_t at = head + 2 * half + int64_t{j - half} * tail_unit;
    if (kV > 1 && tail_unit == kV) {
      *reinterpret_cast<P*>(k_cache + row + at) = *reinterpret_cast<const P*>(k + t * k_ld + at);
    } else {
      k_cache[row + at] = k[t * k_ld + at];
    }
    return;
  }
  item -= n_kv * per_head;
  if (item < width / kV) {
    reinterpret_cast<P*>(v_cache + row)[item] = reinterpret_cast<const P*>(v + t * v_ld)[item];
  }
}

}  // namespace

void rope_kv_append(void* q, int64_t q_ld, int64_t n_q, const void* k, int64_t k_ld, const void* v,
                    int64_t v_ld, int64_t n_kv, int64_t tokens, int64_t head_dim,
                    int64_t rotary_dim, const int32_t* slots, const int32_t* positions,
                    const int32_t* table, const float* inv_freq, void* k_cache, void* v_cache,
                    int64_t max_len, DType dtype, cudaStream_t stream) {
  TPE_CUDA_REQUIRE(tokens >= 0 && n_q >= 0 && n_kv >= 0 && head_dim >= 0 && max_len >= 0,
                   "rope_kv_append", "negative size");
  TPE_CUDA_REQUIRE(q_ld >= n_q * head_dim && k_ld >= n_kv * head_dim && v_ld >= n_kv * head_dim,
                   "rope_kv_append", "row stride below the row's width");
  TPE_CUDA_REQUIRE(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
                   "rope_kv_append", "rotary_dim must be even and at most head_dim");
  const int64_t half = rotary_dim / 2, width = n_kv * head_dim;
  detail::dispatch(dtype, "rope_kv_append", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* tv = static_cast<const T*>(v);
    auto* tv_cache = static_cast<T*>(v_cache);
    detail::dispatch_width<T>(
        v_ld % detail::kVecWidth<T> == 0 ? width : 1,
        [&](auto unit) {
          constexpr int kV = decltype(unit)::value;
          // The key features past rotary_dim move kV at a time when they are aligned to it
          // (GPT-NeoX: 72 of 96; one element per thread made the fused kernel slower than the pair
          // it fuses).
          const bool tail_packs = kV > 1 && rotary_dim % kV == 0 && head_dim % kV == 0 &&
                                  k_ld % kV == 0 && detail::aligned_to(k, 16) &&
                                  detail::aligned_to(k_cache, 16);
          const int64_t tail_unit = tail_packs ? kV : 1;
          const int64_t items =
              n_q * half + n_kv * (half + (head_dim - 2 * half) / tail_unit) + width / kV;
          const int64_t blocks_per_token = (items + kThreads - 1) / kThreads;
          TPE_CUDA_REQUIRE(tokens <= int64_t{0x7fffffff} && blocks_per_token <= 65535,
                           "rope_kv_append", "more tokens or heads than one grid can hold");
          if (tokens == 0 || items == 0) return;
          const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(blocks_per_token));
          rope_kv_append_kernel<T, kV><<<grid, kThreads, 0, stream>>>(
              static_cast<T*>(q), q_ld, static_cast<int>(n_q), static_cast<const T*>(k), k_ld, tv,
              v_ld, static_cast<int>(n_kv), static_cast<int>(head_dim), static_cast<int>(half),
              static_cast<int>(tail_unit), slots, positions, table, inv_freq,
              static_cast<T*>(k_cache), tv_cache, max_len);
          TPE_CUDA_CHECK_LAUNCH();
        },
        tv, tv_cache);
  });
}

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
