// Random weights for any config.json, so that a model's speed can be measured without its
// checkpoint (tpengine bench --random-weights). Every element is a pure function of the seed,
// the tensor's name and the element's index, so each rank's slice is exactly the corresponding
// part of one full random tensor: a random model gives the same tokens at every TP size.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "core/common/index_set.hpp"

namespace tpe::runtime {

// The slice (rows x cols of a tensor of `shape`, empty sets meaning all) of random tensor
// `name`: matrices uniform in +-1/sqrt(columns), 1-D ".weight" tensors (norm scales) near 1,
// 1-D biases near 0. `out` must hold exactly the slice.
void random_weights(uint64_t seed, std::string_view name, std::span<const int64_t> shape,
                    const IndexSet& rows, const IndexSet& cols, std::span<float> out);

}  // namespace tpe::runtime
