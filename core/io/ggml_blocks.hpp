// ggml's tensor element types as GGUF files store them: plain floats, and quantization blocks
// (a fixed number of elements in a fixed number of bytes, with their own scales). Owns: the block
// layouts and dequantizing them to fp32, bit for bit as ggml's reference code (and the gguf
// Python package) do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace tpe::io {

// The ggml type ids tpengine reads (values as in ggml.h).
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30,
};

struct BlockLayout {
  int64_t elements;  // per block
  int64_t bytes;     // per block
};

// The type with this id, or nullopt for ids tpengine does not read.
std::optional<GgmlType> ggml_type(uint32_t id);
// ggml's name for a type id ("Q4_K"), also for ids tpengine does not read; "type 99" otherwise.
std::string_view ggml_type_name(uint32_t id);
// The names of the types tpengine reads, for messages: "F32, F16, ...".
std::string_view ggml_supported_types();
BlockLayout block_layout(GgmlType type);

// Dequantizes `blocks` whole blocks of `type` at `src` (no alignment needed) into
// blocks * block_layout(type).elements floats at `dst`.
void dequantize(GgmlType type, const std::byte* src, int64_t blocks, float* dst);

}  // namespace tpe::io
