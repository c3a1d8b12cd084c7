// GPT-NeoX (Pythia, GPT-NeoXT): LayerNorm blocks with a fused query_key_value projection laid
// out per head ([q k v] of head 0, then head 1, ...), partial rotary, and either a parallel
// residual (attention and MLP both read the block input) or a sequential one.
#include <string>

#include <tpengine/policy.hpp>

namespace {

void build(tpengine::Builder& b) {
  const int64_t hidden = b.require_size("hidden_size");
  const int64_t n_heads = b.require_size("num_attention_heads");
  const int64_t head_dim = hidden / n_heads;
  const int64_t ffn = b.require_size("intermediate_size");
  const int64_t layers = b.require_size("num_hidden_layers", 4096);
  const int64_t vocab = b.require_size("vocab_size");
  const double eps = b.require_float("layer_norm_eps");
  const tpe_activation act = tpengine::Builder::activation_named(b.string_or("hidden_act", "gelu"));
  const bool parallel_residual = b.bool_or("use_parallel_residual", true);
  const bool attention_bias = b.bool_or("attention_bias", true);
  const bool tied = b.bool_or("tie_word_embeddings", false);
  const tpe_rope_desc rope = b.rope();

  tpe_value x = b.embedding(b.input_ids(), "gpt_neox.embed_in.weight", vocab, hidden);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "gpt_neox.layers." + std::to_string(i);
    b.begin_block("GPTNeoXLayer", p);
    tpe_value h = b.norm(x, TPE_NORM_LAYER, p + ".input_layernorm", true, eps);
    tpe_value qkv =
        b.linear(h, p + ".attention.query_key_value", hidden, 3 * hidden, attention_bias);
    std::vector<tpe_value> parts = b.split_heads(qkv, 3, n_heads, head_dim);
    tpe_value q = b.rotary(parts[0], n_heads, head_dim, rope);
    tpe_value k = b.rotary(parts[1], n_heads, head_dim, rope);
    tpe_value a = b.attention(q, k, parts[2], n_heads, n_heads, head_dim);
    tpe_value attn = b.linear(a, p + ".attention.dense", hidden, hidden, attention_bias);
    // Parallel: x + attn(ln1(x)) + mlp(ln2(x)); sequential: y = x + attn(ln1(x)); y + mlp(ln2(y)).
    tpe_value mlp_in = parallel_residual ? x : b.add(attn, x);
    h = b.norm(mlp_in, TPE_NORM_LAYER, p + ".post_attention_layernorm", true, eps);
    tpe_value m = b.activation(b.linear(h, p + ".mlp.dense_h_to_4h", hidden, ffn, true), act);
    m = b.linear(m, p + ".mlp.dense_4h_to_h", ffn, hidden, true);
    x = parallel_residual ? b.add(b.add(m, attn), x) : b.add(m, mlp_in);
    b.end_block();
  }
  x = b.norm(x, TPE_NORM_LAYER, "gpt_neox.final_layer_norm", true, eps);
  b.lm_head(x, tied ? "gpt_neox.embed_in.weight" : "embed_out.weight", vocab, hidden);
}

const char* const kModelTypes[] = {"gpt_neox", nullptr};
const char* const kArchitectures[] = {"GPTNeoXForCausalLM", nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .name = */ "gpt_neox",
    /* .version = */ "0.1.0",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ kArchitectures,
    /* .injection_policy = */ nullptr,  // the core discovers the split
    /* .build = */ tpengine::build_with<build>,
    /* .description = */
    "GPT-NeoX: fused per-head query_key_value, partial rotary, parallel residual",
};

}  // namespace

TPENGINE_POLICY(kDesc)
