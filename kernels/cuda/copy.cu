// Kernels that only move rows or elements: embedding lookup, column gather, KV cache append,
// heads copied to and from a wider head width.
// They never look at values, so they are templated on the width of the copied unit (2 to 16
// bytes), not on the dtype.
#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

template <class U>
struct UnitTag {
  using type = U;
};

// Calls f(UnitTag<U>{}) with U the widest unit (16, 8, 4 or 2 bytes) that divides `row_bytes`
// and the address of every pointer; all dtypes are at least 2 bytes wide.
template <class F, class... Ptrs>
void dispatch_unit(int64_t row_bytes, F&& f, const Ptrs*... ptrs) {
  const uintptr_t bits =
      (static_cast<uintptr_t>(row_bytes) | ... | reinterpret_cast<uintptr_t>(ptrs));
  if (bits % 16 == 0) return f(UnitTag<uint4>{});
  if (bits % 8 == 0) return f(UnitTag<uint2>{});
  if (bits % 4 == 0) return f(UnitTag<uint32_t>{});
  return f(UnitTag<uint16_t>{});
}

// One block per token: the row of the table, or zeros for ids outside this rank's vocab slice.
template <class U>
__global__ void embedding_kernel(const int32_t* ids, const U* table, int64_t vocab_begin,
                                 int64_t vocab_end, int64_t row_units, U* out) {
  const int64_t t = blockIdx.x;
  const int64_t id = ids[t];
  U* dst = out + t * row_units;
  if (id >= vocab_begin && id < vocab_end) {
    const U* src = table + (id - vocab_begin) * row_units;
    for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) dst[i] = src[i];
  } else {
    for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) dst[i] = U{};
  }
}

// One block per token; consecutive threads write consecutive output columns.
template <class E>
__global__ void gather_columns_kernel(const E* x, int64_t in_width, const int32_t* cols,
                                      int64_t out_width, E* out) {
  const int64_t t = blockIdx.x;
  const E* src = x + t * in_width;
  E* dst = out + t * out_width;
  for (int64_t i = threadIdx.x; i < out_width; i += blockDim.x) dst[i] = src[cols[i]];
}

// One block per token: its k and v rows into row positions[t] of cache slot slots[t].
template <class U>
__global__ void kv_append_kernel(const U* k, const U* v, int64_t row_units, int64_t k_ld_units,
                                 int64_t v_ld_units, const int32_t* slots, const int32_t* positions,
                                 U* k_cache, U* v_cache, int64_t max_len) {
  const int64_t t = blockIdx.x;
  const int64_t row = int64_t{slots[t]} * max_len + positions[t];
  const U* k_src = k + t * k_ld_units;
  const U* v_src = v + t * v_ld_units;
  U* k_dst = k_cache + row * row_units;
  U* v_dst = v_cache + row * row_units;
  for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

// Threads for a row of `units` units: a multiple of 32, at most 256.
int row_threads(int64_t units) {
  return static_cast<int>(std::clamp<int64_t>((units + 31) / 32 * 32, 32, 256));
}

unsigned token_grid(int64_t tokens, const char* op) {
  TPE_CUDA_REQUIRE(tokens <= int64_t{0x7fffffff}, op, "more tokens than one grid can hold");
  return static_cast<unsigned>(tokens);
}

// Row r's heads from src to dst, units [0, head) of each copied and the rest of a dst head zeroed:
// a thread per unit of a dst row (i = h * dst_head + j), rows over y.
template <class U>
__global__ void copy_heads_kernel(const U* src, int64_t src_ld, int src_head, U* dst,
                                  int64_t dst_ld, int dst_head, int head, int heads, int64_t rows) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= heads * dst_head) return;
  const int h = i / dst_head;
  const int j = i % dst_head;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    dst[r * dst_ld + i] = j < head ? src[r * src_ld + int64_t{h} * src_head + j] : U{};
  }
}

}  // namespace

void embedding(const int32_t* ids, int64_t tokens, const void* table, int64_t vocab_begin,
               int64_t vocab_end, int64_t width, DType dtype, void* out, cudaStream_t stream) {
  TPE_CUDA_REQUIRE(tokens >= 0 && width >= 0, "embedding", "negative size");
  TPE_CUDA_REQUIRE(vocab_begin <= vocab_end, "embedding", "vocab_begin past vocab_end");
  if (tokens == 0 || width == 0) return;
  const auto row_bytes = width * static_cast<int64_t>(dtype_size(dtype));
  dispatch_unit(
      row_bytes,
      [&](auto tag) {
        using U = typename decltype(tag)::type;
        const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
        embedding_kernel<<<token_grid(tokens, "embedding"), row_threads(units), 0, stream>>>(
            ids, static_cast<const U*>(table), vocab_begin, vocab_end, units, static_cast<U*>(out));
        TPE_CUDA_CHECK_LAUNCH();
      },
      table, out);
}

void gather_columns(const void* x, int64_t tokens, int64_t in_width, const int32_t* cols,
                    int64_t out_width, DType dtype, void* out, cudaStream_t stream) {
  TPE_CUDA_REQUIRE(tokens >= 0 && in_width >= 0 && out_width >= 0, "gather_columns",
                   "negative size");
  if (tokens == 0 || out_width == 0) return;
  const auto launch = [&](auto element) {
    using E = decltype(element);
    gather_columns_kernel<<<token_grid(tokens, "gather_columns"), row_threads(out_width), 0,
                            stream>>>(static_cast<const E*>(x), in_width, cols, out_width,
                                      static_cast<E*>(out));
    TPE_CUDA_CHECK_LAUNCH();
  };
  if (dtype_size(dtype) == 4) {
    launch(uint32_t{});
  } else {
    launch(uint16_t{});
  }
}

void kv_append(const void* k, const void* v, int64_t tokens, int64_t kv_width, const int32_t* slots,
               const int32_t* positions, void* k_cache, void* v_cache, int64_t max_len, DType dtype,
               cudaStream_t stream, int64_t k_ld, int64_t v_ld) {
  TPE_CUDA_REQUIRE(tokens >= 0 && kv_width >= 0 && max_len >= 0, "kv_append", "negative size");
  if (k_ld == 0) k_ld = kv_width;
  if (v_ld == 0) v_ld = kv_width;
  TPE_CUDA_REQUIRE(k_ld >= kv_width && v_ld >= kv_width, "kv_append",
                   "row stride below the row's width");
  if (tokens == 0 || kv_width == 0) return;
  const auto esize = static_cast<int64_t>(dtype_size(dtype));
  const auto row_bytes = kv_width * esize;
  // The unit must divide the strides too (they are or-ed into the alignment test).
  dispatch_unit(
      row_bytes | (k_ld * esize) | (v_ld * esize),
      [&](auto tag) {
        using U = typename decltype(tag)::type;
        const auto unit = static_cast<int64_t>(sizeof(U));
        const int64_t units = row_bytes / unit;
        kv_append_kernel<<<token_grid(tokens, "kv_append"), row_threads(units), 0, stream>>>(
            static_cast<const U*>(k), static_cast<const U*>(v), units, k_ld * esize / unit,
            v_ld * esize / unit, slots, positions, static_cast<U*>(k_cache),
            static_cast<U*>(v_cache), max_len);
        TPE_CUDA_CHECK_LAUNCH();
      },
      k, v, k_cache, v_cache);
}

void copy_heads(const void* src, int64_t src_ld, int64_t src_head, void* dst, int64_t dst_ld,
                int64_t dst_head, int64_t rows, int64_t heads, int64_t head_dim, DType dtype,
                cudaStream_t stream) {
  TPE_CUDA_REQUIRE(rows >= 0 && heads >= 0 && head_dim >= 0, "copy_heads", "negative size");
  TPE_CUDA_REQUIRE(src_head >= head_dim && dst_head >= head_dim && src_ld >= heads * src_head &&
                       dst_ld >= heads * dst_head,
                   "copy_heads", "a head or row stride below its width");
  TPE_CUDA_REQUIRE(heads * dst_head <= int64_t{0x7fffffff}, "copy_heads", "rows too wide");
  if (rows == 0 || heads == 0 || dst_head == 0) return;
  const auto esize = static_cast<int64_t>(dtype_size(dtype));
  dispatch_unit(
      esize * (src_ld | src_head | dst_ld | dst_head | head_dim),
      [&](auto tag) {
        using U = typename decltype(tag)::type;
        const auto unit = static_cast<int64_t>(sizeof(U)) / esize;  // elements per unit
        const int64_t row_units = heads * dst_head / unit;
        const dim3 grid(static_cast<unsigned>((row_units + 255) / 256),
                        static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
        copy_heads_kernel<<<grid, 256, 0, stream>>>(
            static_cast<const U*>(src), src_ld / unit, static_cast<int>(src_head / unit),
            static_cast<U*>(dst), dst_ld / unit, static_cast<int>(dst_head / unit),
            static_cast<int>(head_dim / unit), static_cast<int>(heads), rows);
        TPE_CUDA_CHECK_LAUNCH();
      },
      src, dst);
}

}  // namespace tpe::cuda
