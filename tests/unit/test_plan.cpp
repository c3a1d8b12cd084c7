// The planner on small hand-built graphs: how heads, kv heads, MLP widths and fused weights are
// dealt out, where collectives go, and what it refuses.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

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

// A column-parallel linear whose output meets a whole value runs replicated instead (OPT-350m's
// project_in and project_out), and the ops after it are planned again with its output whole.
TEST(Plan, ReplicatesALinearWhoseOutputIsNeededWhole) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 64);
  const int h = b.norm(x, TPE_NORM_RMS, "n", false, 1e-5);
  const int up = b.linear(h, "up", 64, 64, false);
  const int product = b.mul(up, h);
  const graph::Graph g = finish(b, b.add(product, x), 64, 10);
  const parallel::Plan p = parallel::make_plan(g, 2);
  EXPECT_EQ(p.linear_kind[g.values[up].producer], LinearKind::kReplicated);
  EXPECT_EQ(p.state[up], State::kReplicated);
  EXPECT_EQ(p.state[product], State::kReplicated);
}

// What no linear made cannot be replicated: an attention output added to a whole value.
TEST(Plan, RefusesMixingSplitAndReplicated) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 64);
  const int h = b.norm(x, TPE_NORM_RMS, "n", false, 1e-5);
  tpe_attention_desc d{};
  d.struct_size = sizeof(d);
  d.n_heads = d.n_kv_heads = 4;
  d.head_dim = 16;
  const int attn = b.attention(b.linear(h, "q", 64, 64, false), b.linear(h, "k", 64, 64, false),
                               b.linear(h, "v", 64, 64, false), d);
  const graph::Graph g = finish(b, b.add(attn, h), 64, 10);
  try {
    parallel::make_plan(g, 2);
    ADD_FAILURE() << "planned";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("one input is split across ranks"), std::string::npos)
        << e.what();
  }
}

// ---- every split value is dealt out exactly -------------------------------------------------

// For each feature of a value: the kv head it belongs to, or -1 (q heads, MLP widths, ...).
// Worked out here from the graph alone: the k and v inputs of every attention, back through
// rotary, to their linear or to the fused value a split cut them from.
struct KvHeads {
  int attention = -1;       // the attention op whose kv heads these are
  std::vector<int64_t> of;  // per feature: kv head, or -1
};

std::vector<KvHeads> kv_heads(const graph::Graph& g) {
  std::vector<KvHeads> kv(g.values.size());
  for (size_t v = 0; v < g.values.size(); ++v) {
    kv[v].of.assign(static_cast<size_t>(g.values[v].width), -1);
  }
  for (size_t a = 0; a < g.ops.size(); ++a) {
    const graph::Op& op = g.ops[a];
    if (op.kind != graph::OpKind::kAttention) continue;
    const int64_t hd = op.attention.head_dim;
    for (const int input : {op.inputs[1], op.inputs[2]}) {
      int v = input;
      while (true) {
        kv[v].attention = static_cast<int>(a);
        for (int64_t f = 0; f < g.values[v].width; ++f) kv[v].of[f] = f / hd;
        const graph::Op& producer = g.ops[g.values[v].producer];
        if (producer.kind == graph::OpKind::kRotary) {
          v = producer.inputs[0];
          continue;
        }
        if (producer.kind == graph::OpKind::kSplit) {
          const size_t part =
              static_cast<size_t>(std::find(producer.outputs.begin(), producer.outputs.end(), v) -
                                  producer.outputs.begin());
          const int fused = producer.inputs[0];
          kv[fused].attention = static_cast<int>(a);
          const int64_t width = g.values[v].width;
          for (int64_t f = 0; f < width; ++f) {
            int64_t at = 0;
            if (producer.layout == TPE_SPLIT_CONCAT) {
              for (size_t p = 0; p < part; ++p) at += producer.part_widths[p];
              at += f;
            } else {  // per head [part0 part1 ...]
              const auto parts = static_cast<int64_t>(producer.outputs.size());
              at = (f / hd) * parts * hd + static_cast<int64_t>(part) * hd + f % hd;
            }
            kv[fused].of[at] = f / hd;
          }
        }
        break;
      }
    }
  }
  return kv;
}

// Which ranks hold feature f of value v (shard ranges must lie inside the value).
std::vector<std::vector<int>> holders(const graph::Graph& g, const parallel::Plan& p, int v) {
  std::vector<std::vector<int>> out(static_cast<size_t>(g.values[v].width));
  for (int r = 0; r < p.world; ++r) {
    for (const Range& range : p.shard[v][r]) {
      EXPECT_LE(0, range.begin);
      EXPECT_LT(range.begin, range.end) << "an empty or reversed range";
      EXPECT_LE(range.end, g.values[v].width);
      for (int64_t f = std::max<int64_t>(range.begin, 0);
           f < std::min(range.end, g.values[v].width); ++f) {
        out[f].push_back(r);
      }
    }
  }
  return out;
}

// Every split value at `world`: each feature is held by exactly one rank, except a kv head,
// which is held by exactly the ranks holding q heads of its group (one rank when there are at
// least as many kv heads as ranks); shards of attention values are whole heads; the vocabulary
// ranges partition the vocabulary.
void expect_exact_shards(const graph::Graph& g, int world, int64_t vocab) {
  SCOPED_TRACE(testing::Message() << "world " << world);
  const parallel::Plan p = parallel::make_plan(g, world);
  const std::vector<KvHeads> kv = kv_heads(g);
  int split_values = 0;
  for (size_t v = 0; v < g.values.size(); ++v) {
    if (p.state[v] != State::kSplit) continue;
    ++split_values;
    SCOPED_TRACE(testing::Message()
                 << "value " << v << " from " << g.describe(g.values[v].producer));
    ASSERT_EQ(p.shard[v].size(), static_cast<size_t>(world));
    const std::vector<std::vector<int>> held = holders(g, p, static_cast<int>(v));
    for (int64_t f = 0; f < g.values[v].width; ++f) {
      const int64_t head = kv[v].of[f];
      if (head < 0) {
        ASSERT_EQ(held[f].size(), 1u)
            << "feature " << f << " is held by " << held[f].size() << " ranks";
        continue;
      }
      const graph::Op& a = g.ops[kv[v].attention];
      const int64_t group = a.attention.n_heads / a.attention.n_kv_heads;
      const int q = a.inputs[0];
      std::vector<int> expected;
      for (int r = 0; r < world; ++r) {
        bool reads = false;
        for (const Range& range : p.shard[q][r]) {
          for (int64_t qh = head * group; qh < (head + 1) * group; ++qh) {
            reads = reads || (range.begin < (qh + 1) * a.attention.head_dim &&
                              qh * a.attention.head_dim < range.end);
          }
        }
        if (reads) expected.push_back(r);
      }
      ASSERT_EQ(held[f], expected) << "kv feature " << f << " (kv head " << head << ")";
      if (a.attention.n_kv_heads >= world) {
        ASSERT_EQ(expected.size(), 1u);
      }
    }
  }
  EXPECT_GT(split_values, 0);
  // Attention's q, k, v and output are cut at head boundaries.
  for (const graph::Op& op : g.ops) {
    if (op.kind != graph::OpKind::kAttention) continue;
    for (const int v : {op.inputs[0], op.inputs[1], op.inputs[2], op.outputs[0]}) {
      if (p.state[v] != State::kSplit) continue;
      for (int r = 0; r < world; ++r) {
        for (const Range& range : p.shard[v][r]) {
          EXPECT_EQ(range.begin % op.attention.head_dim, 0) << "value " << v << " rank " << r;
          EXPECT_EQ(range.end % op.attention.head_dim, 0) << "value " << v << " rank " << r;
        }
      }
    }
  }
  ASSERT_EQ(p.vocab.size(), static_cast<size_t>(world));
  std::vector<int> rows(static_cast<size_t>(vocab), 0);
  for (const Range& range : p.vocab) {
    ASSERT_TRUE(0 <= range.begin && range.begin <= range.end && range.end <= vocab);
    for (int64_t i = range.begin; i < range.end; ++i) ++rows[i];
  }
  for (int64_t i = 0; i < vocab; ++i) ASSERT_EQ(rows[i], 1) << "vocabulary row " << i;
}

// A gated MLP block on x (width `hidden`, intermediate `ffn`), optionally with fused gate_up.
int mlp_block(GraphBuilder& b, int x, int64_t hidden, int64_t ffn, bool fused) {
  const int h = b.norm(x, TPE_NORM_RMS, "l.mlp_norm", false, 1e-5);
  int gate = -1, up = -1;
  if (fused) {
    std::vector<int> parts;
    b.split(b.linear(h, "l.gate_up", hidden, 2 * ffn, false), TPE_SPLIT_CONCAT, {ffn, ffn}, 0, 0,
            parts);
    gate = parts[0];
    up = parts[1];
  } else {
    gate = b.linear(h, "l.gate", hidden, ffn, false);
    up = b.linear(h, "l.up", hidden, ffn, false);
  }
  const int m = b.mul(b.activation(gate, TPE_ACT_SILU), up);
  return b.add(x, b.linear(m, "l.down", ffn, hidden, false));
}

// One pre-norm layer with separate q/k/v, then an MLP; vocabulary 50 (uneven over 3, 4).
graph::Graph separate_qkv_model(int64_t nq, int64_t nkv, int64_t hd, int64_t ffn) {
  GraphBuilder b;
  const int64_t hidden = nq * hd;
  const int x = b.embedding(b.input_ids(), "emb", 50, hidden);
  const int y = b.add(x, attention_block(b, x, hidden, nq, nkv, hd).out);
  return finish(b, mlp_block(b, y, hidden, ffn, false), hidden, 50);
}

// Fused projections: Phi-3 style concat qkv_proj and gate_up_proj, or GPT-NeoX style
// interleaved query_key_value (equal q and kv heads) with a plain MLP.
graph::Graph fused_model(tpe_split_layout layout, int64_t nq, int64_t nkv, int64_t hd,
                         int64_t ffn) {
  GraphBuilder b;
  const int64_t hidden = nq * hd;
  const int x = b.embedding(b.input_ids(), "emb", 50, hidden);
  const int h = b.norm(x, TPE_NORM_RMS, "l.norm", false, 1e-5);
  const int qkv = b.linear(h, "l.qkv", hidden, (nq + 2 * nkv) * hd, false);
  std::vector<int> parts;
  if (layout == TPE_SPLIT_CONCAT) {
    EXPECT_TRUE(b.split(qkv, layout, {nq * hd, nkv * hd, nkv * hd}, 0, 0, parts));
  } else {
    EXPECT_TRUE(b.split(qkv, layout, {0, 0, 0}, nq, hd, parts));
  }
  const int q = b.rotary(parts[0], nq, hd, rope());
  const int k = b.rotary(parts[1], nkv, hd, rope());
  tpe_attention_desc d{};
  d.struct_size = sizeof(d);
  d.n_heads = nq;
  d.n_kv_heads = nkv;
  d.head_dim = hd;
  const int a = b.attention(q, k, parts[2], d);
  const int y = b.add(x, b.linear(a, "l.o", hidden, hidden, false));
  return finish(b, mlp_block(b, y, hidden, ffn, layout == TPE_SPLIT_CONCAT), hidden, 50);
}

TEST(Plan, ShardsCoverEveryFeatureOnce) {
  const struct {
    const char* what;
    graph::Graph graph;
    int most_ranks;  // more would leave a rank without a head: refused
  } models[] = {
      {"MHA 4 heads, MLP 160 (5 granules of 32)", separate_qkv_model(4, 4, 16, 160), 4},
      {"6 q / 3 kv heads (uneven over 4, 5)", separate_qkv_model(6, 3, 16, 96), 5},
      {"GQA 8 q / 2 kv heads, MLP 100 (granules of 4)", separate_qkv_model(8, 2, 8, 100), 5},
      {"concat qkv 4 q / 2 kv, concat gate_up", fused_model(TPE_SPLIT_CONCAT, 4, 2, 8, 96), 4},
      {"interleaved qkv 6 heads", fused_model(TPE_SPLIT_INTERLEAVED_HEADS, 6, 6, 8, 128), 5},
  };
  for (const auto& m : models) {
    SCOPED_TRACE(m.what);
    for (int world = 1; world <= 5; ++world) {
      if (world <= m.most_ranks) {
        expect_exact_shards(m.graph, world, 50);
        continue;
      }
      try {
        parallel::make_plan(m.graph, world);
        ADD_FAILURE() << "a rank without any head was planned at world " << world;
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("would hold none"), std::string::npos) << e.what();
      }
    }
  }
}

TEST(Plan, WeightsAreHeldOnceExceptNormsAndReplicatedKvHeads) {
  GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 50, 96);
  const Attn a = attention_block(b, x, 96, 6, 3, 16);
  const graph::Graph g = finish(b, b.add(x, a.out), 96, 50);
  for (int world = 1; world <= 3; ++world) {
    const auto memory = program::rank_memory(g, parallel::make_plan(g, world));
    int64_t total = 0;
    for (const auto& m : memory) total += m.weight_elements;
    // emb + lm_head, q/k/v/o (3 kv heads: none replicated up to 3 ranks), two norms per rank.
    EXPECT_EQ(total, 50 * 96 * 2 + 96 * 96 + 2 * 48 * 96 + 96 * 96 + world * 2 * 96) << world;
  }
}

}  // namespace
}  // namespace tpe

namespace tpe {
namespace {

// A made-up value is named as the error, not hidden behind "the graph has no lm_head"; a value
// that an earlier failed call returned keeps that call's error.
TEST(GraphBuilder, AValueNoOpProducedIsTheError) {
  graph::GraphBuilder b;
  const int x = b.embedding(b.input_ids(), "emb", 10, 8);
  EXPECT_LT(b.linear(12345, "l", 8, 8, false), 0);
  b.lm_head(x, "emb", 10, 8);
  try {
    b.finish();
    ADD_FAILURE() << "a graph with an undefined value was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("value 12345, which no earlier op produced"),
              std::string::npos)
        << e.what();
  }
  graph::GraphBuilder c;
  const int bad = c.linear(c.embedding(c.input_ids(), "emb", 10, 8), "l", 7, 8, false);
  c.norm(bad, TPE_NORM_RMS, "n", false, 1e-5);
  EXPECT_THROW(
      {
        try {
          c.finish();
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("in_features 7"), std::string::npos) << e.what();
          throw;
        }
      },
      Error);
}

}  // namespace
}  // namespace tpe
