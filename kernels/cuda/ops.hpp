// CUDA plain kernels: one op, one kernel, mirroring kernels/cpu/ops.hpp on device memory.
// Every function only enqueues work on `stream` (no synchronisation); pointers are device
// pointers; activations and weights are in one model dtype (fp32, fp16 or bf16) and every
// kernel computes in fp32 internally, rounding once on the way out. Launch errors are checked
// (TPE_CUDA_CHECK: tpe::Error naming the file, line and call).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <optional>

#include <tpengine/policy.h>

namespace tpe::cuda {

enum class DType { kF32, kF16, kBF16 };
size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // "f32", "f16", "bf16"

// dst[i] = src[i] converted (same or different dtype; n elements).
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
             cudaStream_t stream);

// out[t] = table[ids[t] - vocab_begin] if vocab_begin <= ids[t] < vocab_end, else zeros.
// table: [vocab_end - vocab_begin, width]; out: [tokens, width].
void embedding(const int32_t* ids, int64_t tokens, const void* table, int64_t vocab_begin,
               int64_t vocab_end, int64_t width, DType dtype, void* out, cudaStream_t stream);

// As kernels/cpu: RMSNorm and LayerNorm (biased variance) per row; b may be null. With a
// residual [tokens, width] (the fused path's add + norm), the rows normalised are x + residual,
// rounded to the dtype as `add` rounds, and written to sum (which may alias x or residual).
void rms_norm(const void* x, int64_t tokens, int64_t width, const void* w, float eps, DType dtype,
              void* y, cudaStream_t stream, const void* residual = nullptr, void* sum = nullptr);
void layer_norm(const void* x, int64_t tokens, int64_t width, const void* w, const void* b,
                float eps, DType dtype, void* y, cudaStream_t stream,
                const void* residual = nullptr, void* sum = nullptr);

// In place, elementwise.
void activation(tpe_activation act, void* x, int64_t n, DType dtype, cudaStream_t stream);
// out[rows, cols] = act(gate) * up, gate and up with row strides ld_gate and ld_up (columns of
// one merged projection); the activation computed as `activation` computes it.
void gated_activation(tpe_activation act, const void* gate, int64_t ld_gate, const void* up,
                      int64_t ld_up, void* out, int64_t rows, int64_t cols, DType dtype,
                      cudaStream_t stream);
// out = a + b, out = a * b; out may alias a or b.
void add(const void* a, const void* b, void* out, int64_t n, DType dtype, cudaStream_t stream);
void mul(const void* a, const void* b, void* out, int64_t n, DType dtype, cudaStream_t stream);

// out[t, i] = x[t, cols[i]]: x [tokens, in_width], out [tokens, out_width].
void gather_columns(const void* x, int64_t tokens, int64_t in_width, const int32_t* cols,
                    int64_t out_width, DType dtype, void* out, cudaStream_t stream);

// Rotate-half rotary in place on x [tokens, n_heads * head_dim]: the first rotary_dim features
// of each head; token t uses angle positions[t] * inv_freq[table[t] * (rotary_dim / 2) + i]
// (table may be null: row 0 for every token), cos/sin in fp32.
// ld: elements from one token's row to the next (0: n_heads * head_dim), for x a view of the q or
// k columns of a fused projection's output.
void rotary(void* x, int64_t tokens, int64_t n_heads, int64_t head_dim, int64_t rotary_dim,
            const int32_t* positions, const int32_t* table, const float* inv_freq, DType dtype,
            cudaStream_t stream, int64_t ld = 0);

// The fused path's rotary + KV append: rotates q in place as `rotary` does, and writes token t's
// k rotated the same way (k itself is left as it is) and its v at (slots[t], positions[t]) of the
// caches, as `kv_append` does. q_ld, k_ld, v_ld: row strides of the q, k and v views.
void rope_kv_append(void* q, int64_t q_ld, int64_t n_q, const void* k, int64_t k_ld, const void* v,
                    int64_t v_ld, int64_t n_kv, int64_t tokens, int64_t head_dim,
                    int64_t rotary_dim, const int32_t* slots, const int32_t* positions,
                    const int32_t* table, const float* inv_freq, void* k_cache, void* v_cache,
                    int64_t max_len, DType dtype, cudaStream_t stream);

// out[r] = the index of the largest of x's row r [rows, cols] (the first among equals), or -1 if
// the row holds a NaN or an infinity: greedy decoding's choice, on the device.
void argmax_rows(const void* x, int64_t rows, int64_t cols, DType dtype, int64_t* out,
                 cudaStream_t stream);

// The k largest of each row r of x [rows, cols] (0 < k <= cols): values[r * k + i] and their
// columns ids[r * k + i], in no order (among values equal to the k-th largest, any of them), and
// finite[r] = 0 where the row holds a NaN or an infinity, else 1: sampling's candidates.
void top_rows(const void* x, int64_t rows, int64_t cols, int64_t k, DType dtype, float* values,
              int32_t* ids, uint8_t* finite, cudaStream_t stream);

// The one-shot all-reduce over peer memory, for small messages (a decode step's): every rank of
// a group calls peer_all_reduce with the same count, in the same order; each sums every rank's
// x in rank order in fp32, so all hold the same bits. A rank's region (peer_region_bytes,
// zeroed before the first call) holds the barrier's flags, its call counters and a staging
// buffer of two halves of `capacity` bytes; every rank must be able to address every region
// (peer access or CUDA IPC). Graph-safe: the counters live in device memory. The kernels of all
// ranks must run at once (they wait for each other); a nonzero *abort (host-mapped) ends the
// wait, leaving x undefined.
inline constexpr int kPeerMaxRanks = 8;
inline constexpr int kPeerBlocks = 16;
struct PeerGroup {
  void* staging[kPeerMaxRanks];    // each rank's, as this rank addresses it
  uint32_t* flags[kPeerMaxRanks];  // each rank's barrier flags
  uint32_t* counters;              // this rank's calls so far, per block
  const volatile int* abort;
  int64_t capacity;  // bytes of one staging half: the largest message
  int world;
  int rank;
};
size_t peer_region_bytes(int64_t capacity);
// regions[s]: rank s's region, as this rank addresses it.
PeerGroup peer_group(void* const* regions, int world, int rank, int64_t capacity,
                     const volatile int* abort);
void peer_all_reduce(void* x, int64_t count, DType dtype, const PeerGroup& group,
                     cudaStream_t stream);
// peer_all_reduce of x [rows, width], then y = norm(x) (rms_norm or layer_norm of the sum, as
// those kernels compute it; b may be null): the bits of the two calls, in one kernel.
void peer_all_reduce_norm(tpe_norm_kind kind, void* x, int64_t rows, int64_t width, const void* w,
                          const void* b, float eps, DType dtype, void* y, const PeerGroup& group,
                          cudaStream_t stream);

// KV cache: k_cache, v_cache are [slots, max_len, kv_width]. Writes token t's k and v rows at
// (slots[t], positions[t]); k_ld, v_ld: elements between the inputs' rows (0: kv_width).
void kv_append(const void* k, const void* v, int64_t tokens, int64_t kv_width, const int32_t* slots,
               const int32_t* positions, void* k_cache, void* v_cache, int64_t max_len, DType dtype,
               cudaStream_t stream, int64_t k_ld = 0, int64_t v_ld = 0);

// Causal attention: token t (query at positions[t] of sequence slots[t]) attends keys
// 0..positions[t] of its slot, skipping keys with positions[t] - j >= window when window > 0.
// q: [tokens, n_q * head_dim]; local q head h reads local kv head
// (first_q + h) / group - first_kv. Softmax in fp32 with the max subtracted.
// out: [tokens, n_q * head_dim]; q_ld: elements between q's rows (0: n_q * head_dim).
// The keys of each token in `splits` parts (attention_splits) whose partial results go to
// `scratch` and are merged by the block that finishes last; on tensor cores for 16-bit q heads
// that share a kv head (head dims 64, 96, 128), else on CUDA cores. Reads positions and slots on
// the device only, so a recorded call replays for any lengths.
// ALiBi (max_bias 0: none): local q head h adds alibi_slope(first_q + h, n_heads, max_bias) *
// scale * (j - positions[t]) to its scaled score of key j (kernels/alibi.hpp).
struct Alibi {
  float max_bias = 0;
  float scale = 1;
  int64_t n_heads = 0;
};
// Where more than one split keeps its partial results (attention_scratch_floats floats) and
// counts the blocks done (attention_counter_words words: zero before a call, left zero by it, so
// the caller zeroes them once when it allocates them).
struct AttentionScratch {
  float* partial = nullptr;
  uint32_t* counters = nullptr;
};
void attention(const void* q, int64_t tokens, int64_t n_q, int64_t head_dim, const int32_t* slots,
               const int32_t* positions, const void* k_cache, const void* v_cache, int64_t max_len,
               int64_t n_kv, int64_t first_q, int64_t group, int64_t first_kv, float scale,
               int64_t window, DType dtype, void* out, cudaStream_t stream, int64_t q_ld = 0,
               int splits = 1, const AttentionScratch& scratch = {}, const Alibi& alibi = {});
// The split count attention uses best for these shapes on the current device, given a scratch of
// scratch_floats floats: the blocks one wave of the device holds, never more partial results than
// fit.
int attention_splits(int64_t tokens, int64_t n_q, int64_t head_dim, int64_t max_len, int64_t n_kv,
                     int64_t group, DType dtype, int64_t scratch_floats);
int64_t attention_scratch_floats(int64_t tokens, int64_t n_q, int64_t head_dim, int splits);
int64_t attention_counter_words(int64_t tokens, int64_t n_q, int64_t n_kv, int64_t group);

// Causal attention of one sequence's `count` new tokens, at positions start_pos.. of cache slot
// `slot` (already appended), on tensor cores: FlashInfer's Hopper prefill kernel (a TMA and
// warp-specialised FlashAttention-3 design). Shapes as attention. Only where
// prefill_attention_supported says so: a Hopper device in a build for sm_90a, f16 or bf16, heads
// up to 256 wide. The kernel's widths are 64, 128 and 256: other heads (80, 96, ...) and q rows off
// the 16-byte grid run padded with zeros to the next width, in `scratch` (of
// prefill_attention_scratch_bytes; none needed, and null allowed, where that is 0): q, this
// slot's keys and values up to the chunk's end, and the output. Zero features add nothing to a
// score, and the output's padding is dropped, so the result is the unpadded attention's.
bool prefill_attention_supported(DType dtype, int64_t head_dim);
size_t prefill_attention_scratch_bytes(int64_t q_ld, int64_t count, int64_t n_q, int64_t head_dim,
                                       int64_t start_pos, int64_t n_kv, DType dtype);
void prefill_attention(const void* q, int64_t q_ld, int64_t count, int64_t n_q, int64_t head_dim,
                       int64_t slot, int64_t start_pos, const void* k_cache, const void* v_cache,
                       int64_t max_len, int64_t n_kv, int64_t first_q, int64_t group,
                       int64_t first_kv, float scale, int64_t window, DType dtype, void* out,
                       cudaStream_t stream, void* scratch);

// For every row and head: the head's first head_dim elements from src (row stride src_ld, head
// stride src_head, in elements) to dst (dst_ld, dst_head), the rest of each dst head zeroed.
// Heads padded to a wider kernel's width and back.
void copy_heads(const void* src, int64_t src_ld, int64_t src_head, void* dst, int64_t dst_ld,
                int64_t dst_head, int64_t rows, int64_t heads, int64_t head_dim, DType dtype,
                cudaStream_t stream);

// Holds the stream until the host sets *flag, host memory mapped into the device
// (cudaHostAllocMapped), to non-zero: what the host queues meanwhile then runs back to back.
void wait_for_host(const volatile int* flag, cudaStream_t stream);

// Matrix products through cuBLASLt, one instance per device: y[tokens, out] = act(x[tokens, in] ·
// w[out, in]^T (+ bias[out])), fp32 accumulation, bias (and act, where the epilogue has it: the
// tanh GELU, ReLU; gemm.cpp says more) added in the epilogue. The algorithm is chosen once per
// (tokens, in, out, dtype, epilogue, alignment) and cached.
class Gemm {
 public:
  explicit Gemm(size_t workspace_bytes = size_t{32} << 20);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  void linear(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out,
              const void* bias, DType dtype, void* y, cudaStream_t stream,
              std::optional<tpe_activation> act = std::nullopt);

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace tpe::cuda
