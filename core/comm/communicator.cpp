#include "core/comm/communicator.hpp"

#include <algorithm>
#include <cstring>

#include "core/common/error.hpp"

namespace tpe::comm {

ThreadGroup::ThreadGroup(int world) : world_(world), slots_(world), counts_(world) {}

void ThreadGroup::barrier() {
  std::unique_lock lock(mutex_);
  if (aborted_) fail("tensor-parallel group aborted by another rank");
  const uint64_t generation = generation_;
  if (++arrived_ == world_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
    return;
  }
  cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
  if (aborted_) fail("tensor-parallel group aborted by another rank");
}

void ThreadGroup::abort() {
  std::lock_guard lock(mutex_);
  aborted_ = true;
  cv_.notify_all();
}

bool ThreadGroup::aborted() {
  std::lock_guard lock(mutex_);
  return aborted_;
}

void ThreadGroup::all_reduce_sum(int rank, float* data, int64_t count) {
  if (world_ == 1) return;
  if (rank == 0) ++all_reduces_;
  slots_[rank] = data;
  counts_[rank] = count;
  barrier();
  for (int r = 0; r < world_; ++r) TPE_CHECK(counts_[r] == count, "all_reduce size mismatch");
  // Every rank sums in rank order into a private buffer, so all ranks get identical bits, then
  // waits until nobody reads the inputs any more before overwriting its own. Inputs are only read
  // between the two barriers, so the next collective may start right after the copy.
  std::vector<float> sum(static_cast<const float*>(slots_[0]),
                         static_cast<const float*>(slots_[0]) + count);
  for (int r = 1; r < world_; ++r) {
    const float* other = static_cast<const float*>(slots_[r]);
    for (int64_t i = 0; i < count; ++i) sum[i] += other[i];
  }
  barrier();
  std::copy(sum.begin(), sum.end(), data);
}

void ThreadGroup::all_gather(int rank, const float* data, int64_t count, float* out) {
  slots_[rank] = data;
  counts_[rank] = count;
  barrier();
  int64_t offset = 0;
  for (int r = 0; r < world_; ++r) {
    std::copy_n(static_cast<const float*>(slots_[r]), counts_[r], out + offset);
    offset += counts_[r];
  }
  barrier();
}

void ThreadGroup::broadcast(int rank, int64_t* data, int64_t count, int root) {
  slots_[rank] = data;
  barrier();
  if (rank != root) std::memcpy(data, slots_[root], sizeof(int64_t) * count);
  barrier();
}

}  // namespace tpe::comm
