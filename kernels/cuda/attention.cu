// Causal attention over the KV cache, one block per (token, local q head). Keys are taken in
// chunks of kThreads, one key per thread: each thread scores its key against q (held in shared
// memory, fp32) with 16-byte loads when the head allows, issued in batches so that a chunk has
// many loads in flight;
// the chunk's scores go through an online softmax in fp32 (running max and sum, the accumulator
// rescaled when the max grows); then the probabilities weight the value rows, each thread owning
// one pack of output dimensions for every `groups`-th key of the chunk, the groups summed at the
// end. Memory per block is fixed, whatever the context length.
#include <cmath>

#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

using detail::block_reduce;
using detail::from_float;
using detail::MaxOp;
using detail::Pack;
using detail::SumOp;
using detail::to_float;

constexpr int kThreads = 128;
constexpr int kMaxHeadDim = 512;
// Loads a thread issues before using any: a chunk's reads of K, then of V, take a couple of
// memory round trips rather than one per load.
constexpr int kBatch = 8;

struct AttentionArgs {
  int64_t q_ld;  // elements between q's rows
  int64_t n_q;
  int64_t head_dim;
  int64_t max_len;
  int64_t kv_width;  // n_kv * head_dim: elements per cached position
  int64_t first_q;
  int64_t group;
  int64_t first_kv;
  float scale;
  int64_t window;
};

// kW: elements per load (16 bytes' worth, or 1 when the head's rows are not 16-byte aligned).
template <class T, int kW>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(const T* q, const int32_t* slots, const int32_t* positions,
                     const T* __restrict__ k_cache, const T* __restrict__ v_cache, AttentionArgs a,
                     T* out) {
  using P = Pack<T, kW>;
  // Packs of an output row one thread may own: several only for wide heads read one element
  // at a time.
  constexpr int kPacks = (kMaxHeadDim / kW + kThreads - 1) / kThreads;
  __shared__ float q_s[kMaxHeadDim];
  __shared__ float p_s[kThreads];             // the chunk's probabilities
  __shared__ float partial_s[kThreads * kW];  // accumulators of the key groups, to combine
  __shared__ float scratch[32];

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t t = blockIdx.x / a.n_q;
  const int64_t h = blockIdx.x % a.n_q;
  const int64_t pos = positions[t];
  const int64_t kv_head = (a.first_q + h) / a.group - a.first_kv;
  const int64_t slot_base = int64_t{slots[t]} * a.max_len * a.kv_width + kv_head * a.head_dim;
  const T* k_head = k_cache + slot_base;  // key j at k_head + j * kv_width
  const T* v_head = v_cache + slot_base;
  const int64_t first_key = a.window > 0 && pos >= a.window ? pos - a.window + 1 : 0;

  const T* q_row = q + t * a.q_ld + h * a.head_dim;
  for (int64_t d = tid; d < a.head_dim; d += kThreads) q_s[d] = to_float(q_row[d]);

  // Value layout: a row is row_packs packs, spread over threads_per_row threads; the block holds
  // `groups` such rows of threads, each taking every groups-th key.
  const int row_packs = static_cast<int>(a.head_dim) / kW;
  const int threads_per_row = row_packs < kThreads ? row_packs : kThreads;
  const int groups = kThreads / threads_per_row;
  const int group = tid / threads_per_row;
  const int lane_in_row = tid % threads_per_row;
  const bool owns_dims = group < groups;
  float acc[kPacks][kW] = {};
  float running_max = -INFINITY;
  float running_sum = 0.0f;
  __syncthreads();

  for (int64_t chunk = first_key; chunk <= pos; chunk += kThreads) {
    const int n_keys = pos - chunk + 1 < kThreads ? static_cast<int>(pos - chunk + 1) : kThreads;
    float score = -INFINITY;
    if (tid < n_keys) {
      const P* k_row = reinterpret_cast<const P*>(k_head + (chunk + tid) * a.kv_width);
      float dot = 0.0f;
      for (int p0 = 0; p0 < row_packs; p0 += kBatch) {
        P kp[kBatch] = {};
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (p0 + b < row_packs) kp[b] = k_row[p0 + b];
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
#pragma unroll
          for (int k = 0; k < kW; ++k) {
            if (p0 + b < row_packs) dot += q_s[(p0 + b) * kW + k] * to_float(kp[b].v[k]);
          }
        }
      }
      score = dot * a.scale;
    }
    const float new_max = fmaxf(running_max, block_reduce(score, scratch, MaxOp{}, -INFINITY));
    const float p = tid < n_keys ? expf(score - new_max) : 0.0f;
    if (tid < n_keys) p_s[tid] = p;
    const float chunk_sum = block_reduce(p, scratch, SumOp{}, 0.0f);  // its barriers publish p_s
    const float rescale = expf(running_max - new_max);                // 0 on the first chunk
    running_sum = running_sum * rescale + chunk_sum;
    running_max = new_max;
    if (owns_dims) {
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
#pragma unroll
        for (int k = 0; k < kW; ++k) acc[i][k] *= rescale;
      }
      for (int j0 = group; j0 < n_keys; j0 += groups * kBatch) {
        P vp[kBatch][kPacks] = {};
        float pj[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int j = j0 + b * groups;
          pj[b] = j < n_keys ? p_s[j] : 0.0f;
          if (j >= n_keys) continue;
          const P* v_row = reinterpret_cast<const P*>(v_head + (chunk + j) * a.kv_width);
#pragma unroll
          for (int i = 0; i < kPacks; ++i) {
            const int pack = lane_in_row + i * kThreads;
            if (pack < row_packs) vp[b][i] = v_row[pack];
          }
        }
        // Keys past the chunk add 0 * 0.
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
#pragma unroll
          for (int i = 0; i < kPacks; ++i) {
#pragma unroll
            for (int k = 0; k < kW; ++k) acc[i][k] += pj[b] * to_float(vp[b][i].v[k]);
          }
        }
      }
    }
    __syncthreads();  // p_s is overwritten by the next chunk
  }

  auto* out_row = reinterpret_cast<P*>(out + (t * a.n_q + h) * a.head_dim);
  const float inv_sum = 1.0f / running_sum;
  if (groups == 1) {
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int pack = lane_in_row + i * kThreads;
      if (owns_dims && pack < row_packs) {
        P o;
#pragma unroll
        for (int k = 0; k < kW; ++k) o.v[k] = from_float<T>(acc[i][k] * inv_sum);
        out_row[pack] = o;
      }
    }
    return;
  }
  // Several groups: then a row fits in kThreads packs, so only acc[0] is in use.
  if (owns_dims) {
#pragma unroll
    for (int k = 0; k < kW; ++k) partial_s[tid * kW + k] = acc[0][k];
  }
  __syncthreads();
  if (group == 0) {
    P o;
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      float total = 0.0f;
      for (int g = 0; g < groups; ++g)
        total += partial_s[(g * threads_per_row + lane_in_row) * kW + k];
      o.v[k] = from_float<T>(total * inv_sum);
    }
    out_row[lane_in_row] = o;
  }
}

}  // namespace

void attention(const void* q, int64_t tokens, int64_t n_q, int64_t head_dim, const int32_t* slots,
               const int32_t* positions, const void* k_cache, const void* v_cache, int64_t max_len,
               int64_t n_kv, int64_t first_q, int64_t group, int64_t first_kv, float scale,
               int64_t window, DType dtype, void* out, cudaStream_t stream, int64_t q_ld) {
  TPE_CUDA_REQUIRE(tokens >= 0 && n_q >= 0 && max_len >= 0 && window >= 0, "attention",
                   "negative size");
  if (q_ld == 0) q_ld = n_q * head_dim;
  TPE_CUDA_REQUIRE(q_ld >= n_q * head_dim, "attention", "q's row stride below its width");
  TPE_CUDA_REQUIRE(head_dim > 0 && head_dim <= kMaxHeadDim, "attention",
                   "head_dim must be in 1..512");
  TPE_CUDA_REQUIRE(group > 0 && n_kv > 0 && first_q >= 0, "attention",
                   "group and n_kv must be positive, first_q not negative");
  if (tokens == 0 || n_q == 0) return;
  // Every local q head must map to a local kv head.
  TPE_CUDA_REQUIRE(first_q / group - first_kv >= 0 && (first_q + n_q - 1) / group - first_kv < n_kv,
                   "attention", "a local q head maps outside the local kv heads");
  TPE_CUDA_REQUIRE(tokens * n_q <= int64_t{0x7fffffff}, "attention",
                   "more (token, head) pairs than one grid can hold");
  const AttentionArgs args{q_ld,    n_q,   head_dim, max_len, n_kv * head_dim,
                           first_q, group, first_kv, scale,   window};
  detail::dispatch(dtype, "attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* tq = static_cast<const T*>(q);
    const auto* tk = static_cast<const T*>(k_cache);
    const auto* tv = static_cast<const T*>(v_cache);
    auto* tout = static_cast<T*>(out);
    // Every row (of q, the caches, out) starts a multiple of head_dim elements in.
    detail::dispatch_width<T>(
        head_dim,
        [&](auto width) {
          constexpr int kW = decltype(width)::value;
          attention_kernel<T, kW><<<static_cast<unsigned>(tokens * n_q), kThreads, 0, stream>>>(
              tq, slots, positions, tk, tv, args, tout);
          TPE_CUDA_CHECK_LAUNCH();
        },
        tq, tk, tv, tout);
  });
}

}  // namespace tpe::cuda
