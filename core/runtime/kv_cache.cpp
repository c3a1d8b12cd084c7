#include "core/runtime/kv_cache.hpp"

#include "core/common/error.hpp"

namespace tpe::runtime {

void KvCache::reserve(backend::Backend& backend,
                      const std::vector<program::Program::CacheLayer>& layers, int slots,
                      int64_t capacity, int64_t second_capacity) {
  has_cross_ = false;
  for (const auto& l : layers) has_cross_ = has_cross_ || l.cross;
  if (!has_cross_) second_capacity = 0;
  const bool fits = slots <= slots_ && capacity <= capacity_ &&
                    second_capacity <= second_capacity_ && layers_.size() == layers.size();
  if (!fits) {
    layers_.clear();  // frees the old memory before the new is taken
    for (const auto& l : layers) {
      const int64_t len = l.cross ? second_capacity : capacity;
      layers_.push_back(
          {backend.alloc(slots * len, l.width), backend.alloc(slots * len, l.width), len});
    }
    slots_ = slots;
    capacity_ = capacity;
    second_capacity_ = second_capacity;
    ++generation_;
  }
  lengths_.assign(static_cast<size_t>(slots_), 0);
  second_lengths_.assign(static_cast<size_t>(slots_), 0);
}

void KvCache::release() {
  layers_.clear();
  lengths_.clear();
  second_lengths_.clear();
  slots_ = 0;
  capacity_ = 0;
  second_capacity_ = 0;
  ++generation_;
}

int64_t KvCache::bytes(int64_t element_bytes) const {
  int64_t n = 0;
  for (const backend::KvLayer& l : layers_) n += (l.k.rows * l.k.cols + l.v.rows * l.v.cols);
  return n * element_bytes;
}

namespace {

void check_stream(const std::vector<backend::Batch::Segment>& segments,
                  const std::vector<int64_t>& lengths, int slots, int64_t capacity,
                  const char* stream) {
  for (const backend::Batch::Segment& s : segments) {
    if (s.slot < 0 || s.slot >= slots) {
      fail("{}sequence slot {} is outside the KV cache's {} slots", stream, s.slot, slots);
    }
    if (s.start_pos != lengths[static_cast<size_t>(s.slot)]) {
      fail("{}sequence {} continues at position {}, but its KV cache holds {} tokens", stream,
           s.slot, s.start_pos, lengths[static_cast<size_t>(s.slot)]);
    }
    if (s.start_pos + s.count > capacity) {
      fail("{}sequence {} reaches {} tokens, beyond the {} the KV cache was sized for", stream,
           s.slot, s.start_pos + s.count, capacity);
    }
  }
}

}  // namespace

void KvCache::check(const backend::Batch& batch) const {
  check_stream(batch.segments, lengths_, slots_, capacity_, "");
  if (!has_cross_) {
    if (!batch.second.tokens.empty()) fail("a second token stream, but the model reads none");
    return;
  }
  check_stream(batch.second.segments, second_lengths_, slots_, second_capacity_, "second stream: ");
  std::vector<int64_t> after = second_lengths_;
  for (const backend::Batch::Segment& s : batch.second.segments) {
    after[static_cast<size_t>(s.slot)] = s.start_pos + s.count;
  }
  for (const backend::Batch::Segment& s : batch.segments) {
    if (s.second_len != after[static_cast<size_t>(s.slot)] || s.second_len == 0) {
      fail("sequence {} attends to {} second-stream tokens, but its cache holds {}", s.slot,
           s.second_len, after[static_cast<size_t>(s.slot)]);
    }
  }
}

void KvCache::advance(const backend::Batch& batch) {
  for (const backend::Batch::Segment& s : batch.segments) {
    lengths_[static_cast<size_t>(s.slot)] = s.start_pos + s.count;
  }
  for (const backend::Batch::Segment& s : batch.second.segments) {
    second_lengths_[static_cast<size_t>(s.slot)] = s.start_pos + s.count;
  }
}

}  // namespace tpe::runtime
