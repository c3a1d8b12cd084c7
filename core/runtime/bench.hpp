// What `tpengine bench` measures (shared/design/BENCHMARKS.md): time to first token, time per
// output token, decode and prefill throughput, weight and KV-cache bytes per rank, and achieved
// bandwidth (weight bytes read per decode step / step time) against the memory bandwidth
// measured in the same run. Only generated tokens count.
#pragma once

#include <cstdint>
#include <vector>

#include "core/runtime/engine.hpp"

namespace tpe::runtime {

struct BenchOptions {
  int64_t batch = 1;
  int64_t prompt_len = 128;
  int64_t new_tokens = 128;
  int warmup = 1;
  int repeat = 3;
  uint64_t seed = 0;  // of the random prompts
};

struct BenchResult {
  double ttft_ms = 0;                                         // median over repeats
  double tpot_mean_ms = 0, tpot_p50_ms = 0, tpot_p90_ms = 0;  // over all decode steps
  double decode_tokens_per_s = 0;       // batch x (new tokens - 1) / decode time
  double prefill_tokens_per_s = 0;      // batch x prompt_len / ttft
  std::vector<int64_t> weight_bytes;    // per rank
  std::vector<int64_t> kv_cache_bytes;  // per rank, for batch x (prompt_len + new_tokens)
  double memory_bandwidth_gbs = 0;      // measured copy bandwidth, bytes read + written
  double achieved_bandwidth_gbs = 0;    // largest rank's weight bytes / mean TPOT
};

// Runs warmup + repeat greedy generations of random prompts (never stopping early).
BenchResult run_bench(Engine& engine, const BenchOptions& options);

}  // namespace tpe::runtime
