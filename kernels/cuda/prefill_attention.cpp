// prefill_attention: a sequence's chunk of queries on tensor cores, through FlashInfer's Hopper
// kernel (kernels/cuda/flashinfer) where the build and the device have it.
#include <cuda_runtime_api.h>

#include <algorithm>

#include "kernels/cuda/check.hpp"
#include "kernels/cuda/ops.hpp"
#if TPE_HAVE_FLASHINFER_SM90
#include "kernels/cuda/flashinfer/sm90_prefill.hpp"
#endif

namespace tpe::cuda {

namespace {

// The kernel's head width for heads of head_dim: the narrowest of its widths that holds them.
int64_t kernel_width(int64_t head_dim) {
  for (const int64_t w : {int64_t{64}, int64_t{128}, int64_t{256}}) {
    if (head_dim <= w) return w;
  }
  return 0;
}

// Whether q, k, v and the output go through padded copies: heads of another width, or q rows
// that TMA cannot load in place (not on the 16-byte grid).
bool padded(int64_t head_dim, int64_t q_ld) {
  return kernel_width(head_dim) != head_dim || q_ld % 8 != 0;
}

}  // namespace

bool prefill_attention_supported(DType dtype, int64_t head_dim) {
#if TPE_HAVE_FLASHINFER_SM90
  // sm_90a code runs on compute capability 9.0 only.
  static const bool hopper = [] {
    int device = 0;
    int major = 0;
    int minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
      return false;
    }
    return major == 9 && minor == 0;
  }();
  return hopper && dtype != DType::kF32 && head_dim > 0 && kernel_width(head_dim) > 0;
#else
  (void)dtype;
  (void)head_dim;
  return false;
#endif
}

size_t prefill_attention_scratch_bytes(int64_t q_ld, int64_t count, int64_t n_q, int64_t head_dim,
                                       int64_t start_pos, int64_t n_kv, DType dtype) {
  if (q_ld == 0) q_ld = n_q * head_dim;
  if (!padded(head_dim, q_ld)) return 0;
  const int64_t w = kernel_width(head_dim);
  // q and the output, then the keys and the values of positions [0, start_pos + count).
  const int64_t elements = 2 * count * n_q * w + 2 * (start_pos + count) * n_kv * w;
  return static_cast<size_t>(elements) * dtype_size(dtype);
}

void prefill_attention(const void* q, int64_t q_ld, int64_t count, int64_t n_q, int64_t head_dim,
                       int64_t slot, int64_t start_pos, const void* k_cache, const void* v_cache,
                       int64_t max_len, int64_t n_kv, int64_t first_q, int64_t group,
                       int64_t first_kv, float scale, int64_t window, DType dtype, void* out,
                       cudaStream_t stream, void* scratch) {
  if (q_ld == 0) q_ld = n_q * head_dim;
  TPE_CUDA_REQUIRE(prefill_attention_supported(dtype, head_dim), "prefill_attention",
                   "not available for this dtype, head_dim or device");
  TPE_CUDA_REQUIRE(count >= 0 && start_pos >= 0 && slot >= 0 && window >= 0 && n_q >= 0,
                   "prefill_attention", "negative size");
  TPE_CUDA_REQUIRE(start_pos + count <= max_len && start_pos + count <= int64_t{0x7fffffff},
                   "prefill_attention", "the chunk ends past the cache");
  TPE_CUDA_REQUIRE(q_ld >= n_q * head_dim, "prefill_attention", "q's row stride below its width");
  TPE_CUDA_REQUIRE(group > 0 && n_kv > 0 && first_q >= 0, "prefill_attention",
                   "group and n_kv must be positive, first_q not negative");
  if (count == 0 || n_q == 0) return;
  TPE_CUDA_REQUIRE(first_q / group - first_kv >= 0 && (first_q + n_q - 1) / group - first_kv < n_kv,
                   "prefill_attention", "a local q head maps outside the local kv heads");
  const bool pad = padded(head_dim, q_ld);
  TPE_CUDA_REQUIRE(!pad || scratch != nullptr, "prefill_attention",
                   "these heads need scratch (prefill_attention_scratch_bytes)");
#if TPE_HAVE_FLASHINFER_SM90
  const int64_t e = static_cast<int64_t>(dtype_size(dtype));
  const int64_t kv_width = n_kv * head_dim;
  const int64_t kv_len = start_pos + count;
  const char* k_slot = static_cast<const char*>(k_cache) + slot * max_len * kv_width * e;
  const char* v_slot = static_cast<const char*>(v_cache) + slot * max_len * kv_width * e;
  // What the kernel reads and writes: the inputs in place, or their padded copies.
  const int64_t w = pad ? kernel_width(head_dim) : head_dim;
  const char* q_in = static_cast<const char*>(q);
  const char* k_in = k_slot;
  const char* v_in = v_slot;
  char* o_out = static_cast<char*>(out);
  int64_t q_row = q_ld;
  int64_t o_row = n_q * head_dim;
  int64_t kv_row = kv_width;
  if (pad) {
    char* q_pad = static_cast<char*>(scratch);
    char* o_pad = q_pad + count * n_q * w * e;
    char* k_pad = o_pad + count * n_q * w * e;
    char* v_pad = k_pad + kv_len * n_kv * w * e;
    copy_heads(q, q_ld, head_dim, q_pad, n_q * w, w, count, n_q, head_dim, dtype, stream);
    copy_heads(k_slot, kv_width, head_dim, k_pad, n_kv * w, w, kv_len, n_kv, head_dim, dtype,
               stream);
    copy_heads(v_slot, kv_width, head_dim, v_pad, n_kv * w, w, kv_len, n_kv, head_dim, dtype,
               stream);
    q_in = q_pad;
    k_in = k_pad;
    v_in = v_pad;
    o_out = o_pad;
    q_row = o_row = n_q * w;
    kv_row = n_kv * w;
  }
  flashinfer_sm90::PrefillArgs a;
  a.q_stride_n = q_row;
  a.q_stride_h = w;
  a.kv_stride_n = kv_row;
  a.kv_stride_h = w;
  a.o_stride_n = o_row;
  a.o_stride_h = w;
  a.qo_len = static_cast<int>(count);
  a.kv_len = static_cast<int>(kv_len);
  a.window_left = window > 0 ? static_cast<int>(window - 1) : -1;
  a.sm_scale = scale;
  auto run = [&](int64_t q_head, int64_t q_heads, int64_t kv_head, int64_t kv_heads) {
    a.q = q_in + q_head * w * e;
    a.o = o_out + q_head * w * e;
    a.k = k_in + kv_head * w * e;
    a.v = v_in + kv_head * w * e;
    a.num_qo_heads = static_cast<int>(q_heads);
    a.num_kv_heads = static_cast<int>(kv_heads);
    cudaError_t status = cudaErrorNotSupported;
    switch (w) {
      case 64:
        status = flashinfer_sm90::prefill<64>(a, dtype, stream);
        break;
      case 128:
        status = flashinfer_sm90::prefill<128>(a, dtype, stream);
        break;
      case 256:
        status = flashinfer_sm90::prefill<256>(a, dtype, stream);
        break;
      default:
        break;
    }
    TPE_CUDA_CHECK(status);
  };
  // FlashInfer maps q head h to kv head h / (q heads / kv heads): one call when the rank's q heads
  // are whole groups over exactly its kv heads, else one call per kv head and its q heads.
  if (first_q % group == 0 && n_q % group == 0 && first_q / group == first_kv &&
      n_q / group == n_kv) {
    run(0, n_q, 0, n_kv);
  } else {
    for (int64_t kv = 0; kv < n_kv; ++kv) {
      const int64_t lo = std::max<int64_t>(0, (kv + first_kv) * group - first_q);
      const int64_t hi = std::min<int64_t>(n_q, (kv + first_kv + 1) * group - first_q);
      if (lo < hi) run(lo, hi - lo, kv, 1);
    }
  }
  if (pad) {
    copy_heads(o_out, n_q * w, w, out, n_q * head_dim, head_dim, count, n_q, head_dim, dtype,
               stream);
  }
#else
  (void)q;
  (void)slot;
  (void)k_cache;
  (void)v_cache;
  (void)scale;
  (void)out;
  (void)stream;
#endif
}

}  // namespace tpe::cuda
