// Elementwise kernels: dtype conversion, add, mul, activations. Grid-stride loops over 16-byte
// packs when every pointer allows it, one element at a time otherwise.
#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

using detail::activate;
using detail::from_float;
using detail::Pack;
using detail::to_float;

constexpr int kThreads = 256;

template <class S, class D>
__global__ void convert_kernel(const S* src, D* dst, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    dst[i] = from_float<D>(to_float(src[i]));
  }
}

struct AddOp {
  static constexpr bool kBinary = true;
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MulOp {
  static constexpr bool kBinary = true;
  __device__ float operator()(float a, float b) const { return a * b; }
};
struct ActOp {
  static constexpr bool kBinary = false;
  tpe_activation act;
  __device__ float operator()(float a, float /*unused*/) const { return activate(act, a); }
};

// out = op(a, b) over n elements in packs of kW; a, b and out may alias (each element is read
// and written by one thread). Unary ops never read b.
template <class T, int kW, class Op>
__global__ void map_kernel(const T* a, const T* b, T* out, int64_t n, Op op) {
  using P = Pack<T, kW>;
  const int64_t packs = n / kW;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < packs; i += stride) {
    const P pa = reinterpret_cast<const P*>(a)[i];
    P pb = pa;
    if constexpr (Op::kBinary) pb = reinterpret_cast<const P*>(b)[i];
    P po;
#pragma unroll
    for (int k = 0; k < kW; ++k) po.v[k] = from_float<T>(op(to_float(pa.v[k]), to_float(pb.v[k])));
    reinterpret_cast<P*>(out)[i] = po;
  }
  // The tail past the last whole pack (only when kW > 1 and n % kW != 0).
  for (int64_t i = packs * kW + first; i < n; i += stride) {
    const float vb = Op::kBinary ? to_float(b[i]) : 0.0f;
    out[i] = from_float<T>(op(to_float(a[i]), vb));
  }
}

template <class Op>
void launch_map(const char* name, const void* a, const void* b, void* out, int64_t n, DType dtype,
                Op op, cudaStream_t stream) {
  TPE_CUDA_REQUIRE(n >= 0, name, "negative element count");
  if (n == 0) return;
  detail::dispatch(dtype, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* ta = static_cast<const T*>(a);
    const auto* tb = static_cast<const T*>(b);
    auto* tout = static_cast<T*>(out);
    // The pack path needs aligned pointers only: a ragged n is finished by the tail loop.
    detail::dispatch_width<T>(
        0,
        [&](auto width) {
          constexpr int kW = decltype(width)::value;
          const unsigned grid = detail::grid_for(n / kW + 1, kThreads);
          map_kernel<T, kW><<<grid, kThreads, 0, stream>>>(ta, tb, tout, n, op);
          TPE_CUDA_CHECK_LAUNCH();
        },
        ta, Op::kBinary ? tb : nullptr, tout);
  });
}

// out = act(gate) * up per element, rounded as the plain path rounds (the activation to T, then
// the product); gate and up with their own row strides, out packed. Rows over blockIdx.y, a row's
// packs of kW elements over x: no division per element.
template <class T, int kW>
__global__ void gated_kernel(tpe_activation act, const T* gate, int64_t ld_gate, const T* up,
                             int64_t ld_up, T* out, int64_t rows, int64_t cols) {
  using P = Pack<T, kW>;
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= cols / kW) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const P g = reinterpret_cast<const P*>(gate + r * ld_gate)[c];
    const P u = reinterpret_cast<const P*>(up + r * ld_up)[c];
    P o;
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const float a = to_float(from_float<T>(activate(act, to_float(g.v[k]))));
      o.v[k] = from_float<T>(a * to_float(u.v[k]));
    }
    reinterpret_cast<P*>(out + r * cols)[c] = o;
  }
}

}  // namespace

void gated_activation(tpe_activation act, const void* gate, int64_t ld_gate, const void* up,
                      int64_t ld_up, void* out, int64_t rows, int64_t cols, DType dtype,
                      cudaStream_t stream) {
  TPE_CUDA_REQUIRE(rows >= 0 && cols >= 0 && ld_gate >= cols && ld_up >= cols, "gated_activation",
                   "bad shape or strides");
  if (rows * cols == 0) return;
  detail::dispatch(dtype, "gated_activation", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    auto* o = static_cast<T*>(out);
    // Packs when every row of all three starts 16-byte aligned: the strides as well as the width.
    const bool strides = ld_gate % detail::kVecWidth<T> == 0 && ld_up % detail::kVecWidth<T> == 0;
    detail::dispatch_width<T>(
        strides ? cols : 1,
        [&](auto width) {
          constexpr int kW = decltype(width)::value;
          const dim3 grid(static_cast<unsigned>((cols / kW + kThreads - 1) / kThreads),
                          static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
          gated_kernel<T, kW>
              <<<grid, kThreads, 0, stream>>>(act, g, ld_gate, u, ld_up, o, rows, cols);
          TPE_CUDA_CHECK_LAUNCH();
        },
        g, u, o);
  });
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
  }
  detail::throw_bad_argument("dtype_size", "unknown dtype");
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
  }
  return "?";
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
             cudaStream_t stream) {
  TPE_CUDA_REQUIRE(n >= 0, "convert", "negative element count");
  if (n == 0) return;
  if (src_dtype == dst_dtype) {
    TPE_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * dtype_size(src_dtype),
                                   cudaMemcpyDeviceToDevice, stream));
    return;
  }
  detail::dispatch(src_dtype, "convert", [&](auto src_tag) {
    using S = typename decltype(src_tag)::type;
    detail::dispatch(dst_dtype, "convert", [&](auto dst_tag) {
      using D = typename decltype(dst_tag)::type;
      convert_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, stream>>>(
          static_cast<const S*>(src), static_cast<D*>(dst), n);
      TPE_CUDA_CHECK_LAUNCH();
    });
  });
}

void activation(tpe_activation act, void* x, int64_t n, DType dtype, cudaStream_t stream) {
  switch (act) {
    case TPE_ACT_SILU:
    case TPE_ACT_GELU:
    case TPE_ACT_GELU_TANH:
    case TPE_ACT_RELU:
      return launch_map("activation", x, nullptr, x, n, dtype, ActOp{act}, stream);
  }
  detail::throw_bad_argument("activation", "unknown activation kind");
}

void add(const void* a, const void* b, void* out, int64_t n, DType dtype, cudaStream_t stream) {
  launch_map("add", a, b, out, n, dtype, AddOp{}, stream);
}

void mul(const void* a, const void* b, void* out, int64_t n, DType dtype, cudaStream_t stream) {
  launch_map("mul", a, b, out, n, dtype, MulOp{}, stream);
}

}  // namespace tpe::cuda
