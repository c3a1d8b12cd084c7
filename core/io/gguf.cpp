#include "core/io/gguf.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <utility>

#include "core/common/error.hpp"
#include "core/io/mapped_file.hpp"

namespace tpe::io {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint64_t kMaxTensors = uint64_t{1} << 20;
constexpr uint64_t kMaxKeys = uint64_t{1} << 16;
constexpr uint64_t kMaxNameBytes = 65535;  // keys and tensor names
constexpr uint64_t kMaxArrayElements = uint64_t{1} << 26;
constexpr uint64_t kMaxAlignment = uint64_t{1} << 20;
constexpr uint64_t kDefaultAlignment = 32;
constexpr size_t kMaxDims = 4;

enum ValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

constexpr std::string_view kValueTypeNames[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                                "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                                "UINT64", "INT64",   "FLOAT64"};

// Bytes one value of the type takes at least (a string: its length).
uint64_t min_value_bytes(uint32_t type) {
  switch (type) {
    case kUint8:
    case kInt8:
    case kBool:
      return 1;
    case kUint16:
    case kInt16:
      return 2;
    case kUint32:
    case kInt32:
    case kFloat32:
      return 4;
    default:
      return 8;
  }
}

template <typename... Args>
[[noreturn]] void fail_in(const fs::path& file, fmt::format_string<Args...> format,
                          Args&&... args) {
  fail("{}: {}", printable(file.string()), fmt::format(format, std::forward<Args>(args)...));
}

// Bounds-checked little-endian reads through the file's header.
class Reader {
 public:
  Reader(const fs::path& file, const std::byte* data, size_t size)
      : file_(file), data_(data), size_(size) {}

  uint64_t offset() const { return at_; }
  uint64_t remaining() const { return size_ - at_; }

  template <class T>
  T read(std::string_view what) {
    if (remaining() < sizeof(T)) {
      fail_in(file_, "truncated: {} at byte {} needs {} bytes, {} left", what, at_, sizeof(T),
              remaining());
    }
    T value;
    std::memcpy(&value, data_ + at_, sizeof(T));
    at_ += sizeof(T);
    return value;
  }

  std::string read_string(std::string_view what, uint64_t max_bytes) {
    const auto length = read<uint64_t>(what);
    if (length > remaining()) {
      fail_in(file_, "{}: a string of {} bytes at byte {}, but only {} bytes are left", what,
              length, at_ - 8, remaining());
    }
    if (length > max_bytes) {
      fail_in(file_, "{}: a string of {} bytes, over the limit of {}", what, length, max_bytes);
    }
    std::string text(reinterpret_cast<const char*>(data_ + at_), length);
    at_ += length;
    return text;
  }

 private:
  const fs::path& file_;
  const std::byte* data_;
  uint64_t size_;
  uint64_t at_ = 0;
};

std::string key_text(std::string_view key) { return printable(key.substr(0, 200)); }

// One scalar of `type` into `value` (an array's element goes to its vectors instead).
void read_scalar(Reader& r, uint32_t type, const std::string& what, GgufValue& value, bool element,
                 const fs::path& file) {
  const auto put_int = [&](int64_t v) {
    if (element) {
      value.ints.push_back(v);
    } else {
      value.kind = GgufValue::Kind::kInt;
      value.i = v;
    }
  };
  const auto put_float = [&](double v) {
    if (element) {
      value.floats.push_back(v);
    } else {
      value.kind = GgufValue::Kind::kFloat;
      value.f = v;
    }
  };
  switch (type) {
    case kUint8:
      return put_int(r.read<uint8_t>(what));
    case kInt8:
      return put_int(r.read<int8_t>(what));
    case kUint16:
      return put_int(r.read<uint16_t>(what));
    case kInt16:
      return put_int(r.read<int16_t>(what));
    case kUint32:
      return put_int(r.read<uint32_t>(what));
    case kInt32:
      return put_int(r.read<int32_t>(what));
    case kInt64:
      return put_int(r.read<int64_t>(what));
    case kUint64: {
      const auto v = r.read<uint64_t>(what);
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        fail_in(file, "{}: UINT64 value {} is too large", what, v);
      }
      return put_int(static_cast<int64_t>(v));
    }
    case kFloat32:
      return put_float(r.read<float>(what));
    case kFloat64:
      return put_float(r.read<double>(what));
    case kBool: {
      const auto v = r.read<uint8_t>(what);
      if (v > 1) fail_in(file, "{}: BOOL value {}, expected 0 or 1", what, v);
      if (element) {
        value.ints.push_back(v);
      } else {
        value.kind = GgufValue::Kind::kBool;
        value.b = v == 1;
      }
      return;
    }
    case kString: {
      std::string s = r.read_string(what, std::numeric_limits<uint64_t>::max());
      if (element) {
        value.strings.push_back(std::move(s));
      } else {
        value.kind = GgufValue::Kind::kString;
        value.s = std::move(s);
      }
      return;
    }
    default:
      fail_in(file, "{}: unknown value type {}", what, type);
  }
}

GgufValue read_value(Reader& r, uint32_t type, const std::string& what, const fs::path& file) {
  GgufValue value;
  value.type = type;
  if (type != kArray) {
    read_scalar(r, type, what, value, false, file);
    return value;
  }
  value.kind = GgufValue::Kind::kArray;
  value.element_type = r.read<uint32_t>(what);
  if (value.element_type == kArray) fail_in(file, "{}: nested arrays are not supported", what);
  if (value.element_type > kFloat64) {
    fail_in(file, "{}: unknown array element type {}", what, value.element_type);
  }
  const auto count = r.read<uint64_t>(what);
  // Checked before any allocation: a hostile count fails here, not in the allocator.
  if (count > kMaxArrayElements || count > r.remaining() / min_value_bytes(value.element_type)) {
    fail_in(file, "{}: an array of {} {} values does not fit in the {} bytes that are left", what,
            count, gguf_value_type_name(value.element_type), r.remaining());
  }
  const size_t n = static_cast<size_t>(count);
  if (value.element_type == kString) {
    value.strings.reserve(n);
  } else if (value.element_type == kFloat32 || value.element_type == kFloat64) {
    value.floats.reserve(n);
  } else {
    value.ints.reserve(n);
  }
  for (size_t k = 0; k < n; ++k) read_scalar(r, value.element_type, what, value, true, file);
  return value;
}

uint64_t align_up(uint64_t offset, uint64_t alignment) {
  return (offset + alignment - 1) / alignment * alignment;
}

std::string shape_text(std::span<const int64_t> shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

GgufTensor read_tensor_info(Reader& r, size_t index, const fs::path& file) {
  GgufTensor t;
  t.name = r.read_string(fmt::format("tensor {}'s name", index), kMaxNameBytes);
  const std::string what = fmt::format("tensor '{}'", key_text(t.name));
  const auto n_dims = r.read<uint32_t>(what);
  if (n_dims < 1 || n_dims > kMaxDims) {
    fail_in(file, "{}: {} dimensions, expected 1 to {}", what, n_dims, kMaxDims);
  }
  uint64_t elements = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    const auto dim = r.read<uint64_t>(what);
    if (dim == 0 || dim > (uint64_t{1} << 62) / elements) {
      fail_in(file, "{}: dimension {} is {}", what, d, dim);
    }
    elements *= dim;
    t.dims.push_back(static_cast<int64_t>(dim));
  }
  const auto type_id = r.read<uint32_t>(what);
  const std::optional<GgmlType> type = ggml_type(type_id);
  if (!type) {
    fail_in(file, "{}: element type {} ({}) is not supported; tpengine reads {}", what,
            ggml_type_name(type_id), type_id, ggml_supported_types());
  }
  t.type = *type;
  const BlockLayout layout = block_layout(t.type);
  if (t.dims[0] % layout.elements != 0) {
    fail_in(file, "{}: its rows of {} elements are not whole {} blocks of {}", what, t.dims[0],
            ggml_type_name(type_id), layout.elements);
  }
  t.bytes = elements / static_cast<uint64_t>(layout.elements) * static_cast<uint64_t>(layout.bytes);
  t.offset = r.read<uint64_t>(what);
  return t;
}

void check_within(const IndexSet& set, int64_t size, std::string_view name, const fs::path& file) {
  int64_t previous = 0;
  for (const Range& range : set) {
    TPE_CHECK(range.begin >= previous && range.begin < range.end && range.end <= size,
              "{}: slice of tensor '{}' outside its {} entries", printable(file.string()),
              printable(name), size);
    previous = range.end;
  }
}

}  // namespace

std::string_view gguf_value_type_name(uint32_t type) {
  return type < std::size(kValueTypeNames) ? kValueTypeNames[type] : "an unknown type";
}

std::vector<int64_t> GgufTensor::shape() const { return {dims.rbegin(), dims.rend()}; }

std::unique_ptr<GgufFile> GgufFile::open(const fs::path& path) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  file->mapping_ = std::make_unique<MappedFile>(path);
  Reader r(path, file->mapping_->data(), file->mapping_->size());
  if (file->mapping_->size() < 4) {
    fail_in(path, "not a GGUF file: {} bytes, a GGUF file starts with the magic 'GGUF'",
            file->mapping_->size());
  }
  if (r.read<uint32_t>("the magic") != kMagic) {
    fail_in(path, "not a GGUF file: it does not start with the magic 'GGUF'");
  }
  file->version_ = r.read<uint32_t>("the version");
  if (file->version_ != 2 && file->version_ != 3) {
    // A big-endian file's version reads as 2 or 3 shifted into the top byte.
    if (file->version_ == 0x02000000u || file->version_ == 0x03000000u) {
      fail_in(path, "a big-endian GGUF file; only little-endian ones are supported");
    }
    fail_in(path, "GGUF version {}; versions 2 and 3 are supported", file->version_);
  }
  const auto tensor_count = r.read<uint64_t>("the tensor count");
  const auto key_count = r.read<uint64_t>("the metadata count");
  // Each tensor description takes at least 32 bytes and each key 13: counts the file cannot hold
  // fail before anything is reserved for them.
  if (tensor_count > kMaxTensors || tensor_count > r.remaining() / 32) {
    fail_in(path, "{} tensors do not fit in a file of {} bytes", tensor_count,
            file->mapping_->size());
  }
  if (key_count > kMaxKeys || key_count > r.remaining() / 13) {
    fail_in(path, "{} metadata keys do not fit in a file of {} bytes", key_count,
            file->mapping_->size());
  }
  for (uint64_t k = 0; k < key_count; ++k) {
    std::string key = r.read_string(fmt::format("metadata key {}", k), kMaxNameBytes);
    const std::string what = fmt::format("metadata '{}'", key_text(key));
    const auto type = r.read<uint32_t>(what);
    GgufValue value = read_value(r, type, what, path);
    if (!file->metadata_.emplace(std::move(key), std::move(value)).second) {
      fail_in(path, "duplicate {}", what);
    }
  }
  uint64_t alignment = kDefaultAlignment;
  if (const GgufValue* a = file->find_value("general.alignment")) {
    if (a->type != kUint32 || a->i == 0 || !std::has_single_bit(static_cast<uint64_t>(a->i)) ||
        static_cast<uint64_t>(a->i) > kMaxAlignment) {
      fail_in(path, "metadata 'general.alignment' must be a UINT32 power of two up to {}",
              kMaxAlignment);
    }
    alignment = static_cast<uint64_t>(a->i);
  }
  file->tensors_.reserve(static_cast<size_t>(tensor_count));
  for (uint64_t t = 0; t < tensor_count; ++t) {
    GgufTensor tensor = read_tensor_info(r, static_cast<size_t>(t), path);
    if (!file->by_name_.emplace(tensor.name, file->tensors_.size()).second) {
      fail_in(path, "duplicate tensor '{}'", key_text(tensor.name));
    }
    file->tensors_.push_back(std::move(tensor));
  }
  file->data_offset_ = align_up(r.offset(), alignment);
  const uint64_t size = file->mapping_->size();
  const uint64_t data_size = file->data_offset_ <= size ? size - file->data_offset_ : 0;
  std::vector<const GgufTensor*> by_offset;
  for (const GgufTensor& t : file->tensors_) {
    if (t.offset % alignment != 0) {
      fail_in(path, "tensor '{}': offset {} is not a multiple of the alignment {}",
              key_text(t.name), t.offset, alignment);
    }
    if (t.offset > data_size || t.bytes > data_size - t.offset) {
      fail_in(path, "tensor '{}': bytes [{}, {}) of the data section, which holds {} bytes",
              key_text(t.name), t.offset, t.offset + t.bytes, data_size);
    }
    by_offset.push_back(&t);
  }
  std::ranges::sort(by_offset, {}, &GgufTensor::offset);
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensor& a = *by_offset[i - 1];
    const GgufTensor& b = *by_offset[i];
    if (a.offset + a.bytes > b.offset) {
      fail_in(path, "tensors '{}' and '{}' overlap", key_text(a.name), key_text(b.name));
    }
  }
  return file;
}

GgufFile::~GgufFile() = default;

const GgufValue* GgufFile::find_value(std::string_view key) const {
  const auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

namespace {

const GgufValue& typed(const GgufFile& file, std::string_view key, std::string_view expected,
                       bool (*ok)(const GgufValue&)) {
  const GgufValue* v = file.find_value(key);
  if (v == nullptr) fail_in(file.path(), "no metadata '{}'", key_text(key));
  if (!ok(*v)) {
    fail_in(file.path(), "metadata '{}' is {}, expected {}", key_text(key),
            gguf_value_type_name(v->type), expected);
  }
  return *v;
}

}  // namespace

int64_t GgufFile::integer(std::string_view key) const {
  return typed(*this, key, "an integer",
               [](const GgufValue& v) { return v.kind == GgufValue::Kind::kInt; })
      .i;
}

double GgufFile::number(std::string_view key) const {
  const GgufValue& value = typed(*this, key, "a number", [](const GgufValue& v) {
    return v.kind == GgufValue::Kind::kInt || v.kind == GgufValue::Kind::kFloat;
  });
  return value.kind == GgufValue::Kind::kInt ? static_cast<double>(value.i) : value.f;
}

const std::string& GgufFile::string(std::string_view key) const {
  return typed(*this, key, "a STRING",
               [](const GgufValue& v) { return v.kind == GgufValue::Kind::kString; })
      .s;
}

bool GgufFile::boolean(std::string_view key) const {
  return typed(*this, key, "a BOOL",
               [](const GgufValue& v) { return v.kind == GgufValue::Kind::kBool; })
      .b;
}

const GgufValue& GgufFile::array(std::string_view key) const {
  return typed(*this, key, "an ARRAY",
               [](const GgufValue& v) { return v.kind == GgufValue::Kind::kArray; });
}

const GgufTensor* GgufFile::find(std::string_view name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const std::byte* GgufFile::bytes(const GgufTensor& tensor) const {
  TPE_CHECK(find(tensor.name) == &tensor, "tensor '{}' does not belong to {}",
            key_text(tensor.name), printable(path_.string()));
  return mapping_->data() + data_offset_ + tensor.offset;
}

void GgufFile::read_f32(const GgufTensor& tensor, std::span<const int64_t> expected_shape,
                        const IndexSet& rows, const IndexSet& cols, std::span<float> out) const {
  const std::vector<int64_t> shape = tensor.shape();
  if (!std::ranges::equal(shape, expected_shape)) {
    fail("tensor '{}' in {} has shape {}, expected {}", key_text(tensor.name),
         printable(path_.string()), shape_text(shape), shape_text(expected_shape));
  }
  TPE_CHECK(shape.size() == 1 || shape.size() == 2, "read_f32 of {}-D tensor '{}'", shape.size(),
            key_text(tensor.name));
  TPE_CHECK(shape.size() == 2 || cols.empty(), "columns of 1-D tensor '{}'", key_text(tensor.name));
  // A 1-D tensor is one row whose elements `rows` selects.
  const int64_t height = shape.size() == 2 ? shape[0] : 1;
  const int64_t width = shape.back();
  const IndexSet all_rows{{0, height}};
  const IndexSet all_cols{{0, width}};
  const IndexSet& row_set = shape.size() == 1 || rows.empty() ? all_rows : rows;
  const IndexSet& col_set =
      shape.size() == 1 ? (rows.empty() ? all_cols : rows) : (cols.empty() ? all_cols : cols);
  check_within(row_set, height, tensor.name, path_);
  check_within(col_set, width, tensor.name, path_);
  TPE_CHECK(static_cast<int64_t>(out.size()) == index_count(row_set) * index_count(col_set),
            "slice of '{}' into {} floats", key_text(tensor.name), out.size());
  const BlockLayout layout = block_layout(tensor.type);
  const int64_t row_bytes = width / layout.elements * layout.bytes;
  const std::byte* base = bytes(tensor);
  std::vector<float> blocks;
  float* dst = out.data();
  for (const Range& rr : row_set) {
    for (int64_t row = rr.begin; row < rr.end; ++row) {
      for (const Range& c : col_set) {
        // The blocks that hold columns [c.begin, c.end), dequantized, then the columns copied.
        const int64_t first = c.begin / layout.elements;
        const int64_t last = (c.end + layout.elements - 1) / layout.elements;
        blocks.resize(static_cast<size_t>((last - first) * layout.elements));
        dequantize(tensor.type, base + row * row_bytes + first * layout.bytes, last - first,
                   blocks.data());
        const float* from = blocks.data() + (c.begin - first * layout.elements);
        dst = std::copy(from, from + c.size(), dst);
      }
    }
    const uint64_t begin =
        data_offset_ + tensor.offset + static_cast<uint64_t>(rr.begin * row_bytes);
    mapping_->release(begin, begin + static_cast<uint64_t>(rr.size() * row_bytes));
  }
}

}  // namespace tpe::io
