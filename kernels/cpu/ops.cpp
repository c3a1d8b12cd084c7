#include "kernels/cpu/ops.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <stdexcept>
#include <string>

namespace tpe::cpu {
namespace {

blasint blas_dim(int64_t n) {
  if (n < 0 || n > std::numeric_limits<blasint>::max()) {
    throw std::invalid_argument("linear: dimension " + std::to_string(n) + " out of BLAS range");
  }
  return static_cast<blasint>(n);
}

// transformers builds inv_freq in fp32: 1.0 / (base ** (arange(0, dim, 2).float() / dim)).
// Raising in double and rounding once gives the correctly rounded fp32 power; torch's own
// fp32 pow is within an ulp of it, so about 1% of the values differ from torch by one or two ulps.
std::vector<float> default_inv_freq(double base, int64_t dim) {
  const auto fbase = static_cast<float>(base);
  std::vector<float> inv_freq(static_cast<size_t>(dim / 2));
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    inv_freq[i] = 1.0f / static_cast<float>(std::pow(double{fbase}, double{exponent}));
  }
  return inv_freq;
}

// transformers rescales the base only once the batch reaches past the original length, and
// then from a tensor seq_len: the arithmetic is fp32, except pow, which keeps its double
// exponent.
double dynamic_ntk_base(const tpe_rope_desc& rope, int64_t dim, int64_t seq_len) {
  if (seq_len <= rope.original_max_position_embeddings) return rope.theta;
  const auto factor = static_cast<float>(rope.factor);
  const float ratio = factor * static_cast<float>(seq_len) /
                          static_cast<float>(rope.original_max_position_embeddings) -
                      static_cast<float>(rope.factor - 1.0);
  const double exponent = static_cast<double>(dim) / static_cast<double>(dim - 2);
  const auto power = static_cast<float>(std::pow(double{ratio}, exponent));
  return static_cast<float>(rope.theta) * power;
}

// Llama 3.1: long wavelengths slow down by factor, short ones stay, the band between is
// interpolated. fp32 throughout, as transformers' tensor arithmetic; torch computes
// `scalar / tensor` as reciprocal(tensor) * scalar, hence the reciprocals.
void apply_llama3_scaling(const tpe_rope_desc& rope, std::vector<float>& inv_freq) {
  const auto factor = static_cast<float>(rope.factor);
  const auto low = static_cast<float>(rope.low_freq_factor);
  const auto old_len = static_cast<float>(rope.original_max_position_embeddings);
  const auto low_freq_wavelen = static_cast<float>(
      static_cast<double>(rope.original_max_position_embeddings) / rope.low_freq_factor);
  const auto high_freq_wavelen = static_cast<float>(
      static_cast<double>(rope.original_max_position_embeddings) / rope.high_freq_factor);
  const auto band = static_cast<float>(rope.high_freq_factor - rope.low_freq_factor);
  const auto two_pi = static_cast<float>(2.0 * std::numbers::pi);
  for (float& f : inv_freq) {
    const float wavelen = (1.0f / f) * two_pi;
    if (wavelen > low_freq_wavelen) {
      f = f / factor;
    } else if (!(wavelen < high_freq_wavelen)) {
      const float smooth = ((1.0f / wavelen) * old_len - low) / band;
      f = (1.0f - smooth) * f / factor + smooth * f;
    }
  }
}

// The activations follow the operation order of torch's fp32 CPU kernels.
float silu(float v) { return v / (1.0f + std::exp(-v)); }

float gelu(float v) {
  constexpr auto kInvSqrt2 = static_cast<float>(1.0 / std::numbers::sqrt2);
  return 0.5f * v * (1.0f + std::erf(v * kInvSqrt2));
}

float gelu_tanh(float v) {
  constexpr auto kSqrt2OverPi = static_cast<float>(std::numbers::sqrt2 * std::numbers::inv_sqrtpi);
  constexpr float kKappa = 0.044715f;
  return 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * (v + kKappa * (v * v * v))));
}

// NaN passes through, as in torch.
float relu(float v) { return v < 0.0f ? 0.0f : v; }

template <class F>
void apply_elementwise(float* x, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) x[i] = f(x[i]);
}

struct KvView {
  const float* k;
  const float* v;
  int64_t stride;  // floats per cached position
  int64_t head_dim;
};

// out = softmax(scale * q . k_j + slope * (j - last)) . v_j over cached positions j in
// [first, last] of one kv head.
void attend_one(const float* q, const KvView& kv, int64_t head_offset, int64_t first, int64_t last,
                float scale, float slope, float* probs, float* out) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = first; j <= last; ++j) {
    const float* k = kv.k + j * kv.stride + head_offset;
    float dot = 0.0f;
    for (int64_t d = 0; d < kv.head_dim; ++d) dot += q[d] * k[d];
    probs[j] = dot * scale + slope * static_cast<float>(j - last);
    max_score = std::max(max_score, probs[j]);
  }
  float sum = 0.0f;
  for (int64_t j = first; j <= last; ++j) {
    probs[j] = std::exp(probs[j] - max_score);
    sum += probs[j];
  }
  std::fill(out, out + kv.head_dim, 0.0f);
  for (int64_t j = first; j <= last; ++j) {
    const float p = probs[j] / sum;
    const float* v = kv.v + j * kv.stride + head_offset;
    for (int64_t d = 0; d < kv.head_dim; ++d) out[d] += p * v[d];
  }
}

void check_rope(const tpe_rope_desc& rope, int64_t rotary_dim) {
  const bool needs_original_len = rope.type == TPE_ROPE_DYNAMIC || rope.type == TPE_ROPE_LLAMA3;
  if (needs_original_len && rope.original_max_position_embeddings <= 0) {
    throw std::invalid_argument("rope: original_max_position_embeddings must be positive");
  }
  // The NTK exponent is rotary_dim / (rotary_dim - 2).
  if (rope.type == TPE_ROPE_DYNAMIC && rotary_dim <= 2) {
    throw std::invalid_argument("rope: dynamic NTK needs a rotary dimension above 2");
  }
}

}  // namespace

void set_gemm_threads(int threads) { openblas_set_num_threads(std::max(threads, 1)); }

void linear(const float* x, int64_t tokens, int64_t in, const float* w, int64_t out,
            const float* bias, float* y) {
  if (tokens == 0 || out == 0) return;
  // Leading dimensions must be at least 1 even when in == 0 (then y is just the bias).
  const blasint ld_in = std::max(blas_dim(in), blasint{1});
  if (tokens == 1) {
    // A decode step: sgemm would first pack (copy) the whole weight matrix; sgemv streams it once.
    cblas_sgemv(CblasRowMajor, CblasNoTrans, blas_dim(out), blas_dim(in), 1.0f, w, ld_in, x, 1,
                0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_dim(tokens), blas_dim(out),
                blas_dim(in), 1.0f, x, ld_in, w, ld_in, 0.0f, y, blas_dim(out));
  }
  if (bias == nullptr) return;
  for (int64_t t = 0; t < tokens; ++t) {
    float* row = y + t * out;
    for (int64_t o = 0; o < out; ++o) row[o] += bias[o];
  }
}

void rms_norm(const float* x, int64_t tokens, int64_t width, const float* w, float eps, float* y) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xr = x + t * width;
    float* yr = y + t * width;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < width; ++i) sum_sq += double{xr[i]} * xr[i];
    const auto variance = static_cast<float>(sum_sq / static_cast<double>(width));
    const auto rstd = static_cast<float>(1.0 / std::sqrt(double{variance + eps}));
    // Llama multiplies the weight last: weight * (x * rstd).
    for (int64_t i = 0; i < width; ++i) yr[i] = w[i] * (xr[i] * rstd);
  }
}

void layer_norm(const float* x, int64_t tokens, int64_t width, const float* w, const float* b,
                float eps, float* y) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xr = x + t * width;
    float* yr = y + t * width;
    double sum = 0.0;
    for (int64_t i = 0; i < width; ++i) sum += xr[i];
    const double mean = sum / static_cast<double>(width);
    double sum_sq = 0.0;
    for (int64_t i = 0; i < width; ++i) sum_sq += (xr[i] - mean) * (xr[i] - mean);
    const double rstd = 1.0 / std::sqrt(sum_sq / static_cast<double>(width) + eps);
    for (int64_t i = 0; i < width; ++i) {
      yr[i] = static_cast<float>((xr[i] - mean) * rstd * w[i] + b[i]);
    }
  }
}

void activation(tpe_activation act, float* x, int64_t n) {
  switch (act) {
    case TPE_ACT_SILU:
      return apply_elementwise(x, n, silu);
    case TPE_ACT_GELU:
      return apply_elementwise(x, n, gelu);
    case TPE_ACT_GELU_TANH:
      return apply_elementwise(x, n, gelu_tanh);
    case TPE_ACT_RELU:
      return apply_elementwise(x, n, relu);
  }
  throw std::invalid_argument("activation: unknown kind " + std::to_string(static_cast<int>(act)));
}

std::vector<float> rope_inv_freq(const tpe_rope_desc& rope, int64_t head_dim, int64_t seq_len) {
  // int(head_dim * partial_rotary_factor), as transformers; odd widths cannot rotate-half.
  const auto truncated =
      static_cast<int64_t>(static_cast<double>(head_dim) * rope.partial_rotary_factor);
  const int64_t rotary_dim = truncated - truncated % 2;
  check_rope(rope, rotary_dim);
  switch (rope.type) {
    case TPE_ROPE_DEFAULT:
      return default_inv_freq(rope.theta, rotary_dim);
    case TPE_ROPE_LINEAR: {
      std::vector<float> inv_freq = default_inv_freq(rope.theta, rotary_dim);
      for (float& f : inv_freq) f /= static_cast<float>(rope.factor);
      return inv_freq;
    }
    case TPE_ROPE_DYNAMIC:
      return default_inv_freq(dynamic_ntk_base(rope, rotary_dim, seq_len), rotary_dim);
    case TPE_ROPE_LLAMA3: {
      std::vector<float> inv_freq = default_inv_freq(rope.theta, rotary_dim);
      apply_llama3_scaling(rope, inv_freq);
      return inv_freq;
    }
  }
  throw std::invalid_argument("rope: unknown type " + std::to_string(static_cast<int>(rope.type)));
}

void rotary(float* x, int64_t tokens, int64_t n_heads, int64_t head_dim, const int64_t* positions,
            const std::vector<float>& inv_freq, int64_t ld) {
  if (ld == 0) ld = n_heads * head_dim;
  const size_t half = inv_freq.size();
  std::vector<float> cos_t(half);
  std::vector<float> sin_t(half);
  for (int64_t t = 0; t < tokens; ++t) {
    // transformers: freqs = position.float() * inv_freq, then cos and sin, all fp32.
    const auto pos = static_cast<float>(positions[t]);
    for (size_t i = 0; i < half; ++i) {
      cos_t[i] = std::cos(pos * inv_freq[i]);
      sin_t[i] = std::sin(pos * inv_freq[i]);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* head = x + t * ld + h * head_dim;
      for (size_t i = 0; i < half; ++i) {
        const float x1 = head[i];
        const float x2 = head[i + half];
        head[i] = x1 * cos_t[i] - x2 * sin_t[i];
        head[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
      }
    }
  }
}

void attention(const float* q, int64_t n_new, int64_t start_pos, int64_t n_q_heads,
               int64_t head_dim, const int32_t* kv_of_q, const float* k_cache, const float* v_cache,
               int64_t n_kv_heads, float scale, int64_t window, float* out, int64_t q_ld,
               const float* slopes) {
  const int64_t out_stride = n_q_heads * head_dim;
  const int64_t q_stride = q_ld > 0 ? q_ld : out_stride;
  const KvView kv{k_cache, v_cache, n_kv_heads * head_dim, head_dim};
  // One scratch row for the whole call: scores, then probabilities, indexed by key position.
  std::vector<float> probs(static_cast<size_t>(start_pos + n_new));
  for (int64_t n = 0; n < n_new; ++n) {
    const int64_t pos = start_pos + n;
    const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    for (int64_t h = 0; h < n_q_heads; ++h) {
      attend_one(q + n * q_stride + h * head_dim, kv, int64_t{kv_of_q[h]} * head_dim, first, pos,
                 scale, slopes != nullptr ? slopes[h] : 0.0f, probs.data(),
                 out + n * out_stride + h * head_dim);
    }
  }
}

void attention_all(const float* q, int64_t n_q_rows, int64_t n_q_heads, int64_t head_dim,
                   const int32_t* kv_of_q, const float* k_cache, const float* v_cache,
                   int64_t n_kv_heads, int64_t kv_len, float scale, float* out, int64_t q_ld) {
  const int64_t out_stride = n_q_heads * head_dim;
  const int64_t q_stride = q_ld > 0 ? q_ld : out_stride;
  const KvView kv{k_cache, v_cache, n_kv_heads * head_dim, head_dim};
  std::vector<float> probs(static_cast<size_t>(kv_len));
  for (int64_t n = 0; n < n_q_rows; ++n) {
    for (int64_t h = 0; h < n_q_heads; ++h) {
      attend_one(q + n * q_stride + h * head_dim, kv, int64_t{kv_of_q[h]} * head_dim, 0, kv_len - 1,
                 scale, 0.0f, probs.data(), out + n * out_stride + h * head_dim);
    }
  }
}

}  // namespace tpe::cpu
