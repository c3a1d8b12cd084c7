// Times the GEMM on Llama-7B's decode shapes (the small-token GEMV path against cuBLASLt) and a
// few plain kernels, against a device-to-device copy as the bandwidth ceiling. Inputs are random,
// never zeros, and the weights rotate among enough copies to keep them out of L2. Each figure is
// the median over samples of the mean time of a batch of launches, timed with events after a
// warm-up.
//
//   tpe_gpu_bench            prints one line per measurement
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/ops.hpp"
#ifdef TPE_BENCH_FLASHINFER_DECODE
#include "tests/gpu/flashinfer_decode.hpp"
#endif

namespace tpe::cuda::detail {
// kernels/cuda/gemv.cu: the small-token kernel on every product it can take, also those
// Gemm::linear leaves to cuBLASLt; false, nothing enqueued, where it does not apply.
bool gemv_forced(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out,
                 const void* bias, DType dtype, void* y, cudaStream_t stream);
}  // namespace tpe::cuda::detail

namespace {

using tpe::cuda::DType;

void check(cudaError_t error, const char* call) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorString(error));
  }
}
#define CK(call) check((call), #call)

void check_lt(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(call) + " failed: " + cublasLtGetStatusString(status));
  }
}
#define CK_LT(call) check_lt((call), #call)

struct Buffer {
  void* p = nullptr;
  explicit Buffer(size_t bytes) { CK(cudaMalloc(&p, bytes)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { cudaFree(p); }
};

// Uniform values in [-1, 1) converted on the device to `dtype`.
void fill_random(void* dst, DType dtype, size_t n, uint64_t seed, cudaStream_t stream) {
  std::vector<float> host(n);
  uint64_t s = seed;
  for (float& v : host) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    v = static_cast<float>(s >> 40) * 0x1p-23f - 1.0f;
  }
  Buffer staging(n * sizeof(float));
  CK(cudaMemcpy(staging.p, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  tpe::cuda::convert(staging.p, DType::kF32, dst, dtype, static_cast<int64_t>(n), stream);
  CK(cudaStreamSynchronize(stream));
}

#ifdef TPE_BENCH_FLASHINFER_DECODE
// n values of `dtype` on the device, as floats on the host.
std::vector<float> download_f32(const void* src, DType dtype, size_t n, cudaStream_t stream) {
  Buffer staging(n * sizeof(float));
  tpe::cuda::convert(src, dtype, staging.p, DType::kF32, static_cast<int64_t>(n), stream);
  std::vector<float> host(n);
  CK(cudaMemcpyAsync(host.data(), staging.p, n * sizeof(float), cudaMemcpyDeviceToHost, stream));
  CK(cudaStreamSynchronize(stream));
  return host;
}
#endif

// Median over `samples` of the mean microseconds per call of `batch` calls of launch(i).
template <class F>
double time_us(cudaStream_t stream, F launch, int batch = 20, int samples = 15) {
  for (int i = 0; i < 3; ++i) launch(i);
  CK(cudaStreamSynchronize(stream));
  cudaEvent_t start;
  cudaEvent_t stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  std::vector<float> per_call;
  for (int s = 0; s < samples; ++s) {
    CK(cudaEventRecord(start, stream));
    for (int i = 0; i < batch; ++i) launch(s * batch + i);
    CK(cudaEventRecord(stop, stream));
    CK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CK(cudaEventElapsedTime(&ms, start, stop));
    per_call.push_back(ms * 1000.0f / static_cast<float>(batch));
  }
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));
  std::sort(per_call.begin(), per_call.end());
  return per_call[per_call.size() / 2];
}

// As time_us, for work whose host side (several launches and checks per call) takes longer than
// the device's: `calls` calls captured once as a CUDA graph, the graph timed, per call. Decode
// steps replay as graphs, so this is the time they see.
template <class F>
double time_graph_us(cudaStream_t stream, F launch, int calls) {
  cudaGraph_t graph = nullptr;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) launch(i);
  CK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  CK(cudaGraphInstantiate(&exec, graph, 0));
  const double us = time_us(
      stream, [&](int) { CK(cudaGraphLaunch(exec, stream)); }, 3, 11);
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  return us / calls;
}

void report(const std::string& what, double us, double bytes) {
  std::printf("%-58s %9.2f us %7.3f TB/s\n", what.c_str(), us, bytes / (us * 1e-6) / 1e12);
}

void bench_copy(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  Buffer a(bytes);
  Buffer b(bytes);
  CK(cudaMemset(a.p, 0x3c, bytes));
  const double us = time_us(
      stream, [&](int) { CK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, stream)); },
      5, 11);
  report("copy 1 GiB device to device (read + write)", us, 2.0 * static_cast<double>(bytes));
}

// The same copy at the size of one decode call's reads (`moved` bytes read + written), as the
// call is timed: a replayed graph of 20 copies, rotating over 512 MB so that they come from
// memory. What the 1 GiB figure leaves out at this size (a launch's ramp-up and drain) bounds
// what any kernel reading those bytes can reach.
void bench_copy_at(cudaStream_t stream, size_t moved) {
  const size_t bytes = moved / 2;
  const size_t copies = (size_t{512} << 20) / moved + 1;
  Buffer a(bytes * copies);
  Buffer b(bytes * copies);
  CK(cudaMemset(a.p, 0x3c, bytes * copies));
  const double us = time_graph_us(
      stream,
      [&](int i) {
        const size_t at = static_cast<size_t>(i) % copies * bytes;
        CK(cudaMemcpyAsync(static_cast<char*>(b.p) + at, static_cast<char*>(a.p) + at, bytes,
                           cudaMemcpyDeviceToDevice, stream));
      },
      20);
  char what[96];
  std::snprintf(what, sizeof what, "copy %.1f MB moved (read + write), replayed graph",
                static_cast<double>(moved) / 1e6);
  report(what, us, static_cast<double>(moved));
}

// One way of computing the product: through a Gemm instance, or (gemm null) through
// detail::gemv_forced.
struct Runner {
  const char* label;
  tpe::cuda::Gemm* gemm;
};

// Copies of one random W [out, in], enough to span 512 MB (ten times the H100's L2), so that
// rotating through them times memory, not the cache.
std::vector<std::unique_ptr<Buffer>> weight_copies(cudaStream_t stream, DType dtype, int64_t in,
                                                   int64_t out) {
  const size_t w_bytes = static_cast<size_t>(in * out) * tpe::cuda::dtype_size(dtype);
  const size_t copies = std::max<size_t>(2, (size_t{512} << 20) / w_bytes + 1);
  std::vector<std::unique_ptr<Buffer>> ws;
  for (size_t c = 0; c < copies; ++c) {
    ws.push_back(std::make_unique<Buffer>(w_bytes));
    if (c == 0) {
      fill_random(ws[0]->p, dtype, static_cast<size_t>(in * out), 7, stream);
    } else {
      CK(cudaMemcpy(ws[c]->p, ws[0]->p, w_bytes, cudaMemcpyDeviceToDevice));
    }
  }
  return ws;
}

// TB/s counts the bytes of W alone, the term that dominates at decode. Each runner is timed on the
// same operands; returns their times in that order (NaN where the forced kernel does not apply).
std::vector<double> bench_gemm(cudaStream_t stream, const std::vector<Runner>& runners, DType dtype,
                               int64_t tokens, int64_t in, int64_t out, bool bias) {
  const size_t es = tpe::cuda::dtype_size(dtype);
  const size_t w_bytes = static_cast<size_t>(in * out) * es;
  const auto ws = weight_copies(stream, dtype, in, out);
  const size_t copies = ws.size();
  Buffer x(static_cast<size_t>(tokens * in) * es);
  Buffer y(static_cast<size_t>(tokens * out) * es);
  Buffer b(static_cast<size_t>(out) * es);
  fill_random(x.p, dtype, static_cast<size_t>(tokens * in), 11, stream);
  fill_random(b.p, dtype, static_cast<size_t>(out), 13, stream);
  std::vector<double> times;
  for (const Runner& r : runners) {
    const auto run = [&](int i) {
      const void* w = ws[static_cast<size_t>(i) % copies]->p;
      const void* bp = bias ? b.p : nullptr;
      if (r.gemm != nullptr) {
        r.gemm->linear(x.p, tokens, in, w, out, bp, dtype, y.p, stream);
        return true;
      }
      return tpe::cuda::detail::gemv_forced(x.p, tokens, in, w, out, bp, dtype, y.p, stream);
    };
    if (!run(0)) {
      times.push_back(std::nan(""));
      continue;
    }
    const double us = time_us(stream, [&](int i) { run(i); });
    const double tflops = 2.0 * static_cast<double>(tokens * in * out) / (us * 1e-6) / 1e12;
    char what[160];
    std::snprintf(what, sizeof what, "gemm%s %-4s tokens %3lld in %5lld out %5lld%s (%.1f TFLOP/s)",
                  r.label, dtype_name(dtype), static_cast<long long>(tokens),
                  static_cast<long long>(in), static_cast<long long>(out), bias ? " bias" : "",
                  tflops);
    report(what, us, static_cast<double>(w_bytes));
    times.push_back(us);
  }
  return times;
}

// The fused path's linear_activation against the plain pair it replaces, on GPT-NeoX-20B's MLP up
// projection (6144 -> 24576, bias, tanh GELU) in bf16: the product with the bias in its epilogue
// then the activation kernel, and the product with bias and GELU in the epilogue.
void bench_linear_activation(cudaStream_t stream, tpe::cuda::Gemm& gemm) {
  const DType dtype = DType::kBF16;
  const int64_t in = 6144, out = 24576;
  const auto ws = weight_copies(stream, dtype, in, out);
  for (const int64_t tokens : {int64_t{1}, int64_t{8}, int64_t{32}, int64_t{2048}}) {
    Buffer x(static_cast<size_t>(tokens * in) * 2);
    Buffer y(static_cast<size_t>(tokens * out) * 2);
    Buffer b(static_cast<size_t>(out) * 2);
    fill_random(x.p, dtype, static_cast<size_t>(tokens * in), 21, stream);
    fill_random(b.p, dtype, static_cast<size_t>(out), 22, stream);
    const auto w = [&](int i) { return ws[static_cast<size_t>(i) % ws.size()]->p; };
    const double pair = time_us(stream, [&](int i) {
      gemm.linear(x.p, tokens, in, w(i), out, b.p, dtype, y.p, stream);
      tpe::cuda::activation(TPE_ACT_GELU_TANH, y.p, tokens * out, dtype, stream);
    });
    const double fused = time_us(stream, [&](int i) {
      gemm.linear(x.p, tokens, in, w(i), out, b.p, dtype, y.p, stream, TPE_ACT_GELU_TANH);
    });
    const double tflops = 2.0 * static_cast<double>(tokens * in * out) / 1e12;
    const double w_bytes = static_cast<double>(in * out) * 2;
    char what[160];
    std::snprintf(what, sizeof what,
                  "linear+gelu_tanh pair  tokens %4lld 6144->24576 (%.0f TFLOP/s)",
                  static_cast<long long>(tokens), tflops / (pair * 1e-6));
    report(what, pair, w_bytes);
    std::snprintf(what, sizeof what,
                  "linear_activation      tokens %4lld 6144->24576 (%.0f TFLOP/s)",
                  static_cast<long long>(tokens), tflops / (fused * 1e-6));
    report(what, fused, w_bytes);
  }
}

// Gemm::linear (gemv.cu's kernel for f16/bf16 at 1 or 2 tokens and f32 up to 8, cuBLASLt
// otherwise), gemv.cu's kernel forced, and cuBLASLt (a Gemm made under
// TPE_GEMM_FORCE_CUBLASLT=1), on the same operands; a summary row for the table printed at the end.
struct GemvRow {
  DType dtype;
  int64_t tokens;
  int64_t in;
  int64_t out;
  bool bias;
  double us[3];  // Gemm::linear, gemv.cu's kernel, cuBLASLt
};

GemvRow bench_gemv(cudaStream_t stream, tpe::cuda::Gemm& gemm, tpe::cuda::Gemm& gemm_lt,
                   DType dtype, int64_t tokens, int64_t in, int64_t out, bool bias = false) {
  const std::vector<double> t =
      bench_gemm(stream, {{"[linear]", &gemm}, {"[gemv]  ", nullptr}, {"[lt]    ", &gemm_lt}},
                 dtype, tokens, in, out, bias);
  return {dtype, tokens, in, out, bias, {t[0], t[1], t[2]}};
}

void print_gemv_table(const std::vector<GemvRow>& rows) {
  std::printf(
      "\nsmall-token GEMM, us and TB/s of W: Gemm::linear, gemv.cu's kernel forced, "
      "cuBLASLt (lt):\n");
  std::printf("%-4s %3s %5s %5s %4s | %7s %6s | %7s %6s | %7s %6s | %6s\n", "type", "tok", "in",
              "out", "bias", "linear", "TB/s", "gemv", "TB/s", "lt", "TB/s", "lt/lin");
  for (const GemvRow& r : rows) {
    const double bytes =
        static_cast<double>(r.in * r.out) * static_cast<double>(tpe::cuda::dtype_size(r.dtype));
    std::printf("%-4s %3lld %5lld %5lld %4s", dtype_name(r.dtype), static_cast<long long>(r.tokens),
                static_cast<long long>(r.in), static_cast<long long>(r.out), r.bias ? "yes" : "");
    for (const double us : r.us) std::printf(" | %7.2f %6.3f", us, bytes / (us * 1e-6) / 1e12);
    std::printf(" | %5.2fx\n", r.us[2] / r.us[0]);
  }
}

// Gemm takes cuBLASLt's first heuristic choice; this times the first 16 candidates for one bf16
// decode shape (the same TN layout as Gemm), to see what autotuning would gain.
void bench_gemm_candidates(cudaStream_t stream, int64_t in, int64_t out) {
  const DType dtype = DType::kBF16;
  const size_t w_bytes = static_cast<size_t>(in * out) * 2;
  const auto ws = weight_copies(stream, dtype, in, out);
  const size_t copies = ws.size();
  Buffer x(static_cast<size_t>(in) * 2);
  Buffer y(static_cast<size_t>(out) * 2);
  fill_random(x.p, dtype, static_cast<size_t>(in), 11, stream);
  const size_t workspace_bytes = size_t{32} << 20;
  Buffer workspace(workspace_bytes);

  cublasLtHandle_t handle;
  CK_LT(cublasLtCreate(&handle));
  cublasLtMatmulDesc_t desc;
  CK_LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans = CUBLAS_OP_T;
  CK_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof trans));
  cublasLtMatrixLayout_t w_layout;
  cublasLtMatrixLayout_t x_layout;
  cublasLtMatrixLayout_t y_layout;
  CK_LT(cublasLtMatrixLayoutCreate(&w_layout, CUDA_R_16BF, static_cast<uint64_t>(in),
                                   static_cast<uint64_t>(out), in));
  CK_LT(cublasLtMatrixLayoutCreate(&x_layout, CUDA_R_16BF, static_cast<uint64_t>(in), 1, in));
  CK_LT(cublasLtMatrixLayoutCreate(&y_layout, CUDA_R_16BF, static_cast<uint64_t>(out), 1, out));
  cublasLtMatmulPreference_t pref;
  CK_LT(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t max_workspace = workspace_bytes;
  CK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &max_workspace, sizeof max_workspace));
  std::vector<cublasLtMatmulHeuristicResult_t> results(16);
  int found = 0;
  CK_LT(cublasLtMatmulAlgoGetHeuristic(handle, desc, w_layout, x_layout, y_layout, y_layout, pref,
                                       static_cast<int>(results.size()), results.data(), &found));
  std::string line;
  double best = 1e30;
  double first = 0.0;
  for (int r = 0; r < found; ++r) {
    const float alpha = 1.0f;
    const float beta = 0.0f;
    const double us = time_us(stream, [&](int i) {
      CK_LT(cublasLtMatmul(handle, desc, &alpha, ws[static_cast<size_t>(i) % copies]->p, w_layout,
                           x.p, x_layout, &beta, y.p, y_layout, y.p, y_layout, &results[r].algo,
                           workspace.p, workspace_bytes, stream));
    });
    if (r == 0) first = us;
    best = std::min(best, us);
    char item[32];
    std::snprintf(item, sizeof item, " %.1f", us);
    line += item;
  }
  std::printf("gemm bf16 tokens 1 in %lld out %lld: %d candidates (us):%s\n",
              static_cast<long long>(in), static_cast<long long>(out), found, line.c_str());
  std::printf("  first %.2f us (%.3f TB/s), best %.2f us (%.3f TB/s)\n", first,
              static_cast<double>(w_bytes) / (first * 1e-6) / 1e12, best,
              static_cast<double>(w_bytes) / (best * 1e-6) / 1e12);
  CK_LT(cublasLtMatmulPreferenceDestroy(pref));
  CK_LT(cublasLtMatrixLayoutDestroy(w_layout));
  CK_LT(cublasLtMatrixLayoutDestroy(x_layout));
  CK_LT(cublasLtMatrixLayoutDestroy(y_layout));
  CK_LT(cublasLtMatmulDescDestroy(desc));
  CK_LT(cublasLtDestroy(handle));
}

// Attention of `seqs` sequences of context `ctx` whose last `new_tokens` are new, heads n_q and
// n_kv of head_dim `hd`: on the split-KV kernel (the splits it picks) or, prefill, the tensor-core
// prefill kernel one sequence at a time. The caches rotate among copies spanning 512 MB, so that
// decode reads memory, not L2. Decode reports the K and V bytes per second; prefill the causal
// FLOP/s: 4 * hd * n_q * (the query-key pairs the mask keeps). `splits` 0: the kernel's own
// choice (attention_splits); else that many.
void bench_attention(cudaStream_t stream, DType dtype, int64_t seqs, int64_t ctx,
                     int64_t new_tokens, int64_t n_q, int64_t n_kv, int64_t hd, bool prefill,
                     int splits = 0) {
  const size_t es = tpe::cuda::dtype_size(dtype);
  const size_t cache = static_cast<size_t>(seqs * ctx * n_kv * hd);
  const int64_t tokens = seqs * new_tokens;
  const int copies =
      static_cast<int>(std::clamp<size_t>((size_t{512} << 20) / (2 * cache * es) + 1, 1, 1024));
  std::vector<std::unique_ptr<Buffer>> k;
  std::vector<std::unique_ptr<Buffer>> v;
  for (int c = 0; c < copies; ++c) {
    k.push_back(std::make_unique<Buffer>(cache * es));
    v.push_back(std::make_unique<Buffer>(cache * es));
    fill_random(k.back()->p, dtype, cache, 5 + 2 * c, stream);
    fill_random(v.back()->p, dtype, cache, 6 + 2 * c, stream);
  }
  Buffer q(static_cast<size_t>(tokens * n_q * hd) * es);
  Buffer out(static_cast<size_t>(tokens * n_q * hd) * es);
  fill_random(q.p, dtype, static_cast<size_t>(tokens * n_q * hd), 7, stream);
  std::vector<int32_t> slots;
  std::vector<int32_t> positions;
  for (int64_t s = 0; s < seqs; ++s) {
    for (int64_t i = ctx - new_tokens; i < ctx; ++i) {
      slots.push_back(static_cast<int32_t>(s));
      positions.push_back(static_cast<int32_t>(i));
    }
  }
  const size_t index_bytes = slots.size() * sizeof(int32_t);
  Buffer d_slots(index_bytes);
  Buffer d_positions(index_bytes);
  CK(cudaMemcpy(d_slots.p, slots.data(), index_bytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_positions.p, positions.data(), index_bytes, cudaMemcpyHostToDevice));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  constexpr int64_t kScratch = int64_t{4} << 20;
  Buffer scratch(static_cast<size_t>(kScratch) * 4);
  const auto counter_bytes =
      static_cast<size_t>(tpe::cuda::attention_counter_words(tokens, n_q, n_kv, n_q / n_kv)) * 4;
  Buffer counters(counter_bytes);
  CK(cudaMemset(counters.p, 0, counter_bytes));
  const bool own_splits = splits == 0;
  if (own_splits) {
    splits = tpe::cuda::attention_splits(tokens, n_q, hd, ctx, n_kv, n_q / n_kv, dtype, kScratch);
  }
  // Heads other than 64, 128 and 256 wide run padded (the copies are part of the time).
  Buffer padded(
      std::max<size_t>(1, tpe::cuda::prefill_attention_scratch_bytes(
                              n_q * hd, new_tokens, n_q, hd, ctx - new_tokens, n_kv, dtype)));
  const auto call = [&](int i) {
    const void* kc = k[static_cast<size_t>(i % copies)]->p;
    const void* vc = v[static_cast<size_t>(i % copies)]->p;
    if (prefill) {
      for (int64_t s = 0; s < seqs; ++s) {
        const size_t at = static_cast<size_t>(s * new_tokens * n_q * hd) * es;
        tpe::cuda::prefill_attention(static_cast<const char*>(q.p) + at, n_q * hd, new_tokens, n_q,
                                     hd, s, ctx - new_tokens, kc, vc, ctx, n_kv, 0, n_q / n_kv, 0,
                                     scale, 0, dtype, static_cast<char*>(out.p) + at, stream,
                                     padded.p);
      }
      return;
    }
    tpe::cuda::attention(q.p, tokens, n_q, hd, static_cast<const int32_t*>(d_slots.p),
                         static_cast<const int32_t*>(d_positions.p), kc, vc, ctx, n_kv, 0,
                         n_q / n_kv, 0, scale, 0, dtype, out.p, stream, 0, splits,
                         {static_cast<float*>(scratch.p), static_cast<uint32_t*>(counters.p)});
  };
  // Decode calls are timed as a replayed graph (what a decode step is), prompts call by call.
  const double us = new_tokens > 1 ? time_us(stream, call, 3, 5) : time_graph_us(stream, call, 20);
  char what[160];
  std::snprintf(
      what, sizeof what, "attention %s %-4s %lld x %lld keys, %lld new, %lld/%lld h%lld%s%s",
      prefill ? "prefill" : "split-kv", dtype_name(dtype), static_cast<long long>(seqs),
      static_cast<long long>(ctx), static_cast<long long>(new_tokens), static_cast<long long>(n_q),
      static_cast<long long>(n_kv), static_cast<long long>(hd), prefill ? "" : ", splits ",
      prefill ? "" : std::to_string(splits).c_str());
  if (new_tokens == 1) {
    report(what, us, 2.0 * static_cast<double>(cache * es));
#ifdef TPE_BENCH_FLASHINFER_DECODE
    // FlashInfer's batch decode on the same caches, both ways its wrapper runs it, after
    // checking that it computes what ours does.
    if (own_splits && dtype == DType::kBF16 && hd == 128 && ctx % 16 == 0) {
      const auto n = static_cast<size_t>(tokens * n_q * hd);
      call(0);
      const std::vector<float> ours = download_f32(out.p, dtype, n, stream);
      Buffer fi_out(n * es);
      for (const bool tensor_cores : {false, true}) {
        const tpe::bench::FlashInferDecode fi(seqs, ctx, n_q, n_kv, scale, tensor_cores, stream);
        fi.run(q.p, k[0]->p, v[0]->p, fi_out.p, stream);
        const std::vector<float> theirs = download_f32(fi_out.p, dtype, n, stream);
        float diff = 0.0f;
        float largest = 0.0f;
        for (size_t i = 0; i < n; ++i) {
          diff = std::max(diff, std::abs(ours[i] - theirs[i]));
          largest = std::max(largest, std::abs(ours[i]));
        }
        const double fi_us = time_graph_us(
            stream,
            [&](int i) {
              const auto c = static_cast<size_t>(i % copies);
              fi.run(q.p, k[c]->p, v[c]->p, fi_out.p, stream);
            },
            20);
        char row[200];
        std::snprintf(row, sizeof row, "  flashinfer (%s; max |diff| %.1e of %.2f)",
                      fi.plan().c_str(), static_cast<double>(diff), static_cast<double>(largest));
        report(row, fi_us, 2.0 * static_cast<double>(cache * es));
      }
    }
#endif
    return;
  }
  // Query i (of new_tokens, at ctx - new_tokens + i) sees ctx - new_tokens + i + 1 keys.
  const double pairs =
      static_cast<double>(seqs) * static_cast<double>(new_tokens) *
      (static_cast<double>(ctx - new_tokens) + (static_cast<double>(new_tokens) + 1.0) / 2.0);
  const double flops = 4.0 * static_cast<double>(hd * n_q) * pairs;
  std::printf("%-58s %9.2f us %7.1f TFLOP/s (causal)\n", what, us, flops / (us * 1e-6) / 1e12);
}

void bench_kernels(cudaStream_t stream) {
  const DType dtype = DType::kBF16;
  {  // rms_norm over a 4096-token prefill of width 4096: read x, write y (w stays cached)
    const int64_t tokens = 4096;
    const int64_t width = 4096;
    Buffer x(static_cast<size_t>(tokens * width) * 2);
    Buffer y(static_cast<size_t>(tokens * width) * 2);
    Buffer w(static_cast<size_t>(width) * 2);
    fill_random(x.p, dtype, static_cast<size_t>(tokens * width), 1, stream);
    fill_random(w.p, dtype, static_cast<size_t>(width), 2, stream);
    const double us = time_us(stream, [&](int) {
      tpe::cuda::rms_norm(x.p, tokens, width, w.p, 1e-6f, dtype, y.p, stream);
    });
    report("rms_norm bf16 4096 x 4096", us, 2.0 * static_cast<double>(tokens * width) * 2);
  }
  {  // add over 64M elements: read two, write one
    const int64_t n = int64_t{1} << 26;
    Buffer a(static_cast<size_t>(n) * 2);
    Buffer b(static_cast<size_t>(n) * 2);
    Buffer out(static_cast<size_t>(n) * 2);
    fill_random(a.p, dtype, static_cast<size_t>(n), 3, stream);
    fill_random(b.p, dtype, static_cast<size_t>(n), 4, stream);
    const double us =
        time_us(stream, [&](int) { tpe::cuda::add(a.p, b.p, out.p, n, dtype, stream); });
    report("add bf16 64M elements", us, 3.0 * static_cast<double>(n) * 2);
  }
  // Decode: batch 1, 8 and 32 at position 4095, one new token each, Llama-2-7B's heads (32 q,
  // 32 kv) and a GQA shape (32 q, 8 kv; Llama-3-8B, Mistral); TB/s counts their K and V.
  // Batch 1's bytes (K and V of 4096 keys: 16.8 MB GQA, 67.1 MB MHA), moved by a copy.
  bench_copy_at(stream, size_t{2} * 4096 * 8 * 128 * 2);
  bench_copy_at(stream, size_t{2} * 4096 * 32 * 128 * 2);
  for (const int64_t seqs : {int64_t{1}, int64_t{8}, int64_t{32}}) {
    bench_attention(stream, DType::kBF16, seqs, 4096, 1, 32, 32, 128, false);
    bench_attention(stream, DType::kBF16, seqs, 4096, 1, 32, 8, 128, false);
  }
  // The split count the kernel picks (one wave of resident blocks; the rows above) beside its
  // neighbours, 4096 keys: MHA batch 1 (16) and 8 (2), GQA 4 batch 8 (6) and 16 (3).
  for (const int splits : {12, 24}) {
    bench_attention(stream, DType::kBF16, 1, 4096, 1, 32, 32, 128, false, splits);
  }
  for (const int splits : {3, 4}) {
    bench_attention(stream, DType::kBF16, 8, 4096, 1, 32, 32, 128, false, splits);
  }
  for (const int splits : {4, 9}) {
    bench_attention(stream, DType::kBF16, 8, 4096, 1, 32, 8, 128, false, splits);
  }
  for (const int splits : {0, 2, 5}) {
    bench_attention(stream, DType::kBF16, 16, 4096, 1, 32, 8, 128, false, splits);
  }
  // A decode step after a short prompt (128 + 128 tokens: a cache of 256), where each layer's
  // attention is latency, not bytes: the split count the kernel picks beside 1, 2 and 4.
  for (const int64_t n_kv : {int64_t{32}, int64_t{8}}) {
    for (const int splits : {0, 1, 2, 4}) {
      bench_attention(stream, DType::kBF16, 1, 256, 1, 32, n_kv, 128, false, splits);
    }
  }
  // GQA 4 at batch 1 between those.
  for (const int64_t ctx : {int64_t{512}, int64_t{1024}}) {
    for (const int splits : {0, 1, 2, 4, 8, 16}) {
      bench_attention(stream, DType::kBF16, 1, ctx, 1, 32, 8, 128, false, splits);
    }
  }
  for (const int splits : {8, 16}) {
    bench_attention(stream, DType::kBF16, 1, 4096, 1, 32, 8, 128, false, splits);
  }
  bench_attention(stream, DType::kF32, 16, 4096, 1, 32, 8, 128, false);
  bench_attention(stream, DType::kBF16, 16, 4096, 1, 32, 8, 80, false);  // 16-byte loads
  // Prefill: one prompt of 2048 (and 8192) tokens, 32 heads of 128, on tensor cores beside the
  // split-KV kernel; and a chunk of 512 continuing 1536 cached tokens.
  for (const int64_t n : {int64_t{2048}, int64_t{8192}}) {
    if (tpe::cuda::prefill_attention_supported(DType::kBF16, 128)) {
      bench_attention(stream, DType::kBF16, 1, n, n, 32, 32, 128, true);
      bench_attention(stream, DType::kBF16, 1, n, n, 32, 8, 128, true);
    }
  }
  if (tpe::cuda::prefill_attention_supported(DType::kBF16, 128)) {
    bench_attention(stream, DType::kBF16, 1, 2048, 512, 32, 32, 128, true);
    bench_attention(stream, DType::kF16, 1, 2048, 2048, 32, 32, 128, true);
    bench_attention(stream, DType::kBF16, 1, 2048, 2048, 32, 32, 64, true);
    bench_attention(stream, DType::kBF16, 1, 2048, 2048, 16, 16, 256, true);
    // GPT-NeoX-20B's heads (64 of 96) and Phi-2's (32 of 80): padded to 128.
    bench_attention(stream, DType::kBF16, 1, 2048, 2048, 64, 64, 96, true);
    bench_attention(stream, DType::kBF16, 1, 2048, 2048, 32, 32, 80, true);
  }
  bench_attention(stream, DType::kBF16, 1, 2048, 2048, 32, 32, 128, false);
  bench_attention(stream, DType::kBF16, 1, 2048, 2048, 64, 64, 96, false);
}

}  // namespace

int main() {
  try {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      std::printf("tpe_gpu_bench: no CUDA device\n");
      return 1;
    }
    cudaDeviceProp prop{};
    CK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
                prop.l2CacheSize >> 20);
    cudaStream_t stream;
    CK(cudaStreamCreate(&stream));
    bench_copy(stream);
    tpe::cuda::Gemm gemm;
    // A second instance that sends every product to cuBLASLt, for comparison.
    const char* previous = std::getenv("TPE_GEMM_FORCE_CUBLASLT");
    const std::string saved = previous != nullptr ? previous : "";
    setenv("TPE_GEMM_FORCE_CUBLASLT", "1", 1);
    tpe::cuda::Gemm gemm_lt;
    if (previous != nullptr) {
      setenv("TPE_GEMM_FORCE_CUBLASLT", saved.c_str(), 1);
    } else {
      unsetenv("TPE_GEMM_FORCE_CUBLASLT");
    }
    struct Shape {
      int64_t in;
      int64_t out;
    };
    // Llama-2-7B: q/k/v/o, gate/up, down, fused q+k+v, lm_head.
    const Shape shapes7b[] = {
        {4096, 4096}, {4096, 11008}, {11008, 4096}, {4096, 12288}, {4096, 32000}};
    std::vector<GemvRow> rows;
    for (const int64_t tokens : {int64_t{1}, int64_t{8}}) {
      for (const Shape s : shapes7b) {
        rows.push_back(bench_gemv(stream, gemm, gemm_lt, DType::kBF16, tokens, s.in, s.out));
      }
    }
    for (const int64_t tokens : {int64_t{2}, int64_t{3}, int64_t{4}, int64_t{5}}) {
      rows.push_back(bench_gemv(stream, gemm, gemm_lt, DType::kBF16, tokens, 4096, 11008));
    }
    rows.push_back(bench_gemv(stream, gemm, gemm_lt, DType::kBF16, 1, 4096, 12288, true));
    for (const DType dtype : {DType::kF16, DType::kF32}) {
      for (const Shape s : {Shape{4096, 4096}, Shape{4096, 11008}, Shape{11008, 4096}}) {
        rows.push_back(bench_gemv(stream, gemm, gemm_lt, dtype, 1, s.in, s.out));
      }
      rows.push_back(bench_gemv(stream, gemm, gemm_lt, dtype, 8, 4096, 11008));
    }
    bench_gemm(stream, {{"", &gemm}}, DType::kBF16, 32, 4096, 12288, false);
    bench_gemm(stream, {{"", &gemm}}, DType::kBF16, 4096, 4096, 12288, false);
    for (const int64_t out : {int64_t{4096}, int64_t{11008}, int64_t{12288}}) {
      bench_gemm_candidates(stream, 4096, out);
    }
    bench_gemm_candidates(stream, 11008, 4096);
    bench_linear_activation(stream, gemm);
    bench_kernels(stream);
    print_gemv_table(rows);
    CK(cudaStreamDestroy(stream));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tpe_gpu_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
