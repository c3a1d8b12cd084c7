// Llama and its close relatives (Mistral: sliding window; Qwen2: q/k/v biases): pre-norm decoder
// blocks with RMSNorm, separate q/k/v projections (MHA or GQA), rotary attention and a gated MLP.
#include <string>

#include <tpengine/policy.hpp>

namespace {

struct Family {
  const char* model_type;
  const char* block_class;
  bool qkv_bias;  // Qwen2 always has q/k/v biases
};

constexpr Family kFamilies[] = {
    {"llama", "LlamaDecoderLayer", false},
    {"mistral", "MistralDecoderLayer", false},
    {"qwen2", "Qwen2DecoderLayer", true},
};

void build(tpengine::Builder& b) {
  const std::string model_type = b.string_or("model_type", "");
  const Family* family = &kFamilies[0];
  for (const Family& f : kFamilies) {
    if (model_type == f.model_type) family = &f;
  }
  const int64_t hidden = b.require_size("hidden_size");
  const int64_t n_heads = b.require_size("num_attention_heads");
  const int64_t n_kv = b.size_or("num_key_value_heads", n_heads);
  const int64_t head_dim = b.size_or("head_dim", hidden / n_heads);
  const int64_t ffn = b.require_size("intermediate_size");
  const int64_t layers = b.require_size("num_hidden_layers", 4096);
  const int64_t vocab = b.require_size("vocab_size");
  const double eps = b.require_float("rms_norm_eps");
  const tpe_activation act = tpengine::Builder::activation_named(b.string_or("hidden_act", "silu"));
  const bool attention_bias = b.bool_or("attention_bias", false);
  const bool qkv_bias = family->qkv_bias || attention_bias;
  const bool mlp_bias = b.bool_or("mlp_bias", false);
  const bool tied = b.bool_or("tie_word_embeddings", false);
  if (b.bool_or("use_sliding_window", false)) {
    throw tpengine::PolicyError("config.json: use_sliding_window = true is not supported yet");
  }
  // Mistral applies its window in every layer; Qwen2 only with use_sliding_window.
  const int64_t window = model_type == "mistral" ? b.int_or("sliding_window", 0) : 0;
  const tpe_rope_desc rope = b.rope();

  tpe_value x = b.embedding(b.input_ids(), "model.embed_tokens.weight", vocab, hidden);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i);
    b.begin_block(family->block_class, p);
    tpe_value h = b.norm(x, TPE_NORM_RMS, p + ".input_layernorm", false, eps);
    tpe_value q = b.linear(h, p + ".self_attn.q_proj", hidden, n_heads * head_dim, qkv_bias);
    tpe_value k = b.linear(h, p + ".self_attn.k_proj", hidden, n_kv * head_dim, qkv_bias);
    tpe_value v = b.linear(h, p + ".self_attn.v_proj", hidden, n_kv * head_dim, qkv_bias);
    q = b.rotary(q, n_heads, head_dim, rope);
    k = b.rotary(k, n_kv, head_dim, rope);
    tpe_value a = b.attention(q, k, v, n_heads, n_kv, head_dim, window);
    x = b.add(x, b.linear(a, p + ".self_attn.o_proj", n_heads * head_dim, hidden, attention_bias));
    h = b.norm(x, TPE_NORM_RMS, p + ".post_attention_layernorm", false, eps);
    tpe_value gate = b.linear(h, p + ".mlp.gate_proj", hidden, ffn, mlp_bias);
    tpe_value up = b.linear(h, p + ".mlp.up_proj", hidden, ffn, mlp_bias);
    tpe_value m = b.mul(b.activation(gate, act), up);
    x = b.add(x, b.linear(m, p + ".mlp.down_proj", ffn, hidden, mlp_bias));
    b.end_block();
  }
  x = b.norm(x, TPE_NORM_RMS, "model.norm", false, eps);
  b.lm_head(x, tied ? "model.embed_tokens.weight" : "lm_head.weight", vocab, hidden);
}

const char* const kModelTypes[] = {"llama", "mistral", "qwen2", nullptr};
const char* const kArchitectures[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                      nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .name = */ "llama",
    /* .version = */ "0.1.0",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ kArchitectures,
    /* .injection_policy = */ nullptr,  // the core discovers the split
    /* .build = */ tpengine::build_with<build>,
    /* .description = */
    "Llama, Mistral, Qwen2: RMSNorm decoder, q/k/v (MHA/GQA), rotary, gated MLP",
};

}  // namespace

TPENGINE_POLICY(kDesc)
