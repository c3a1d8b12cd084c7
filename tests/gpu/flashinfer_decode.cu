// tests/gpu/flashinfer_decode.hpp on FlashInfer's headers (tools/fetch-flashinfer.sh): its
// DecodePlan / PrefillPlan and BatchDecodeWithPagedKVCacheDispatched /
// BatchPrefillWithPagedKVCacheDispatched, called as its own bindings call them.
#include <flashinfer/attention/decode.cuh>
#include <flashinfer/attention/default_decode_params.cuh>
#include <flashinfer/attention/default_prefill_params.cuh>
#include <flashinfer/attention/prefill.cuh>
#include <flashinfer/attention/scheduler.cuh>
#include <flashinfer/attention/variants.cuh>

#include <stdexcept>
#include <vector>

#include "tests/gpu/flashinfer_decode.hpp"

namespace tpe::bench {
namespace {

using flashinfer::GetPtrFromBaseOffset;
using DecodeParams = flashinfer::BatchDecodeParams<nv_bfloat16, nv_bfloat16, nv_bfloat16, int32_t>;
using PrefillParams =
    flashinfer::BatchPrefillPagedParams<nv_bfloat16, nv_bfloat16, nv_bfloat16, int32_t>;
using Variant = flashinfer::DefaultAttention</*custom_mask=*/false, /*sliding_window=*/false,
                                             /*soft_cap=*/false, /*alibi=*/false>;
constexpr uint32_t kHeadDim = 128;
constexpr uint32_t kPage = 16;
constexpr uint32_t kQTile = 16;  // what PrefillPlan picks for one query per sequence
constexpr auto kNoRope = flashinfer::PosEncodingMode::kNone;
constexpr size_t kFloatWorkspace = size_t{128} << 20;  // FlashInfer's own default
constexpr size_t kIntWorkspace = size_t{8} << 20;

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("FlashInfer decode: ") + what + ": " +
                             cudaGetErrorString(error));
  }
}

nv_bfloat16* bf16(const void* p) {
  return const_cast<nv_bfloat16*>(static_cast<const nv_bfloat16*>(p));
}

}  // namespace

struct FlashInferDecode::Impl {
  int64_t seqs = 0;
  int64_t n_q = 0;
  int64_t n_kv = 0;
  float scale = 0.0f;
  bool tensor_cores = false;
  flashinfer::DecodePlanInfo decode;
  flashinfer::PrefillPlanInfo prefill;
  void* float_ws = nullptr;
  void* int_ws = nullptr;
  void* host_ws = nullptr;  // page-locked: the plan's tables on their way to int_ws
  // kv indptr [seqs + 1], page indices [pages], last page lengths [seqs], q indptr [seqs + 1]
  int32_t* tables = nullptr;
  int64_t pages = 0;

  ~Impl() {
    cudaFree(float_ws);
    cudaFree(int_ws);
    cudaFreeHost(host_ws);
    cudaFree(tables);
  }
  int32_t* kv_indptr() const { return tables; }
  int32_t* indices() const { return tables + seqs + 1; }
  int32_t* last_page_len() const { return indices() + pages; }
  int32_t* q_indptr() const { return last_page_len() + seqs; }
  flashinfer::paged_kv_t<nv_bfloat16, int32_t> kv(const void* k, const void* v) const {
    return {static_cast<uint32_t>(n_kv),
            kPage,
            kHeadDim,
            static_cast<uint32_t>(seqs),
            flashinfer::QKVLayout::kNHD,
            bf16(k),
            bf16(v),
            indices(),
            kv_indptr(),
            last_page_len()};
  }
};

namespace {

// The partial results of a split plan.
struct Scratch {
  nv_bfloat16* v = nullptr;
  float* s = nullptr;
};

// What either plan hands either kernel's params: its tables in int_ws, its grid, and with a split
// KV the mask of the grid's live rows and the scratch of the partial results.
template <class Params, class Info>
Scratch take_plan(Params& p, const Info& info, void* int_ws, void* float_ws) {
  p.request_indices = GetPtrFromBaseOffset<int32_t>(int_ws, info.request_indices_offset);
  p.kv_tile_indices = GetPtrFromBaseOffset<int32_t>(int_ws, info.kv_tile_indices_offset);
  p.o_indptr = GetPtrFromBaseOffset<int32_t>(int_ws, info.o_indptr_offset);
  p.kv_chunk_size_ptr = GetPtrFromBaseOffset<int32_t>(int_ws, info.kv_chunk_size_ptr_offset);
  p.padded_batch_size = static_cast<uint32_t>(info.padded_batch_size);
  Scratch tmp;
  if (info.split_kv) {
    tmp.v = GetPtrFromBaseOffset<nv_bfloat16>(float_ws, info.v_offset);
    tmp.s = GetPtrFromBaseOffset<float>(float_ws, info.s_offset);
    p.block_valid_mask = GetPtrFromBaseOffset<bool>(int_ws, info.block_valid_mask_offset);
  }
  return tmp;
}

}  // namespace

FlashInferDecode::FlashInferDecode(int64_t seqs, int64_t ctx, int64_t n_q, int64_t n_kv,
                                   float scale, bool tensor_cores, cudaStream_t stream)
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
  m.tensor_cores = tensor_cores;
  const int64_t per_seq = ctx / kPage;
  m.pages = seqs * per_seq;
  // Sequence s's pages are its rows of the cache in order: page s * per_seq + p.
  std::vector<int32_t> tables;
  for (int64_t s = 0; s <= seqs; ++s) tables.push_back(static_cast<int32_t>(s * per_seq));
  for (int64_t p = 0; p < m.pages; ++p) tables.push_back(static_cast<int32_t>(p));
  for (int64_t s = 0; s < seqs; ++s) tables.push_back(static_cast<int32_t>(kPage));
  for (int64_t s = 0; s <= seqs; ++s) tables.push_back(static_cast<int32_t>(s));
  check(cudaMalloc(&m.tables, tables.size() * sizeof(int32_t)), "cudaMalloc");
  check(
      cudaMemcpy(m.tables, tables.data(), tables.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
      "cudaMemcpy");
  check(cudaMalloc(&m.float_ws, kFloatWorkspace), "cudaMalloc");
  check(cudaMalloc(&m.int_ws, kIntWorkspace), "cudaMalloc");
  check(cudaMallocHost(&m.host_ws, kIntWorkspace), "cudaMallocHost");
  std::vector<int32_t> kv_indptr(tables.begin(), tables.begin() + seqs + 1);
  std::vector<int32_t> q_indptr(tables.end() - (seqs + 1), tables.end());
  const auto batch = static_cast<uint32_t>(seqs);
  cudaError_t status = cudaSuccess;
  if (tensor_cores) {
    status = flashinfer::PrefillPlan<int32_t>(
        m.float_ws, kFloatWorkspace, m.int_ws, m.host_ws, kIntWorkspace, m.prefill, q_indptr.data(),
        kv_indptr.data(), /*total_num_rows=*/batch, batch, static_cast<uint32_t>(n_q),
        static_cast<uint32_t>(n_kv), kHeadDim, kHeadDim, kPage,
        /*enable_cuda_graph=*/true, /*sizeof_dtype_o=*/2, /*window_left=*/-1,
        /*fixed_split_size=*/-1, /*disable_split_kv=*/false, /*num_colocated_ctas=*/0,
        /*uniform_q_len=*/1, /*fixed_uniform_q_len=*/true, stream);
    check(status, "plan");
    if (m.prefill.cta_tile_q != kQTile) {
      throw std::runtime_error("FlashInfer decode: the plan wants query tiles of " +
                               std::to_string(m.prefill.cta_tile_q) + ", built for 16");
    }
  } else {
    DISPATCH_GQA_GROUP_SIZE(static_cast<uint32_t>(n_q / n_kv), kGroup, {
      status = flashinfer::DecodePlan<kHeadDim, kNoRope, Variant, DecodeParams>(
          m.float_ws, kFloatWorkspace, m.int_ws, m.host_ws, kIntWorkspace, m.decode,
          kv_indptr.data(), batch, static_cast<uint32_t>(n_q), kPage, /*enable_cuda_graph=*/true,
          stream,
          flashinfer::BatchDecodeWithPagedKVCacheWorkEstimationDispatched<kGroup, kHeadDim, kNoRope,
                                                                          Variant, DecodeParams>);
    });
    check(status, "plan");
  }
  check(cudaStreamSynchronize(stream), "plan");
}

FlashInferDecode::~FlashInferDecode() = default;

void FlashInferDecode::run(const void* q, const void* k_cache, const void* v_cache, void* out,
                           cudaStream_t stream) const {
  const Impl& m = *impl_;
  const auto n_q = static_cast<uint32_t>(m.n_q);
  const auto q_stride_n = static_cast<int32_t>(m.n_q * kHeadDim);
  const auto q_stride_h = static_cast<int32_t>(kHeadDim);
  if (m.tensor_cores) {
    const flashinfer::PrefillPlanInfo& info = m.prefill;
    PrefillParams p(bf16(q), m.kv(k_cache, v_cache), nullptr, m.q_indptr(), nullptr, nullptr,
                    static_cast<nv_bfloat16*>(out), nullptr, nullptr, n_q, q_stride_n, q_stride_h,
                    /*window_left=*/-1, /*logits_soft_cap=*/0.0f, m.scale, /*rope_scale=*/1.0f,
                    /*rope_theta=*/1e4f);
    p.qo_tile_indices = GetPtrFromBaseOffset<int32_t>(m.int_ws, info.qo_tile_indices_offset);
    if (info.split_kv) {
      p.merge_indptr = GetPtrFromBaseOffset<int32_t>(m.int_ws, info.merge_indptr_offset);
    }
    const Scratch tmp = take_plan(p, info, m.int_ws, m.float_ws);
    p.max_total_num_rows = static_cast<uint32_t>(info.total_num_rows);
    p.total_num_rows = GetPtrFromBaseOffset<uint32_t>(m.int_ws, info.total_num_rows_offset);
    check(flashinfer::BatchPrefillWithPagedKVCacheDispatched<
              /*SAME_KV_STRIDES=*/true, kQTile, kHeadDim, kHeadDim, kNoRope,
              /*USE_FP16_QK_REDUCTION=*/false, flashinfer::MaskMode::kNone,
              /*USE_TOKEN_HEAD_SF=*/false, Variant>(p, tmp.v, tmp.s, /*enable_pdl=*/false, stream),
          "run");
    return;
  }
  const flashinfer::DecodePlanInfo& info = m.decode;
  DecodeParams p(bf16(q), nullptr, m.kv(k_cache, v_cache), static_cast<nv_bfloat16*>(out), nullptr,
                 nullptr, n_q, q_stride_n, q_stride_h, /*window_left=*/-1,
                 /*logits_soft_cap=*/0.0f, m.scale, /*rope_scale=*/1.0f, /*rope_theta=*/1e4f);
  const Scratch tmp = take_plan(p, info, m.int_ws, m.float_ws);
  check(flashinfer::BatchDecodeWithPagedKVCacheDispatched<kHeadDim, kNoRope, Variant>(
            p, tmp.v, tmp.s, /*enable_pdl=*/false, stream),
        "run");
}

std::string FlashInferDecode::plan() const {
  const Impl& m = *impl_;
  const int64_t rows = m.tensor_cores ? m.prefill.padded_batch_size : m.decode.padded_batch_size;
  const bool split = m.tensor_cores ? m.prefill.split_kv : m.decode.split_kv;
  return std::string(m.tensor_cores ? "tensor cores, " : "CUDA cores, ") + std::to_string(rows) +
         " x " + std::to_string(m.n_kv) + " blocks" + (split ? ", KV split" : "");
}

}  // namespace tpe::bench
