// Which features (rows of a weight, columns of an activation) a rank owns: an ordered list of
// half-open ranges over the full dimension. Every split in the engine is one of these, so the
// loader, the planner and the executor share one description of a shard.
#pragma once

#include <cstdint>
#include <vector>

namespace tpe {

struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const Range&) const = default;
};

using IndexSet = std::vector<Range>;

inline int64_t index_count(const IndexSet& set) {
  int64_t n = 0;
  for (const Range& r : set) n += r.size();
  return n;
}

// Appends [begin, end), merging with the last range when contiguous.
inline void index_append(IndexSet& set, int64_t begin, int64_t end) {
  if (begin >= end) return;
  if (!set.empty() && set.back().end == begin) {
    set.back().end = end;
  } else {
    set.push_back({begin, end});
  }
}

// Units [first, first + count) of set (counted in the set's order) as ranges of the full
// dimension: a piece of a shard.
inline IndexSet index_slice(const IndexSet& set, int64_t first, int64_t count) {
  IndexSet out;
  for (const Range& r : set) {
    if (count <= 0) break;
    if (first >= r.size()) {
      first -= r.size();
      continue;
    }
    const int64_t begin = r.begin + first;
    const int64_t end = begin + count < r.end ? begin + count : r.end;
    index_append(out, begin, end);
    count -= end - begin;
    first = 0;
  }
  return out;
}

// Deals n units out to world ranks, earlier ranks getting one more when n % world != 0.
// Returns rank's [first, last) unit.
inline Range deal(int64_t n, int world, int rank) {
  const int64_t base = n / world;
  const int64_t extra = n % world;
  const int64_t first = rank * base + (rank < extra ? rank : extra);
  return {first, first + base + (rank < extra ? 1 : 0)};
}

}  // namespace tpe
