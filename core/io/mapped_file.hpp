// A checkpoint file mapped read-only, and the half-precision conversions its readers share.
// Owns: opening, mapping and releasing the pages of weight files (safetensors, GGUF).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>

namespace tpe::io {

class MappedFile {
 public:
  // The whole file. Refuses (tpe::Error naming the file) what is not a regular file, so that a
  // FIFO named like a checkpoint fails instead of blocking. An empty file maps to {nullptr, 0}.
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  // Drops bytes [begin, end) from the resident set: the pages are clean, so they fault back in
  // from the page cache if read again. Keeps a loader's peak near one tensor.
  void release(size_t begin, size_t end) const;

 private:
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

float f16_to_f32(uint16_t half);
float bf16_to_f32(uint16_t half);

}  // namespace tpe::io
