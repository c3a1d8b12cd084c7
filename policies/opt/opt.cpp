// OPT (and Galactica): LayerNorm blocks over learned positions, whose table starts at row 2,
// separate q/k/v projections and a ReLU MLP; the norms sit before (do_layer_norm_before, OPT
// 125m and >= 1.3b) or after their sublayers (OPT-350m), and a word embedding narrower than the
// blocks goes through project_in / project_out.
#include <string>

#include <tpengine/policy.hpp>

namespace {

constexpr int64_t kPositionOffset = 2;  // OPTLearnedPositionalEmbedding's offset

void build(tpengine::Builder& b) {
  const int64_t hidden = b.require_size("hidden_size");
  const int64_t n_heads = b.require_size("num_attention_heads");
  const int64_t head_dim =
      tpengine::Builder::divide("hidden_size", hidden, "num_attention_heads", n_heads);
  const int64_t ffn = b.require_size("ffn_dim");
  const int64_t layers = b.require_size("num_hidden_layers", 4096);
  const int64_t vocab = b.require_size("vocab_size");
  const int64_t positions = b.require_size("max_position_embeddings");
  const int64_t embed = b.size_or("word_embed_proj_dim", hidden);
  const tpe_activation act =
      tpengine::Builder::activation_named(b.string_or("activation_function", "relu"));
  const bool pre_norm = b.bool_or("do_layer_norm_before", true);
  const bool bias = b.bool_or("enable_bias", true);
  const bool tied = b.bool_or("tie_word_embeddings", true);
  if (!b.bool_or("layer_norm_elementwise_affine", true)) {
    throw tpengine::PolicyError(
        "config.json: layer_norm_elementwise_affine = false is not supported yet");
  }
  // The final norm exists with pre-norm blocks, unless the config removes it (old OPT-350m).
  const bool final_norm = pre_norm && !b.bool_or("_remove_final_layer_norm", false);
  constexpr double kEps = 1e-5;  // nn.LayerNorm's default; OPT's config has no key for it

  tpe_value x = b.embedding(b.input_ids(), "model.decoder.embed_tokens.weight", vocab, embed);
  if (embed != hidden) x = b.linear(x, "model.decoder.project_in", embed, hidden, false);
  x = b.add(x, b.embedding(b.position_ids(kPositionOffset), "model.decoder.embed_positions.weight",
                           positions + kPositionOffset, hidden));
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "model.decoder.layers." + std::to_string(i);
    b.begin_block("OPTDecoderLayer", p);
    // Pre-norm: x + f(norm(x)); post-norm: norm(x + f(x)).
    const auto sublayer = [&](const std::string& norm, auto&& f) {
      if (pre_norm) return b.add(x, f(b.norm(x, TPE_NORM_LAYER, p + norm, true, kEps)));
      return b.norm(b.add(x, f(x)), TPE_NORM_LAYER, p + norm, true, kEps);
    };
    x = sublayer(".self_attn_layer_norm", [&](tpe_value h) {
      tpe_value q = b.linear(h, p + ".self_attn.q_proj", hidden, hidden, bias);
      tpe_value k = b.linear(h, p + ".self_attn.k_proj", hidden, hidden, bias);
      tpe_value v = b.linear(h, p + ".self_attn.v_proj", hidden, hidden, bias);
      tpe_value a = b.attention(q, k, v, n_heads, n_heads, head_dim);
      return b.linear(a, p + ".self_attn.out_proj", hidden, hidden, bias);
    });
    x = sublayer(".final_layer_norm", [&](tpe_value h) {
      tpe_value m = b.activation(b.linear(h, p + ".fc1", hidden, ffn, bias), act);
      return b.linear(m, p + ".fc2", ffn, hidden, bias);
    });
    b.end_block();
  }
  if (final_norm) x = b.norm(x, TPE_NORM_LAYER, "model.decoder.final_layer_norm", true, kEps);
  if (embed != hidden) x = b.linear(x, "model.decoder.project_out", hidden, embed, false);
  b.lm_head(x, tied ? "model.decoder.embed_tokens.weight" : "lm_head.weight", vocab, embed);
}

const char* const kModelTypes[] = {"opt", nullptr};
const char* const kArchitectures[] = {"OPTForCausalLM", nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .name = */ "opt",
    /* .version = */ "0.1.0",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ kArchitectures,
    /* .injection_policy = */ nullptr,  // the core discovers the split
    /* .build = */ tpengine::build_with<build>,
    /* .description = */
    "OPT: learned positions (offset 2), pre- or post-norm blocks, ReLU, project_in/out",
};

}  // namespace

TPENGINE_POLICY(kDesc)
