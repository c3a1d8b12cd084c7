// The room the program leaves for encoder-decoder and encoder models: a toy graph over two token
// streams — decoder tokens with token types, attending across to a second (encoder) stream —
// built, planned at TP 1 and 2, lowered, and run on the CPU backend, against a plain double-
// precision implementation of the same model written here. The second pass adds decoder tokens
// only: they attend to the encoder keys the cache kept.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <thread>

#include "core/backend/cpu_backend.hpp"
#include "core/common/error.hpp"
#include "core/graph/graph.hpp"
#include "core/parallel/plan.hpp"
#include "core/program/program.hpp"
#include "core/runtime/executor.hpp"

namespace tpe {
namespace {

constexpr int64_t kVocab = 13, kTypes = 3, kHidden = 8, kHeads = 2, kHeadDim = 4;

using Matrix = std::vector<double>;  // row-major

// Random weights by name: matrices near 0, 1-D scales near 1.
struct Weights {
  std::map<std::string, std::pair<std::vector<int64_t>, Matrix>> tensors;
  std::mt19937 rng{5};

  void add(const std::string& name, std::vector<int64_t> shape) {
    std::uniform_real_distribution<double> u(-0.5, 0.5);
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    Matrix m(static_cast<size_t>(n));
    for (double& x : m) x = u(rng) + (shape.size() == 1 ? 1.0 : 0.0);
    tensors[name] = {std::move(shape), std::move(m)};
  }
  const Matrix& w(const std::string& name) const { return tensors.at(name).second; }
};

Matrix matvec(const Matrix& m, const Matrix& x, int64_t out) {
  const auto in = static_cast<int64_t>(x.size());
  Matrix y(static_cast<size_t>(out), 0.0);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) y[o] += m[o * in + i] * x[i];
  }
  return y;
}

Matrix rms(const Matrix& x, const Matrix& w) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + 1e-6);
  Matrix y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
  return y;
}

Matrix row(const Matrix& m, int64_t r, int64_t width) {
  return Matrix(m.begin() + r * width, m.begin() + (r + 1) * width);
}

struct ToyModel : Weights {
  ToyModel() {
    add("dec.embed", {kVocab, kHidden});
    add("dec.types", {kTypes, kHidden});
    add("enc.embed", {kVocab, kHidden});
    add("layers.0.norm.weight", {kHidden});
    for (const char* p : {"q", "k", "v", "o"})
      add(std::string("layers.0.") + p + ".weight", {kHidden, kHidden});
    add("final.weight", {kHidden});
    add("lm_head.weight", {kVocab, kHidden});
  }
  // The graph a policy would build for it.
  graph::Graph graph() const {
    graph::GraphBuilder b;
    const int enc =
        b.embedding(b.input(graph::InputKind::kTokenIds, 1), "enc.embed", kVocab, kHidden);
    const int ids = b.input(graph::InputKind::kTokenIds, 0);
    const int types = b.input(graph::InputKind::kTokenTypes, 0);
    int x = b.add(b.embedding(ids, "dec.embed", kVocab, kHidden),
                  b.embedding(types, "dec.types", kTypes, kHidden));
    b.begin_block("ToyCrossLayer", "layers.0");
    const int h = b.norm(x, TPE_NORM_RMS, "layers.0.norm", false, 1e-6);
    const int q = b.linear(h, "layers.0.q", kHidden, kHidden, false);
    const int k = b.linear(enc, "layers.0.k", kHidden, kHidden, false);
    const int v = b.linear(enc, "layers.0.v", kHidden, kHidden, false);
    tpe_attention_desc d{};
    d.struct_size = sizeof(d);
    d.n_heads = kHeads;
    d.n_kv_heads = kHeads;
    d.head_dim = kHeadDim;
    const int a = b.attention(q, k, v, d);
    x = b.add(x, b.linear(a, "layers.0.o", kHidden, kHidden, false));
    b.end_block();
    b.lm_head(b.norm(x, TPE_NORM_RMS, "final", false, 1e-6), "lm_head.weight", kVocab, kHidden);
    return b.finish();
  }

  // Logits of one decoder token (id, type) over the encoder tokens `enc`, directly.
  std::vector<double> reference(int64_t id, int64_t type, const std::vector<int64_t>& enc) const {
    Matrix x = row(w("dec.embed"), id, kHidden);
    const Matrix t = row(w("dec.types"), type, kHidden);
    for (int64_t i = 0; i < kHidden; ++i) x[i] += t[i];
    const Matrix q = matvec(w("layers.0.q.weight"), rms(x, w("layers.0.norm.weight")), kHidden);
    std::vector<Matrix> keys, values;
    for (int64_t e : enc) {
      const Matrix s = row(w("enc.embed"), e, kHidden);
      keys.push_back(matvec(w("layers.0.k.weight"), s, kHidden));
      values.push_back(matvec(w("layers.0.v.weight"), s, kHidden));
    }
    Matrix attended(kHidden, 0.0);
    for (int64_t h = 0; h < kHeads; ++h) {
      std::vector<double> scores;
      double top = -1e300, sum = 0;
      for (const Matrix& k : keys) {
        double dot = 0;
        for (int64_t d = 0; d < kHeadDim; ++d) dot += q[h * kHeadDim + d] * k[h * kHeadDim + d];
        scores.push_back(dot / std::sqrt(static_cast<double>(kHeadDim)));
        top = std::max(top, scores.back());
      }
      for (double& s : scores) sum += (s = std::exp(s - top));
      for (size_t j = 0; j < keys.size(); ++j)
        for (int64_t d = 0; d < kHeadDim; ++d)
          attended[h * kHeadDim + d] += scores[j] / sum * values[j][h * kHeadDim + d];
    }
    const Matrix o = matvec(w("layers.0.o.weight"), attended, kHidden);
    for (int64_t i = 0; i < kHidden; ++i) x[i] += o[i];
    return matvec(w("lm_head.weight"), rms(x, w("final.weight")), kVocab);
  }
};

// Runs the passes on `world` CPU ranks and returns rank 0's logits of each pass.
std::vector<Tensor> run(const Weights& model, const graph::Graph& g, int world,
                        const std::vector<backend::Batch>& passes) {
  const parallel::Plan plan = parallel::make_plan(g, world);
  comm::ThreadGroup group(world);
  std::vector<std::unique_ptr<runtime::Executor>> ranks;
  for (int r = 0; r < world; ++r) {
    program::Program p = program::lower(g, plan, r);
    program::plan_memory(p, {8, 8, 4, 16});
    ranks.push_back(std::make_unique<runtime::Executor>(
        g, std::move(p), std::make_unique<backend::CpuBackend>(r, group), false));
  }
  const auto reader = [&model](const std::string& name, std::span<const int64_t> shape,
                               const IndexSet& rows, const IndexSet& cols, std::span<float> out) {
    const Matrix& m = model.w(name);
    const int64_t width = shape.size() > 1 ? shape[1] : 1;
    const IndexSet all_cols = cols.empty() ? IndexSet{{0, width}} : cols;
    size_t at = 0;
    for (const Range& r : rows)
      for (int64_t i = r.begin; i < r.end; ++i)
        for (const Range& c : all_cols)
          for (int64_t j = c.begin; j < c.end; ++j)
            out[at++] = static_cast<float>(m[i * width + j]);
  };
  std::vector<Tensor> out(passes.size());
  std::vector<std::thread> threads;
  std::exception_ptr error;
  std::mutex mutex;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        ranks[r]->load(reader, [] {});
        ranks[r]->reset_cache(2, 8, 16);
        for (size_t i = 0; i < passes.size(); ++i) {
          Tensor logits = ranks[r]->forward(passes[i]);
          if (r == 0) out[i] = std::move(logits);
        }
      } catch (...) {
        std::lock_guard lock(mutex);
        if (!error) error = std::current_exception();
        group.abort();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
  return out;
}

TEST(TwoStreams, CrossAttentionWithTokenTypesMatchesADirectComputation) {
  const ToyModel model;
  const graph::Graph g = model.graph();
  // Sequence 0: 3 decoder tokens over 4 encoder tokens; sequence 1: 2 over 5. Then one more
  // decoder token each, with no encoder tokens: the cache's cross keys serve it.
  const std::vector<std::vector<int64_t>> enc = {{1, 7, 3, 12}, {5, 5, 0, 9, 2}};
  backend::Batch prefill;
  prefill.tokens = {4, 11, 2, 8, 6};
  prefill.token_types = {0, 1, 2, 1, 0};
  prefill.segments = {{0, 0, 3, 0, 4}, {1, 0, 2, 0, 5}};
  prefill.logit_rows = {0, 1, 2, 3, 4};
  prefill.second.tokens = {1, 7, 3, 12, 5, 5, 0, 9, 2};
  prefill.second.segments = {{0, 0, 4}, {1, 0, 5}};
  backend::Batch decode;
  decode.tokens = {10, 3};
  decode.token_types = {2, 2};
  decode.segments = {{0, 3, 1, 0, 4}, {1, 2, 1, 0, 5}};
  decode.logit_rows = {0, 1};
  const std::vector<std::pair<size_t, int64_t>> seq_of_row = {
      {0, 0}, {0, 1}, {0, 2}, {1, 3}, {1, 4}};
  for (int world : {1, 2}) {
    const std::vector<Tensor> logits = run(model, g, world, {prefill, decode});
    for (size_t row = 0; row < 5; ++row) {
      const auto [seq, t] = seq_of_row[row];
      const std::vector<double> want =
          model.reference(prefill.tokens[t], prefill.token_types[t], enc[seq]);
      for (int64_t i = 0; i < kVocab; ++i) {
        EXPECT_NEAR(logits[0].row(static_cast<int64_t>(row))[i], want[i], 1e-4)
            << "tp " << world << " row " << row;
      }
    }
    for (size_t seq = 0; seq < 2; ++seq) {
      const std::vector<double> want =
          model.reference(decode.tokens[seq], decode.token_types[seq], enc[seq]);
      for (int64_t i = 0; i < kVocab; ++i) {
        EXPECT_NEAR(logits[1].row(static_cast<int64_t>(seq))[i], want[i], 1e-4)
            << "tp " << world << " decode " << seq;
      }
    }
  }
}

TEST(TwoStreams, PassesThatContradictTheCacheOrLackInputsAreRefused) {
  const ToyModel model;
  const graph::Graph g = model.graph();
  backend::Batch pass;
  pass.tokens = {4};
  pass.segments = {{0, 0, 1, 0, 2}};
  pass.logit_rows = {0};
  pass.second.tokens = {1, 2};
  pass.second.segments = {{0, 0, 2}};
  auto expect_error = [&](const backend::Batch& b, const std::string& fragment) {
    try {
      run(model, g, 1, {b});
      ADD_FAILURE() << "accepted; expected: " << fragment;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  expect_error(pass, "embedding 'dec.types' reads 0 ids of the pass, whose stream has 1 tokens");
  pass.token_types = {3};
  expect_error(pass, "id 3 is out of range for 'dec.types', which has 3 rows");
  pass.token_types = {1};
  pass.segments[0].second_len = 3;
  expect_error(pass, "sequence 0 attends to 3 second-stream tokens, but its cache holds 2");
}

// A fused gate_up projection split into views: the views are copied into whole buffers for the
// activation and the product (which take no views), at TP 1 to 3, against a direct computation.
struct GatedMlp : Weights {
  static constexpr int64_t kFf = 12;
  GatedMlp() {
    add("embed", {kVocab, kHidden});
    add("mlp.norm.weight", {kHidden});
    add("mlp.gate_up.weight", {2 * kFf, kHidden});
    add("mlp.down.weight", {kHidden, kFf});
    add("final.weight", {kHidden});
    add("lm_head.weight", {kVocab, kHidden});
  }
  graph::Graph graph() const {
    graph::GraphBuilder b;
    int x = b.embedding(b.input_ids(), "embed", kVocab, kHidden);
    b.begin_block("ToyMlp", "mlp");
    const int h = b.norm(x, TPE_NORM_RMS, "mlp.norm", false, 1e-6);
    std::vector<int> parts;
    b.split(b.linear(h, "mlp.gate_up", kHidden, 2 * kFf, false), TPE_SPLIT_CONCAT, {kFf, kFf}, 0, 0,
            parts);
    const int m = b.mul(b.activation(parts[0], TPE_ACT_SILU), parts[1]);
    x = b.add(x, b.linear(m, "mlp.down", kFf, kHidden, false));
    b.end_block();
    b.lm_head(b.norm(x, TPE_NORM_RMS, "final", false, 1e-6), "lm_head.weight", kVocab, kHidden);
    return b.finish();
  }
  Matrix reference(int64_t id) const {
    Matrix x = row(w("embed"), id, kHidden);
    const Matrix gu = matvec(w("mlp.gate_up.weight"), rms(x, w("mlp.norm.weight")), 2 * kFf);
    Matrix m(kFf);
    for (int64_t i = 0; i < kFf; ++i) m[i] = gu[i] / (1 + std::exp(-gu[i])) * gu[kFf + i];
    const Matrix y = matvec(w("mlp.down.weight"), m, kHidden);
    for (int64_t i = 0; i < kHidden; ++i) x[i] += y[i];
    return matvec(w("lm_head.weight"), rms(x, w("final.weight")), kVocab);
  }
};

TEST(FusedSplit, GateUpViewsAreCopiedForOpsThatTakeNone) {
  const GatedMlp model;
  const graph::Graph g = model.graph();
  backend::Batch pass;
  pass.tokens = {3, 9, 0};
  pass.segments = {{0, 0, 2}, {1, 0, 1}};
  pass.logit_rows = {0, 1, 2};
  for (int world = 1; world <= 3; ++world) {
    const program::Program p = program::lower(g, parallel::make_plan(g, world), 0);
    int views = 0, copies = 0;
    for (const auto& v : p.values) views += v.ld != 0;
    for (const auto& i : p.instrs) copies += i.code == program::Code::kCopy;
    EXPECT_EQ(views, 2) << "tp " << world;   // gate and up
    EXPECT_EQ(copies, 2) << "tp " << world;  // one before the activation, one before the product
    const std::vector<Tensor> logits = run(model, g, world, {pass});
    for (int64_t r = 0; r < 3; ++r) {
      const Matrix want = model.reference(pass.tokens[r]);
      for (int64_t i = 0; i < kVocab; ++i) {
        EXPECT_NEAR(logits[0].row(r)[i], want[i], 1e-4) << "tp " << world << " row " << r;
      }
    }
  }
}

}  // namespace
}  // namespace tpe
