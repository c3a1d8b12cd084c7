// A GGUF file seen as the Hugging Face checkpoint it was converted from: the config.json that
// checkpoint had (from llama.cpp's metadata keys) and its tensors under their Hugging Face names,
// so that policies (which read config.json keys and name Hugging Face tensors) run GGUF models
// unchanged. Owns: that mapping for the architectures tpengine reads from GGUF (llama, qwen2,
// gptneox), and undoing llama.cpp's reordering of Llama's q and k rows and of GPT-NeoX's fused
// qkv. May not touch: graphs, plans, devices.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/common/index_set.hpp"
#include "core/io/gguf.hpp"

namespace tpe::io {

// The config.json of the file's model (architectures llama, qwen2 and gptneox; others refused
// naming general.architecture). Errors name the file and the metadata key.
nlohmann::json gguf_config_json(const GgufFile& file);

class GgufWeights {
 public:
  // tpe::Error naming the file when its general.architecture is not one tpengine reads.
  explicit GgufWeights(const GgufFile& file);

  // The GGUF name of Hugging Face tensor `name` ("model.layers.3.mlp.up_proj.weight" ->
  // "blk.3.ffn_up.weight"), or "" when it has none.
  std::string gguf_name(std::string_view name) const;
  const GgufTensor* find(std::string_view name) const;
  // As Checkpoint::read_f32, by Hugging Face name and shape, rows in Hugging Face's order.
  void read_f32(std::string_view name, std::span<const int64_t> shape, const IndexSet& rows,
                const IndexSet& cols, std::span<float> out) const;

  // The rows llama.cpp's converter moves, per architecture.
  enum class Reorder {
    kNone,
    // Llama's q and k: each head's two rotary halves interleaved (row 2 j + s of a head holds
    // Hugging Face row s * head_dim / 2 + j).
    kLlamaRotaryHalves,
    // GPT-NeoX's query_key_value: Hugging Face's [q k v] per head regrouped into all heads' q,
    // then k, then v (Hugging Face row (3 h + s) * head_dim + j is row s * hidden + h * head_dim
    // + j there).
    kNeoxQkvPerHead,
  };

 private:
  const GgufFile& file_;
  std::string_view layer_prefix_;
  std::span<const std::pair<std::string_view, std::string_view>> layer_names_;
  std::span<const std::pair<std::string_view, std::string_view>> model_names_;
  Reorder reorder_ = Reorder::kNone;
  int64_t heads_ = 0;
  int64_t kv_heads_ = 0;
};

}  // namespace tpe::io
