// The host side of the policy ABI: the tpe_host_api table whose functions a plugin's build()
// calls. Each function catches everything so no C++ exception crosses into plugin code.
#include <deque>
#include <string>

#include <fmt/format.h>

#include "core/common/error.hpp"
#include "core/plugin/abi_struct.hpp"
#include "core/plugin/isolate.hpp"
#include "core/plugin/registry.hpp"

struct tpe_graph {
  tpe::graph::GraphBuilder builder;
  const tpe::config::ModelConfig* config = nullptr;
  std::deque<std::string> strings;  // config_string results, alive until build() returns
};

namespace tpe::plugin {
namespace {

std::string str(const char* s) { return s != nullptr ? s : ""; }

// Runs f, turning any exception into the graph's error.
template <typename F, typename R>
R guarded(tpe_graph* g, R on_error, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    g->builder.set_error(e.what());
  } catch (...) {
    g->builder.set_error("unknown exception in the host");
  }
  return on_error;
}

// A struct the plugin passed, read up to its struct_size; errors name the host function.
template <typename T>
T from_plugin(const char* function, const T* desc) {
  try {
    return read_struct(desc);
  } catch (const Error& e) {
    fail("{}: {}", function, e.what());
  }
}

template <typename T, typename Out>
tpe_lookup lookup(tpe_graph* g, const char* key, Out* out) {
  return guarded(g, TPE_MISSING, [&] {
    T value{};
    tpe_lookup r = TPE_MISSING;
    if constexpr (std::is_same_v<T, int64_t>) r = g->config->get_int(str(key), value);
    if constexpr (std::is_same_v<T, double>) r = g->config->get_float(str(key), value);
    if constexpr (std::is_same_v<T, bool>) r = g->config->get_bool(str(key), value);
    if (r == TPE_FOUND && out != nullptr) *out = static_cast<Out>(value);
    return r;
  });
}

tpe_lookup config_int(tpe_graph* g, const char* key, int64_t* out) {
  return lookup<int64_t>(g, key, out);
}
tpe_lookup config_float(tpe_graph* g, const char* key, double* out) {
  return lookup<double>(g, key, out);
}
tpe_lookup config_bool(tpe_graph* g, const char* key, int* out) {
  return lookup<bool>(g, key, out);
}
tpe_lookup config_string(tpe_graph* g, const char* key, const char** out) {
  return guarded(g, TPE_MISSING, [&] {
    std::string value;
    const tpe_lookup r = g->config->get_string(str(key), value);
    if (r == TPE_FOUND && out != nullptr) *out = g->strings.emplace_back(value).c_str();
    return r;
  });
}

tpe_status rope_from_config(tpe_graph* g, tpe_rope_desc* out) {
  return guarded(g, TPE_ERROR, [&] {
    if (out == nullptr) {
      g->builder.set_error("rope_from_config: out is NULL");
      return TPE_ERROR;
    }
    // Up to the plugin's struct_size: a plugin of an older minor has a shorter struct.
    const tpe_rope_desc rope = g->config->rope();
    try {
      write_struct(out, rope);
    } catch (const Error& e) {
      fail("rope_from_config: {}", e.what());
    }
    return TPE_OK;
  });
}

void set_error(tpe_graph* g, const char* message) { g->builder.set_error(str(message)); }

void begin_block(tpe_graph* g, const char* cls, const char* prefix) {
  guarded(g, 0, [&] {
    g->builder.begin_block(str(cls), str(prefix));
    return 0;
  });
}
void end_block(tpe_graph* g) {
  guarded(g, 0, [&] {
    g->builder.end_block();
    return 0;
  });
}

tpe_value input_ids(tpe_graph* g) {
  return guarded(g, TPE_INVALID_VALUE, [&] { return g->builder.input_ids(); });
}
tpe_value position_ids(tpe_graph* g, int64_t offset) {
  return guarded(g, TPE_INVALID_VALUE, [&] { return g->builder.position_ids(offset); });
}
tpe_value embedding(tpe_graph* g, tpe_value ids, const char* weight, int64_t vocab, int64_t width) {
  return guarded(g, TPE_INVALID_VALUE,
                 [&] { return g->builder.embedding(ids, str(weight), vocab, width); });
}
tpe_value norm(tpe_graph* g, tpe_value x, tpe_norm_kind kind, const char* prefix, int has_bias,
               double eps) {
  return guarded(g, TPE_INVALID_VALUE,
                 [&] { return g->builder.norm(x, kind, str(prefix), has_bias != 0, eps); });
}
tpe_value linear(tpe_graph* g, tpe_value x, const char* prefix, int64_t in, int64_t out,
                 int has_bias) {
  return guarded(g, TPE_INVALID_VALUE,
                 [&] { return g->builder.linear(x, str(prefix), in, out, has_bias != 0); });
}
tpe_value linear_transposed(tpe_graph* g, tpe_value x, const char* prefix, int64_t in, int64_t out,
                            int has_bias) {
  return guarded(g, TPE_INVALID_VALUE,
                 [&] { return g->builder.linear(x, str(prefix), in, out, has_bias != 0, true); });
}
tpe_status split(tpe_graph* g, tpe_value x, tpe_split_layout layout, int32_t n_parts,
                 const int64_t* part_widths, int64_t n_heads, int64_t head_dim,
                 tpe_value* parts_out) {
  return guarded(g, TPE_ERROR, [&] {
    if (n_parts <= 0 || parts_out == nullptr ||
        (layout != TPE_SPLIT_INTERLEAVED_HEADS && part_widths == nullptr)) {
      g->builder.set_error(
          "split: n_parts must be positive and parts_out (and, for concat and grouped, "
          "part_widths) non-null");
      return TPE_ERROR;
    }
    std::vector<int64_t> widths(static_cast<size_t>(n_parts), 0);
    if (part_widths != nullptr) widths.assign(part_widths, part_widths + n_parts);
    std::vector<int> parts;
    const bool ok = g->builder.split(x, layout, widths, n_heads, head_dim, parts);
    for (int32_t i = 0; i < n_parts; ++i) parts_out[i] = ok ? parts[i] : TPE_INVALID_VALUE;
    return ok ? TPE_OK : TPE_ERROR;
  });
}
tpe_value rotary(tpe_graph* g, tpe_value x, int64_t n_heads, int64_t head_dim,
                 const tpe_rope_desc* rope) {
  return guarded(g, TPE_INVALID_VALUE, [&]() -> tpe_value {
    if (rope == nullptr) {
      g->builder.set_error("rotary: rope is NULL");
      return TPE_INVALID_VALUE;
    }
    return g->builder.rotary(x, n_heads, head_dim, from_plugin("rotary", rope));
  });
}
tpe_value attention(tpe_graph* g, tpe_value q, tpe_value k, tpe_value v,
                    const tpe_attention_desc* desc) {
  return guarded(g, TPE_INVALID_VALUE, [&]() -> tpe_value {
    if (desc == nullptr) {
      g->builder.set_error("attention: desc is NULL");
      return TPE_INVALID_VALUE;
    }
    return g->builder.attention(q, k, v, from_plugin("attention", desc));
  });
}
tpe_value activation(tpe_graph* g, tpe_value x, tpe_activation act) {
  return guarded(g, TPE_INVALID_VALUE, [&] { return g->builder.activation(x, act); });
}
tpe_value mul(tpe_graph* g, tpe_value a, tpe_value b) {
  return guarded(g, TPE_INVALID_VALUE, [&] { return g->builder.mul(a, b); });
}
tpe_value add(tpe_graph* g, tpe_value a, tpe_value b) {
  return guarded(g, TPE_INVALID_VALUE, [&] { return g->builder.add(a, b); });
}
tpe_value lm_head(tpe_graph* g, tpe_value x, const char* weight, int64_t vocab, int64_t width) {
  return guarded(g, TPE_INVALID_VALUE,
                 [&] { return g->builder.lm_head(x, str(weight), vocab, width); });
}

const tpe_host_api kHostApi = {
    /* .struct_size = */ sizeof(tpe_host_api),
    /* .abi_major = */ TPE_ABI_MAJOR,
    /* .abi_minor = */ TPE_ABI_MINOR,
    /* .config_int = */ config_int,
    /* .config_float = */ config_float,
    /* .config_bool = */ config_bool,
    /* .config_string = */ config_string,
    /* .rope_from_config = */ rope_from_config,
    /* .set_error = */ set_error,
    /* .begin_block = */ begin_block,
    /* .end_block = */ end_block,
    /* .input_ids = */ input_ids,
    /* .embedding = */ embedding,
    /* .norm = */ norm,
    /* .linear = */ linear,
    /* .split = */ split,
    /* .rotary = */ rotary,
    /* .attention = */ attention,
    /* .activation = */ activation,
    /* .mul = */ mul,
    /* .add = */ add,
    /* .lm_head = */ lm_head,
    /* .position_ids = */ position_ids,
    /* .linear_transposed = */ linear_transposed,
};

}  // namespace

graph::Graph build_graph(const Policy& policy, const config::ModelConfig& config) {
  if (policy.library == nullptr) {  // discovered isolated: load and build it in a child
    const std::string who =
        fmt::format("policy '{}' ({}) building {}", policy.name, printable(policy.file.string()),
                    printable(config.path().string()));
    const std::string graph = run_in_child(
        who, "building its graph",
        [&] {
          return graph_to_json(build_graph(Registry::load(policy.file, policy.origin), config));
        },
        policy_timeout_seconds());
    return graph_from_json(graph, who);
  }
  tpe_graph g;
  g.config = &config;
  // The plugin's strings are its own: escaped and capped like any text from a file.
  const std::string who =
      fmt::format("policy '{}' ({}) building {}", printable(policy.name),
                  printable(policy.file.string()), printable(config.path().string()));
  tpe_status status = TPE_ERROR;
  try {
    status = policy.desc.build(&kHostApi, &g);
  } catch (const std::exception& e) {
    fail("{}: build threw an exception across the ABI boundary: {}", who, printable(e.what()));
  } catch (...) {
    fail("{}: build threw an exception across the ABI boundary", who);
  }
  if (g.builder.error()) fail("{}: {}", who, printable(*g.builder.error()));
  if (status != TPE_OK) fail("{}: build failed without saying why", who);
  try {
    return g.builder.finish();
  } catch (const Error& e) {
    fail("{}: {}", who, e.what());
  }
}

}  // namespace tpe::plugin
