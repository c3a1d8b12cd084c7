// One toy policy plugin, built once per TOY_VARIANT (as the Vulkan loader's tests build one layer
// many ways): deliberately broken variants exercise every failure path of loading and building,
// and working Llama variants meet the host across ABI versions. The ABI_1_0 and ABI_1_9 variants
// are compiled against header copies in tests/abi/abi_1_0 and abi_1_9 instead of the SDK's, so
// their structs really have those versions' sizes; the others against the SDK.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

#include <tpengine/policy.h>

#define TOY_OK 0
#define TOY_NO_ENTRY 1
#define TOY_NULL_ENTRY 2
#define TOY_NEXT_MAJOR 3
#define TOY_FAILING_BUILD 4
#define TOY_THROWING_BUILD 5
#define TOY_MISSING_WEIGHT 6     /* builds a graph naming a tensor no checkpoint has */
#define TOY_ABI_1_0 7            /* Llama, built against the frozen ABI 1.0 header */
#define TOY_ABI_1_9 8            /* Llama, built against a future minor's header */
#define TOY_SHORT_ATTENTION 9    /* tpe_attention_desc.struct_size below its 1.0 size */
#define TOY_SHORT_ROPE_OUT 10    /* the same for the tpe_rope_desc rope_from_config fills */
#define TOY_SHORT_ROPE_IN 11     /* the same for the tpe_rope_desc passed to rotary */
#define TOY_SHORT_POLICY_DESC 12 /* the same for the tpe_policy_desc */
#define TOY_SEGV_BUILD 13        /* build() dereferences a null pointer */
#define TOY_DATA_ENTRY 14        /* tpe_policy_entry is data, not a function */
#define TOY_ABORT_CTOR 15        /* a constructor aborts as the library loads */
#define TOY_SHORT_SPLIT 16       /* split() given part arrays far shorter than n_parts */
#define TOY_HANG_BUILD 17        /* build() never returns */

// Each variant sees the header it claims to, with that version's struct sizes (LP64).
#if TOY_VARIANT == TOY_ABI_1_0
static_assert(TPE_ABI_MAJOR == 1 && TPE_ABI_MINOR == 0, "ABI_1_0 must see tests/abi/abi_1_0");
static_assert(sizeof(void*) != 8 || (sizeof(tpe_policy_desc) == 56 && sizeof(tpe_rope_desc) == 56 &&
                                     sizeof(tpe_attention_desc) == 48));
#elif TOY_VARIANT == TOY_ABI_1_9
static_assert(TPE_ABI_MAJOR == 1 && TPE_ABI_MINOR == 9, "ABI_1_9 must see tests/abi/abi_1_9");
static_assert(sizeof(void*) != 8 || (sizeof(tpe_policy_desc) == 72 && sizeof(tpe_rope_desc) == 64 &&
                                     sizeof(tpe_attention_desc) == 72));
#else
static_assert(TPE_ABI_MAJOR == 1 && TPE_ABI_MINOR >= 1, "the SDK's header");
#endif

#define TOY_LLAMA                                                             \
  (TOY_VARIANT == TOY_ABI_1_0 || TOY_VARIANT == TOY_ABI_1_9 ||                \
   TOY_VARIANT == TOY_SHORT_ATTENTION || TOY_VARIANT == TOY_SHORT_ROPE_OUT || \
   TOY_VARIANT == TOY_SHORT_ROPE_IN)

namespace {

// A struct as a plugin holds it, followed in memory by bytes that belong to the plugin and that
// no host may read (as members it does not have) or write.
template <typename T>
struct Fenced {
  T s;
  unsigned char fence[16];
};
constexpr unsigned char kFence = 0xA5;

template <typename T>
void set_fence(Fenced<T>& f) {
  std::memset(f.fence, kFence, sizeof(f.fence));
}
template <typename T>
bool fence_intact(const Fenced<T>& f) {
  for (unsigned char c : f.fence) {
    if (c != kFence) return false;
  }
  return true;
}

#if TOY_LLAMA
int64_t int_or(const tpe_host_api* api, tpe_graph* g, const char* key, int64_t fallback) {
  int64_t v = fallback;
  return api->config_int(g, key, &v) == TPE_FOUND ? v : fallback;
}

// Llama and Mistral (sliding window) through the raw C API, as the built-in llama policy builds
// them; every struct the host sees has exactly this plugin's ABI's size.
tpe_status build_llama(const tpe_host_api* api, tpe_graph* g) {
#if TOY_VARIANT == TOY_ABI_1_9
  // The host is older: its table ends before 1.9's scale(), and struct_size says so.
  if (api->struct_size >= offsetof(tpe_host_api, scale) + sizeof(api->scale)) {
    api->set_error(g, "toy 1.9: the host's table claims 1.9's scale(), which it cannot have");
    return TPE_ERROR;
  }
#endif
  const char* model_type = "";
  api->config_string(g, "model_type", &model_type);
  const int64_t hidden = int_or(api, g, "hidden_size", 0);
  const int64_t n_heads = int_or(api, g, "num_attention_heads", 1);
  const int64_t n_kv = int_or(api, g, "num_key_value_heads", n_heads);
  const int64_t head_dim = int_or(api, g, "head_dim", hidden / n_heads);
  const int64_t ffn = int_or(api, g, "intermediate_size", 0);
  const int64_t layers = int_or(api, g, "num_hidden_layers", 0);
  const int64_t vocab = int_or(api, g, "vocab_size", 0);
  const int64_t window =
      std::strcmp(model_type, "mistral") == 0 ? int_or(api, g, "sliding_window", 0) : 0;
  double eps = 0;
  api->config_float(g, "rms_norm_eps", &eps);
  int tied = 0;
  api->config_bool(g, "tie_word_embeddings", &tied);

  // The rope the host fills, fenced: the host writes up to struct_size and no further, and
  // leaves struct_size as this plugin set it.
  Fenced<tpe_rope_desc> rope;
  std::memset(&rope.s, 0, sizeof(rope.s));
  set_fence(rope);
  rope.s.struct_size = sizeof(tpe_rope_desc);
#if TOY_VARIANT == TOY_SHORT_ROPE_OUT
  rope.s.struct_size = offsetof(tpe_rope_desc, original_max_position_embeddings);
#endif
#if TOY_VARIANT == TOY_ABI_1_9
  rope.s.attention_factor = 1234.5;  // a 1.9 member: the 1.2 host neither knows nor writes it
#endif
  if (api->rope_from_config(g, &rope.s) != TPE_OK) return TPE_ERROR;
  if (rope.s.struct_size != sizeof(tpe_rope_desc) || !fence_intact(rope)) {
    api->set_error(g, "toy: rope_from_config wrote past tpe_rope_desc.struct_size");
    return TPE_ERROR;
  }
#if TOY_VARIANT == TOY_ABI_1_9
  if (rope.s.attention_factor != 1234.5) {
    api->set_error(g, "toy 1.9: rope_from_config wrote a member the host does not know");
    return TPE_ERROR;
  }
#endif
#if TOY_VARIANT == TOY_SHORT_ROPE_IN
  rope.s.struct_size = offsetof(tpe_rope_desc, original_max_position_embeddings);
#endif

  // The attention descriptor, fenced with bytes that would be garbage as any later member.
  Fenced<tpe_attention_desc> attention;
  std::memset(&attention.s, 0, sizeof(attention.s));
  set_fence(attention);
  attention.s.struct_size = sizeof(tpe_attention_desc);
  attention.s.n_heads = n_heads;
  attention.s.n_kv_heads = n_kv;
  attention.s.head_dim = head_dim;
  attention.s.sliding_window = window;
#if TOY_VARIANT == TOY_ABI_1_9
  attention.s.logit_softcap = 30.0;  // a 1.9 member the 1.2 host must not read
#endif
#if TOY_VARIANT == TOY_SHORT_ATTENTION
  attention.s.struct_size = offsetof(tpe_attention_desc, sliding_window);
#endif

  tpe_value x = api->embedding(g, api->input_ids(g), "model.embed_tokens.weight", vocab, hidden);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i);
    auto name = [&p](const char* rest) { return p + rest; };
    api->begin_block(g, window > 0 ? "MistralDecoderLayer" : "LlamaDecoderLayer", p.c_str());
    tpe_value h = api->norm(g, x, TPE_NORM_RMS, name(".input_layernorm").c_str(), 0, eps);
    tpe_value q =
        api->linear(g, h, name(".self_attn.q_proj").c_str(), hidden, n_heads * head_dim, 0);
    tpe_value k = api->linear(g, h, name(".self_attn.k_proj").c_str(), hidden, n_kv * head_dim, 0);
    tpe_value v = api->linear(g, h, name(".self_attn.v_proj").c_str(), hidden, n_kv * head_dim, 0);
    q = api->rotary(g, q, n_heads, head_dim, &rope.s);
    k = api->rotary(g, k, n_kv, head_dim, &rope.s);
    const tpe_value a = api->attention(g, q, k, v, &attention.s);
    x = api->add(
        g, x, api->linear(g, a, name(".self_attn.o_proj").c_str(), n_heads * head_dim, hidden, 0));
    h = api->norm(g, x, TPE_NORM_RMS, name(".post_attention_layernorm").c_str(), 0, eps);
    const tpe_value gate = api->linear(g, h, name(".mlp.gate_proj").c_str(), hidden, ffn, 0);
    const tpe_value up = api->linear(g, h, name(".mlp.up_proj").c_str(), hidden, ffn, 0);
    const tpe_value m = api->mul(g, api->activation(g, gate, TPE_ACT_SILU), up);
    x = api->add(g, x, api->linear(g, m, name(".mlp.down_proj").c_str(), ffn, hidden, 0));
    api->end_block(g);
  }
  x = api->norm(g, x, TPE_NORM_RMS, "model.norm", 0, eps);
  api->lm_head(g, x, tied ? "model.embed_tokens.weight" : "lm_head.weight", vocab, hidden);
  if (!fence_intact(attention) || !fence_intact(rope)) {
    api->set_error(g, "toy: the host wrote past a struct it was given");
    return TPE_ERROR;
  }
  return TPE_OK;
}
#endif

#if TOY_VARIANT == TOY_ABORT_CTOR
[[gnu::constructor]] void abort_on_load() { std::abort(); }
#endif

tpe_status build(const tpe_host_api* api, tpe_graph* g) {
#if TOY_VARIANT == TOY_SEGV_BUILD
  (void)api;
  (void)g;
  // An address no mapping holds (not null: UBSan would report a null store first).
  volatile uintptr_t address = 16;
  *reinterpret_cast<volatile int*>(address) = 1;
  return TPE_ERROR;
#elif TOY_VARIANT == TOY_SHORT_SPLIT
  // One part's room at the end of a page, 2^24 parts claimed: the host reads past both arrays
  // into unmapped memory (mmap'd, so no sanitizer's redzone reports it first).
  const tpe_value x =
      api->linear(g, api->embedding(g, api->input_ids(g), "model.embed_tokens.weight", 128, 64),
                  "model.layers.0.self_attn.q_proj", 64, 64, 0);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  auto* base = static_cast<char*>(
      mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  munmap(base + page, page);  // the page after is no memory at all
  auto* width = reinterpret_cast<int64_t*>(base + page - sizeof(int64_t));
  auto* part = reinterpret_cast<tpe_value*>(base + page - 2 * sizeof(int64_t));
  *width = 64;
  api->split(g, x, TPE_SPLIT_CONCAT, 1 << 24, width, 0, 0, part);
  return TPE_ERROR;
#elif TOY_VARIANT == TOY_HANG_BUILD
  (void)api;
  (void)g;
  for (volatile bool forever = true; forever;) {
  }
  return TPE_ERROR;
#elif TOY_VARIANT == TOY_THROWING_BUILD
  (void)api;
  (void)g;
  throw std::runtime_error("toy exception from build");
#elif TOY_LLAMA
  return build_llama(api, g);
#elif TOY_VARIANT == TOY_MISSING_WEIGHT
  // Embedding -> norm -> LM head, on llama_mha's width and vocabulary.
  tpe_value x = api->embedding(g, api->input_ids(g), "model.embed_tokens.weight", 128, 64);
  x = api->norm(g, x, TPE_NORM_RMS, "toy.missing_norm", 0, 1e-6);
  api->lm_head(g, x, "lm_head.weight", 128, 64);
  return TPE_OK;
#else
  api->set_error(g, "the toy policy refuses to build this model");
  return TPE_ERROR;
#endif
}

const char* const kModelTypes[] = {"llama", "mistral", nullptr};

// The descriptor, followed in memory by a pointer to a string: a host reading a member this
// plugin's descriptor does not have (1.0: description) would show that string.
struct FencedDesc {
  tpe_policy_desc desc;
  const char* after;
};

const FencedDesc kDesc = {
    {
        /* .struct_size = */ sizeof(tpe_policy_desc),
#if TOY_VARIANT == TOY_NEXT_MAJOR
        /* .abi_major = */ TPE_ABI_MAJOR + 1,
#else
        /* .abi_major = */ TPE_ABI_MAJOR,
#endif
        /* .abi_minor = */ TPE_ABI_MINOR,
        /* .name = */ "toy",
        /* .version = */ "0.0.1",
        /* .model_types = */ kModelTypes,
        /* .architectures = */ nullptr,
        /* .injection_policy = */ nullptr,
        /* .build = */ build,
#if TOY_VARIANT == TOY_ABI_1_9
        /* .description = */ "a toy built against ABI 1.9",
        /* .homepage = */ "https://toy.invalid/",
#elif TOY_VARIANT != TOY_ABI_1_0
        /* .description = */ "a deliberately broken policy for the ABI tests",
#endif
    },
    "read past the end of the plugin's tpe_policy_desc",
};

const tpe_policy_desc* descriptor() {
#if TOY_VARIANT == TOY_SHORT_POLICY_DESC
  static tpe_policy_desc shortened = kDesc.desc;
  shortened.struct_size = TPE_POLICY_DESC_SIZE_1_0 - sizeof(void*);
  return &shortened;
#else
  return &kDesc.desc;
#endif
}

}  // namespace

#if TOY_VARIANT == TOY_DATA_ENTRY
// The entry's name on an object: calling it executes data.
extern "C" TPE_POLICY_EXPORT const unsigned char tpe_policy_entry[16] = {0};
const tpe_policy_desc* (*const kKeep)() = &descriptor;
#elif TOY_VARIANT == TOY_NO_ENTRY
extern "C" TPE_POLICY_EXPORT const tpe_policy_desc* tpe_policy_entry_misspelled(uint16_t,
                                                                                uint16_t) {
  return descriptor();
}
#else
extern "C" TPE_POLICY_EXPORT const tpe_policy_desc* tpe_policy_entry(uint16_t, uint16_t) {
#if TOY_VARIANT == TOY_NULL_ENTRY
  (void)descriptor;  // has one, declines anyway
  return nullptr;
#else
  return descriptor();
#endif
}
#endif
