// Falcon: blocks whose attention and MLP read the same normalised input (parallel_attn) or run
// in sequence, a fused query_key_value in one of three layouts, rotary positions or ALiBi, and a
// GELU MLP without biases (bias = false) or with them.
//  - new_decoder_architecture (Falcon-40B/180B): grouped per kv head, its q heads then its k and
//    v head, num_kv_heads kv heads; ln_attn and ln_mlp (num_ln_in_parallel_attn = 2, the
//    default) or one input_layernorm;
//  - multi_query (Falcon-7B): [all q heads | k | v], one kv head;
//  - otherwise (falcon-rw): per head [q k v].
#include <cmath>
#include <string>
#include <vector>

#include <tpengine/policy.hpp>

namespace {

void build(tpengine::Builder& b) {
  const int64_t hidden = b.require_size("hidden_size");
  const int64_t n_heads = b.require_size("num_attention_heads");
  const int64_t head_dim =
      tpengine::Builder::divide("hidden_size", hidden, "num_attention_heads", n_heads);
  const int64_t layers = b.require_size("num_hidden_layers", 4096);
  const int64_t vocab = b.require_size("vocab_size");
  const int64_t ffn = b.size_or("ffn_hidden_size", 4 * hidden);
  const double eps = b.require_float("layer_norm_epsilon");
  const bool new_arch = b.bool_or("new_decoder_architecture", false);
  const bool multi_query = b.bool_or("multi_query", true);
  const bool parallel = new_arch || b.bool_or("parallel_attn", true);
  const bool alibi = b.bool_or("alibi", false);
  const bool bias = b.bool_or("bias", false);
  const bool tied = b.bool_or("tie_word_embeddings", true);
  const tpe_activation act = tpengine::Builder::activation_named(b.string_or("activation", "gelu"));
  const int64_t n_kv = new_arch ? b.size_or("num_kv_heads", n_heads) : multi_query ? 1 : n_heads;
  tpengine::Builder::divide("num_attention_heads", n_heads, "num_kv_heads", n_kv);
  const bool two_norms = new_arch && b.size_or("num_ln_in_parallel_attn", 2, 2) == 2;
  if (b.bool_or("apply_residual_connection_post_layernorm", false)) {
    throw tpengine::PolicyError(
        "config.json: apply_residual_connection_post_layernorm = true is not supported yet");
  }
  tpe_attention_desc attention = tpengine::Builder::attention_desc(n_heads, n_kv, head_dim);
  if (alibi) {
    attention.alibi_max_bias = 8;
    // Falcon adds the bias before multiplying by 1/sqrt(head_dim): its slopes are scaled too.
    attention.alibi_slope_scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  }
  const tpe_rope_desc rope = alibi ? tpe_rope_desc{} : b.rope();

  tpe_value x = b.embedding(b.input_ids(), "transformer.word_embeddings.weight", vocab, hidden);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "transformer.h." + std::to_string(i);
    b.begin_block("FalconDecoderLayer", p);
    const auto norm = [&](const char* name) {
      return b.norm(x, TPE_NORM_LAYER, p + name, true, eps);
    };
    tpe_value attn_in = norm(two_norms ? ".ln_attn" : ".input_layernorm");
    tpe_value qkv = b.linear(attn_in, p + ".self_attention.query_key_value", hidden,
                             (n_heads + 2 * n_kv) * head_dim, bias);
    const std::vector<tpe_value> parts =
        new_arch ? b.split_grouped(qkv, n_kv, {hidden, n_kv * head_dim, n_kv * head_dim}, head_dim)
        : multi_query ? b.split_concat(qkv, {hidden, head_dim, head_dim})
                      : b.split_heads(qkv, 3, n_heads, head_dim);
    tpe_value q = parts[0], k = parts[1];
    if (!alibi) {
      q = b.rotary(q, n_heads, head_dim, rope);
      k = b.rotary(k, n_kv, head_dim, rope);
    }
    tpe_value a = b.attention(q, k, parts[2], attention);
    a = b.linear(a, p + ".self_attention.dense", hidden, hidden, bias);
    tpe_value mlp_in;
    if (parallel) {
      mlp_in = two_norms ? norm(".ln_mlp") : attn_in;
    } else {
      x = b.add(x, a);
      mlp_in = norm(".post_attention_layernorm");
    }
    tpe_value m = b.activation(b.linear(mlp_in, p + ".mlp.dense_h_to_4h", hidden, ffn, bias), act);
    m = b.linear(m, p + ".mlp.dense_4h_to_h", ffn, hidden, bias);
    x = parallel ? b.add(b.add(m, a), x) : b.add(m, x);
    b.end_block();
  }
  x = b.norm(x, TPE_NORM_LAYER, "transformer.ln_f", true, eps);
  b.lm_head(x, tied ? "transformer.word_embeddings.weight" : "lm_head.weight", vocab, hidden);
}

const char* const kModelTypes[] = {"falcon", nullptr};
const char* const kArchitectures[] = {"FalconForCausalLM", nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .name = */ "falcon",
    /* .version = */ "0.1.0",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ kArchitectures,
    /* .injection_policy = */ nullptr,  // the core discovers the split
    /* .build = */ tpengine::build_with<build>,
    /* .description = */
    "Falcon: grouped / multi-query / per-head qkv, parallel attention, rotary or ALiBi",
};

}  // namespace

TPENGINE_POLICY(kDesc)
