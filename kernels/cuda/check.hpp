// Error checks for the CUDA runtime and cuBLASLt. Every failing call becomes a tpe::Error naming
// the file, the line, the call's text and the library's own description of the error, so that a
// fault on one rank's device unwinds that rank like any other engine error. The throwing
// functions live in check.cpp: the .cu files include this header without pulling fmt into nvcc.
#pragma once

#include <cuda_runtime_api.h>

namespace tpe::cuda::detail {

[[noreturn]] void throw_cuda_error(cudaError_t error, const char* call, const char* file, int line);
// status is a cublasStatus_t; taken as int so that kernel sources need not include cuBLASLt.
[[noreturn]] void throw_cublas_error(int status, const char* call, const char* file, int line);
// A caller's mistake (bad size, unknown dtype): tpe::Error "cuda::<op>: <message>".
[[noreturn]] void throw_bad_argument(const char* op, const char* message);

}  // namespace tpe::cuda::detail

#define TPE_CUDA_CHECK(call)                                                             \
  do {                                                                                   \
    const cudaError_t tpe_cuda_error_ = (call);                                          \
    if (tpe_cuda_error_ != cudaSuccess) {                                                \
      ::tpe::cuda::detail::throw_cuda_error(tpe_cuda_error_, #call, __FILE__, __LINE__); \
    }                                                                                    \
  } while (0)

// After a <<<...>>> launch: a bad configuration is reported by cudaGetLastError, not by the
// launch itself. Faults inside the kernel surface later, at the next synchronising call.
#define TPE_CUDA_CHECK_LAUNCH() TPE_CUDA_CHECK(cudaGetLastError())

#define TPE_CUBLAS_CHECK(call)                                                             \
  do {                                                                                     \
    const auto tpe_cublas_status_ = (call);                                                \
    if (tpe_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                     \
      ::tpe::cuda::detail::throw_cublas_error(static_cast<int>(tpe_cublas_status_), #call, \
                                              __FILE__, __LINE__);                         \
    }                                                                                      \
  } while (0)

// Argument checks at the API boundary, before anything is enqueued.
#define TPE_CUDA_REQUIRE(cond, op, message)                            \
  do {                                                                 \
    if (!(cond)) ::tpe::cuda::detail::throw_bad_argument(op, message); \
  } while (0)
