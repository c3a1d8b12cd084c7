// Encode throughput on the parity corpus repeated to >= 1 MB, one thread, lines as a batch.
// Not a test: run by hand next to bench_hf.py (same corpus, same repetitions) and compare.
// Each round loads the tokenizer afresh (untimed), so word caches start empty, as in bench_hf.py.
//   build/tests/tokenizer/tpe_tokenizer_bench tests/tokenizer/data/gpt2_bpe [repeats]
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>

#include "core/common/error.hpp"
#include "core/tokenizer/tokenizer.hpp"
#include "tests/tokenizer/gzip_lines.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: {} TOKENIZER_DIR [REPEATS (default 3)] [ROUNDS (default 5)]\n",
               argv[0]);
    return 2;
  }
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 3;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 5;
  try {
    std::vector<std::string> lines;
    size_t bytes = 0;
    const auto corpus = tpe::tokenizer::testing::read_gzip_lines(std::string(TPE_TOKENIZER_DATA) +
                                                                 "/corpus.jsonl.gz");
    for (int r = 0; r < repeats; ++r) {
      for (const std::string& line : corpus) {
        lines.push_back(nlohmann::json::parse(line).get<std::string>());
        bytes += lines.back().size();
      }
    }
    double best = 1e30;
    size_t tokens = 0;
    for (int round = 0; round < rounds; ++round) {
      tokens = 0;
      const auto tokenizer =
          tpe::tokenizer::Tokenizer::from_file(std::string(argv[1]) + "/tokenizer.json");
      const auto start = std::chrono::steady_clock::now();
      for (const std::string& line : lines) tokens += tokenizer.encode(line).size();
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      best = std::min(best, seconds);
    }
    fmt::print(
        "{}: {} lines, {:.2f} MB, {} tokens; best of {}: {:.3f} s = {:.2f} MB/s, {:.0f} tokens/s\n",
        argv[1], lines.size(), bytes / 1e6, tokens, rounds, best, bytes / 1e6 / best,
        tokens / best);
  } catch (const tpe::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
