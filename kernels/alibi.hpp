// ALiBi's per-head slopes (Press et al.; BLOOM's build_alibi_tensor, MPT's gen_slopes), shared by
// the CPU reference and the CUDA kernels so that both compute the same bias.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TPE_HOST_DEVICE __host__ __device__
#else
#define TPE_HOST_DEVICE
#endif

namespace tpe {

// The slope of query head `head` of `n_heads`, whose largest bias is max_bias (8 in the paper):
// the n = 2^k heads of the power of two at or below n_heads take 2^(-max_bias * (h + 1) / n);
// the heads past them take the odd powers of the next power of two's, 2^(-max_bias * (2 j + 1) /
// (2 n)) for j = head - n.
TPE_HOST_DEVICE inline float alibi_slope(int64_t head, int64_t n_heads, float max_bias) {
  int64_t n = 1;
  while (n * 2 <= n_heads) n *= 2;
  const float exponent = head < n
                             ? static_cast<float>(head + 1) / static_cast<float>(n)
                             : static_cast<float>(2 * (head - n) + 1) / static_cast<float>(2 * n);
  return exp2f(-max_bias * exponent);
}

}  // namespace tpe
