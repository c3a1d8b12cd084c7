// BLOOM (BELLE, BLOOMZ): LayerNorm blocks with ALiBi attention instead of positions, a LayerNorm
// right after the word embeddings, a fused query_key_value laid out per head ([q k v] of head 0,
// then head 1, ...) and a tanh-GELU MLP; the residual is either the block input or, with
// apply_residual_connection_post_layernorm, the normalised input.
#include <string>
#include <vector>

#include <tpengine/policy.hpp>

namespace {

// BLOOM's config has been written with both spellings: n_embed / n_head / n_layer (the original
// checkpoints) and hidden_size / num_attention_heads / num_hidden_layers.
int64_t size_either(tpengine::Builder& b, const char* key, const char* other, int64_t max) {
  const int64_t v = b.size_or(key, 0, max);
  return v != 0 ? v : b.require_size(other, max);
}

void build(tpengine::Builder& b) {
  const int64_t hidden = size_either(b, "n_embed", "hidden_size", tpengine::Builder::kMaxSize);
  const int64_t n_heads = size_either(b, "num_attention_heads", "n_head", 4096);
  const int64_t head_dim = tpengine::Builder::divide("hidden_size", hidden, "n_head", n_heads);
  const int64_t layers = size_either(b, "num_hidden_layers", "n_layer", 4096);
  const int64_t vocab = b.require_size("vocab_size");
  const double eps = b.require_float("layer_norm_epsilon");
  const bool residual_post_ln = b.bool_or("apply_residual_connection_post_layernorm", false);
  const bool tied = b.bool_or("tie_word_embeddings", true);

  tpe_attention_desc attention = tpengine::Builder::attention_desc(n_heads, n_heads, head_dim);
  attention.alibi_max_bias = 8;  // added after the 1/sqrt(head_dim) scaling (baddbmm's beta = 1)

  tpe_value x = b.embedding(b.input_ids(), "transformer.word_embeddings.weight", vocab, hidden);
  x = b.norm(x, TPE_NORM_LAYER, "transformer.word_embeddings_layernorm", true, eps);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "transformer.h." + std::to_string(i);
    b.begin_block("BloomBlock", p);
    tpe_value h = b.norm(x, TPE_NORM_LAYER, p + ".input_layernorm", true, eps);
    tpe_value qkv = b.linear(h, p + ".self_attention.query_key_value", hidden, 3 * hidden, true);
    const std::vector<tpe_value> parts = b.split_heads(qkv, 3, n_heads, head_dim);
    tpe_value a = b.attention(parts[0], parts[1], parts[2], attention);
    x = b.add(b.linear(a, p + ".self_attention.dense", hidden, hidden, true),
              residual_post_ln ? h : x);
    h = b.norm(x, TPE_NORM_LAYER, p + ".post_attention_layernorm", true, eps);
    tpe_value m = b.activation(b.linear(h, p + ".mlp.dense_h_to_4h", hidden, 4 * hidden, true),
                               TPE_ACT_GELU_TANH);
    x = b.add(b.linear(m, p + ".mlp.dense_4h_to_h", 4 * hidden, hidden, true),
              residual_post_ln ? h : x);
    b.end_block();
  }
  x = b.norm(x, TPE_NORM_LAYER, "transformer.ln_f", true, eps);
  b.lm_head(x, tied ? "transformer.word_embeddings.weight" : "lm_head.weight", vocab, hidden);
}

const char* const kModelTypes[] = {"bloom", nullptr};
const char* const kArchitectures[] = {"BloomForCausalLM", nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .name = */ "bloom",
    /* .version = */ "0.1.0",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ kArchitectures,
    /* .injection_policy = */ nullptr,  // the core discovers the split
    /* .build = */ tpengine::build_with<build>,
    /* .description = */
    "BLOOM: ALiBi, embedding LayerNorm, fused per-head query_key_value, GELU (tanh)",
};

}  // namespace

TPENGINE_POLICY(kDesc)
