// Safetensors files, memory-mapped. The header is validated before anything in it is trusted:
// its length is sane and inside the file, the JSON is well formed, every tensor has a known
// dtype, a shape of non-negative dimensions, data offsets inside the data section whose span
// equals shape x dtype size, and no two tensors overlap. Owns: reading safetensors and
// model.safetensors.index.json. May not touch: graphs, plans, devices.
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

namespace tpe::io {

class MappedFile;

enum class DType { F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL };

std::string_view dtype_name(DType dtype);  // "F32", ...
size_t dtype_size(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;
  std::filesystem::path file;
};

// One mapped file. Throws tpe::Error naming the file on any defect.
class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(std::string_view name) const;
  // The tensor's bytes inside the mapping.
  const std::byte* bytes(const TensorInfo& info) const;
  // Copies a slice of one of this file's tensors out as fp32 (see Checkpoint::read_f32).
  void read_f32(const TensorInfo& info, std::span<const int64_t> expected_shape,
                const IndexSet& rows, const IndexSet& cols, std::span<float> out) const;
  std::vector<float> read_f32(const TensorInfo& info, std::span<const int64_t> expected_shape,
                              const IndexSet& rows, const IndexSet& cols) const;
  // Tells the kernel the tensor's pages are no longer needed (they are clean, so they leave the
  // resident set), keeping peak memory near one tensor while slices are copied out.
  void release(const TensorInfo& info) const;

 private:
  SafetensorsFile() = default;
  // Like release, for bytes [begin, end) of the data section.
  void release_bytes(uint64_t begin, uint64_t end) const;
  std::filesystem::path path_;
  std::unique_ptr<MappedFile> mapping_;
  const std::byte* map_ = nullptr;  // mapping_'s bytes
  size_t map_size_ = 0;
  size_t data_offset_ = 0;  // 8 + header length
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_;
  std::map<std::string, std::string> metadata_;
};

// A model directory's weights: model.safetensors, or the files model.safetensors.index.json
// names (every file validated, every weight_map entry checked against the file it names).
class Checkpoint {
 public:
  static Checkpoint open(const std::filesystem::path& model_dir);

  const std::filesystem::path& dir() const { return dir_; }
  const TensorInfo* find(std::string_view name) const;
  std::vector<const TensorInfo*> tensors() const;  // sorted by name
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

  // Copies a slice of tensor `name` out as fp32, converting F16/BF16 on the way. The tensor must
  // exist and have exactly `expected_shape` (1-D or 2-D), else tpe::Error naming the tensor, the
  // file and both shapes. `rows` selects dim 0 and `cols` dim 1 (empty = all); the result is
  // [count(rows), count(cols)] row-major (or [count(rows)] for 1-D). Releases the tensor's
  // pages of the rows read afterwards (see SafetensorsFile::release). Safe to call from several
  // threads at once. The first form writes into `out`, which must hold exactly the slice.
  void read_f32(std::string_view name, std::span<const int64_t> expected_shape,
                const IndexSet& rows, const IndexSet& cols, std::span<float> out) const;
  std::vector<float> read_f32(std::string_view name, std::span<const int64_t> expected_shape,
                              const IndexSet& rows, const IndexSet& cols) const;

 private:
  using Entry = std::pair<const SafetensorsFile*, const TensorInfo*>;
  Entry locate(std::string_view name) const;  // fails naming the tensor and the checkpoint
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry, std::less<>> index_;
};

}  // namespace tpe::io
