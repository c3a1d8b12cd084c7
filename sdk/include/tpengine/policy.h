/*
 * tpengine policy ABI — the only contract between the engine and a policy plugin.
 *
 * A policy plugin is a shared library that exports exactly one symbol, tpe_policy_entry. The host
 * calls it with its own ABI version; the plugin returns a static descriptor naming the model
 * types it serves, an optional legacy injection policy, and a build function. build() receives a
 * table of host functions (tpe_host_api) and describes the architecture's graph through it;
 * plugins never link against the engine.
 *
 * Versioning (SQLite's extension pattern): every table and descriptor starts with struct_size,
 * which the side that allocates it sets to sizeof (as compiled). A minor version only appends
 * members at the end; a major version changes the meaning or layout of existing members. The
 * host refuses a plugin whose major differs from its own and loads one of any minor of its own
 * major, older or newer:
 *  - a struct the plugin passes (tpe_policy_desc, tpe_rope_desc, tpe_attention_desc) is read up
 *    to its struct_size; a member past it (added by a minor newer than the plugin) takes the
 *    default written beside it below, and members past what the host knows are not read;
 *  - a struct the host fills for the plugin (rope_from_config) is written up to its struct_size,
 *    and its struct_size is left as the plugin set it;
 *  - a struct_size below the struct's size in ABI 1.0 (all of its "since 1.0" members) is refused
 *    with an error naming the plugin and the struct.
 * tpe_host_api is filled by the host: a plugin reads a member only if api->struct_size covers it.
 *
 * Nothing crosses this boundary but C types: no exceptions, no STL, no memory owned by the other
 * side. Strings passed in are copied before the call returns.
 */
#ifndef TPENGINE_POLICY_H
#define TPENGINE_POLICY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TPE_ABI_MAJOR 1
#define TPE_ABI_MINOR 2

/* The name of the one symbol a plugin exports. */
#define TPE_POLICY_ENTRY_SYMBOL "tpe_policy_entry"

#if defined(_WIN32)
#define TPE_POLICY_EXPORT __declspec(dllexport)
#else
#define TPE_POLICY_EXPORT __attribute__((visibility("default")))
#endif

typedef enum tpe_status { TPE_OK = 0, TPE_ERROR = 1 } tpe_status;

/* Result of a config lookup. */
typedef enum tpe_lookup {
  TPE_FOUND = 0,
  TPE_MISSING = 1,   /* key absent or null */
  TPE_WRONG_TYPE = 2 /* present with another JSON type */
} tpe_lookup;

/* The graph under construction; opaque to plugins. */
typedef struct tpe_graph tpe_graph;

/* A value in the graph: every value is a [tokens, width] activation. Negative = invalid; a
 * builder call given an invalid value returns an invalid value, so a plugin may check once. */
typedef int32_t tpe_value;
#define TPE_INVALID_VALUE ((tpe_value)-1)

typedef enum tpe_norm_kind { TPE_NORM_RMS = 0, TPE_NORM_LAYER = 1 } tpe_norm_kind;

typedef enum tpe_activation {
  TPE_ACT_SILU = 0,
  TPE_ACT_GELU = 1,      /* exact, erf-based */
  TPE_ACT_GELU_TANH = 2, /* tanh approximation (gelu_new, gelu_pytorch_tanh, gelu_fast) */
  TPE_ACT_RELU = 3
} tpe_activation;

/* How a fused projection's output is laid out across its parts (e.g. q, k, v). */
typedef enum tpe_split_layout {
  /* [part0 | part1 | ...]: parts concatenated, each of its own width (qkv_proj, gate_up_proj). */
  TPE_SPLIT_CONCAT = 0,
  /* per head: [h0: part0 part1 ... | h1: part0 part1 ... ]; every part has n_heads heads of
   * head_dim (GPT-NeoX query_key_value, BLOOM). */
  TPE_SPLIT_INTERLEAVED_HEADS = 1,
  /* since 1.2: n_heads groups, each holding part after part its share of every part
   * (part_widths[p] / n_heads columns of part p): Falcon-40B's query_key_value, per kv group its
   * q heads, then its k head, then its v head. A host of minor < 2 refuses it. */
  TPE_SPLIT_GROUPED = 2
} tpe_split_layout;

typedef enum tpe_rope_type {
  TPE_ROPE_DEFAULT = 0,
  TPE_ROPE_LINEAR = 1,
  TPE_ROPE_DYNAMIC = 2, /* dynamic NTK */
  TPE_ROPE_LLAMA3 = 3
} tpe_rope_type;

/* Rotary embedding parameters, as read from config.json by tpe_host_api.rope_from_config.
 * Every member is a 1.0 member (56 bytes on LP64), present in every valid struct; a member a
 * later minor appends says here the default the host takes when a struct lacks it. */
typedef struct tpe_rope_desc {
  /* ---- since 1.0 ---- */
  uint32_t struct_size;
  tpe_rope_type type;
  double theta;
  double partial_rotary_factor; /* fraction of head_dim that rotates; 1.0 = all */
  double factor;                /* linear, dynamic, llama3 */
  double low_freq_factor;       /* llama3 */
  double high_freq_factor;      /* llama3; may equal low_freq_factor */
  /* llama3: the pretraining length; dynamic: config.json's max_position_embeddings, beyond
   * which the base is rescaled (as transformers does) */
  int64_t original_max_position_embeddings;
} tpe_rope_desc;

/* The 1.0 members (48 bytes on LP64) are present in every valid struct; each later member says
 * the default the host takes when a struct lacks it. */
typedef struct tpe_attention_desc {
  /* ---- since 1.0 ---- */
  uint32_t struct_size;
  int64_t n_heads;    /* query heads */
  int64_t n_kv_heads; /* key/value heads; n_heads % n_kv_heads == 0 */
  int64_t head_dim;
  double scale;           /* softmax scale; 0 = 1/sqrt(head_dim) */
  int64_t sliding_window; /* 0 = none; else a key is visible if query_pos - key_pos < window */

  /* ---- since 1.2 ---- */
  /* ALiBi: 0 = none (absent: 0); else query head h (of all n_heads, whichever rank runs it) adds
   * slope_h * alibi_slope_scale * (key_pos - query_pos) to its scaled score, with the ALiBi
   * paper's slopes for n_heads whose largest bias is this (8 for BLOOM, Falcon and MPT):
   * slope_h = 2^(-alibi_max_bias * (h + 1) / n) for n = n_heads a power of two; otherwise the
   * slopes of the power of two below n_heads, then every other slope of the one above. */
  double alibi_max_bias;
  double alibi_slope_scale; /* 0 or absent: 1; Falcon: 1/sqrt(head_dim) */
} tpe_attention_desc;

/* One entry of a legacy injection policy: in every block of class block_class, the linears
 * named (relative to the block's prefix) are row-parallel and all-reduced; the rest are
 * column-parallel. */
typedef struct tpe_injection_rule {
  const char* block_class;
  const char* const* row_parallel; /* NULL-terminated */
} tpe_injection_rule;

/*
 * The host API. Passed to build(); valid only during that call. Every builder function records
 * an error in the graph (readable by the user with the plugin's name) and returns
 * TPE_INVALID_VALUE on bad arguments.
 */
typedef struct tpe_host_api {
  uint32_t struct_size;
  uint16_t abi_major;
  uint16_t abi_minor;

  /* ---- since 1.0: reading config.json ---------------------------------------------------- */
  /* key is a dotted path into config.json ("rope_scaling.factor"). */
  tpe_lookup (*config_int)(tpe_graph* g, const char* key, int64_t* out);
  tpe_lookup (*config_float)(tpe_graph* g, const char* key, double* out);
  tpe_lookup (*config_bool)(tpe_graph* g, const char* key, int* out);
  /* The string is owned by the host and valid until build() returns. */
  tpe_lookup (*config_string)(tpe_graph* g, const char* key, const char** out);
  /* Reads rope_theta/rope_scaling (transformers 4.x) or rope_parameters (5.x). */
  tpe_status (*rope_from_config)(tpe_graph* g, tpe_rope_desc* out);
  /* Reports an error; build() should then return TPE_ERROR. The host prints it verbatim, with
   * the plugin's name. */
  void (*set_error)(tpe_graph* g, const char* message);

  /* ---- since 1.0: blocks ----------------------------------------------------------------- */
  /* Ops created between begin_block and end_block belong to one block, named like the HF module
   * class (block_class) at a checkpoint prefix ("model.layers.3"). Blocks do not nest. */
  void (*begin_block)(tpe_graph* g, const char* block_class, const char* prefix);
  void (*end_block)(tpe_graph* g);

  /* ---- since 1.0: ops -------------------------------------------------------------------- */
  /* The token ids of the batch; every graph starts here. */
  tpe_value (*input_ids)(tpe_graph* g);
  /* weight: full tensor name, shape [vocab, width]. */
  tpe_value (*embedding)(tpe_graph* g, tpe_value ids, const char* weight, int64_t vocab,
                         int64_t width);
  /* prefix: checkpoint prefix; reads prefix.weight and (when has_bias) prefix.bias. */
  tpe_value (*norm)(tpe_graph* g, tpe_value x, tpe_norm_kind kind, const char* prefix, int has_bias,
                    double eps);
  /* prefix.weight has shape [out_features, in_features]; prefix.bias [out_features]. */
  tpe_value (*linear)(tpe_graph* g, tpe_value x, const char* prefix, int64_t in_features,
                      int64_t out_features, int has_bias);
  /* Splits a fused value into n_parts values. For TPE_SPLIT_CONCAT, part_widths gives each part's
   * width; for TPE_SPLIT_INTERLEAVED_HEADS every part is n_heads * head_dim wide. */
  tpe_status (*split)(tpe_graph* g, tpe_value x, tpe_split_layout layout, int32_t n_parts,
                      const int64_t* part_widths, int64_t n_heads, int64_t head_dim,
                      tpe_value* parts_out);
  /* Rotates x, viewed as [tokens, n_heads, head_dim], by token position (rotate-half style). */
  tpe_value (*rotary)(tpe_graph* g, tpe_value x, int64_t n_heads, int64_t head_dim,
                      const tpe_rope_desc* rope);
  /* Causal attention with a KV cache; output width n_heads * head_dim. */
  tpe_value (*attention)(tpe_graph* g, tpe_value q, tpe_value k, tpe_value v,
                         const tpe_attention_desc* desc);
  tpe_value (*activation)(tpe_graph* g, tpe_value x, tpe_activation act);
  tpe_value (*mul)(tpe_graph* g, tpe_value a, tpe_value b);
  tpe_value (*add)(tpe_graph* g, tpe_value a, tpe_value b);
  /* The output logits; weight: full tensor name, shape [vocab, width] (may be the embedding's). */
  tpe_value (*lm_head)(tpe_graph* g, tpe_value x, const char* weight, int64_t vocab, int64_t width);

  /* ---- since 1.2 ------------------------------------------------------------------------- */
  /* Each token's position in its sequence plus offset, as ids an embedding can look up: learned
   * absolute positions (GPT-2: 0; OPT: 2, its table's first two rows unused). An embedding of
   * these ids reads rows [offset, vocab) of its table, and a sequence may not outgrow them. */
  tpe_value (*position_ids)(tpe_graph* g, int64_t offset);
  /* As linear, but prefix.weight is stored transposed, [in_features, out_features] (GPT-2's
   * Conv1D: y = x W + b). The host transposes it once, at load. */
  tpe_value (*linear_transposed)(tpe_graph* g, tpe_value x, const char* prefix, int64_t in_features,
                                 int64_t out_features, int has_bias);
} tpe_host_api;

/* The 1.0 members (56 bytes on LP64) are present in every valid descriptor; each later member
 * says the default the host takes when a descriptor's struct_size does not reach it. */
typedef struct tpe_policy_desc {
  /* ---- since 1.0 ---- */
  uint32_t struct_size;
  uint16_t abi_major; /* TPE_ABI_MAJOR the plugin was built with */
  uint16_t abi_minor;
  const char* name;                 /* short, unique: "llama" */
  const char* version;              /* the plugin's own version */
  const char* const* model_types;   /* NULL-terminated config.json model_type values */
  const char* const* architectures; /* NULL-terminated config.json architectures, or NULL */
  const tpe_injection_rule* injection_policy; /* terminated by block_class == NULL, or NULL */
  /* Builds the graph for the model whose config.json the host holds. */
  tpe_status (*build)(const tpe_host_api* api, tpe_graph* graph);

  /* ---- since 1.1 ---- */
  const char* description; /* one line for `tpengine policies`, or NULL; absent: NULL */
} tpe_policy_desc;

/* The descriptor size of ABI 1.0, the least struct_size a host accepts; it reads members past
 * it only when struct_size covers them. */
#define TPE_POLICY_DESC_SIZE_1_0 offsetof(tpe_policy_desc, description)

/* The entry point. The host passes its ABI version; the plugin returns its descriptor (static
 * storage), or NULL if it cannot serve that host. */
typedef const tpe_policy_desc* (*tpe_policy_entry_fn)(uint16_t host_abi_major,
                                                      uint16_t host_abi_minor);

#ifdef __cplusplus
}
#endif

#endif /* TPENGINE_POLICY_H */
