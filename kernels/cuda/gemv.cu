// The small-token linear layer: y[tokens, out] = x[tokens, in] · w[out, in]^T (+ bias) for
// tokens <= 8, the decode case, where the product is bound by streaming W once from memory.
// Gemm::linear (gemm.cpp) sends here the products where the CUDA-core kernel below beat cuBLASLt
// on an H200 (f16/bf16 with 1 or 2 tokens, f32 with up to 8) and everything else to cuBLASLt.
// (A tensor-core mma.sync variant was tried and lost to cuBLASLt at every token count; see
// kernels/cuda/README.md.)
//
// Layout of the work: a block of 4 warps; each warp owns kR consecutive rows of W (output
// features) and computes them for every token. The warp's lanes stride over the row in 16-byte
// packs (lane l reads packs l, l + 32, ...), so each load instruction of the warp reads 512
// contiguous bytes of one row. The loop is unrolled kU times with all kU * kR loads of W issued
// before any is used, so every lane has that many independent 16-byte loads in flight. W is read
// with ld.global.nc.L1::no_allocate (read once, kept out of L1); x, at most 8 rows that every warp
// reads, goes through the read-only path and stays in L1/L2: staging it in shared memory would
// cost a block barrier before the first W load and, at 8 tokens × 11008 features, most of the
// shared memory of an SM. Products accumulate in fp32 registers (acc[row][token], with several
// partial sums per row at one or two tokens to shorten the FMA chains), are summed over the warp
// with shuffles, and lane r * kT + t adds the bias, applies the activation if one is asked for
// (the fused path's linear_activation) and stores y[t, row0 + r], rounded once.
//
// Token counts are compiled for 1, 2, 4 and 8 (3 runs as 4, 5 to 7 as 8: the extra token slots
// read the last real token's x and their sums are never stored). The 16-byte path needs `in` to
// be a multiple of the pack width and x and w to be 16-byte aligned; otherwise the same kernel
// runs with one-element loads. y and bias are accessed one element at a time and need no
// alignment.
#include <climits>
#include <optional>

#include "kernels/cuda/device.hpp"

namespace tpe::cuda::detail {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Gemm::linear's choice, from H200 timings (kernels/cuda/README.md): the CUDA-core kernel for
// f32 up to 8 tokens and for f16/bf16 up to kHalfMaxTokens; cuBLASLt beats both kernels here for
// f16/bf16 from 3 tokens on.
constexpr int64_t kHalfMaxTokens = 2;
// The kernel's act argument: a tpe_activation, or this for none.
constexpr int kNoActivation = -1;

// A pack through the read-only (non-coherent) cache path: x, read by every warp.
template <class P>
__device__ __forceinline__ P load_cached(const P* p) {
  P v;
  if constexpr (sizeof(P) == 16) {
    *reinterpret_cast<uint4*>(&v) = __ldg(reinterpret_cast<const uint4*>(p));
  } else if constexpr (sizeof(P) == 4) {
    *reinterpret_cast<unsigned*>(&v) = __ldg(reinterpret_cast<const unsigned*>(p));
  } else {
    static_assert(sizeof(P) == 2);
    *reinterpret_cast<unsigned short*>(&v) = __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  return v;
}

// A pack of W, read exactly once: bypass L1 so that x keeps it.
template <class P>
__device__ __forceinline__ P load_stream(const P* p) {
  if constexpr (sizeof(P) == 16) {
    uint4 u;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
        : "l"(p));
    P v;
    *reinterpret_cast<uint4*>(&v) = u;
    return v;
  } else {
    return load_cached(p);
  }
}

// acc[r][t][s] += w[r] · x[t] over one pack; element j goes to partial sum j % kS.
template <class T, int kV, int kT, int kR, int kS>
__device__ __forceinline__ void accumulate(float (&acc)[kR][kT][kS], const Pack<T, kV> (&wv)[kR],
                                           const Pack<T, kV>* const (&xt)[kT], int i) {
  float wf[kR][kV];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int j = 0; j < kV; ++j) wf[r][j] = to_float(wv[r].v[j]);
  }
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    const Pack<T, kV> xv = load_cached(xt[t] + i);
    float xf[kV];
#pragma unroll
    for (int j = 0; j < kV; ++j) xf[j] = to_float(xv.v[j]);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int j = 0; j < kV; ++j) acc[r][t][j % kS] = fmaf(wf[r][j], xf[j], acc[r][t][j % kS]);
    }
  }
}

// kV elements per load (16 bytes, or 1), kT token slots, kR rows per warp, kU unrolled steps.
// n = in / kV packs per row.
template <class T, int kV, int kT, int kR, int kU>
__global__ void __launch_bounds__(kThreads, 4)
    gemv_kernel(const T* __restrict__ x, int tokens, int64_t in, int n, const T* __restrict__ w,
                int64_t out, const T* __restrict__ bias, int act, T* __restrict__ y) {
  static_assert(kR * kT <= 32, "one lane stores each (row, token)");
  constexpr int kS = kT == 1 ? 4 : kT == 2 ? 2 : 1;  // partial sums per (row, token)
  using P = Pack<T, kV>;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t row0 = (int64_t{blockIdx.x} * kWarps + threadIdx.x / 32) * kR;
  if (row0 >= out) return;  // whole warps only: no shuffle below loses a lane

  // Rows past `out` (the last warp's) re-read the last row; their sums are never stored.
  const P* wr[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int64_t row = row0 + r < out ? row0 + r : out - 1;
    wr[r] = reinterpret_cast<const P*>(w + row * in);
  }
  const P* xt[kT];
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    xt[t] = reinterpret_cast<const P*>(x + int64_t{t < tokens ? t : tokens - 1} * in);
  }

  float acc[kR][kT][kS];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int t = 0; t < kT; ++t) {
#pragma unroll
      for (int s = 0; s < kS; ++s) acc[r][t][s] = 0.0f;
    }
  }

  int i = lane;
  for (; i + (kU - 1) * 32 < n; i += kU * 32) {
    P wv[kU][kR];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
#pragma unroll
      for (int r = 0; r < kR; ++r) wv[u][r] = load_stream(wr[r] + i + u * 32);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) accumulate<T, kV, kT, kR, kS>(acc, wv[u], xt, i + u * 32);
  }
  for (; i < n; i += 32) {
    P wv[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) wv[r] = load_stream(wr[r] + i);
    accumulate<T, kV, kT, kR, kS>(acc, wv, xt, i);
  }

#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      float v = acc[r][t][0];
#pragma unroll
      for (int s = 1; s < kS; ++s) v += acc[r][t][s];
      v = warp_reduce(v, SumOp{});
      const int64_t row = row0 + r;
      if (lane == r * kT + t && row < out && t < tokens) {
        if (bias != nullptr) v += to_float(bias[row]);
        if (act != kNoActivation) v = activate(static_cast<tpe_activation>(act), v);
        y[int64_t{t} * out + row] = from_float<T>(v);
      }
    }
  }
}

template <class T, int kV, int kT, int kR, int kU>
void launch(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out, const void* bias,
            int act, void* y, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = int64_t{kWarps} * kR;
  const auto blocks = static_cast<unsigned>((out + kRowsPerBlock - 1) / kRowsPerBlock);
  gemv_kernel<T, kV, kT, kR, kU><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<int>(tokens), in, static_cast<int>(in / kV),
      static_cast<const T*>(w), out, static_cast<const T*>(bias), act, static_cast<T*>(y));
  TPE_CUDA_CHECK_LAUNCH();
}

// Rows per warp and unrolling per token count: 8 loads of W in flight per lane at 1 and 2
// tokens; at 4 and 8, 4 rows per warp so that each x pack serves 4 rows (x's L1 traffic at most
// twice W's) and 8 loads of W in flight, under the 128 registers that 4 blocks per SM allow.
template <class T, int kV>
void launch_tokens(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out,
                   const void* bias, int act, void* y, cudaStream_t stream) {
  if (tokens == 1) return launch<T, kV, 1, 2, 4>(x, tokens, in, w, out, bias, act, y, stream);
  if (tokens == 2) return launch<T, kV, 2, 2, 4>(x, tokens, in, w, out, bias, act, y, stream);
  if (tokens <= 4) return launch<T, kV, 4, 4, 2>(x, tokens, in, w, out, bias, act, y, stream);
  return launch<T, kV, 8, 4, 2>(x, tokens, in, w, out, bias, act, y, stream);
}

// forced: run the kernel even where Gemm::linear leaves the product to cuBLASLt (f16/bf16 above
// kHalfMaxTokens tokens), for the tests and the benchmark.
bool gemv_with(bool forced, const void* x, int64_t tokens, int64_t in, const void* w, int64_t out,
               const void* bias, std::optional<tpe_activation> activation, DType dtype, void* y,
               cudaStream_t stream) {
  const int act = activation ? static_cast<int>(*activation) : kNoActivation;
  constexpr int64_t kMaxTokens = 8;
  if (tokens < 1 || tokens > kMaxTokens || in < 1 || out < 1 || in > INT_MAX) return false;
  // Grid size: (out / rows per block) blocks must fit in gridDim.x.
  if (out > int64_t{INT_MAX}) return false;
  bool done = true;
  dispatch(dtype, "Gemm::linear", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_width<T>(
        in,
        [&](auto width) {
          constexpr int kV = decltype(width)::value;
          constexpr bool kHalf = !std::is_same_v<T, float>;
          if (!forced && kHalf && tokens > kHalfMaxTokens) {
            done = false;  // cuBLASLt is faster there
            return;
          }
          launch_tokens<T, kV>(x, tokens, in, w, out, bias, act, y, stream);
        },
        x, w);
  });
  return done;
}

}  // namespace

// Declared in gemm.cpp. Enqueues the product with the CUDA-core kernel and returns true when it
// qualifies (f32 with 1 to 8 tokens, f16/bf16 with 1 or 2; in and out below 2^31); returns false,
// enqueuing nothing, otherwise. act: applied to the sum with the bias (none when empty).
bool gemv(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out, const void* bias,
          std::optional<tpe_activation> act, DType dtype, void* y, cudaStream_t stream) {
  return gemv_with(false, x, tokens, in, w, out, bias, act, dtype, y, stream);
}

// For the tests and the benchmark (declared there): the kernel on every product it can take, also
// those Gemm::linear leaves to cuBLASLt.
bool gemv_forced(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out,
                 const void* bias, DType dtype, void* y, cudaStream_t stream) {
  return gemv_with(true, x, tokens, in, w, out, bias, std::nullopt, dtype, y, stream);
}

}  // namespace tpe::cuda::detail
