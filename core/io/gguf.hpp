// GGUF files (llama.cpp's checkpoint format), memory-mapped. Everything the file says is checked
// before it is trusted: the magic and version; counts, string and array lengths against the bytes
// that remain (so a hostile count cannot make us allocate more than a small multiple of the
// file); no duplicate keys or tensor names; `general.alignment` a power of two; every tensor of a
// type tpengine reads, 1 to 4 positive dimensions whose row is whole blocks, its offset aligned
// and its bytes inside the data section, no two tensors overlapping. Failures are one tpe::Error
// naming the file and the key or tensor. Owns: reading GGUF. May not touch: graphs, plans,
// devices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/common/index_set.hpp"
#include "core/io/ggml_blocks.hpp"

namespace tpe::io {

class MappedFile;

// One metadata value. Integers of every width are held as int64 (a UINT64 above INT64_MAX is
// refused), floats as double; arrays hold one element type and are not nested.
struct GgufValue {
  enum class Kind { kInt, kFloat, kBool, kString, kArray };
  uint32_t type = 0;  // the file's value type id (0 UINT8 .. 12 FLOAT64)
  Kind kind = Kind::kInt;
  int64_t i = 0;
  double f = 0;
  bool b = false;
  std::string s;
  // Arrays: the element type id and the elements (ints, floats or strings by element kind).
  uint32_t element_type = 0;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;
};

std::string_view gguf_value_type_name(uint32_t type);  // "UINT32", ...

struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<int64_t> dims;  // ggml order: dims[0] is the row length (the innermost)
  uint64_t offset = 0;        // into the data section
  uint64_t bytes = 0;
  // The row-major shape, outermost first ([dims[1], dims[0]] for a matrix), as safetensors and
  // PyTorch write it.
  std::vector<int64_t> shape() const;
};

class GgufFile {
 public:
  static std::unique_ptr<GgufFile> open(const std::filesystem::path& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t data_offset() const { return data_offset_; }  // where the tensors' data begins
  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return metadata_; }
  const GgufValue* find_value(std::string_view key) const;
  // The value of `key` as that kind; tpe::Error naming the file and key when it is missing or of
  // another type.
  int64_t integer(std::string_view key) const;
  double number(std::string_view key) const;  // a float, or an integer converted
  const std::string& string(std::string_view key) const;
  bool boolean(std::string_view key) const;
  const GgufValue& array(std::string_view key) const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find(std::string_view name) const;
  // The tensor's bytes inside the mapping.
  const std::byte* bytes(const GgufTensor& tensor) const;
  // Copies a slice of a 1-D or 2-D tensor out as fp32, dequantizing only the blocks that hold the
  // slice. `expected_shape` is the row-major shape the caller expects (tpe::Error naming the
  // tensor and both shapes when it differs); rows select dim 0 and cols dim 1 (empty: all), as
  // Checkpoint::read_f32. The pages of the rows read are released afterwards.
  void read_f32(const GgufTensor& tensor, std::span<const int64_t> expected_shape,
                const IndexSet& rows, const IndexSet& cols, std::span<float> out) const;

 private:
  GgufFile() = default;
  std::filesystem::path path_;
  std::unique_ptr<MappedFile> mapping_;
  uint32_t version_ = 0;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue, std::less<>> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

}  // namespace tpe::io
