#include "core/backend/cpu_backend.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/common/error.hpp"
#include "kernels/alibi.hpp"
#include "kernels/cpu/ops.hpp"

namespace tpe::backend {
namespace {

float* f32(Buffer& b) { return static_cast<float*>(b.data); }
const float* f32(const Buffer& b) { return static_cast<const float*>(b.data); }

}  // namespace

Buffer CpuBackend::load(int64_t rows, int64_t cols, const RowFill& fill) {
  Buffer out = alloc(rows, cols);
  fill(0, rows, {f32(out), static_cast<size_t>(rows * cols)});
  return out;
}

Buffer CpuBackend::alloc(int64_t rows, int64_t cols) {
  const int64_t bytes = rows * cols * static_cast<int64_t>(sizeof(float));
  auto* values = new std::vector<float>(static_cast<size_t>(rows * cols));
  tally_->add(bytes);
  std::shared_ptr<void> storage(values, [tally = tally_, bytes](void* p) {
    delete static_cast<std::vector<float>*>(p);
    tally->sub(bytes);
  });
  return {std::move(storage), values->data(), rows, cols};
}

Tensor CpuBackend::to_host(const Buffer& x) {
  Tensor t({x.rows, x.cols});
  std::copy_n(f32(x), x.rows * x.cols, t.data.begin());
  return t;
}

double CpuBackend::copy_bandwidth_gbs() {
  const size_t bytes = size_t{256} << 20;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 2.0 * static_cast<double>(bytes) / seconds / 1e9);
    std::swap(a, b);
  }
  return best;
}

void CpuBackend::embedding(const Buffer& table, Range vocab, Ids ids, Buffer& out) {
  const std::vector<int64_t> source = batch_->ids(ids);
  TPE_CHECK(static_cast<int64_t>(source.size()) == out.rows, "embedding: ids and rows differ");
  for (int64_t t = 0; t < out.rows; ++t) {
    const int64_t id = source[t];
    float* row = f32(out) + t * out.cols;
    if (id >= vocab.begin && id < vocab.end) {
      std::copy_n(f32(table) + (id - vocab.begin) * out.cols, out.cols, row);
    } else {
      std::fill_n(row, out.cols, 0.0f);
    }
  }
}

void CpuBackend::norm(tpe_norm_kind kind, const Buffer& x, const Buffer& w, const Buffer* b,
                      float eps, Buffer& y) {
  if (kind == TPE_NORM_RMS) {
    cpu::rms_norm(f32(x), x.rows, x.cols, f32(w), eps, f32(y));
  } else {
    cpu::layer_norm(f32(x), x.rows, x.cols, f32(w), b != nullptr ? f32(*b) : nullptr, eps, f32(y));
  }
}

void CpuBackend::linear(const Buffer& x, const Buffer& w, const Buffer* bias, Buffer& y) {
  cpu::linear(f32(x), x.rows, x.cols, f32(w), y.cols, bias != nullptr ? f32(*bias) : nullptr,
              f32(y));
}

void CpuBackend::gather_columns(const Buffer& x, const IndexSet& cols, Buffer& out) {
  for (int64_t t = 0; t < x.rows; ++t) {
    float* dst = f32(out) + t * out.cols;
    for (const Range& r : cols) {
      dst = std::copy(f32(x) + t * x.cols + r.begin, f32(x) + t * x.cols + r.end, dst);
    }
  }
}

void CpuBackend::rotary(Buffer& x, int rope_index) {
  const tpe_rope_desc& rope = ropes_.at(static_cast<size_t>(rope_index)).desc;
  const int64_t head_dim = ropes_[static_cast<size_t>(rope_index)].head_dim;
  int64_t row = 0;
  for (const Batch::Segment& s : batch_->segments) {
    // Frequencies per sequence: dynamic NTK scaling depends on the sequence's own length.
    std::vector<int64_t> positions(static_cast<size_t>(s.count));
    for (int64_t i = 0; i < s.count; ++i) positions[i] = s.start_pos + i;
    const std::vector<float> inv_freq =
        cpu::rope_inv_freq(rope, head_dim, s.rope_len > 0 ? s.rope_len : s.start_pos + s.count);
    cpu::rotary(f32(x) + row * x.stride(), s.count, x.cols / head_dim, head_dim, positions.data(),
                inv_freq, x.stride());
    row += s.count;
  }
}

void CpuBackend::attention(const Buffer& q, const Buffer& k, const Buffer& v, KvLayer& cache,
                           const AttentionShape& a, Buffer& out) {
  const int64_t n_q = q.cols / a.head_dim, n_kv = k.cols / a.head_dim;
  std::vector<int32_t> kv_of_q(static_cast<size_t>(n_q));
  for (int64_t h = 0; h < n_q; ++h) {
    kv_of_q[h] = static_cast<int32_t>((a.first_q + h) / a.group - a.first_kv);
  }
  // Rows first..first + count of k and v (views, perhaps) into the cache at slot, position.
  const auto append = [&](int64_t first, int64_t count, int slot, int64_t position) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t at = slot * cache.max_len + position + i;
      std::copy_n(f32(k) + (first + i) * k.stride(), k.cols, f32(cache.k) + at * k.cols);
      std::copy_n(f32(v) + (first + i) * v.stride(), v.cols, f32(cache.v) + at * v.cols);
    }
  };
  if (a.cross) {  // k, v: the second stream's rows; queries see all of their sequence's
    int64_t row = 0;
    for (const Batch::Segment& s : batch_->second.segments) {
      append(row, s.count, s.slot, s.start_pos);
      row += s.count;
    }
    row = 0;
    for (const Batch::Segment& s : batch_->segments) {
      cpu::attention_all(f32(q) + row * q.stride(), s.count, n_q, a.head_dim, kv_of_q.data(),
                         f32(cache.k) + s.slot * cache.max_len * k.cols,
                         f32(cache.v) + s.slot * cache.max_len * v.cols, n_kv, s.second_len,
                         a.scale, f32(out) + row * out.cols, q.stride());
      row += s.count;
    }
    return;
  }
  std::vector<float> slopes;
  for (int64_t h = 0; a.alibi_max_bias > 0 && h < n_q; ++h) {
    slopes.push_back(alibi_slope(a.first_q + h, a.alibi_heads, a.alibi_max_bias) * a.alibi_scale);
  }
  int64_t row = 0;
  for (const Batch::Segment& s : batch_->segments) {
    append(row, s.count, s.slot, s.start_pos);
    cpu::attention(f32(q) + row * q.stride(), s.count, s.start_pos, n_q, a.head_dim, kv_of_q.data(),
                   f32(cache.k) + s.slot * cache.max_len * k.cols,
                   f32(cache.v) + s.slot * cache.max_len * v.cols, n_kv, a.scale, a.window,
                   f32(out) + row * out.cols, q.stride(), slopes.empty() ? nullptr : slopes.data());
    row += s.count;
  }
}

void CpuBackend::activation(tpe_activation act, Buffer& x) {
  cpu::activation(act, f32(x), x.rows * x.cols);
}

void CpuBackend::gated_activation(tpe_activation act, const Buffer& gate, const Buffer& up,
                                  Buffer& out) {
  for (int64_t t = 0; t < out.rows; ++t) {
    float* row = f32(out) + t * out.cols;
    std::copy_n(f32(gate) + t * gate.stride(), out.cols, row);
    cpu::activation(act, row, out.cols);
    const float* u = f32(up) + t * up.stride();
    for (int64_t j = 0; j < out.cols; ++j) row[j] *= u[j];
  }
}

void CpuBackend::add(const Buffer& a, const Buffer& b, Buffer& out) {
  for (int64_t i = 0; i < a.rows * a.cols; ++i) f32(out)[i] = f32(a)[i] + f32(b)[i];
}

void CpuBackend::mul(const Buffer& a, const Buffer& b, Buffer& out) {
  for (int64_t i = 0; i < a.rows * a.cols; ++i) f32(out)[i] = f32(a)[i] * f32(b)[i];
}

void CpuBackend::copy(const Buffer& src, Buffer& dst) {
  for (int64_t r = 0; r < src.rows; ++r) {
    std::copy_n(f32(src) + r * src.stride(), src.cols, f32(dst) + r * dst.stride());
  }
}

void CpuBackend::select_rows(const Buffer& x, Buffer& out) {
  const std::vector<int64_t>& rows = batch_->logit_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::copy_n(f32(x) + rows[i] * x.cols, x.cols, f32(out) + static_cast<int64_t>(i) * x.cols);
  }
}

void CpuBackend::all_reduce(Buffer& x) { group_.all_reduce_sum(rank_, f32(x), x.rows * x.cols); }

void CpuBackend::broadcast(std::vector<int64_t>& values) {
  group_.broadcast(rank_, values.data(), static_cast<int64_t>(values.size()), 0);
}

void CpuBackend::gather_vocab(const Buffer& local, const std::vector<Range>& vocab, Buffer& full) {
  // Rank r's block is [rows, vocab_r] row-major, in rank order.
  std::vector<float> gathered(static_cast<size_t>(full.rows * full.cols));
  group_.all_gather(rank_, f32(local), local.rows * local.cols, gathered.data());
  int64_t offset = 0;
  for (const Range& v : vocab) {
    for (int64_t i = 0; i < full.rows; ++i) {
      std::copy_n(gathered.data() + offset + i * v.size(), v.size(),
                  f32(full) + i * full.cols + v.begin);
    }
    offset += full.rows * v.size();
  }
}

void CpuBackend::profile_begin() { marks_.assign(1, std::chrono::steady_clock::now()); }

void CpuBackend::profile_mark() { marks_.push_back(std::chrono::steady_clock::now()); }

std::vector<double> CpuBackend::profile_end() {
  std::vector<double> ms;
  for (size_t i = 1; i < marks_.size(); ++i) {
    ms.push_back(std::chrono::duration<double, std::milli>(marks_[i] - marks_[i - 1]).count());
  }
  marks_.clear();
  return ms;
}

}  // namespace tpe::backend
