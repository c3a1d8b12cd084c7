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

namespace {

tpe_status build(const tpe_host_api* api, tpe_graph* g) {
#if TOY_VARIANT == TOY_THROWING_BUILD
  (void)api;
  (void)g;
  throw std::runtime_error("toy exception from build");
#else
  api->set_error(g, "the toy policy refuses to build this model");
  return TPE_ERROR;
#endif
}

const char* const kModelTypes[] = {"llama", nullptr};

const tpe_policy_desc kDesc = {
    /* .struct_size = */ sizeof(tpe_policy_desc),
#if TOY_VARIANT == TOY_NEXT_MAJOR
    /* .abi_major = */ TPE_ABI_MAJOR + 1,
#else
    /* .abi_major = */ TPE_ABI_MAJOR,
#endif
    /* .abi_minor = */ 0,
    /* .name = */ "toy",
    /* .version = */ "0.0.1",
    /* .model_types = */ kModelTypes,
    /* .architectures = */ nullptr,
    /* .injection_policy = */ nullptr,
    /* .build = */ build,
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
