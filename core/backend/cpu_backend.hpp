// The CPU backend: fp32 host memory, the reference kernels of kernels/cpu, and the in-process
// communicator (ranks are threads).
#pragma once

#include <chrono>

#include "core/backend/backend.hpp"
#include "core/comm/communicator.hpp"

namespace tpe::backend {

class CpuBackend final : public Backend {
 public:
  CpuBackend(int rank, comm::ThreadGroup& group) : rank_(rank), group_(group) {}

  Buffer load(int64_t rows, int64_t cols, const RowFill& fill) override;
  Buffer alloc(int64_t rows, int64_t cols) override;
  int64_t element_bytes() const override { return sizeof(float); }
  Tensor to_host(const Buffer& x) override;
  double copy_bandwidth_gbs() override;

  void reserve_inputs(int64_t, int64_t, std::vector<RopeSpec> ropes) override {
    ropes_ = std::move(ropes);
  }
  void begin(const Batch& batch) override { batch_ = &batch; }
  void embedding(const Buffer& table, Range vocab, Ids ids, Buffer& out) override;
  void norm(tpe_norm_kind kind, const Buffer& x, const Buffer& w, const Buffer* b, float eps,
            Buffer& y) override;
  void linear(const Buffer& x, const Buffer& w, const Buffer* bias, Buffer& y) override;
  void gather_columns(const Buffer& x, const IndexSet& cols, Buffer& out) override;
  void rotary(Buffer& x, int rope) override;
  void attention(const Buffer& q, const Buffer& k, const Buffer& v, KvLayer& cache,
                 const AttentionShape& shape, Buffer& out) override;
  void activation(tpe_activation act, Buffer& x) override;
  void gated_activation(tpe_activation act, const Buffer& gate, const Buffer& up,
                        Buffer& out) override;
  void add(const Buffer& a, const Buffer& b, Buffer& out) override;
  void mul(const Buffer& a, const Buffer& b, Buffer& out) override;
  void copy(const Buffer& src, Buffer& dst) override;
  void select_rows(const Buffer& x, Buffer& out) override;
  void all_reduce(Buffer& x) override;
  void broadcast(std::vector<int64_t>& values) override;
  void gather_vocab(const Buffer& local, const std::vector<Range>& vocab, Buffer& full) override;
  void profile_begin() override;
  void profile_mark() override;
  std::vector<double> profile_end() override;

 private:
  std::vector<std::chrono::steady_clock::time_point> marks_;
  int rank_;
  comm::ThreadGroup& group_;
  const Batch* batch_ = nullptr;
  std::vector<RopeSpec> ropes_;
};

}  // namespace tpe::backend
