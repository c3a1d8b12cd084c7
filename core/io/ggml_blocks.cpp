#include "core/io/ggml_blocks.hpp"

#include <cstring>
#include <utility>

#include "core/common/error.hpp"
#include "core/io/mapped_file.hpp"

// Each block's arithmetic is written as ggml's dequantize_row_* functions write it (the gguf
// package does the same operations in numpy), and this file is compiled without contracting a
// multiply and an add into one FMA, so the results are the same floats, not merely close ones.

namespace tpe::io {
namespace {

constexpr int64_t kQK = 32;    // elements of a Q4_0 .. Q8_0 block
constexpr int64_t kQKK = 256;  // elements of a K-quant super-block

float half_at(const std::byte* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return f16_to_f32(h);
}

uint8_t u8(const std::byte* p, int64_t i) { return std::to_integer<uint8_t>(p[i]); }

// Q4_K and Q5_K: sub-block j's 6-bit scale and min, packed in 12 bytes.
std::pair<uint8_t, uint8_t> scale_min_k4(int j, const std::byte* q) {
  if (j < 4) return {static_cast<uint8_t>(u8(q, j) & 63), static_cast<uint8_t>(u8(q, j + 4) & 63)};
  return {static_cast<uint8_t>((u8(q, j + 4) & 0xF) | ((u8(q, j - 4) >> 6) << 4)),
          static_cast<uint8_t>((u8(q, j + 4) >> 4) | ((u8(q, j) >> 6) << 4))};
}

void q4_0(const std::byte* b, float* y) {
  const float d = half_at(b);
  const std::byte* qs = b + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>((u8(qs, j) & 0x0F) - 8) * d;
    y[j + kQK / 2] = static_cast<float>((u8(qs, j) >> 4) - 8) * d;
  }
}

void q4_1(const std::byte* b, float* y) {
  const float d = half_at(b);
  const float m = half_at(b + 2);
  const std::byte* qs = b + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>(u8(qs, j) & 0x0F) * d + m;
    y[j + kQK / 2] = static_cast<float>(u8(qs, j) >> 4) * d + m;
  }
}

void q5_0(const std::byte* b, float* y) {
  const float d = half_at(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, sizeof qh);
  const std::byte* qs = b + 6;
  for (int j = 0; j < kQK / 2; ++j) {
    const int x0 = static_cast<int>((u8(qs, j) & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16;
    const int x1 = static_cast<int>((u8(qs, j) >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
    y[j] = static_cast<float>(x0) * d;
    y[j + kQK / 2] = static_cast<float>(x1) * d;
  }
}

void q5_1(const std::byte* b, float* y) {
  const float d = half_at(b);
  const float m = half_at(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, sizeof qh);
  const std::byte* qs = b + 8;
  for (int j = 0; j < kQK / 2; ++j) {
    const uint32_t x0 = (u8(qs, j) & 0x0F) | (((qh >> j) << 4) & 0x10);
    const uint32_t x1 = (u8(qs, j) >> 4) | ((qh >> (j + 12)) & 0x10);
    y[j] = static_cast<float>(x0) * d + m;
    y[j + kQK / 2] = static_cast<float>(x1) * d + m;
  }
}

void q8_0(const std::byte* b, float* y) {
  const float d = half_at(b);
  for (int j = 0; j < kQK; ++j) {
    y[j] = static_cast<float>(static_cast<int8_t>(u8(b + 2, j))) * d;
  }
}

void q4_k(const std::byte* b, float* y) {
  const float d = half_at(b);
  const float min = half_at(b + 2);
  const std::byte* scales = b + 4;
  const std::byte* q = b + 16;
  for (int j = 0, is = 0; j < kQKK; j += 64, is += 2, q += 32) {
    const auto [sc1, m1] = scale_min_k4(is, scales);
    const auto [sc2, m2] = scale_min_k4(is + 1, scales);
    const float d1 = d * static_cast<float>(sc1);
    const float dm1 = min * static_cast<float>(m1);
    const float d2 = d * static_cast<float>(sc2);
    const float dm2 = min * static_cast<float>(m2);
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(u8(q, l) & 0xF) - dm1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(u8(q, l) >> 4) - dm2;
  }
}

void q5_k(const std::byte* b, float* y) {
  const float d = half_at(b);
  const float min = half_at(b + 2);
  const std::byte* scales = b + 4;
  const std::byte* qh = b + 16;
  const std::byte* ql = b + 48;
  unsigned u1 = 1;
  unsigned u2 = 2;
  for (int j = 0, is = 0; j < kQKK; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
    const auto [sc1, m1] = scale_min_k4(is, scales);
    const auto [sc2, m2] = scale_min_k4(is + 1, scales);
    const float d1 = d * static_cast<float>(sc1);
    const float dm1 = min * static_cast<float>(m1);
    const float d2 = d * static_cast<float>(sc2);
    const float dm2 = min * static_cast<float>(m2);
    for (int l = 0; l < 32; ++l) {
      const unsigned v = (u8(ql, l) & 0xF) + ((u8(qh, l) & u1) != 0 ? 16 : 0);
      *y++ = d1 * static_cast<float>(v) - dm1;
    }
    for (int l = 0; l < 32; ++l) {
      const unsigned v = (u8(ql, l) >> 4) + ((u8(qh, l) & u2) != 0 ? 16 : 0);
      *y++ = d2 * static_cast<float>(v) - dm2;
    }
  }
}

void q6_k(const std::byte* b, float* y) {
  const std::byte* ql = b;
  const std::byte* qh = b + 128;
  const std::byte* sc = b + 192;
  const float d = half_at(b + 208);
  for (int n = 0; n < kQKK; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int>((u8(ql, l) & 0xF) | (((u8(qh, l) >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int>((u8(ql, l + 32) & 0xF) | (((u8(qh, l) >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int>((u8(ql, l) >> 4) | (((u8(qh, l) >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int>((u8(ql, l + 32) >> 4) | (((u8(qh, l) >> 6) & 3) << 4)) - 32;
      const auto scale = [&](int i) {
        return d * static_cast<float>(static_cast<int8_t>(u8(sc, i)));
      };
      y[l] = scale(is) * static_cast<float>(q1);
      y[l + 32] = scale(is + 2) * static_cast<float>(q2);
      y[l + 64] = scale(is + 4) * static_cast<float>(q3);
      y[l + 96] = scale(is + 6) * static_cast<float>(q4);
    }
  }
}

struct TypeInfo {
  uint32_t id;
  std::string_view name;
  BlockLayout layout;                                 // {0, 0}: a type tpengine does not read
  void (*block)(const std::byte*, float*) = nullptr;  // a quantized type's dequantizer
};

// Every ggml type id of gguf 0.19 (so that a file's unsupported type is named in messages).
constexpr TypeInfo kTypes[] = {
    {0, "F32", {1, 4}},
    {1, "F16", {1, 2}},
    {2, "Q4_0", {kQK, 18}, q4_0},
    {3, "Q4_1", {kQK, 20}, q4_1},
    {6, "Q5_0", {kQK, 22}, q5_0},
    {7, "Q5_1", {kQK, 24}, q5_1},
    {8, "Q8_0", {kQK, 34}, q8_0},
    {9, "Q8_1", {}},
    {10, "Q2_K", {}},
    {11, "Q3_K", {}},
    {12, "Q4_K", {kQKK, 144}, q4_k},
    {13, "Q5_K", {kQKK, 176}, q5_k},
    {14, "Q6_K", {kQKK, 210}, q6_k},
    {15, "Q8_K", {}},
    {16, "IQ2_XXS", {}},
    {17, "IQ2_XS", {}},
    {18, "IQ3_XXS", {}},
    {19, "IQ1_S", {}},
    {20, "IQ4_NL", {}},
    {21, "IQ3_S", {}},
    {22, "IQ2_S", {}},
    {23, "IQ4_XS", {}},
    {24, "I8", {}},
    {25, "I16", {}},
    {26, "I32", {}},
    {27, "I64", {}},
    {28, "F64", {}},
    {29, "IQ1_M", {}},
    {30, "BF16", {1, 2}},
    {34, "TQ1_0", {}},
    {35, "TQ2_0", {}},
    {39, "MXFP4", {}},
    {40, "NVFP4", {}},
    {41, "Q1_0", {}},
    {42, "Q2_0", {}},
};

const TypeInfo* find_type(uint32_t id) {
  for (const TypeInfo& t : kTypes) {
    if (t.id == id) return &t;
  }
  return nullptr;
}

}  // namespace

std::optional<GgmlType> ggml_type(uint32_t id) {
  const TypeInfo* t = find_type(id);
  if (t == nullptr || t->layout.elements == 0) return std::nullopt;
  return static_cast<GgmlType>(id);
}

std::string_view ggml_type_name(uint32_t id) {
  const TypeInfo* t = find_type(id);
  return t != nullptr ? t->name : std::string_view("an unknown type");
}

std::string_view ggml_supported_types() {
  return "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";
}

BlockLayout block_layout(GgmlType type) {
  const TypeInfo* t = find_type(static_cast<uint32_t>(type));
  TPE_CHECK(t != nullptr && t->layout.elements > 0, "block_layout of ggml type {}",
            static_cast<uint32_t>(type));
  return t->layout;
}

void dequantize(GgmlType type, const std::byte* src, int64_t blocks, float* dst) {
  const BlockLayout l = block_layout(type);
  if (type == GgmlType::F32) {
    if (blocks > 0) std::memcpy(dst, src, static_cast<size_t>(blocks) * sizeof(float));
    return;
  }
  if (type == GgmlType::F16 || type == GgmlType::BF16) {
    for (int64_t i = 0; i < blocks; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, sizeof h);
      dst[i] = type == GgmlType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
    return;
  }
  const auto block = find_type(static_cast<uint32_t>(type))->block;
  TPE_CHECK(block != nullptr, "dequantize of ggml type {}", static_cast<uint32_t>(type));
  for (int64_t i = 0; i < blocks; ++i) block(src + i * l.bytes, dst + i * l.elements);
}

}  // namespace tpe::io
