#include "core/runtime/sampler.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace tpe {
namespace {

constexpr float kFiltered = -std::numeric_limits<float>::infinity();

void check(std::span<const float> logits, const SamplingParams& params) {
  if (logits.empty()) throw std::invalid_argument("sampler: empty logits");
  if (!(params.repetition_penalty > 0.0)) {
    throw std::invalid_argument("sampler: repetition_penalty must be > 0");
  }
  if (!params.do_sample) return;
  if (!(params.temperature > 0.0)) throw std::invalid_argument("sampler: temperature must be > 0");
  if (!(params.top_p > 0.0 && params.top_p <= 1.0)) {
    throw std::invalid_argument("sampler: top_p must be in (0, 1]");
  }
}

// Each distinct token is penalized once; ids outside the logits cannot be generated and are
// skipped, as transformers does.
void apply_repetition_penalty(std::span<float> logits, std::span<const int64_t> history,
                              double penalty) {
  const auto p = static_cast<float>(penalty);
  std::vector<bool> seen(logits.size(), false);
  for (const int64_t id : history) {
    if (id < 0 || static_cast<size_t>(id) >= logits.size() || seen[static_cast<size_t>(id)]) {
      continue;
    }
    seen[static_cast<size_t>(id)] = true;
    float& score = logits[static_cast<size_t>(id)];
    score = score < 0.0f ? score * p : score / p;
  }
}

int64_t argmax(std::span<const float> logits) {
  return std::max_element(logits.begin(), logits.end()) - logits.begin();
}

// Ties with the k-th largest logit survive, as with transformers' `scores < topk[-1]`.
void apply_top_k(std::span<float> logits, int64_t top_k) {
  const auto k = static_cast<size_t>(std::min<int64_t>(top_k, std::ssize(logits)));
  std::vector<float> sorted(logits.begin(), logits.end());
  std::nth_element(sorted.begin(), sorted.begin() + static_cast<ptrdiff_t>(k - 1), sorted.end(),
                   std::greater<>());
  const float kth = sorted[k - 1];
  for (float& l : logits) {
    if (l < kth) l = kFiltered;
  }
}

// transformers: sort ascending, softmax, cumulative sum in fp32; drop the tokens whose
// cumulative probability is <= 1 - top_p, never the highest one. torch's sort orders ties
// arbitrarily; here the lower id ranks higher among equals, so a tiny top_p keeps the token
// greedy decoding would pick.
void apply_top_p(std::span<float> logits, double top_p) {
  std::vector<size_t> order(logits.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return logits[a] < logits[b] || (logits[a] == logits[b] && a > b);
  });
  const float max_logit = logits[order.back()];
  float sum = 0.0f;
  for (const float l : logits) sum += std::exp(l - max_logit);
  const auto threshold = static_cast<float>(1.0 - top_p);
  float cumulative = 0.0f;
  for (size_t r = 0; r + 1 < order.size(); ++r) {
    float& l = logits[order[r]];
    cumulative += std::exp(l - max_logit) / sum;
    if (cumulative > threshold) break;
    l = kFiltered;
  }
}

// Inverse CDF over unnormalized softmax weights, with a uniform built from raw engine bits so
// that a seed gives the same tokens with any standard library.
int64_t draw(std::span<const float> logits, std::mt19937_64& rng) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<double> cdf(logits.size());
  double total = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    total += std::exp(double{logits[i]} - max_logit);
    cdf[i] = total;
  }
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
  const auto it = std::upper_bound(cdf.begin(), cdf.end(), u * total);
  if (it != cdf.end()) return it - cdf.begin();
  // u * total rounded up to total: take the last token that has any weight.
  return std::lower_bound(cdf.begin(), cdf.end(), total) - cdf.begin();
}

}  // namespace

int64_t Sampler::sample(std::span<float> logits, std::span<const int64_t> history,
                        const SamplingParams& params) {
  check(logits, params);
  if (params.repetition_penalty != 1.0) {
    apply_repetition_penalty(logits, history, params.repetition_penalty);
  }
  if (!params.do_sample) return argmax(logits);
  if (params.temperature != 1.0) {
    const auto t = static_cast<float>(params.temperature);
    for (float& l : logits) l /= t;
  }
  if (params.top_k > 0) apply_top_k(logits, params.top_k);
  if (params.top_p < 1.0) apply_top_p(logits, params.top_p);
  return draw(logits, rng_);
}

TokenLogprob token_logprob(std::span<const float> logits, int64_t id, int64_t k) {
  double max = -std::numeric_limits<double>::infinity();
  for (const float v : logits) max = std::max(max, static_cast<double>(v));
  double sum = 0;
  for (const float v : logits) sum += std::exp(static_cast<double>(v) - max);
  const double log_z = max + std::log(sum);
  TokenLogprob out;
  out.id = id;
  out.logprob = static_cast<double>(logits[static_cast<size_t>(id)]) - log_z;
  std::vector<int64_t> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  const auto shown =
      static_cast<std::ptrdiff_t>(std::min<size_t>(static_cast<size_t>(k), order.size()));
  std::partial_sort(order.begin(), order.begin() + shown, order.end(), [&](int64_t a, int64_t b) {
    const float x = logits[static_cast<size_t>(a)];
    const float y = logits[static_cast<size_t>(b)];
    return x > y || (x == y && a < b);
  });
  for (std::ptrdiff_t i = 0; i < shown; ++i) {
    out.top.emplace_back(
        order[static_cast<size_t>(i)],
        static_cast<double>(logits[static_cast<size_t>(order[static_cast<size_t>(i)])]) - log_z);
  }
  return out;
}

bool all_finite(std::span<const float> logits) {
  uint32_t special = 0;  // an exponent of all ones: Inf or NaN
  for (const float x : logits) {
    special |= static_cast<uint32_t>((std::bit_cast<uint32_t>(x) & 0x7f800000u) == 0x7f800000u);
  }
  return special == 0;
}

}  // namespace tpe
