#include "kernels/cuda/check.hpp"

#include <cublasLt.h>

#include "core/common/error.hpp"

namespace tpe::cuda::detail {

void throw_cuda_error(cudaError_t error, const char* call, const char* file, int line) {
  fail("CUDA error at {}:{}: {} failed: {} ({})", file, line, call, cudaGetErrorString(error),
       cudaGetErrorName(error));
}

void throw_cublas_error(int status, const char* call, const char* file, int line) {
  const auto code = static_cast<cublasStatus_t>(status);
  fail("cuBLASLt error at {}:{}: {} failed: {} ({})", file, line, call,
       cublasLtGetStatusString(code), cublasLtGetStatusName(code));
}

void throw_bad_argument(const char* op, const char* message) { fail("cuda::{}: {}", op, message); }

}  // namespace tpe::cuda::detail
