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

bool prefill_attention_supported(DType dtype, int64_t head_dim, int64_t q_ld) {
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
  // The kernel loads q, k and v by TMA: rows a multiple of 16 bytes.
  return hopper && dtype != DType::kF32 && (head_dim == 64 || head_dim == 128 || head_dim == 256) &&
         q_ld % 8 == 0;
#else
  (void)dtype;
  (void)head_dim;
  (void)q_ld;
  return false;
#endif
}

void prefill_attention(const void* q, int64_t q_ld, int64_t count, int64_t n_q, int64_t head_dim,
                       int64_t slot, int64_t start_pos, const void* k_cache, const void* v_cache,
                       int64_t max_len, int64_t n_kv, int64_t first_q, int64_t group,
                       int64_t first_kv, float scale, int64_t window, DType dtype, void* out,
                       cudaStream_t stream) {
  if (q_ld == 0) q_ld = n_q * head_dim;
  TPE_CUDA_REQUIRE(prefill_attention_supported(dtype, head_dim, q_ld), "prefill_attention",
                   "not available for this dtype, head_dim, row stride or device");
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
#if TPE_HAVE_FLASHINFER_SM90
  const int64_t e = static_cast<int64_t>(dtype_size(dtype));
  const int64_t kv_width = n_kv * head_dim;
  const int64_t slot_offset = slot * max_len * kv_width * e;
  flashinfer_sm90::PrefillArgs a;
  a.q_stride_n = q_ld;
  a.q_stride_h = head_dim;
  a.kv_stride_n = kv_width;
  a.kv_stride_h = head_dim;
  a.o_stride_n = n_q * head_dim;
  a.o_stride_h = head_dim;
  a.qo_len = static_cast<int>(count);
  a.kv_len = static_cast<int>(start_pos + count);
  a.window_left = window > 0 ? static_cast<int>(window - 1) : -1;
  a.sm_scale = scale;
  auto run = [&](int64_t q_head, int64_t q_heads, int64_t kv_head, int64_t kv_heads) {
    a.q = static_cast<const char*>(q) + q_head * head_dim * e;
    a.o = static_cast<char*>(out) + q_head * head_dim * e;
    a.k = static_cast<const char*>(k_cache) + slot_offset + kv_head * head_dim * e;
    a.v = static_cast<const char*>(v_cache) + slot_offset + kv_head * head_dim * e;
    a.num_qo_heads = static_cast<int>(q_heads);
    a.num_kv_heads = static_cast<int>(kv_heads);
    cudaError_t status = cudaErrorNotSupported;
    switch (head_dim) {
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
    return;
  }
  for (int64_t kv = 0; kv < n_kv; ++kv) {
    const int64_t lo = std::max<int64_t>(0, (kv + first_kv) * group - first_q);
    const int64_t hi = std::min<int64_t>(n_q, (kv + first_kv + 1) * group - first_q);
    if (lo < hi) run(lo, hi - lo, kv, 1);
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
