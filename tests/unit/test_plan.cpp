// The planner on small hand-built graphs: how heads, kv heads, MLP widths and fused weights are
// dealt out, where collectives go, and what it refuses.
#include <gtest/gtest.h>

#include "core/common/error.hpp"
#include "core/graph/graph.hpp"
#include "core/parallel/plan.hpp"
#include "core/program/report.hpp"

namespace tpe {
namespace {

using graph::GraphBuilder;
using parallel::LinearKind;
using parallel::State;

tpe_rope_desc rope() {
  tpe_rope_desc r{};
  r.struct_size = sizeof(r);
  r.theta = 10000;
  r.partial_rotary_factor = 1;
  return r;
}

struct Attn {
  int q, k, v, out;
};

// A pre-norm attention block with separate q/k/v projections; returns the o_proj output.
Attn attention_block(GraphBuilder& b, int x, int64_t hidden, int64_t nq, int64_t nkv, int64_t hd) {
  const int h = b.norm(x, TPE_NORM_RMS, "l.norm", false, 1e-5);
  int q = b.linear(h, "l.q", hidden, nq * hd, false);
  int k = b.linear(h, "l.k", hidden, nkv * hd, false);
  const int v = b.linear(h, "l.v", hidden, nkv * hd, false);
  q = b.rotary(q, nq, hd, rope());
  k = b.rotary(k, nkv, hd, rope());
  tpe_attention_desc d{};
  d.struct_size = sizeof(d);
  d.n_heads = nq;
  d.n_kv_heads = nkv;
  d.head_dim = hd;
  const int a = b.attention(q, k, v, d);
  return {q, k, v, b.linear(a, "l.o", nq * hd, hidden, false)};
}

graph::Graph finish(GraphBuilder& b, int x, int64_t hidden, int64_t vocab) {
  b.lm_head(b.norm(x, TPE_NORM_RMS, "final", false, 1e-5), "lm_head.weight", vocab, hidden);
  return b.finish();
}

TEST(Plan, GqaHeadsTravelWithTheirKvHead) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 100, 96);
  const Attn a = attention_block(b, x, 96, 6, 2, 16);
  const graph::Graph g = finish(b, b.add(x, a.out), 96, 100);
  const parallel::Plan p = parallel::make_plan(g, 2);
  // Two kv heads over two ranks: each rank has one kv head and its three q heads.
  EXPECT_EQ(p.shard[a.q][0], (IndexSet{{0, 48}}));
  EXPECT_EQ(p.shard[a.q][1], (IndexSet{{48, 96}}));
  EXPECT_EQ(p.shard[a.k][0], (IndexSet{{0, 16}}));
  EXPECT_EQ(p.shard[a.v][1], (IndexSet{{16, 32}}));
}

TEST(Plan, FewerKvHeadsThanRanksReplicatesThem) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 100, 96);
  const Attn a = attention_block(b, x, 96, 6, 2, 16);
  const graph::Graph g = finish(b, b.add(x, a.out), 96, 100);
  const parallel::Plan p = parallel::make_plan(g, 4);
  // q heads dealt 2, 2, 1, 1; rank 1 holds q heads 2 and 3, which read kv heads 0 and 1.
  EXPECT_EQ(p.shard[a.q][0], (IndexSet{{0, 32}}));
  EXPECT_EQ(p.shard[a.q][1], (IndexSet{{32, 64}}));
  EXPECT_EQ(p.shard[a.q][2], (IndexSet{{64, 80}}));
  EXPECT_EQ(p.shard[a.q][3], (IndexSet{{80, 96}}));
  EXPECT_EQ(p.shard[a.k][0], (IndexSet{{0, 16}}));
  EXPECT_EQ(p.shard[a.k][1], (IndexSet{{0, 32}}));
  EXPECT_EQ(p.shard[a.k][2], (IndexSet{{16, 32}}));
  EXPECT_EQ(p.shard[a.k][3], (IndexSet{{16, 32}}));
  const auto memory = program::rank_memory(g, p);
  EXPECT_EQ(memory[1].kv_elements_per_token, 2 * 32);
  EXPECT_EQ(memory[0].kv_elements_per_token, 2 * 16);
}

TEST(Plan, UnevenHeadsAreDealtToEarlierRanks) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 64);
  const Attn a = attention_block(b, x, 64, 4, 4, 16);
  const graph::Graph g = finish(b, b.add(x, a.out), 64, 10);
  const parallel::Plan p = parallel::make_plan(g, 3);
  EXPECT_EQ(p.shard[a.q][0], (IndexSet{{0, 32}}));
  EXPECT_EQ(p.shard[a.q][1], (IndexSet{{32, 48}}));
  EXPECT_EQ(p.shard[a.q][2], (IndexSet{{48, 64}}));
  EXPECT_EQ(p.vocab, (std::vector<Range>{{0, 4}, {4, 7}, {7, 10}}));
}

TEST(Plan, MlpWidthSplitsOnAGrain) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 64);
  const int h = b.norm(x, TPE_NORM_RMS, "n", false, 1e-5);
  const int gate = b.linear(h, "gate", 64, 160, false);
  const int up = b.linear(h, "up", 64, 160, false);
  const int m = b.mul(b.activation(gate, TPE_ACT_SILU), up);
  const int down = b.linear(m, "down", 160, 64, false);
  const graph::Graph g = finish(b, b.add(x, down), 64, 10);
  const parallel::Plan p = parallel::make_plan(g, 3);
  // 160 = 5 granules of 32, dealt 2, 2, 1.
  EXPECT_EQ(p.shard[gate][0], (IndexSet{{0, 64}}));
  EXPECT_EQ(p.shard[up][1], (IndexSet{{64, 128}}));
  EXPECT_EQ(p.shard[m][2], (IndexSet{{128, 160}}));
  EXPECT_EQ(p.linear_kind[g.values[gate].producer], LinearKind::kColumn);
  EXPECT_EQ(p.linear_kind[g.values[down].producer], LinearKind::kRow);
  EXPECT_EQ(p.state[down], State::kPartial);
}

TEST(Plan, ConcatFusedQkvFollowsTheHeads) {
  // Phi-3 style qkv_proj: [Q (4 heads) | K (2 heads) | V (2 heads)], head_dim 8.
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 32);
  const int h = b.norm(x, TPE_NORM_RMS, "n", false, 1e-5);
  const int qkv = b.linear(h, "qkv", 32, 64, false);
  std::vector<int> parts;
  ASSERT_TRUE(b.split(qkv, TPE_SPLIT_CONCAT, {32, 16, 16}, 0, 0, parts));
  tpe_attention_desc d{};
  d.struct_size = sizeof(d);
  d.n_heads = 4;
  d.n_kv_heads = 2;
  d.head_dim = 8;
  const int a = b.attention(parts[0], parts[1], parts[2], d);
  const int o = b.linear(a, "o", 32, 32, false);
  const graph::Graph g = finish(b, b.add(x, o), 32, 10);
  const parallel::Plan p = parallel::make_plan(g, 2);
  // Rank 1: q heads 2-3 (16..32), k head 1 (32 + 8..16), v head 1 (48 + 8..16).
  EXPECT_EQ(p.shard[qkv][1], (IndexSet{{16, 32}, {40, 48}, {56, 64}}));
  const int split_op = g.values[parts[0]].producer;
  EXPECT_EQ(p.split_parts[split_op][1][0], (IndexSet{{0, 16}}));
  EXPECT_EQ(p.split_parts[split_op][1][1], (IndexSet{{16, 24}}));
  EXPECT_EQ(p.split_parts[split_op][1][2], (IndexSet{{24, 32}}));
}

TEST(Plan, InterleavedFusedQkvTakesWholeHeads) {
  // GPT-NeoX query_key_value: per head [q k v], 2 heads of 4.
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 8);
  const int h = b.norm(x, TPE_NORM_LAYER, "n", true, 1e-5);
  const int qkv = b.linear(h, "qkv", 8, 24, true);
  std::vector<int> parts;
  ASSERT_TRUE(b.split(qkv, TPE_SPLIT_INTERLEAVED_HEADS, {0, 0, 0}, 2, 4, parts));
  tpe_attention_desc d{};
  d.struct_size = sizeof(d);
  d.n_heads = 2;
  d.n_kv_heads = 2;
  d.head_dim = 4;
  const int a = b.attention(parts[0], parts[1], parts[2], d);
  const graph::Graph g = finish(b, b.add(x, b.linear(a, "o", 8, 8, true)), 8, 10);
  const parallel::Plan p = parallel::make_plan(g, 2);
  EXPECT_EQ(p.shard[qkv][0], (IndexSet{{0, 12}}));
  EXPECT_EQ(p.shard[qkv][1], (IndexSet{{12, 24}}));
  const int split_op = g.values[parts[0]].producer;
  EXPECT_EQ(p.split_parts[split_op][1][1], (IndexSet{{4, 8}}));
}

TEST(Plan, PartialPlusReplicatedStaysPartialAndAddsTheReplicatedOnce) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 64);
  const Attn a = attention_block(b, x, 64, 4, 4, 16);
  const int sum = b.add(x, a.out);
  const graph::Graph g = finish(b, sum, 64, 10);
  const parallel::Plan p = parallel::make_plan(g, 2);
  // x was reduced for the norm, so it is replicated when added to the partial o_proj output.
  EXPECT_EQ(p.state[sum], State::kPartial);
  EXPECT_EQ(p.add_replicated_input[g.values[sum].producer], 0);
}

TEST(Plan, RefusesMixingSplitAndReplicated) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 64);
  const int h = b.norm(x, TPE_NORM_RMS, "n", false, 1e-5);
  const int up = b.linear(h, "up", 64, 64, false);
  const graph::Graph g = finish(b, b.add(b.mul(up, h), x), 64, 10);
  EXPECT_THROW(parallel::make_plan(g, 2), Error);
}

TEST(Plan, ShardsCoverEveryFeatureOnce) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 50, 96);
  const Attn a = attention_block(b, x, 96, 6, 3, 16);
  const graph::Graph g = finish(b, b.add(x, a.out), 96, 50);
  for (int world = 1; world <= 5; ++world) {
    const parallel::Plan p = parallel::make_plan(g, world);
    int64_t q_total = 0;
    for (int r = 0; r < world; ++r) q_total += index_count(p.shard[a.q][r]);
    EXPECT_EQ(q_total, 96) << world;
    const auto memory = program::rank_memory(g, p);
    int64_t total = 0;
    for (const auto& m : memory) total += m.weight_elements;
    // Norm weights are replicated on every rank; with at least as many kv heads as ranks every
    // other weight is held exactly once.
    if (world <= 3) {
      EXPECT_EQ(total, 50 * 96 * 2 + 3 * 96 * 96 + world * 2 * 96) << world;
    }
  }
}

}  // namespace
}  // namespace tpe
