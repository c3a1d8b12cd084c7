// Attention over the KV cache split over the keys (flash-decoding): the kernels for decode steps
// and short chunks, and for whatever prefill_attention (FlashInfer's tensor-core prefill) does not
// take. Two kernels share the grid (token, split of the keys, kv head with a chunk of its q
// heads), the partial results' layout and the merge of the splits:
// - mma_kernel, on tensor cores: 16-bit q heads that share a kv head (GQA, MQA), head dims 64, 96
//   and 128 (described where it is defined);
// - split_kernel, on CUDA cores: everything else (MHA, fp32, other head dims, unaligned rows).
//
// split_kernel: a block serves one token, one local kv head (up to 4 of its q heads, held in
// registers; larger groups take several blocks) and one split of the token's keys. Its 128
// threads form lane groups of `lanes` lanes (a power of two); a lane group owns one key at a time,
// each lane holding packs (16 bytes) of the key's head dimensions, so a key row is read with
// coalesced 16-byte loads and each K/V row once for the block's q heads. Lane groups take 4
// consecutive keys per step, loading every K and V row of the step before using any (many loads in
// flight), score them (partial dot products summed over the lanes by shuffles), and keep their own
// online softmax state (running max, sum, and an fp32 output accumulator) in base-2 exponents. At
// the end the lane groups' states are merged: within a warp by shuffles, across warps through
// shared memory.
//
// With one split a block writes the normalised output; with several it writes each split's
// normalised output and log-sum-exp to the scratch and counts itself done; the last block of a
// (token, heads) group to finish merges the group's splits (merge_if_last) and resets the count,
// so one kernel does it all and a recorded call replays. The split count depends only on the
// shapes (never on the lengths, which are read on the device), so a recorded decode step replays
// with any context.
#include <cmath>
#include <numeric>

#include "kernels/alibi.hpp"
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
// Fewer keys per split (at a full cache) are not worth a block: a block takes 64 keys a step.
// One H100, GQA 4 (tensor cores) batch 1: at 512 keys 8 splits of 64 keys 8.9 us against 4 of
// 128's 9.7; at 4096, 32 splits of 128 keys 12.6 us against 16's 14.5 (docs/benchmarks.md).
constexpr int64_t kMinSplitKeys = 64;
// split_kernel's splits start at multiples of this many keys (its blocks' steps stay aligned).
constexpr int64_t kSplitRound = 32;
constexpr float kLog2e = 1.4426950408889634f;

struct Args {
  int64_t tokens;
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
  int head_blocks;  // blocks per kv head (its q heads in chunks of kHeads or kMmaRows)
  int lanes;        // split_kernel: lanes per key, a power of two, at least packs / kPacks
  int packs;        // split_kernel: head_dim / kW
  Alibi alibi;      // its scale times log2(e), like the scores
};

// Local q head h's ALiBi slope in base-2 exponents per key of distance (0 without ALiBi).
__device__ __forceinline__ float slope_log2(const Args& a, int64_t h) {
  return a.alibi.max_bias > 0
             ? alibi_slope(a.first_q + h, a.alibi.n_heads, a.alibi.max_bias) * a.alibi.scale
             : 0.0f;
}

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

// What a block of either kernel serves, from its grid position: token t, local kv head kv, its
// q heads [h0, h0 + nh) (the block's chunk of `rows` of the heads that read kv; nh 0 when the
// chunk is past them) and keys [begin, end) (the split's share of the token's window, splits
// starting at multiples of `round` keys so that the block's steps stay aligned).
struct BlockWork {
  int64_t t;
  int split;
  int kv;
  int64_t h0;
  int nh;
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ BlockWork block_work(const Args& a, const int32_t* positions, int rows,
                                                int64_t round) {
  BlockWork w{};
  w.t = blockIdx.x;
  w.split = static_cast<int>(blockIdx.y);
  w.kv = static_cast<int>(blockIdx.z) / a.head_blocks;
  const int chunk = static_cast<int>(blockIdx.z) % a.head_blocks;
  const int64_t global_kv = w.kv + a.first_kv;
  const int64_t lo_all = max(int64_t{0}, global_kv * a.group - a.first_q);
  const int64_t hi_all = min(a.n_q, (global_kv + 1) * a.group - a.first_q);
  w.h0 = lo_all + int64_t{chunk} * rows;
  if (w.h0 >= hi_all) return w;  // nh = 0
  w.nh = static_cast<int>(min(int64_t{rows}, hi_all - w.h0));
  const int64_t pos = positions[w.t];
  const int64_t first_key = a.window > 0 && pos >= a.window ? pos - a.window + 1 : 0;
  const int64_t n_keys = pos + 1 - first_key;
  const int64_t split_keys = ((n_keys + a.splits - 1) / a.splits + round - 1) / round * round;
  w.begin = first_key + w.split * split_keys;
  w.end = min(pos + 1, w.begin + split_keys);
  return w;
}

// The last block's output: each thread kV dimensions of a row at a time, the splits' partial
// results weighted and summed, sixteen loads in flight (they come from L2, where the other blocks
// wrote; one H100, GQA 4 at batch 1, 4 splits of 256 keys: 6.9 us, against 9.5 with one load
// after another).
template <int kV, class T, int kRows>
__device__ __forceinline__ void merge_out(const Args& a, const float* partial,
                                          const float (&weight)[kRows][kMaxSplits], int64_t t,
                                          int64_t h0, int nh, T* out) {
  const int64_t per_row = a.head_dim / kV;
  for (int64_t i = threadIdx.x; i < nh * per_row; i += kThreads) {
    const int row = static_cast<int>(i / per_row);
    const int64_t d = i % per_row * kV;
    const int64_t out_row = t * a.n_q + h0 + row;
    const float* o = partial + out_row * a.splits * a.head_dim + d;
    float sum[kV] = {};
#pragma unroll 16
    for (int s = 0; s < a.splits; ++s) {
      const float w = weight[row][s];
      if constexpr (kV == 4) {
        const float4 x = __ldcg(reinterpret_cast<const float4*>(o + s * a.head_dim));
        sum[0] += x.x * w;
        sum[1] += x.y * w;
        sum[2] += x.z * w;
        sum[3] += x.w * w;
      } else {
        sum[0] += __ldcg(o + s * a.head_dim) * w;
      }
    }
#pragma unroll
    for (int e = 0; e < kV; ++e) out[out_row * a.head_dim + d + e] = from_float<T>(sum[e]);
  }
}

// Called by every thread of a block once its split's partial results (rows h0 .. h0 + nh of
// token t) are written: the block that completes its (token t, blockIdx.z) group, counted in
// `counters`, weights the group's splits by their share of the softmax into out and sets the
// count back to zero. Merging in the last block instead of a second kernel saves the launch and
// the wait for it: one H100, a step's attention at batch 1 over 4096 keys spent 4.4 us (MHA) and
// 5.8 us (GQA 4) of 31.6 and 15.9 in the merge kernel (docs/benchmarks.md).
template <class T, int kRows>
__device__ __forceinline__ void merge_if_last(const Args& a, const float* partial,
                                              uint32_t* counters, int64_t t, int64_t h0, int nh,
                                              T* out) {
  __shared__ float weight[kRows][kMaxSplits];
  __shared__ bool last;
  const int tid = static_cast<int>(threadIdx.x);
  __threadfence();  // this thread's partial results, before the count says they are there
  __syncthreads();
  if (tid == 0) {
    uint32_t* count = counters + t * gridDim.z + blockIdx.z;
    last = atomicAdd(count, 1u) == gridDim.y - 1;
    if (last) *count = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Each row's weights, a warp per row: the splits' log-sum-exps (two per lane) against their
  // maximum, normalised. Every token sees itself, so some split has keys and the maximum is
  // finite; an empty split's -inf weighs 0. The loads go to L2 (__ldcg), where the other blocks
  // wrote.
  const int lane = tid % 32;
  const float* lse = partial + a.tokens * a.n_q * a.splits * a.head_dim;
  for (int row = tid / 32; row < nh; row += kWarps) {
    const float* row_lse = lse + (t * a.n_q + h0 + row) * a.splits;
    const float x0 = lane < a.splits ? __ldcg(row_lse + lane) : -INFINITY;
    const float x1 = lane + 32 < a.splits ? __ldcg(row_lse + lane + 32) : -INFINITY;
    const float mx = detail::warp_reduce(fmaxf(x0, x1), detail::MaxOp{});
    const float w0 = exp2f(x0 - mx);
    const float w1 = exp2f(x1 - mx);
    const float inv_total = 1.0f / detail::warp_reduce(w0 + w1, detail::SumOp{});
    if (lane < a.splits) weight[row][lane] = w0 * inv_total;
    if (lane + 32 < a.splits) weight[row][lane + 32] = w1 * inv_total;
  }
  __syncthreads();
  if (a.head_dim % 4 == 0 && reinterpret_cast<uintptr_t>(partial) % 16 == 0) {
    merge_out<4, T, kRows>(a, partial, weight, t, h0, nh, out);
  } else {
    merge_out<1, T, kRows>(a, partial, weight, t, h0, nh, out);
  }
}

// kW: elements per pack; kPacks: packs per lane at most; kHeads: q heads per block at most.
template <class T, int kW, int kPacks, int kHeads>
__global__ void __launch_bounds__(kThreads)
    split_kernel(const T* q, const int32_t* slots, const int32_t* positions,
                 const T* __restrict__ k_cache, const T* __restrict__ v_cache, Args a, T* out,
                 float* partial, uint32_t* counters) {
  using P = Pack<T, kW>;
  __shared__ float merge_acc[kWarps][kMaxHeadDim];
  __shared__ float merge_m[kWarps];
  __shared__ float merge_l[kWarps];

  const BlockWork w = block_work(a, positions, kHeads, kSplitRound);
  if (w.nh == 0) return;
  const auto [t, split, kv, h0, nh, begin, end] = w;

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
  float slope[kHeads];
  const int64_t pos = positions[t];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
    slope[h] = h < nh ? slope_log2(a, h0 + h) : 0.0f;
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
        s[u] = j0 + u < end ? dot + slope[h] * static_cast<float>(j0 + u - pos) : -INFINITY;
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
        partial[((t * a.n_q + qh) * a.splits + split) * a.head_dim + d] = o;
      }
    }
    if (a.splits > 1 && tid == 0) {
      partial[a.tokens * a.n_q * a.splits * a.head_dim + (t * a.n_q + qh) * a.splits + split] =
          total > 0.0f ? mx + log2f(total) : -INFINITY;
    }
    __syncthreads();  // merge_* are reused by the next head
  }
  if (a.splits > 1) merge_if_last<T, kHeads>(a, partial, counters, t, h0, nh, out);
}

// ---- On tensor cores (bf16 and f16; head dims 64, 96 and 128) --------------------------------
//
// A block serves what split_kernel's does, but all of a kv head's q heads at once (up to 16, the
// rows of an m16n8k16 MMA; rows past the group are zeros) and its four warps take 16 keys at a
// time each. K and V go from memory straight into registers: each lane loads 16-byte chunks of two
// key rows (keys r and r + 8 of the tile, r = lane / 4; chunk at 32 j + 8 c, c = lane % 4), so a
// warp reads 8 rows in 64-byte runs per load. The MMA's reduction index may be any permutation of
// the head dimensions as long as Q uses the same one, so such a chunk is directly the B operand of
// S = Q K^T for two k-steps. For O = P V the keys are the reduction index: each 32-bit word of a V
// chunk is one lane's part of an 8 x 8 matrix (keys x dimensions) that movmatrix transposes into
// the B operand; the output dimensions come out permuted so that a lane's accumulators are again
// the 8 contiguous dimensions of its chunk. S's accumulators are P's A operand (as in
// FlashAttention-2). Warps keep their own softmax state and are merged through shared memory.
constexpr int kMmaRows = 16;  // q heads per block
constexpr int kMmaKeys = 16;  // keys per warp step
// Keys a block takes per step: its splits start at multiples of this.
constexpr int64_t kMmaRound = int64_t{kWarps} * kMmaKeys;

template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Two floats as the 16-bit pair of an MMA operand, lo in the low half.
template <class T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    r = *reinterpret_cast<const uint32_t*>(&v);
  }
  return r;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <class T, int kHd>
__global__ void __launch_bounds__(kThreads)
    mma_kernel(const T* q, const int32_t* slots, const int32_t* positions,
               const T* __restrict__ k_cache, const T* __restrict__ v_cache, Args a, T* out,
               float* partial, uint32_t* counters) {
  constexpr int kChunks = kHd / 32;  // 16-byte chunks per lane and row
  constexpr int kTiles = kHd / 8;    // n-tiles of O = P V
  // Rows padded by 4 floats: lanes of one c (rows r = 0..7) store to different banks.
  // 8-byte aligned for its float2 stores (other shared variables may come first).
  __shared__ alignas(16) float s_o[kWarps][kMmaRows][kHd + 4];
  __shared__ float s_m[kWarps][kMmaRows];
  __shared__ float s_l[kWarps][kMmaRows];

  const BlockWork w = block_work(a, positions, kMmaRows, kMmaRound);
  if (w.nh == 0) return;
  const auto [t, split, kv, h0, nh, begin, end] = w;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int r = lane / 4;
  const int c = lane % 4;
  const int64_t slot_base = int64_t{slots[t]} * a.max_len * a.kv_width + kv * kHd;
  const T* k_head = k_cache + slot_base + 8 * c;
  const T* v_head = v_cache + slot_base + 8 * c;

  // Q as the A operand of k-steps 2 j and 2 j + 1 (rows r and r + 8: q heads h0 + r, h0 + r + 8).
  uint32_t qa[2 * kChunks][4];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = r + 8 * hf;
    const T* q_row = q + t * a.q_ld + (h0 + row) * kHd + 8 * c;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      uint4 w{0, 0, 0, 0};
      if (row < nh) w = *reinterpret_cast<const uint4*>(q_row + 32 * j);
      qa[2 * j][hf] = w.x;
      qa[2 * j][2 + hf] = w.y;
      qa[2 * j + 1][hf] = w.z;
      qa[2 * j + 1][2 + hf] = w.w;
    }
  }

  float o[kTiles][4];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // rows r and r + 8, in base-2 exponents
  float l[2] = {0.0f, 0.0f};            // this lane's part of the row sums
  const float slope[2] = {r < nh ? slope_log2(a, h0 + r) : 0.0f,
                          r + 8 < nh ? slope_log2(a, h0 + r + 8) : 0.0f};
  const int64_t pos = positions[t];

  for (int64_t k0 = begin + int64_t{warp} * kMmaKeys; k0 < end; k0 += kMmaRound) {
    uint4 kw[2][kChunks];
    uint4 vw[2][kChunks];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int64_t key = k0 + r + 8 * hf;
      const bool valid = key < end;  // rows past it may hold anything: never multiply them
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        kw[hf][j] = uint4{0, 0, 0, 0};
        vw[hf][j] = uint4{0, 0, 0, 0};
        if (valid) {
          kw[hf][j] = *reinterpret_cast<const uint4*>(k_head + key * a.kv_width + 32 * j);
          vw[hf][j] = *reinterpret_cast<const uint4*>(v_head + key * a.kv_width + 32 * j);
        }
      }
    }
    // S = Q K^T for keys k0 .. k0 + 7 (n-tile 0) and k0 + 8 .. k0 + 15 (n-tile 1).
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        mma_16816<T>(s[nt], qa[2 * j], kw[nt][j].x, kw[nt][j].y);
        mma_16816<T>(s[nt], qa[2 * j + 1], kw[nt][j].z, kw[nt][j].w);
      }
    }
    // Lane (r, c) holds rows r (s[.][0..1]) and r + 8 (s[.][2..3]), keys 8 nt + 2 c + {0, 1}.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = k0 + 8 * nt + 2 * c + (e & 1);
        s[nt][e] = key < end
                       ? s[nt][e] * a.scale_log2 + slope[e / 2] * static_cast<float>(key - pos)
                       : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
      }
    }
    float rescale[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
      rescale[hf] = exp2f(m[hf] - mx[hf]);  // key k0 is valid, so mx is finite
      m[hf] = mx[hf];
      l[hf] *= rescale[hf];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m[e / 2]);
        l[e / 2] += s[nt][e];
      }
    }
    const uint32_t pa[4] = {pack_pair<T>(s[0][0], s[0][1]), pack_pair<T>(s[0][2], s[0][3]),
                            pack_pair<T>(s[1][0], s[1][1]), pack_pair<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      o[i][0] *= rescale[0];
      o[i][1] *= rescale[0];
      o[i][2] *= rescale[1];
      o[i][3] *= rescale[1];
    }
    // O += P V, n-tile 4 j + p: the transposed word p of the V chunks j of keys r and r + 8.
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        mma_16816<T>(o[4 * j + p], pa, transpose_8x8(word(vw[0][j], p)),
                     transpose_8x8(word(vw[1][j], p)));
      }
    }
  }

  // Lane (r, c)'s o[4 j + p][2 hf + e] is row r + 8 hf, dimension 32 j + 8 c + 2 p + e.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
  }
  if (c == 0) {
    s_m[warp][r] = m[0];
    s_m[warp][r + 8] = m[1];
    s_l[warp][r] = l[0];
    s_l[warp][r + 8] = l[1];
  }
  __syncthreads();
  // The row's maximum over the warps, and the row's total at that maximum.
  const auto row_state = [&](int row, float& row_max, float& total) {
    row_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) row_max = fmaxf(row_max, s_m[w][row]);
    total = 0.0f;
    if (row_max == -INFINITY) return;  // no keys in this split
    for (int w = 0; w < kWarps; ++w) total += s_l[w][row] * exp2f(s_m[w][row] - row_max);
  };
  // Each warp's rows, weighted by their share of the block's softmax, into its own slice.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = r + 8 * hf;
    if (row >= nh) continue;
    float row_max;
    float total;
    row_state(row, row_max, total);
    const float weight = m[hf] == -INFINITY ? 0.0f : exp2f(m[hf] - row_max) / total;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        *reinterpret_cast<float2*>(&s_o[warp][row][32 * j + 8 * c + 2 * p]) =
            make_float2(o[4 * j + p][2 * hf] * weight, o[4 * j + p][2 * hf + 1] * weight);
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < nh * kHd; i += kThreads) {
    const int row = i / kHd;
    const int d = i % kHd;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += s_o[w][row][d];
    const int64_t qh = h0 + row;
    if (a.splits == 1) {
      out[(t * a.n_q + qh) * kHd + d] = from_float<T>(sum);
    } else {
      partial[((t * a.n_q + qh) * a.splits + split) * kHd + d] = sum;
    }
  }
  if (a.splits > 1 && tid < nh) {
    float row_max;
    float total;
    row_state(tid, row_max, total);
    partial[a.tokens * a.n_q * a.splits * kHd + (t * a.n_q + h0 + tid) * a.splits + split] =
        total > 0.0f ? row_max + log2f(total) : -INFINITY;
  }
  if (a.splits > 1) merge_if_last<T, kMmaRows>(a, partial, counters, t, h0, nh, out);
}

// Whether the tensor-core kernel takes these shapes: 16-bit types, its head dims, and q heads
// that share kv heads (an MHA head fills one of an MMA's 16 rows, and split_kernel reads MHA
// caches near the bandwidth already). It also needs 16-byte aligned rows (mma_aligned).
bool on_tensor_cores(DType dtype, int64_t head_dim, int64_t group) {
  return dtype != DType::kF32 && (head_dim == 64 || head_dim == 96 || head_dim == 128) &&
         group >= 2;
}

bool mma_aligned(int64_t q_ld, const void* q, const void* k, const void* v, const void* out) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return q_ld % 8 == 0 && aligned(q) && aligned(k) && aligned(v) && aligned(out);
}

int sm_count() {
  int device = 0;
  int count = 0;
  TPE_CUDA_CHECK(cudaGetDevice(&device));
  TPE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <class T>
using Kernel = void (*)(const T*, const int32_t*, const int32_t*, const T*, const T*, Args, T*,
                        float*, uint32_t*);

// Blocks of kKernel one multiprocessor holds at once (its registers and shared memory decide);
// asked once, like the multiprocessor count: one kind of device per process.
template <auto kKernel>
int blocks_per_sm() {
  static const int blocks = [] {
    int n = 0;
    TPE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0));
    return n;
  }();
  return blocks;
}

// The kernel for a call: which one, the q heads one of its blocks serves, and its occupancy.
template <class T>
struct Choice {
  Kernel<T> kernel;
  int rows;
  int (*per_sm)();
};

template <auto kKernel, class T>
Choice<T> choice(int rows) {
  return {kKernel, rows, blocks_per_sm<kKernel>};
}

// The one place that picks the kernel, for attention and for attention_splits' occupancy: on
// tensor cores (mma), else split_kernel with 16-byte packs (vec: rows and pointers allow them) or
// single elements; sets a's lanes and packs for it.
template <class T>
Choice<T> choose(int64_t head_dim, int64_t heads_per_kv, bool mma, bool vec, Args& a) {
  if constexpr (!std::is_same_v<T, float>) {
    if (mma) {
      if (head_dim == 64) return choice<mma_kernel<T, 64>, T>(kMmaRows);
      if (head_dim == 96) return choice<mma_kernel<T, 96>, T>(kMmaRows);
      return choice<mma_kernel<T, 128>, T>(kMmaRows);
    }
  }
  constexpr int kW = detail::kVecWidth<T>;
  a.packs = static_cast<int>(vec ? head_dim / kW : head_dim);
  a.lanes = 1;
  while (a.lanes < 32 && a.lanes < a.packs) a.lanes *= 2;
  // Wide rows per lane (heads over 256 elements, or rows without 16-byte alignment) take one q
  // head per block: a group's heads in registers would spill.
  if (!vec) return choice<split_kernel<T, 1, 16, 1>, T>(1);  // rare: correct, not fast
  if (a.packs > a.lanes) return choice<split_kernel<T, kW, 4, 1>, T>(1);
  if (heads_per_kv == 1) return choice<split_kernel<T, kW, 1, 1>, T>(1);
  return choice<split_kernel<T, kW, 1, kMaxHeads>, T>(kMaxHeads);
}

}  // namespace

int64_t attention_scratch_floats(int64_t tokens, int64_t n_q, int64_t head_dim, int splits) {
  return splits > 1 ? tokens * n_q * splits * (head_dim + 1) : 0;
}

int64_t attention_counter_words(int64_t tokens, int64_t n_q, int64_t n_kv, int64_t group) {
  return tokens * n_kv * std::min(group, n_q);
}

int attention_splits(int64_t tokens, int64_t n_q, int64_t head_dim, int64_t max_len, int64_t n_kv,
                     int64_t group, DType dtype, int64_t scratch_floats) {
  if (tokens <= 0 || n_q <= 0) return 1;
  static const int sms = sm_count();
  const int64_t heads_per_kv = std::min(group, n_q);
  const bool mma = on_tensor_cores(dtype, head_dim, group);
  int64_t rows = 1;
  int64_t per_sm = 1;
  detail::dispatch(dtype, "attention_splits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    Args a{};
    const Choice<T> c =
        choose<T>(head_dim, heads_per_kv, mma, head_dim % detail::kVecWidth<T> == 0, a);
    rows = c.rows;
    per_sm = c.per_sm();
  });
  const int64_t head_blocks = (heads_per_kv + rows - 1) / rows;
  const int64_t blocks = tokens * std::min(n_kv, n_q) * head_blocks;
  // As many splits as one wave of resident blocks holds: a second, mostly empty wave costs more
  // than longer splits. One H100 (4 blocks of split_kernel, 3 of mma_kernel fit a
  // multiprocessor), 4096 keys: MHA batch 8, 2 splits (512 blocks) 182 us against 3's 210; batch
  // 1, 16 splits 29.4 us against 12's 32.1; GQA 4 batch 8, 6 splits 53.6 us against 4's 56.9.
  // Splits of at least kMinSplitKeys keys of a full cache, and partial results that fit the
  // scratch.
  int64_t splits = std::max<int64_t>(1, per_sm * sms / blocks);
  splits = std::min<int64_t>(splits, (max_len + kMinSplitKeys - 1) / kMinSplitKeys);
  splits = std::min<int64_t>(splits, kMaxSplits);
  while (splits > 1 &&
         attention_scratch_floats(tokens, n_q, head_dim, static_cast<int>(splits)) > scratch_floats)
    --splits;
  // No split left empty at a full cache: splits start at multiples of the kernel's round, so 49
  // splits of 4096 keys are 128 keys each and only 32 hold any. The empty ones still cost their
  // blocks and the merge a longer row (one H100, GQA 4 at batch 1: 49 splits 13.25 us, the same
  // work in 32 splits 12.56).
  const int64_t round = mma ? kMmaRound : kSplitRound;
  const int64_t split_keys = ((max_len + splits - 1) / splits + round - 1) / round * round;
  splits = std::min<int64_t>(splits, (max_len + split_keys - 1) / split_keys);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

void attention(const void* q, int64_t tokens, int64_t n_q, int64_t head_dim, const int32_t* slots,
               const int32_t* positions, const void* k_cache, const void* v_cache, int64_t max_len,
               int64_t n_kv, int64_t first_q, int64_t group, int64_t first_kv, float scale,
               int64_t window, DType dtype, void* out, cudaStream_t stream, int64_t q_ld,
               int splits, const AttentionScratch& scratch, const Alibi& alibi) {
  TPE_CUDA_REQUIRE(tokens >= 0 && n_q >= 0 && max_len >= 0 && window >= 0, "attention",
                   "negative size");
  if (q_ld == 0) q_ld = n_q * head_dim;
  TPE_CUDA_REQUIRE(q_ld >= n_q * head_dim, "attention", "q's row stride below its width");
  TPE_CUDA_REQUIRE(head_dim > 0 && head_dim <= kMaxHeadDim, "attention",
                   "head_dim must be in 1..512");
  TPE_CUDA_REQUIRE(group > 0 && n_kv > 0 && first_q >= 0, "attention",
                   "group and n_kv must be positive, first_q not negative");
  TPE_CUDA_REQUIRE(splits >= 1 && splits <= kMaxSplits &&
                       (splits == 1 || (scratch.partial != nullptr && scratch.counters != nullptr)),
                   "attention",
                   "splits must be in 1..64, and need scratch and counters when more than 1");
  if (tokens == 0 || n_q == 0) return;
  // Every local q head must map to a local kv head.
  TPE_CUDA_REQUIRE(first_q / group - first_kv >= 0 && (first_q + n_q - 1) / group - first_kv < n_kv,
                   "attention", "a local q head maps outside the local kv heads");
  TPE_CUDA_REQUIRE(tokens <= int64_t{0x7fffffff}, "attention", "more tokens than one grid holds");
  const int64_t heads_per_kv = std::min(group, n_q);
  TPE_CUDA_REQUIRE(n_kv * heads_per_kv <= 65535, "attention", "too many heads for a grid");

  Args args{tokens,   q_ld,
            n_q,      head_dim,
            max_len,  n_kv * head_dim,
            first_q,  group,
            first_kv, scale * kLog2e,
            window,   splits,
            1,        0,
            0,        {alibi.max_bias, alibi.scale * kLog2e, alibi.n_heads}};
  TPE_CUDA_REQUIRE(alibi.max_bias == 0 || alibi.n_heads >= first_q + n_q, "attention",
                   "ALiBi's head count is below the local q heads");
  detail::dispatch(dtype, "attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* tq = static_cast<const T*>(q);
    const auto* tk = static_cast<const T*>(k_cache);
    const auto* tv = static_cast<const T*>(v_cache);
    auto* tout = static_cast<T*>(out);
    // Every row (of q, the caches, out) starts a multiple of head_dim elements in.
    bool vec = false;
    detail::dispatch_width<T>(
        std::gcd(head_dim, q_ld), [&](auto width) { vec = decltype(width)::value > 1; }, tq, tk, tv,
        tout);
    const bool mma =
        on_tensor_cores(dtype, head_dim, group) && mma_aligned(q_ld, q, k_cache, v_cache, out);
    const Choice<T> c = choose<T>(head_dim, heads_per_kv, mma, vec, args);
    args.head_blocks = static_cast<int>((heads_per_kv + c.rows - 1) / c.rows);
    const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(splits),
                    static_cast<unsigned>(n_kv * args.head_blocks));
    c.kernel<<<grid, kThreads, 0, stream>>>(tq, slots, positions, tk, tv, args, tout,
                                            scratch.partial, scratch.counters);
    TPE_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace tpe::cuda
