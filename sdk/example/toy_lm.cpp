// ToyLM: a made-up architecture, to show a policy for a model no built-in plugin knows.
//
// Each ToyBlock reads one RMSNorm of its input and feeds it to attention and to the MLP in
// parallel, adding both to the residual stream. Attention uses one fused projection laid out as
// [Q | K | V] with fewer kv heads than q heads (GQA); the MLP's activation is a squared ReLU,
// built from the host's relu and mul. The weight names follow no Hugging Face family.
#include <string>
#include <vector>

#include <tpengine/policy.hpp>

namespace {

void build(tpengine::Builder& b) {
  const int64_t d_model = b.require_size("d_model");
  const int64_t n_layers = b.require_size("n_layers", 4096);
  const int64_t n_heads = b.require_size("n_heads");
  const int64_t n_kv_heads = b.size_or("n_kv_heads", n_heads);
  const int64_t head_dim = d_model / n_heads;
  const int64_t d_ff = b.require_size("d_ff");
  const int64_t vocab = b.require_size("vocab");
  const double eps = b.require_float("norm_eps");
  const tpe_rope_desc rope = b.rope();  // reads rope_theta

  tpe_value x = b.embedding(b.input_ids(), "tok.table", vocab, d_model);
  for (int64_t i = 0; i < n_layers; ++i) {
    const std::string p = "blocks." + std::to_string(i);
    b.begin_block("ToyBlock", p);
    const tpe_value h = b.norm(x, TPE_NORM_RMS, p + ".norm", false, eps);

    // Attention: one fused projection, split by the layout it is stored in.
    const int64_t q_width = n_heads * head_dim, kv_width = n_kv_heads * head_dim;
    const tpe_value qkv = b.linear(h, p + ".attn.wqkv", d_model, q_width + 2 * kv_width, false);
    const std::vector<tpe_value> parts = b.split_concat(qkv, {q_width, kv_width, kv_width});
    const tpe_value q = b.rotary(parts[0], n_heads, head_dim, rope);
    const tpe_value k = b.rotary(parts[1], n_kv_heads, head_dim, rope);
    const tpe_value a = b.attention(q, k, parts[2], n_heads, n_kv_heads, head_dim);
    const tpe_value attn_out = b.linear(a, p + ".attn.out", q_width, d_model, false);

    // MLP with a squared-ReLU activation.
    const tpe_value r = b.activation(b.linear(h, p + ".mlp.up", d_model, d_ff, false), TPE_ACT_RELU);
    const tpe_value mlp_out = b.linear(b.mul(r, r), p + ".mlp.down", d_ff, d_model, false);

    x = b.add(x, b.add(attn_out, mlp_out));
    b.end_block();
  }
  x = b.norm(x, TPE_NORM_RMS, "final_norm", false, eps);
  b.lm_head(x, "readout.matrix", vocab, d_model);
}

const char* const kModelTypes[] = {"toy_lm", nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .name = */ "toy_lm",
    /* .version = */ "1.0.0",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ nullptr,
    /* .injection_policy = */ nullptr,  // let tpengine work out the split
    /* .build = */ tpengine::build_with<build>,
    /* .description = */ "ToyLM: the SDK tutorial's made-up architecture",
};

}  // namespace

TPENGINE_POLICY(kDesc)
