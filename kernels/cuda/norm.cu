// RMSNorm and LayerNorm: one block per row, fp32 block reductions, 16-byte packs when the row
// width and the pointers allow. The row is read again for the output pass; it is still in L1/L2.
// With a residual, the row normalised is x + residual rounded to the dtype, which is also
// written out (the fused path's add + norm): each thread reads back only the packs it wrote.
// Fused with the one-shot all-reduce (peer.cuh), the row normalised is the sum of every rank's
// row, written back to x as the all-reduce alone writes it.
#include "kernels/cuda/peer.cuh"

namespace tpe::cuda {
namespace {

using detail::block_reduce;
using detail::from_float;
using detail::Pack;
using detail::SumOp;
using detail::to_float;

// One row of a norm's input: x, or x + r (rounded) kept in sum.
template <class T, int kW>
struct RowInput {
  using P = Pack<T, kW>;
  const P* x;
  const P* r;  // null: no residual
  P* sum;

  __device__ RowInput(const T* x_, const T* r_, T* sum_, int64_t width) {
    const int64_t row = int64_t{blockIdx.x} * width;
    x = reinterpret_cast<const P*>(x_ + row);
    r = r_ != nullptr ? reinterpret_cast<const P*>(r_ + row) : nullptr;
    sum = r_ != nullptr ? reinterpret_cast<P*>(sum_ + row) : nullptr;
  }
  // The first read of pack i (the sum made and stored), then later ones by the same thread.
  __device__ P first(int64_t i) const {
    P p = x[i];
    if (r == nullptr) return p;
    const P q = r[i];
#pragma unroll
    for (int k = 0; k < kW; ++k) p.v[k] = from_float<T>(to_float(p.v[k]) + to_float(q.v[k]));
    sum[i] = p;
    return p;
  }
  __device__ P again(int64_t i) const { return r == nullptr ? x[i] : sum[i]; }
};

// One row of the all-reduce fused with the norm: the sum of every rank's staged row in rank
// order (fp32, rounded once: peer_all_reduce's bits), stored into x's row.
template <class T, int kW>
struct PeerRowInput {
  using P = Pack<T, kW>;
  const P* staged[kPeerMaxRanks];
  int world;
  P* sum;

  __device__ PeerRowInput(const PeerGroup& g, uint32_t call, int64_t row, int64_t width, T* x)
      : world(g.world), sum(reinterpret_cast<P*>(x + row * width)) {
    for (int s = 0; s < g.world; ++s) {
      staged[s] = reinterpret_cast<const P*>(detail::peer_staging<T>(g, s, call) + row * width);
    }
  }
  __device__ P first(int64_t i) const {
    float acc[kW] = {};
    for (int s = 0; s < world; ++s) {
      const P v = staged[s][i];
#pragma unroll
      for (int k = 0; k < kW; ++k) acc[k] += to_float(v.v[k]);
    }
    P p;
#pragma unroll
    for (int k = 0; k < kW; ++k) p.v[k] = from_float<T>(acc[k]);
    sum[i] = p;
    return p;
  }
  __device__ P again(int64_t i) const { return sum[i]; }
};

// The norms of one row (y_row) by the whole block, from any row input.
template <class T, int kW, class Input>
__device__ void rms_norm_row(const Input& xr, int64_t width, const T* w, float eps, T* y_row,
                             float* scratch) {
  using P = Pack<T, kW>;
  const int64_t packs = width / kW;
  const auto* wp = reinterpret_cast<const P*>(w);
  auto* yr = reinterpret_cast<P*>(y_row);
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P p = xr.first(i);
#pragma unroll
    for (int k = 0; k < kW; ++k) sum_sq += to_float(p.v[k]) * to_float(p.v[k]);
  }
  sum_sq = block_reduce(sum_sq, scratch, SumOp{}, 0.0f);
  const float rstd = 1.0f / sqrtf(sum_sq / static_cast<float>(width) + eps);
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P px = xr.again(i);
    const P pw = wp[i];
    P py;
    // Llama multiplies the weight last: w * (x * rstd).
#pragma unroll
    for (int k = 0; k < kW; ++k)
      py.v[k] = from_float<T>(to_float(pw.v[k]) * (to_float(px.v[k]) * rstd));
    yr[i] = py;
  }
}

template <class T, int kW>
__global__ void rms_norm_kernel(const T* x, const T* residual, T* sum, int64_t width, const T* w,
                                float eps, T* y) {
  __shared__ float scratch[32];
  rms_norm_row<T, kW>(RowInput<T, kW>(x, residual, sum, width), width, w, eps,
                      y + int64_t{blockIdx.x} * width, scratch);
}

// Two passes over the row (mean, then the centred sum of squares) rather than one pass of sum
// and sum of squares: no cancellation when the mean is large against the spread.
template <class T, int kW, class Input>
__device__ void layer_norm_row(const Input& xr, int64_t width, const T* w, const T* b, float eps,
                               T* y_row, float* scratch) {
  using P = Pack<T, kW>;
  const int64_t packs = width / kW;
  const auto* wp = reinterpret_cast<const P*>(w);
  const auto* bp = reinterpret_cast<const P*>(b);
  auto* yr = reinterpret_cast<P*>(y_row);
  float total = 0.0f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P p = xr.first(i);
#pragma unroll
    for (int k = 0; k < kW; ++k) total += to_float(p.v[k]);
  }
  const float mean = block_reduce(total, scratch, SumOp{}, 0.0f) / static_cast<float>(width);
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P p = xr.again(i);
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const float d = to_float(p.v[k]) - mean;
      sum_sq += d * d;
    }
  }
  sum_sq = block_reduce(sum_sq, scratch, SumOp{}, 0.0f);
  const float rstd = 1.0f / sqrtf(sum_sq / static_cast<float>(width) + eps);
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const P px = xr.again(i);
    const P pw = wp[i];
    P pb{};
    if (bp != nullptr) pb = bp[i];
    P py;
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const float bias = bp != nullptr ? to_float(pb.v[k]) : 0.0f;
      py.v[k] = from_float<T>((to_float(px.v[k]) - mean) * rstd * to_float(pw.v[k]) + bias);
    }
    yr[i] = py;
  }
}

template <class T, int kW>
__global__ void layer_norm_kernel(const T* x, const T* residual, T* sum, int64_t width, const T* w,
                                  const T* b, float eps, T* y) {
  __shared__ float scratch[32];
  layer_norm_row<T, kW>(RowInput<T, kW>(x, residual, sum, width), width, w, b, eps,
                        y + int64_t{blockIdx.x} * width, scratch);
}

// The all-reduce of x [rows, width] and the norm of its sum, on a fixed grid of kPeerBlocks
// blocks: block b stages rows b, b + kPeerBlocks, ..., meets block b of every rank, then sums
// and normalises those rows as the one-shot all-reduce and the norm kernel would (the same block
// size, so the same reductions: the same bits).
template <class T, int kW, bool kRms>
__global__ void peer_all_reduce_norm_kernel(T* x, int64_t rows, int64_t width, const T* w,
                                            const T* b, float eps, T* y, PeerGroup g) {
  using P = Pack<T, kW>;
  __shared__ float scratch[32];
  const uint32_t call = detail::peer_call(g);
  const int64_t packs = width / kW;
  T* mine = detail::peer_staging<T>(g, g.rank, call);
  for (int64_t r = blockIdx.x; r < rows; r += kPeerBlocks) {
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      reinterpret_cast<P*>(mine + r * width)[i] = reinterpret_cast<const P*>(x + r * width)[i];
    }
  }
  detail::peer_barrier(g, call);
  for (int64_t r = blockIdx.x; r < rows; r += kPeerBlocks) {
    const PeerRowInput<T, kW> in(g, call, r, width, x);
    if constexpr (kRms) {
      rms_norm_row<T, kW>(in, width, w, eps, y + r * width, scratch);
    } else {
      layer_norm_row<T, kW>(in, width, w, b, eps, y + r * width, scratch);
    }
  }
  detail::peer_done(g, call);
}

// A multiple of 32 threads (the reductions need whole warps), at most 256, about one pack each.
int norm_threads(int64_t packs) {
  return static_cast<int>(std::clamp<int64_t>((packs + 31) / 32 * 32, 32, 256));
}

void check_norm_args(const char* op, int64_t tokens, int64_t width, const void* residual,
                     const void* sum) {
  TPE_CUDA_REQUIRE(tokens >= 0 && width >= 0, op, "negative size");
  TPE_CUDA_REQUIRE((residual == nullptr) == (sum == nullptr), op,
                   "a residual needs a buffer for the sum, and only a residual does");
  TPE_CUDA_REQUIRE(tokens <= int64_t{0x7fffffff}, op, "more rows than one grid can hold");
}

// Calls launch(kW, x, residual, sum, w, b, y) with the pointers typed for `dtype` and kW the
// pack width the row width and every pointer allow (null pointers allow any), then checks the
// launch.
template <class F>
void launch_norm(const char* op, DType dtype, int64_t width, const void* x, const void* residual,
                 void* sum, const void* w, const void* b, void* y, F&& launch) {
  detail::dispatch(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* tx = static_cast<const T*>(x);
    const auto* tr = static_cast<const T*>(residual);
    auto* ts = static_cast<T*>(sum);
    const auto* tw = static_cast<const T*>(w);
    const auto* tb = static_cast<const T*>(b);
    auto* ty = static_cast<T*>(y);
    detail::dispatch_width<T>(
        width,
        [&](auto vec) {
          launch(vec, tx, tr, ts, tw, tb, ty);
          TPE_CUDA_CHECK_LAUNCH();
        },
        tx, tr, ts, tw, tb, ty);
  });
}

}  // namespace

void rms_norm(const void* x, int64_t tokens, int64_t width, const void* w, float eps, DType dtype,
              void* y, cudaStream_t stream, const void* residual, void* sum) {
  check_norm_args("rms_norm", tokens, width, residual, sum);
  if (tokens == 0 || width == 0) return;
  launch_norm("rms_norm", dtype, width, x, residual, sum, w, nullptr, y,
              [&](auto vec, auto tx, auto tr, auto ts, auto tw, auto, auto ty) {
                constexpr int kW = decltype(vec)::value;
                using T = std::remove_pointer_t<decltype(ts)>;
                rms_norm_kernel<T, kW>
                    <<<static_cast<unsigned>(tokens), norm_threads(width / kW), 0, stream>>>(
                        tx, tr, ts, width, tw, eps, ty);
              });
}

void layer_norm(const void* x, int64_t tokens, int64_t width, const void* w, const void* b,
                float eps, DType dtype, void* y, cudaStream_t stream, const void* residual,
                void* sum) {
  check_norm_args("layer_norm", tokens, width, residual, sum);
  if (tokens == 0 || width == 0) return;
  launch_norm("layer_norm", dtype, width, x, residual, sum, w, b, y,
              [&](auto vec, auto tx, auto tr, auto ts, auto tw, auto tb, auto ty) {
                constexpr int kW = decltype(vec)::value;
                using T = std::remove_pointer_t<decltype(ts)>;
                layer_norm_kernel<T, kW>
                    <<<static_cast<unsigned>(tokens), norm_threads(width / kW), 0, stream>>>(
                        tx, tr, ts, width, tw, tb, eps, ty);
              });
}

void peer_all_reduce_norm(tpe_norm_kind kind, void* x, int64_t rows, int64_t width, const void* w,
                          const void* b, float eps, DType dtype, void* y, const PeerGroup& group,
                          cudaStream_t stream) {
  TPE_CUDA_REQUIRE(rows >= 0 && width >= 0, "peer_all_reduce_norm", "negative size");
  TPE_CUDA_REQUIRE(rows * width * static_cast<int64_t>(dtype_size(dtype)) <= group.capacity,
                   "peer_all_reduce_norm", "the message is larger than the staging capacity");
  TPE_CUDA_REQUIRE(kind == TPE_NORM_RMS || kind == TPE_NORM_LAYER, "peer_all_reduce_norm",
                   "unknown norm kind");
  if (rows == 0 || width == 0) return;
  // x is summed in place: it goes in as the sum.
  launch_norm("peer_all_reduce_norm", dtype, width, nullptr, nullptr, x, w, b, y,
              [&](auto vec, auto, auto, auto tx, auto tw, auto tb, auto ty) {
                constexpr int kW = decltype(vec)::value;
                using T = std::remove_pointer_t<decltype(tx)>;
                const auto kernel = kind == TPE_NORM_RMS
                                        ? peer_all_reduce_norm_kernel<T, kW, true>
                                        : peer_all_reduce_norm_kernel<T, kW, false>;
                kernel<<<kPeerBlocks, norm_threads(width / kW), 0, stream>>>(tx, rows, width, tw,
                                                                             tb, eps, ty, group);
              });
}

}  // namespace tpe::cuda
