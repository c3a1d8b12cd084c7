// The CPU kernels against two references: values computed by torch / transformers 5.23 (fp32,
// pasted below) and naive double-precision implementations. The torch values come from
// deterministic inputs Pattern(n, salt), multiples of 1/8 and so exact in fp32 on both sides:
//
//   import torch, types
//   from transformers import LlamaConfig, GPTNeoXConfig
//   from transformers.activations import ACT2FN
//   from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
//       apply_rotary_pos_emb, eager_attention_forward)
//   from transformers.models.gpt_neox.modeling_gpt_neox import (GPTNeoXRotaryEmbedding,
//       apply_rotary_pos_emb as neox_apply)
//   torch.set_grad_enabled(False)
//   def pat(n, salt):
//       return torch.tensor([(((i * 7 + salt * 13) % 23) - 11) / 8 for i in range(n)])
//   def show(t): print(", ".join("%.9gf" % v for v in t.flatten().tolist()))
//
// Each test quotes the rest of its snippet.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <random>
#include <vector>

#include "kernels/alibi.hpp"
#include "kernels/cpu/ops.hpp"

namespace {

using Vec = std::vector<float>;

Vec Pattern(int n, int salt) {
  Vec v;
  for (int i = 0; i < n; ++i) v.push_back(static_cast<float>((i * 7 + salt * 13) % 23 - 11) / 8);
  return v;
}

Vec Random(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  Vec v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// |actual - expected| <= rel * |expected| + abs, element by element.
void ExpectClose(const Vec& actual, const std::vector<double>& expected, double rel,
                 double abs = 0.0) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_NEAR(actual[i], expected[i], rel * std::abs(expected[i]) + abs) << "at index " << i;
  }
}

// Tolerances: against torch fp32, a few ulps; against double references, fp32 accumulation.
constexpr double kTorchRel = 1e-6;
constexpr double kTorchAbs = 2e-7;
constexpr double kNaiveRel = 1e-5;
constexpr double kNaiveAbs = 1e-6;

tpe_rope_desc Rope(tpe_rope_type type, double theta) {
  tpe_rope_desc rope{};
  rope.struct_size = sizeof(rope);
  rope.type = type;
  rope.theta = theta;
  rope.partial_rotary_factor = 1.0;
  rope.factor = 1.0;
  return rope;
}

// ---- naive double-precision references -----------------------------------------------------

std::vector<double> NaiveLinear(const Vec& x, int64_t tokens, int64_t in, const Vec& w, int64_t out,
                                const float* bias) {
  std::vector<double> y(static_cast<size_t>(tokens * out));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = bias ? bias[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) acc += double{x[t * in + i]} * w[o * in + i];
      y[t * out + o] = acc;
    }
  }
  return y;
}

std::vector<double> NaiveRmsNorm(const Vec& x, int64_t width, const Vec& w, double eps) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r < x.size() / width; ++r) {
    double ms = 0.0;
    for (int64_t i = 0; i < width; ++i) ms += double{x[r * width + i]} * x[r * width + i] / width;
    for (int64_t i = 0; i < width; ++i)
      y[r * width + i] = x[r * width + i] / std::sqrt(ms + eps) * w[i];
  }
  return y;
}

std::vector<double> NaiveLayerNorm(const Vec& x, int64_t width, const Vec& w, const Vec& b,
                                   double eps) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r < x.size() / width; ++r) {
    const float* row = x.data() + r * width;
    double mean = 0.0;
    for (int64_t i = 0; i < width; ++i) mean += double{row[i]} / width;
    double var = 0.0;
    for (int64_t i = 0; i < width; ++i) var += (row[i] - mean) * (row[i] - mean) / width;
    for (int64_t i = 0; i < width; ++i) {
      y[r * width + i] = (row[i] - mean) / std::sqrt(var + eps) * w[i] + b[i];
    }
  }
  return y;
}

double NaiveActivation(tpe_activation act, double x) {
  switch (act) {
    case TPE_ACT_SILU:
      return x / (1.0 + std::exp(-x));
    case TPE_ACT_GELU:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case TPE_ACT_GELU_TANH:
      return 0.5 * x *
             (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
    case TPE_ACT_RELU:
      return std::max(x, 0.0);
  }
  return std::numeric_limits<double>::quiet_NaN();
}

// The published formulas, in double, without transformers' fp32 steps.
std::vector<double> NaiveInvFreq(const tpe_rope_desc& rope, int64_t head_dim, int64_t seq_len) {
  auto dim = static_cast<int64_t>(head_dim * rope.partial_rotary_factor);
  dim -= dim % 2;
  double base = rope.theta;
  const auto orig = static_cast<double>(rope.original_max_position_embeddings);
  if (rope.type == TPE_ROPE_DYNAMIC && seq_len > rope.original_max_position_embeddings) {
    base *= std::pow(rope.factor * seq_len / orig - (rope.factor - 1), dim / (dim - 2.0));
  }
  std::vector<double> inv(static_cast<size_t>(dim / 2));
  for (int64_t i = 0; i < dim / 2; ++i) {
    double f = 1.0 / std::pow(base, 2.0 * i / dim);
    if (rope.type == TPE_ROPE_LINEAR) f /= rope.factor;
    if (rope.type == TPE_ROPE_LLAMA3) {
      const double wavelen = 2 * std::numbers::pi / f;
      const double smooth =
          (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
      if (wavelen > orig / rope.low_freq_factor) {
        f /= rope.factor;
      } else if (wavelen >= orig / rope.high_freq_factor) {
        f = (1 - smooth) * f / rope.factor + smooth * f;
      }
    }
    inv[static_cast<size_t>(i)] = f;
  }
  return inv;
}

// The angle is rounded to fp32 as in the spec (positions * inv_freq in fp32); the rest in double.
std::vector<double> NaiveRotary(const Vec& x, int64_t tokens, int64_t n_heads, int64_t head_dim,
                                const std::vector<int64_t>& positions, const Vec& inv_freq) {
  std::vector<double> y(x.begin(), x.end());
  const auto half = static_cast<int64_t>(inv_freq.size());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t base = (t * n_heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<float>(positions[t]) * inv_freq[i];
        const double x1 = x[base + i];
        const double x2 = x[base + i + half];
        y[base + i] = x1 * std::cos(angle) - x2 * std::sin(angle);
        y[base + i + half] = x2 * std::cos(angle) + x1 * std::sin(angle);
      }
    }
  }
  return y;
}

struct AttnShape {
  int64_t tokens, n_q_heads, n_kv_heads, head_dim, window;
};

// Full causal attention over all `tokens` positions, materializing each score row.
std::vector<double> NaiveAttention(const AttnShape& s, const Vec& q, const Vec& k, const Vec& v,
                                   const std::vector<int32_t>& kv_of_q, double scale) {
  std::vector<double> out(static_cast<size_t>(s.tokens * s.n_q_heads * s.head_dim), 0.0);
  for (int64_t p = 0; p < s.tokens; ++p) {
    for (int64_t h = 0; h < s.n_q_heads; ++h) {
      std::vector<double> w(static_cast<size_t>(s.tokens), 0.0);
      double max_score = -1e300;
      for (int64_t j = 0; j <= p; ++j) {
        if (s.window > 0 && p - j >= s.window) continue;
        double dot = 0.0;
        for (int64_t d = 0; d < s.head_dim; ++d) {
          dot += double{q[(p * s.n_q_heads + h) * s.head_dim + d]} *
                 k[(j * s.n_kv_heads + kv_of_q[h]) * s.head_dim + d];
        }
        w[j] = dot * scale;
        max_score = std::max(max_score, w[j]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j <= p; ++j) {
        const bool visible = s.window == 0 || p - j < s.window;
        w[j] = visible ? std::exp(w[j] - max_score) : 0.0;
        sum += w[j];
      }
      for (int64_t j = 0; j <= p; ++j) {
        for (int64_t d = 0; d < s.head_dim; ++d) {
          out[(p * s.n_q_heads + h) * s.head_dim + d] +=
              w[j] / sum * v[(j * s.n_kv_heads + kv_of_q[h]) * s.head_dim + d];
        }
      }
    }
  }
  return out;
}

Vec RunAttention(const AttnShape& s, const Vec& q, const Vec& k, const Vec& v,
                 const std::vector<int32_t>& kv_of_q) {
  Vec out(q.size());
  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)));
  tpe::cpu::attention(q.data(), s.tokens, 0, s.n_q_heads, s.head_dim, kv_of_q.data(), k.data(),
                      v.data(), s.n_kv_heads, scale, s.window, out.data());
  return out;
}

// ---- linear --------------------------------------------------------------------------------

// x = pat(15, 1).view(3, 5); w = pat(20, 2).view(4, 5); b = pat(4, 3)
// show(torch.nn.functional.linear(x, w, b))
// transformers' BLOOM build_alibi_tensor slopes: for 6 heads, the 4 of the power of two below
// (2^-2, 2^-4, 2^-6, 2^-8), then every other one of 8's (2^-1, 2^-3); for 8 heads 2^-(h+1).
TEST(CpuOps, AlibiSlopesAreBloomsBothBranches) {
  const float six[] = {0.25f, 0.0625f, 0.015625f, 0.00390625f, 0.5f, 0.125f};
  for (int h = 0; h < 6; ++h) EXPECT_FLOAT_EQ(tpe::alibi_slope(h, 6, 8.0f), six[h]) << h;
  for (int h = 0; h < 8; ++h) {
    EXPECT_FLOAT_EQ(tpe::alibi_slope(h, 8, 8.0f), std::ldexp(1.0f, -(h + 1))) << h;
  }
}

TEST(CpuOps, LinearMatchesTorch) {
  const Vec x = Pattern(15, 1), w = Pattern(20, 2), b = Pattern(4, 3);
  Vec y(12);
  tpe::cpu::linear(x.data(), 3, 5, w.data(), 4, b.data(), y.data());
  ExpectClose(y,
              {-0.75f, 1.828125f, -1.703125f, 0.515625f, 4.15625f, -3.578125f, 2.703125f, -1.4375f,
               -1.0f, 2.15625f, -1.875f, 0.5625f},
              kTorchRel, kTorchAbs);
}

TEST(CpuOps, LinearMatchesNaive) {
  const int64_t tokens = 7, in = 67, out = 19;
  const Vec x = Random(tokens * in, 1), w = Random(out * in, 2), b = Random(out, 3);
  Vec y(tokens * out);
  tpe::cpu::linear(x.data(), tokens, in, w.data(), out, b.data(), y.data());
  ExpectClose(y, NaiveLinear(x, tokens, in, w, out, b.data()), kNaiveRel, kNaiveAbs);
  tpe::cpu::linear(x.data(), tokens, in, w.data(), out, nullptr, y.data());
  ExpectClose(y, NaiveLinear(x, tokens, in, w, out, nullptr), kNaiveRel, kNaiveAbs);
}

TEST(CpuOps, LinearWithNoInputFeaturesGivesBias) {
  const Vec b = {1.5f, -2.0f};
  Vec y(4, 99.0f);
  tpe::cpu::linear(nullptr, 2, 0, nullptr, 2, b.data(), y.data());
  EXPECT_EQ(y, (Vec{1.5f, -2.0f, 1.5f, -2.0f}));
}

// ---- norms ---------------------------------------------------------------------------------

// n = LlamaRMSNorm(8, eps=1e-6); n.weight.copy_(pat(8, 5)); show(n(pat(16, 4).view(2, 8)))
TEST(CpuOps, RmsNormMatchesTorch) {
  const Vec x = Pattern(16, 4), w = Pattern(8, 5);
  Vec y(16);
  tpe::cpu::rms_norm(x.data(), 2, 8, w.data(), 1e-6f, y.data());
  ExpectClose(y,
              {-0.826191664f, -0.330476671f, -0.185893133f, -0.867501259f, -0.0f, -0.433750629f,
               -0.743572533f, -0.454405427f, 0.733235002f, 1.6131171f, 0.0733235031f, 0.329955757f,
               -1.83308744f, 0.329955757f, 0.0733235031f, 1.6131171f},
              kTorchRel, kTorchAbs);
}

TEST(CpuOps, RmsNormMatchesNaive) {
  const int64_t tokens = 5, width = 96;
  const Vec x = Random(tokens * width, 4, -3.0f, 3.0f), w = Random(width, 5);
  Vec y(x.size());
  tpe::cpu::rms_norm(x.data(), tokens, width, w.data(), 1e-5f, y.data());
  ExpectClose(y, NaiveRmsNorm(x, width, w, double{1e-5f}), kNaiveRel, kNaiveAbs);
}

// ln = torch.nn.LayerNorm(8, eps=1e-5); ln.weight.copy_(pat(8, 6)); ln.bias.copy_(pat(8, 7))
// show(ln(pat(16, 8).view(2, 8)))
TEST(CpuOps, LayerNormMatchesTorch) {
  const Vec x = Pattern(16, 8), w = Pattern(8, 6), b = Pattern(8, 7);
  Vec y(16);
  tpe::cpu::layer_norm(x.data(), 2, 8, w.data(), b.data(), 1e-5f, y.data());
  ExpectClose(y,
              {1.31789446f, 0.244562104f, 1.99171996f, 1.1769141f, -0.477856696f, -1.99869502f,
               1.20205915f, -1.03415024f, 1.02232945f, -1.15400577f, 0.0560311973f, 0.560727119f,
               -1.29820466f, -0.176335275f, 0.240193009f, -1.30133533f},
              kTorchRel, kTorchAbs);
}

TEST(CpuOps, LayerNormMatchesNaive) {
  const int64_t tokens = 5, width = 96;
  // An offset mean tests that the variance is taken about the mean.
  const Vec x = Random(tokens * width, 6, 2.0f, 5.0f), w = Random(width, 7), b = Random(width, 8);
  Vec y(x.size());
  tpe::cpu::layer_norm(x.data(), tokens, width, w.data(), b.data(), 1e-5f, y.data());
  ExpectClose(y, NaiveLayerNorm(x, width, w, b, double{1e-5f}), kNaiveRel, kNaiveAbs);
}

// ---- activations ---------------------------------------------------------------------------

// a = torch.tensor([-12.5, -6, -2.5, -1, -0.25, 0, 0.375, 1, 2.75, 7, 15])
// for act in ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]: show(ACT2FN[act](a))
// gelu_new and gelu_pytorch_tanh print the same values.
const Vec kActInput = {-12.5f, -6.0f, -2.5f, -1.0f, -0.25f, 0.0f, 0.375f, 1.0f, 2.75f, 7.0f, 15.0f};

Vec Activate(tpe_activation act, Vec x) {
  tpe::cpu::activation(act, x.data(), std::ssize(x));
  return x;
}

TEST(CpuOps, SiluMatchesTorch) {
  ExpectClose(Activate(TPE_ACT_SILU, kActInput),
              {-4.65829908e-05f, -0.0148357386f, -0.189645454f, -0.268941432f, -0.109455876f, 0.0f,
               0.222249985f, 0.731058598f, 2.58476162f, 6.99362278f, 14.9999943f},
              kTorchRel);
}

TEST(CpuOps, GeluMatchesTorch) {
  ExpectClose(Activate(TPE_ACT_GELU, kActInput),
              {-0.0f, -0.0f, -0.0155241787f, -0.158655256f, -0.100323416f, 0.0f, 0.242313668f,
               0.841344714f, 2.74180579f, 7.0f, 15.0f},
              kTorchRel, 1e-9);
}

TEST(CpuOps, GeluTanhMatchesTorch) {
  ExpectClose(Activate(TPE_ACT_GELU_TANH, kActInput),
              {-0.0f, -0.0f, -0.0150842965f, -0.158807993f, -0.100324646f, 0.0f, 0.242307767f,
               0.841192007f, 2.74227667f, 7.0f, 15.0f},
              kTorchRel, 1e-9);
}

TEST(CpuOps, ReluMatchesTorch) {
  EXPECT_EQ(Activate(TPE_ACT_RELU, kActInput),
            (Vec{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.375f, 1.0f, 2.75f, 7.0f, 15.0f}));
}

TEST(CpuOps, ActivationsMatchNaive) {
  const Vec x = Random(1000, 9, -10.0f, 10.0f);
  for (const tpe_activation act : {TPE_ACT_SILU, TPE_ACT_GELU, TPE_ACT_GELU_TANH, TPE_ACT_RELU}) {
    std::vector<double> expected(x.size());
    std::transform(x.begin(), x.end(), expected.begin(),
                   [act](float v) { return NaiveActivation(act, v); });
    SCOPED_TRACE(static_cast<int>(act));
    ExpectClose(Activate(act, x), expected, kNaiveRel, 1e-7);
  }
}

// ---- rope frequencies ----------------------------------------------------------------------
//
// def llama_rope(params, head_dim=16, mpe=64, positions=None):
//     cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
//                       max_position_embeddings=mpe, rope_parameters=params)
//     rot = LlamaRotaryEmbedding(cfg)
//     if positions is not None:  # the forward pass updates dynamic NTK frequencies
//         rot(torch.zeros(1), torch.tensor([positions]))
//     return rot.inv_freq

// show(llama_rope({"rope_type": "default", "rope_theta": 10000.0}))
const std::vector<double> kDefaultInvFreq = {1.0f,           0.316227764f,   0.100000001f,
                                             0.0316227786f,  0.00999999978f, 0.00316227786f,
                                             0.00100000005f, 0.000316227786f};

TEST(CpuOps, RopeDefaultMatchesTorch) {
  ExpectClose(tpe::cpu::rope_inv_freq(Rope(TPE_ROPE_DEFAULT, 10000.0), 16, 1), kDefaultInvFreq,
              kTorchRel);
}

// neox = GPTNeoXConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=64,
//     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
//                      "partial_rotary_factor": 0.25})
// show(GPTNeoXRotaryEmbedding(neox).inv_freq)
TEST(CpuOps, RopePartialMatchesTorch) {
  tpe_rope_desc rope = Rope(TPE_ROPE_DEFAULT, 10000.0);
  rope.partial_rotary_factor = 0.25;
  ExpectClose(tpe::cpu::rope_inv_freq(rope, 32, 1),
              {1.0f, 0.100000001f, 0.00999999978f, 0.00100000005f}, kTorchRel);
}

// show(llama_rope({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}))
TEST(CpuOps, RopeLinearMatchesTorch) {
  tpe_rope_desc rope = Rope(TPE_ROPE_LINEAR, 10000.0);
  rope.factor = 4.0;
  ExpectClose(tpe::cpu::rope_inv_freq(rope, 16, 1),
              {0.25f, 0.079056941f, 0.0250000004f, 0.00790569466f, 0.00249999994f, 0.000790569466f,
               0.000250000012f, 7.90569466e-05f},
              kTorchRel);
}

// dyn = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
// show(llama_rope(dyn, positions=list(range(40))))  # == kDefaultInvFreq
// show(llama_rope(dyn, positions=list(range(100))))
// show(llama_rope(dyn, positions=[4999]))
// transformers 5 scales against max_position_embeddings (64 here), which the host passes as
// original_max_position_embeddings.
TEST(CpuOps, RopeDynamicMatchesTorch) {
  tpe_rope_desc rope = Rope(TPE_ROPE_DYNAMIC, 10000.0);
  rope.factor = 2.0;
  rope.original_max_position_embeddings = 64;
  ExpectClose(tpe::cpu::rope_inv_freq(rope, 16, 40), kDefaultInvFreq, kTorchRel);
  ExpectClose(tpe::cpu::rope_inv_freq(rope, 16, 64), kDefaultInvFreq, kTorchRel);
  ExpectClose(tpe::cpu::rope_inv_freq(rope, 16, 100),
              {1.0f, 0.283945143f, 0.0806248412f, 0.0228930302f, 0.00650036521f, 0.001845747f,
               0.000524090894f, 0.000148813066f},
              kTorchRel);
  ExpectClose(tpe::cpu::rope_inv_freq(rope, 16, 5000),
              {1.0f, 0.153813854f, 0.0236587059f, 0.00363903702f, 0.000559734297f, 8.60949003e-05f,
               1.32425903e-05f, 2.03689387e-06f},
              kTorchRel);
}

// show(llama_rope({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
//     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
//     "original_max_position_embeddings": 8192}, mpe=131072))
// Index 4 falls in the interpolated band, 0-3 above it, 5-7 below.
TEST(CpuOps, RopeLlama3MatchesTorch) {
  tpe_rope_desc rope = Rope(TPE_ROPE_LLAMA3, 500000.0);
  rope.factor = 8.0;
  rope.low_freq_factor = 1.0;
  rope.high_freq_factor = 4.0;
  rope.original_max_position_embeddings = 8192;
  ExpectClose(tpe::cpu::rope_inv_freq(rope, 16, 1),
              {1.0f, 0.193922758f, 0.0376060307f, 0.00729266508f, 0.000524846022f, 3.42810235e-05f,
               6.64786967e-06f, 1.28917316e-06f},
              kTorchRel);
}

TEST(CpuOps, RopeMatchesNaive) {
  std::vector<tpe_rope_desc> ropes;
  for (const tpe_rope_type type :
       {TPE_ROPE_DEFAULT, TPE_ROPE_LINEAR, TPE_ROPE_DYNAMIC, TPE_ROPE_LLAMA3}) {
    tpe_rope_desc rope = Rope(type, type == TPE_ROPE_LLAMA3 ? 500000.0 : 1e6);
    rope.factor = 8.0;
    rope.low_freq_factor = 1.0;
    rope.high_freq_factor = 4.0;
    rope.original_max_position_embeddings = 8192;
    ropes.push_back(rope);
    rope.partial_rotary_factor = 0.4;  // 128 * 0.4 = 51.2: truncated, then rounded down to 50
    ropes.push_back(rope);
  }
  for (const tpe_rope_desc& rope : ropes) {
    for (const int64_t seq_len : {100, 8192, 8193, 100000}) {
      SCOPED_TRACE(testing::Message() << "type " << rope.type << " partial "
                                      << rope.partial_rotary_factor << " seq " << seq_len);
      ExpectClose(tpe::cpu::rope_inv_freq(rope, 128, seq_len), NaiveInvFreq(rope, 128, seq_len),
                  2e-6);
    }
  }
}

// ---- rotary --------------------------------------------------------------------------------

// cfg = LlamaConfig(hidden_size=16, num_attention_heads=2, head_dim=8,
//                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
// rot = LlamaRotaryEmbedding(cfg)
// q = pat(48, 9).view(1, 3, 2, 8).transpose(1, 2)
// cos, sin = rot(q, torch.tensor([[0, 5, 1000]]))
// qe, _ = apply_rotary_pos_emb(q, q, cos, sin); show(qe.transpose(1, 2))
TEST(CpuOps, RotaryMatchesTorch) {
  Vec x = Pattern(48, 9);
  const std::vector<int64_t> positions = {0, 5, 1000};
  tpe::cpu::rotary(x.data(), 3, 2, 8, positions.data(),
                   tpe::cpu::rope_inv_freq(Rope(TPE_ROPE_DEFAULT, 10000.0), 8, 1001));
  ExpectClose(
      x,
      {-1.125f,       -0.25f,         0.625f,        -1.375f,       -0.5f,         0.375f,
       1.25f,         -0.75f,         0.125f,        1.0f,          -1.0f,         -0.125f,
       0.75f,         -1.25f,         -0.375f,       0.5f,          -0.449023247f, -0.548489094f,
       0.205955803f,  1.13061094f,    -1.56672537f,  -0.299640954f, 0.886401296f,  -1.11936092f,
       0.28868106f,   -0.0507928133f, -1.33579719f,  -0.500618756f, 0.346104383f,  1.39661908f,
       -0.817784071f, 0.122498445f,   1.5959785f,    -1.05220604f,  0.376894504f,  -0.751795828f,
       0.123905718f,  0.182996094f,   -0.351533115f, 1.37401891f,   -0.351486921f, 0.658649683f,
       -1.55597925f,  -0.262396812f,  -0.516799748f, 0.627937555f,  0.331931651f,  -0.871362686f},
      kTorchRel, kTorchAbs);
}

// neox = GPTNeoXConfig(hidden_size=8, num_attention_heads=1, rope_parameters={
//     "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
// rot = GPTNeoXRotaryEmbedding(neox)
// q = pat(16, 16).view(1, 2, 1, 8).transpose(1, 2)
// cos, sin = rot(q, torch.tensor([[3, 77]]))
// qe, _ = neox_apply(q, q, cos, sin); show(qe.transpose(1, 2))
TEST(CpuOps, RotaryPartialMatchesTorch) {
  Vec x = Pattern(16, 16);
  tpe_rope_desc rope = Rope(TPE_ROPE_DEFAULT, 10000.0);
  rope.partial_rotary_factor = 0.5;
  const std::vector<int64_t> positions = {3, 77};
  tpe::cpu::rotary(x.data(), 2, 1, 8, positions.data(), tpe::cpu::rope_inv_freq(rope, 8, 78));
  ExpectClose(
      x,
      {1.16693068f, -0.416075081f, -0.671396255f, 1.36313295f, -0.625f, 0.25f, 1.125f, -0.875f,
       1.12446022f, 0.802205682f, 0.0348469131f, 0.429640651f, 0.625f, -1.375f, -0.5f, 0.375f},
      kTorchRel, kTorchAbs);
}

TEST(CpuOps, RotaryMatchesNaive) {
  const int64_t tokens = 4, n_heads = 3, head_dim = 64;
  const std::vector<int64_t> positions = {0, 17, 4095, 31000};
  for (const double partial : {1.0, 0.5}) {
    tpe_rope_desc rope = Rope(TPE_ROPE_DEFAULT, 500000.0);
    rope.partial_rotary_factor = partial;
    const Vec inv_freq = tpe::cpu::rope_inv_freq(rope, head_dim, 31001);
    const Vec x = Random(tokens * n_heads * head_dim, 10);
    Vec y = x;
    tpe::cpu::rotary(y.data(), tokens, n_heads, head_dim, positions.data(), inv_freq);
    ExpectClose(y, NaiveRotary(x, tokens, n_heads, head_dim, positions, inv_freq), kNaiveRel,
                kNaiveAbs);
  }
}

// ---- attention -----------------------------------------------------------------------------
//
// def attn(T, hq, hkv, hd, window, salts):
//     q = pat(T * hq * hd, salts[0]).view(1, T, hq, hd).transpose(1, 2)
//     k = pat(T * hkv * hd, salts[1]).view(1, T, hkv, hd).transpose(1, 2)
//     v = pat(T * hkv * hd, salts[2]).view(1, T, hkv, hd).transpose(1, 2)
//     p = torch.arange(T)[:, None]; j = torch.arange(T)[None, :]
//     visible = (j <= p) & ((window == 0) | (p - j < window))
//     mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
//     mod = types.SimpleNamespace(num_key_value_groups=hq // hkv, training=False)
//     out, _ = eager_attention_forward(mod, q, k, v, mask, scaling=hd ** -0.5)
//     return out

// show(attn(4, 2, 2, 4, 0, (10, 11, 12)))
TEST(CpuOps, AttentionMhaMatchesTorch) {
  const AttnShape s{4, 2, 2, 4, 0};
  const Vec out = RunAttention(s, Pattern(32, 10), Pattern(32, 11), Pattern(32, 12), {0, 1});
  ExpectClose(out, {0.875f,         -1.125f,       -0.25f,        0.625f,         -1.375f,
                    -0.5f,          0.375f,        1.25f,         0.716740549f,   -1.00326204f,
                    -0.128261998f,  0.466740608f,  -0.844484925f, 0.0305149853f,  -0.31466946f,
                    0.56033051f,    -0.287048727f, 0.125f,        0.537048817f,   -0.537048817f,
                    -0.198128849f,  0.395604163f,  -0.873665512f, 0.00133448094f, -0.45354712f,
                    -0.0518108457f, 0.505454898f,  -0.70354712f,  0.487471789f,   -0.573681355f,
                    0.0806673989f,  0.683199465f},
              kTorchRel, kTorchAbs);
}

// show(attn(4, 4, 2, 4, 0, (13, 14, 15))); repeat_kv maps q heads 0,1 -> kv 0 and 2,3 -> kv 1.
TEST(CpuOps, AttentionGqaMatchesTorch) {
  const AttnShape s{4, 4, 2, 4, 0};
  const Vec out = RunAttention(s, Pattern(64, 13), Pattern(32, 14), Pattern(32, 15), {0, 0, 1, 1});
  ExpectClose(out, {0.0f,          0.875f,        -1.125f,       -0.25f,          0.0f,
                    0.875f,        -1.125f,       -0.25f,        0.625f,          -1.375f,
                    -0.5f,         0.375f,        0.625f,        -1.375f,         -0.5f,
                    0.375f,        1.11663675f,   -0.576627791f, -0.00836324692f, 0.866636753f,
                    0.654275477f,  0.0244419277f, -0.470724642f, 0.404275477f,    -0.776509762f,
                    -0.296915621f, 0.578084469f,  -1.02650976f,  -0.461930454f,   -0.53889972f,
                    0.33610034f,   -0.711930454f, 0.94732517f,   -0.462462068f,   0.175456643f,
                    0.69732511f,   0.960679173f,  -0.458014637f, 0.116118222f,    0.710679173f,
                    -0.558459878f, -0.159005344f, 0.318661451f,  -0.808459878f,   -0.0396855623f,
                    0.204490662f,  -0.309161663f, -0.289685577f, -0.0331202f,     0.571600556f,
                    -0.111835688f, -0.283120215f, 0.914916813f,  -0.790957272f,   -0.0475669578f,
                    0.664916754f,  -0.874910176f, -0.349802852f, 0.299289465f,    0.185294837f,
                    -0.903770685f, -0.267646164f, 0.370337337f,  -0.0663465858f},
              kTorchRel, kTorchAbs);
}

// show(attn(5, 1, 1, 4, 2, (17, 18, 19)))
TEST(CpuOps, AttentionWindowMatchesTorch) {
  const AttnShape s{5, 1, 1, 4, 2};
  const Vec out = RunAttention(s, Pattern(20, 17), Pattern(20, 18), Pattern(20, 19), {0});
  ExpectClose(out, {0.75f,         -1.25f,          -0.375f,       0.5f,         1.12041664f,
                    -0.879583418f, -0.00458338857f, 0.870416641f,  0.206077039f, -0.300299197f,
                    0.574700892f,  -0.0439229608f,  -0.623945117f, 0.251054883f, -0.0287975669f,
                    -0.873945117f, 0.0381354839f,   0.913135469f,  -1.08686447f, -0.211864516f},
              kTorchRel, kTorchAbs);
}

TEST(CpuOps, AttentionMatchesNaive) {
  // kv_of_q need not be the contiguous grouping: any q head may read any kv head.
  const std::vector<int32_t> kv_of_q = {1, 0, 2, 2, 0, 1};
  for (const int64_t window : {0, 1, 3, 100}) {
    const AttnShape s{9, 6, 3, 16, window};
    const Vec q = Random(9 * 6 * 16, 11, -2.0f, 2.0f);
    const Vec k = Random(9 * 3 * 16, 12, -2.0f, 2.0f);
    const Vec v = Random(9 * 3 * 16, 13);
    SCOPED_TRACE(window);
    ExpectClose(RunAttention(s, q, k, v, kv_of_q), NaiveAttention(s, q, k, v, kv_of_q, 0.25),
                kNaiveRel, kNaiveAbs);
  }
}

// Prefill of 5 tokens then decode of 1 and 2 tokens against the cache must reproduce the rows
// of one pass over all 8.
TEST(CpuOps, AttentionDecodeMatchesFullRecompute) {
  const int64_t total = 8, n_q = 4, n_kv = 2, hd = 8, window = 4;
  const std::vector<int32_t> kv_of_q = {0, 0, 1, 1};
  const Vec q = Random(total * n_q * hd, 14), k = Random(total * n_kv * hd, 15);
  const Vec v = Random(total * n_kv * hd, 16);
  const Vec full = RunAttention({total, n_q, n_kv, hd, window}, q, k, v, kv_of_q);

  Vec chunked(full.size(), 0.0f);
  const int64_t q_row = n_q * hd;
  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  for (const auto& [start, n_new] : {std::pair<int64_t, int64_t>{0, 5}, {5, 1}, {6, 2}}) {
    tpe::cpu::attention(q.data() + start * q_row, n_new, start, n_q, hd, kv_of_q.data(), k.data(),
                        v.data(), n_kv, scale, window, chunked.data() + start * q_row);
  }
  ExpectClose(chunked, std::vector<double>(full.begin(), full.end()), 1e-6, 1e-7);
}

}  // namespace
