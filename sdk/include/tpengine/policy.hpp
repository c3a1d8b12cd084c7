// Header-only C++ over the policy ABI (policy.h): typed config reads that fail with the key's
// name, op calls without the graph handle, and a build wrapper that keeps C++ exceptions from
// crossing the ABI boundary. Everything here compiles into the plugin; nothing links the engine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "tpengine/policy.h"

namespace tpengine {

// Thrown inside a plugin; the build wrapper turns it into set_error + TPE_ERROR.
class PolicyError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Builder {
 public:
  Builder(const tpe_host_api* api, tpe_graph* graph) : api_(api), g_(graph) {}

  // ---- config.json ----
  int64_t require_int(const char* key) const {
    int64_t v = 0;
    check(api_->config_int(g_, key, &v), key, "an integer");
    return v;
  }
  int64_t int_or(const char* key, int64_t fallback) const {
    int64_t v = fallback;
    return optional(api_->config_int(g_, key, &v), key, "an integer") ? v : fallback;
  }
  // A size (a width, a head count, a layer count): an integer in [1, max], else an error naming
  // the key and its value, before anything divides by it or allocates for it.
  static constexpr int64_t kMaxSize = int64_t{1} << 24;
  int64_t require_size(const char* key, int64_t max = kMaxSize) const {
    return checked_size(key, require_int(key), max);
  }
  int64_t size_or(const char* key, int64_t fallback, int64_t max = kMaxSize) const {
    int64_t v = fallback;
    return optional(api_->config_int(g_, key, &v), key, "an integer") ? checked_size(key, v, max)
                                                                      : fallback;
  }
  // a / b for two sizes read from config.json (a width per head, heads per kv head), else an
  // error naming both keys and values.
  static int64_t divide(const char* a_key, int64_t a, const char* b_key, int64_t b) {
    if (a % b != 0) {
      throw PolicyError(std::string("config.json: ") + a_key + " " + std::to_string(a) +
                        " is not a multiple of " + b_key + " " + std::to_string(b));
    }
    return a / b;
  }
  double require_float(const char* key) const {
    double v = 0;
    check(api_->config_float(g_, key, &v), key, "a number");
    return v;
  }
  bool bool_or(const char* key, bool fallback) const {
    int v = fallback;
    return optional(api_->config_bool(g_, key, &v), key, "a boolean") ? v != 0 : fallback;
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    const char* v = nullptr;
    return optional(api_->config_string(g_, key, &v), key, "a string") ? std::string(v) : fallback;
  }
  tpe_rope_desc rope() const {
    tpe_rope_desc rope{};
    rope.struct_size = sizeof(rope);
    if (api_->rope_from_config(g_, &rope) != TPE_OK) throw PolicyError("");  // host has the error
    return rope;
  }
  // transformers' hidden_act names. gelu_new, gelu_pytorch_tanh and gelu_fast are the same tanh
  // approximation, written three ways (fp32 results a few ulps apart).
  static tpe_activation activation_named(const std::string& name) {
    if (name == "silu" || name == "swish") return TPE_ACT_SILU;
    if (name == "gelu") return TPE_ACT_GELU;
    if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") {
      return TPE_ACT_GELU_TANH;
    }
    if (name == "relu") return TPE_ACT_RELU;
    throw PolicyError(
        "config.json: hidden_act '" + name +
        "' is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)");
  }

  // ---- graph ----
  void begin_block(const std::string& cls, const std::string& prefix) {
    api_->begin_block(g_, cls.c_str(), prefix.c_str());
  }
  void end_block() { api_->end_block(g_); }
  tpe_value input_ids() { return api_->input_ids(g_); }
  // Each token's position plus offset (learned absolute positions); ABI 1.2.
  tpe_value position_ids(int64_t offset = 0) {
    require_host(offsetof(tpe_host_api, position_ids), "position_ids");
    return api_->position_ids(g_, offset);
  }
  tpe_value embedding(tpe_value ids, const std::string& weight, int64_t vocab, int64_t width) {
    return api_->embedding(g_, ids, weight.c_str(), vocab, width);
  }
  tpe_value norm(tpe_value x, tpe_norm_kind kind, const std::string& prefix, bool bias,
                 double eps) {
    return api_->norm(g_, x, kind, prefix.c_str(), bias, eps);
  }
  tpe_value linear(tpe_value x, const std::string& prefix, int64_t in, int64_t out, bool bias) {
    return api_->linear(g_, x, prefix.c_str(), in, out, bias);
  }
  // A linear whose weight is stored [in, out] (GPT-2's Conv1D); ABI 1.2.
  tpe_value linear_transposed(tpe_value x, const std::string& prefix, int64_t in, int64_t out,
                              bool bias) {
    require_host(offsetof(tpe_host_api, linear_transposed), "linear_transposed");
    return api_->linear_transposed(g_, x, prefix.c_str(), in, out, bias);
  }
  std::vector<tpe_value> split_heads(tpe_value x, int32_t n_parts, int64_t n_heads,
                                     int64_t head_dim) {
    std::vector<tpe_value> parts(static_cast<size_t>(n_parts), TPE_INVALID_VALUE);
    api_->split(g_, x, TPE_SPLIT_INTERLEAVED_HEADS, n_parts, nullptr, n_heads, head_dim,
                parts.data());
    return parts;
  }
  std::vector<tpe_value> split_concat(tpe_value x, const std::vector<int64_t>& widths) {
    std::vector<tpe_value> parts(widths.size(), TPE_INVALID_VALUE);
    api_->split(g_, x, TPE_SPLIT_CONCAT, static_cast<int32_t>(widths.size()), widths.data(), 0, 0,
                parts.data());
    return parts;
  }
  // n_groups groups, each holding its share of every part in turn (Falcon's grouped qkv); ABI 1.2.
  std::vector<tpe_value> split_grouped(tpe_value x, int64_t n_groups,
                                       const std::vector<int64_t>& widths, int64_t head_dim) {
    std::vector<tpe_value> parts(widths.size(), TPE_INVALID_VALUE);
    if (api_->abi_minor < 2) {
      throw PolicyError(
          "the split layout TPE_SPLIT_GROUPED needs policy ABI 1.2; this tpengine "
          "speaks 1." +
          std::to_string(api_->abi_minor));
    }
    api_->split(g_, x, TPE_SPLIT_GROUPED, static_cast<int32_t>(widths.size()), widths.data(),
                n_groups, head_dim, parts.data());
    return parts;
  }
  tpe_value rotary(tpe_value x, int64_t n_heads, int64_t head_dim, const tpe_rope_desc& rope) {
    return api_->rotary(g_, x, n_heads, head_dim, &rope);
  }
  tpe_value attention(tpe_value q, tpe_value k, tpe_value v, int64_t n_heads, int64_t n_kv_heads,
                      int64_t head_dim, int64_t sliding_window = 0) {
    tpe_attention_desc desc = attention_desc(n_heads, n_kv_heads, head_dim);
    desc.sliding_window = sliding_window;
    return attention(q, k, v, desc);
  }
  // A descriptor of this SDK's size for causal attention over these heads; set the rest (scale,
  // ALiBi, window) on it.
  static tpe_attention_desc attention_desc(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim) {
    tpe_attention_desc desc{};
    desc.struct_size = sizeof(desc);
    desc.n_heads = n_heads;
    desc.n_kv_heads = n_kv_heads;
    desc.head_dim = head_dim;
    return desc;
  }
  // Any attention the descriptor describes (ALiBi, a scale of its own); members past what the
  // host knows would be ignored, so ALiBi on a host of minor < 2 is refused here.
  tpe_value attention(tpe_value q, tpe_value k, tpe_value v, const tpe_attention_desc& desc) {
    if (desc.alibi_max_bias != 0 && api_->abi_minor < 2) {
      throw PolicyError("ALiBi attention needs policy ABI 1.2; this tpengine speaks 1." +
                        std::to_string(api_->abi_minor));
    }
    return api_->attention(g_, q, k, v, &desc);
  }
  tpe_value activation(tpe_value x, tpe_activation act) { return api_->activation(g_, x, act); }
  tpe_value mul(tpe_value a, tpe_value b) { return api_->mul(g_, a, b); }
  tpe_value add(tpe_value a, tpe_value b) { return api_->add(g_, a, b); }
  tpe_value lm_head(tpe_value x, const std::string& weight, int64_t vocab, int64_t width) {
    return api_->lm_head(g_, x, weight.c_str(), vocab, width);
  }

 private:
  static void check(tpe_lookup r, const char* key, const char* type) {
    if (r == TPE_MISSING) throw PolicyError(std::string("config.json has no key '") + key + "'");
    if (r == TPE_WRONG_TYPE) {
      throw PolicyError(std::string("config.json: key '") + key + "' must be " + type);
    }
  }
  static int64_t checked_size(const char* key, int64_t v, int64_t max) {
    if (v < 1 || v > max) {
      throw PolicyError(std::string("config.json: key '") + key + "' must be in [1, " +
                        std::to_string(max) + "], got " + std::to_string(v));
    }
    return v;
  }
  // A host function added after 1.0 is called only when the host's table reaches it.
  void require_host(size_t offset, const char* function) const {
    if (api_->struct_size < offset + sizeof(void*)) {
      throw PolicyError(std::string("host function ") + function +
                        " needs a newer tpengine: this one speaks policy ABI " +
                        std::to_string(api_->abi_major) + "." + std::to_string(api_->abi_minor));
    }
  }
  static bool optional(tpe_lookup r, const char* key, const char* type) {
    if (r == TPE_MISSING) return false;
    check(r, key, type);
    return true;
  }
  const tpe_host_api* api_;
  tpe_graph* g_;
};

// A C build function around `fn(Builder&)`: exceptions become the host's error message.
template <void (*Fn)(Builder&)>
tpe_status build_with(const tpe_host_api* api, tpe_graph* graph) {
  try {
    Builder builder(api, graph);
    Fn(builder);
    return TPE_OK;
  } catch (const std::exception& e) {
    if (*e.what() != '\0') api->set_error(graph, e.what());
  } catch (...) {
    api->set_error(graph, "unknown C++ exception in the policy's build");
  }
  return TPE_ERROR;
}

}  // namespace tpengine

// Exports the entry symbol returning `desc` (a static tpe_policy_desc). The host checks the ABI
// version it declares, so the plugin answers every host and lets the host explain a mismatch.
#define TPENGINE_POLICY(desc)                                                                \
  extern "C" TPE_POLICY_EXPORT const tpe_policy_desc* tpe_policy_entry(uint16_t, uint16_t) { \
    return &(desc);                                                                          \
  }
