#include "core/runtime/random_weights.hpp"

#include <cmath>

#include "core/common/error.hpp"

namespace tpe::runtime {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t fnv1a(std::string_view text) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : text) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

}  // namespace

void random_weights(uint64_t seed, std::string_view name, std::span<const int64_t> shape,
                    const IndexSet& rows, const IndexSet& cols, std::span<float> out) {
  const int64_t height = shape[0];
  const int64_t width = shape.size() == 2 ? shape[1] : 1;
  const IndexSet all_rows{{0, height}}, all_cols{{0, width}};
  const IndexSet& row_set = rows.empty() ? all_rows : rows;
  const IndexSet& col_set = cols.empty() ? all_cols : cols;
  float center = 0, spread = 1.0f / std::sqrt(static_cast<float>(width));
  if (shape.size() == 1) {
    const bool is_bias = name.ends_with(".bias");
    center = is_bias ? 0.0f : 1.0f;
    spread = is_bias ? 0.02f : 0.1f;
  }
  const uint64_t key = splitmix64(seed ^ fnv1a(name));
  TPE_CHECK(static_cast<int64_t>(out.size()) == index_count(row_set) * index_count(col_set),
            "random slice of '{}' into {} floats", printable(name), out.size());
  float* next = out.data();
  for (const Range& r : row_set) {
    for (int64_t i = r.begin; i < r.end; ++i) {
      for (const Range& c : col_set) {
        for (int64_t j = c.begin; j < c.end; ++j) {
          const uint64_t bits = splitmix64(key + static_cast<uint64_t>(i * width + j));
          const float unit = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // [0, 1)
          *next++ = center + spread * (2.0f * unit - 1.0f);
        }
      }
    }
  }
}

}  // namespace tpe::runtime
