#include "core/runtime/row_pool.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace tpe::runtime {
namespace {

// Every row runs exactly once per round, whatever the rows and threads, over many rounds of one
// pool (its workers wait between rounds, as between a generation's steps).
TEST(RowPool, EveryRowRunsOnceEachRound) {
  for (const size_t threads : {size_t{0}, size_t{1}, size_t{2}, size_t{5}}) {
    RowPool pool(threads);
    for (int round = 0; round < 200; ++round) {
      const size_t n = static_cast<size_t>(round % 37);
      std::vector<std::atomic<int>> runs(n);
      pool.run(n, [&](size_t i) { runs[i].fetch_add(1); });
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(runs[i].load(), 1)
            << "row " << i << " of " << n << ", round " << round << ", threads " << threads;
      }
    }
  }
}

// The rows run at once on all the pool's threads: each row waits (5 s at most) until every row
// has begun, which only as many threads as rows can bring about.
TEST(RowPool, RowsRunAtOnceOnEveryThread) {
  constexpr size_t kThreads = 4;
  RowPool pool(kThreads);
  for (int round = 0; round < 3; ++round) {
    std::atomic<size_t> begun{0};
    std::atomic<size_t> met{0};
    pool.run(kThreads, [&](size_t) {
      begun.fetch_add(1);
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (begun.load() < kThreads && std::chrono::steady_clock::now() < until) {
        std::this_thread::yield();
      }
      if (begun.load() == kThreads) met.fetch_add(1);
    });
    ASSERT_EQ(met.load(), kThreads) << "round " << round;
  }
}

// A row that throws does not stop the others; the first exception comes out of run() once every
// row has run, and the pool serves the next round.
TEST(RowPool, TheFirstExceptionIsRethrownAfterEveryRow) {
  RowPool pool(3);
  std::vector<std::atomic<int>> runs(50);
  try {
    pool.run(runs.size(), [&](size_t i) {
      runs[i].fetch_add(1);
      if (i % 10 == 3) throw std::runtime_error("row " + std::to_string(i));
    });
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("row ", 0), 0u) << e.what();
  }
  for (size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i].load(), 1) << "row " << i;
  std::atomic<int> after{0};
  pool.run(10, [&](size_t) { after.fetch_add(1); });
  EXPECT_EQ(after.load(), 10);
}

}  // namespace
}  // namespace tpe::runtime
