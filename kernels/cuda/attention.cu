// Attention over the KV cache on CUDA cores, split over the keys (flash-decoding): the kernel for
// decode steps and short chunks, and for whatever prefill_attention (tensor cores) does not take.
//
// A block serves one token, one local kv head (up to 4 of its q heads, held in registers;
// larger groups take several blocks) and one split of the token's keys. Its 128 threads form lane
// groups of `lanes` lanes (a power of two); a lane group owns one key at a time, each lane holding
// packs (16 bytes) of the key's head dimensions, so a key row is read with coalesced 16-byte loads
// and each K/V row once for the block's q heads. Lane groups take 4 consecutive keys per step,
// loading every K and V row of the step before using any (many loads in flight), score them
// (partial dot products summed over the lanes by shuffles), and keep their own online softmax state
// (running max, sum, and an fp32 output accumulator) in base-2 exponents. At the end the lane
// groups' states are merged: within a warp by shuffles, across warps through shared memory. With
// one split the block writes the normalised output; with several it writes each split's normalised
// output and log-sum-exp to the scratch, and a second kernel merges the splits. The split count
// depends only on the shapes (never on the lengths, which are read on the device), so a recorded
// decode step replays with any context.
#include <cmath>
#include <numeric>

#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

using detail::from_float;
using detail::Pack;
using detail::to_float;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;    // keys a lane group loads per step
constexpr int kMaxHeads = 4;  // q heads of one kv head a block holds in registers
constexpr int kMaxHeadDim = 512;
constexpr int kMaxSplits = 64;
constexpr int64_t kMinSplitKeys = 128;  // fewer keys per split (at full cache) is not worth it
constexpr float kLog2e = 1.4426950408889634f;

struct Args {
  int64_t q_ld;
  int64_t n_q;
  int64_t head_dim;
  int64_t max_len;
  int64_t kv_width;  // n_kv * head_dim: elements per cached position
  int64_t first_q;
  int64_t group;
  int64_t first_kv;
  float scale_log2;  // scale * log2(e): scores in base-2 exponents
  int64_t window;
  int splits;
  int head_blocks;  // blocks per kv head (its q heads in chunks of kHeads)
  int lanes;        // lanes per key: a power of two, at least packs / kPacks
  int packs;        // head_dim / kW
};

// Merges the softmax state (m2, l2, acc2) into (m, l, acc); kN accumulators.
template <int kN>
__device__ __forceinline__ void merge_state(float& m, float& l, float m2, float l2,
                                            float (&acc)[kN], const float (&acc2)[kN]) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  const float a = exp2f(m - mx);
  const float b = exp2f(m2 - mx);
  l = l * a + l2 * b;
#pragma unroll
  for (int i = 0; i < kN; ++i) acc[i] = acc[i] * a + acc2[i] * b;
  m = mx;
}

// kW: elements per pack; kPacks: packs per lane at most; kHeads: q heads per block at most.
template <class T, int kW, int kPacks, int kHeads>
__global__ void __launch_bounds__(kThreads)
    split_kernel(const T* q, const int32_t* slots, const int32_t* positions,
                 const T* __restrict__ k_cache, const T* __restrict__ v_cache, Args a, T* out,
                 float* partial) {
  using P = Pack<T, kW>;
  __shared__ float merge_acc[kWarps][kMaxHeadDim];
  __shared__ float merge_m[kWarps];
  __shared__ float merge_l[kWarps];

  const int64_t t = blockIdx.x;
  const int split = static_cast<int>(blockIdx.y);
  const int kv = static_cast<int>(blockIdx.z) / a.head_blocks;
  const int chunk = static_cast<int>(blockIdx.z) % a.head_blocks;
  // The local q heads that read local kv head kv, this block's chunk of them.
  const int64_t global_kv = kv + a.first_kv;
  const int64_t lo_all = max(int64_t{0}, global_kv * a.group - a.first_q);
  const int64_t hi_all = min(a.n_q, (global_kv + 1) * a.group - a.first_q);
  const int64_t h0 = lo_all + int64_t{chunk} * kHeads;
  if (h0 >= hi_all) return;
  const int nh = static_cast<int>(min(int64_t{kHeads}, hi_all - h0));

  const int64_t pos = positions[t];
  const int64_t first_key = a.window > 0 && pos >= a.window ? pos - a.window + 1 : 0;
  const int64_t n_keys = pos + 1 - first_key;
  // Splits start at multiples of the block's keys per step, so that steps stay aligned.
  const int64_t split_keys = ((n_keys + a.splits - 1) / a.splits + 31) / 32 * 32;
  const int64_t begin = first_key + split * split_keys;
  const int64_t end = min(pos + 1, begin + split_keys);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int li = lane % a.lanes;  // lane within the key's lane group
  const int groups_per_warp = 32 / a.lanes;
  const int groups = kWarps * groups_per_warp;

  const int64_t slot_base = int64_t{slots[t]} * a.max_len * a.kv_width + kv * a.head_dim;
  const T* k_head = k_cache + slot_base;
  const T* v_head = v_cache + slot_base;

  float qr[kHeads][kPacks][kW];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    const P* q_row = reinterpret_cast<const P*>(q + t * a.q_ld + (h0 + h) * a.head_dim);
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int p = li + i * a.lanes;
      P qp{};
      if (h < nh && p < a.packs) qp = q_row[p];
#pragma unroll
      for (int w = 0; w < kW; ++w) qr[h][i][w] = to_float(qp.v[w]) * a.scale_log2;
    }
  }
  float m[kHeads];
  float l[kHeads];
  float acc[kHeads][kPacks * kW];  // pack i's element w at i * kW + w
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < kPacks * kW; ++i) acc[h][i] = 0.0f;
  }

  // The loop is the same for every lane of a warp (the shuffles need them all): a warp's lane
  // groups take consecutive keys, those past the end masked.
  for (int64_t warp_j0 = begin + int64_t{warp} * groups_per_warp * kUnroll; warp_j0 < end;
       warp_j0 += int64_t{groups} * kUnroll) {
    const int64_t j0 = warp_j0 + int64_t{lane / a.lanes} * kUnroll;
    P kp[kUnroll][kPacks];
    P vp[kUnroll][kPacks];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool valid = j0 + u < end;
      const P* k_row = reinterpret_cast<const P*>(k_head + (j0 + u) * a.kv_width);
      const P* v_row = reinterpret_cast<const P*>(v_head + (j0 + u) * a.kv_width);
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
        const int p = li + i * a.lanes;
        kp[u][i] = P{};
        vp[u][i] = P{};
        if (valid && p < a.packs) {
          kp[u][i] = k_row[p];
          vp[u][i] = v_row[p];
        }
      }
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      if (h >= nh) break;
      float s[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kPacks; ++i) {
#pragma unroll
          for (int w = 0; w < kW; ++w) dot += qr[h][i][w] * to_float(kp[u][i].v[w]);
        }
        for (int offset = a.lanes / 2; offset > 0; offset /= 2)
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        s[u] = j0 + u < end ? dot : -INFINITY;
      }
      float mx = m[h];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u]);
      if (mx == -INFINITY) continue;           // no key of this lane group yet
      const float rescale = exp2f(m[h] - mx);  // 0 on the first keys (m = -inf)
      m[h] = mx;
      l[h] *= rescale;
#pragma unroll
      for (int i = 0; i < kPacks * kW; ++i) acc[h][i] *= rescale;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float p = exp2f(s[u] - mx);  // 0 for keys past the end
        l[h] += p;
#pragma unroll
        for (int i = 0; i < kPacks; ++i) {
#pragma unroll
          for (int w = 0; w < kW; ++w) acc[h][i * kW + w] += p * to_float(vp[u][i].v[w]);
        }
      }
    }
  }

  // Merge the lane groups of each warp (lanes li, li + lanes, ... hold the same dimensions).
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    for (int offset = a.lanes; offset < 32; offset *= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[h], offset);
      float acc2[kPacks * kW];
#pragma unroll
      for (int i = 0; i < kPacks * kW; ++i)
        acc2[i] = __shfl_xor_sync(0xffffffffu, acc[h][i], offset);
      merge_state(m[h], l[h], m2, l2, acc[h], acc2);
    }
  }

  // Then the warps, one head at a time through shared memory (unrolled: registers are indexed
  // by constants only; nh is the same for the whole block, so are the barriers).
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (h >= nh) break;
    if (lane < a.lanes) {
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
        const int p = li + i * a.lanes;
        if (p < a.packs) {
#pragma unroll
          for (int w = 0; w < kW; ++w) merge_acc[warp][p * kW + w] = acc[h][i * kW + w];
        }
      }
      if (lane == 0) {
        merge_m[warp] = m[h];
        merge_l[warp] = l[h];
      }
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, merge_m[w]);
    float total = 0.0f;
    float weight[kWarps];
    for (int w = 0; w < kWarps; ++w) {
      weight[w] = mx == -INFINITY ? 0.0f : exp2f(merge_m[w] - mx);
      total += merge_l[w] * weight[w];
    }
    const int64_t qh = h0 + h;
    for (int d = tid; d < a.head_dim; d += kThreads) {
      float o = 0.0f;
      for (int w = 0; w < kWarps; ++w) o += merge_acc[w][d] * weight[w];
      o = total > 0.0f ? o / total : 0.0f;
      if (a.splits == 1) {
        out[(t * a.n_q + qh) * a.head_dim + d] = from_float<T>(o);
      } else {
        partial[((t * a.n_q + qh) * a.splits + split) * (a.head_dim + 1) + d] = o;
      }
    }
    if (a.splits > 1 && tid == 0) {
      partial[((t * a.n_q + qh) * a.splits + split) * (a.head_dim + 1) + a.head_dim] =
          total > 0.0f ? mx + log2f(total) : -INFINITY;
    }
    __syncthreads();  // merge_* are reused by the next head
  }
}

// One block per (token, q head): the splits' outputs weighted by their share of the softmax.
template <class T>
__global__ void __launch_bounds__(kThreads)
    merge_splits_kernel(const float* partial, int64_t head_dim, int splits, T* out) {
  __shared__ float weight[kMaxSplits];
  const int64_t row = blockIdx.x;  // token * n_q + head
  const float* part = partial + row * splits * (head_dim + 1);
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part[s * (head_dim + 1) + head_dim]);
  if (threadIdx.x < splits) {
    const float lse = part[threadIdx.x * (head_dim + 1) + head_dim];
    weight[threadIdx.x] = lse == -INFINITY ? 0.0f : exp2f(lse - mx);
  }
  __syncthreads();
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += weight[s];
  for (int64_t d = threadIdx.x; d < head_dim; d += kThreads) {
    float o = 0.0f;
    for (int s = 0; s < splits; ++s) {
      if (weight[s] > 0.0f) o += part[s * (head_dim + 1) + d] * weight[s];
    }
    out[row * head_dim + d] = from_float<T>(o / total);
  }
}

int sm_count() {
  int device = 0;
  int count = 0;
  TPE_CUDA_CHECK(cudaGetDevice(&device));
  TPE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <class T, int kW, int kPacks, int kHeads>
void launch(dim3 grid, const T* q, const int32_t* slots, const int32_t* positions, const T* k,
            const T* v, const Args& a, T* out, float* partial, cudaStream_t stream) {
  split_kernel<T, kW, kPacks, kHeads>
      <<<grid, kThreads, 0, stream>>>(q, slots, positions, k, v, a, out, partial);
  TPE_CUDA_CHECK_LAUNCH();
}

}  // namespace

int64_t attention_scratch_floats(int64_t tokens, int64_t n_q, int64_t head_dim, int splits) {
  return splits > 1 ? tokens * n_q * splits * (head_dim + 1) : 0;
}

int attention_splits(int64_t tokens, int64_t n_q, int64_t head_dim, int64_t max_len, int64_t n_kv,
                     int64_t group, int64_t scratch_floats) {
  if (tokens <= 0 || n_q <= 0) return 1;
  static const int sms = sm_count();
  const int64_t heads_per_kv = std::min(group, n_q);
  const int64_t head_blocks = (heads_per_kv + kMaxHeads - 1) / kMaxHeads;
  const int64_t blocks = tokens * std::min(n_kv, n_q) * head_blocks;
  // Enough blocks for about four per multiprocessor, splits of at least kMinSplitKeys keys of a
  // full cache, and partial results that fit the scratch.
  int64_t splits = (4 * int64_t{sms} + blocks - 1) / blocks;
  splits = std::min<int64_t>(splits, (max_len + kMinSplitKeys - 1) / kMinSplitKeys);
  splits = std::min<int64_t>(splits, kMaxSplits);
  while (splits > 1 &&
         attention_scratch_floats(tokens, n_q, head_dim, static_cast<int>(splits)) > scratch_floats)
    --splits;
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

void attention(const void* q, int64_t tokens, int64_t n_q, int64_t head_dim, const int32_t* slots,
               const int32_t* positions, const void* k_cache, const void* v_cache, int64_t max_len,
               int64_t n_kv, int64_t first_q, int64_t group, int64_t first_kv, float scale,
               int64_t window, DType dtype, void* out, cudaStream_t stream, int64_t q_ld,
               int splits, float* scratch) {
  TPE_CUDA_REQUIRE(tokens >= 0 && n_q >= 0 && max_len >= 0 && window >= 0, "attention",
                   "negative size");
  if (q_ld == 0) q_ld = n_q * head_dim;
  TPE_CUDA_REQUIRE(q_ld >= n_q * head_dim, "attention", "q's row stride below its width");
  TPE_CUDA_REQUIRE(head_dim > 0 && head_dim <= kMaxHeadDim, "attention",
                   "head_dim must be in 1..512");
  TPE_CUDA_REQUIRE(group > 0 && n_kv > 0 && first_q >= 0, "attention",
                   "group and n_kv must be positive, first_q not negative");
  TPE_CUDA_REQUIRE(splits >= 1 && splits <= kMaxSplits && (splits == 1 || scratch != nullptr),
                   "attention", "splits must be in 1..64, and need scratch when more than 1");
  if (tokens == 0 || n_q == 0) return;
  // Every local q head must map to a local kv head.
  TPE_CUDA_REQUIRE(first_q / group - first_kv >= 0 && (first_q + n_q - 1) / group - first_kv < n_kv,
                   "attention", "a local q head maps outside the local kv heads");
  TPE_CUDA_REQUIRE(tokens <= int64_t{0x7fffffff}, "attention", "more tokens than one grid holds");
  const int64_t heads_per_kv = std::min(group, n_q);
  TPE_CUDA_REQUIRE(n_kv * heads_per_kv <= 65535, "attention", "too many heads for a grid");

  detail::dispatch(dtype, "attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* tq = static_cast<const T*>(q);
    const auto* tk = static_cast<const T*>(k_cache);
    const auto* tv = static_cast<const T*>(v_cache);
    auto* tout = static_cast<T*>(out);
    // Every row (of q, the caches, out) starts a multiple of head_dim elements in.
    detail::dispatch_width<T>(
        std::gcd(head_dim, q_ld),
        [&](auto width) {
          constexpr int kW = decltype(width)::value;
          const int packs = static_cast<int>(head_dim / kW);
          int lanes = 1;
          while (lanes < 32 && lanes < packs) lanes *= 2;
          const int per_lane = (packs + lanes - 1) / lanes;
          Args args{q_ld,    n_q,   head_dim, max_len,        n_kv * head_dim,
                    first_q, group, first_kv, scale * kLog2e, window,
                    splits,  1,     lanes,    packs};
          auto run = [&](auto packs_tag, auto heads_tag) {
            constexpr int kPacks = decltype(packs_tag)::value;
            constexpr int kHeads = decltype(heads_tag)::value;
            args.head_blocks = static_cast<int>((heads_per_kv + kHeads - 1) / kHeads);
            const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(splits),
                            static_cast<unsigned>(n_kv * args.head_blocks));
            launch<T, kW, kPacks, kHeads>(grid, tq, slots, positions, tk, tv, args, tout, scratch,
                                          stream);
          };
          // Wide rows per lane (heads over 256 elements, or rows without 16-byte alignment) take
          // one q head per block: a group's heads in registers would spill.
          using One = std::integral_constant<int, 1>;
          if constexpr (kW == 1) {
            run(std::integral_constant<int, 16>{}, One{});  // rare: correct, not fast
          } else if (per_lane > 1) {
            run(std::integral_constant<int, 4>{}, One{});
          } else if (heads_per_kv == 1) {
            run(One{}, One{});
          } else {
            run(One{}, std::integral_constant<int, kMaxHeads>{});
          }
        },
        tq, tk, tv, tout);
    if (splits > 1) {
      merge_splits_kernel<T><<<static_cast<unsigned>(tokens * n_q), kThreads, 0, stream>>>(
          scratch, head_dim, splits, tout);
      TPE_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace tpe::cuda
