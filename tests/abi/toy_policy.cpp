// One deliberately broken policy plugin, built once per TOY_VARIANT (as the Vulkan loader's tests
// build one layer many ways), to exercise every failure path of loading and building.
#include <stdexcept>

#include <tpengine/policy.h>

#define TOY_OK 0
#define TOY_NO_ENTRY 1
#define TOY_NULL_ENTRY 2
#define TOY_NEXT_MAJOR 3
#define TOY_FAILING_BUILD 4
#define TOY_THROWING_BUILD 5
#define TOY_MINOR0 6         /* built against ABI 1.0: a shorter descriptor */
#define TOY_MISSING_WEIGHT 7 /* builds a graph naming a tensor no checkpoint has */

namespace {

tpe_status build(const tpe_host_api* api, tpe_graph* g) {
#if TOY_VARIANT == TOY_THROWING_BUILD
  (void)api;
  (void)g;
  throw std::runtime_error("toy exception from build");
#elif TOY_VARIANT == TOY_MISSING_WEIGHT || TOY_VARIANT == TOY_MINOR0
  // Embedding -> norm -> LM head, on llama_mha's width and vocabulary.
  tpe_value x = api->embedding(g, api->input_ids(g), "model.embed_tokens.weight", 128, 64);
  x = api->norm(g, x, TPE_NORM_RMS, TOY_VARIANT == TOY_MINOR0 ? "model.norm" : "toy.missing_norm",
                0, 1e-6);
  api->lm_head(g, x, "lm_head.weight", 128, 64);
  return TPE_OK;
#else
  api->set_error(g, "the toy policy refuses to build this model");
  return TPE_ERROR;
#endif
}

const char* const kModelTypes[] = {"llama", nullptr};

const tpe_policy_desc kDesc = {
#if TOY_VARIANT == TOY_MINOR0
    /* .struct_size = */ TPE_POLICY_DESC_SIZE_1_0,
#else
    /* .struct_size = */ sizeof(tpe_policy_desc),
#endif
#if TOY_VARIANT == TOY_NEXT_MAJOR
    /* .abi_major = */ TPE_ABI_MAJOR + 1,
#else
    /* .abi_major = */ TPE_ABI_MAJOR,
#endif
#if TOY_VARIANT == TOY_MINOR0
    /* .abi_minor = */ 0,
#else
    /* .abi_minor = */ TPE_ABI_MINOR,
#endif
    /* .name = */ "toy",
    /* .version = */ "0.0.1",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ nullptr,
    /* .injection_policy = */ nullptr,
    /* .build = */ build,
#if TOY_VARIANT == TOY_MINOR0
    /* .description = */ "never read: beyond a 1.0 descriptor",
#else
    /* .description = */ "a deliberately broken policy for the ABI tests",
#endif
};

}  // namespace

#if TOY_VARIANT == TOY_NO_ENTRY
extern "C" TPE_POLICY_EXPORT const tpe_policy_desc* tpe_policy_entry_misspelled(uint16_t,
                                                                                uint16_t) {
  return &kDesc;
}
#else
extern "C" TPE_POLICY_EXPORT const tpe_policy_desc* tpe_policy_entry(uint16_t, uint16_t) {
#if TOY_VARIANT == TOY_NULL_ENTRY
  return nullptr;
#else
  return &kDesc;
#endif
}
#endif
