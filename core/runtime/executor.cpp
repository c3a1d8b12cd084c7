#include "core/runtime/executor.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "core/common/error.hpp"

namespace tpe::runtime {

using backend::Batch;
using backend::Buffer;
using program::Code;
using program::Instr;

Executor::Executor(const graph::Graph& graph, program::Program program,
                   std::unique_ptr<backend::Backend> backend, bool replay)
    : graph_(graph), program_(std::move(program)), backend_(std::move(backend)), replay_(replay) {
  TPE_CHECK(program_.arena_bytes > 0, "the program's memory is not planned");
}

void Executor::load(const WeightReader& reader, const std::function<void()>& on_tensor) {
  backend_->bind_thread();
  try {
    // Rows [first, first + count) of one slice.
    const auto read_slice = [&reader](const program::Weight& w, int64_t first, int64_t count,
                                      std::span<float> out) {
      const IndexSet rows = w.rows.empty() ? IndexSet{{0, w.shape[0]}} : w.rows;
      if (!w.transposed) {
        reader(w.tensor, w.shape, index_slice(rows, first, count), w.cols, out);
        return;
      }
      // Stored [in, out]: the piece's rows are stored columns; read them, then transpose.
      const std::vector<int64_t> stored = w.stored_shape();
      const int64_t in = w.local_cols();
      std::vector<float> piece(out.size());
      reader(w.tensor, stored, w.cols.empty() ? IndexSet{{0, stored[0]}} : w.cols,
             index_slice(rows, first, count), piece);
      for (int64_t i = 0; i < in; ++i) {
        for (int64_t o = 0; o < count; ++o) out[o * in + i] = piece[i * count + o];
      }
    };
    for (const program::Weight& w : program_.weights) {
      weights_.push_back(std::make_shared<const Buffer>(backend_->load(
          w.local_rows(), w.local_cols(),
          [&read_slice, &w](int64_t first, int64_t count, std::span<float> out) {
            if (w.concat.empty()) return read_slice(w, first, count, out);
            // A merged projection: each part's rows that fall in the piece, in turn.
            int64_t at = 0;
            const int64_t cols = w.local_cols();
            for (const program::Weight& part : w.concat) {
              const int64_t n = part.local_rows();
              const int64_t lo = std::max(first, at), hi = std::min(first + count, at + n);
              if (lo < hi) {
                read_slice(part, lo - at, hi - lo,
                           out.subspan(static_cast<size_t>((lo - first) * cols),
                                       static_cast<size_t>((hi - lo) * cols)));
              }
              at += n;
            }
          })));
      on_tensor();
    }
  } catch (...) {
    // Pieces may still be read on other threads: wait for them before `reader` goes away.
    try {
      backend_->end_loading();
    } catch (...) {  // the first error is the one to report
    }
    throw;
  }
  backend_->end_loading();
  const int64_t e = backend_->element_bytes();
  TPE_CHECK(e == program_.limits.element_bytes, "the memory plan is for another element size");
  arena_ = backend_->alloc(1, (program_.arena_bytes + e - 1) / e);
  views_.assign(program_.values.size(), {});
  for (size_t v = 0; v < program_.values.size(); ++v) {
    const program::Value& value = program_.values[v];
    if (!value.stored) continue;
    views_[v] = {arena_.storage, static_cast<char*>(arena_.data) + value.offset, 0, value.width,
                 value.ld};
  }
  backend_->reserve_inputs(program_.limits.tokens, program_.limits.logit_rows, program_.ropes);
  collectives_ = backend_->connect();
}

int64_t Executor::weight_bytes() const {
  int64_t bytes = 0;
  for (const auto& b : weights_) bytes += b->rows * b->cols * backend_->element_bytes();
  return bytes;
}

double Executor::copy_bandwidth_gbs() {
  backend_->bind_thread();
  return backend_->copy_bandwidth_gbs();
}

void Executor::reset_cache(int slots, int64_t max_len, int64_t second_max_len) {
  backend_->bind_thread();
  if (slots == 0) {
    cache_.release();
  } else {
    cache_.reserve(*backend_, program_.cache_layers, slots, max_len, second_max_len);
  }
}

void Executor::check_ids(const Batch& batch) const {
  using backend::Ids;
  for (const Instr& instr : program_.instrs) {
    if (instr.code != Code::kEmbedding) continue;
    const bool second = instr.ids == Ids::kSecondTokens || instr.ids == Ids::kSecondTokenTypes;
    const std::vector<int64_t> ids = batch.ids(instr.ids);
    const size_t rows = second ? batch.second.tokens.size() : batch.tokens.size();
    const program::Weight& table = program_.weights[instr.weight];
    if (ids.size() != rows) {
      fail("embedding '{}' reads {} ids of the pass, whose stream has {} tokens", table.tensor,
           ids.size(), rows);
    }
    const graph::Op& embedding = graph_.ops[instr.op];
    const int64_t offset = graph_.ops[graph_.values[embedding.inputs[0]].producer].offset;
    for (const int64_t id : ids) {
      if (id >= 0 && id + offset < table.shape[0]) continue;
      if (instr.ids == Ids::kTokens) {
        fail("token id {} is out of range for the vocabulary of {} tokens", id, table.shape[0]);
      }
      if (instr.ids == Ids::kPositions) {
        fail("position {} is past the {} positions of the learned position table '{}'", id,
             table.shape[0] - offset, table.tensor);
      }
      fail("id {} is out of range for '{}', which has {} rows", id, table.tensor, table.shape[0]);
    }
  }
}

Tensor Executor::forward(const Batch& batch, std::vector<StepTime>* profile) {
  pass(batch, profile);
  return logits();
}

Tensor Executor::logits() {
  if (views_[program_.logits].rows == 0) return Tensor({0, program_.vocab_size});
  return backend_->to_host(views_[program_.logits]);
}

backend::TopRows Executor::forward_top(const Batch& batch, int64_t k,
                                       std::vector<StepTime>* profile) {
  pass(batch, profile);
  if (batch.logit_rows.empty()) return {};
  return backend_->top_rows(views_[program_.logits], k);
}

std::vector<int64_t> Executor::forward_greedy(const Batch& batch, std::vector<StepTime>* profile) {
  pass(batch, profile);
  if (batch.logit_rows.empty()) return {};
  return backend_->argmax_rows(views_[program_.logits]);
}

void Executor::pass(const Batch& batch, std::vector<StepTime>* profile) {
  const int64_t tokens = static_cast<int64_t>(batch.tokens.size());
  const int64_t logit_rows = static_cast<int64_t>(batch.logit_rows.size());
  const int64_t second = static_cast<int64_t>(batch.second.tokens.size());
  const program::Limits& limits = program_.limits;
  if (tokens > limits.tokens || logit_rows > limits.logit_rows || second > limits.second_tokens) {
    fail(
        "a pass of {} tokens, {} logit rows and {} second-stream tokens exceeds the {}, {} and {} "
        "the memory plan was sized for",
        tokens, logit_rows, second, limits.tokens, limits.logit_rows, limits.second_tokens);
  }
  check_ids(batch);
  for (const int64_t row : batch.logit_rows) TPE_CHECK(row >= 0 && row < tokens, "bad logit row");
  cache_.check(batch);
  backend_->bind_thread();
  for (size_t v = 0; v < views_.size(); ++v) {
    const program::Rows rows = program_.values[v].rows;
    views_[v].rows = rows == program::Rows::kTokens      ? tokens
                     : rows == program::Rows::kLogitRows ? logit_rows
                                                         : second;
  }
  backend_->begin(batch);
  if (cache_.generation() != recorded_generation_) {
    backend_->forget_recordings();
    recorded_.clear();
    recorded_generation_ = cache_.generation();
  }
  const int key = static_cast<int>(tokens);
  if (profile == nullptr && replay_ && backend_->can_replay() && batch.is_decode()) {
    auto it = recorded_.find(key);
    if (it != recorded_.end() && !it->second) {  // seen once: its lazy setup is done
      backend_->record_begin();
      run(batch, false);
      backend_->record_end(key);
      it->second = true;
    }
    if (it != recorded_.end() && backend_->replay(key)) {
      ++replays_;
    } else if (it != recorded_.end()) {
      // The backend dropped its recordings (memory they refer to moved): run it, record it next.
      it->second = false;
      run(batch, false);
    } else {
      recorded_.emplace(key, false);
      run(batch, false);
    }
  } else {
    run(batch, profile != nullptr);
  }
  cache_.advance(batch);
  if (profile != nullptr) {
    const std::vector<double> ms = backend_->profile_end();
    profile->clear();
    for (size_t i = 0; i < program_.instrs.size(); ++i) {
      profile->push_back({program::instr_label(graph_, program_.instrs[i]), ms.at(i)});
    }
  }
}

void Executor::run(const Batch& batch, bool profile) {
  if (profile) backend_->profile_begin();
  for (const Instr& instr : program_.instrs) {
    // A pass that wants no logits (a prompt chunk that ends no sequence) skips the lm_head.
    if (batch.logit_rows.empty() && program_.values[instr.out].rows == program::Rows::kLogitRows) {
      if (profile) backend_->profile_mark();
      continue;
    }
    run_instr(instr);
    if (profile) backend_->profile_mark();
  }
}

void Executor::run_instr(const Instr& instr) {
  const auto in = [&](size_t k) -> const Buffer& { return views_[instr.in[k]]; };
  Buffer& out = views_[instr.out];
  const Buffer* bias = instr.bias >= 0 ? weights_[instr.bias].get() : nullptr;
  const bool in_place = !instr.in.empty() && out.data == in(0).data;
  switch (instr.code) {
    case Code::kEmbedding:
      backend_->embedding(*weights_[instr.weight], instr.vocab, instr.ids, out);
      break;
    case Code::kNorm: {
      const graph::Op& op = graph_.ops[instr.op];
      backend_->norm(op.norm_kind, in(0), *weights_[instr.weight], bias, static_cast<float>(op.eps),
                     out);
      break;
    }
    case Code::kLinear:
      backend_->linear(in(0), *weights_[instr.weight], bias, out);
      break;
    case Code::kLinearActivation:
      backend_->linear_activation(graph_.ops[instr.op].activation, in(0), *weights_[instr.weight],
                                  bias, out);
      break;
    case Code::kGather:
      backend_->gather_columns(in(0), instr.cols, out);
      break;
    case Code::kRotary:
      if (!in_place) backend_->copy(in(0), out);
      backend_->rotary(out, instr.rope);
      break;
    case Code::kAttention:
      if (instr.rope >= 0) {
        backend_->rotary_attention(views_[instr.in[0]], views_[instr.in[1]], in(2),
                                   cache_.layer(instr.cache), instr.attention, instr.rope, out);
      } else {
        backend_->attention(in(0), in(1), in(2), cache_.layer(instr.cache), instr.attention, out);
      }
      break;
    case Code::kAddNorm: {
      const graph::Op& op = graph_.ops[instr.op];
      backend_->add_norm(op.norm_kind, in(0), in(1), *weights_[instr.weight], bias,
                         static_cast<float>(op.eps), views_[instr.sum], out);
      break;
    }
    case Code::kActivation:
      if (!in_place) backend_->copy(in(0), out);
      backend_->activation(graph_.ops[instr.op].activation, out);
      break;
    case Code::kAdd:
      backend_->add(in(0), in(1), out);
      break;
    case Code::kGatedActivation:
      backend_->gated_activation(graph_.ops[instr.op].activation, in(0), in(1), out);
      break;
    case Code::kMul:
      backend_->mul(in(0), in(1), out);
      break;
    case Code::kCopy:
      backend_->copy(in(0), out);
      break;
    case Code::kSelectRows:
      backend_->select_rows(in(0), out);
      break;
    case Code::kGatherVocab:
      backend_->gather_vocab(in(0), program_.vocab, out);
      break;
    case Code::kAllReduce:
      backend_->all_reduce(out);
      break;
    case Code::kAllReduceNorm: {
      const graph::Op& op = graph_.ops[instr.op];
      backend_->all_reduce_norm(op.norm_kind, views_[instr.sum], *weights_[instr.weight], bias,
                                static_cast<float>(op.eps), out);
      break;
    }
  }
}

}  // namespace tpe::runtime
