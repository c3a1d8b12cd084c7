// The linear layers through cuBLASLt. Row-major y[tokens, out] = x[tokens, in] · w[out, in]^T is
// the column-major product y^T[out, tokens] = w^T · x^T where w, seen column-major, is an
// [in, out] matrix with leading dimension `in` (so op(A) = transpose) and x is [in, tokens]: the
// "TN" layout, the one cuBLASLt serves best. Compute is fp32 for every input type (for fp32 the
// plain CUBLAS_COMPUTE_32F, never TF32), and the bias, whose type cuBLASLt takes to be the output
// type, is added in the epilogue before the single rounding to the model dtype. So is an
// activation (the fused path's linear_activation) where cuBLASLt's epilogue computes it: its
// GELU is the tanh approximation, and it has ReLU; the others (exact GELU, SiLU) run as the
// activation kernel over y afterwards, on the rounded product as the plain path does. The GEMV
// kernel below applies every activation in its own epilogue.
//
// Decode products go to the GEMV kernel of gemv.cu instead where it beat cuBLASLt on an H200:
// f16/bf16 with 1 or 2 tokens, f32 with up to 8 (README.md has the timings).
// TPE_GEMM_FORCE_CUBLASLT=1 in the environment when a Gemm is constructed sends every product of
// that instance to cuBLASLt (for comparisons).
#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>

#include "core/common/error.hpp"
#include "kernels/cuda/check.hpp"
#include "kernels/cuda/ops.hpp"

namespace tpe::cuda {
namespace detail {
// gemv.cu: enqueues y = x · w^T (+ bias) and returns true for the products it serves better than
// cuBLASLt (f16/bf16 with 1 or 2 tokens, f32 with up to 8); returns false, enqueuing nothing,
// otherwise.
bool gemv(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out, const void* bias,
          std::optional<tpe_activation> act, DType dtype, void* y, cudaStream_t stream);
}  // namespace detail

namespace {

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* p) const { cublasLtMatmulDescDestroy(p); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* p) const { cublasLtMatrixLayoutDestroy(p); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, MatmulDescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter>;

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kBF16:
      return CUDA_R_16BF;
  }
  fail("cuda::Gemm: unknown dtype");
}

// The epilogue that adds the bias (if any) and applies act (if any and cuBLASLt has it), and
// whether it applies act.
std::pair<cublasLtEpilogue_t, bool> epilogue_for(bool bias, std::optional<tpe_activation> act) {
  if (act == TPE_ACT_GELU_TANH) {
    return {bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU, true};
  }
  if (act == TPE_ACT_RELU)
    return {bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU, true};
  return {bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, false};
}

bool adds_bias(cublasLtEpilogue_t epilogue) {
  return epilogue == CUBLASLT_EPILOGUE_BIAS || epilogue == CUBLASLT_EPILOGUE_GELU_BIAS ||
         epilogue == CUBLASLT_EPILOGUE_RELU_BIAS;
}

// The largest power of two up to 256 dividing the address. cuBLASLt assumes 256-byte aligned
// operands unless told otherwise; slices of a tensor may be less aligned.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  return address == 0 ? 256u : static_cast<uint32_t>(std::min<uintptr_t>(address & -address, 256));
}

Layout make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  TPE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(rows),
                                              static_cast<uint64_t>(cols), ld));
  return Layout(layout);
}

template <class V>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute,
                   const V& value) {
  TPE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

template <class V>
void set_preference(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute,
                    const V& value) {
  TPE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)));
}

}  // namespace

struct Gemm::Impl {
  // Everything the heuristic's choice depends on; the alignment is the least over the operands.
  struct Key {
    int64_t tokens;
    int64_t in;
    int64_t out;
    DType dtype;
    cublasLtEpilogue_t epilogue;
    uint32_t alignment;
    bool operator<(const Key& o) const {
      return std::tie(tokens, in, out, dtype, epilogue, alignment) <
             std::tie(o.tokens, o.in, o.out, o.dtype, o.epilogue, o.alignment);
    }
  };
  // Descriptors and the chosen algorithm, made once per key.
  struct Plan {
    MatmulDesc desc;
    Layout w_layout;
    Layout x_layout;
    Layout y_layout;
    cublasLtMatmulAlgo_t algo{};
  };

  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  bool use_gemv = true;  // false under TPE_GEMM_FORCE_CUBLASLT=1
  std::map<Key, Plan> plans;

  const Plan& plan(const Key& key, const void* bias);
};

const Gemm::Impl::Plan& Gemm::Impl::plan(const Key& key, const void* bias) {
  if (const auto it = plans.find(key); it != plans.end()) return it->second;
  const cudaDataType_t type = cuda_type(key.dtype);
  Plan p;
  cublasLtMatmulDesc_t desc = nullptr;
  TPE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  p.desc.reset(desc);
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, cublasOperation_t{CUBLAS_OP_T});
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, cublasOperation_t{CUBLAS_OP_N});
  set_attribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, key.epilogue);
  if (adds_bias(key.epilogue)) {
    set_attribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(type));
    // The heuristic reads the bias pointer's alignment off its value.
    set_attribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  }
  p.w_layout = make_layout(type, key.in, key.out, key.in);
  p.x_layout = make_layout(type, key.in, key.tokens, key.in);
  p.y_layout = make_layout(type, key.out, key.tokens, key.out);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  TPE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const Preference pref(raw_pref);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t{workspace_bytes});
  for (const auto attribute :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    set_preference(raw_pref, attribute, key.alignment);
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle, desc, p.w_layout.get(), p.x_layout.get(), p.y_layout.get(), p.y_layout.get(),
      raw_pref, 1, &result, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
    fail(
        "cuda::Gemm: cuBLASLt has no algorithm for tokens {} in {} out {} {} with epilogue {} ({})",
        key.tokens, key.in, key.out, dtype_name(key.dtype), static_cast<int>(key.epilogue),
        cublasLtGetStatusString(status));
  }
  p.algo = result.algo;
  return plans.emplace(key, std::move(p)).first->second;
}

Gemm::Gemm(size_t workspace_bytes) : impl_(new Impl) {
  try {
    TPE_CUBLAS_CHECK(cublasLtCreate(&impl_->handle));
    if (workspace_bytes > 0) TPE_CUDA_CHECK(cudaMalloc(&impl_->workspace, workspace_bytes));
    impl_->workspace_bytes = workspace_bytes;
    const char* force = std::getenv("TPE_GEMM_FORCE_CUBLASLT");
    impl_->use_gemv = force == nullptr || std::strcmp(force, "1") != 0;
  } catch (...) {
    if (impl_->handle != nullptr) cublasLtDestroy(impl_->handle);
    delete impl_;
    throw;
  }
}

Gemm::~Gemm() {
  // Plans hold descriptors of the handle: they go first. Errors cannot be reported from here.
  impl_->plans.clear();
  if (impl_->workspace != nullptr) cudaFree(impl_->workspace);
  cublasLtDestroy(impl_->handle);
  delete impl_;
}

void Gemm::linear(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out,
                  const void* bias, DType dtype, void* y, cudaStream_t stream,
                  std::optional<tpe_activation> act) {
  TPE_CUDA_REQUIRE(tokens >= 0 && in >= 0 && out >= 0, "Gemm::linear", "negative size");
  if (tokens == 0 || out == 0) return;
  TPE_CUDA_REQUIRE(in > 0, "Gemm::linear", "in must be positive");
  if (impl_->use_gemv && detail::gemv(x, tokens, in, w, out, bias, act, dtype, y, stream)) {
    return;
  }
  uint32_t alignment = std::min({alignment_of(x), alignment_of(w), alignment_of(y)});
  if (bias != nullptr) alignment = std::min(alignment, alignment_of(bias));
  const auto [epilogue, applies_act] = epilogue_for(bias != nullptr, act);
  const Impl::Key key{tokens, in, out, dtype, epilogue, alignment};
  const Impl::Plan& p = impl_->plan(key, bias);
  if (bias != nullptr) set_attribute(p.desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  const float alpha = 1.0f;
  const float beta = 0.0f;
  TPE_CUBLAS_CHECK(cublasLtMatmul(impl_->handle, p.desc.get(), &alpha, w, p.w_layout.get(), x,
                                  p.x_layout.get(), &beta, y, p.y_layout.get(), y, p.y_layout.get(),
                                  &p.algo, impl_->workspace, impl_->workspace_bytes, stream));
  if (act && !applies_act) activation(*act, y, tokens * out, dtype, stream);
}

}  // namespace tpe::cuda
