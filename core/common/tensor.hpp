// The engine's tensor: a row-major fp32 host array with a shape. The CPU backend computes in
// fp32 whatever the checkpoint's dtype; activations are [tokens, width], weights [out, in].
#pragma once

#include <cstdint>
#include <vector>

namespace tpe {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> dims) : shape(std::move(dims)) { data.assign(numel(), 0.f); }

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return shape.empty() ? 0 : n;
  }
  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.empty() ? 0 : numel() / shape[0]; }
  float* row(int64_t i) { return data.data() + i * cols(); }
  const float* row(int64_t i) const { return data.data() + i * cols(); }
};

}  // namespace tpe
