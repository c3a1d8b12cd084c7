// The host's reader and writer of versioned structs (core/plugin/abi_struct.hpp) on a struct of
// two versions: what a host of one minor does with a plugin's struct of another. Today's
// tpe_rope_desc and tpe_attention_desc have only 1.0 members, so a host-side member that a
// plugin's struct lacks can only be shown on such a pair; test_abi.cpp shows the same reader at
// work on the real structs through plugins built against the 1.0 and 1.9 headers.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "core/common/error.hpp"
#include "core/plugin/abi_struct.hpp"
#include "core/plugin/isolate.hpp"
#include "tpengine/policy.hpp"

namespace tpe::plugin {
namespace {

// "1.0" of a struct, and "1.1", which appends one member whose default is 7.
struct V10 {
  uint32_t struct_size;
  int32_t a;
  int64_t b;
};
struct V11 {
  uint32_t struct_size;
  int32_t a;
  int64_t b;
  int64_t c;  // since 1.1; default 7
};
constexpr size_t kV10Size = offsetof(V10, b) + sizeof(int64_t);
static_assert(offsetof(V11, c) == sizeof(V10));

V11 v11_defaults() {
  V11 d{};
  d.struct_size = sizeof(V11);
  d.c = 7;
  return d;
}

// A plugin's struct of `size` bytes in a buffer whose bytes past it are all 0x7f.
std::vector<unsigned char> plugin_buffer(const void* s, size_t size) {
  std::vector<unsigned char> buffer(64, 0x7f);
  std::memcpy(buffer.data(), s, size);
  return buffer;
}

TEST(AbiStruct, MembersAnOlderPluginLacksTakeTheDefaults) {
  const V10 old_struct = {sizeof(V10), -3, 42};
  const auto buffer = plugin_buffer(&old_struct, sizeof(old_struct));
  const V11 read = read_struct(buffer.data(), v11_defaults(), "V11", kV10Size);
  EXPECT_EQ(read.a, -3);
  EXPECT_EQ(read.b, 42);
  EXPECT_EQ(read.c, 7);  // not 0x7f7f7f7f7f7f7f7f, what lies past the plugin's struct
  EXPECT_EQ(read.struct_size, sizeof(V11));
}

TEST(AbiStruct, MembersOfANewerPluginAreIgnored) {
  const V11 new_struct = {sizeof(V11), 5, 6, 99};
  const auto buffer = plugin_buffer(&new_struct, sizeof(new_struct));
  const V10 read = read_struct(buffer.data(), V10{sizeof(V10), 0, 0}, "V10", kV10Size);
  EXPECT_EQ(read.a, 5);
  EXPECT_EQ(read.b, 6);
  EXPECT_EQ(read.struct_size, sizeof(V10));
}

TEST(AbiStruct, LessThanTheOneZeroSizeIsRefusedNamingTheStruct) {
  for (const uint32_t size : {0u, 4u, static_cast<uint32_t>(kV10Size - 1)}) {
    V11 s = {size, 1, 2, 3};
    try {
      read_struct(&s, v11_defaults(), "V11", kV10Size);
      ADD_FAILURE() << "struct_size " << size << " was read";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("V11.struct_size is " + std::to_string(size)),
                std::string::npos)
          << e.what();
    }
    EXPECT_THROW(write_struct(&s, v11_defaults(), "V11", kV10Size), Error);
  }
}

TEST(AbiStruct, WritesStopAtThePluginsStructSize) {
  std::vector<unsigned char> buffer(64, 0x7f);
  const V10 old_struct = {sizeof(V10), 0, 0};
  std::memcpy(buffer.data(), &old_struct, sizeof(old_struct));
  const V11 value = {sizeof(V11), 11, 12, 13};
  write_struct(buffer.data(), value, "V11", kV10Size);
  V10 written;
  std::memcpy(&written, buffer.data(), sizeof(written));
  EXPECT_EQ(written.struct_size, sizeof(V10));  // the plugin's, not the host's
  EXPECT_EQ(written.a, 11);
  EXPECT_EQ(written.b, 12);
  for (size_t i = sizeof(V10); i < buffer.size(); ++i) {
    ASSERT_EQ(buffer[i], 0x7f) << "byte " << i << " past the plugin's struct was written";
  }
}

TEST(AbiStruct, WritesToANewerPluginKeepItsStructSizeAndTail) {
  V11 new_struct = {sizeof(V11), 0, 0, 99};
  write_struct(&new_struct, V10{sizeof(V10), 1, 2}, "V10", kV10Size);
  EXPECT_EQ(new_struct.struct_size, sizeof(V11));
  EXPECT_EQ(new_struct.a, 1);
  EXPECT_EQ(new_struct.b, 2);
  EXPECT_EQ(new_struct.c, 99);  // a member the host does not know stays the plugin's
}

// The 1.0 sizes are frozen: they are what a plugin built against the 1.0 header passes (the ABI
// 1.0 toy plugin asserts the same numbers at compile time), whatever later minors append.
TEST(AbiStruct, OneZeroSizesAreThoseOfTheOneZeroHeader) {
  if (sizeof(void*) != 8) GTEST_SKIP() << "sizes written for LP64";
  EXPECT_EQ(AbiStruct<tpe_attention_desc>::kSize_1_0, 48u);
  EXPECT_EQ(AbiStruct<tpe_rope_desc>::kSize_1_0, 56u);
  EXPECT_EQ(AbiStruct<tpe_policy_desc>::kSize_1_0, 56u);
}

}  // namespace
}  // namespace tpe::plugin

// A plugin built against SDK 1.2 meeting a 1.1 host: the Builder refuses the host functions and
// features 1.2 added, naming them and the host's version, instead of calling past the host's
// table (or having ALiBi silently ignored by a host that does not read the member).
namespace {
tpe_host_api host_of_minor_1() {
  tpe_host_api api{};
  api.struct_size = static_cast<uint32_t>(offsetof(tpe_host_api, position_ids));
  api.abi_major = 1;
  api.abi_minor = 1;
  return api;
}

template <typename F>
std::string policy_error(F&& f) {
  try {
    f();
  } catch (const tpengine::PolicyError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(AbiStruct, SdkOneTwoRefusesWhatAnOneOneHostLacks) {
  const tpe_host_api api = host_of_minor_1();
  tpengine::Builder b(&api, nullptr);
  EXPECT_NE(policy_error([&] { b.position_ids(2); })
                .find("position_ids needs a newer tpengine: "
                      "this one speaks policy ABI 1.1"),
            std::string::npos);
  EXPECT_NE(policy_error([&] {
              b.linear_transposed(0, "c_attn", 4, 12, true);
            }).find("linear_transposed needs a newer tpengine"),
            std::string::npos);
  EXPECT_NE(policy_error([&] {
              b.split_grouped(0, 2, {8, 2, 2}, 2);
            }).find("needs policy ABI 1.2"),
            std::string::npos);
  tpe_attention_desc alibi = tpengine::Builder::attention_desc(4, 4, 16);
  alibi.alibi_max_bias = 8;
  EXPECT_NE(policy_error([&] {
              b.attention(0, 1, 2, alibi);
            }).find("ALiBi attention needs policy ABI 1.2"),
            std::string::npos);
}

// What a child sends back is replayed through a GraphBuilder: every op kind and parameter
// survives the trip, and a graph whose op reads a value not made yet is refused, named.
TEST(PluginIsolation, AGraphSurvivesTheTripAndATamperedOneIsRefused) {
  tpe::graph::GraphBuilder b;
  const int pos = b.position_ids(2);
  int x = b.add(b.embedding(b.input_ids(), "wte", 16, 32), b.embedding(pos, "wpe", 10, 32));
  b.begin_block("Block", "h.0");
  const int h = b.norm(x, TPE_NORM_LAYER, "h.0.ln", true, 1e-5);
  const int qkv = b.linear(h, "h.0.qkv", 32, 64, true, /*transposed=*/true);
  std::vector<int> parts;
  ASSERT_TRUE(b.split(qkv, TPE_SPLIT_GROUPED, {32, 16, 16}, 2, 8, parts));
  tpe_rope_desc rope{};
  rope.struct_size = sizeof(rope);
  rope.theta = 10000;
  rope.partial_rotary_factor = 0.5;
  tpe_attention_desc a = tpengine::Builder::attention_desc(4, 2, 8);
  a.alibi_max_bias = 8;
  a.alibi_slope_scale = 0.25;
  const int att = b.attention(b.rotary(parts[0], 4, 8, rope), parts[1], parts[2], a);
  x = b.add(x, b.mul(b.activation(att, TPE_ACT_GELU_TANH), att));
  b.end_block();
  b.lm_head(x, "wte", 16, 32);
  const tpe::graph::Graph g = b.finish();

  const std::string json = tpe::plugin::graph_to_json(g);
  const tpe::graph::Graph back = tpe::plugin::graph_from_json(json, "toy");
  EXPECT_EQ(tpe::plugin::graph_to_json(back), json);
  ASSERT_EQ(back.ops.size(), g.ops.size());
  EXPECT_TRUE(back.ops[g.values[qkv].producer].transposed);
  EXPECT_EQ(back.ops[g.values[pos].producer].offset, 2);
  EXPECT_EQ(back.blocks.size(), 1u);
  EXPECT_EQ(back.ops[g.values[att].producer].attention.alibi_slope_scale, 0.25);
  EXPECT_EQ(back.ops[g.values[parts[0]].producer].layout, TPE_SPLIT_GROUPED);

  nlohmann::json tampered = nlohmann::json::parse(json);
  tampered["ops"][3]["in"][0] = 40;  // a value no op has made yet
  try {
    tpe::plugin::graph_from_json(tampered.dump(), "policy 'toy'");
    ADD_FAILURE() << "a graph reading an unmade value replayed";
  } catch (const tpe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("policy 'toy': its build sent back a graph that does not "
                                         "replay"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(tpe::plugin::graph_from_json("{\"ops\": 3}", "toy"), tpe::Error);
}
