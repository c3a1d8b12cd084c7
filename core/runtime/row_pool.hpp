#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tpe::runtime {

// fn(0), ..., fn(n - 1) on a fixed set of threads, the caller's among them: the rows of logits a
// generation samples on the host, whose work is each its own (a vocabulary of 32k-256k takes a
// core 0.3-5 ms, which a batch would otherwise add up while the device waits). The threads start
// once, for a generation: started for every step they cost about 1.5 ms a step at batch 32 (7B
// top-k sampling on an H200's host, 7.10 against 5.59 ms). The first exception a row throws is
// rethrown after every row has run.
class RowPool {
 public:
  explicit RowPool(size_t threads);  // threads - 1 workers; 0 or 1: run() on the caller alone
  RowPool(const RowPool&) = delete;
  RowPool& operator=(const RowPool&) = delete;
  ~RowPool();

  void run(size_t n, const std::function<void(size_t)>& fn);

 private:
  void work();
  void serve();

  std::mutex mutex_;
  std::condition_variable wake_;  // a round has begun, or the pool ends
  std::condition_variable idle_;  // the last worker has finished its round
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  uint64_t round_ = 0;
  size_t busy_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> workers_;
};

}  // namespace tpe::runtime
