#include "core/io/gguf_model.hpp"

#include <charconv>
#include <utility>

#include "core/common/error.hpp"

namespace tpe::io {
namespace {

// Per-layer tensors: Hugging Face suffix -> GGUF suffix (llama.cpp's names for both families).
constexpr std::pair<std::string_view, std::string_view> kLayerNames[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

constexpr std::pair<std::string_view, std::string_view> kModelNames[] = {
    {"model.embed_tokens.weight", "token_embd.weight"},
    {"model.norm.weight", "output_norm.weight"},
    {"lm_head.weight", "output.weight"},
};

void check_architecture(const GgufFile& file, const std::string& arch) {
  if (arch != "llama" && arch != "qwen2") {
    fail("{}: GGUF architecture '{}' is not supported; tpengine reads llama and qwen2 GGUF files",
         printable(file.path().string()), printable(arch));
  }
}

}  // namespace

// llama.cpp's metadata keys (gguf-py's constants, which its converter writes from config.json)
// mapped back onto the config.json keys.
nlohmann::json gguf_config_json(const GgufFile& file) {
  const std::string arch = file.string("general.architecture");
  check_architecture(file, arch);
  nlohmann::json c;
  c["model_type"] = arch;
  c["architectures"] = {arch == "llama" ? "LlamaForCausalLM" : "Qwen2ForCausalLM"};
  const auto key = [&](const char* name) { return arch + "." + name; };
  const auto has = [&](const std::string& k) { return file.find_value(k) != nullptr; };
  c["hidden_size"] = file.integer(key("embedding_length"));
  c["intermediate_size"] = file.integer(key("feed_forward_length"));
  c["num_hidden_layers"] = file.integer(key("block_count"));
  const int64_t heads = file.integer(key("attention.head_count"));
  c["num_attention_heads"] = heads;
  c["num_key_value_heads"] =
      has(key("attention.head_count_kv")) ? file.integer(key("attention.head_count_kv")) : heads;
  c["rms_norm_eps"] = file.number(key("attention.layer_norm_rms_epsilon"));
  c["rope_theta"] = has(key("rope.freq_base")) ? file.number(key("rope.freq_base")) : 10000.0;
  c["max_position_embeddings"] = file.integer(key("context_length"));
  if (has(key("attention.key_length"))) c["head_dim"] = file.integer(key("attention.key_length"));
  if (has(key("vocab_size"))) {
    c["vocab_size"] = file.integer(key("vocab_size"));
  } else if (has("tokenizer.ggml.tokens")) {
    c["vocab_size"] = file.array("tokenizer.ggml.tokens").strings.size();
  } else if (const GgufTensor* embed = file.find("token_embd.weight")) {
    c["vocab_size"] = embed->shape()[0];
  }
  if (has(key("rope.scaling.type"))) {
    const std::string type = file.string(key("rope.scaling.type"));
    if (type == "linear") {
      c["rope_scaling"] = {{"rope_type", "linear"},
                           {"factor", file.number(key("rope.scaling.factor"))}};
    } else if (type != "none") {
      fail(
          "{}: metadata '{}' is '{}'; tpengine reads GGUF files without rope scaling or with "
          "linear scaling",
          printable(file.path().string()), key("rope.scaling.type"), printable(type));
    }
  }
  // llama.cpp's converter writes no output.weight when the embeddings are tied.
  c["tie_word_embeddings"] = file.find("output.weight") == nullptr;
  for (const char* id : {"bos_token_id", "eos_token_id"}) {
    const std::string k = std::string("tokenizer.ggml.") + id;
    if (has(k)) c[id] = file.integer(k);
  }
  return c;
}

GgufWeights::GgufWeights(const GgufFile& file) : file_(file) {
  arch_ = file.string("general.architecture");
  check_architecture(file, arch_);
  heads_ = file.integer(arch_ + ".attention.head_count");
  kv_heads_ = file.find_value(arch_ + ".attention.head_count_kv") != nullptr
                  ? file.integer(arch_ + ".attention.head_count_kv")
                  : heads_;
}

std::string GgufWeights::gguf_name(std::string_view name) const {
  for (const auto& [hf, gguf] : kModelNames) {
    if (name == hf) return std::string(gguf);
  }
  constexpr std::string_view kPrefix = "model.layers.";
  if (!name.starts_with(kPrefix)) return {};
  name.remove_prefix(kPrefix.size());
  int64_t layer = -1;
  const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), layer);
  if (ec != std::errc() || end == name.data() || *end != '.') return {};
  const std::string_view rest(end + 1, name.data() + name.size() - (end + 1));
  for (const auto& [hf, gguf] : kLayerNames) {
    if (rest == hf) return "blk." + std::to_string(layer) + "." + std::string(gguf);
  }
  return {};
}

const GgufTensor* GgufWeights::find(std::string_view name) const {
  const std::string g = gguf_name(name);
  return g.empty() ? nullptr : file_.find(g);
}

void GgufWeights::read_f32(std::string_view name, std::span<const int64_t> shape,
                           const IndexSet& rows, const IndexSet& cols, std::span<float> out) const {
  const GgufTensor* t = find(name);
  if (t == nullptr) {
    fail("tensor '{}' (GGUF '{}') is missing from {}", printable(name), gguf_name(name),
         printable(file_.path().string()));
  }
  const bool q =
      name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias");
  const bool k =
      name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias");
  if (arch_ != "llama" || (!q && !k)) {
    file_.read_f32(*t, shape, rows, cols, out);
    return;
  }
  // Llama q/k: each Hugging Face row read from where the converter put it, one row at a time.
  const int64_t n_heads = q ? heads_ : kv_heads_;
  const int64_t height = shape.empty() ? 0 : shape[0];
  if (n_heads <= 0 || height % (2 * n_heads) != 0) {
    fail("{}: tensor '{}' has {} rows, not {} heads of an even size",
         printable(file_.path().string()), gguf_name(name), height, n_heads);
  }
  const int64_t head_dim = height / n_heads;
  const int64_t half = head_dim / 2;
  const bool matrix = shape.size() == 2;
  const IndexSet all{{0, height}};
  const IndexSet& row_set = rows.empty() ? all : rows;
  const int64_t width = matrix ? (cols.empty() ? shape[1] : index_count(cols)) : 1;
  TPE_CHECK(static_cast<int64_t>(out.size()) == index_count(row_set) * width,
            "slice of '{}' into {} floats", printable(name), out.size());
  int64_t at = 0;
  for (const Range& r : row_set) {
    for (int64_t row = r.begin; row < r.end; ++row, at += width) {
      const int64_t head = row / head_dim;
      const int64_t s = (row % head_dim) / half;
      const int64_t j = row % half;
      const int64_t from = head * head_dim + 2 * j + s;
      const std::span<float> dst = out.subspan(static_cast<size_t>(at), static_cast<size_t>(width));
      // A bias (1-D) is one row whose elements `rows` selects.
      file_.read_f32(*t, shape, IndexSet{{from, from + 1}}, matrix ? cols : IndexSet{}, dst);
    }
  }
}

}  // namespace tpe::io
