// Feeds arbitrary bytes to the GGUF reader as a file. Any defect must surface as a one-line
// tpe::Error that is not an internal one; a file that opens must describe only bytes inside the
// input (checked against the input itself, not trusted), and every 1-D or 2-D tensor is read as
// fp32, whole and sliced.
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "core/common/error.hpp"
#include "core/io/gguf.hpp"
#include "tests/fuzz/scratch.hpp"

namespace {

namespace fs = std::filesystem;
namespace io = tpe::io;

using tpe::fuzz::Scratch;

void check_and_read(const io::GgufFile& file, const uint8_t* data, size_t size) {
  for (const io::GgufTensor& t : file.tensors()) {
    const uint64_t at = file.data_offset() + t.offset;
    if (at > size || t.bytes > size - at) abort();
    if (std::memcmp(file.bytes(t), data + at, t.bytes) != 0) abort();
    const std::vector<int64_t> shape = t.shape();
    if (shape.size() > 2) continue;
    const int64_t height = shape.size() == 2 ? shape[0] : 1;
    const int64_t width = shape.back();
    std::vector<float> out(static_cast<size_t>(height * width));
    file.read_f32(t, shape, {}, {}, out);
    if (shape.size() == 2 && height > 1 && width > 2) {
      const tpe::IndexSet rows{{height / 2, height}};
      const tpe::IndexSet cols{{1, width / 2 + 1}, {width - 1, width}};
      std::vector<float> part(static_cast<size_t>(tpe::index_count(rows) * tpe::index_count(cols)));
      file.read_f32(t, shape, rows, cols, part);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Scratch scratch("fuzz_gguf");
  {
    std::ofstream out((scratch.dir() / "model.gguf"), std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) abort();
  }
  try {
    const auto file = io::GgufFile::open((scratch.dir() / "model.gguf"));
    check_and_read(*file, data, size);
  } catch (const tpe::Error& error) {
    // Internal errors are broken invariants, which no input may cause.
    const std::string_view message = error.what();
    if (message.find('\n') != message.npos || message.starts_with("internal error at ")) abort();
  }
  return 0;
}
