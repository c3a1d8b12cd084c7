#include "core/io/safetensors.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <utility>

#include "core/common/error.hpp"
#include "core/common/json_error.hpp"
#include "core/common/text_file.hpp"
#include "core/io/mapped_file.hpp"

namespace tpe::io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;
// A valid header nests three levels (header, tensor entry, shape); anything far deeper is
// hostile and only costs stack and time.
constexpr int kMaxJsonDepth = 16;
constexpr std::string_view kIndexName = "model.safetensors.index.json";
constexpr std::string_view kSingleName = "model.safetensors";

constexpr std::pair<DType, std::string_view> kDTypeNames[] = {
    {DType::F32, "F32"}, {DType::F16, "F16"},  {DType::BF16, "BF16"}, {DType::F64, "F64"},
    {DType::I64, "I64"}, {DType::I32, "I32"},  {DType::I16, "I16"},   {DType::I8, "I8"},
    {DType::U8, "U8"},   {DType::BOOL, "BOOL"}};

template <typename... Args>
[[noreturn]] void fail_in(const fs::path& file, fmt::format_string<Args...> format,
                          Args&&... args) {
  fail("{}: {}", printable(file.string()), fmt::format(format, std::forward<Args>(args)...));
}

// Enough of a JSON value to say what was found without echoing megabytes of it.
std::string describe(const json& value) {
  if (value.is_string()) {
    const auto& text = value.get_ref<const std::string&>();
    return fmt::format("'{}'", printable(text.substr(0, 40)));
  }
  if (value.is_primitive()) return value.dump();
  return value.type_name();
}

std::string shape_text(std::span<const int64_t> shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

std::string known_dtypes() {
  std::string names;
  for (const auto& [dtype, name] : kDTypeNames) {
    names += names.empty() ? "" : ", ";
    names += name;
  }
  return names;
}

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& [dtype, dtype_text] : kDTypeNames) {
    if (dtype_text == name) return dtype;
  }
  return std::nullopt;
}

std::optional<uint64_t> as_u64(const json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  // "-0" parses as a signed integer.
  if (value.is_number_integer() && value.get<int64_t>() >= 0) return value.get<uint64_t>();
  return std::nullopt;
}

// nlohmann keeps the last of duplicate keys silently; a header that names a tensor twice is
// ambiguous, so duplicates are rejected, and so is hostile nesting.
class JsonGuard {
 public:
  explicit JsonGuard(const fs::path& file) : file_(file) {}

  bool operator()(int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) {
      if (depth >= kMaxJsonDepth) fail_in(file_, "JSON nests deeper than {} levels", kMaxJsonDepth);
    }
    if (event == json::parse_event_t::object_start) {
      keys_.resize(depth + 1);
      keys_[depth].clear();
    } else if (event == json::parse_event_t::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!keys_[depth - 1].insert(key).second) {
        fail_in(file_, "duplicate key '{}'", printable(key));
      }
    }
    return true;
  }

 private:
  const fs::path& file_;
  std::vector<std::set<std::string>> keys_;  // keys seen so far in each open object, by depth
};

json parse_json(const fs::path& file, const char* begin, const char* end) {
  try {
    return json::parse(begin, end, JsonGuard(file));
  } catch (const json::exception& error) {
    fail_in(file, "malformed JSON: {}", json_error_message(error));
  }
}

DType tensor_dtype(const fs::path& file, const std::string& name, const json& value) {
  if (!value.is_string()) {
    fail_in(file, "tensor '{}': dtype is {}, expected a string", printable(name), describe(value));
  }
  const auto& text = value.get_ref<const std::string&>();
  const std::optional<DType> dtype = parse_dtype(text);
  if (!dtype) {
    fail_in(file, "tensor '{}': unknown dtype '{}' (known: {})", printable(name), printable(text),
            known_dtypes());
  }
  return *dtype;
}

std::vector<int64_t> tensor_shape(const fs::path& file, const std::string& name,
                                  const json& value) {
  if (!value.is_array()) {
    fail_in(file, "tensor '{}': shape is {}, expected an array", printable(name), describe(value));
  }
  std::vector<int64_t> shape;
  for (const json& dim : value) {
    const std::optional<uint64_t> size = as_u64(dim);
    if (!size || *size > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail_in(file, "tensor '{}': shape dimension {} is {}, expected a non-negative integer",
              printable(name), shape.size(), describe(dim));
    }
    shape.push_back(static_cast<int64_t>(*size));
  }
  return shape;
}

std::pair<uint64_t, uint64_t> tensor_offsets(const fs::path& file, const std::string& name,
                                             const json& value, uint64_t data_size) {
  const std::optional<uint64_t> begin =
      value.is_array() && value.size() == 2 ? as_u64(value[0]) : std::nullopt;
  const std::optional<uint64_t> end = begin ? as_u64(value[1]) : std::nullopt;
  if (!end) {
    fail_in(file, "tensor '{}': data_offsets must be [begin, end] of non-negative integers",
            printable(name));
  }
  if (*begin > *end) {
    fail_in(file, "tensor '{}': data_offsets [{}, {}] begin after end", printable(name), *begin,
            *end);
  }
  if (*end > data_size) {
    fail_in(file, "tensor '{}': data_offsets [{}, {}] end past the data section ({} bytes)",
            printable(name), *begin, *end, data_size);
  }
  return {*begin, *end};
}

void check_span(const fs::path& file, const TensorInfo& info) {
  uint64_t bytes = dtype_size(info.dtype);
  for (int64_t dim : info.shape) {
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes)) {
      fail_in(file, "tensor '{}': shape {} of {} is too large", printable(info.name),
              shape_text(info.shape), dtype_name(info.dtype));
    }
  }
  if (info.end - info.begin != bytes) {
    fail_in(file, "tensor '{}': data_offsets [{}, {}] span {} bytes but shape {} of {} needs {}",
            printable(info.name), info.begin, info.end, info.end - info.begin,
            shape_text(info.shape), dtype_name(info.dtype), bytes);
  }
}

TensorInfo parse_tensor(const fs::path& file, const std::string& name, const json& entry,
                        uint64_t data_size) {
  if (!entry.is_object()) {
    fail_in(file, "tensor '{}': entry is {}, expected an object", printable(name), describe(entry));
  }
  for (const auto& [key, unused] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      fail_in(file, "tensor '{}': unknown key '{}'", printable(name), printable(key));
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) fail_in(file, "tensor '{}': no '{}'", printable(name), key);
  }
  TensorInfo info;
  info.name = name;
  info.file = file;
  info.dtype = tensor_dtype(file, name, entry["dtype"]);
  info.shape = tensor_shape(file, name, entry["shape"]);
  std::tie(info.begin, info.end) = tensor_offsets(file, name, entry["data_offsets"], data_size);
  check_span(file, info);
  return info;
}

std::map<std::string, std::string> parse_metadata(const fs::path& file, const json& value) {
  if (!value.is_object()) {
    fail_in(file, "__metadata__ is {}, expected an object of strings", describe(value));
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, text] : value.items()) {
    if (!text.is_string()) {
      fail_in(file, "__metadata__ '{}' is {}, expected a string", printable(key), describe(text));
    }
    metadata.emplace(key, text.get<std::string>());
  }
  return metadata;
}

// As the reference loader: the tensors tile the data section, from its first byte to its last,
// without overlaps, gaps or bytes past the last one.
void check_layout(const fs::path& file, const std::vector<TensorInfo>& tensors,
                  uint64_t data_size) {
  std::vector<const TensorInfo*> order;
  for (const TensorInfo& info : tensors) {
    // An empty tensor owns no bytes, so it cannot overlap anything wherever it points.
    if (info.begin != info.end) order.push_back(&info);
  }
  std::sort(order.begin(), order.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  uint64_t covered = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo* next : order) {
    if (prev != nullptr && next->begin < prev->end) {
      fail_in(file, "tensors '{}' [{}, {}] and '{}' [{}, {}] overlap", printable(prev->name),
              prev->begin, prev->end, printable(next->name), next->begin, next->end);
    }
    if (next->begin > covered) {
      fail_in(file, "bytes [{}, {}) of the data section belong to no tensor (before '{}')", covered,
              next->begin, printable(next->name));
    }
    covered = next->end;
    prev = next;
  }
  if (covered != data_size) {
    fail_in(file, "bytes [{}, {}) of the data section follow the last tensor's data", covered,
            data_size);
  }
}

uint64_t read_header_length(const fs::path& file, const std::byte* map, size_t size) {
  if (size == 0) {
    fail_in(file, "empty file, a safetensors file starts with an 8-byte header length");
  }
  if (size < 8) {
    fail_in(file, "truncated: {} bytes, a safetensors file starts with an 8-byte header length",
            size);
  }
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | std::to_integer<uint64_t>(map[i]);
  if (length > kMaxHeaderBytes) {
    fail_in(file, "header length {} exceeds the {} MiB limit", length, kMaxHeaderBytes >> 20);
  }
  if (length > size - 8) {
    fail_in(file, "header length {} is larger than the file ({} bytes)", length, size);
  }
  return length;
}

template <float (*convert)(uint16_t)>
void convert_halves(const std::byte* src, size_t count, float* dst) {
  for (size_t i = 0; i < count; ++i) {
    uint16_t half;
    std::memcpy(&half, src + 2 * i, sizeof(half));  // the mapping gives no alignment
    dst[i] = convert(half);
  }
}

void convert_run(DType dtype, const std::byte* src, size_t count, float* dst) {
  if (count == 0) return;  // dst may be null then, which memcpy must not see
  switch (dtype) {
    case DType::F32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::F16:
      convert_halves<f16_to_f32>(src, count, dst);
      return;
    case DType::BF16:
      convert_halves<bf16_to_f32>(src, count, dst);
      return;
    default:
      TPE_CHECK(false, "dtype {} is not a float dtype", dtype_name(dtype));
  }
}

void check_within(const IndexSet& set, int64_t dim, std::string_view name) {
  for (const Range& range : set) {
    TPE_CHECK(0 <= range.begin && range.begin <= range.end && range.end <= dim,
              "range [{}, {}) outside dimension {} of tensor '{}'", range.begin, range.end, dim,
              printable(name));
  }
}

// Copies rows x cols of a row-major [.., width] tensor; a row range over full width is one run.
void copy_slice(DType dtype, const std::byte* src, int64_t width, const IndexSet& rows,
                const IndexSet& cols, float* dst) {
  const auto element = static_cast<int64_t>(dtype_size(dtype));
  const bool full_width = cols.size() == 1 && cols[0] == Range{0, width};
  for (const Range& row_range : rows) {
    if (full_width) {
      const int64_t count = row_range.size() * width;
      convert_run(dtype, src + row_range.begin * width * element, count, dst);
      dst += count;
      continue;
    }
    for (int64_t row = row_range.begin; row < row_range.end; ++row) {
      for (const Range& col_range : cols) {
        convert_run(dtype, src + (row * width + col_range.begin) * element, col_range.size(), dst);
        dst += col_range.size();
      }
    }
  }
}

bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == name.npos &&
         name.find('\0') == name.npos;
}

bool is_file(const fs::path& path) {
  std::error_code ignored;
  return fs::is_regular_file(path, ignored);
}

// model.safetensors.index.json's weight_map: tensor name -> shard file name in the same dir.
std::map<std::string, std::string> read_weight_map(const fs::path& index) {
  const std::string content = read_text_file(index, kConfigFileLimit);
  const json root = parse_json(index, content.data(), content.data() + content.size());
  if (!root.is_object() || !root.contains("weight_map") || !root["weight_map"].is_object()) {
    fail_in(index, "expected an object with \"weight_map\": {{tensor name: file name}}");
  }
  std::map<std::string, std::string> weight_map;
  for (const auto& [name, file] : root["weight_map"].items()) {
    if (!file.is_string() || !is_plain_file_name(file.get_ref<const std::string&>())) {
      fail_in(index, "tensor '{}' maps to {}, expected a file name inside the model directory",
              printable(name), describe(file));
    }
    weight_map.emplace(name, file.get<std::string>());
  }
  return weight_map;
}

}  // namespace

std::string_view dtype_name(DType dtype) {
  for (const auto& [known, name] : kDTypeNames) {
    if (known == dtype) return name;
  }
  TPE_CHECK(false, "unknown DType {}", static_cast<int>(dtype));
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F64:
    case DType::I64:
      return 8;
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
      return 2;
    case DType::I8:
    case DType::U8:
    case DType::BOOL:
      return 1;
  }
  TPE_CHECK(false, "unknown DType {}", static_cast<int>(dtype));
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->mapping_ = std::make_unique<MappedFile>(path);
  file->map_ = file->mapping_->data();
  file->map_size_ = file->mapping_->size();
  const uint64_t header_length = read_header_length(path, file->map_, file->map_size_);
  file->data_offset_ = 8 + header_length;
  const auto* header = reinterpret_cast<const char*>(file->map_ + 8);
  const json root = parse_json(path, header, header + header_length);
  if (!root.is_object()) fail_in(path, "header is a JSON {}, expected an object", root.type_name());
  const uint64_t data_size = file->map_size_ - file->data_offset_;
  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__") {
      file->metadata_ = parse_metadata(path, value);
    } else {
      file->by_name_.emplace(key, file->tensors_.size());
      file->tensors_.push_back(parse_tensor(path, key, value, data_size));
    }
  }
  check_layout(path, file->tensors_, data_size);
  return file;
}

SafetensorsFile::~SafetensorsFile() = default;

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const std::byte* SafetensorsFile::bytes(const TensorInfo& info) const {
  TPE_CHECK(info.file == path_ && info.end <= map_size_ - data_offset_,
            "tensor '{}' does not belong to {}", printable(info.name), printable(path_.string()));
  return map_ + data_offset_ + info.begin;
}

void SafetensorsFile::release(const TensorInfo& info) const { release_bytes(info.begin, info.end); }

void SafetensorsFile::release_bytes(uint64_t begin, uint64_t end) const {
  mapping_->release(data_offset_ + begin, data_offset_ + end);
}

Checkpoint Checkpoint::open(const fs::path& model_dir) {
  Checkpoint checkpoint;
  checkpoint.dir_ = model_dir;
  const fs::path index = model_dir / kIndexName;
  const fs::path single = model_dir / kSingleName;
  if (is_file(index)) {
    std::map<std::string, const SafetensorsFile*> shards;
    for (const auto& [name, shard] : read_weight_map(index)) {
      auto [it, added] = shards.emplace(shard, nullptr);
      if (added) {
        if (!is_file(model_dir / shard)) {
          fail_in(index, "shard '{}' (named for tensor '{}') is not a file in {}", printable(shard),
                  printable(name), printable(model_dir.string()));
        }
        checkpoint.files_.push_back(SafetensorsFile::open(model_dir / shard));
        it->second = checkpoint.files_.back().get();
      }
      const TensorInfo* info = it->second->find(name);
      if (info == nullptr) {
        fail_in(index, "tensor '{}' is not in shard '{}'", printable(name), printable(shard));
      }
      checkpoint.index_.emplace(name, std::pair{it->second, info});
    }
  } else if (is_file(single)) {
    checkpoint.files_.push_back(SafetensorsFile::open(single));
    const SafetensorsFile* file = checkpoint.files_.back().get();
    for (const TensorInfo& info : file->tensors()) {
      checkpoint.index_.emplace(info.name, std::pair{file, &info});
    }
  } else {
    for (const fs::path& present : {index, single}) {
      std::error_code ec;
      if (fs::exists(present, ec)) {
        fail("{}: not a regular file (a directory, FIFO, socket or device)",
             printable(present.string()));
      }
    }
    fail_in(model_dir, "no {} or {}", kSingleName, kIndexName);
  }
  return checkpoint;
}

const TensorInfo* Checkpoint::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second.second;
}

std::vector<const TensorInfo*> Checkpoint::tensors() const {
  std::vector<const TensorInfo*> out;
  out.reserve(index_.size());
  for (const auto& [name, entry] : index_) out.push_back(entry.second);
  return out;
}

void SafetensorsFile::read_f32(const TensorInfo& info, std::span<const int64_t> expected_shape,
                               const IndexSet& rows, const IndexSet& cols,
                               std::span<float> out) const {
  const std::string_view name = info.name;
  TPE_CHECK(expected_shape.size() == 1 || expected_shape.size() == 2,
            "read_f32 of '{}' with a {}-D shape", printable(name), expected_shape.size());
  TPE_CHECK(expected_shape.size() == 2 || cols.empty(), "columns of 1-D tensor '{}'",
            printable(name));
  if (info.dtype != DType::F32 && info.dtype != DType::F16 && info.dtype != DType::BF16) {
    fail("tensor '{}' in {} has dtype {}; only F32, F16 and BF16 weights are supported",
         printable(name), printable(info.file.string()), dtype_name(info.dtype));
  }
  if (!std::ranges::equal(info.shape, expected_shape)) {
    fail("tensor '{}' in {} has shape {}, expected {}", printable(name),
         printable(info.file.string()), shape_text(info.shape), shape_text(expected_shape));
  }
  const int64_t height = expected_shape[0];
  const int64_t width = expected_shape.size() == 2 ? expected_shape[1] : 1;
  const IndexSet all_rows{{0, height}};
  const IndexSet all_cols{{0, width}};
  const IndexSet& row_set = rows.empty() ? all_rows : rows;
  const IndexSet& col_set = cols.empty() ? all_cols : cols;
  check_within(row_set, height, name);
  check_within(col_set, width, name);
  TPE_CHECK(static_cast<int64_t>(out.size()) == index_count(row_set) * index_count(col_set),
            "slice of '{}' into {} floats", printable(name), out.size());
  copy_slice(info.dtype, bytes(info), width, row_set, col_set, out.data());
  // Only the rows read leave the resident set: a caller reading a tensor in pieces keeps the
  // peak near one piece.
  for (const Range& r : row_set) {
    const uint64_t row_bytes = static_cast<uint64_t>(width) * dtype_size(info.dtype);
    release_bytes(info.begin + static_cast<uint64_t>(r.begin) * row_bytes,
                  info.begin + static_cast<uint64_t>(r.end) * row_bytes);
  }
}

std::vector<float> SafetensorsFile::read_f32(const TensorInfo& info,
                                             std::span<const int64_t> expected_shape,
                                             const IndexSet& rows, const IndexSet& cols) const {
  const int64_t height = expected_shape.empty() ? 0 : expected_shape[0];
  const int64_t width = expected_shape.size() == 2 ? expected_shape[1] : 1;
  std::vector<float> out(static_cast<size_t>((rows.empty() ? height : index_count(rows)) *
                                             (cols.empty() ? width : index_count(cols))));
  read_f32(info, expected_shape, rows, cols, out);
  return out;
}

Checkpoint::Entry Checkpoint::locate(std::string_view name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) {
    fail("tensor '{}' is missing from checkpoint {}", printable(name), printable(dir_.string()));
  }
  return it->second;
}

void Checkpoint::read_f32(std::string_view name, std::span<const int64_t> expected_shape,
                          const IndexSet& rows, const IndexSet& cols, std::span<float> out) const {
  const auto [file, info] = locate(name);
  file->read_f32(*info, expected_shape, rows, cols, out);
}

std::vector<float> Checkpoint::read_f32(std::string_view name,
                                        std::span<const int64_t> expected_shape,
                                        const IndexSet& rows, const IndexSet& cols) const {
  const auto [file, info] = locate(name);
  return file->read_f32(*info, expected_shape, rows, cols);
}

}  // namespace tpe::io
