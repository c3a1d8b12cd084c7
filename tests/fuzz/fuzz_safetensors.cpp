// Feeds arbitrary bytes to the safetensors reader as a model directory's model.safetensors. Any
// defect must surface as a one-line tpe::Error; a file that opens must describe only bytes that
// are inside the input, which is checked against the input itself rather than trusted.
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "core/common/error.hpp"
#include "core/io/safetensors.hpp"
#include "tests/fuzz/scratch.hpp"

namespace {

namespace fs = std::filesystem;
namespace io = tpe::io;

using tpe::fuzz::Scratch;

uint64_t header_length(const uint8_t* data) {
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | data[i];
  return length;
}

void check_bytes(const io::SafetensorsFile& file, const uint8_t* data, size_t size) {
  const uint64_t data_offset = 8 + header_length(data);
  for (const io::TensorInfo& info : file.tensors()) {
    if (info.begin > info.end || data_offset + info.end > size) abort();
    if (std::memcmp(file.bytes(info), data + data_offset + info.begin, info.end - info.begin) !=
        0) {
      abort();
    }
  }
}

// Reads every float tensor the way the loader does: whole, and a slice of rows and columns.
void read_floats(const io::Checkpoint& checkpoint) {
  for (const io::TensorInfo* info : checkpoint.tensors()) {
    const bool is_float = info->dtype == io::DType::F32 || info->dtype == io::DType::F16 ||
                          info->dtype == io::DType::BF16;
    if (!is_float || info->shape.empty() || info->shape.size() > 2) continue;
    checkpoint.read_f32(info->name, info->shape, {}, {});
    const int64_t rows = info->shape[0];
    const tpe::IndexSet some_rows = {{0, rows / 2}, {rows - rows / 4, rows}};
    const tpe::IndexSet cols = info->shape.size() == 2
                                   ? tpe::IndexSet{{info->shape[1] / 3, info->shape[1]}}
                                   : tpe::IndexSet{};
    checkpoint.read_f32(info->name, info->shape, some_rows, cols);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Scratch scratch("fuzz_safetensors");
  {
    std::ofstream out(scratch.dir() / "model.safetensors", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) abort();
  }
  try {
    const io::Checkpoint checkpoint = io::Checkpoint::open(scratch.dir());
    check_bytes(*checkpoint.files().at(0), data, size);
    read_floats(checkpoint);
  } catch (const tpe::Error& error) {
    // Internal errors are broken invariants, which no input may cause.
    const std::string_view message = error.what();
    if (message.find('\n') != message.npos || message.starts_with("internal error at ")) abort();
  }
  return 0;
}
