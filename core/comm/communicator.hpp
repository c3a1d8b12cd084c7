// Collectives between the ranks of one tensor-parallel group. ThreadGroup: ranks are threads of
// one process sharing memory. Results are identical on every rank (sums in rank order). A rank
// that fails calls abort(), which wakes every waiting rank with a tpe::Error instead of leaving
// it blocked forever.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

namespace tpe::comm {

class ThreadGroup {
 public:
  explicit ThreadGroup(int world);
  int world() const { return world_; }

  // Sums `count` floats of every rank in place.
  void all_reduce_sum(int rank, float* data, int64_t count);
  // Concatenates every rank's `count` floats (counts may differ) into out, in rank order.
  void all_gather(int rank, const float* data, int64_t count, float* out);
  // Copies root's `count` values to every rank.
  void broadcast(int rank, int64_t* data, int64_t count, int root);
  // Makes every current and future wait throw.
  void abort();
  bool aborted();

  int64_t all_reduce_count() const { return all_reduces_; }  // calls by rank 0

 private:
  void barrier();
  int world_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
  std::vector<const void*> slots_;
  std::vector<int64_t> counts_;
  int64_t all_reduces_ = 0;
};

}  // namespace tpe::comm
