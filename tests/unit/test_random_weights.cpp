// Random weights are a pure function of (seed, name, index): a slice equals the same part of the
// full tensor, so every TP size sees one model.
#include <gtest/gtest.h>

#include "core/common/error.hpp"
#include "core/runtime/random_weights.hpp"

namespace tpe {
namespace {

// The slice as a vector; a wrong output size is an error.
std::vector<float> random_weights(uint64_t seed, std::string_view name,
                                  const std::vector<int64_t>& shape, const IndexSet& rows,
                                  const IndexSet& cols) {
  const int64_t width = shape.size() == 2 ? shape[1] : 1;
  std::vector<float> out(static_cast<size_t>((rows.empty() ? shape[0] : index_count(rows)) *
                                             (cols.empty() ? width : index_count(cols))));
  runtime::random_weights(seed, name, shape, rows, cols, out);
  return out;
}

TEST(RandomWeights, SlicesArePartsOfTheFullTensor) {
  const std::vector<int64_t> shape = {10, 7};
  const std::vector<float> full = random_weights(3, "w", shape, {}, {});
  ASSERT_EQ(full.size(), 70u);
  const std::vector<float> part = random_weights(3, "w", shape, {{2, 4}, {8, 9}}, {{1, 3}, {6, 7}});
  const int64_t rows[] = {2, 3, 8}, cols[] = {1, 2, 6};
  size_t k = 0;
  for (int64_t r : rows) {
    for (int64_t c : cols) EXPECT_EQ(part[k++], full[r * 7 + c]) << r << "," << c;
  }
}

TEST(RandomWeights, DependOnSeedAndNameWithSensibleScales) {
  const std::vector<int64_t> matrix = {64, 256}, vector = {256};
  const auto a = random_weights(1, "layer.weight", matrix, {}, {});
  EXPECT_NE(a, random_weights(2, "layer.weight", matrix, {}, {}));
  EXPECT_NE(a, random_weights(1, "other.weight", matrix, {}, {}));
  for (float v : a) EXPECT_LE(std::abs(v), 1.0f / 16.0f);  // 1/sqrt(256)
  for (float v : random_weights(1, "norm.weight", vector, {}, {})) EXPECT_NEAR(v, 1.0f, 0.1f);
  for (float v : random_weights(1, "proj.bias", vector, {}, {})) EXPECT_NEAR(v, 0.0f, 0.02f);
}

TEST(RandomWeights, OutputOfTheWrongSizeIsRefused) {
  std::vector<float> out(5);
  EXPECT_THROW(runtime::random_weights(1, "w", std::vector<int64_t>{2, 3}, {}, {}, out), Error);
}

}  // namespace
}  // namespace tpe
