// The all-reduce on this machine's GPUs, one process driving them as `tpengine --tp N` does (a
// thread and a CudaBackend per GPU): NCCL beside the one-shot kernel over peer memory
// (inference.all_reduce = "auto"), per message size, 100 calls recorded as one CUDA graph per rank
// as a decode step records them, replayed 5 times after a warm-up. Each result is checked first
// (rank r contributes r + 1 everywhere). Needs 2 GPUs; it is no test.
//   tpe_gpu_collectives_bench            every TP size of 2, 4, 8 the GPUs allow
#include <cuda_runtime_api.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "core/common/tensor.hpp"
#include "core/cuda/cuda_backend.hpp"

namespace {

using tpe::backend::Buffer;
using tpe::backend::CudaBackend;

constexpr int kCalls = 100, kReplays = 5;

// Microseconds per all-reduce of `elements` bf16 values on every rank (rank 0's clock), or -1
// when a result was wrong or a rank failed (printed; the others then give up waiting).
double time_all_reduce(std::vector<std::unique_ptr<CudaBackend>>& ranks,
                       tpe::comm::ThreadGroup& group, int64_t elements) {
  const int world = static_cast<int>(ranks.size());
  std::barrier start(world);
  std::vector<double> us(static_cast<size_t>(world));
  std::vector<std::string> errors(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      bool arrived = false;
      try {
        CudaBackend& b = *ranks[r];
        b.bind_thread();
        Buffer x = b.load(1, elements, [r](int64_t, int64_t, std::span<float> out) {
          std::fill(out.begin(), out.end(), static_cast<float>(r + 1));
        });
        b.end_loading();
        b.all_reduce(x);
        const float expected = static_cast<float>(world * (world + 1) / 2);
        const tpe::Tensor sum = b.to_host(x);
        for (const float v : sum.data) {
          if (v != expected) {
            errors[r] = "rank " + std::to_string(r) + ": " + std::to_string(v) + " where " +
                        std::to_string(expected);
            break;
          }
        }
        b.record_begin();
        for (int i = 0; i < kCalls; ++i) b.all_reduce(x);
        b.record_end(0);
        b.replay(0);  // warm-up
        const Buffer one = b.alloc(1, 1);
        b.to_host(one);
        start.arrive_and_wait();
        arrived = true;
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < kReplays; ++i) b.replay(0);
        b.to_host(one);
        us[r] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                    .count() /
                (kCalls * kReplays);
        b.forget_recordings();
      } catch (const std::exception& e) {
        errors[r] = e.what();
        group.abort();                          // ranks waiting in a collective give up
        if (!arrived) start.arrive_and_drop();  // and those at the start go on
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::string& e : errors) {
    if (!e.empty()) {
      std::printf("  FAILED: %s\n", e.c_str());
      return -1;
    }
  }
  return us[0];
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 2) {
    std::printf("tpe_gpu_collectives_bench: needs 2 GPUs, found %d\n", count);
    return 1;
  }
  const std::vector<int64_t> sizes = {4096, 16384, 65536, 262144, 524288, 2097152};
  int status = 0;
  for (const int world : {2, 4, 8}) {
    if (world > count) break;
    std::printf("TP %d, bf16, %d calls per graph, us per all-reduce:\n", world, kCalls);
    std::printf("| bytes | NCCL | one-shot (auto) |\n| --- | --- | --- |\n");
    std::vector<std::vector<double>> table(sizes.size());
    for (const bool peer : {false, true}) {
      tpe::backend::NcclGroup nccl(world);
      tpe::comm::ThreadGroup group(world);
      std::vector<std::unique_ptr<CudaBackend>> ranks;
      for (int r = 0; r < world; ++r) {
        ranks.push_back(
            std::make_unique<CudaBackend>(r, r, tpe::cuda::DType::kBF16, &nccl, group, peer));
      }
      std::vector<std::string> how(static_cast<size_t>(world));
      std::vector<std::thread> threads;
      for (int r = 0; r < world; ++r) {
        threads.emplace_back([&, r] {
          ranks[r]->bind_thread();
          how[r] = ranks[r]->connect();
        });
      }
      for (std::thread& t : threads) t.join();
      std::printf("<!-- %s: %s -->\n", peer ? "auto" : "nccl", how[0].c_str());
      for (size_t i = 0; i < sizes.size(); ++i) {
        table[i].push_back(time_all_reduce(ranks, group, sizes[i]));
        if (table[i].back() < 0) status = 1;
      }
    }
    for (size_t i = 0; i < sizes.size(); ++i) {
      std::printf("| %lld | %.1f | %.1f |\n", static_cast<long long>(sizes[i] * 2), table[i][0],
                  table[i][1]);
    }
    std::printf("\n");
  }
  return status;
}
