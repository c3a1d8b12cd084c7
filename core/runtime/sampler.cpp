#include "core/runtime/sampler.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <utility>
#include <vector>

namespace tpe {
namespace {

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

// top-k and top-p select the most likely tokens without sorting the vocabulary (a sort of 32k
// ids took 8 ms per row, longer than a decode step on a GPU): each candidate is one 64-bit key,
// its logit's bits made to order as unsigned integers above the complement of its id, so that a
// larger key is a larger logit or, among equal logits, the lower id; selection and the sort of
// the few selected run over contiguous keys.
uint64_t rank_key(float logit, uint32_t id) {
  const uint32_t bits = std::bit_cast<uint32_t>(logit);
  const uint32_t ordered = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return uint64_t{ordered} << 32 | (0xffffffffu - id);
}

uint32_t id_of(uint64_t key) { return 0xffffffffu - static_cast<uint32_t>(key); }

// Ties with the k-th largest logit survive, as with transformers' `scores < topk[-1]`.
void apply_top_k(std::span<const float> logits, int64_t top_k, std::vector<uint64_t>& keys) {
  const auto k = static_cast<ptrdiff_t>(std::min<int64_t>(top_k, std::ssize(keys)));
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<>());
  const float kth = logits[id_of(keys[static_cast<size_t>(k - 1)])];
  std::erase_if(keys, [&](uint64_t key) { return logits[id_of(key)] < kth; });
}

// transformers drops the tokens whose cumulative probability, summed from the least likely up,
// is <= 1 - top_p, never the most likely one: what stays is the shortest run of the most likely
// tokens whose probabilities add up to at least top_p (fp32 weights summed in double here;
// transformers' fp32 scan on the GPU rounds differently, so a token on the boundary may go either
// way in either). Among equal logits the lower id ranks higher, so a tiny top_p keeps the token
// greedy decoding would pick.
void apply_top_p(std::span<const float> logits, double top_p, std::vector<uint64_t>& keys) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (const uint64_t key : keys) max_logit = std::max(max_logit, logits[id_of(key)]);
  const auto weight = [&](uint64_t key) { return std::exp(logits[id_of(key)] - max_logit); };
  double total = 0.0;
  for (const uint64_t key : keys) total += weight(key);
  // Weighted quickselect: keys[0, lo) are kept (their mass is `kept`), the cut lies in [lo, hi).
  // Each round splits the range at a pivot and keeps to the side holding the cut, so a flat
  // distribution (a nucleus of most of the vocabulary) costs a few passes, not a sort.
  const double need = top_p * total;
  double kept = 0.0;
  size_t lo = 0;
  size_t hi = keys.size();
  while (hi - lo > 64) {
    const uint64_t a = keys[lo], b = keys[lo + (hi - lo) / 2], c = keys[hi - 1];
    const uint64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median
    const auto mid = static_cast<size_t>(std::partition(keys.begin() + static_cast<ptrdiff_t>(lo),
                                                        keys.begin() + static_cast<ptrdiff_t>(hi),
                                                        [&](uint64_t key) { return key > pivot; }) -
                                         keys.begin());
    double upper = 0.0;
    for (size_t i = lo; i < mid; ++i) upper += weight(keys[i]);
    if (kept + upper >= need) {
      hi = mid;  // the cut is above the pivot (mid > lo: the mass there is positive)
    } else {
      kept += upper;
      lo = mid;  // everything above the pivot stays; keys are distinct, so the pivot is in here
    }
  }
  std::sort(keys.begin() + static_cast<ptrdiff_t>(lo), keys.begin() + static_cast<ptrdiff_t>(hi),
            std::greater<>());
  for (size_t i = lo; i < hi; ++i) {
    kept += weight(keys[i]);
    if (kept >= need || i + 1 == hi) {
      keys.resize(i + 1);
      return;
    }
  }
}

// Inverse CDF over the tokens' unnormalized softmax weights (fp32, as transformers' softmax;
// summed in double) in id order, ids[i] giving the i-th token (all of them when ids is empty),
// with a uniform built from raw engine bits so that a seed gives the same tokens with any
// standard library.
int64_t draw(std::span<const float> logits, std::span<const uint32_t> ids, std::mt19937_64& rng,
             std::vector<double>& cdf) {
  const size_t n = ids.empty() ? logits.size() : ids.size();
  const auto logit = [&](size_t i) { return ids.empty() ? logits[i] : logits[ids[i]]; };
  float max_logit = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) max_logit = std::max(max_logit, logit(i));
  cdf.resize(n);
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    total += std::exp(logit(i) - max_logit);
    cdf[i] = total;
  }
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
  auto it = std::upper_bound(cdf.begin(), cdf.end(), u * total);
  // u * total rounded up to total: take the last token that has any weight.
  if (it == cdf.end()) it = std::lower_bound(cdf.begin(), cdf.end(), total);
  const auto i = static_cast<size_t>(it - cdf.begin());
  return ids.empty() ? static_cast<int64_t>(i) : ids[i];
}

}  // namespace

int64_t Sampler::sample(std::span<float> logits, std::span<const int64_t> history,
                        const SamplingParams& params) {
  check(logits, params);
  if (params.repetition_penalty != 1.0) {
    apply_repetition_penalty(logits, history, params.repetition_penalty);
  }
  if (!params.do_sample) return argmax(logits);
  return draw_filtered(logits, params);
}

std::optional<int64_t> Sampler::sample_top(std::span<const float> values,
                                           std::span<const int32_t> ids, int64_t vocab,
                                           const SamplingParams& params) {
  check(values, params);
  const auto n = static_cast<int64_t>(values.size());
  if (!params.do_sample || params.repetition_penalty != 1.0 || ids.size() != values.size() ||
      n > vocab) {
    return std::nullopt;
  }
  thread_local std::vector<std::pair<int32_t, float>> by_id;
  by_id.clear();
  for (size_t i = 0; i < values.size(); ++i) by_id.emplace_back(ids[i], values[i]);
  if (n < vocab) {
    // Every logit left out is at most the candidates' smallest; after the temperature (which
    // keeps the order but may make neighbours equal) the top_k-th largest must stay above it, so
    // that top-k drops all of them, and the candidates equal to the smallest too.
    if (params.top_k <= 0 || params.top_k >= n) return std::nullopt;
    thread_local std::vector<float> sorted;
    sorted.assign(values.begin(), values.end());
    std::nth_element(sorted.begin(), sorted.begin() + (params.top_k - 1), sorted.end(),
                     std::greater<>());
    const float t = static_cast<float>(params.temperature);
    const float kth = sorted[static_cast<size_t>(params.top_k - 1)];
    const float least = *std::min_element(sorted.begin(), sorted.end());
    if (!(params.temperature == 1.0 ? kth > least : kth / t > least / t)) return std::nullopt;
  }
  // In id order, so that equal logits rank and add up as they do over the whole row.
  std::sort(by_id.begin(), by_id.end());
  thread_local std::vector<float> compact;
  compact.clear();
  for (const auto& [id, value] : by_id) compact.push_back(value);
  return by_id[static_cast<size_t>(draw_filtered(compact, params))].first;
}

int64_t Sampler::draw_filtered(std::span<float> logits, const SamplingParams& params) {
  if (params.temperature != 1.0) {
    const auto t = static_cast<float>(params.temperature);
    for (float& l : logits) l /= t;
  }
  // A vocabulary's worth of scratch per thread, not per sampler (a generation has a sampler per
  // sequence, and its rows are sampled on several threads).
  thread_local std::vector<uint64_t> keys;
  thread_local std::vector<uint32_t> kept;
  thread_local std::vector<uint8_t> mask;
  thread_local std::vector<double> cdf;
  kept.clear();
  if (params.top_k > 0 || params.top_p < 1.0) {
    keys.resize(logits.size());
    for (size_t i = 0; i < logits.size(); ++i)
      keys[i] = rank_key(logits[i], static_cast<uint32_t>(i));
    if (params.top_k > 0) apply_top_k(logits, params.top_k, keys);
    if (params.top_p < 1.0) apply_top_p(logits, params.top_p, keys);
    // The kept ids in ascending order by a pass over a mask (a nucleus may be most of the
    // vocabulary: no sort).
    mask.assign(logits.size(), 0);
    for (const uint64_t key : keys) mask[id_of(key)] = 1;
    for (uint32_t id = 0; id < mask.size(); ++id) {
      if (mask[id] != 0) kept.push_back(id);
    }
  }
  return draw(logits, kept, rng_, cdf);
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
