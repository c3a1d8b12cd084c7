// tests/gpu/flashinfer_decode.hpp on FlashInfer's headers (tools/fetch-flashinfer.sh): its
// DecodePlan and BatchDecodeWithPagedKVCacheDispatched, called as its own bindings call them.
#include <flashinfer/attention/decode.cuh>
#include <flashinfer/attention/default_decode_params.cuh>
#include <flashinfer/attention/scheduler.cuh>
#include <flashinfer/attention/variants.cuh>

#include <stdexcept>
#include <vector>

#include "tests/gpu/flashinfer_decode.hpp"

namespace tpe::bench {
namespace {

using Params = flashinfer::BatchDecodeParams<nv_bfloat16, nv_bfloat16, nv_bfloat16, int32_t>;
using Variant = flashinfer::DefaultAttention</*custom_mask=*/false, /*sliding_window=*/false,
                                             /*soft_cap=*/false, /*alibi=*/false>;
constexpr uint32_t kHeadDim = 128;
constexpr uint32_t kPage = 16;
constexpr auto kNoRope = flashinfer::PosEncodingMode::kNone;
constexpr size_t kFloatWorkspace = size_t{128} << 20;  // FlashInfer's own default
constexpr size_t kIntWorkspace = size_t{8} << 20;

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("FlashInfer decode: ") + what + ": " +
                             cudaGetErrorString(error));
  }
}

}  // namespace

struct FlashInferDecode::Impl {
  int64_t seqs = 0;
  int64_t n_q = 0;
  int64_t n_kv = 0;
  float scale = 0.0f;
  flashinfer::DecodePlanInfo info;
  void* float_ws = nullptr;
  void* int_ws = nullptr;
  void* host_ws = nullptr;    // page-locked: the plan's tables on their way to int_ws
  int32_t* tables = nullptr;  // indptr [seqs + 1], indices [pages], last_page_len [seqs]
  int64_t pages = 0;

  ~Impl() {
    cudaFree(float_ws);
    cudaFree(int_ws);
    cudaFreeHost(host_ws);
    cudaFree(tables);
  }
};

FlashInferDecode::FlashInferDecode(int64_t seqs, int64_t ctx, int64_t n_q, int64_t n_kv,
                                   float scale, cudaStream_t stream)
    : impl_(std::make_unique<Impl>()) {
  if (seqs <= 0 || ctx <= 0 || ctx % kPage != 0 || n_kv <= 0 || n_q % n_kv != 0) {
    throw std::invalid_argument(
        "FlashInfer decode: sequences, a context of whole pages of 16, "
        "and q heads a multiple of kv heads");
  }
  Impl& m = *impl_;
  m.seqs = seqs;
  m.n_q = n_q;
  m.n_kv = n_kv;
  m.scale = scale;
  const int64_t per_seq = ctx / kPage;
  m.pages = seqs * per_seq;
  // Sequence s's pages are its rows of the cache in order: page s * per_seq + p.
  std::vector<int32_t> tables;
  for (int64_t s = 0; s <= seqs; ++s) tables.push_back(static_cast<int32_t>(s * per_seq));
  for (int64_t p = 0; p < m.pages; ++p) tables.push_back(static_cast<int32_t>(p));
  for (int64_t s = 0; s < seqs; ++s) tables.push_back(static_cast<int32_t>(kPage));
  check(cudaMalloc(&m.tables, tables.size() * sizeof(int32_t)), "cudaMalloc");
  check(
      cudaMemcpy(m.tables, tables.data(), tables.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
      "cudaMemcpy");
  check(cudaMalloc(&m.float_ws, kFloatWorkspace), "cudaMalloc");
  check(cudaMalloc(&m.int_ws, kIntWorkspace), "cudaMalloc");
  check(cudaMallocHost(&m.host_ws, kIntWorkspace), "cudaMallocHost");
  std::vector<int32_t> indptr(tables.begin(), tables.begin() + seqs + 1);
  cudaError_t status = cudaSuccess;
  DISPATCH_GQA_GROUP_SIZE(static_cast<uint32_t>(n_q / n_kv), kGroup, {
    status = flashinfer::DecodePlan<kHeadDim, kNoRope, Variant, Params>(
        m.float_ws, kFloatWorkspace, m.int_ws, m.host_ws, kIntWorkspace, m.info, indptr.data(),
        static_cast<uint32_t>(seqs), static_cast<uint32_t>(n_q), kPage,
        /*enable_cuda_graph=*/true, stream,
        flashinfer::BatchDecodeWithPagedKVCacheWorkEstimationDispatched<kGroup, kHeadDim, kNoRope,
                                                                        Variant, Params>);
  });
  check(status, "plan");
  check(cudaStreamSynchronize(stream), "plan");
}

FlashInferDecode::~FlashInferDecode() = default;

void FlashInferDecode::run(const void* q, const void* k_cache, const void* v_cache, void* out,
                           cudaStream_t stream) const {
  const Impl& m = *impl_;
  using flashinfer::GetPtrFromBaseOffset;
  int32_t* indptr = m.tables;
  int32_t* indices = indptr + m.seqs + 1;
  int32_t* last_page_len = indices + m.pages;
  flashinfer::paged_kv_t<nv_bfloat16, int32_t> kv(
      static_cast<uint32_t>(m.n_kv), kPage, kHeadDim, static_cast<uint32_t>(m.seqs),
      flashinfer::QKVLayout::kNHD,
      const_cast<nv_bfloat16*>(static_cast<const nv_bfloat16*>(k_cache)),
      const_cast<nv_bfloat16*>(static_cast<const nv_bfloat16*>(v_cache)), indices, indptr,
      last_page_len);
  Params p(const_cast<nv_bfloat16*>(static_cast<const nv_bfloat16*>(q)), nullptr, kv,
           static_cast<nv_bfloat16*>(out), nullptr, nullptr, static_cast<uint32_t>(m.n_q),
           static_cast<int32_t>(m.n_q * kHeadDim), static_cast<int32_t>(kHeadDim),
           /*window_left=*/-1, /*logits_soft_cap=*/0.0f, m.scale, /*rope_scale=*/1.0f,
           /*rope_theta=*/1e4f);
  p.request_indices = GetPtrFromBaseOffset<int32_t>(m.int_ws, m.info.request_indices_offset);
  p.kv_tile_indices = GetPtrFromBaseOffset<int32_t>(m.int_ws, m.info.kv_tile_indices_offset);
  p.o_indptr = GetPtrFromBaseOffset<int32_t>(m.int_ws, m.info.o_indptr_offset);
  p.kv_chunk_size_ptr = GetPtrFromBaseOffset<int32_t>(m.int_ws, m.info.kv_chunk_size_ptr_offset);
  nv_bfloat16* tmp_v = nullptr;
  float* tmp_s = nullptr;
  if (m.info.split_kv) {
    tmp_v = GetPtrFromBaseOffset<nv_bfloat16>(m.float_ws, m.info.v_offset);
    tmp_s = GetPtrFromBaseOffset<float>(m.float_ws, m.info.s_offset);
    p.block_valid_mask = GetPtrFromBaseOffset<bool>(m.int_ws, m.info.block_valid_mask_offset);
  }
  p.padded_batch_size = static_cast<uint32_t>(m.info.padded_batch_size);
  check(flashinfer::BatchDecodeWithPagedKVCacheDispatched<kHeadDim, kNoRope, Variant>(
            p, tmp_v, tmp_s, /*enable_pdl=*/false, stream),
        "run");
}

std::string FlashInferDecode::plan() const {
  return std::to_string(impl_->info.padded_batch_size) + " x " + std::to_string(impl_->n_kv) +
         " blocks" + (impl_->info.split_kv ? ", KV split" : "");
}

}  // namespace tpe::bench
