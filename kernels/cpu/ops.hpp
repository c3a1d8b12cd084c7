// CPU reference kernels: fp32 math on raw row-major arrays, one function per graph op. They
// know nothing of graphs, ranks or checkpoints; the runtime calls them with local shards.
// Matrix products go through OpenBLAS.
#pragma once

#include <cstdint>
#include <vector>

#include <tpengine/policy.h>

namespace tpe::cpu {

// How many threads one matrix product may use (process-wide). With several ranks running as
// threads, each should get its share of the cores, or the BLAS threads oversubscribe them.
void set_gemm_threads(int threads);

// y[t, o] = sum_i x[t, i] * w[o, i] (+ bias[o]). x: [tokens, in], w: [out, in], y: [tokens, out].
// bias may be null.
void linear(const float* x, int64_t tokens, int64_t in, const float* w, int64_t out,
            const float* bias, float* y);

// y = x / sqrt(mean(x^2) + eps) * w, per row of width `width` (Llama's RMSNorm).
void rms_norm(const float* x, int64_t tokens, int64_t width, const float* w, float eps, float* y);

// y = (x - mean) / sqrt(var + eps) * w + b, per row (biased variance, as torch's LayerNorm).
void layer_norm(const float* x, int64_t tokens, int64_t width, const float* w, const float* b,
                float eps, float* y);

// In place, elementwise, as torch computes silu, gelu (erf), gelu tanh approximation, relu.
void activation(tpe_activation act, float* x, int64_t n);

// Rotary position embedding factors: inv_freq[i] for i < rotary_dim / 2, where rotary_dim =
// head_dim * rope.partial_rotary_factor (rounded down to even), with the rope type's scaling
// applied as transformers does (linear: positions divided by factor, i.e. inv_freq / factor;
// dynamic NTK: base rescaled when seq_len > original_max_position_embeddings; llama3:
// wavelength-dependent scaling). seq_len = highest position in the batch + 1 (only dynamic
// uses it).
std::vector<float> rope_inv_freq(const tpe_rope_desc& rope, int64_t head_dim, int64_t seq_len);

// Rotates x in place, viewed as [tokens, n_heads, head_dim]: the first rotary_dim = 2 *
// inv_freq.size() features of each head, rotate-half style (pairs i and i + rotary_dim / 2),
// angle = positions[t] * inv_freq[i]; cos/sin computed in fp32 as transformers does.
// ld: elements from one token's row to the next (0: n_heads * head_dim), for x a view of the
// q or k columns of a fused projection's output.
void rotary(float* x, int64_t tokens, int64_t n_heads, int64_t head_dim, const int64_t* positions,
            const std::vector<float>& inv_freq, int64_t ld = 0);

// Causal attention of one sequence's new tokens against its KV cache, which already holds the
// new tokens' keys and values. q: [n_new, n_q_heads * head_dim]; the new tokens sit at
// positions start_pos .. start_pos + n_new - 1; k_cache, v_cache: [start_pos + n_new,
// n_kv_heads * head_dim]; kv_of_q[h]: the kv head (local index) that q head h reads. A key at
// position j is visible to a query at position p if j <= p and (window == 0 or p - j < window).
// out: [n_new, n_q_heads * head_dim]. Softmax in fp32 with the max subtracted. slopes (ALiBi, or
// null): q head h's score of key j at query position p gains slopes[h] * (j - p).
void attention(const float* q, int64_t n_new, int64_t start_pos, int64_t n_q_heads,
               int64_t head_dim, const int32_t* kv_of_q, const float* k_cache, const float* v_cache,
               int64_t n_kv_heads, float scale, int64_t window, float* out, int64_t q_ld = 0,
               const float* slopes = nullptr);

// Attention without a mask: every query row attends to keys 0 .. kv_len - 1 of the cache
// (cross-attention over another stream, bidirectional encoders). Shapes as attention above.
void attention_all(const float* q, int64_t n_q_rows, int64_t n_q_heads, int64_t head_dim,
                   const int32_t* kv_of_q, const float* k_cache, const float* v_cache,
                   int64_t n_kv_heads, int64_t kv_len, float scale, float* out, int64_t q_ld = 0);

}  // namespace tpe::cpu
