// What `tpengine bench` measures (shared/design/BENCHMARKS.md): time to first token, time per
// output token, decode and prefill throughput, device memory per rank split into weights, KV
// cache and workspace, achieved bandwidth (weight bytes read per decode step / step time), and
// optionally the prompt's first pass and one decode step op by op. Only generated tokens count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/runtime/engine.hpp"

namespace tpe::runtime {

struct BenchOptions {
  int64_t batch = 1;
  int64_t prompt_len = 128;
  int64_t new_tokens = 128;
  int warmup = 1;
  int repeat = 3;
  uint64_t seed = 0;        // of the random prompts, and of the sampler's draws
  bool profile = false;     // also time the prompt's first pass and the middle decode step op by op
  SamplingParams sampling;  // greedy unless do_sample (then rows go through the host sampler)
};

// The steps of a profiled forward pass with the same label (the same op in every layer), summed.
struct OpTotal {
  std::string label;
  int calls = 0;
  double ms = 0;
};

// One forward pass op by op (rank 0's): its ops largest first, and their sum (run back to back).
struct PassProfile {
  std::vector<OpTotal> ops;
  double total_ms = 0;
  int64_t tokens = 0;  // token rows of the pass
};

struct BenchResult {
  int64_t batch = 0;
  double ttft_ms = 0;                                         // median over repeats
  double tpot_mean_ms = 0, tpot_p50_ms = 0, tpot_p90_ms = 0;  // over all decode steps
  double decode_tokens_per_s = 0;     // batch x (new tokens - 1) / decode time
  double prefill_tokens_per_s = 0;    // batch x prompt_len / ttft
  std::vector<int64_t> weight_bytes;  // per rank of this process
  // Per rank of this process, after the runs: KV cache for batch x (prompt_len + new_tokens).
  std::vector<Engine::RankMemory> memory;
  double achieved_bandwidth_gbs = 0;  // largest rank's weight bytes / mean TPOT
  // Empty unless asked for: the prompt's first pass (one chunk of up to the prefill chunk's
  // tokens per sequence) and the middle decode step.
  PassProfile prompt_profile, decode_profile;
  int64_t replays = 0;  // decode steps of the timed runs replayed from a recording
};

// Runs warmup + repeat greedy generations of random prompts (never stopping early).
BenchResult run_bench(Engine& engine, const BenchOptions& options);

}  // namespace tpe::runtime
