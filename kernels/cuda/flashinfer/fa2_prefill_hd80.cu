// FlashInfer's FlashAttention-2 prefill for head_dim 80 (fa2_prefill.cuh).
#include "kernels/cuda/flashinfer/fa2_prefill.cuh"

template cudaError_t tpe::cuda::fi::fa2_prefill<80>(const PrefillArgs&, DType, cudaStream_t);
