#include "core/runtime/bench.hpp"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <random>

#include "core/common/error.hpp"

namespace tpe::runtime {
namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

double percentile(std::vector<double> values, double p) {
  std::sort(values.begin(), values.end());
  const size_t i = static_cast<size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(i, values.size() - 1)];
}

struct Run {
  double ttft_ms = 0;
  std::vector<double> step_ms;  // decode steps after the first token
};

Run run_once(Engine& engine, const std::vector<std::vector<int64_t>>& prompts,
             const GenerationParams& params, Engine::StepProfile* profile = nullptr) {
  const size_t last = prompts.size() - 1;
  std::vector<Clock::time_point> steps;
  const auto start = Clock::now();
  // Tokens of one step arrive in sequence order; the last sequence's token closes the step.
  engine.generate(
      prompts, params,
      [&](size_t seq, int64_t) {
        if (seq == last) steps.push_back(Clock::now());
      },
      profile);
  Run run;
  run.ttft_ms = ms_between(start, steps.front());
  for (size_t i = 1; i < steps.size(); ++i)
    run.step_ms.push_back(ms_between(steps[i - 1], steps[i]));
  return run;
}

PassProfile sum_by_label(const Engine::StepProfile& pass) {
  const std::vector<StepTime>& steps = pass.times;
  PassProfile p;
  p.tokens = pass.tokens;
  std::vector<OpTotal>& totals = p.ops;
  for (const StepTime& s : steps) {
    auto it = std::find_if(totals.begin(), totals.end(),
                           [&](const OpTotal& t) { return t.label == s.label; });
    if (it == totals.end()) it = totals.insert(totals.end(), {s.label, 0, 0.0});
    it->calls += 1;
    it->ms += s.ms;
    p.total_ms += s.ms;
  }
  std::stable_sort(totals.begin(), totals.end(),
                   [](const OpTotal& a, const OpTotal& b) { return a.ms > b.ms; });
  return p;
}

}  // namespace

BenchResult run_bench(Engine& engine, const BenchOptions& o) {
  if (o.batch < 1 || o.prompt_len < 1 || o.new_tokens < 2 || o.repeat < 1 || o.warmup < 0) {
    fail("bench needs batch >= 1, prompt length >= 1, new tokens >= 2, repeat >= 1, warmup >= 0");
  }
  const Model& model = engine.model();
  const int64_t vocab = model.graph.values[model.graph.logits].width;
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int64_t> token(0, vocab - 1);
  std::vector<std::vector<int64_t>> prompts(static_cast<size_t>(o.batch));
  for (auto& p : prompts) {
    for (int64_t i = 0; i < o.prompt_len; ++i) p.push_back(token(rng));
  }
  GenerationParams params;  // no stop tokens, so every run makes new_tokens tokens
  params.max_new_tokens = o.new_tokens;
  params.sampling = o.sampling;
  params.seed = o.seed;

  engine.reset_memory_peak();
  for (int i = 0; i < o.warmup; ++i) run_once(engine, prompts, params);
  std::vector<double> ttft, steps;
  const int64_t replays_before = engine.replays();
  for (int i = 0; i < o.repeat; ++i) {
    const Run run = run_once(engine, prompts, params);
    ttft.push_back(run.ttft_ms);
    steps.insert(steps.end(), run.step_ms.begin(), run.step_ms.end());
  }
  BenchResult r;
  r.batch = o.batch;
  r.replays = engine.replays() - replays_before;
  r.ttft_ms = percentile(ttft, 0.5);
  r.tpot_mean_ms =
      std::accumulate(steps.begin(), steps.end(), 0.0) / static_cast<double>(steps.size());
  r.tpot_p50_ms = percentile(steps, 0.5);
  r.tpot_p90_ms = percentile(steps, 0.9);
  r.decode_tokens_per_s = static_cast<double>(o.batch) / (r.tpot_mean_ms / 1e3);
  r.prefill_tokens_per_s = static_cast<double>(o.batch * o.prompt_len) / (r.ttft_ms / 1e3);
  r.weight_bytes = engine.weight_bytes();
  r.memory = engine.memory();
  if (o.profile) {  // after the timed runs, so that they are not disturbed
    Engine::StepProfile prompt, decode;
    prompt.step = 0;
    decode.step = o.new_tokens / 2;
    run_once(engine, prompts, params, &prompt);
    run_once(engine, prompts, params, &decode);
    r.prompt_profile = sum_by_label(prompt);
    r.decode_profile = sum_by_label(decode);
  }
  const int64_t largest = *std::max_element(r.weight_bytes.begin(), r.weight_bytes.end());
  r.achieved_bandwidth_gbs = static_cast<double>(largest) / (r.tpot_mean_ms / 1e3) / 1e9;
  return r;
}

}  // namespace tpe::runtime
