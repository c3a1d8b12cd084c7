#include "core/runtime/executor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/common/error.hpp"

namespace tpe::runtime {

using graph::Op;
using graph::OpKind;
using parallel::LinearKind;
using parallel::Step;

namespace {

std::string slice_key(const std::string& name, const IndexSet& rows, const IndexSet& cols) {
  std::string key = name;
  for (const Range& r : rows) key += fmt::format("|r{}-{}", r.begin, r.end);
  for (const Range& c : cols) key += fmt::format("|c{}-{}", c.begin, c.end);
  return key;
}

}  // namespace

Executor::Executor(const graph::Graph& graph, const parallel::Plan& plan, int rank,
                   std::unique_ptr<Backend> backend)
    : graph_(graph),
      plan_(plan),
      rank_(rank),
      backend_(std::move(backend)),
      weights_(graph.ops.size()) {}

std::shared_ptr<const Buffer> Executor::read(const WeightReader& reader, const std::string& name,
                                             std::vector<int64_t> shape, const IndexSet& rows,
                                             const IndexSet& cols) {
  const std::string key = slice_key(name, rows, cols);
  auto it = loaded_.find(key);
  if (it != loaded_.end()) return it->second;
  const IndexSet row_set = rows.empty() ? IndexSet{{0, shape[0]}} : rows;
  const int64_t n_cols = shape.size() < 2 ? 1 : cols.empty() ? shape[1] : index_count(cols);
  auto buffer = std::make_shared<const Buffer>(backend_->load(
      index_count(row_set), n_cols,
      [&reader, name, shape, row_set, cols](int64_t first, int64_t count, std::span<float> out) {
        reader(name, shape, index_slice(row_set, first, count), cols, out);
      }));
  loaded_.emplace(key, buffer);
  return buffer;
}

void Executor::load(const WeightReader& reader, const std::function<void()>& on_tensor) {
  backend_->bind_thread();
  try {
    load_all(reader, on_tensor);
  } catch (...) {
    // Pieces may still be read on other threads: wait for them before `reader` goes away.
    try {
      backend_->end_loading();
    } catch (...) {  // the first error is the one to report
    }
    throw;
  }
  backend_->end_loading();
}

void Executor::load_all(const WeightReader& reader, const std::function<void()>& on_tensor) {
  const IndexSet all;
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    Weights& w = weights_[i];
    const Range vocab = plan_.vocab[rank_];
    switch (op.kind) {
      case OpKind::kEmbedding:
      case OpKind::kLmHead:
        w.w = read(reader, op.name, {op.out_features, op.in_features}, {{vocab.begin, vocab.end}},
                   all);
        on_tensor();
        break;
      case OpKind::kNorm: {
        const int64_t width = graph_.values[op.inputs[0]].width;
        w.w = read(reader, op.name + ".weight", {width}, all, all);
        on_tensor();
        if (op.has_bias) {
          w.b = read(reader, op.name + ".bias", {width}, all, all);
          on_tensor();
        }
        break;
      }
      case OpKind::kLinear: {
        const std::vector<int64_t> shape = {op.out_features, op.in_features};
        if (plan_.linear_kind[i] == LinearKind::kColumn) {
          const IndexSet& rows = plan_.shard[op.outputs[0]][rank_];
          w.w = read(reader, op.name + ".weight", shape, rows, all);
          if (op.has_bias) w.b = read(reader, op.name + ".bias", {op.out_features}, rows, all);
        } else {
          w.w = read(reader, op.name + ".weight", shape, all, plan_.shard[op.inputs[0]][rank_]);
          // A row-parallel output is a sum over ranks: its bias is added once, by rank 0.
          if (op.has_bias && rank_ == 0) {
            w.b = read(reader, op.name + ".bias", {op.out_features}, all, all);
          }
        }
        on_tensor();
        if (op.has_bias) on_tensor();
        break;
      }
      default:
        break;
    }
  }
}

int64_t Executor::weight_bytes() const {
  int64_t bytes = 0;
  for (const auto& [key, b] : loaded_) bytes += b->rows * b->cols * backend_->element_bytes();
  return bytes;
}

int64_t Executor::kv_cache_bytes() const {
  int64_t bytes = 0;
  for (const KvCache& c : caches_) {
    bytes += (c.k.rows * c.k.cols + c.v.rows * c.v.cols) * backend_->element_bytes();
  }
  return bytes;
}

double Executor::copy_bandwidth_gbs() {
  backend_->bind_thread();
  return backend_->copy_bandwidth_gbs();
}

void Executor::reset_cache(int slots, int64_t max_len) {
  backend_->bind_thread();
  caches_.assign(graph_.ops.size(), {});
  if (slots == 0) return;
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    if (op.kind != OpKind::kAttention) continue;
    const int64_t width = index_count(plan_.shard[op.inputs[1]][rank_]);
    caches_[i] = {backend_->alloc(slots * max_len, width), backend_->alloc(slots * max_len, width),
                  max_len};
  }
}

std::string Executor::step_label(const Step& step) const {
  if (step.kind == Step::Kind::kAllReduce) return "all_reduce";
  const std::string name = graph_.relative_name(step.index);
  const std::string kind = graph::op_kind_name(graph_.ops[step.index].kind);
  return name.empty() ? kind : kind + " " + name;
}

Tensor Executor::forward(const Batch& batch, std::vector<StepTime>* profile) {
  const Op* embedding = nullptr;
  for (const Op& op : graph_.ops) {
    if (op.kind == OpKind::kEmbedding) embedding = &op;
  }
  for (const int64_t id : batch.tokens) {
    if (embedding != nullptr && (id < 0 || id >= embedding->out_features)) {
      fail("token id {} is out of range for the vocabulary of {} tokens ({})", id,
           embedding->out_features, embedding->name);
    }
  }
  backend_->bind_thread();
  backend_->begin(batch);
  if (profile != nullptr) backend_->profile_begin();
  std::vector<Buffer> values(graph_.values.size());
  for (const Step& step : plan_.steps) {
    if (step.kind == Step::Kind::kAllReduce) {
      backend_->all_reduce(values[step.index]);
    } else {
      run_op(step.index, batch, values);
    }
    if (profile != nullptr) backend_->profile_mark();
  }
  if (profile != nullptr) {
    const std::vector<double> ms = backend_->profile_end();
    profile->clear();
    for (size_t i = 0; i < plan_.steps.size(); ++i) {
      profile->push_back({step_label(plan_.steps[i]), ms.at(i)});
    }
  }
  return backend_->to_host(values[graph_.logits]);
}

void Executor::run_op(int index, const Batch& batch, std::vector<Buffer>& values) {
  const Op& op = graph_.ops[index];
  const Weights& w = weights_[index];
  const int64_t tokens = static_cast<int64_t>(batch.tokens.size());
  const auto in = [&](size_t k) -> const Buffer& { return values[op.inputs[k]]; };
  Buffer& out = values[op.outputs[0]];
  switch (op.kind) {
    case OpKind::kInputIds:
      break;
    case OpKind::kEmbedding:
      out = backend_->alloc(tokens, op.in_features);
      backend_->embedding(*w.w, plan_.vocab[rank_], out);
      break;
    case OpKind::kNorm:
      out = backend_->alloc(in(0).rows, in(0).cols);
      backend_->norm(op.norm_kind, in(0), *w.w, w.b.get(), static_cast<float>(op.eps), out);
      break;
    case OpKind::kLinear: {
      const int64_t width = plan_.linear_kind[index] == LinearKind::kColumn
                                ? index_count(plan_.shard[op.outputs[0]][rank_])
                                : op.out_features;
      out = backend_->alloc(in(0).rows, width);
      backend_->linear(in(0), *w.w, w.b.get(), out);
      break;
    }
    case OpKind::kSplit:
      for (size_t p = 0; p < op.outputs.size(); ++p) {
        const IndexSet& cols = plan_.split_parts[index][rank_][p];
        values[op.outputs[p]] = backend_->alloc(in(0).rows, index_count(cols));
        backend_->gather_columns(in(0), cols, values[op.outputs[p]]);
      }
      break;
    case OpKind::kRotary:
      out = backend_->alloc(in(0).rows, in(0).cols);
      backend_->copy(in(0), out);
      backend_->rotary(out, op.head_dim, op.rope);
      break;
    case OpKind::kAttention: {
      const tpe_attention_desc& a = op.attention;
      const IndexSet& q_set = plan_.shard[op.inputs[0]][rank_];
      const IndexSet& kv_set = plan_.shard[op.inputs[1]][rank_];
      AttentionShape shape;
      shape.head_dim = a.head_dim;
      shape.first_q = q_set.empty() ? 0 : q_set.front().begin / a.head_dim;
      shape.first_kv = kv_set.empty() ? 0 : kv_set.front().begin / a.head_dim;
      shape.group = a.n_heads / a.n_kv_heads;
      shape.scale = a.scale > 0 ? static_cast<float>(a.scale)
                                : 1.0f / std::sqrt(static_cast<float>(a.head_dim));
      shape.window = a.sliding_window;
      KvCache& cache = caches_[index];
      for (const Batch::Segment& s : batch.segments) {
        if (s.start_pos + s.count > cache.max_len) {
          fail("sequence {} reaches {} tokens, beyond the {} the KV cache was sized for", s.slot,
               s.start_pos + s.count, cache.max_len);
        }
      }
      out = backend_->alloc(in(0).rows, in(0).cols);
      backend_->attention(in(0), in(1), in(2), cache, shape, out);
      break;
    }
    case OpKind::kActivation:
      out = backend_->alloc(in(0).rows, in(0).cols);
      backend_->copy(in(0), out);
      backend_->activation(op.activation, out);
      break;
    case OpKind::kMul:
    case OpKind::kAdd: {
      out = backend_->alloc(in(0).rows, in(0).cols);
      const int skip = rank_ != 0 ? plan_.add_replicated_input[index] : -1;
      if (skip >= 0) {  // the replicated addend counts once, on rank 0
        backend_->copy(in(1 - skip), out);
      } else if (op.kind == OpKind::kMul) {
        backend_->mul(in(0), in(1), out);
      } else {
        backend_->add(in(0), in(1), out);
      }
      break;
    }
    case OpKind::kLmHead: {
      Buffer picked = backend_->alloc(static_cast<int64_t>(batch.logit_rows.size()), in(0).cols);
      backend_->select_rows(in(0), batch.logit_rows, picked);
      Buffer local = backend_->alloc(picked.rows, plan_.vocab[rank_].size());
      backend_->linear(picked, *w.w, nullptr, local);
      out = backend_->alloc(picked.rows, op.out_features);
      backend_->gather_vocab(local, plan_.vocab, out);
      break;
    }
  }
}

}  // namespace tpe::runtime
