// Loading and building policies that are broken on purpose, each giving one message naming the
// plugin file; and plugins built against older and newer minors of the ABI, which must work.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/common/error.hpp"
#include "core/runtime/engine.hpp"
#include "tests/integration/fixture.hpp"

namespace tpe {
namespace {

namespace fs = std::filesystem;

fs::path toy(const std::string& variant) { return fs::path(TPE_TOY_DIR) / variant / "libtoy.so"; }

std::string load_error(const fs::path& file) {
  try {
    plugin::Registry::load(file, plugin::Origin::kConfig);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void expect_contains(const std::string& message, const std::string& fragment) {
  EXPECT_NE(message.find(fragment), std::string::npos) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
}

TEST(Abi, NoEntrySymbol) {
  const std::string m = load_error(toy("no_entry"));
  expect_contains(m, toy("no_entry").string());
  expect_contains(m, "does not export tpe_policy_entry");
}

TEST(Abi, EntryReturningNull) { expect_contains(load_error(toy("null_entry")), "returned NULL"); }

TEST(Abi, NewerMajorIsRefused) {
  const std::string m = load_error(toy("next_major"));
  expect_contains(m, toy("next_major").string());
  expect_contains(m, "built for policy ABI " + std::to_string(TPE_ABI_MAJOR + 1) + ".");
}

TEST(Abi, NotASharedLibrary) {
  const fs::path dir = fs::temp_directory_path() / "tpe_abi_not_a_library";
  fs::create_directories(dir);
  std::ofstream(dir / "libfake.so") << "this is text, not an ELF file\n";
  expect_contains(load_error(dir / "libfake.so"), "not a shared library");
}

runtime::Model prepare_with(const std::string& variant, const std::string& fixture, int tp = 1) {
  config::RunConfig run;
  run.model_path = fs::path(TPE_FIXTURES_DIR) / fixture;
  run.tp_size = tp;
  run.policy_search_paths = {toy(variant).parent_path()};
  return runtime::prepare(run);
}

std::string build_error(const std::string& variant) {
  try {
    prepare_with(variant, "llama_mha");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Abi, FailingBuildMessageIsShownWithThePluginName) {
  const std::string m = build_error("failing_build");
  expect_contains(m, "policy 'toy'");
  expect_contains(m, "the toy policy refuses to build this model");
}

TEST(Abi, ThrowingBuildIsCaughtAtTheBoundary) {
  const std::string m = build_error("throwing_build");
  expect_contains(m, "policy 'toy'");
  expect_contains(m, "toy exception from build");
}

TEST(Abi, UserDirectoryBeatsBuiltIn) {
  config::RunConfig run;
  run.model_path = fs::path(TPE_FIXTURES_DIR) / "llama_mha";
  run.policy_search_paths = {toy("failing_build").parent_path()};
  const auto registry =
      plugin::Registry::discover(plugin::Registry::default_search_path(run.policy_search_paths));
  const auto config = config::ModelConfig::load(run.model_path);
  const plugin::Choice choice = registry.choose(config, std::nullopt);
  EXPECT_EQ(choice.policy->name, "toy");
  expect_contains(choice.reason, "config policy.search_paths");
  EXPECT_EQ(registry.choose(config, std::string("llama")).policy->name, "llama");
}

// Transformers' logits for the fixture's prompts, from an engine running the plugin in `variant`
// at TP `tp`, within the fixture tests' tolerance (1e-4 x max |logit|).
void expect_transformers_logits(const std::string& variant, const std::string& fixture, int tp) {
  SCOPED_TRACE(variant + " on " + fixture + " at TP " + std::to_string(tp));
  const test::Reference ref = test::load_reference(fixture);
  runtime::Engine engine(prepare_with(variant, fixture, tp), /*quiet=*/true);
  ASSERT_EQ(engine.model().choice.policy->name, "toy");
  EXPECT_LE(test::logits_error(engine.prompt_logits(ref.prompts), ref.logits), 1e-4f);
}

// The graph a plugin built holds exactly what its structs said: every attention op the heads and
// the window of config.json, every rotary op the rope the host read from it.
void expect_graph_follows_config(const std::string& variant, const std::string& fixture,
                                 int64_t window) {
  SCOPED_TRACE(variant + " on " + fixture);
  const runtime::Model model = prepare_with(variant, fixture, 1);
  const tpe_rope_desc rope = model.config.rope();
  int64_t n_heads = 0, n_kv = 0;
  ASSERT_EQ(model.config.get_int("num_attention_heads", n_heads), TPE_FOUND);
  ASSERT_EQ(model.config.get_int("num_key_value_heads", n_kv), TPE_FOUND);
  int attention = 0, rotary = 0;
  for (const graph::Op& op : model.graph.ops) {
    if (op.kind == graph::OpKind::kAttention) {
      ++attention;
      EXPECT_EQ(op.attention.n_heads, n_heads);
      EXPECT_EQ(op.attention.n_kv_heads, n_kv);
      EXPECT_EQ(op.attention.sliding_window, window);
      EXPECT_EQ(op.attention.scale, 0.0);
    }
    if (op.kind == graph::OpKind::kRotary) {
      ++rotary;
      EXPECT_EQ(op.rope.type, rope.type);
      EXPECT_EQ(op.rope.theta, rope.theta);
      EXPECT_EQ(op.rope.partial_rotary_factor, rope.partial_rotary_factor);
      EXPECT_EQ(op.rope.factor, rope.factor);
      EXPECT_EQ(op.rope.original_max_position_embeddings, rope.original_max_position_embeddings);
    }
  }
  EXPECT_EQ(attention, 2);  // the fixtures' two layers
  EXPECT_EQ(rotary, 4);
}

// A plugin built against the frozen 1.0 header: a descriptor without description (followed in
// the plugin's memory by a pointer to a string, which a host reading past struct_size would
// show), and 1.0-sized rope and attention structs fenced by bytes no host may touch.
TEST(Abi, OneZeroPluginsDescriptorIsReadToItsSize) {
  const plugin::Policy p = plugin::Registry::load(toy("abi_1_0"), plugin::Origin::kConfig);
  EXPECT_EQ(p.abi_major, 1);
  EXPECT_EQ(p.abi_minor, 0);
  EXPECT_EQ(p.name, "toy");
  EXPECT_EQ(p.description, "");  // 1.1's member: absent, so its default (none)
  EXPECT_EQ(p.desc.description, nullptr);
  EXPECT_EQ(p.desc.struct_size, sizeof(tpe_policy_desc));  // the host's complete copy
}

TEST(Abi, OneZeroPluginsGraphFollowsItsStructs) {
  expect_graph_follows_config("abi_1_0", "llama_mha", 0);
  expect_graph_follows_config("abi_1_0", "mistral_window", 4);
}

TEST(Abi, OneZeroPluginComputesTransformersLogits) {
  for (int tp = 1; tp <= 2; ++tp) {
    expect_transformers_logits("abi_1_0", "llama_gqa", tp);
    expect_transformers_logits("abi_1_0", "mistral_window", tp);
  }
}

// A plugin built against a future minor (tests/abi/abi_1_9): every struct it passes is longer
// than this host's, with members this host must neither read nor write; it checks what the host
// wrote and that the host's table is the older one.
TEST(Abi, NewerMinorPluginLoadsAndItsNewMembersAreIgnored) {
  const plugin::Policy p = plugin::Registry::load(toy("abi_1_9"), plugin::Origin::kConfig);
  EXPECT_EQ(p.abi_minor, 9);
  EXPECT_EQ(p.description, "a toy built against ABI 1.9");
  EXPECT_EQ(p.desc.struct_size, sizeof(tpe_policy_desc));
  expect_graph_follows_config("abi_1_9", "llama_mha", 0);
  expect_graph_follows_config("abi_1_9", "mistral_window", 4);
  for (int tp = 1; tp <= 2; ++tp) {
    expect_transformers_logits("abi_1_9", "llama_gqa", tp);
    expect_transformers_logits("abi_1_9", "mistral_window", tp);
  }
}

// A struct_size below the struct's 1.0 size is no struct of this major (an unset or garbage
// size): refused, naming the plugin and the struct, for each struct a plugin hands over. The
// short_* toys set their struct_size to the offset of the struct's last 1.0 member (8 bytes
// long in each).
std::string below_one_zero(const char* function, const char* name, size_t size, size_t size_1_0) {
  return fmt::format(
      "{}: {}.struct_size is {}, less than the {} bytes the struct has had since ABI 1.0", function,
      name, size, size_1_0);
}

TEST(Abi, AttentionDescBelowOneZeroIsRefused) {
  const std::string m = build_error("short_attention");
  expect_contains(m, "policy 'toy' (" + toy("short_attention").string());
  expect_contains(m,
                  below_one_zero("attention", "tpe_attention_desc",
                                 offsetof(tpe_attention_desc, sliding_window),
                                 offsetof(tpe_attention_desc, sliding_window) + sizeof(int64_t)));
}

TEST(Abi, RopeDescTheHostFillsBelowOneZeroIsRefused) {
  const std::string m = build_error("short_rope_out");
  expect_contains(m, "policy 'toy' (" + toy("short_rope_out").string());
  expect_contains(m, below_one_zero("rope_from_config", "tpe_rope_desc",
                                    offsetof(tpe_rope_desc, original_max_position_embeddings),
                                    offsetof(tpe_rope_desc, original_max_position_embeddings) + 8));
}

TEST(Abi, RopeDescPassedToRotaryBelowOneZeroIsRefused) {
  const std::string m = build_error("short_rope_in");
  expect_contains(m, "policy 'toy' (" + toy("short_rope_in").string());
  expect_contains(m, below_one_zero("rotary", "tpe_rope_desc",
                                    offsetof(tpe_rope_desc, original_max_position_embeddings),
                                    offsetof(tpe_rope_desc, original_max_position_embeddings) + 8));
}

TEST(Abi, PolicyDescBelowOneZeroIsRefused) {
  const std::string m = load_error(toy("short_policy_desc"));
  expect_contains(m, "plugin " + toy("short_policy_desc").string() + ": ");
  expect_contains(m,
                  fmt::format("tpe_policy_desc.struct_size is {}, less than the {} bytes",
                              TPE_POLICY_DESC_SIZE_1_0 - sizeof(void*), TPE_POLICY_DESC_SIZE_1_0));
}

TEST(Abi, NewerMinorDescriptorIsRead) {
  EXPECT_EQ(plugin::Registry::load(toy("failing_build"), plugin::Origin::kConfig).description,
            "a deliberately broken policy for the ABI tests");
}

TEST(Abi, WeightTheCheckpointLacksNamesThePolicy) {
  config::RunConfig run;
  run.model_path = fs::path(TPE_FIXTURES_DIR) / "llama_mha";
  run.policy_search_paths = {toy("missing_weight").parent_path()};
  try {
    runtime::Engine engine(runtime::prepare(run), /*quiet=*/true);
    ADD_FAILURE() << "loaded a graph naming a missing tensor";
  } catch (const Error& e) {
    expect_contains(e.what(), "policy 'toy'");
    expect_contains(e.what(), "'toy.missing_norm.weight'");
    expect_contains(e.what(), "llama_mha");
  }
}

}  // namespace
}  // namespace tpe
