// The GGUF reader against files the gguf Python package wrote (tests/fixtures/gguf, made by
// tools/make_gguf_fixtures.py: its values and dequantized blocks are the package's), and against
// hostile files built here byte by byte.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/io/gguf.hpp"
#include "core/io/gguf_model.hpp"
#include "tests/unit/expect_error.hpp"

namespace {

namespace fs = std::filesystem;
namespace io = tpe::io;
using tpe::testing::expect_error;

const fs::path kBlocks = fs::path(TPE_FIXTURES_DIR) / "gguf" / "blocks.gguf";

std::vector<float> read_all(const io::GgufFile& file, std::string_view name,
                            const tpe::IndexSet& rows = {}, const tpe::IndexSet& cols = {}) {
  const io::GgufTensor* t = file.find(name);
  EXPECT_NE(t, nullptr) << name;
  if (t == nullptr) return {};
  const std::vector<int64_t> shape = t->shape();
  const int64_t height = rows.empty() ? shape[0] : tpe::index_count(rows);
  const int64_t width = cols.empty() ? shape[1] : tpe::index_count(cols);
  std::vector<float> out(static_cast<size_t>(height * width));
  file.read_f32(*t, shape, rows, cols, out);
  return out;
}

// Bit for bit: the same floats, not merely close ones.
void expect_same_bits(const std::vector<float>& got, const std::vector<float>& want,
                      std::string_view what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
        << what << " element " << i << ": " << got[i] << " vs " << want[i];
  }
}

constexpr std::string_view kTypes[] = {"F32",  "F16",  "BF16", "Q4_0", "Q4_1", "Q5_0",
                                       "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"};

TEST(Gguf, MetadataOfEveryValueType) {
  const auto file = io::GgufFile::open(kBlocks);
  EXPECT_EQ(file->version(), 3u);
  EXPECT_EQ(file->string("general.architecture"), "tpengine-test");
  EXPECT_EQ(file->integer("test.u8"), 200);
  EXPECT_EQ(file->integer("test.i8"), -100);
  EXPECT_EQ(file->integer("test.u16"), 60000);
  EXPECT_EQ(file->integer("test.i16"), -30000);
  EXPECT_EQ(file->integer("test.u32"), 4000000000);
  EXPECT_EQ(file->integer("test.i32"), -2000000000);
  EXPECT_EQ(file->number("test.f32"), 0.25);
  EXPECT_TRUE(file->find_value("test.bool")->b);
  EXPECT_EQ(file->string("test.string"), "caf\xc3\xa9 \xf0\x9f\x98\x80");
  EXPECT_EQ(file->integer("test.u64"), int64_t{1} << 40);
  EXPECT_EQ(file->integer("test.i64"), -(int64_t{1} << 40));
  EXPECT_EQ(file->number("test.f64"), -1.5e300);
  EXPECT_EQ(file->number("test.u8"), 200.0);  // an integer where a number is asked for
  EXPECT_EQ(file->array("test.ints").ints, (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(file->array("test.floats").floats, (std::vector<double>{0.5, -2.0}));
  EXPECT_EQ(file->array("test.strings").strings, (std::vector<std::string>{"a", "",
                                                                           "\xe2\x96\x81"
                                                                           "b"}));
  const std::string name = kBlocks.string() + ": ";
  expect_error([&] { (void)file->integer("test.string"); },
               {name, "metadata 'test.string' is STRING, expected an integer"});
  expect_error([&] { (void)file->string("no.such.key"); }, {name, "no metadata 'no.such.key'"});
  expect_error([&] { (void)file->array("test.f32"); },
               {"'test.f32' is FLOAT32, expected an ARRAY"});
}

TEST(Gguf, DequantizesEveryTypeAsTheGgufPackage) {
  const auto file = io::GgufFile::open(kBlocks);
  for (const std::string_view type : kTypes) {
    const std::string name(type);
    const io::GgufTensor* t = file->find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->shape().size(), 2u) << name;
    expect_same_bits(read_all(*file, name), read_all(*file, name + ".expected"), name);
  }
}

TEST(Gguf, SlicesDequantizeOnlyTheirBlocksAndMatchTheWhole) {
  const auto file = io::GgufFile::open(kBlocks);
  for (const std::string_view type : kTypes) {
    const std::string name(type);
    const std::vector<int64_t> shape = file->find(name)->shape();
    const int64_t width = shape[1];
    const std::vector<float> whole = read_all(*file, name + ".expected");
    // Rows 1..2; columns from inside the first block to inside the second, and the last one.
    const tpe::IndexSet rows{{1, 3}};
    const tpe::IndexSet cols{{3, width / 2 + 5}, {width - 1, width}};
    std::vector<float> want;
    for (const tpe::Range& r : rows) {
      for (int64_t row = r.begin; row < r.end; ++row) {
        for (const tpe::Range& c : cols) {
          for (int64_t col = c.begin; col < c.end; ++col) {
            want.push_back(whole[static_cast<size_t>(row * width + col)]);
          }
        }
      }
    }
    expect_same_bits(read_all(*file, name, rows, cols), want, name + " slice");
  }
}

// ---- hostile files -----------------------------------------------------------------------------

// A GGUF file written field by field, so that each test can break one field.
class Bytes {
 public:
  Bytes& u32(uint32_t v) { return raw(&v, 4); }
  Bytes& u64(uint64_t v) { return raw(&v, 8); }
  Bytes& str(std::string_view s) {
    u64(s.size());
    out_ += s;
    return *this;
  }
  Bytes& raw(const void* p, size_t n) {
    out_.append(static_cast<const char*>(p), n);
    return *this;
  }
  Bytes& pad_to(size_t alignment) {
    out_.resize((out_.size() + alignment - 1) / alignment * alignment, '\0');
    return *this;
  }
  const std::string& str() const { return out_; }

 private:
  std::string out_;
};

// Header of a version-3 file with `tensors` tensors and `keys` keys.
Bytes header(uint64_t tensors, uint64_t keys, uint32_t version = 3) {
  Bytes b;
  b.raw("GGUF", 4).u32(version).u64(tensors).u64(keys);
  return b;
}

// One tensor description: name, dims (ggml order), type, offset.
void tensor(Bytes& b, std::string_view name, std::vector<uint64_t> dims, uint32_t type,
            uint64_t offset) {
  b.str(name).u32(static_cast<uint32_t>(dims.size()));
  for (uint64_t d : dims) b.u64(d);
  b.u32(type).u64(offset);
}

class GgufBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "tpe_gguf_XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path file() const { return dir_ / "model.gguf"; }

  void expect_open_error(std::string_view bytes, std::vector<std::string> parts) {
    {
      std::ofstream out(file(), std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    parts.push_back(file().string() + ": ");
    expect_error([&] { io::GgufFile::open(file()); }, parts);
  }

  fs::path dir_;
};

TEST_F(GgufBadInput, NotGgufOrAnotherVersion) {
  expect_open_error("", {"not a GGUF file: 0 bytes"});
  expect_open_error("GGU", {"not a GGUF file: 3 bytes"});
  expect_open_error("GGML" + std::string(20, '\0'), {"does not start with the magic 'GGUF'"});
  expect_open_error(header(0, 0, 1).str(), {"GGUF version 1; versions 2 and 3 are supported"});
  expect_open_error(header(0, 0, 4).str(), {"GGUF version 4"});
  expect_open_error(header(0, 0, 0x03000000).str(), {"big-endian"});
}

TEST_F(GgufBadInput, TruncatedAnywhere) {
  Bytes b = header(1, 1);
  b.str("general.name").u32(8).str("x");
  tensor(b, "w", {32}, 0, 0);
  b.pad_to(32);
  b.raw(std::string(128, '\0').data(), 128);
  const std::string whole = b.str();
  io::GgufFile::open([&] {
    std::ofstream(file(), std::ios::binary)
        .write(whole.data(), static_cast<std::streamsize>(whole.size()));
    return file();
  }());  // the whole file opens
  // Cut anywhere, the file fails to open with one line naming it (which check notices first
  // depends on the cut: a count that no longer fits, a truncated field, or the data section).
  for (size_t cut = 4; cut < whole.size(); cut += 3) {
    expect_open_error(std::string_view(whole).substr(0, cut), {});
  }
  expect_open_error(std::string_view(whole).substr(0, 30),
                    {"1 tensors do not fit in a file of 30"});
  Bytes cut_field = header(0, 1);
  cut_field.str("general.name").raw("\x08\x00", 2);
  expect_open_error(cut_field.str(),
                    {"truncated: metadata 'general.name' at byte 44 needs 4 bytes, 2 left"});
  Bytes cut_string = header(0, 1);
  cut_string.str("general.name").u32(8).u64(5).raw("ab", 2);
  expect_open_error(cut_string.str(), {"metadata 'general.name': a string of 5 bytes at byte 48, "
                                       "but only 2 bytes are left"});
  // The data section cut: the tensor's bytes are not all there.
  expect_open_error(std::string_view(whole).substr(0, whole.size() - 1),
                    {"tensor 'w': bytes [0, 128) of the data section, which holds 127 bytes"});
}

TEST_F(GgufBadInput, AbsurdCountsFailBeforeAllocating) {
  expect_open_error(header(uint64_t{1} << 40, 0).str(), {"1099511627776 tensors do not fit"});
  expect_open_error(header(0, uint64_t{1} << 40).str(), {"1099511627776 metadata keys do not fit"});
  Bytes big_string = header(0, 1);
  big_string.u64(uint64_t{1} << 62).u64(0).u64(0);
  expect_open_error(big_string.str(), {"metadata key 0: a string of 4611686018427387904 bytes"});
  Bytes big_array = header(0, 1);
  big_array.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(uint64_t{1} << 40);
  expect_open_error(big_array.str(), {"metadata 'tokenizer.ggml.tokens': an array of "
                                      "1099511627776 STRING values does not fit"});
  Bytes big_dims = header(1, 0);
  tensor(big_dims, "w", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, 0);
  expect_open_error(big_dims.str(), {"tensor 'w': dimension 1 is 1099511627776"});
}

TEST_F(GgufBadInput, BadValues) {
  Bytes nested = header(0, 1);
  nested.str("k").u32(9).u32(9).u64(1);
  expect_open_error(nested.str(), {"metadata 'k': nested arrays are not supported"});
  Bytes unknown = header(0, 1);
  unknown.str("k").u32(13).u32(0);
  expect_open_error(unknown.str(), {"metadata 'k': unknown value type 13"});
  Bytes boolean = header(0, 1);
  boolean.str("k").u32(7).raw("\x02", 1);
  expect_open_error(boolean.str(), {"metadata 'k': BOOL value 2"});
  Bytes duplicate = header(0, 2);
  duplicate.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
  expect_open_error(duplicate.str(), {"duplicate metadata 'k'"});
  Bytes alignment = header(0, 1);
  alignment.str("general.alignment").u32(4).u32(48);
  expect_open_error(alignment.str(), {"'general.alignment' must be a UINT32 power of two"});
  Bytes alignment_type = header(0, 1);
  alignment_type.str("general.alignment").u32(10).u64(32);
  expect_open_error(alignment_type.str(), {"'general.alignment' must be a UINT32"});
}

TEST_F(GgufBadInput, BadTensors) {
  const auto one = [](std::string_view name, std::vector<uint64_t> dims, uint32_t type,
                      uint64_t offset, size_t data) {
    Bytes b = header(1, 0);
    tensor(b, name, std::move(dims), type, offset);
    b.pad_to(32);
    const std::string zeros(data, '\0');
    b.raw(zeros.data(), zeros.size());
    return b.str();
  };
  expect_open_error(one("w", {32}, 10, 0, 256), {"tensor 'w': element type Q2_K (10) is not "
                                                 "supported; tpengine reads F32, F16, BF16"});
  expect_open_error(one("w", {32}, 99, 0, 256), {"element type an unknown type (99)"});
  expect_open_error(one("w", {33, 2}, 2, 0, 256),
                    {"tensor 'w': its rows of 33 elements are not whole Q4_0 blocks of 32"});
  expect_open_error(one("w", {}, 0, 0, 256), {"tensor 'w': 0 dimensions, expected 1 to 4"});
  expect_open_error(one("w", {1, 1, 1, 1, 1}, 0, 0, 256), {"5 dimensions"});
  expect_open_error(one("w", {0}, 0, 0, 256), {"tensor 'w': dimension 0 is 0"});
  expect_open_error(one("w", {32}, 0, 8, 256), {"offset 8 is not a multiple of the alignment 32"});
  expect_open_error(one("w", {64}, 0, 0, 255),
                    {"tensor 'w': bytes [0, 256) of the data section, which holds 255 bytes"});
  expect_open_error(one("w", {32}, 0, uint64_t{1} << 63, 256), {"of the data section"});
  Bytes two = header(2, 0);
  tensor(two, "a", {64}, 0, 0);
  tensor(two, "b", {32}, 0, 224);
  two.pad_to(32);
  const std::string zeros(512, '\0');
  two.raw(zeros.data(), zeros.size());
  expect_open_error(two.str(), {"tensors 'a' and 'b' overlap"});
  Bytes same = header(2, 0);
  tensor(same, "a", {32}, 0, 0);
  tensor(same, "a", {32}, 0, 128);
  same.pad_to(32);
  same.raw(zeros.data(), zeros.size());
  expect_open_error(same.str(), {"duplicate tensor 'a'"});
}

TEST_F(GgufBadInput, NotARegularFile) {
  expect_error([&] { io::GgufFile::open(dir_); }, {dir_.string(), "not a regular file"});
  const fs::path fifo = dir_ / "fifo.gguf";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_error([&] { io::GgufFile::open(fifo); }, {fifo.string(), "not a regular file"});
  expect_error([&] { io::GgufFile::open(dir_ / "missing.gguf"); }, {"cannot open"});
}

TEST(Gguf, ReadF32ChecksTheShape) {
  const auto file = io::GgufFile::open(kBlocks);
  const io::GgufTensor* t = file->find("Q4_K");
  ASSERT_NE(t, nullptr);
  std::vector<float> out(512 * 3);
  const std::vector<int64_t> wrong{512, 3};
  expect_error([&] { file->read_f32(*t, wrong, {}, {}, out); },
               {"tensor 'Q4_K' in " + kBlocks.string() + " has shape [3, 512], expected [512, 3]"});
}

// ---- a GGUF file as its Hugging Face checkpoint -------------------------------------------------

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// model-f32.gguf was converted from the fixture's checkpoint: the config read back from its
// metadata must say what the config.json transformers wrote says.
TEST(GgufModel, ConfigIsTheCheckpointsConfigJson) {
  for (const char* fixture : {"llama_gqa", "llama_tied", "qwen2_bias"}) {
    const fs::path dir = fs::path(TPE_FIXTURES_DIR) / fixture;
    const nlohmann::json want = read_json(dir / "config.json");
    const nlohmann::json got = io::gguf_config_json(*io::GgufFile::open(dir / "model-f32.gguf"));
    for (const char* key :
         {"model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "vocab_size",
          "tie_word_embeddings", "bos_token_id", "eos_token_id"}) {
      EXPECT_EQ(got.at(key), want.at(key)) << fixture << " " << key;
    }
    if (want.contains("head_dim")) {
      EXPECT_EQ(got.at("head_dim"), want.at("head_dim")) << fixture;
    }
    // Stored as FLOAT32 in GGUF: equal as floats.
    EXPECT_EQ(static_cast<float>(got.at("rms_norm_eps").get<double>()),
              static_cast<float>(want.at("rms_norm_eps").get<double>()))
        << fixture;
    const double theta = want.contains("rope_parameters")
                             ? want["rope_parameters"]["rope_theta"].get<double>()
                             : want.at("rope_theta").get<double>();
    EXPECT_EQ(got.at("rope_theta").get<double>(), theta) << fixture;
  }
}

TEST(GgufModel, NamesMapOntoHuggingFaceNames) {
  const auto file =
      io::GgufFile::open(fs::path(TPE_FIXTURES_DIR) / "qwen2_bias" / "model-f32.gguf");
  const io::GgufWeights weights(*file);
  EXPECT_EQ(weights.gguf_name("model.layers.1.self_attn.q_proj.bias"), "blk.1.attn_q.bias");
  EXPECT_EQ(weights.gguf_name("model.layers.0.mlp.down_proj.weight"), "blk.0.ffn_down.weight");
  EXPECT_EQ(weights.gguf_name("lm_head.weight"), "output.weight");
  EXPECT_EQ(weights.gguf_name("model.layers.x.mlp.down_proj.weight"), "");
  EXPECT_EQ(weights.gguf_name("model.layers.0.mlp.fc1.weight"), "");
  EXPECT_NE(weights.find("model.embed_tokens.weight"), nullptr);
  std::vector<float> out(4);
  const std::vector<int64_t> shape{4};
  expect_error([&] { weights.read_f32("model.layers.9.mlp.up_proj.weight", shape, {}, {}, out); },
               {"tensor 'model.layers.9.mlp.up_proj.weight' (GGUF 'blk.9.ffn_up.weight') is "
                "missing from"});
}

TEST(GgufModel, OtherArchitecturesAreRefusedByName) {
  const auto file = io::GgufFile::open(kBlocks);
  const std::vector<std::string> parts{
      kBlocks.string() +
      ": GGUF architecture 'tpengine-test' is not supported; tpengine reads "
      "llama, qwen2 and gptneox GGUF files"};
  expect_error([&] { (void)io::gguf_config_json(*file); }, parts);
  expect_error([&] { io::GgufWeights weights(*file); }, parts);
}

}  // namespace
