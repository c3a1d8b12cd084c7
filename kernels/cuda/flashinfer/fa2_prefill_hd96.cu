// FlashInfer's FlashAttention-2 prefill for head_dim 96 (fa2_prefill.cuh).
#include "kernels/cuda/flashinfer/fa2_prefill.cuh"

template cudaError_t tpe::cuda::fi::fa2_prefill<96>(const PrefillArgs&, DType, cudaStream_t);
