#include "core/io/gguf_model.hpp"

#include <charconv>
#include <utility>

#include "core/common/error.hpp"

namespace tpe::io {
namespace {

using Names = std::span<const std::pair<std::string_view, std::string_view>>;

// Per-layer tensors: Hugging Face suffix -> GGUF suffix (gguf-py's tensor name map).
constexpr std::pair<std::string_view, std::string_view> kLlamaLayer[] = {
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
constexpr std::pair<std::string_view, std::string_view> kLlamaModel[] = {
    {"model.embed_tokens.weight", "token_embd.weight"},
    {"model.norm.weight", "output_norm.weight"},
    {"lm_head.weight", "output.weight"},
};
constexpr std::pair<std::string_view, std::string_view> kNeoxLayer[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"input_layernorm.bias", "attn_norm.bias"},
    {"attention.query_key_value.weight", "attn_qkv.weight"},
    {"attention.query_key_value.bias", "attn_qkv.bias"},
    {"attention.dense.weight", "attn_output.weight"},
    {"attention.dense.bias", "attn_output.bias"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"post_attention_layernorm.bias", "ffn_norm.bias"},
    {"mlp.dense_h_to_4h.weight", "ffn_up.weight"},
    {"mlp.dense_h_to_4h.bias", "ffn_up.bias"},
    {"mlp.dense_4h_to_h.weight", "ffn_down.weight"},
    {"mlp.dense_4h_to_h.bias", "ffn_down.bias"},
};
constexpr std::pair<std::string_view, std::string_view> kNeoxModel[] = {
    {"gpt_neox.embed_in.weight", "token_embd.weight"},
    {"gpt_neox.final_layer_norm.weight", "output_norm.weight"},
    {"gpt_neox.final_layer_norm.bias", "output_norm.bias"},
    {"embed_out.weight", "output.weight"},
};

// What tpengine reads of one GGUF architecture: its Hugging Face model, the tensor names, and
// which rows llama.cpp's converter moved.
struct Architecture {
  std::string_view gguf;        // general.architecture
  std::string_view model_type;  // config.json's
  std::string_view hf_class;
  std::string_view layer_prefix;  // Hugging Face's, before the layer number
  Names layer;
  Names model;
  GgufWeights::Reorder reorder;
};

constexpr Architecture kArchitectures[] = {
    {"llama", "llama", "LlamaForCausalLM", "model.layers.", kLlamaLayer, kLlamaModel,
     GgufWeights::Reorder::kLlamaRotaryHalves},
    {"qwen2", "qwen2", "Qwen2ForCausalLM", "model.layers.", kLlamaLayer, kLlamaModel,
     GgufWeights::Reorder::kNone},
    {"gptneox", "gpt_neox", "GPTNeoXForCausalLM", "gpt_neox.layers.", kNeoxLayer, kNeoxModel,
     GgufWeights::Reorder::kNeoxQkvPerHead},
};

const Architecture& architecture(const GgufFile& file) {
  const std::string arch = file.string("general.architecture");
  for (const Architecture& a : kArchitectures) {
    if (a.gguf == arch) return a;
  }
  fail(
      "{}: GGUF architecture '{}' is not supported; tpengine reads llama, qwen2 and gptneox "
      "GGUF files",
      printable(file.path().string()), printable(arch));
}

}  // namespace

// llama.cpp's metadata keys (gguf-py's constants, which its converter writes from config.json:
// LlamaModel, Qwen2Model, GPTNeoXModel) mapped back onto the config.json keys.
nlohmann::json gguf_config_json(const GgufFile& file) {
  const Architecture& a = architecture(file);
  const std::string arch(a.gguf);
  const bool neox = a.model_type == "gpt_neox";
  nlohmann::json c;
  c["model_type"] = a.model_type;
  c["architectures"] = {a.hf_class};
  const auto key = [&](const char* name) { return arch + "." + name; };
  const auto has = [&](const std::string& k) { return file.find_value(k) != nullptr; };
  c["hidden_size"] = file.integer(key("embedding_length"));
  c["intermediate_size"] = file.integer(key("feed_forward_length"));
  c["num_hidden_layers"] = file.integer(key("block_count"));
  const int64_t heads = file.integer(key("attention.head_count"));
  c["num_attention_heads"] = heads;
  c["max_position_embeddings"] = file.integer(key("context_length"));
  const double theta = has(key("rope.freq_base")) ? file.number(key("rope.freq_base")) : 10000.0;
  if (neox) {
    // GPTNeoXModel writes the rotary dimensions (rotary_pct x head_dim), the epsilon of its
    // LayerNorms and the residual form; its activation is GELU.
    const int64_t hidden = file.integer(key("embedding_length"));
    const int64_t rotary = file.integer(key("rope.dimension_count"));
    if (heads <= 0 || hidden % heads != 0 || rotary <= 0 || rotary > hidden / heads) {
      fail("{}: metadata '{}' = {} is not a rotary width of heads of {} / {}",
           printable(file.path().string()), key("rope.dimension_count"), rotary, hidden, heads);
    }
    c["rotary_pct"] = static_cast<double>(rotary) / static_cast<double>(hidden / heads);
    c["rotary_emb_base"] = theta;
    c["layer_norm_eps"] = file.number(key("attention.layer_norm_epsilon"));
    c["use_parallel_residual"] =
        !has(key("use_parallel_residual")) || file.boolean(key("use_parallel_residual"));
    c["hidden_act"] = "gelu";
    c["attention_bias"] = file.find("blk.0.attn_qkv.bias") != nullptr;
  } else {
    c["num_key_value_heads"] =
        has(key("attention.head_count_kv")) ? file.integer(key("attention.head_count_kv")) : heads;
    c["rms_norm_eps"] = file.number(key("attention.layer_norm_rms_epsilon"));
    c["rope_theta"] = theta;
    if (has(key("attention.key_length"))) c["head_dim"] = file.integer(key("attention.key_length"));
  }
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
  const Architecture& a = architecture(file);
  layer_prefix_ = a.layer_prefix;
  layer_names_ = a.layer;
  model_names_ = a.model;
  reorder_ = a.reorder;
  const std::string arch(a.gguf);
  heads_ = file.integer(arch + ".attention.head_count");
  kv_heads_ = file.find_value(arch + ".attention.head_count_kv") != nullptr
                  ? file.integer(arch + ".attention.head_count_kv")
                  : heads_;
}

std::string GgufWeights::gguf_name(std::string_view name) const {
  for (const auto& [hf, gguf] : model_names_) {
    if (name == hf) return std::string(gguf);
  }
  if (!name.starts_with(layer_prefix_)) return {};
  name.remove_prefix(layer_prefix_.size());
  int64_t layer = -1;
  const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), layer);
  if (ec != std::errc() || end == name.data() || *end != '.') return {};
  const std::string_view rest(end + 1, name.data() + name.size() - (end + 1));
  for (const auto& [hf, gguf] : layer_names_) {
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
  const auto ends = [&](std::string_view part) {
    return name.ends_with(std::string(part) + ".weight") ||
           name.ends_with(std::string(part) + ".bias");
  };
  const bool q = ends("self_attn.q_proj"), k = ends("self_attn.k_proj");
  const bool qkv = ends("attention.query_key_value");
  const bool moved = (reorder_ == Reorder::kLlamaRotaryHalves && (q || k)) ||
                     (reorder_ == Reorder::kNeoxQkvPerHead && qkv);
  if (!moved) {
    file_.read_f32(*t, shape, rows, cols, out);
    return;
  }
  // Each Hugging Face row read from where the converter put it, one row at a time.
  const int64_t n_heads = qkv || q ? heads_ : kv_heads_;
  const int64_t height = shape.empty() ? 0 : shape[0];
  const int64_t per_head = qkv ? 3 : 2;  // a head's rows come in 3 parts (q, k, v) or 2 halves
  if (n_heads <= 0 || height % (per_head * n_heads) != 0) {
    fail("{}: tensor '{}' has {} rows, not {} heads of {} equal parts",
         printable(file_.path().string()), gguf_name(name), height, n_heads, per_head);
  }
  const int64_t head_rows = height / n_heads;
  const int64_t part = head_rows / per_head;
  const auto source_row = [&](int64_t row) {
    const int64_t head = row / head_rows;
    const int64_t s = (row % head_rows) / part;
    const int64_t j = row % part;
    // Neox: [q k v] per head -> all q, all k, all v. Llama: halves s of a head interleaved.
    return qkv ? s * (height / 3) + head * part + j : head * head_rows + 2 * j + s;
  };
  const bool matrix = shape.size() == 2;
  const IndexSet all{{0, height}};
  const IndexSet& row_set = rows.empty() ? all : rows;
  const int64_t width = matrix ? (cols.empty() ? shape[1] : index_count(cols)) : 1;
  TPE_CHECK(static_cast<int64_t>(out.size()) == index_count(row_set) * width,
            "slice of '{}' into {} floats", printable(name), out.size());
  int64_t at = 0;
  for (const Range& r : row_set) {
    for (int64_t row = r.begin; row < r.end; ++row, at += width) {
      const int64_t from = source_row(row);
      const std::span<float> dst = out.subspan(static_cast<size_t>(at), static_cast<size_t>(width));
      // A bias (1-D) is one row whose elements `rows` selects.
      file_.read_f32(*t, shape, IndexSet{{from, from + 1}}, matrix ? cols : IndexSet{}, dst);
    }
  }
}

}  // namespace tpe::io
