#include "core/runtime/kv_cache.hpp"

#include "core/common/error.hpp"

namespace tpe::runtime {

void KvCache::reserve(backend::Backend& backend, const std::vector<int64_t>& widths, int slots,
                      int64_t capacity) {
  const bool fits = slots <= slots_ && capacity <= capacity_ && layers_.size() == widths.size();
  if (!fits) {
    layers_.clear();  // frees the old memory before the new is taken
    for (const int64_t width : widths) {
      layers_.push_back({backend.alloc(slots * capacity, width),
                         backend.alloc(slots * capacity, width), capacity});
    }
    slots_ = slots;
    capacity_ = capacity;
    ++generation_;
  }
  lengths_.assign(static_cast<size_t>(slots_), 0);
}

void KvCache::release() {
  layers_.clear();
  lengths_.clear();
  slots_ = 0;
  capacity_ = 0;
  ++generation_;
}

int64_t KvCache::bytes(int64_t element_bytes) const {
  int64_t n = 0;
  for (const backend::KvLayer& l : layers_) n += (l.k.rows * l.k.cols + l.v.rows * l.v.cols);
  return n * element_bytes;
}

void KvCache::check(const backend::Batch& batch) const {
  for (const backend::Batch::Segment& s : batch.segments) {
    if (s.slot < 0 || s.slot >= slots_) {
      fail("sequence slot {} is outside the KV cache's {} slots", s.slot, slots_);
    }
    if (s.start_pos != lengths_[static_cast<size_t>(s.slot)]) {
      fail("sequence {} continues at position {}, but its KV cache holds {} tokens", s.slot,
           s.start_pos, lengths_[static_cast<size_t>(s.slot)]);
    }
    if (s.start_pos + s.count > capacity_) {
      fail("sequence {} reaches {} tokens, beyond the {} the KV cache was sized for", s.slot,
           s.start_pos + s.count, capacity_);
    }
  }
}

void KvCache::advance(const backend::Batch& batch) {
  for (const backend::Batch::Segment& s : batch.segments) {
    lengths_[static_cast<size_t>(s.slot)] = s.start_pos + s.count;
  }
}

}  // namespace tpe::runtime
