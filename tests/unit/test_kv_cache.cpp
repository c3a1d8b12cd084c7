// The KV cache object: a pass must continue each sequence where its cache stands and fit, and
// memory is kept (same generation) while a new request fits in it.
#include <gtest/gtest.h>

#include "core/backend/cpu_backend.hpp"
#include "core/common/error.hpp"
#include "core/runtime/kv_cache.hpp"

namespace tpe {
namespace {

void expect_error(const runtime::KvCache& cache, const backend::Batch& batch,
                  const std::string& fragment) {
  try {
    cache.check(batch);
    ADD_FAILURE() << "accepted; expected an error containing: " << fragment;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(KvCache, PassesMustContinueTheirSequenceAndFit) {
  comm::ThreadGroup group(1);
  backend::CpuBackend cpu(0, group);
  runtime::KvCache cache;
  const std::vector<program::Program::CacheLayer> layers = {{8, false}, {8, false}};
  cache.reserve(cpu, layers, 2, 4);
  backend::Batch prompt;
  prompt.tokens = {1, 2, 3};
  prompt.segments = {{1, 0, 3}};
  cache.check(prompt);
  cache.advance(prompt);
  EXPECT_EQ(cache.length(1), 3);
  EXPECT_EQ(cache.length(0), 0);

  backend::Batch again = prompt;  // position 0 again: the cache holds 3 tokens
  expect_error(cache, again, "continues at position 0, but its KV cache holds 3 tokens");
  backend::Batch past;
  past.tokens = {4, 5};
  past.segments = {{1, 3, 2}};
  expect_error(cache, past, "reaches 5 tokens, beyond the 4");
  backend::Batch slot;
  slot.tokens = {4};
  slot.segments = {{2, 0, 1}};
  expect_error(cache, slot, "slot 2 is outside the KV cache's 2 slots");

  const uint64_t generation = cache.generation();
  cache.reserve(cpu, layers, 1, 3);  // fits: memory kept, sequences emptied
  EXPECT_EQ(cache.generation(), generation);
  EXPECT_EQ(cache.length(1), 0);
  EXPECT_EQ(cache.bytes(4), 2 * 2 * 2 * 4 * 8 * 4);
  cache.reserve(cpu, layers, 2, 5);  // does not: new memory
  EXPECT_NE(cache.generation(), generation);
  EXPECT_EQ(cache.capacity(), 5);
}

}  // namespace
}  // namespace tpe
