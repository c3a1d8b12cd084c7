// The sampler against transformers' logits processors. Reference values come from
// transformers 5.23 (see the snippets by each test); draws are checked statistically, since
// the generator is ours, not torch's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <set>
#include <vector>

#include "core/backend/cpu_backend.hpp"
#include "core/runtime/engine.hpp"
#include "core/runtime/sampler.hpp"

namespace {

using tpe::Sampler;
using tpe::SamplingParams;

SamplingParams Sampling(double temperature = 1.0, int64_t top_k = 0, double top_p = 1.0) {
  SamplingParams p;
  p.do_sample = true;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  return p;
}

int64_t Sample(Sampler& sampler, std::vector<float> logits, const SamplingParams& params,
               const std::vector<int64_t>& history = {}) {
  return sampler.sample(logits, history, params);
}

// Frequencies of `draws` samples from the same logits.
std::vector<double> Frequencies(const std::vector<float>& logits, const SamplingParams& params,
                                const std::vector<int64_t>& history, int draws) {
  Sampler sampler(1234);
  std::vector<double> freq(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) {
    freq[static_cast<size_t>(Sample(sampler, logits, params, history))] += 1.0 / draws;
  }
  return freq;
}

// Within five standard deviations of a binomial proportion; exact zeros must stay zero.
void ExpectFrequencies(const std::vector<double>& freq, const std::vector<double>& probs,
                       int draws) {
  ASSERT_EQ(freq.size(), probs.size());
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] == 0.0) {
      EXPECT_EQ(freq[i], 0.0) << "filtered token " << i << " was drawn";
    } else {
      EXPECT_NEAR(freq[i], probs[i], 5.0 * std::sqrt(probs[i] * (1 - probs[i]) / draws))
          << "token " << i;
    }
  }
}

std::vector<float> RandomLogits(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

int64_t ArgMax(const std::vector<float>& v) {
  return std::max_element(v.begin(), v.end()) - v.begin();
}

TEST(Sampler, GreedyPicksFirstMaximum) {
  Sampler sampler(0);
  EXPECT_EQ(Sample(sampler, {1.0f, 5.0f, 3.0f, 5.0f}, SamplingParams{}), 1);
}

TEST(Sampler, GreedyIgnoresSamplingSettings) {
  Sampler sampler(0);
  SamplingParams params = Sampling(0.3, 2, 0.5);
  params.do_sample = false;
  EXPECT_EQ(Sample(sampler, {0.5f, -1.0f, 2.0f, 1.9f}, params), 2);
}

// RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 0]]),
//                                      torch.tensor([[2.0, -2.0, 1.0, 0.5]]))
// -> [[1.0, -4.0, 1.0, 0.5]]: token 0 is penalized once although it occurs twice.
TEST(Sampler, RepetitionPenaltyMatchesTransformers) {
  Sampler sampler(0);
  std::vector<float> logits = {2.0f, -2.0f, 1.0f, 0.5f};
  const std::vector<int64_t> history = {0, 1, 0};
  SamplingParams params;
  params.repetition_penalty = 2.0;
  // The tie between tokens 0 and 2 goes to the first.
  EXPECT_EQ(sampler.sample(logits, history, params), 0);
  EXPECT_EQ(logits, (std::vector<float>{1.0f, -4.0f, 1.0f, 0.5f}));
}

TEST(Sampler, RepetitionPenaltyChangesGreedyChoice) {
  Sampler sampler(0);
  SamplingParams params;
  params.repetition_penalty = 1.5;
  // 3 / 1.5 = 2 falls below 2.5; a penalized negative logit only sinks further.
  EXPECT_EQ(Sample(sampler, {3.0f, 2.5f, -0.1f}, params, {0, 2}), 1);
  // Ids past the vocabulary are ignored, as transformers does.
  EXPECT_EQ(Sample(sampler, {3.0f, 2.5f}, params, {7}), 0);
}

TEST(Sampler, TopKOfOneIsGreedy) {
  Sampler sampler(7);
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const std::vector<float> logits = RandomLogits(50, seed);
    EXPECT_EQ(Sample(sampler, logits, Sampling(1.5, 1)), ArgMax(logits));
  }
}

// 1 - 1e-9 rounds to 1 in fp32, so every cumulative probability is under the threshold: the
// highest token must survive regardless.
TEST(Sampler, TinyTopPIsGreedy) {
  Sampler sampler(7);
  for (uint32_t seed = 0; seed < 20; ++seed) {
    const std::vector<float> logits = RandomLogits(50, seed);
    EXPECT_EQ(Sample(sampler, logits, Sampling(1.5, 0, 1e-6)), ArgMax(logits));
    EXPECT_EQ(Sample(sampler, logits, Sampling(1.5, 0, 1e-9)), ArgMax(logits));
  }
  // Among tied maxima it keeps the first, as greedy does.
  EXPECT_EQ(Sample(sampler, {1.0f, 3.0f, 3.0f, 2.0f}, Sampling(1.0, 0, 1e-9)), 1);
}

TEST(Sampler, SameSeedSameTokens) {
  const std::vector<float> logits = RandomLogits(100, 3);
  Sampler a(42), b(42), c(43);
  std::vector<int64_t> from_a, from_b, from_c;
  for (int i = 0; i < 200; ++i) {
    from_a.push_back(Sample(a, logits, Sampling(0.7)));
    from_b.push_back(Sample(b, logits, Sampling(0.7)));
    from_c.push_back(Sample(c, logits, Sampling(0.7)));
  }
  EXPECT_EQ(from_a, from_b);
  EXPECT_NE(from_a, from_c);
}

TEST(Sampler, FrequenciesMatchTemperedSoftmax) {
  const std::vector<float> logits = {0.0f, 1.0f, 2.0f, 0.5f, -1.0f};
  const double temperature = 0.8;
  std::vector<double> probs;
  double total = 0.0;
  for (const float l : logits) total += std::exp(l / temperature);
  for (const float l : logits) probs.push_back(std::exp(l / temperature) / total);
  const int draws = 100000;
  ExpectFrequencies(Frequencies(logits, Sampling(temperature), {}, draws), probs, draws);
}

TEST(Sampler, TopKFilteredTokensAreNeverDrawn) {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.5f, 0.9f, 1.8f, 0.0f};
  // Softmax over the three kept logits 2.0, 1.5 and 1.8.
  const double z = std::exp(2.0) + std::exp(1.5) + std::exp(1.8);
  const std::vector<double> probs = {0, std::exp(2.0) / z, 0, std::exp(1.5) / z,
                                     0, std::exp(1.8) / z, 0};
  const int draws = 50000;
  ExpectFrequencies(Frequencies(logits, Sampling(1.0, 3), {}, draws), probs, draws);
}

// As transformers' `scores < topk[-1]`, every token tied with the k-th largest survives.
TEST(Sampler, TopKKeepsTies) {
  const int draws = 20000;
  ExpectFrequencies(Frequencies({1.0f, 3.0f, 3.0f, 2.0f}, Sampling(1.0, 1), {}, draws),
                    {0.0, 0.5, 0.5, 0.0}, draws);
}

// p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log(); TopPLogitsWarper(0.7)(None, p)
// -> [[-0.6931, -1.2040, -inf, -inf]]: cumulative 0.05 and 0.2 are <= 0.3 and go.
TEST(Sampler, TopPFilteredTokensAreNeverDrawn) {
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  const int draws = 50000;
  ExpectFrequencies(Frequencies(logits, Sampling(1.0, 0, 0.7), {}, draws),
                    {0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0}, draws);
}

// A nucleus of thousands of tokens, past the first prefixes the selection looks at: 4096 equal
// logits and top_p 0.5 keep exactly the 2048 lowest ids (equal logits rank by id), each as
// likely as the others.
TEST(Sampler, TopPOverALargeVocabulary) {
  Sampler sampler(5);
  const std::vector<float> logits(4096, 0.25f);
  std::vector<int> count(logits.size(), 0);
  const int draws = 40000;
  for (int i = 0; i < draws; ++i)
    ++count[static_cast<size_t>(Sample(sampler, logits, Sampling(0.9, 0, 0.5)))];
  for (size_t id = 2048; id < count.size(); ++id)
    ASSERT_EQ(count[id], 0) << "filtered token " << id;
  int last_quarter = 0;  // ids 1536..2047: a quarter of the nucleus
  for (size_t id = 1536; id < 2048; ++id) last_quarter += count[id];
  EXPECT_NEAR(last_quarter / double{draws}, 0.25, 5 * std::sqrt(0.25 * 0.75 / draws));
}

// Two levels: 1024 tokens of logit 1 and 3072 of logit 0; top_p 0.75 needs 1615.59 of the
// total weight 2154.13 (weights 1 and e^-1): the high tokens and the first 1609 low ones, ids
// 0..2632 (numpy: cumsum of the fp32 weights first reaches 0.75 * total at index 2632).
TEST(Sampler, TopPCutsInsideALevel) {
  Sampler sampler(6);
  std::vector<float> logits(4096, 0.0f);
  std::fill(logits.begin(), logits.begin() + 1024, 1.0f);
  std::vector<int> count(logits.size(), 0);
  for (int i = 0; i < 40000; ++i)
    ++count[static_cast<size_t>(Sample(sampler, logits, Sampling(1.0, 0, 0.75)))];
  for (size_t id = 2633; id < count.size(); ++id)
    ASSERT_EQ(count[id], 0) << "filtered token " << id;
  int edge = 0;  // ids 2600..2632, each drawn with probability e^-1 / 1615.9
  for (size_t id = 2600; id < 2633; ++id) edge += count[id];
  EXPECT_GT(edge, 150);
}

// The whole chain, as generate(do_sample=True, repetition_penalty=1.3, temperature=0.8,
// top_k=6, top_p=0.8) orders it:
//   chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3),
//       TemperatureLogitsWarper(0.8), TopKLogitsWarper(6), TopPLogitsWarper(0.8)])
//   logits = torch.tensor([[1.5, -0.5, 2.0, 0.25, -1.0, 1.75, 0.5, -2.0, 1.0, 0.0]])
//   print(chain(torch.tensor([[2, 4, 2, 9]]), logits).softmax(-1))
TEST(Sampler, PipelineMatchesTransformers) {
  const std::vector<float> logits = {1.5f,  -0.5f, 2.0f,  0.25f, -1.0f,
                                     1.75f, 0.5f,  -2.0f, 1.0f,  0.0f};
  SamplingParams params = Sampling(0.8, 6, 0.8);
  params.repetition_penalty = 1.3;
  const int draws = 100000;
  ExpectFrequencies(Frequencies(logits, params, {2, 4, 2, 9}, draws),
                    {0.253078014, 0, 0.265542477, 0, 0, 0.345916629, 0, 0, 0.135462895, 0}, draws);
}

// A key that neither the run nor generation_config.json sets takes transformers' default
// (5.23: GenerationConfig._get_default_generation_params() gives temperature 1.0, top_k 50,
// top_p 1.0, repetition_penalty 1.0, do_sample False): a model whose generation_config.json says
// only do_sample and temperature samples from its 50 most likely tokens, as generate() does. The
// run's settings win over the model's, and top_k = 0 turns the filter off.
TEST(Sampler, UnsetKeysTakeTransformersDefaults) {
  tpe::config::GenerationDefaults model;
  model.do_sample = true;
  model.temperature = 4.0;  // flat enough that every id would be drawn without the filter
  const tpe::SamplingParams p = tpe::runtime::resolve_generation({}, model).sampling;
  EXPECT_EQ(p.top_k, 50);
  EXPECT_EQ(p.top_p, 1.0);
  EXPECT_EQ(p.repetition_penalty, 1.0);
  std::vector<float> logits(80);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = -0.01f * static_cast<float>(i);
  const int draws = 20000;
  const std::vector<double> freq = Frequencies(logits, p, {}, draws);
  for (size_t id = 50; id < freq.size(); ++id) ASSERT_EQ(freq[id], 0) << "filtered token " << id;
  EXPECT_GT(freq[49], 0);
  EXPECT_FALSE(tpe::runtime::resolve_generation({}, {}).sampling.do_sample);

  tpe::config::GenerationSettings run;
  run.top_k = 0;
  model.top_k = 40;
  EXPECT_EQ(tpe::runtime::resolve_generation(run, model).sampling.top_k, 0);
  EXPECT_EQ(tpe::runtime::resolve_generation({}, model).sampling.top_k, 40);
}

TEST(Sampler, RejectsInvalidSettings) {
  Sampler sampler(0);
  EXPECT_THROW(Sample(sampler, {}, SamplingParams{}), std::invalid_argument);
  EXPECT_THROW(Sample(sampler, {1.0f}, Sampling(0.0)), std::invalid_argument);
  EXPECT_THROW(Sample(sampler, {1.0f}, Sampling(1.0, 0, 0.0)), std::invalid_argument);
  SamplingParams params;
  params.repetition_penalty = 0.0;
  EXPECT_THROW(Sample(sampler, {1.0f}, params), std::invalid_argument);
}

// Greedy decoding picks on the backend (Backend::argmax_rows) rather than through the sampler:
// both choose the same token, the first of equal maxima, and a row with a NaN or an infinity is
// refused (-1) as the sampler's caller refuses it (all_finite).
TEST(ArgmaxRows, TheSamplersGreedyChoiceAndNonFiniteRowsRefused) {
  tpe::comm::ThreadGroup group(1);
  tpe::backend::CpuBackend cpu(0, group);
  const int64_t rows = 6, cols = 50;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> level(-3, 3);  // few levels: many equal maxima
  std::vector<float> values(rows * cols);
  for (float& v : values) v = static_cast<float>(level(rng));
  values[1 * cols + 10] = std::nanf("");
  values[2 * cols + 49] = INFINITY;
  values[3 * cols] = -INFINITY;
  tpe::backend::Buffer x = cpu.alloc(rows, cols);
  std::copy(values.begin(), values.end(), static_cast<float*>(x.data));
  const std::vector<int64_t> picked = cpu.argmax_rows(x);
  ASSERT_EQ(picked.size(), static_cast<size_t>(rows));
  Sampler sampler(1);
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row(values.begin() + r * cols, values.begin() + (r + 1) * cols);
    if (!tpe::all_finite(row)) {
      EXPECT_EQ(picked[r], -1) << "row " << r;
      continue;
    }
    EXPECT_EQ(picked[r], Sample(sampler, row, SamplingParams{})) << "row " << r;
    EXPECT_EQ(picked[r], std::find(row.begin(), row.end(), 3.0f) - row.begin()) << "row " << r;
  }
}

// Sampling's candidates (Backend::top_rows): each row's k largest values with their columns,
// checked against a sort of the row; among values equal to the k-th largest any may be chosen,
// so the check is by value: the multiset of candidate values is the sort's first k. Rows of few
// levels (ties across the k-th), a row narrower than k, and non-finite rows flagged.
TEST(TopRows, TheLargestValuesAndTheirColumns) {
  tpe::comm::ThreadGroup group(1);
  tpe::backend::CpuBackend cpu(0, group);
  const int64_t rows = 5, cols = 300, k = 64;
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> level(-20, 20);
  std::vector<float> values(rows * cols);
  for (float& v : values) v = 0.25f * static_cast<float>(level(rng));
  values[3 * cols + 7] = std::nanf("");
  values[4 * cols + 299] = -INFINITY;
  tpe::backend::Buffer x = cpu.alloc(rows, cols);
  std::copy(values.begin(), values.end(), static_cast<float*>(x.data));
  const tpe::backend::TopRows top = cpu.top_rows(x, k);
  ASSERT_EQ(top.k, k);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> row(values.begin() + r * cols, values.begin() + (r + 1) * cols);
    EXPECT_EQ(top.finite[r] != 0, tpe::all_finite(row)) << "row " << r;
    if (!tpe::all_finite(row)) continue;
    std::set<int32_t> seen;
    std::vector<float> got;
    for (size_t i = 0; i < static_cast<size_t>(k); ++i) {
      const int32_t id = top.ids_of(r)[i];
      ASSERT_TRUE(id >= 0 && id < cols);
      EXPECT_TRUE(seen.insert(id).second) << "column " << id << " twice";
      EXPECT_EQ(top.values_of(r)[i], row[id]);
      got.push_back(top.values_of(r)[i]);
    }
    std::sort(row.begin(), row.end(), std::greater<>());
    std::sort(got.begin(), got.end(), std::greater<>());
    EXPECT_EQ(got, std::vector<float>(row.begin(), row.begin() + k)) << "row " << r;
  }
  tpe::backend::Buffer narrow = cpu.alloc(2, 5);
  std::fill_n(static_cast<float*>(narrow.data), 10, 1.0f);
  const tpe::backend::TopRows all = cpu.top_rows(narrow, k);
  ASSERT_EQ(all.k, 5);
  std::vector<int32_t> ids(all.ids_of(1).begin(), all.ids_of(1).end());
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(ids, (std::vector<int32_t>{0, 1, 2, 3, 4}));
}

// The token drawn from a row's 64 largest logits is the token the whole row gives, draw by draw
// with the same generator, under every filter setting; where the candidates cannot decide
// (logits tied with the top_k-th largest may go on past them; the temperature can make
// neighbours tie) sample_top says so without touching its generator, and the row is sampled
// whole. Rows of a 1000-token vocabulary: smooth ones, and ones of few levels whose ties reach
// past the candidates. Both outcomes must occur, or the test shows less than it claims.
TEST(Sampler, TheTopCandidatesDrawWhatTheWholeRowDraws) {
  tpe::comm::ThreadGroup group(1);
  tpe::backend::CpuBackend cpu(0, group);
  const int64_t vocab = 1000, k = 64;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  int decided = 0, undecided = 0;
  for (const SamplingParams& params :
       {Sampling(1.0, 50), Sampling(0.7, 50, 0.9), Sampling(1.3, 5, 0.5), Sampling(1.0, 63),
        Sampling(0.5, 1)}) {
    Sampler whole(77), top(77);
    for (int row_i = 0; row_i < 60; ++row_i) {
      std::vector<float> row(vocab);
      const bool levels = row_i % 3 == 0;
      for (float& v : row) v = levels ? std::round(normal(rng)) : normal(rng);
      tpe::backend::Buffer x = cpu.alloc(1, vocab);
      std::copy(row.begin(), row.end(), static_cast<float*>(x.data));
      const tpe::backend::TopRows cand = cpu.top_rows(x, k);
      const int64_t expected = Sample(whole, row, params);
      const std::optional<int64_t> got =
          top.sample_top(cand.values_of(0), cand.ids_of(0), vocab, params);
      if (got) {
        ++decided;
        EXPECT_EQ(*got, expected) << "row " << row_i << " top_k " << params.top_k;
      } else {
        ++undecided;
        EXPECT_EQ(Sample(top, row, params), expected) << "the generator moved on nullopt";
      }
    }
  }
  EXPECT_GT(decided, 100);
  EXPECT_GT(undecided, 5);
}

TEST(Sampler, TopCandidatesDecideOnlyATopKDraw) {
  Sampler sampler(3);
  const std::vector<float> values = {3.0f, 2.0f, 1.0f, 0.5f};
  const std::vector<int32_t> ids = {9, 4, 7, 1};
  EXPECT_FALSE(sampler.sample_top(values, ids, 100, Sampling(1.0, 0)));  // no top-k filter
  EXPECT_FALSE(sampler.sample_top(values, ids, 100, Sampling(1.0, 4)));  // keeps them all
  SamplingParams greedy;
  EXPECT_FALSE(sampler.sample_top(values, ids, 100, greedy));
  SamplingParams penalty = Sampling(1.0, 2);
  penalty.repetition_penalty = 1.2;
  EXPECT_FALSE(sampler.sample_top(values, ids, 100, penalty));
  const std::vector<float> tied = {3.0f, 2.0f, 2.0f, 2.0f};
  EXPECT_FALSE(sampler.sample_top(tied, ids, 100, Sampling(1.0, 2)));  // 2.0 may go on past them
  const std::optional<int64_t> one = sampler.sample_top(values, ids, 100, Sampling(1.0, 1));
  ASSERT_TRUE(one);
  EXPECT_EQ(*one, 9);
  // The whole row (as many candidates as the vocabulary): any setting decides.
  const std::optional<int64_t> any = sampler.sample_top(values, ids, 4, Sampling(1.0, 0, 0.01));
  ASSERT_TRUE(any);
  EXPECT_EQ(*any, 9);
}

}  // namespace
