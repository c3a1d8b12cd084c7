#include "core/runtime/executor.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/common/error.hpp"
#include "kernels/cpu/ops.hpp"

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

// Copies the columns `set` (in order) of x into a [rows, count(set)] tensor.
Tensor gather_columns(const Tensor& x, const IndexSet& set) {
  Tensor out({x.rows(), index_count(set)});
  for (int64_t t = 0; t < x.rows(); ++t) {
    float* dst = out.row(t);
    for (const Range& r : set) {
      std::copy(x.row(t) + r.begin, x.row(t) + r.end, dst);
      dst += r.size();
    }
  }
  return out;
}

}  // namespace

Executor::Executor(const graph::Graph& graph, const parallel::Plan& plan, int rank,
                   parallel::ThreadGroup& group)
    : graph_(graph), plan_(plan), rank_(rank), group_(group), weights_(graph.ops.size()) {}

std::shared_ptr<const std::vector<float>> Executor::read(const WeightReader& reader,
                                                         const std::string& name,
                                                         std::vector<int64_t> shape,
                                                         const IndexSet& rows,
                                                         const IndexSet& cols) {
  const std::string key = slice_key(name, rows, cols);
  auto it = loaded_.find(key);
  if (it != loaded_.end()) return it->second;
  auto data = std::make_shared<const std::vector<float>>(reader(name, shape, rows, cols));
  loaded_.emplace(key, data);
  return data;
}

void Executor::load(const WeightReader& reader, const std::function<void()>& on_tensor) {
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
  for (const auto& [key, data] : loaded_)
    bytes += static_cast<int64_t>(data->size() * sizeof(float));
  return bytes;
}

void Executor::reset_cache(int slots, int64_t max_len) {
  max_len_ = max_len;
  k_cache_.assign(graph_.ops.size(), {});
  v_cache_.assign(graph_.ops.size(), {});
  for (size_t i = 0; i < graph_.ops.size(); ++i) {
    const Op& op = graph_.ops[i];
    if (op.kind != OpKind::kAttention) continue;
    const int64_t width = index_count(plan_.shard[op.inputs[1]][rank_]);
    k_cache_[i].assign(slots, std::vector<float>(static_cast<size_t>(max_len * width)));
    v_cache_[i].assign(slots, std::vector<float>(static_cast<size_t>(max_len * width)));
  }
}

Tensor Executor::forward(const Batch& batch) {
  std::vector<Tensor> values(graph_.values.size());
  for (const Step& step : plan_.steps) {
    if (step.kind == Step::Kind::kAllReduce) {
      Tensor& v = values[step.index];
      group_.all_reduce_sum(rank_, v.data.data(), v.numel());
    } else {
      run_op(step.index, batch, values);
    }
  }
  return std::move(values[graph_.logits]);
}

void Executor::run_op(int index, const Batch& batch, std::vector<Tensor>& values) {
  const Op& op = graph_.ops[index];
  const Weights& w = weights_[index];
  const int64_t tokens = static_cast<int64_t>(batch.tokens.size());
  const auto in = [&](size_t k) -> const Tensor& { return values[op.inputs[k]]; };
  Tensor& out = values[op.outputs[0]];
  switch (op.kind) {
    case OpKind::kInputIds:
      break;
    case OpKind::kEmbedding: {
      const Range vocab = plan_.vocab[rank_];
      out = Tensor({tokens, op.in_features});
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t id = batch.tokens[t];
        if (id < 0 || id >= op.out_features) {
          fail("token id {} is out of range for the vocabulary of {} tokens ({})", id,
               op.out_features, op.name);
        }
        if (id >= vocab.begin && id < vocab.end) {
          std::copy_n(w.w->data() + (id - vocab.begin) * op.in_features, op.in_features,
                      out.row(t));
        }
      }
      break;
    }
    case OpKind::kNorm: {
      const Tensor& x = in(0);
      out = Tensor(x.shape);
      if (op.norm_kind == TPE_NORM_RMS) {
        cpu::rms_norm(x.data.data(), x.rows(), x.cols(), w.w->data(), static_cast<float>(op.eps),
                      out.data.data());
      } else {
        cpu::layer_norm(x.data.data(), x.rows(), x.cols(), w.w->data(), w.b ? w.b->data() : nullptr,
                        static_cast<float>(op.eps), out.data.data());
      }
      break;
    }
    case OpKind::kLinear: {
      const Tensor& x = in(0);
      const int64_t out_width = plan_.linear_kind[index] == LinearKind::kColumn
                                    ? index_count(plan_.shard[op.outputs[0]][rank_])
                                    : op.out_features;
      out = Tensor({x.rows(), out_width});
      cpu::linear(x.data.data(), x.rows(), x.cols(), w.w->data(), out_width,
                  w.b ? w.b->data() : nullptr, out.data.data());
      break;
    }
    case OpKind::kSplit:
      for (size_t p = 0; p < op.outputs.size(); ++p) {
        values[op.outputs[p]] = gather_columns(in(0), plan_.split_parts[index][rank_][p]);
      }
      break;
    case OpKind::kRotary: {
      // Frequencies per sequence: dynamic NTK scaling depends on the sequence's own length.
      out = in(0);
      int64_t row = 0;
      for (const Batch::Segment& s : batch.segments) {
        std::vector<int64_t> positions(static_cast<size_t>(s.count));
        for (int64_t i = 0; i < s.count; ++i) positions[i] = s.start_pos + i;
        const std::vector<float> inv_freq =
            cpu::rope_inv_freq(op.rope, op.head_dim, s.start_pos + s.count);
        cpu::rotary(out.row(row), s.count, out.cols() / op.head_dim, op.head_dim, positions.data(),
                    inv_freq);
        row += s.count;
      }
      break;
    }
    case OpKind::kAttention:
      run_attention(index, batch, values);
      break;
    case OpKind::kActivation:
      out = in(0);
      cpu::activation(op.activation, out.data.data(), out.numel());
      break;
    case OpKind::kMul:
    case OpKind::kAdd: {
      const int skip = rank_ != 0 ? plan_.add_replicated_input[index] : -1;
      if (skip >= 0) {  // the replicated addend counts once, on rank 0
        out = in(1 - skip);
        break;
      }
      out = in(0);
      const std::vector<float>& b = in(1).data;
      if (op.kind == OpKind::kMul) {
        for (size_t i = 0; i < out.data.size(); ++i) out.data[i] *= b[i];
      } else {
        for (size_t i = 0; i < out.data.size(); ++i) out.data[i] += b[i];
      }
      break;
    }
    case OpKind::kLmHead: {
      const Tensor& x = in(0);
      const int64_t rows = static_cast<int64_t>(batch.logit_rows.size());
      Tensor picked({rows, x.cols()});
      for (int64_t i = 0; i < rows; ++i) {
        std::copy_n(x.row(batch.logit_rows[i]), x.cols(), picked.row(i));
      }
      const Range vocab = plan_.vocab[rank_];
      Tensor local({rows, vocab.size()});
      cpu::linear(picked.data.data(), rows, x.cols(), w.w->data(), vocab.size(), nullptr,
                  local.data.data());
      // Gather the vocabulary slices: rank r's block is [rows, vocab_r], in rank order.
      std::vector<float> gathered(static_cast<size_t>(rows * op.out_features));
      group_.all_gather(rank_, local.data.data(), local.numel(), gathered.data());
      out = Tensor({rows, op.out_features});
      int64_t offset = 0;
      for (const Range& v : plan_.vocab) {
        for (int64_t i = 0; i < rows; ++i) {
          std::copy_n(gathered.data() + offset + i * v.size(), v.size(), out.row(i) + v.begin);
        }
        offset += rows * v.size();
      }
      break;
    }
  }
}

void Executor::run_attention(int index, const Batch& batch, std::vector<Tensor>& values) {
  const Op& op = graph_.ops[index];
  const tpe_attention_desc& a = op.attention;
  const Tensor& q = values[op.inputs[0]];
  const Tensor& k = values[op.inputs[1]];
  const Tensor& v = values[op.inputs[2]];
  const IndexSet& q_set = plan_.shard[op.inputs[0]][rank_];
  const IndexSet& kv_set = plan_.shard[op.inputs[1]][rank_];
  const int64_t hd = a.head_dim;
  const int64_t n_q = q.cols() / hd, n_kv = k.cols() / hd;
  // Local q head j reads global kv head (global q head / group), at its local position.
  const int64_t group = a.n_heads / a.n_kv_heads;
  const int64_t first_q = q_set.empty() ? 0 : q_set.front().begin / hd;
  const int64_t first_kv = kv_set.empty() ? 0 : kv_set.front().begin / hd;
  std::vector<int32_t> kv_of_q(static_cast<size_t>(n_q));
  for (int64_t j = 0; j < n_q; ++j) {
    kv_of_q[j] = static_cast<int32_t>((first_q + j) / group - first_kv);
  }
  const float scale =
      a.scale > 0 ? static_cast<float>(a.scale) : 1.0f / std::sqrt(static_cast<float>(hd));
  Tensor& out = values[op.outputs[0]];
  out = Tensor({q.rows(), q.cols()});
  int64_t row = 0;
  for (const Batch::Segment& s : batch.segments) {
    if (s.start_pos + s.count > max_len_) {
      fail("sequence {} reaches {} tokens, beyond the {} the KV cache was sized for", s.slot,
           s.start_pos + s.count, max_len_);
    }
    std::vector<float>& kc = k_cache_[index][s.slot];
    std::vector<float>& vc = v_cache_[index][s.slot];
    std::copy_n(k.row(row), s.count * k.cols(), kc.data() + s.start_pos * k.cols());
    std::copy_n(v.row(row), s.count * v.cols(), vc.data() + s.start_pos * v.cols());
    cpu::attention(q.row(row), s.count, s.start_pos, n_q, hd, kv_of_q.data(), kc.data(), vc.data(),
                   n_kv, scale, a.sliding_window, out.row(row));
    row += s.count;
  }
}

}  // namespace tpe::runtime
