// A rank's KV cache as an object: for every attention layer of its program, keys and values of
// `slots` sequences of up to `capacity` tokens, and how many tokens each sequence holds. Memory
// is kept across generations while it is large enough (a replayed decode step refers to it);
// `generation()` changes whenever it moves. Sequences address it by (slot, position) today; a
// paged layout would replace the slot's contiguous rows with a block table behind the same
// interface. Owns: cache memory and lengths. May not touch: what a layer computes.
#pragma once

#include <cstdint>
#include <vector>

#include "core/backend/backend.hpp"
#include "core/program/program.hpp"

namespace tpe::runtime {

class KvCache {
 public:
  // Room for `slots` sequences of up to `capacity` tokens (and, in cross-attention layers,
  // `second_capacity` tokens of the second stream), every sequence empty. Keeps the memory when
  // it already has that room.
  void reserve(backend::Backend& backend, const std::vector<program::Program::CacheLayer>& layers,
               int slots, int64_t capacity, int64_t second_capacity = 0);
  void release();

  int slots() const { return slots_; }
  int64_t capacity() const { return capacity_; }
  int64_t length(int slot) const { return lengths_.at(static_cast<size_t>(slot)); }
  int64_t second_length(int slot) const { return second_lengths_.at(static_cast<size_t>(slot)); }
  uint64_t generation() const { return generation_; }
  int64_t bytes(int64_t element_bytes) const;
  backend::KvLayer& layer(int i) { return layers_.at(static_cast<size_t>(i)); }

  // Fails unless every segment of the batch continues its sequence where it stands and fits.
  void check(const backend::Batch& batch) const;
  // After a pass: the batch's tokens are in the cache.
  void advance(const backend::Batch& batch);

 private:
  std::vector<backend::KvLayer> layers_;
  std::vector<int64_t> lengths_, second_lengths_;
  int slots_ = 0;
  int64_t capacity_ = 0, second_capacity_ = 0;
  bool has_cross_ = false;
  uint64_t generation_ = 0;
};

}  // namespace tpe::runtime
