// GPT-2 and GPT-BigCode (StarCoder, SantaCoder): pre-norm LayerNorm blocks over learned absolute
// positions, a fused c_attn projection and a two-layer MLP. GPT-2 stores its projections as
// Conv1D, weight [in, out] (declared as transposed linears: the host transposes them at load);
// GPT-BigCode's are ordinary linears, and its multi-query c_attn is [Q | K | V] with one kv head.
#include <string>
#include <vector>

#include <tpengine/policy.hpp>

namespace {

struct Family {
  const char* model_type;
  const char* block_class;
  bool conv1d;  // weights stored [in, out]
};

constexpr Family kFamilies[] = {
    {"gpt2", "GPT2Block", true},
    {"gpt_bigcode", "GPTBigCodeBlock", false},
};

void build(tpengine::Builder& b) {
  const std::string model_type = b.string_or("model_type", "");
  const Family* family = &kFamilies[0];
  for (const Family& f : kFamilies) {
    if (model_type == f.model_type) family = &f;
  }
  const int64_t hidden = b.require_size("n_embd");
  const int64_t n_heads = b.require_size("n_head");
  const int64_t head_dim = tpengine::Builder::divide("n_embd", hidden, "n_head", n_heads);
  const int64_t ffn = b.size_or("n_inner", 4 * hidden);
  const int64_t layers = b.require_size("n_layer", 4096);
  const int64_t vocab = b.require_size("vocab_size");
  const int64_t positions = b.require_size("n_positions");
  const double eps = b.require_float("layer_norm_epsilon");
  const tpe_activation act =
      tpengine::Builder::activation_named(b.string_or("activation_function", "gelu_new"));
  const bool tied = b.bool_or("tie_word_embeddings", true);
  const bool multi_query = family->conv1d ? false : b.bool_or("multi_query", true);
  const int64_t n_kv = multi_query ? 1 : n_heads;
  if (b.bool_or("scale_attn_by_inverse_layer_idx", false)) {
    throw tpengine::PolicyError(
        "config.json: scale_attn_by_inverse_layer_idx = true is not supported yet");
  }
  tpe_attention_desc attention = tpengine::Builder::attention_desc(n_heads, n_kv, head_dim);
  attention.scale = b.bool_or("scale_attn_weights", true) ? 0.0 : 1.0;

  const auto linear = [&](tpe_value x, const std::string& prefix, int64_t in, int64_t out) {
    return family->conv1d ? b.linear_transposed(x, prefix, in, out, true)
                          : b.linear(x, prefix, in, out, true);
  };
  tpe_value x = b.add(b.embedding(b.input_ids(), "transformer.wte.weight", vocab, hidden),
                      b.embedding(b.position_ids(), "transformer.wpe.weight", positions, hidden));
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "transformer.h." + std::to_string(i);
    b.begin_block(family->block_class, p);
    tpe_value h = b.norm(x, TPE_NORM_LAYER, p + ".ln_1", true, eps);
    const int64_t qkv_width = (n_heads + 2 * n_kv) * head_dim;
    tpe_value qkv = linear(h, p + ".attn.c_attn", hidden, qkv_width);
    // GPT-2: [Q | K | V]; GPT-BigCode: [Q | K | V] with one kv head, else per head [q k v].
    const std::vector<tpe_value> parts =
        family->conv1d || multi_query
            ? b.split_concat(qkv, {hidden, n_kv * head_dim, n_kv * head_dim})
            : b.split_heads(qkv, 3, n_heads, head_dim);
    tpe_value a = b.attention(parts[0], parts[1], parts[2], attention);
    x = b.add(x, linear(a, p + ".attn.c_proj", hidden, hidden));
    h = b.norm(x, TPE_NORM_LAYER, p + ".ln_2", true, eps);
    tpe_value m = b.activation(linear(h, p + ".mlp.c_fc", hidden, ffn), act);
    x = b.add(x, linear(m, p + ".mlp.c_proj", ffn, hidden));
    b.end_block();
  }
  x = b.norm(x, TPE_NORM_LAYER, "transformer.ln_f", true, eps);
  b.lm_head(x, tied ? "transformer.wte.weight" : "lm_head.weight", vocab, hidden);
}

const char* const kModelTypes[] = {"gpt2", "gpt_bigcode", nullptr};
const char* const kArchitectures[] = {"GPT2LMHeadModel", "GPTBigCodeForCausalLM", nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .name = */ "gpt2",
    /* .version = */ "0.1.0",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ kArchitectures,
    /* .injection_policy = */ nullptr,  // the core discovers the split
    /* .build = */ tpengine::build_with<build>,
    /* .description = */
    "GPT-2, GPT-BigCode (StarCoder): learned positions, fused c_attn (Conv1D or multi-query)",
};

}  // namespace

TPENGINE_POLICY(kDesc)
