#include <gtest/gtest.h>
#include <stdlib.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/common/error.hpp"
#include "core/io/safetensors.hpp"
#include "tests/unit/expect_error.hpp"

namespace {

namespace fs = std::filesystem;
namespace io = tpe::io;
using nlohmann::json;

std::string le_u64(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  return out;
}

void write_bytes(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void write_raw(const fs::path& path, std::string_view header, std::string_view data) {
  write_bytes(path, le_u64(header.size()) + std::string(header) + std::string(data));
}

template <typename T>
std::string as_bytes(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// Lays tensors out back to back, as real writers do, and writes header + data.
class FileBuilder {
 public:
  FileBuilder& add(const std::string& name, const std::string& dtype, std::vector<int64_t> shape,
                   const std::string& bytes) {
    header_[name] = {{"dtype", dtype},
                     {"shape", shape},
                     {"data_offsets", {data_.size(), data_.size() + bytes.size()}}};
    data_ += bytes;
    return *this;
  }
  FileBuilder& metadata(const std::string& key, const std::string& value) {
    header_["__metadata__"][key] = value;
    return *this;
  }
  void write(const fs::path& path) const { write_raw(path, header_.dump(), data_); }

 private:
  json header_ = json::object();
  std::string data_;
};

std::vector<float> iota(size_t count) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = static_cast<float>(i);
  return out;
}

// Exactly representable small integers, so F16/BF16 copies compare exactly with iota().
std::vector<uint16_t> bf16_iota(size_t count) {
  std::vector<uint16_t> out;
  for (float value : iota(count)) out.push_back(std::bit_cast<uint32_t>(value) >> 16);
  return out;
}

std::vector<uint16_t> f16_iota(size_t count) {
  std::vector<uint16_t> out;
  for (size_t i = 0; i < count; ++i) {
    if (i == 0) {
      out.push_back(0);
      continue;
    }
    const int exponent = std::ilogb(static_cast<double>(i));
    const auto mantissa = static_cast<uint16_t>((i << (10 - exponent)) & 0x3ff);
    out.push_back(static_cast<uint16_t>(((exponent + 15) << 10) | mantissa));
  }
  return out;
}

// Independent of the engine's bit manipulation: the f16 value straight from its definition.
float f16_reference(uint16_t half) {
  const int exponent = (half >> 10) & 0x1f;
  const int mantissa = half & 0x3ff;
  const double sign = (half & 0x8000) ? -1.0 : 1.0;
  if (exponent == 0x1f) return static_cast<float>(mantissa ? NAN : sign * INFINITY);
  if (exponent == 0) return static_cast<float>(sign * std::ldexp(mantissa, -24));
  return static_cast<float>(sign * std::ldexp(1024 + mantissa, exponent - 25));
}

using tpe::testing::error_of;
using tpe::testing::expect_error;

class ModelDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "tpe_safetensors_XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path file() const { return dir_ / "model.safetensors"; }

  // Opening a file with this header and data must fail with a message naming the file.
  void expect_open_error(std::string_view header, std::string_view data,
                         std::vector<std::string> parts) {
    write_raw(file(), header, data);
    expect_open_error(std::move(parts));
  }
  void expect_open_error(std::vector<std::string> parts) {
    parts.push_back(file().string() + ": ");
    expect_error([&] { io::SafetensorsFile::open(file()); }, parts);
  }

  std::vector<float> read(const std::string& name, std::vector<int64_t> shape,
                          const tpe::IndexSet& rows = {}, const tpe::IndexSet& cols = {}) {
    return io::Checkpoint::open(dir_).read_f32(name, shape, rows, cols);
  }

  fs::path dir_;
};

class Safetensors : public ModelDirTest {};
class SafetensorsCheckpoint : public ModelDirTest {};

TEST_F(Safetensors, ReadsFloatDtypesExactly) {
  const std::vector<float> f32 = {1.5f, -0.0f, 3.4028235e38f, 1e-45f, -7.25f, 0.1f};
  const std::vector<uint16_t> f16 = {0x0000, 0x8000, 0x3c00, 0xc000, 0x7bff, 0x0001,
                                     0x03ff, 0x0400, 0x7c00, 0xfc00, 0x3555, 0x7e00};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc0a0, 0x7f80, 0x0001};
  FileBuilder()
      .add("f32", "F32", {2, 3}, as_bytes(f32))
      .add("f16", "F16", {12}, as_bytes(f16))
      .add("bf16", "BF16", {2, 2}, as_bytes(bf16))
      .write(file());

  EXPECT_EQ(read("f32", {2, 3}), f32);
  const std::vector<float> halves = read("f16", {12});
  const std::vector<float> expected = {0.0f,     -0.0f,     1.0f,       -2.0f,
                                       65504.0f, 0x1p-24f,  0x3ffp-24f, 0x1p-14f,
                                       INFINITY, -INFINITY, 0x555p-12f};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(std::bit_cast<uint32_t>(halves[i]), std::bit_cast<uint32_t>(expected[i])) << i;
  }
  EXPECT_TRUE(std::isnan(halves[11]));
  EXPECT_EQ(read("bf16", {2, 2}), (std::vector<float>{1.0f, -5.0f, INFINITY, 0x1p-133f}));
}

TEST_F(Safetensors, ConvertsEveryF16BitPattern) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  FileBuilder().add("all", "F16", {65536}, as_bytes(all)).write(file());
  const std::vector<float> values = read("all", {65536});
  for (size_t i = 0; i < all.size(); ++i) {
    const float expected = f16_reference(all[i]);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(values[i])) << i;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(values[i]), std::bit_cast<uint32_t>(expected)) << i;
    }
  }
}

// A [4, 5] tensor holding 0..19 in each float dtype, so every slice has known contents.
class SafetensorsSlices : public ModelDirTest {
 protected:
  void SetUp() override {
    ModelDirTest::SetUp();
    FileBuilder()
        .add("f32", "F32", {4, 5}, as_bytes(iota(20)))
        .add("f16", "F16", {4, 5}, as_bytes(f16_iota(20)))
        .add("bf16", "BF16", {4, 5}, as_bytes(bf16_iota(20)))
        .add("bias", "F32", {5}, as_bytes(iota(5)))
        .write(file());
  }
  void expect_slice(const tpe::IndexSet& rows, const tpe::IndexSet& cols,
                    const std::vector<float>& expected) {
    for (const char* name : {"f32", "f16", "bf16"}) {
      EXPECT_EQ(read(name, {4, 5}, rows, cols), expected) << name;
    }
  }
};

TEST_F(SafetensorsSlices, All) { expect_slice({}, {}, iota(20)); }

TEST_F(SafetensorsSlices, Rows) { expect_slice({{1, 3}}, {}, {5, 6, 7, 8, 9, 10, 11, 12, 13, 14}); }

TEST_F(SafetensorsSlices, Columns) { expect_slice({}, {{3, 5}}, {3, 4, 8, 9, 13, 14, 18, 19}); }

TEST_F(SafetensorsSlices, RowsAndColumns) { expect_slice({{2, 4}}, {{1, 2}}, {11, 16}); }

TEST_F(SafetensorsSlices, MultipleRanges) {
  expect_slice({{0, 1}, {3, 4}}, {{0, 1}, {2, 4}}, {0, 2, 3, 15, 17, 18});
  expect_slice({{3, 4}, {0, 2}}, {}, {15, 16, 17, 18, 19, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  expect_slice({{1, 1}}, {}, {});
}

TEST_F(SafetensorsSlices, OneDimensional) {
  EXPECT_EQ(read("bias", {5}), iota(5));
  EXPECT_EQ(read("bias", {5}, {{0, 1}, {3, 5}}), (std::vector<float>{0, 3, 4}));
}

TEST_F(SafetensorsSlices, RangesOutsideTheTensorAreInternalErrors) {
  expect_error([&] { read("f32", {4, 5}, {{3, 5}}); }, {"internal error", "f32"});
  expect_error([&] { read("f32", {4, 5}, {}, {{-1, 2}}); }, {"internal error", "f32"});
  expect_error([&] { read("bias", {5}, {}, {{0, 1}}); }, {"internal error", "bias"});
}

TEST_F(Safetensors, ExposesTensorsMetadataAndBytes) {
  FileBuilder()
      .add("b", "I64", {2}, as_bytes(std::vector<int64_t>{7, -7}))
      .add("a", "U8", {3}, "xyz")
      .add("empty", "F32", {0, 4}, "")
      .metadata("format", "pt")
      .metadata("note", "hello")
      .write(file());
  const auto st = io::SafetensorsFile::open(file());
  EXPECT_EQ(st->path(), file());
  EXPECT_EQ(st->metadata(),
            (std::map<std::string, std::string>{{"format", "pt"}, {"note", "hello"}}));
  ASSERT_EQ(st->tensors().size(), 3u);
  EXPECT_EQ(st->find("missing"), nullptr);

  const io::TensorInfo* b = st->find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, io::DType::I64);
  EXPECT_EQ(b->shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(b->end - b->begin, 16u);
  EXPECT_EQ(b->file, file());
  int64_t values[2];
  std::memcpy(values, st->bytes(*b), sizeof(values));
  EXPECT_EQ(values[1], -7);

  const io::TensorInfo* a = st->find("a");
  ASSERT_NE(a, nullptr);
  st->release(*a);  // released pages read back from the file
  EXPECT_EQ(std::string_view(reinterpret_cast<const char*>(st->bytes(*a)), 3), "xyz");
  EXPECT_EQ(io::dtype_name(io::DType::BF16), "BF16");
  EXPECT_EQ(io::dtype_size(io::DType::BOOL), 1u);
}

TEST_F(Safetensors, EmptyFile) {
  write_bytes(file(), "");
  expect_open_error({"empty"});
}

TEST_F(Safetensors, Truncated) {
  write_bytes(file(), "abcde");
  expect_open_error({"truncated: 5 bytes", "8-byte header length"});
}

TEST_F(Safetensors, HeaderLengthLargerThanFile) {
  write_bytes(file(), le_u64(1000) + "{}");
  expect_open_error({"header length 1000 is larger than the file (10 bytes)"});
}

TEST_F(Safetensors, HeaderLengthOverCap) {
  write_bytes(file(), le_u64(uint64_t{1} << 40) + "{}");
  expect_open_error({"header length 1099511627776 exceeds the 100 MiB limit"});
}

TEST_F(Safetensors, MalformedJson) {
  expect_open_error(R"({"a": )", "", {"malformed JSON", "parse error"});
}

TEST_F(Safetensors, NumberTooLargeForJson) {
  expect_open_error(R"({"w": 1e999})", "", {"malformed JSON", "number overflow"});
}

TEST_F(Safetensors, NonObjectJson) {
  expect_open_error("[1, 2]", "", {"header is a JSON array, expected an object"});
}

TEST_F(Safetensors, HostileNesting) {
  expect_open_error(std::string(5000, '[') + std::string(5000, ']'), "", {"nests deeper"});
}

TEST_F(Safetensors, DuplicateTensor) {
  const std::string entry = R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})";
  expect_open_error(R"({"t":)" + entry + R"(,"t":)" + entry + "}", "x", {"duplicate key 't'"});
}

TEST_F(Safetensors, BadDtype) {
  expect_open_error(
      R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", "x",
      {"tensor 'w'",
       "unknown dtype 'F8' (known: F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL)"});
  expect_open_error(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,1]}})", "x",
                    {"tensor 'w'", "dtype is 4"});
}

TEST_F(Safetensors, NegativeDimension) {
  expect_open_error(R"({"w":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,0]}})", "",
                    {"tensor 'w'", "shape dimension 1 is -1"});
  expect_open_error(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,0]}})", "",
                    {"tensor 'w'", "shape dimension 0 is 1.5"});
}

TEST_F(Safetensors, AbsurdShape) {
  expect_open_error(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})",
                    "abcd", {"tensor 'w'", "shape [4294967296, 4294967296] of F32 is too large"});
}

TEST_F(Safetensors, OffsetsPastTheEnd) {
  expect_open_error(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})", "abcd",
                    {"tensor 'w'", "data_offsets [2, 6] end past the data section (4 bytes)"});
}

TEST_F(Safetensors, OffsetsOverlap) {
  expect_open_error(R"({"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},)"
                    R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
                    "abcd", {"tensors 'a' [0, 3] and 'b' [2, 4] overlap"});
}

// The tensors must tile the data section as the reference loader requires: no gap before or
// between them, nothing after the last.
TEST_F(Safetensors, BytesThatBelongToNoTensor) {
  expect_open_error(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                    R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
                    "abcd", {"bytes [1, 2) of the data section belong to no tensor (before 'b')"});
  expect_open_error(R"({"w":{"dtype":"U8","shape":[3],"data_offsets":[1,4]}})", "abcd",
                    {"bytes [0, 1) of the data section belong to no tensor (before 'w')"});
  expect_open_error(R"({"w":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}})", "abcd",
                    {"bytes [3, 4) of the data section follow the last tensor's data"});
}

TEST_F(Safetensors, SpanDoesNotMatchShape) {
  expect_open_error(R"({"a.weight":{"dtype":"F32","shape":[4,8],"data_offsets":[0,96]}})",
                    std::string(128, 'x'),
                    {"tensor 'a.weight': data_offsets [0, 96] span 96 bytes but shape [4, 8] of "
                     "F32 needs 128"});
}

TEST_F(Safetensors, BeginAfterEnd) {
  expect_open_error(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[3,1]}})", "abcd",
                    {"tensor 'w'", "data_offsets [3, 1] begin after end"});
}

TEST_F(Safetensors, MalformedEntries) {
  expect_open_error(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}})", "a",
                    {"tensor 'w'", "unknown key 'extra'"});
  expect_open_error(R"({"w":{"dtype":"U8","shape":[1]}})", "a",
                    {"tensor 'w'", "no 'data_offsets'"});
  expect_open_error(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "a",
                    {"tensor 'w'", "data_offsets must be [begin, end]"});
  expect_open_error(R"({"w":[1]})", "a", {"tensor 'w'", "entry is array"});
  expect_open_error(R"({"__metadata__":{"k":1}})", "", {"__metadata__ 'k' is 1"});
}

TEST_F(Safetensors, MessagesStayOnOneLine) {
  expect_open_error(R"({"bad\nname":{"dtype":"X\n","shape":[1],"data_offsets":[0,1]}})", "a",
                    {R"(tensor 'bad\x0aname')"});
}

TEST_F(Safetensors, MissingFile) { expect_open_error({"cannot open"}); }

TEST_F(Safetensors, MissingTensor) {
  FileBuilder().add("w", "F32", {1}, as_bytes(iota(1))).write(file());
  expect_error([&] { read("v", {1}); }, {"tensor 'v' is missing from checkpoint " + dir_.string()});
}

TEST_F(Safetensors, WrongShape) {
  FileBuilder().add("w", "F32", {2, 3}, as_bytes(iota(6))).write(file());
  expect_error(
      [&] {
        read("w", {3, 2});
      },
      {"tensor 'w' in " + file().string() + " has shape [2, 3], expected [3, 2]"});
}

TEST_F(Safetensors, UnsupportedDtype) {
  FileBuilder().add("ids", "I64", {2}, as_bytes(std::vector<int64_t>{1, 2})).write(file());
  expect_error([&] { read("ids", {2}); },
               {"tensor 'ids' in " + file().string() +
                " has dtype I64; only F32, F16 and BF16 weights are supported"});
}

void write_index(const fs::path& dir, const json& weight_map) {
  const json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  write_bytes(dir / "model.safetensors.index.json", index.dump());
}

TEST_F(SafetensorsCheckpoint, ShardedWithIndex) {
  FileBuilder()
      .add("a", "F32", {2}, as_bytes(iota(2)))
      .add("unlisted", "F32", {1}, as_bytes(iota(1)))
      .write(dir_ / "model-00001-of-00002.safetensors");
  FileBuilder()
      .add("b", "BF16", {2, 2}, as_bytes(bf16_iota(4)))
      .write(dir_ / "model-00002-of-00002.safetensors");
  write_index(
      dir_, {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}});

  const io::Checkpoint checkpoint = io::Checkpoint::open(dir_);
  EXPECT_EQ(checkpoint.dir(), dir_);
  EXPECT_EQ(checkpoint.files().size(), 2u);
  const std::vector<const io::TensorInfo*> tensors = checkpoint.tensors();
  ASSERT_EQ(tensors.size(), 2u);
  EXPECT_EQ(tensors[0]->name, "a");
  EXPECT_EQ(tensors[1]->file, dir_ / "model-00002-of-00002.safetensors");
  EXPECT_EQ(checkpoint.find("unlisted"), nullptr);  // the index decides
  EXPECT_EQ(checkpoint.read_f32("a", std::vector<int64_t>{2}, {}, {}), iota(2));
  EXPECT_EQ(checkpoint.read_f32("b", std::vector<int64_t>{2, 2}, {{1, 2}}, {}),
            (std::vector<float>{2, 3}));
}

TEST_F(SafetensorsCheckpoint, SingleFile) {
  FileBuilder().add("w", "F32", {3}, as_bytes(iota(3))).write(file());
  const io::Checkpoint checkpoint = io::Checkpoint::open(dir_);
  ASSERT_EQ(checkpoint.tensors().size(), 1u);
  EXPECT_NE(checkpoint.find("w"), nullptr);
}

TEST_F(SafetensorsCheckpoint, IndexNamesTensorTheShardLacks) {
  FileBuilder().add("a", "F32", {1}, as_bytes(iota(1))).write(dir_ / "shard.safetensors");
  write_index(dir_, {{"a", "shard.safetensors"}, {"b", "shard.safetensors"}});
  expect_error([&] { io::Checkpoint::open(dir_); },
               {"model.safetensors.index.json: tensor 'b' is not in shard 'shard.safetensors'"});
}

TEST_F(SafetensorsCheckpoint, IndexNamesMissingFile) {
  write_index(dir_, {{"a", "gone.safetensors"}});
  expect_error([&] { io::Checkpoint::open(dir_); },
               {"model.safetensors.index.json: shard 'gone.safetensors'", "tensor 'a'"});
}

TEST_F(SafetensorsCheckpoint, IndexPathTraversal) {
  for (const char* name : {"../model.safetensors", "sub/x.safetensors", "..", ""}) {
    write_index(dir_, {{"a", name}});
    expect_error([&] { io::Checkpoint::open(dir_); },
                 {"model.safetensors.index.json: tensor 'a' maps to",
                  "expected a file name inside the model directory"});
  }
}

TEST_F(SafetensorsCheckpoint, MalformedIndex) {
  write_bytes(dir_ / "model.safetensors.index.json", R"({"weight_map": [1]})");
  expect_error([&] { io::Checkpoint::open(dir_); },
               {"model.safetensors.index.json", "\"weight_map\""});
  write_bytes(dir_ / "model.safetensors.index.json", "{");
  expect_error([&] { io::Checkpoint::open(dir_); },
               {"model.safetensors.index.json: malformed JSON"});
}

TEST_F(SafetensorsCheckpoint, ShardDefectNamesTheShard) {
  write_bytes(dir_ / "shard.safetensors", "abc");
  write_index(dir_, {{"a", "shard.safetensors"}});
  expect_error([&] { io::Checkpoint::open(dir_); },
               {(dir_ / "shard.safetensors").string() + ": truncated"});
}

TEST_F(SafetensorsCheckpoint, NoCheckpoint) {
  expect_error([&] { io::Checkpoint::open(dir_); },
               {dir_.string() + ": no model.safetensors or model.safetensors.index.json"});
}

}  // namespace
