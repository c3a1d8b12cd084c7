// FlashInfer's Hopper prefill for head_dim 128 (one head dim per file: they compile in parallel).
#include "kernels/cuda/flashinfer/sm90_prefill.cuh"

template cudaError_t tpe::cuda::flashinfer_sm90::prefill<128>(const PrefillArgs&, DType,
                                                              cudaStream_t);
