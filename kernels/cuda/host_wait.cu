// A kernel that holds its stream until the host says go: the work queued behind it then runs
// back to back, without gaps for the host's launches, so that events between ops time the
// device's work alone (tpengine bench --profile).
#include "kernels/cuda/device.hpp"

namespace tpe::cuda {
namespace {

__global__ void wait_for_host_kernel(const volatile int* flag) {
  while (*flag == 0) __nanosleep(1000);
}

}  // namespace

void wait_for_host(const volatile int* flag, cudaStream_t stream) {
  wait_for_host_kernel<<<1, 1, 0, stream>>>(flag);
  TPE_CUDA_CHECK_LAUNCH();
}

}  // namespace tpe::cuda
