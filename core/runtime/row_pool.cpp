#include "core/runtime/row_pool.hpp"

#include <utility>

namespace tpe::runtime {

RowPool::RowPool(size_t threads) {
  for (size_t t = 1; t < threads; ++t) workers_.emplace_back([this] { serve(); });
}

RowPool::~RowPool() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void RowPool::run(size_t n, const std::function<void(size_t)>& fn) {
  if (workers_.empty() || n <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    busy_ = workers_.size();
    ++round_;
  }
  wake_.notify_all();
  work();
  std::unique_lock lock(mutex_);
  idle_.wait(lock, [&] { return busy_ == 0; });  // every worker has left this round's rows
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void RowPool::work() {
  for (size_t i = next_++; i < n_; i = next_++) {
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void RowPool::serve() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || round_ != seen; });
      if (stop_) return;
      seen = round_;
    }
    work();
    std::lock_guard lock(mutex_);
    if (--busy_ == 0) idle_.notify_one();
  }
}

}  // namespace tpe::runtime
