#include "core/cuda/cuda_backend.hpp"

#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <future>
#include <mutex>
#include <thread>

#include <unistd.h>

#include "core/common/error.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/cuda/check.hpp"

#define TPE_NCCL_CHECK(call)                                         \
  do {                                                               \
    const ncclResult_t tpe_nccl_result_ = (call);                    \
    if (tpe_nccl_result_ != ncclSuccess) {                           \
      ::tpe::fail("{}:{}: {} failed: {}", __FILE__, __LINE__, #call, \
                  ncclGetErrorString(tpe_nccl_result_));             \
    }                                                                \
  } while (0)

namespace tpe::backend {

cuda::DType cuda_dtype(const std::string& name) {
  if (name == "float32") return cuda::DType::kF32;
  if (name == "float16") return cuda::DType::kF16;
  if (name == "bfloat16") return cuda::DType::kBF16;
  fail("dtype '{}' is not one of float32, float16, bfloat16", name);
}

void check_gpu_count(int needed) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    fail("device = \"cuda\": no usable CUDA device or driver ({})", cudaGetErrorString(error));
  }
  if (needed > count) {
    fail("this process needs {} GPUs, but sees {} (CUDA_VISIBLE_DEVICES limits them)", needed,
         count);
  }
}

void check_fits(int device, int64_t bytes) {
  TPE_CUDA_CHECK(cudaSetDevice(device));
  size_t free_bytes = 0, total = 0;
  TPE_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  if (static_cast<double>(bytes) > static_cast<double>(free_bytes)) {
    fail(
        "GPU {} needs {:.2f} GiB for its weights (from the plan) but has {:.2f} of {:.2f} GiB "
        "free: use a larger --tp or a smaller dtype",
        device, static_cast<double>(bytes) / (1 << 30), static_cast<double>(free_bytes) / (1 << 30),
        static_cast<double>(total) / (1 << 30));
  }
}

NcclGroup::NcclGroup(int world) : comms_(static_cast<size_t>(world)) {
  std::vector<int> devices(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) devices[r] = r;
  TPE_NCCL_CHECK(ncclCommInitAll(comms_.data(), world, devices.data()));
}

NcclGroup::NcclGroup(const comm::LaunchEnv& launch)
    : comms_(static_cast<size_t>(launch.world), nullptr) {
  ncclUniqueId id;
  std::array<char, 128> bytes{};
  static_assert(sizeof(id) == bytes.size());
  if (launch.rank == 0) {
    TPE_NCCL_CHECK(ncclGetUniqueId(&id));
    std::memcpy(bytes.data(), &id, bytes.size());
  }
  comm::exchange_id(launch, bytes);
  std::memcpy(&id, bytes.data(), bytes.size());
  TPE_CUDA_CHECK(cudaSetDevice(launch.local_rank));
  TPE_NCCL_CHECK(ncclCommInitRank(&comms_[launch.rank], launch.world, id, launch.rank));
}

NcclGroup::~NcclGroup() {
  for (ncclComm_t comm : comms_) {
    if (comm != nullptr) ncclCommDestroy(comm);
  }
}

void NcclGroup::abort(int rank) {
  if (comms_[rank] != nullptr) ncclCommAbort(comms_[rank]);
  comms_[rank] = nullptr;
}

// Device memory by size class: a forward pass allocates every activation anew, and cudaMalloc
// would synchronise the device each time. Blocks return to the pool when their Buffer dies; the
// tally counts the blocks handed out (not the ones kept for reuse).
class CudaBackend::Pool {
 public:
  Pool(int device, std::shared_ptr<MemoryTally> tally)
      : device_(device), tally_(std::move(tally)) {}
  ~Pool() {
    cudaSetDevice(device_);
    for (auto& [size, ptr] : free_) cudaFree(ptr);
  }
  std::shared_ptr<void> get(size_t bytes, const std::shared_ptr<Pool>& self) {
    bytes = std::max<size_t>(256, (bytes + 255) / 256 * 256);
    void* ptr = nullptr;
    {
      std::lock_guard lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        ptr = it->second;
        free_.erase(it);
      }
    }
    if (ptr == nullptr) {
      const cudaError_t error = cudaMalloc(&ptr, bytes);
      if (error != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free error state of a failed allocation
        size_t free_bytes = 0, total = 0;
        cudaMemGetInfo(&free_bytes, &total);
        fail("GPU {}: cannot allocate {:.1f} MiB ({:.1f} of {:.1f} GiB free): {}", device_,
             static_cast<double>(bytes) / (1 << 20), static_cast<double>(free_bytes) / (1 << 30),
             static_cast<double>(total) / (1 << 30), cudaGetErrorString(error));
      }
    }
    tally_->add(static_cast<int64_t>(bytes));
    return std::shared_ptr<void>(ptr, [self, bytes](void* p) {
      self->tally_->sub(static_cast<int64_t>(bytes));
      std::lock_guard lock(self->mutex_);
      self->free_.emplace(bytes, p);
    });
  }

 private:
  int device_;
  std::shared_ptr<MemoryTally> tally_;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
};

// Weights travel host -> GPU through a ring of pinned buffers ("slots"): while earlier pieces are
// copied (and converted to the model's dtype on the device), the next pieces are read from the
// checkpoint on worker threads, one per slot. Host memory stays at slots x slot size whatever the
// model, and reading overlaps copying. TPENGINE_LOAD_STAGING_MB sets the slot size (default 32).
class CudaBackend::Stager {
 public:
  Stager(cuda::DType dtype, cudaStream_t stream) : dtype_(dtype), stream_(stream) {
    const char* env = std::getenv("TPENGINE_LOAD_STAGING_MB");
    const double mb = env != nullptr && std::atof(env) > 0 ? std::atof(env) : 32.0;
    capacity_ = std::max<int64_t>(1, static_cast<int64_t>(mb * (1 << 20)) / 4);
    for (Slot& s : slots_)
      TPE_CUDA_CHECK(cudaEventCreateWithFlags(&s.copied, cudaEventDisableTiming));
  }
  ~Stager() {
    wait_fills();
    cudaStreamSynchronize(stream_);
    for (Slot& s : slots_) {
      cudaEventDestroy(s.copied);
      if (s.host != nullptr) cudaFreeHost(s.host);
      if (s.device != nullptr) cudaFree(s.device);
    }
  }
  Stager(const Stager&) = delete;
  Stager& operator=(const Stager&) = delete;

  // Floats a piece may hold; a row longer than that is one piece of its own.
  int64_t capacity() const { return capacity_; }

  // Queues rows [first, first + rows) of a weight of `cols` columns, to go to `dst`.
  void submit(void* dst, int64_t first, int64_t rows, int64_t cols, const RowFill& fill) {
    Slot& s = slots_[next_++ % slots_.size()];
    if (s.pending) drain(s);
    TPE_CUDA_CHECK(cudaEventSynchronize(s.copied));  // its previous piece has left it
    const int64_t count = rows * cols;
    if (count > s.size) {
      if (s.host != nullptr) TPE_CUDA_CHECK(cudaFreeHost(s.host));
      if (s.device != nullptr) TPE_CUDA_CHECK(cudaFree(s.device));
      s.host = nullptr;
      s.device = nullptr;
      s.size = std::max(count, capacity_);
      TPE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&s.host),
                                   static_cast<size_t>(s.size) * 4, cudaHostAllocDefault));
      if (dtype_ != cuda::DType::kF32) {
        TPE_CUDA_CHECK(cudaMalloc(&s.device, static_cast<size_t>(s.size) * 4));
      }
    }
    s.dst = dst;
    s.count = count;
    s.pending = true;
    s.filled = std::async(std::launch::async, [fill, host = s.host, first, rows, count] {
      fill(first, rows, {host, static_cast<size_t>(count)});
    });
  }

  // Queues the copies of every piece still on the host, in order; rethrows a fill's error after
  // waiting for the other fills.
  void finish() {
    try {
      for (size_t i = 0; i < slots_.size(); ++i) {
        Slot& s = slots_[(next_ + i) % slots_.size()];
        if (s.pending) drain(s);
      }
    } catch (...) {
      wait_fills();
      throw;
    }
  }

 private:
  struct Slot {
    float* host = nullptr;   // pinned
    void* device = nullptr;  // fp32 on the device, to convert from (fp16/bf16 models)
    int64_t size = 0;        // floats each holds
    cudaEvent_t copied = nullptr;
    std::future<void> filled;
    void* dst = nullptr;
    int64_t count = 0;
    bool pending = false;
  };

  void drain(Slot& s) {
    s.pending = false;
    s.filled.get();
    const size_t bytes = static_cast<size_t>(s.count) * 4;
    if (dtype_ == cuda::DType::kF32) {
      TPE_CUDA_CHECK(cudaMemcpyAsync(s.dst, s.host, bytes, cudaMemcpyHostToDevice, stream_));
    } else {
      TPE_CUDA_CHECK(cudaMemcpyAsync(s.device, s.host, bytes, cudaMemcpyHostToDevice, stream_));
      cuda::convert(s.device, cuda::DType::kF32, s.dst, dtype_, s.count, stream_);
    }
    TPE_CUDA_CHECK(cudaEventRecord(s.copied, stream_));
  }

  void wait_fills() {
    for (Slot& s : slots_) {
      if (s.filled.valid()) s.filled.wait();
      s.pending = false;
    }
  }

  cuda::DType dtype_;
  cudaStream_t stream_;
  int64_t capacity_ = 0;
  std::array<Slot, 4> slots_;
  size_t next_ = 0;
};

// The one-shot all-reduce's largest message: a decode step's hidden states up to batch 64 at a
// width of 8192 in 16 bits. Larger ones (prompts) go to NCCL, whose ring reads each byte once.
constexpr int64_t kPeerCapacity = int64_t{1} << 20;

struct CudaBackend::Peers {
  void* region = nullptr;         // this rank's (flags, counters, staging)
  std::vector<void*> opened;      // other processes' regions, mapped through CUDA IPC
  volatile int* abort = nullptr;  // pinned and mapped: the kernels' way out of a wait
  cuda::PeerGroup group{};
  Peers() = default;
  Peers(const Peers&) = delete;
  Peers& operator=(const Peers&) = delete;
  ~Peers() {
    for (void* p : opened) cudaIpcCloseMemHandle(p);
    if (region != nullptr) cudaFree(region);
    if (abort != nullptr) cudaFreeHost(const_cast<int*>(abort));
  }
};

CudaBackend::CudaBackend(int rank, int device, cuda::DType dtype, NcclGroup* nccl,
                         comm::ThreadGroup& group, bool peer_all_reduce)
    : rank_(rank),
      device_(device),
      dtype_(dtype),
      nccl_(nccl),
      comm_(nccl != nullptr ? nccl->comm(rank) : nullptr),
      group_(group),
      peer_all_reduce_(peer_all_reduce),
      pool_(std::make_shared<Pool>(device, tally_)) {
  bind_thread();
  TPE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  gemm_ = std::make_unique<cuda::Gemm>();
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  if (peers_) *peers_->abort = 1;  // a kernel still waiting for a rank that failed gives up
  release_queue();
  stager_.reset();
  for (cudaEvent_t e : marks_) cudaEventDestroy(e);
  if (go_ != nullptr) cudaFreeHost(const_cast<int*>(go_));
  gemm_.reset();
  forget_recordings();
  columns_.clear();
  if (inputs_host_ != nullptr) cudaFreeHost(inputs_host_);
  cudaStreamDestroy(stream_);
  peers_.reset();
}

void CudaBackend::bind_thread() { TPE_CUDA_CHECK(cudaSetDevice(device_)); }

void CudaBackend::sync(const char* what) {
  release_queue();  // a held queue would never drain
  static const double timeout_s = [] {
    const char* env = std::getenv("TPENGINE_NCCL_TIMEOUT");
    return env != nullptr && std::atof(env) > 0 ? std::atof(env) : 600.0;
  }();
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t state = cudaStreamQuery(stream_);
    if (state == cudaSuccess) return;
    if (state != cudaErrorNotReady) TPE_CUDA_CHECK(state);
    std::string reason;
    if (comm_ != nullptr) {
      ncclResult_t async = ncclSuccess;
      TPE_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      if (async != ncclSuccess && async != ncclInProgress) {
        reason = fmt::format("NCCL reported: {}", ncclGetErrorString(async));
      }
    }
    if (reason.empty() && group_.aborted()) reason = "another rank failed";
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (reason.empty() && waited > timeout_s) {
      reason = fmt::format("no progress for {:.0f} s (TPENGINE_NCCL_TIMEOUT)", waited);
    }
    if (!reason.empty()) {
      if (peers_) *peers_->abort = 1;
      if (nccl_ != nullptr) nccl_->abort(rank_);
      comm_ = nullptr;
      fail("GPU {}: gave up waiting for {}: {}", device_, what, reason);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

int64_t CudaBackend::element_bytes() const {
  return static_cast<int64_t>(cuda::dtype_size(dtype_));
}

Buffer CudaBackend::alloc(int64_t rows, int64_t cols) {
  auto storage = pool_->get(static_cast<size_t>(rows * cols) * cuda::dtype_size(dtype_), pool_);
  void* data = storage.get();
  return {std::move(storage), data, rows, cols};
}

Buffer CudaBackend::load(int64_t rows, int64_t cols, const RowFill& fill) {
  Buffer out = alloc(rows, cols);
  if (!stager_) stager_ = std::make_unique<Stager>(dtype_, stream_);
  const int64_t per_piece = std::max<int64_t>(1, stager_->capacity() / std::max<int64_t>(cols, 1));
  const size_t row_bytes = static_cast<size_t>(cols) * cuda::dtype_size(dtype_);
  for (int64_t first = 0; first < rows; first += per_piece) {
    stager_->submit(static_cast<char*>(out.data) + static_cast<size_t>(first) * row_bytes, first,
                    std::min(per_piece, rows - first), cols, fill);
  }
  return out;
}

void CudaBackend::end_loading() {
  if (!stager_) return;
  // The staging memory goes back however the last pieces went.
  std::unique_ptr<Stager> stager = std::move(stager_);
  stager->finish();
  sync("the weights' upload");
}

Backend::MemoryUse CudaBackend::memory_use() {
  size_t free_bytes = 0, total = 0;
  TPE_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
  return {tally_->peak(), static_cast<int64_t>(total - free_bytes)};
}

Tensor CudaBackend::to_host(const Buffer& x) {
  const int64_t n = x.rows * x.cols;
  Tensor t({x.rows, x.cols});
  auto f32 = pool_->get(static_cast<size_t>(n) * 4, pool_);
  cuda::convert(x.data, dtype_, f32.get(), cuda::DType::kF32, n, stream_);
  TPE_CUDA_CHECK(cudaMemcpyAsync(t.data.data(), f32.get(), static_cast<size_t>(n) * 4,
                                 cudaMemcpyDeviceToHost, stream_));
  sync("the logits");
  return t;
}

double CudaBackend::copy_bandwidth_gbs() {
  // Allocated outside the pool, so that these 2 GiB are not counted as the model's.
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  TPE_CUDA_CHECK(cudaMalloc(&a, bytes));
  const cudaError_t second = cudaMalloc(&b, bytes);
  if (second != cudaSuccess) cudaFree(a);
  TPE_CUDA_CHECK(second);
  cudaEvent_t start, stop;
  TPE_CUDA_CHECK(cudaEventCreate(&start));
  TPE_CUDA_CHECK(cudaEventCreate(&stop));
  float best_ms = 1e30f;
  for (int i = 0; i < 6; ++i) {  // the first is a warm-up
    TPE_CUDA_CHECK(cudaEventRecord(start, stream_));
    TPE_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream_));
    TPE_CUDA_CHECK(cudaEventRecord(stop, stream_));
    TPE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    TPE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i > 0) best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (best_ms / 1e3) / 1e9;
}

namespace {

// Frequencies per token of a rotary parameter set: half the rotating part of a head (as
// kernels/cpu/ops.hpp's rope_inv_freq counts it).
int64_t rotary_half(const RopeSpec& r) {
  return static_cast<int64_t>(static_cast<double>(r.head_dim) * r.desc.partial_rotary_factor) / 2;
}

}  // namespace

void CudaBackend::reserve_inputs(int64_t max_tokens, int64_t max_logit_rows,
                                 std::vector<RopeSpec> ropes) {
  ropes_ = std::move(ropes);
  max_logit_rows_ = max_logit_rows;
  // Ids, token types, slots, positions, segments; logit rows; the second stream's ids and types
  // (at most max_tokens each).
  size_t words = static_cast<size_t>(7 * max_tokens + max_logit_rows) + 32;
  for (const RopeSpec& r : ropes_) words += static_cast<size_t>(max_tokens * rotary_half(r)) + 4;
  const size_t bytes = words * 4;
  if (inputs_host_ != nullptr) TPE_CUDA_CHECK(cudaFreeHost(inputs_host_));
  inputs_host_ = nullptr;
  TPE_CUDA_CHECK(cudaHostAlloc(&inputs_host_, bytes, cudaHostAllocDefault));
  inputs_ = alloc(1, static_cast<int64_t>(bytes / cuda::dtype_size(dtype_)));
  inputs_bytes_ = bytes;
  forget_recordings();  // they read the old buffer
}

void CudaBackend::begin(const Batch& batch) {
  // The previous pass has ended (its logits were read); this settles the case where it wanted
  // no logits or failed half way, before its inputs are overwritten.
  sync("the previous forward pass");
  TPE_CHECK(inputs_host_ != nullptr, "reserve_inputs was not called");
  segments_ = batch.segments;
  // The layout depends only on the counts, so every decode step of one batch size reads its
  // inputs at the same addresses: ids, slots, positions, segment of each token, logit rows
  // (int32), then per rotary parameter set, per segment, its inverse frequencies (fp32).
  const size_t tokens = batch.tokens.size(), segments = batch.segments.size();
  auto* words = static_cast<int32_t*>(inputs_host_);
  size_t at = 0;
  const auto section = [&](size_t n) {
    const size_t start = at;
    at += (n + 3) / 4 * 4;  // 16-byte aligned sections
    return start;
  };
  const size_t ids = section(tokens), slots = section(tokens), positions = section(tokens),
               segment_of = section(tokens), rows = section(batch.logit_rows.size());
  const size_t types = section(batch.token_types.size()),
               second_ids = section(batch.second.tokens.size()),
               second_types = section(batch.second.token_types.size());
  const auto put = [&](size_t at_word, const std::vector<int64_t>& values) {
    for (size_t i = 0; i < values.size(); ++i) words[at_word + i] = static_cast<int32_t>(values[i]);
  };
  put(ids, batch.tokens);
  put(types, batch.token_types);
  put(second_ids, batch.second.tokens);
  put(second_types, batch.second.token_types);
  size_t t = 0;
  for (size_t s = 0; s < segments; ++s) {
    const Batch::Segment& seg = batch.segments[s];
    for (int64_t i = 0; i < seg.count; ++i, ++t) {
      words[slots + t] = seg.slot;
      words[positions + t] = static_cast<int32_t>(seg.start_pos + i);
      words[segment_of + t] = static_cast<int32_t>(s);
    }
  }
  for (size_t r = 0; r < batch.logit_rows.size(); ++r) {
    words[rows + r] = static_cast<int32_t>(batch.logit_rows[r]);
  }
  std::vector<size_t> tables;
  for (const RopeSpec& rope : ropes_) {
    const size_t half = static_cast<size_t>(rotary_half(rope));
    tables.push_back(section(segments * half));
    for (size_t s = 0; s < segments; ++s) {
      // Dynamic NTK frequencies depend on each sequence's length; the others are the same for
      // every segment. Computed by the reference code, so both backends agree.
      const Batch::Segment& seg = batch.segments[s];
      const std::vector<float> inv = cpu::rope_inv_freq(
          rope.desc, rope.head_dim, seg.rope_len > 0 ? seg.rope_len : seg.start_pos + seg.count);
      TPE_CHECK(inv.size() == half, "rotary table size");
      std::memcpy(words + tables.back() + s * half, inv.data(), inv.size() * 4);
    }
  }
  if (at * 4 > inputs_bytes_) {
    fail("GPU {}: a pass of {} tokens exceeds the inputs reserved for it", device_, tokens);
  }
  TPE_CUDA_CHECK(
      cudaMemcpyAsync(inputs_.data, inputs_host_, at * 4, cudaMemcpyHostToDevice, stream_));
  const auto* device = static_cast<const int32_t*>(inputs_.data);
  ids_ = device + ids;
  token_types_ = device + types;
  second_ids_ = device + second_ids;
  second_types_ = device + second_types;
  slots_ = device + slots;
  positions_ = device + positions;
  segment_of_ = device + segment_of;
  logit_rows_ = device + rows;
  rope_tables_.clear();
  for (const size_t offset : tables) {
    rope_tables_.push_back(reinterpret_cast<const float*>(device + offset));
  }
  logit_row_count_ = static_cast<int64_t>(batch.logit_rows.size());
}

void CudaBackend::embedding(const Buffer& table, Range vocab, Ids ids, Buffer& out) {
  const int32_t* source = ids == Ids::kTokens         ? ids_
                          : ids == Ids::kTokenTypes   ? token_types_
                          : ids == Ids::kSecondTokens ? second_ids_
                          : ids == Ids::kPositions    ? positions_
                                                      : second_types_;
  cuda::embedding(source, out.rows, table.data, vocab.begin, vocab.end, out.cols, dtype_, out.data,
                  stream_);
}

void CudaBackend::norm(tpe_norm_kind kind, const Buffer& x, const Buffer& w, const Buffer* b,
                       float eps, Buffer& y) {
  if (kind == TPE_NORM_RMS) {
    cuda::rms_norm(x.data, x.rows, x.cols, w.data, eps, dtype_, y.data, stream_);
  } else {
    cuda::layer_norm(x.data, x.rows, x.cols, w.data, b != nullptr ? b->data : nullptr, eps, dtype_,
                     y.data, stream_);
  }
}

void CudaBackend::linear(const Buffer& x, const Buffer& w, const Buffer* bias, Buffer& y) {
  gemm_->linear(x.data, x.rows, x.cols, w.data, y.cols, bias != nullptr ? bias->data : nullptr,
                dtype_, y.data, stream_);
}

void CudaBackend::linear_activation(tpe_activation act, const Buffer& x, const Buffer& w,
                                    const Buffer* bias, Buffer& y) {
  gemm_->linear(x.data, x.rows, x.cols, w.data, y.cols, bias != nullptr ? bias->data : nullptr,
                dtype_, y.data, stream_, act);
}

void CudaBackend::gather_columns(const Buffer& x, const IndexSet& cols, Buffer& out) {
  auto it = columns_.find(&cols);
  if (it == columns_.end()) {
    std::vector<int32_t> list;
    for (const Range& r : cols) {
      for (int64_t c = r.begin; c < r.end; ++c) list.push_back(static_cast<int32_t>(c));
    }
    auto storage = pool_->get(std::max<size_t>(list.size(), 1) * 4, pool_);
    TPE_CUDA_CHECK(cudaMemcpy(storage.get(), list.data(), list.size() * 4, cudaMemcpyHostToDevice));
    void* data = storage.get();
    it = columns_.emplace(&cols, Buffer{std::move(storage), data, 1, out.cols}).first;
  }
  cuda::gather_columns(x.data, x.rows, x.cols, static_cast<const int32_t*>(it->second.data),
                       out.cols, dtype_, out.data, stream_);
}

void CudaBackend::rotary(Buffer& x, int rope) {
  const RopeSpec& spec = ropes_.at(static_cast<size_t>(rope));
  cuda::rotary(x.data, x.rows, x.cols / spec.head_dim, spec.head_dim, 2 * rotary_half(spec),
               positions_, segment_of_, rope_tables_[static_cast<size_t>(rope)], dtype_, stream_,
               x.stride());
}

int CudaBackend::attention_splits(int64_t tokens, int64_t n_q, int64_t head_dim, int64_t max_len,
                                  int64_t n_kv, int64_t group) {
  // At most 16 MiB of partial results; big passes need no splits to fill the device.
  constexpr int64_t kMaxScratchFloats = int64_t{4} << 20;
  const auto e = static_cast<int64_t>(cuda::dtype_size(dtype_));
  const auto words = [e](const Buffer& b) { return b.rows * b.cols * e / 4; };
  const int64_t counters = cuda::attention_counter_words(tokens, n_q, n_kv, group);
  int splits = cuda::attention_splits(tokens, n_q, head_dim, max_len, n_kv, group, dtype_,
                                      kMaxScratchFloats);
  const int64_t need = cuda::attention_scratch_floats(tokens, n_q, head_dim, splits);
  const int64_t need_counters = splits > 1 ? counters : 0;
  if (need <= words(attention_scratch_) && need_counters <= words(attention_counters_)) {
    return splits;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TPE_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  if (capture != cudaStreamCaptureStatusNone) {  // recording: no allocation, use what there is
    if (counters > words(attention_counters_)) return 1;
    return cuda::attention_splits(tokens, n_q, head_dim, max_len, n_kv, group, dtype_,
                                  words(attention_scratch_));
  }
  forget_recordings();
  if (need > words(attention_scratch_)) attention_scratch_ = alloc(1, need * 4 / e);
  if (need_counters > words(attention_counters_)) {
    attention_counters_ = alloc(1, need_counters * 4 / e);
    TPE_CUDA_CHECK(cudaMemsetAsync(attention_counters_.data, 0,
                                   static_cast<size_t>(need_counters) * 4, stream_));
  }
  return splits;
}

bool CudaBackend::prefill_scratch_fits(size_t bytes) {
  const size_t have =
      static_cast<size_t>(prefill_scratch_.rows * prefill_scratch_.cols) * cuda::dtype_size(dtype_);
  if (bytes <= have) return true;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TPE_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;  // recording: the split-KV kernels
  forget_recordings();
  prefill_scratch_ = Buffer{};  // the old one goes first
  // A longer prompt's chunks need more as they go: doubling keeps the reallocations few.
  const size_t grown = std::max(bytes, 2 * have);
  prefill_scratch_ = alloc(1, static_cast<int64_t>(grown / cuda::dtype_size(dtype_)) + 1);
  return true;
}

namespace {

void refuse_cross(const AttentionShape& a, int device) {
  if (a.cross) {
    fail(
        "GPU {}: cross-attention (over a second token stream) is not built for the CUDA backend "
        "yet; run this model with device = \"cpu\"",
        device);
  }
}

}  // namespace

void CudaBackend::attention(const Buffer& q, const Buffer& k, const Buffer& v, KvLayer& cache,
                            const AttentionShape& a, Buffer& out) {
  refuse_cross(a, device_);
  cuda::kv_append(k.data, v.data, k.rows, k.cols, slots_, positions_, cache.k.data, cache.v.data,
                  cache.max_len, dtype_, stream_, k.stride(), v.stride());
  attend(q, k.cols / a.head_dim, cache, a, out);
}

void CudaBackend::rotary_attention(Buffer& q, Buffer& k, const Buffer& v, KvLayer& cache,
                                   const AttentionShape& a, int rope, Buffer& out) {
  refuse_cross(a, device_);
  const RopeSpec& spec = ropes_.at(static_cast<size_t>(rope));
  TPE_CHECK(spec.head_dim == a.head_dim,
            "rotary_attention: the rope's head_dim is not attention's");
  const int64_t n_kv = k.cols / a.head_dim;
  cuda::rope_kv_append(q.data, q.stride(), q.cols / a.head_dim, k.data, k.stride(), v.data,
                       v.stride(), n_kv, k.rows, a.head_dim, 2 * rotary_half(spec), slots_,
                       positions_, segment_of_, rope_tables_[static_cast<size_t>(rope)],
                       cache.k.data, cache.v.data, cache.max_len, dtype_, stream_);
  attend(q, n_kv, cache, a, out);
}

void CudaBackend::attend(const Buffer& q, int64_t n_kv, KvLayer& cache, const AttentionShape& a,
                         Buffer& out) {
  const int64_t n_q = q.cols / a.head_dim;
  const size_t e = cuda::dtype_size(dtype_);
  // Tokens [first, first + count) on the split-KV kernels.
  const auto split_kv = [&](int64_t first, int64_t count) {
    if (count == 0) return;
    const int splits = attention_splits(count, n_q, a.head_dim, cache.max_len, n_kv, a.group);
    cuda::attention(static_cast<const char*>(q.data) + static_cast<size_t>(first * q.stride()) * e,
                    count, n_q, a.head_dim, slots_ + first, positions_ + first, cache.k.data,
                    cache.v.data, cache.max_len, n_kv, a.first_q, a.group, a.first_kv, a.scale,
                    a.window, dtype_,
                    static_cast<char*>(out.data) + static_cast<size_t>(first * out.cols) * e,
                    stream_, q.stride(), splits,
                    {static_cast<float*>(attention_scratch_.data),
                     static_cast<uint32_t*>(attention_counters_.data)},
                    {a.alibi_max_bias, a.alibi_scale, a.alibi_heads});
  };
  // Sequences with many new tokens (prompts, their chunks) go to the tensor-core prefill kernel
  // one by one, where it serves; runs of the others (decode steps, a few tokens) to split_kv.
  constexpr int64_t kPrefillMinTokens = 16;
  // FlashInfer's Hopper kernel has no ALiBi: those prompts stay on the split-KV kernels.
  const bool tensor_cores =
      a.alibi_max_bias == 0 && cuda::prefill_attention_supported(dtype_, a.head_dim);
  int64_t t = 0;
  int64_t short_from = 0;
  for (const Batch::Segment& seg : segments_) {
    if (tensor_cores && seg.count >= kPrefillMinTokens &&
        prefill_scratch_fits(cuda::prefill_attention_scratch_bytes(
            q.stride(), seg.count, n_q, a.head_dim, seg.start_pos, n_kv, dtype_))) {
      split_kv(short_from, t - short_from);
      cuda::prefill_attention(
          static_cast<const char*>(q.data) + static_cast<size_t>(t * q.stride()) * e, q.stride(),
          seg.count, n_q, a.head_dim, seg.slot, seg.start_pos, cache.k.data, cache.v.data,
          cache.max_len, n_kv, a.first_q, a.group, a.first_kv, a.scale, a.window, dtype_,
          static_cast<char*>(out.data) + static_cast<size_t>(t * out.cols) * e, stream_,
          prefill_scratch_.data);
      short_from = t + seg.count;
    }
    t += seg.count;
  }
  split_kv(short_from, t - short_from);
}

void CudaBackend::add_norm(tpe_norm_kind kind, const Buffer& a, const Buffer& b, const Buffer& w,
                           const Buffer* bias, float eps, Buffer& sum, Buffer& y) {
  if (kind == TPE_NORM_RMS) {
    cuda::rms_norm(a.data, a.rows, a.cols, w.data, eps, dtype_, y.data, stream_, b.data, sum.data);
  } else {
    cuda::layer_norm(a.data, a.rows, a.cols, w.data, bias != nullptr ? bias->data : nullptr, eps,
                     dtype_, y.data, stream_, b.data, sum.data);
  }
}

void CudaBackend::activation(tpe_activation act, Buffer& x) {
  cuda::activation(act, x.data, x.rows * x.cols, dtype_, stream_);
}

void CudaBackend::gated_activation(tpe_activation act, const Buffer& gate, const Buffer& up,
                                   Buffer& out) {
  cuda::gated_activation(act, gate.data, gate.stride(), up.data, up.stride(), out.data, out.rows,
                         out.cols, dtype_, stream_);
}

void CudaBackend::add(const Buffer& a, const Buffer& b, Buffer& out) {
  cuda::add(a.data, b.data, out.data, a.rows * a.cols, dtype_, stream_);
}

void CudaBackend::mul(const Buffer& a, const Buffer& b, Buffer& out) {
  cuda::mul(a.data, b.data, out.data, a.rows * a.cols, dtype_, stream_);
}

void CudaBackend::copy(const Buffer& src, Buffer& dst) {
  const size_t e = cuda::dtype_size(dtype_);
  if (src.stride() == src.cols && dst.stride() == dst.cols) {
    TPE_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, static_cast<size_t>(src.rows * src.cols) * e,
                                   cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  if (src.rows == 0) return;
  TPE_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, static_cast<size_t>(dst.stride()) * e, src.data,
                                   static_cast<size_t>(src.stride()) * e,
                                   static_cast<size_t>(src.cols) * e, static_cast<size_t>(src.rows),
                                   cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::select_rows(const Buffer& x, Buffer& out) {
  // A row gather is an embedding lookup whose table is x.
  TPE_CHECK(out.rows == logit_row_count_, "select_rows: not the batch's logit rows");
  cuda::embedding(logit_rows_, out.rows, x.data, 0, x.rows, x.cols, dtype_, out.data, stream_);
}

std::vector<int64_t> CudaBackend::argmax_rows(const Buffer& x) {
  std::vector<int64_t> best(static_cast<size_t>(x.rows));
  auto picked = pool_->get(std::max<size_t>(best.size(), 1) * sizeof(int64_t), pool_);
  cuda::argmax_rows(x.data, x.rows, x.cols, dtype_, static_cast<int64_t*>(picked.get()), stream_);
  TPE_CUDA_CHECK(cudaMemcpyAsync(best.data(), picked.get(), best.size() * sizeof(int64_t),
                                 cudaMemcpyDeviceToHost, stream_));
  sync("the greedy choice of tokens");
  return best;
}

TopRows CudaBackend::top_rows(const Buffer& x, int64_t k) {
  TPE_CHECK(k > 0 && x.cols > 0, "top_rows: no candidates asked for, or no columns");
  TPE_CHECK(x.stride() == x.cols, "top_rows: the logits are a view, not whole rows");
  TopRows top;
  top.k = std::min(k, x.cols);
  const auto rows = static_cast<size_t>(x.rows), n = rows * static_cast<size_t>(top.k);
  top.values.resize(n);
  top.ids.resize(n);
  top.finite.resize(rows);
  // One allocation and one copy back: the values, the ids, then the flags.
  const size_t bytes = n * (sizeof(float) + sizeof(int32_t)) + rows;
  auto scratch = pool_->get(std::max<size_t>(bytes, 1), pool_);
  auto* base = static_cast<char*>(scratch.get());
  cuda::top_rows(x.data, x.rows, x.cols, top.k, dtype_, reinterpret_cast<float*>(base),
                 reinterpret_cast<int32_t*>(base + n * sizeof(float)),
                 reinterpret_cast<uint8_t*>(base + n * (sizeof(float) + sizeof(int32_t))), stream_);
  std::vector<char> host(bytes);
  TPE_CUDA_CHECK(cudaMemcpyAsync(host.data(), base, bytes, cudaMemcpyDeviceToHost, stream_));
  sync("sampling's candidates");
  std::memcpy(top.values.data(), host.data(), n * sizeof(float));
  std::memcpy(top.ids.data(), host.data() + n * sizeof(float), n * sizeof(int32_t));
  std::memcpy(top.finite.data(), host.data() + n * (sizeof(float) + sizeof(int32_t)), rows);
  return top;
}

namespace {

ncclDataType_t nccl_dtype(cuda::DType dtype) {
  switch (dtype) {
    case cuda::DType::kF32:
      return ncclFloat32;
    case cuda::DType::kF16:
      return ncclFloat16;
    case cuda::DType::kBF16:
      return ncclBfloat16;
  }
  return ncclFloat32;
}

}  // namespace

std::vector<char> CudaBackend::all_gather_bytes(const void* data, size_t size, int world) {
  auto staging = pool_->get((static_cast<size_t>(world) + 1) * size, pool_);
  char* mine = static_cast<char*>(staging.get());
  TPE_CUDA_CHECK(cudaMemcpyAsync(mine, data, size, cudaMemcpyHostToDevice, stream_));
  TPE_NCCL_CHECK(ncclAllGather(mine, mine + size, size, ncclUint8, comm_, stream_));
  std::vector<char> all(static_cast<size_t>(world) * size);
  TPE_CUDA_CHECK(
      cudaMemcpyAsync(all.data(), mine + size, all.size(), cudaMemcpyDeviceToHost, stream_));
  sync("the ranks' exchange of peer-memory addresses");
  return all;
}

std::string CudaBackend::connect() {
  if (nccl_ == nullptr) return {};
  if (!peer_all_reduce_) return "NCCL";
  bind_thread();
  const std::string why = connect_peers();
  if (!why.empty()) return fmt::format("NCCL (no one-shot over peer memory: {})", why);
  return fmt::format("one-shot over peer memory up to {} KiB, NCCL above", kPeerCapacity >> 10);
}

std::string CudaBackend::connect_peers() {
  int world = 0;
  TPE_NCCL_CHECK(ncclCommCount(comm_, &world));
  if (world > cuda::kPeerMaxRanks) return fmt::format("more than {} ranks", cuda::kPeerMaxRanks);
  auto peers = std::make_unique<Peers>();
  const size_t bytes = cuda::peer_region_bytes(kPeerCapacity);
  TPE_CUDA_CHECK(cudaMalloc(&peers->region, bytes));
  // Zeroed ahead of the exchange on this stream, so before any rank learns the address.
  TPE_CUDA_CHECK(cudaMemsetAsync(peers->region, 0, bytes, stream_));
  // What the other ranks need to address this rank's region: in this process, its device and
  // address (peer access); in another process on this host, a CUDA IPC handle.
  struct Card {
    char host[64];
    int32_t pid;
    int32_t device;
    uint64_t address;
    int32_t exported;
    cudaIpcMemHandle_t handle;
  };
  Card mine{};
  gethostname(mine.host, sizeof(mine.host) - 1);
  mine.pid = static_cast<int32_t>(getpid());
  mine.device = device_;
  mine.address = reinterpret_cast<uintptr_t>(peers->region);
  mine.exported = cudaIpcGetMemHandle(&mine.handle, peers->region) == cudaSuccess ? 1 : 0;
  cudaGetLastError();  // a failed export is an answer, not an error
  const std::vector<char> gathered = all_gather_bytes(&mine, sizeof(Card), world);
  std::vector<Card> cards(static_cast<size_t>(world));
  std::memcpy(cards.data(), gathered.data(), gathered.size());
  std::string why;
  std::vector<void*> regions(static_cast<size_t>(world), peers->region);
  for (int s = 0; s < world && why.empty(); ++s) {
    const Card& card = cards[s];
    if (s == rank_) continue;
    if (std::strncmp(card.host, mine.host, sizeof(mine.host)) != 0) {
      why = fmt::format("rank {} runs on another host", s);
    } else if (card.pid == mine.pid) {
      int can = 0;
      TPE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device_, card.device));
      const cudaError_t enabled =
          can != 0 ? cudaDeviceEnablePeerAccess(card.device, 0) : cudaSuccess;
      cudaGetLastError();  // cudaErrorPeerAccessAlreadyEnabled is sticky until read
      if (can == 0 || (enabled != cudaSuccess && enabled != cudaErrorPeerAccessAlreadyEnabled)) {
        why = fmt::format("GPU {} cannot address GPU {}'s memory", device_, card.device);
      }
      regions[s] = reinterpret_cast<void*>(card.address);
    } else if (card.exported == 0) {
      why = fmt::format("rank {} could not export its memory (CUDA IPC)", s);
    } else {
      void* mapped = nullptr;
      const cudaError_t opened =
          cudaIpcOpenMemHandle(&mapped, card.handle, cudaIpcMemLazyEnablePeerAccess);
      cudaGetLastError();
      if (opened != cudaSuccess) {
        why = fmt::format("rank {}'s memory cannot be mapped on GPU {}: {}", s, device_,
                          cudaGetErrorString(opened));
      } else {
        peers->opened.push_back(mapped);
        regions[s] = mapped;
      }
    }
  }
  // Every rank must take the same path, or one would wait in a kernel for ranks in NCCL.
  const int32_t ok = why.empty() ? 1 : 0;
  const std::vector<char> oks = all_gather_bytes(&ok, sizeof(ok), world);
  for (int s = 0; s < world && why.empty(); ++s) {
    int32_t theirs = 0;
    std::memcpy(&theirs, oks.data() + s * sizeof(int32_t), sizeof(theirs));
    if (theirs == 0) why = fmt::format("rank {} cannot address every rank's memory", s);
  }
  if (!why.empty()) return why;
  int* abort = nullptr;
  TPE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&abort), sizeof(int), cudaHostAllocMapped));
  peers->abort = abort;
  *abort = 0;
  int* abort_device = nullptr;
  TPE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&abort_device), abort, 0));
  peers->group = cuda::peer_group(regions.data(), world, rank_, kPeerCapacity, abort_device);
  peers_ = std::move(peers);
  return {};
}

bool CudaBackend::one_shot_takes(const Buffer& x) const {
  return peers_ &&
         x.rows * x.cols * static_cast<int64_t>(cuda::dtype_size(dtype_)) <= kPeerCapacity;
}

void CudaBackend::all_reduce(Buffer& x) {
  if (nccl_ == nullptr) return;  // a single rank holds the whole sum
  if (comm_ == nullptr)
    fail("GPU {}: the NCCL communicator was aborted after an earlier failure", device_);
  if (one_shot_takes(x)) {
    cuda::peer_all_reduce(x.data, x.rows * x.cols, dtype_, peers_->group, stream_);
    return;
  }
  TPE_NCCL_CHECK(ncclAllReduce(x.data, x.data, static_cast<size_t>(x.rows * x.cols),
                               nccl_dtype(dtype_), ncclSum, comm_, stream_));
}

void CudaBackend::all_reduce_norm(tpe_norm_kind kind, Buffer& x, const Buffer& w, const Buffer* b,
                                  float eps, Buffer& y) {
  if (comm_ != nullptr && one_shot_takes(x)) {
    cuda::peer_all_reduce_norm(kind, x.data, x.rows, x.cols, w.data,
                               b != nullptr ? b->data : nullptr, eps, dtype_, y.data, peers_->group,
                               stream_);
    return;
  }
  Backend::all_reduce_norm(kind, x, w, b, eps, y);
}

void CudaBackend::broadcast(std::vector<int64_t>& values) {
  if (nccl_ == nullptr) return;
  if (comm_ == nullptr) {
    fail("GPU {}: the NCCL communicator was aborted after an earlier failure", device_);
  }
  const size_t bytes = values.size() * sizeof(int64_t);
  auto staging = pool_->get(std::max<size_t>(bytes, 8), pool_);
  TPE_CUDA_CHECK(
      cudaMemcpyAsync(staging.get(), values.data(), bytes, cudaMemcpyHostToDevice, stream_));
  TPE_NCCL_CHECK(
      ncclBroadcast(staging.get(), staging.get(), values.size(), ncclInt64, 0, comm_, stream_));
  TPE_CUDA_CHECK(
      cudaMemcpyAsync(values.data(), staging.get(), bytes, cudaMemcpyDeviceToHost, stream_));
  sync("the sampled tokens' broadcast");
}

void CudaBackend::gather_vocab(const Buffer& local, const std::vector<Range>& vocab, Buffer& full) {
  const size_t esize = cuda::dtype_size(dtype_);
  if (nccl_ == nullptr) {
    copy(local, full);
    return;
  }
  if (comm_ == nullptr)
    fail("GPU {}: the NCCL communicator was aborted after an earlier failure", device_);
  // NCCL gathers equal counts: pad every slice to the widest, then place each rank's columns.
  int64_t widest = 0;
  for (const Range& v : vocab) widest = std::max(widest, v.size());
  const int64_t rows = full.rows;
  // Fixed scratch for the largest pass, taken by the first (never inside a recording).
  const int64_t world = static_cast<int64_t>(vocab.size());
  if (gather_scratch_.cols < (world + 1) * widest * max_logit_rows_) {
    gather_scratch_ = alloc(1, (world + 1) * widest * max_logit_rows_);
  }
  Buffer padded{nullptr, gather_scratch_.data, rows, widest};
  Buffer gathered{nullptr,
                  static_cast<char*>(gather_scratch_.data) +
                      static_cast<size_t>(widest * max_logit_rows_) * esize,
                  world * rows, widest};
  TPE_CUDA_CHECK(cudaMemcpy2DAsync(padded.data, static_cast<size_t>(widest) * esize, local.data,
                                   static_cast<size_t>(local.cols) * esize,
                                   static_cast<size_t>(local.cols) * esize,
                                   static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream_));
  TPE_NCCL_CHECK(ncclAllGather(padded.data, gathered.data, static_cast<size_t>(rows * widest),
                               nccl_dtype(dtype_), comm_, stream_));
  for (size_t r = 0; r < vocab.size(); ++r) {
    if (vocab[r].size() == 0) continue;
    TPE_CUDA_CHECK(cudaMemcpy2DAsync(
        static_cast<char*>(full.data) + static_cast<size_t>(vocab[r].begin) * esize,
        static_cast<size_t>(full.cols) * esize,
        static_cast<const char*>(gathered.data) + r * static_cast<size_t>(rows * widest) * esize,
        static_cast<size_t>(widest) * esize, static_cast<size_t>(vocab[r].size()) * esize,
        static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, stream_));
  }
}

void CudaBackend::record_begin() {
  TPE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
}

void CudaBackend::record_end(int key) {
  cudaGraph_t graph = nullptr;
  TPE_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  TPE_CUDA_CHECK(instantiated);
  auto it = recordings_.find(key);
  if (it != recordings_.end()) cudaGraphExecDestroy(it->second);
  recordings_[key] = exec;
}

bool CudaBackend::replay(int key) {
  auto it = recordings_.find(key);
  if (it == recordings_.end()) return false;
  TPE_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  return true;
}

void CudaBackend::forget_recordings() {
  // A recording cut short by an error leaves the stream capturing: end it.
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream_, &status) == cudaSuccess &&
      status != cudaStreamCaptureStatusNone) {
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
  }
  for (auto& [key, exec] : recordings_) cudaGraphExecDestroy(exec);
  recordings_.clear();
}

void CudaBackend::profile_begin() {
  if (go_ == nullptr) {
    int* flag = nullptr;
    TPE_CUDA_CHECK(
        cudaHostAlloc(reinterpret_cast<void**>(&flag), sizeof(int), cudaHostAllocMapped));
    go_ = flag;
    void* device = nullptr;
    TPE_CUDA_CHECK(cudaHostGetDevicePointer(&device, flag, 0));
    go_device_ = static_cast<const volatile int*>(device);
  }
  marks_used_ = 0;
  chunk_starts_.clear();
  hold_queue();
}

void CudaBackend::hold_queue() {
  *go_ = 0;
  holding_ = true;
  cuda::wait_for_host(go_device_, stream_);
  held_steps_ = 0;
  chunk_starts_.push_back(marks_used_);
  record_mark();
}

void CudaBackend::record_mark() {
  if (marks_used_ == marks_.size()) {
    cudaEvent_t e = nullptr;
    TPE_CUDA_CHECK(cudaEventCreate(&e));
    marks_.push_back(e);
  }
  TPE_CUDA_CHECK(cudaEventRecord(marks_[marks_used_++], stream_));
}

void CudaBackend::profile_mark() {
  record_mark();
  // A stream holds only so much queued work: past that, queuing blocks the host, which would
  // never let the stream go. So the queue runs every kProfileChunk steps and is held anew.
  constexpr int kProfileChunk = 32;
  if (holding_ && ++held_steps_ == kProfileChunk) {
    sync("the profiled ops");
    hold_queue();
  }
}

std::vector<double> CudaBackend::profile_end() {
  sync("the profiled forward pass");
  std::vector<double> ms;
  for (size_t i = 1; i < marks_used_; ++i) {
    // A chunk's first mark starts it; every other mark ends a step.
    if (std::find(chunk_starts_.begin(), chunk_starts_.end(), i) != chunk_starts_.end()) continue;
    float elapsed = 0;
    TPE_CUDA_CHECK(cudaEventElapsedTime(&elapsed, marks_[i - 1], marks_[i]));
    ms.push_back(elapsed);
  }
  marks_used_ = 0;
  return ms;
}

void CudaBackend::release_queue() {
  if (!holding_) return;
  *go_ = 1;
  holding_ = false;
}

}  // namespace tpe::backend
