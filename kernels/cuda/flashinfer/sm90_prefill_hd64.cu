// FlashInfer's Hopper prefill for head_dim 64 (one head dim per file: they compile in parallel).
#include "kernels/cuda/flashinfer/sm90_prefill.cuh"

template cudaError_t tpe::cuda::flashinfer_sm90::prefill<64>(const PrefillArgs&, DType,
                                                             cudaStream_t);
