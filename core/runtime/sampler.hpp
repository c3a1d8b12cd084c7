// Picks the next token from a row of logits, as transformers' generate does: repetition penalty
// over the prompt and the tokens so far, then greedy argmax (first index of the maximum), or
// temperature, top-k, top-p and a draw from the softmax with the sampler's own seeded generator.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <utility>
#include <vector>

namespace tpe {

// The defaults are transformers' for a key that neither the user nor generation_config.json sets
// (GenerationConfig._get_default_generation_params): sampling keeps the 50 most likely tokens.
struct SamplingParams {
  bool do_sample = false;
  double temperature = 1.0;         // > 0
  int64_t top_k = 50;               // 0 = off
  double top_p = 1.0;               // in (0, 1]; 1 = off
  double repetition_penalty = 1.0;  // 1 = off
};

class Sampler {
 public:
  explicit Sampler(uint64_t seed) : rng_(seed) {}
  // logits is modified in place (repetition penalty, temperature); history: the sequence's prompt
  // and generated tokens.
  int64_t sample(std::span<float> logits, std::span<const int64_t> history,
                 const SamplingParams& params);
  // The token sample() would draw from a whole row of `vocab` logits, given only the row's
  // largest: `values` and their `ids`, in any order, every logit left out being at most their
  // smallest (the LM head's candidates, Backend::top_rows). nullopt, with the generator untouched,
  // where they cannot decide it: not sampling, a repetition penalty, no top-k filter or one that
  // keeps as many tokens as there are candidates, or logits equal to the top_k-th largest that may
  // go on outside the candidates.
  std::optional<int64_t> sample_top(std::span<const float> values, std::span<const int32_t> ids,
                                    int64_t vocab, const SamplingParams& params);

 private:
  // Temperature, top-k, top-p and the draw over logits (changed in place): an index into them.
  int64_t draw_filtered(std::span<float> logits, const SamplingParams& params);

  std::mt19937_64 rng_;
};

// A chosen token's log-probability under the model (log-softmax of the raw logits, before the
// repetition penalty, temperature and top-k/top-p), and the k most likely tokens, best first
// (ties: the lower id first).
struct TokenLogprob {
  int64_t id = 0;
  double logprob = 0;
  std::vector<std::pair<int64_t, double>> top;
};
TokenLogprob token_logprob(std::span<const float> logits, int64_t id, int64_t k);

// Whether every logit is finite (no NaN, no Inf): one pass over the bits, which vectorizes.
bool all_finite(std::span<const float> logits);

}  // namespace tpe
