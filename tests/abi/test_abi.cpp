// Loading and building policies that are broken on purpose: each gives one message naming the
// plugin file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/common/error.hpp"
#include "core/runtime/engine.hpp"

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

std::string build_error(const std::string& variant) {
  config::RunConfig run;
  run.model_path = fs::path(TPE_FIXTURES_DIR) / "llama_mha";
  run.policy_search_paths = {toy(variant).parent_path()};
  try {
    runtime::prepare(run);
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

TEST(Abi, OlderMinorLoadsWithoutTheMembersItLacks) {
  const plugin::Policy p = plugin::Registry::load(toy("minor0"), plugin::Origin::kConfig);
  EXPECT_EQ(p.abi_minor, 0);
  EXPECT_EQ(p.description, "");  // a 1.1 member, beyond the 1.0 descriptor: not read
  config::RunConfig run;
  run.model_path = fs::path(TPE_FIXTURES_DIR) / "llama_mha";
  run.policy_search_paths = {toy("minor0").parent_path()};
  const runtime::Model model = runtime::prepare(run);
  EXPECT_EQ(model.choice.policy->name, "toy");
  EXPECT_EQ(model.graph.ops.size(), 4u);
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
