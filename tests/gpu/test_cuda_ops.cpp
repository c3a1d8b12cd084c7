// The CUDA kernels against the CPU reference kernels (kernels/cpu), op by op and dtype by dtype.
// Inputs are random (never zeros) and, for f16/bf16, rounded to the dtype first, so that the CPU
// computes in fp32 on exactly the values the GPU sees. Outputs are poisoned with NaN bytes before
// each run, so an element the kernel never wrote fails the comparison. Errors are relative L2,
// ||out - ref|| / ||ref||, and every one is printed ("[ rel-L2 ]" lines) for the record.
// Without a CUDA device every test reports itself skipped.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "core/common/error.hpp"
#include "kernels/alibi.hpp"
#include "kernels/cpu/ops.hpp"
#include "kernels/cuda/ops.hpp"

namespace tpe::cuda {

namespace detail {
// kernels/cuda/gemv.cu: the small-token kernel on every product it can take, also those
// Gemm::linear leaves to cuBLASLt; false, nothing enqueued, where it does not apply.
bool gemv_forced(const void* x, int64_t tokens, int64_t in, const void* w, int64_t out,
                 const void* bias, DType dtype, void* y, cudaStream_t stream);
}  // namespace detail

// Names the dtype in test names and failure messages (found by googletest through ADL).
void PrintTo(DType dtype, std::ostream* os) {
  *os << (dtype == DType::kF32 ? "f32" : dtype == DType::kF16 ? "f16" : "bf16");
}

namespace {

// ---------------------------------------------------------------------------------------------
// Device, buffers, dtypes

// Empty when a device is usable, else why not.
const std::string& no_device_reason() {
  static const std::string reason = [] {
    int count = 0;
    const cudaError_t error = cudaGetDeviceCount(&count);
    if (error != cudaSuccess) {
      return std::string("no CUDA device: cudaGetDeviceCount failed: ") + cudaGetErrorString(error);
    }
    if (count == 0) return std::string("no CUDA device present");
    return std::string();
  }();
  return reason;
}

void check_cuda(cudaError_t error, const char* call) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(call) + " failed: " + cudaGetErrorString(error));
  }
}
#define CK(call) check_cuda((call), #call)

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) CK(cudaMalloc(&ptr_, bytes));
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(other.bytes_) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// The brief's bounds: fp32 arithmetic, and one rounding of the output to f16 or bf16.
double tolerance(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 1e-5;
    case DType::kF16:
      return 2e-3;
    case DType::kBF16:
      return 1e-2;
  }
  return 0.0;
}

// Round to nearest even, as the device conversions do (the same cuda_fp16/cuda_bf16 functions).
float round_to(float v, DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return v;
    case DType::kF16:
      return __half2float(__float2half_rn(v));
    case DType::kBF16:
      return __bfloat162float(__float2bfloat16_rn(v));
  }
  return v;
}

std::vector<uint8_t> encode(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes(values.size() * dtype_size(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    uint8_t* dst = bytes.data() + i * dtype_size(dtype);
    if (dtype == DType::kF32) {
      std::memcpy(dst, &values[i], 4);
    } else if (dtype == DType::kF16) {
      const __half h = __float2half_rn(values[i]);
      std::memcpy(dst, &h, 2);
    } else {
      const __nv_bfloat16 b = __float2bfloat16_rn(values[i]);
      std::memcpy(dst, &b, 2);
    }
  }
  return bytes;
}

std::vector<float> decode(const std::vector<uint8_t>& bytes, DType dtype) {
  std::vector<float> values(bytes.size() / dtype_size(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    const uint8_t* src = bytes.data() + i * dtype_size(dtype);
    if (dtype == DType::kF32) {
      std::memcpy(&values[i], src, 4);
    } else if (dtype == DType::kF16) {
      __half h;
      std::memcpy(&h, src, 2);
      values[i] = __half2float(h);
    } else {
      __nv_bfloat16 b;
      std::memcpy(&b, src, 2);
      values[i] = __bfloat162float(b);
    }
  }
  return values;
}

// A device array of `n` elements of one dtype, plus one spare element in front so that a test
// can hand a kernel a pointer that is not 16-byte aligned.
struct DeviceTensor {
  DType dtype;
  size_t n;
  DeviceBuffer buffer;

  DeviceTensor(size_t count, DType type)
      : dtype(type), n(count), buffer((count + 1) * dtype_size(type)) {
    poison();
  }
  DeviceTensor(const std::vector<float>& values, DType type) : DeviceTensor(values.size(), type) {
    upload(values);
  }
  void upload(const std::vector<float>& values) {
    const std::vector<uint8_t> bytes = encode(values, dtype);
    CK(cudaMemcpy(get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }
  // All-ones bytes: NaN in f32, f16 and bf16 alike.
  void poison() { CK(cudaMemset(buffer.get(), 0xff, buffer.bytes())); }
  void* get() const { return buffer.get(); }
  // The same array shifted by one element: 2- or 4-byte aligned only.
  void* unaligned() const { return buffer.as<uint8_t>() + dtype_size(dtype); }
  std::vector<uint8_t> bytes(const void* from = nullptr) const {
    std::vector<uint8_t> out(n * dtype_size(dtype));
    CK(cudaMemcpy(out.data(), from != nullptr ? from : get(), out.size(), cudaMemcpyDeviceToHost));
    return out;
  }
  std::vector<float> download(const void* from = nullptr) const {
    return decode(bytes(from), dtype);
  }
};

template <class T>
DeviceBuffer upload_raw(const std::vector<T>& values) {
  DeviceBuffer buffer(values.size() * sizeof(T));
  CK(cudaMemcpy(buffer.get(), values.data(), buffer.bytes(), cudaMemcpyHostToDevice));
  return buffer;
}

// ---------------------------------------------------------------------------------------------
// Random inputs: a fresh seed each run (TPE_TEST_SEED=... repeats one), printed on failure.

uint64_t run_seed() {
  static const uint64_t seed = [] {
    if (const char* env = std::getenv("TPE_TEST_SEED")) {
      return static_cast<uint64_t>(std::strtoull(env, nullptr, 10));
    }
    std::random_device device;
    return (uint64_t{device()} << 32) | uint64_t{device()};
  }();
  return seed;
}

class Rng {
 public:
  explicit Rng(uint64_t stream) : state_(run_seed() ^ (stream * 0x9e3779b97f4a7c15ULL)) {}
  uint64_t next() {  // splitmix64: fast enough for the 45M-element weights of the GEMM tests
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) {
    return lo + (hi - lo) * static_cast<float>(next() >> 40) * 0x1p-24f;
  }
  int32_t below(int64_t n) { return static_cast<int32_t>(next() % static_cast<uint64_t>(n)); }
  // Values rounded to the dtype, so that the CPU reference sees what the device sees.
  std::vector<float> values(size_t n, DType dtype, float lo = -1.0f, float hi = 1.0f) {
    std::vector<float> v(n);
    for (float& x : v) x = round_to(uniform(lo, hi), dtype);
    return v;
  }

 private:
  uint64_t state_;
};

// ---------------------------------------------------------------------------------------------
// Comparison

double rel_l2(const std::vector<float>& out, const std::vector<float>& ref) {
  double num = 0.0;
  double den = 0.0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double d = double{out[i]} - double{ref[i]};
    num += d * d;
    den += double{ref[i]} * ref[i];
  }
  return std::sqrt(num / den);
}

// magnitude, when given, replaces ref in the denominator: for a dot product the rounding error is
// bounded by the sum of |x_i w_i|, not by the (possibly cancelled) sum itself.
void expect_close(const std::string& what, DType dtype, const std::vector<float>& out,
                  const std::vector<float>& ref, const std::vector<float>* magnitude = nullptr) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  size_t unwritten = 0;
  for (const float v : out) unwritten += std::isnan(v) ? 1 : 0;
  EXPECT_EQ(unwritten, 0u) << what << ": elements never written (still NaN)";
  double err = rel_l2(out, ref);
  if (magnitude != nullptr) {  // ||out - ref|| / ||magnitude||
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < out.size(); ++i) {
      const double d = double{out[i]} - double{ref[i]};
      num += d * d;
      den += double{(*magnitude)[i]} * (*magnitude)[i];
    }
    err = std::sqrt(num / den);
  }
  std::printf("[ rel-L2   ] %-52s %-4s %.3e (tol %.0e)\n", what.c_str(), dtype_name(dtype), err,
              tolerance(dtype));
  EXPECT_LE(err, tolerance(dtype)) << what << " (" << dtype_name(dtype) << ")";
}

// Bitwise equality of two float vectors that must match exactly (copies, exact conversions);
// NaN never equals, so unwritten elements fail too.
void expect_exact(const std::string& what, DType dtype, const std::vector<float>& out,
                  const std::vector<float>& ref) {
  ASSERT_EQ(out.size(), ref.size()) << what;
  size_t wrong = 0;
  for (size_t i = 0; i < out.size(); ++i) wrong += out[i] == ref[i] ? 0 : 1;
  std::printf("[ exact    ] %-52s %-4s %zu of %zu differ\n", what.c_str(), dtype_name(dtype), wrong,
              out.size());
  EXPECT_EQ(wrong, 0u) << what << " (" << dtype_name(dtype) << ")";
}

// ---------------------------------------------------------------------------------------------
// Fixtures

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!no_device_reason().empty()) GTEST_SKIP() << no_device_reason();
    CK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  void sync() { CK(cudaStreamSynchronize(stream_)); }
  cudaStream_t stream_ = nullptr;
};

class CudaOpTest : public ::testing::WithParamInterface<DType>, public CudaTest {
 protected:
  void SetUp() override {
    CudaTest::SetUp();
    if (IsSkipped()) return;
    RecordProperty("seed", std::to_string(run_seed()));
  }
  DType dtype() const { return GetParam(); }
  std::string tag(const std::string& what) const {
    return what + " [seed " + std::to_string(run_seed()) + "]";
  }
};

// ---------------------------------------------------------------------------------------------
// convert

TEST_F(CudaTest, ConvertEveryPairExactly) {
  const DType all[] = {DType::kF32, DType::kF16, DType::kBF16};
  Rng rng(1);
  for (const DType from : all) {
    for (const DType to : all) {
      const size_t n = 1031;
      const std::vector<float> src = rng.values(n, from, -300.0f, 300.0f);
      const DeviceTensor d_src(src, from);
      DeviceTensor d_dst(n, to);
      convert(d_src.get(), from, d_dst.get(), to, static_cast<int64_t>(n), stream_);
      sync();
      std::vector<float> expected(n);
      for (size_t i = 0; i < n; ++i) expected[i] = round_to(src[i], to);
      expect_exact(std::string("convert ") + dtype_name(from) + " -> " + dtype_name(to), to,
                   d_dst.download(), expected);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// embedding

TEST_P(CudaOpTest, EmbeddingVocabSlice) {
  Rng rng(2);
  const int64_t begin = 100;
  const int64_t end = 164;  // this rank's slice of the vocabulary
  const int64_t tokens = 37;
  for (const int64_t width : {int64_t{67}, int64_t{4096}}) {
    const std::vector<float> table =
        rng.values(static_cast<size_t>((end - begin) * width), dtype());
    std::vector<int32_t> ids(tokens);
    for (int32_t& id : ids) id = 60 + rng.below(150);  // some below, some above the slice
    ids[0] = 99;
    ids[1] = 100;
    ids[2] = 163;
    ids[3] = 164;
    const DeviceTensor d_table(table, dtype());
    const DeviceBuffer d_ids = upload_raw(ids);
    DeviceTensor d_out(static_cast<size_t>(tokens * width), dtype());
    embedding(d_ids.as<int32_t>(), tokens, d_table.get(), begin, end, width, dtype(), d_out.get(),
              stream_);
    sync();
    std::vector<float> expected(static_cast<size_t>(tokens * width), 0.0f);
    for (int64_t t = 0; t < tokens; ++t) {
      if (ids[t] < begin || ids[t] >= end) continue;
      for (int64_t i = 0; i < width; ++i) {
        expected[t * width + i] = table[(ids[t] - begin) * width + i];
      }
    }
    expect_exact(tag("embedding width " + std::to_string(width)), dtype(), d_out.download(),
                 expected);
  }
}

// ---------------------------------------------------------------------------------------------
// norms

TEST_P(CudaOpTest, RmsNorm) {
  Rng rng(3);
  for (const int64_t tokens : {int64_t{1}, int64_t{37}}) {
    for (const int64_t width : {int64_t{67}, int64_t{4096}, int64_t{5120}}) {
      const std::vector<float> x = rng.values(static_cast<size_t>(tokens * width), dtype(), -2, 2);
      const std::vector<float> w = rng.values(static_cast<size_t>(width), dtype(), 0.5f, 1.5f);
      const DeviceTensor d_x(x, dtype());
      const DeviceTensor d_w(w, dtype());
      DeviceTensor d_y(x.size(), dtype());
      rms_norm(d_x.get(), tokens, width, d_w.get(), 1e-6f, dtype(), d_y.get(), stream_);
      sync();
      std::vector<float> ref(x.size());
      cpu::rms_norm(x.data(), tokens, width, w.data(), 1e-6f, ref.data());
      expect_close(
          tag("rms_norm tokens " + std::to_string(tokens) + " width " + std::to_string(width)),
          dtype(), d_y.download(), ref);
    }
  }
}

TEST_P(CudaOpTest, LayerNormWithAndWithoutBias) {
  Rng rng(4);
  for (const int64_t tokens : {int64_t{1}, int64_t{37}}) {
    for (const int64_t width : {int64_t{67}, int64_t{4096}, int64_t{5120}}) {
      for (const bool with_bias : {true, false}) {
        // A mean well away from zero, as residual streams have.
        const std::vector<float> x = rng.values(static_cast<size_t>(tokens * width), dtype(), 1, 3);
        const std::vector<float> w = rng.values(static_cast<size_t>(width), dtype(), 0.5f, 1.5f);
        std::vector<float> b = rng.values(static_cast<size_t>(width), dtype(), -0.5f, 0.5f);
        const DeviceTensor d_x(x, dtype());
        const DeviceTensor d_w(w, dtype());
        const DeviceTensor d_b(b, dtype());
        DeviceTensor d_y(x.size(), dtype());
        layer_norm(d_x.get(), tokens, width, d_w.get(), with_bias ? d_b.get() : nullptr, 1e-5f,
                   dtype(), d_y.get(), stream_);
        sync();
        if (!with_bias) b.assign(b.size(), 0.0f);
        std::vector<float> ref(x.size());
        cpu::layer_norm(x.data(), tokens, width, w.data(), b.data(), 1e-5f, ref.data());
        expect_close(tag("layer_norm tokens " + std::to_string(tokens) + " width " +
                         std::to_string(width) + (with_bias ? " bias" : " no bias")),
                     dtype(), d_y.download(), ref);
      }
    }
  }
}

// The fused path's add + norm: the sum is written rounded as `add` rounds it (bit for bit), and
// the norm is the plain norm kernel's output on that sum (bit for bit), also with the sum written
// over an addend, as the program's in-place aliasing has it.
TEST_P(CudaOpTest, AddNormIsAddThenNormBitForBit) {
  Rng rng(41);
  for (const int64_t tokens : {int64_t{1}, int64_t{37}}) {
    for (const int64_t width : {int64_t{67}, int64_t{4096}}) {
      for (const bool rms : {true, false}) {
        for (const bool over_a : {false, true}) {
          const auto n = static_cast<size_t>(tokens * width);
          const std::vector<float> a = rng.values(n, dtype(), -2, 2);
          const std::vector<float> b = rng.values(n, dtype(), 1, 3);
          const std::vector<float> w = rng.values(static_cast<size_t>(width), dtype(), 0.5f, 1.5f);
          const std::vector<float> bias = rng.values(static_cast<size_t>(width), dtype(), -1, 1);
          DeviceTensor d_a(a, dtype());
          const DeviceTensor d_b(b, dtype()), d_w(w, dtype()), d_bias(bias, dtype());
          DeviceTensor d_sum(n, dtype()), d_y(n, dtype()), d_plain_sum(n, dtype()),
              d_plain_y(n, dtype());
          void* sum = over_a ? d_a.get() : d_sum.get();
          add(d_a.get(), d_b.get(), d_plain_sum.get(), static_cast<int64_t>(n), dtype(), stream_);
          if (rms) {
            rms_norm(d_plain_sum.get(), tokens, width, d_w.get(), 1e-6f, dtype(), d_plain_y.get(),
                     stream_);
            rms_norm(d_a.get(), tokens, width, d_w.get(), 1e-6f, dtype(), d_y.get(), stream_,
                     d_b.get(), sum);
          } else {
            layer_norm(d_plain_sum.get(), tokens, width, d_w.get(), d_bias.get(), 1e-5f, dtype(),
                       d_plain_y.get(), stream_);
            layer_norm(d_a.get(), tokens, width, d_w.get(), d_bias.get(), 1e-5f, dtype(), d_y.get(),
                       stream_, d_b.get(), sum);
          }
          sync();
          const std::string what = std::string(rms ? "rms" : "layer") + "_norm with residual" +
                                   (over_a ? " over a" : "") + " tokens " + std::to_string(tokens) +
                                   " width " + std::to_string(width);
          std::vector<float> expected_sum(n);
          for (size_t i = 0; i < n; ++i) expected_sum[i] = round_to(a[i] + b[i], dtype());
          expect_exact(tag(what + ": sum"), dtype(), d_sum.download(sum), expected_sum);
          expect_exact(tag(what + ": norm"), dtype(), d_y.download(), d_plain_y.download());
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// elementwise

TEST_P(CudaOpTest, Activations) {
  Rng rng(5);
  const std::pair<tpe_activation, const char*> kinds[] = {{TPE_ACT_SILU, "silu"},
                                                          {TPE_ACT_GELU, "gelu"},
                                                          {TPE_ACT_GELU_TANH, "gelu_tanh"},
                                                          {TPE_ACT_RELU, "relu"}};
  for (const auto& [act, name] : kinds) {
    for (const size_t n : {size_t{10007}, size_t{1} << 20}) {
      const std::vector<float> x = rng.values(n, dtype(), -6.0f, 6.0f);
      DeviceTensor d_x(x, dtype());
      activation(act, d_x.get(), static_cast<int64_t>(n), dtype(), stream_);
      sync();
      std::vector<float> ref = x;
      cpu::activation(act, ref.data(), static_cast<int64_t>(n));
      expect_close(tag(std::string("activation ") + name + " n " + std::to_string(n)), dtype(),
                   d_x.download(), ref);
    }
  }
}

TEST_P(CudaOpTest, AddMulAlignedUnalignedAndAliased) {
  Rng rng(6);
  for (const size_t n : {size_t{10007}, size_t{37 * 4096}}) {
    const std::vector<float> a = rng.values(n, dtype(), -4, 4);
    const std::vector<float> b = rng.values(n, dtype(), -4, 4);
    std::vector<float> sum(n);
    std::vector<float> product(n);
    for (size_t i = 0; i < n; ++i) {
      sum[i] = a[i] + b[i];
      product[i] = a[i] * b[i];
    }
    const std::string size = " n " + std::to_string(n);
    for (const bool is_add : {true, false}) {
      const auto op = is_add ? add : mul;
      const std::string name = is_add ? "add" : "mul";
      const std::vector<float>& ref = is_add ? sum : product;
      {  // separate output
        const DeviceTensor d_a(a, dtype());
        const DeviceTensor d_b(b, dtype());
        DeviceTensor d_out(n, dtype());
        op(d_a.get(), d_b.get(), d_out.get(), static_cast<int64_t>(n), dtype(), stream_);
        sync();
        expect_close(tag(name + size), dtype(), d_out.download(), ref);
      }
      {  // out aliases a
        DeviceTensor d_a(a, dtype());
        const DeviceTensor d_b(b, dtype());
        op(d_a.get(), d_b.get(), d_a.get(), static_cast<int64_t>(n), dtype(), stream_);
        sync();
        expect_close(tag(name + " in place" + size), dtype(), d_a.download(), ref);
      }
      {  // pointers off the 16-byte grid: the scalar path
        DeviceTensor d_a(n, dtype());
        DeviceTensor d_b(n, dtype());
        DeviceTensor d_out(n, dtype());
        const std::vector<uint8_t> a_bytes = encode(a, dtype());
        const std::vector<uint8_t> b_bytes = encode(b, dtype());
        CK(cudaMemcpy(d_a.unaligned(), a_bytes.data(), a_bytes.size(), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_b.unaligned(), b_bytes.data(), b_bytes.size(), cudaMemcpyHostToDevice));
        op(d_a.unaligned(), d_b.unaligned(), d_out.unaligned(), static_cast<int64_t>(n), dtype(),
           stream_);
        sync();
        expect_close(tag(name + " unaligned" + size), dtype(), d_out.download(d_out.unaligned()),
                     ref);
      }
    }
  }
}

// The fused path's gated activation equals the plain pair (the activation in place on gate, then
// mul by up) bit for bit: gate and up as the two halves of one merged gate_up buffer (the pack
// path), with an odd row stride (the scalar path), a width that is no whole pack, and more rows
// than one grid's y extent; nothing past the output written.
TEST_P(CudaOpTest, GatedActivationIsActivationThenMulBitForBit) {
  Rng rng(44);
  struct Case {
    int64_t rows, cols, pad;  // pad: extra columns per row of the merged buffer
  };
  for (const tpe_activation act : {TPE_ACT_SILU, TPE_ACT_GELU_TANH}) {
    for (const Case c :
         {Case{3, 64, 0}, Case{5, 344, 8}, Case{4, 56, 1}, Case{6, 13, 0}, Case{70001, 16, 0}}) {
      const int64_t ld = 2 * c.cols + c.pad;
      const std::vector<float> merged =
          rng.values(static_cast<size_t>(c.rows * ld), dtype(), -6.0f, 6.0f);
      std::vector<float> gate, up;
      for (int64_t r = 0; r < c.rows; ++r) {
        gate.insert(gate.end(), merged.begin() + r * ld, merged.begin() + r * ld + c.cols);
        up.insert(up.end(), merged.begin() + r * ld + c.cols, merged.begin() + r * ld + 2 * c.cols);
      }
      const auto n = static_cast<int64_t>(gate.size());
      DeviceTensor d_gate(gate, dtype());
      const DeviceTensor d_up(up, dtype());
      DeviceTensor d_plain(gate.size(), dtype());
      activation(act, d_gate.get(), n, dtype(), stream_);
      mul(d_gate.get(), d_up.get(), d_plain.get(), n, dtype(), stream_);
      const DeviceTensor d_merged(merged, dtype());
      DeviceTensor d_fused(gate.size() + 1, dtype());  // one element more, left NaN
      const auto* base = static_cast<const char*>(d_merged.get());
      gated_activation(act, base, ld, base + c.cols * static_cast<int64_t>(dtype_size(dtype())), ld,
                       d_fused.get(), c.rows, c.cols, dtype(), stream_);
      sync();
      const std::string what = std::string("gated_activation ") +
                               (act == TPE_ACT_SILU ? "silu" : "gelu_tanh") + " rows " +
                               std::to_string(c.rows) + " cols " + std::to_string(c.cols) + " ld " +
                               std::to_string(ld);
      std::vector<uint8_t> fused = d_fused.bytes();
      const std::vector<uint8_t> past(fused.end() - static_cast<int64_t>(dtype_size(dtype())),
                                      fused.end());
      fused.resize(fused.size() - past.size());
      EXPECT_EQ(fused, d_plain.bytes()) << what;
      EXPECT_EQ(past, std::vector<uint8_t>(past.size(), 0xff)) << what << ": wrote past its rows";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gather_columns

TEST_P(CudaOpTest, GatherColumnsNonContiguous) {
  Rng rng(7);
  const int64_t tokens = 37;
  const int64_t in_width = 300;
  // Strided, backwards, with a repeat: what a rank's slice of a fused projection can look like.
  std::vector<int32_t> cols;
  for (int32_t c = 299; c >= 0; c -= 3) cols.push_back(c);
  cols.push_back(299);
  cols.push_back(0);
  const auto out_width = static_cast<int64_t>(cols.size());
  const std::vector<float> x = rng.values(static_cast<size_t>(tokens * in_width), dtype());
  const DeviceTensor d_x(x, dtype());
  const DeviceBuffer d_cols = upload_raw(cols);
  DeviceTensor d_out(static_cast<size_t>(tokens * out_width), dtype());
  gather_columns(d_x.get(), tokens, in_width, d_cols.as<int32_t>(), out_width, dtype(), d_out.get(),
                 stream_);
  sync();
  std::vector<float> expected(static_cast<size_t>(tokens * out_width));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < out_width; ++i) {
      expected[t * out_width + i] = x[t * in_width + cols[i]];
    }
  }
  expect_exact(tag("gather_columns"), dtype(), d_out.download(), expected);
}

// ---------------------------------------------------------------------------------------------
// rotary

std::vector<float> inv_freq_table(double theta, int64_t rotary_dim, double linear_factor) {
  std::vector<float> f(static_cast<size_t>(rotary_dim / 2));
  for (size_t i = 0; i < f.size(); ++i) {
    const double exponent = static_cast<double>(2 * i) / static_cast<double>(rotary_dim);
    f[i] = static_cast<float>(1.0 / std::pow(theta, exponent) / linear_factor);
  }
  return f;
}

TEST_P(CudaOpTest, RotaryTwoTablesAndPartial) {
  Rng rng(8);
  struct Case {
    int64_t n_heads;
    int64_t head_dim;
    int64_t rotary_dim;
  };
  const int64_t tokens = 37;
  for (const Case c : {Case{4, 128, 128}, Case{5, 80, 32}, Case{3, 64, 64}}) {
    const int64_t half = c.rotary_dim / 2;
    // Two tables, as a model with local and global rope layers has.
    const std::vector<float> table0 = inv_freq_table(10000.0, c.rotary_dim, 1.0);
    const std::vector<float> table1 = inv_freq_table(1e6, c.rotary_dim, 4.0);
    std::vector<float> both = table0;
    both.insert(both.end(), table1.begin(), table1.end());
    std::vector<int32_t> positions(tokens);
    std::vector<int32_t> which(tokens);
    for (int64_t t = 0; t < tokens; ++t) {
      positions[t] = t < 5 ? static_cast<int32_t>(t) : rng.below(8000);
      which[t] = static_cast<int32_t>(t % 2);
    }
    const DeviceBuffer d_positions = upload_raw(positions);
    const DeviceBuffer d_which = upload_raw(which);
    const DeviceBuffer d_freq = upload_raw(both);
    for (const bool with_table : {true, false}) {
      const std::vector<float> x =
          rng.values(static_cast<size_t>(tokens * c.n_heads * c.head_dim), dtype(), -2, 2);
      DeviceTensor d_x(x, dtype());
      rotary(d_x.get(), tokens, c.n_heads, c.head_dim, c.rotary_dim, d_positions.as<int32_t>(),
             with_table ? d_which.as<int32_t>() : nullptr, d_freq.as<float>(), dtype(), stream_);
      sync();
      std::vector<float> ref = x;
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t pos = positions[t];
        cpu::rotary(ref.data() + t * c.n_heads * c.head_dim, 1, c.n_heads, c.head_dim, &pos,
                    with_table && which[t] == 1 ? table1 : table0);
      }
      const std::vector<float> out = d_x.download();
      // The same rows as a view (every other head-width of a buffer twice as wide): the other
      // columns are left alone, these rotated alike.
      const int64_t width = c.n_heads * c.head_dim;
      std::vector<float> wide(static_cast<size_t>(tokens * 2 * width));
      for (int64_t t = 0; t < tokens; ++t) {
        std::copy_n(x.begin() + t * width, width, wide.begin() + t * 2 * width + width);
        std::fill_n(wide.begin() + t * 2 * width, width, 0.5f);
      }
      DeviceTensor d_wide(wide, dtype());
      rotary(static_cast<char*>(d_wide.get()) + width * dtype_size(dtype()), tokens, c.n_heads,
             c.head_dim, c.rotary_dim, d_positions.as<int32_t>(),
             with_table ? d_which.as<int32_t>() : nullptr, d_freq.as<float>(), dtype(), stream_,
             2 * width);
      sync();
      const std::vector<float> wide_out = d_wide.download();
      std::vector<float> view_out, others;
      for (int64_t t = 0; t < tokens; ++t) {
        view_out.insert(view_out.end(), wide_out.begin() + t * 2 * width + width,
                        wide_out.begin() + (t + 1) * 2 * width);
        others.insert(others.end(), wide_out.begin() + t * 2 * width,
                      wide_out.begin() + t * 2 * width + width);
      }
      EXPECT_EQ(view_out, out) << "rotary through a row stride";
      EXPECT_EQ(others, std::vector<float>(others.size(), 0.5f)) << "rotary wrote outside its view";
      expect_close(tag("rotary heads " + std::to_string(c.n_heads) + " head_dim " +
                       std::to_string(c.head_dim) + " rotary_dim " + std::to_string(c.rotary_dim) +
                       (with_table ? " two tables" : " table 0")),
                   dtype(), out, ref);
      // The features past rotary_dim are left exactly as they were.
      size_t touched = 0;
      for (int64_t r = 0; r < tokens * c.n_heads; ++r) {
        for (int64_t d = 2 * half; d < c.head_dim; ++d) {
          touched += out[r * c.head_dim + d] == x[r * c.head_dim + d] ? 0 : 1;
        }
      }
      EXPECT_EQ(touched, 0u) << "rotary changed features past rotary_dim";
    }
  }
}

// The fused path's rotary + KV append equals rotary of q and of k, then kv_append, bit for bit:
// q rotated in place, the cache rows of the pass's tokens holding rotated k and v (and nothing
// else written), k itself as it was. q, k and v are views of one fused qkv buffer, as the program
// hands them; MHA, GQA, MQA, two rotary tables, and partial rotaries whose pass-through key
// features are copied in packs (GPT-NeoX's 24 of 96, Phi-2's 32 of 80) or one by one (34 of 66, and
// 20 of 80, where the values still move in packs).
TEST_P(CudaOpTest, RopeKvAppendIsRotaryThenAppendBitForBit) {
  Rng rng(42);
  struct Case {
    int64_t n_q, n_kv, head_dim, rotary_dim;
  };
  const int64_t slots = 3, max_len = 40;
  const std::vector<std::pair<int32_t, int32_t>> at = {{0, 0}, {0, 1}, {2, 39}, {1, 17}, {2, 0}};
  const auto tokens = static_cast<int64_t>(at.size());
  std::vector<int32_t> slot_of(tokens), pos_of(tokens), which(tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    std::tie(slot_of[t], pos_of[t]) = at[t];
    which[t] = static_cast<int32_t>(t % 2);
  }
  const DeviceBuffer d_slots = upload_raw(slot_of), d_pos = upload_raw(pos_of),
                     d_which = upload_raw(which);
  for (const Case c :
       {Case{4, 4, 128, 128}, Case{8, 2, 64, 64}, Case{6, 1, 64, 64}, Case{5, 5, 80, 32},
        Case{4, 2, 96, 96}, Case{2, 1, 66, 34}, Case{8, 8, 96, 24}, Case{4, 2, 80, 20}}) {
    std::vector<float> freq = inv_freq_table(10000.0, c.rotary_dim, 1.0);
    const std::vector<float> table1 = inv_freq_table(1e6, c.rotary_dim, 4.0);
    freq.insert(freq.end(), table1.begin(), table1.end());
    const DeviceBuffer d_freq = upload_raw(freq);
    const int64_t qw = c.n_q * c.head_dim, kw = c.n_kv * c.head_dim, ld = qw + 2 * kw;
    const std::vector<float> qkv = rng.values(static_cast<size_t>(tokens * ld), dtype(), -2, 2);
    DeviceTensor plain(qkv, dtype()), fused(qkv, dtype());
    const auto cache_size = static_cast<size_t>(slots * max_len * kw);
    DeviceTensor plain_k(cache_size, dtype()), plain_v(cache_size, dtype()),
        fused_k(cache_size, dtype()), fused_v(cache_size, dtype());
    const size_t e = dtype_size(dtype());
    const auto col = [&](const DeviceTensor& t, int64_t c0) {
      return static_cast<char*>(t.get()) + c0 * static_cast<int64_t>(e);
    };
    rotary(col(plain, 0), tokens, c.n_q, c.head_dim, c.rotary_dim, d_pos.as<int32_t>(),
           d_which.as<int32_t>(), d_freq.as<float>(), dtype(), stream_, ld);
    rotary(col(plain, qw), tokens, c.n_kv, c.head_dim, c.rotary_dim, d_pos.as<int32_t>(),
           d_which.as<int32_t>(), d_freq.as<float>(), dtype(), stream_, ld);
    kv_append(col(plain, qw), col(plain, qw + kw), tokens, kw, d_slots.as<int32_t>(),
              d_pos.as<int32_t>(), plain_k.get(), plain_v.get(), max_len, dtype(), stream_, ld, ld);
    rope_kv_append(col(fused, 0), ld, c.n_q, col(fused, qw), ld, col(fused, qw + kw), ld, c.n_kv,
                   tokens, c.head_dim, c.rotary_dim, d_slots.as<int32_t>(), d_pos.as<int32_t>(),
                   d_which.as<int32_t>(), d_freq.as<float>(), fused_k.get(), fused_v.get(), max_len,
                   dtype(), stream_);
    sync();
    const std::string what = "rope_kv_append q " + std::to_string(c.n_q) + " kv " +
                             std::to_string(c.n_kv) + " head_dim " + std::to_string(c.head_dim) +
                             " rotary_dim " + std::to_string(c.rotary_dim);
    const std::vector<float> p = plain.download(), f = fused.download();
    std::vector<float> p_q, f_q, f_k, k_in;
    for (int64_t t = 0; t < tokens; ++t) {
      p_q.insert(p_q.end(), p.begin() + t * ld, p.begin() + t * ld + qw);
      f_q.insert(f_q.end(), f.begin() + t * ld, f.begin() + t * ld + qw);
      f_k.insert(f_k.end(), f.begin() + t * ld + qw, f.begin() + t * ld + qw + kw);
      k_in.insert(k_in.end(), qkv.begin() + t * ld + qw, qkv.begin() + t * ld + qw + kw);
    }
    expect_exact(tag(what + ": q"), dtype(), f_q, p_q);
    expect_exact(tag(what + ": k left as it was"), dtype(), f_k, k_in);
    // Unwritten rows stay NaN in both, and NaN never compares equal: compare the bytes.
    EXPECT_EQ(fused_k.bytes(), plain_k.bytes()) << what << ": k cache";
    EXPECT_EQ(fused_v.bytes(), plain_v.bytes()) << what << ": v cache";
  }
}

// Greedy decoding's choice on the device: the first index of each row's maximum (ties placed
// across threads' strides and in one thread's), -1 for a row with a NaN, +Inf or -Inf, over a
// vocabulary of BLOOM's size and a tiny one.
TEST_P(CudaOpTest, ArgmaxRowsFirstOfEqualsAndNonFinite) {
  Rng rng(43);
  for (const int64_t cols : {int64_t{7}, int64_t{250880}}) {
    const int64_t rows = 9;
    std::vector<float> x = rng.values(static_cast<size_t>(rows * cols), dtype(), -4, 4);
    std::vector<int64_t> expected(rows);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x.data() + r * cols;
      const float top = round_to(8.0f + static_cast<float>(r), dtype());
      const int64_t first = rng.below(cols);
      row[first] = top;
      // Equal maxima after the first: one a thread's stride (1024) later, one far, one adjacent.
      for (const int64_t later : {first + 1024, cols - 1, first + 1}) {
        if (later < cols && later != first) row[later] = top;
      }
      expected[r] = first;
    }
    const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
    if (cols > 1) {
      x[1 * cols + cols - 1] = nan;
      x[2 * cols] = inf;
      x[3 * cols + cols / 2] = -inf;
      expected[1] = expected[2] = expected[3] = -1;
    }
    const DeviceTensor d_x(x, dtype());
    DeviceBuffer d_out(static_cast<size_t>(rows) * sizeof(int64_t));
    argmax_rows(d_x.get(), rows, cols, dtype(), d_out.as<int64_t>(), stream_);
    sync();
    std::vector<int64_t> out(rows);
    CK(cudaMemcpy(out.data(), d_out.get(), out.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
    EXPECT_EQ(out, expected) << tag("argmax_rows cols " + std::to_string(cols));
  }
}

// Sampling's candidates on the device: each row's k largest values with their columns, against
// a sort of the row (by value: among values equal to the k-th largest any may be chosen), over
// smooth rows and rows of few levels whose ties cross the k-th (and hold -0 beside +0), rows
// narrower than k and as wide as BLOOM's vocabulary; a row with a NaN, +Inf or -Inf flagged.
TEST_P(CudaOpTest, TopRowsTheLargestValuesAndTheirColumns) {
  Rng rng(44);
  for (const auto& [cols, k_asked] : {std::pair<int64_t, int64_t>{7, 64},
                                      {64, 64},
                                      {1000, 64},
                                      {1000, 256},
                                      {250880, 64},
                                      {250880, 256}}) {
    const int64_t rows = 6, k = std::min(k_asked, cols);
    std::vector<float> x = rng.values(static_cast<size_t>(rows * cols), dtype(), -6, 6);
    for (int64_t r = 0; r < rows; r += 2) {  // few levels: ties across the k-th largest
      for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = std::round(x[r * cols + c]) * 0.5f;
    }
    x[2 * cols] = -0.0f;
    const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
    x[1 * cols + cols - 1] = nan;
    x[3 * cols] = inf;
    x[5 * cols + cols / 2] = -inf;
    const DeviceTensor d_x(x, dtype());
    const auto n = static_cast<size_t>(rows * k);
    DeviceBuffer d_values(n * sizeof(float)), d_ids(n * sizeof(int32_t)),
        d_finite(static_cast<size_t>(rows));
    top_rows(d_x.get(), rows, cols, k, dtype(), d_values.as<float>(), d_ids.as<int32_t>(),
             d_finite.as<uint8_t>(), stream_);
    sync();
    std::vector<float> values(n);
    std::vector<int32_t> ids(n);
    std::vector<uint8_t> finite(static_cast<size_t>(rows));
    CK(cudaMemcpy(values.data(), d_values.get(), n * sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(ids.data(), d_ids.get(), n * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(finite.data(), d_finite.get(), finite.size(), cudaMemcpyDeviceToHost));
    const std::string what =
        tag("top_rows cols " + std::to_string(cols) + " k " + std::to_string(k));
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> row(x.begin() + r * cols, x.begin() + (r + 1) * cols);
      const bool row_finite =
          std::all_of(row.begin(), row.end(), [](float v) { return std::isfinite(v); });
      EXPECT_EQ(finite[r] != 0, row_finite) << what << " row " << r;
      if (!row_finite) continue;
      std::set<int32_t> seen;
      std::vector<float> got;
      for (int64_t i = 0; i < k; ++i) {
        const int32_t id = ids[r * k + i];
        ASSERT_TRUE(id >= 0 && id < cols) << what << " row " << r << ": column " << id;
        EXPECT_TRUE(seen.insert(id).second) << what << " row " << r << ": column " << id;
        EXPECT_EQ(values[r * k + i], row[id]) << what << " row " << r << ": column " << id;
        got.push_back(values[r * k + i]);
      }
      std::sort(row.begin(), row.end(), std::greater<>());
      std::sort(got.begin(), got.end(), std::greater<>());
      EXPECT_EQ(got, std::vector<float>(row.begin(), row.begin() + k)) << what << " row " << r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// kv_append

TEST_P(CudaOpTest, KvAppendWritesOnlyItsRows) {
  Rng rng(9);
  const int64_t slots = 3;
  const int64_t max_len = 50;
  const std::vector<std::pair<int32_t, int32_t>> at = {{0, 0}, {0, 1},  {2, 49}, {1, 17},
                                                       {2, 0}, {1, 18}, {0, 30}};
  const auto tokens = static_cast<int64_t>(at.size());
  for (const int64_t kv_width : {int64_t{160}, int64_t{67}}) {
    const std::vector<float> k = rng.values(static_cast<size_t>(tokens * kv_width), dtype());
    const std::vector<float> v = rng.values(static_cast<size_t>(tokens * kv_width), dtype());
    std::vector<int32_t> slot_of(tokens);
    std::vector<int32_t> pos_of(tokens);
    for (int64_t t = 0; t < tokens; ++t) std::tie(slot_of[t], pos_of[t]) = at[t];
    const DeviceTensor d_k(k, dtype());
    const DeviceTensor d_v(v, dtype());
    const DeviceBuffer d_slots = upload_raw(slot_of);
    const DeviceBuffer d_pos = upload_raw(pos_of);
    const auto cache_size = static_cast<size_t>(slots * max_len * kv_width);
    DeviceTensor d_k_cache(cache_size, dtype());
    DeviceTensor d_v_cache(cache_size, dtype());
    kv_append(d_k.get(), d_v.get(), tokens, kv_width, d_slots.as<int32_t>(), d_pos.as<int32_t>(),
              d_k_cache.get(), d_v_cache.get(), max_len, dtype(), stream_);
    sync();
    // Rows nobody wrote keep their poison (NaN, which also never compares equal).
    std::vector<float> k_expected(cache_size, std::nanf(""));
    std::vector<float> v_expected(cache_size, std::nanf(""));
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t row = (int64_t{slot_of[t]} * max_len + pos_of[t]) * kv_width;
      for (int64_t i = 0; i < kv_width; ++i) {
        k_expected[row + i] = k[t * kv_width + i];
        v_expected[row + i] = v[t * kv_width + i];
      }
    }
    const std::vector<float> k_cache = d_k_cache.download();
    const std::vector<float> v_cache = d_v_cache.download();
    size_t wrong = 0;
    for (size_t i = 0; i < cache_size; ++i) {
      const bool k_ok =
          std::isnan(k_expected[i]) ? std::isnan(k_cache[i]) : k_cache[i] == k_expected[i];
      const bool v_ok =
          std::isnan(v_expected[i]) ? std::isnan(v_cache[i]) : v_cache[i] == v_expected[i];
      wrong += (k_ok ? 0 : 1) + (v_ok ? 0 : 1);
    }
    std::printf("[ exact    ] %-52s %-4s %zu of %zu differ\n",
                ("kv_append kv_width " + std::to_string(kv_width)).c_str(), dtype_name(dtype()),
                wrong, 2 * cache_size);
    EXPECT_EQ(wrong, 0u) << tag("kv_append kv_width " + std::to_string(kv_width));
  }
}

// ---------------------------------------------------------------------------------------------
// attention (after kv_append)

struct Sequence {
  int32_t slot;
  int32_t start;  // position of its first new token; the cache already holds 0..start-1
  int32_t n_new;
};

// The local heads of one tensor-parallel rank.
struct Heads {
  int64_t n_q;   // local q heads
  int64_t n_kv;  // local kv heads
  int64_t head_dim;
  int64_t first_q;   // global index of the first local q head
  int64_t group;     // q heads per kv head
  int64_t first_kv;  // global index of the first local kv head
};

struct Cache {
  int64_t window;  // 0: none
  int64_t max_len;
  int64_t slots;
};

struct AttentionCase {
  std::string name;
  Heads heads;
  Cache cache;
  std::vector<Sequence> sequences;
  Alibi alibi = {};  // ALiBi over alibi.n_heads heads (the split-KV kernels only)
};

// Which kernel a case runs on: the split-KV kernel with the splits it would choose, or with a
// given count; or the tensor-core prefill kernel, one call per sequence.
struct AttentionPath {
  enum Kind { kSplitKv, kPrefill } kind = kSplitKv;
  int splits = 0;  // kSplitKv: 0 picks attention_splits' count
};

// fused: q, k and v are read as views of one [tokens, q | k | v] buffer (GPT-NeoX's split
// query_key_value), through the kernels' row strides.
void run_attention_case(const AttentionCase& c, DType dtype, cudaStream_t stream, Rng& rng,
                        const std::string& label, bool fused = false, AttentionPath path = {}) {
  const Heads& h = c.heads;
  const int64_t kv_width = h.n_kv * h.head_dim;
  const int64_t q_width = h.n_q * h.head_dim;
  int64_t tokens = 0;
  for (const Sequence& s : c.sequences) tokens += s.n_new;
  std::vector<int32_t> slot_of;
  std::vector<int32_t> pos_of;
  for (const Sequence& s : c.sequences) {
    for (int32_t i = 0; i < s.n_new; ++i) {
      slot_of.push_back(s.slot);
      pos_of.push_back(s.start + i);
    }
  }
  // The cache starts full of earlier tokens' keys and values; kv_append then writes the new ones.
  const auto cache_size = static_cast<size_t>(c.cache.slots * c.cache.max_len * kv_width);
  std::vector<float> k_cache = rng.values(cache_size, dtype);
  std::vector<float> v_cache = rng.values(cache_size, dtype);
  // A wide q range gives peaked softmaxes, where subtracting the max matters.
  const std::vector<float> q = rng.values(static_cast<size_t>(tokens * q_width), dtype, -3, 3);
  const std::vector<float> k_new = rng.values(static_cast<size_t>(tokens * kv_width), dtype);
  const std::vector<float> v_new = rng.values(static_cast<size_t>(tokens * kv_width), dtype);

  const DeviceTensor d_k_cache(k_cache, dtype);
  const DeviceTensor d_v_cache(v_cache, dtype);
  const int64_t fused_width = q_width + 2 * kv_width;
  std::vector<float> qkv(static_cast<size_t>(tokens * fused_width));
  for (int64_t t = 0; t < tokens; ++t) {
    std::copy_n(q.begin() + t * q_width, q_width, qkv.begin() + t * fused_width);
    std::copy_n(k_new.begin() + t * kv_width, kv_width, qkv.begin() + t * fused_width + q_width);
    std::copy_n(v_new.begin() + t * kv_width, kv_width,
                qkv.begin() + t * fused_width + q_width + kv_width);
  }
  const DeviceTensor d_q(fused ? qkv : q, dtype);
  const DeviceTensor d_k(k_new, dtype);
  const DeviceTensor d_v(v_new, dtype);
  const size_t e = dtype_size(dtype);
  const void* q_in = d_q.get();
  const void* k_in = fused ? static_cast<const char*>(d_q.get()) + q_width * e : d_k.get();
  const void* v_in =
      fused ? static_cast<const char*>(d_q.get()) + (q_width + kv_width) * e : d_v.get();
  const int64_t ld = fused ? fused_width : 0;
  const DeviceBuffer d_slots = upload_raw(slot_of);
  const DeviceBuffer d_pos = upload_raw(pos_of);
  DeviceTensor d_out(static_cast<size_t>(tokens * q_width), dtype);
  const float scale = 1.0f / std::sqrt(static_cast<float>(h.head_dim));
  kv_append(k_in, v_in, tokens, kv_width, d_slots.as<int32_t>(), d_pos.as<int32_t>(),
            d_k_cache.get(), d_v_cache.get(), c.cache.max_len, dtype, stream, ld, ld);
  if (path.kind == AttentionPath::kPrefill) {
    int64_t t0 = 0;
    for (const Sequence& s : c.sequences) {
      // Scratch for padded heads, poisoned (NaN) so that a pad read as data shows.
      const size_t bytes =
          prefill_attention_scratch_bytes(ld, s.n_new, h.n_q, h.head_dim, s.start, h.n_kv, dtype);
      const DeviceBuffer scratch(std::max<size_t>(bytes, 1));
      CK(cudaMemset(scratch.get(), 0xff, std::max<size_t>(bytes, 1)));
      prefill_attention(static_cast<const char*>(q_in) + t0 * (fused ? fused_width : q_width) * e,
                        ld, s.n_new, h.n_q, h.head_dim, s.slot, s.start, d_k_cache.get(),
                        d_v_cache.get(), c.cache.max_len, h.n_kv, h.first_q, h.group, h.first_kv,
                        scale, c.cache.window, dtype,
                        static_cast<char*>(d_out.get()) + t0 * q_width * e, stream,
                        bytes > 0 ? scratch.get() : nullptr);
      CK(cudaStreamSynchronize(stream));  // before the scratch goes
      t0 += s.n_new;
    }
  } else {
    constexpr int64_t kScratch = int64_t{1} << 22;
    const int splits = path.splits > 0
                           ? path.splits
                           : attention_splits(tokens, h.n_q, h.head_dim, c.cache.max_len, h.n_kv,
                                              h.group, dtype, kScratch);
    const DeviceBuffer scratch(static_cast<size_t>(kScratch) * 4);
    ASSERT_LE(attention_scratch_floats(tokens, h.n_q, h.head_dim, splits), kScratch);
    const auto words = static_cast<size_t>(attention_counter_words(tokens, h.n_q, h.n_kv, h.group));
    const DeviceBuffer counters = upload_raw(std::vector<uint32_t>(words, 0));
    const auto call = [&] {
      attention(q_in, tokens, h.n_q, h.head_dim, d_slots.as<int32_t>(), d_pos.as<int32_t>(),
                d_k_cache.get(), d_v_cache.get(), c.cache.max_len, h.n_kv, h.first_q, h.group,
                h.first_kv, scale, c.cache.window, dtype, d_out.get(), stream, ld, splits,
                {scratch.as<float>(), counters.as<uint32_t>()}, c.alibi);
    };
    call();
    CK(cudaStreamSynchronize(stream));
    // The blocks' counts are back to zero, so that a second call (a replayed step) merges its
    // splits again: into an output poisoned with NaN, checked below.
    std::vector<uint32_t> left(words);
    CK(cudaMemcpy(left.data(), counters.get(), words * 4, cudaMemcpyDeviceToHost));
    EXPECT_EQ(static_cast<size_t>(std::count(left.begin(), left.end(), 0u)), words)
        << label << ": counters left set, " << splits << " splits";
    CK(cudaMemsetAsync(d_out.get(), 0xff, static_cast<size_t>(tokens * q_width) * e, stream));
    call();
  }
  CK(cudaStreamSynchronize(stream));

  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t row = (int64_t{slot_of[t]} * c.cache.max_len + pos_of[t]) * kv_width;
    std::copy_n(k_new.begin() + t * kv_width, kv_width, k_cache.begin() + row);
    std::copy_n(v_new.begin() + t * kv_width, kv_width, v_cache.begin() + row);
  }
  std::vector<int32_t> kv_of_q(static_cast<size_t>(h.n_q));
  for (int64_t i = 0; i < h.n_q; ++i) {
    kv_of_q[i] = static_cast<int32_t>((h.first_q + i) / h.group - h.first_kv);
  }
  std::vector<float> slopes;
  for (int64_t i = 0; c.alibi.max_bias > 0 && i < h.n_q; ++i) {
    slopes.push_back(alibi_slope(h.first_q + i, c.alibi.n_heads, c.alibi.max_bias) * c.alibi.scale);
  }
  std::vector<float> ref(static_cast<size_t>(tokens * q_width));
  int64_t t0 = 0;
  for (const Sequence& s : c.sequences) {
    const int64_t base = int64_t{s.slot} * c.cache.max_len * kv_width;
    cpu::attention(q.data() + t0 * q_width, s.n_new, s.start, h.n_q, h.head_dim, kv_of_q.data(),
                   k_cache.data() + base, v_cache.data() + base, h.n_kv, scale, c.cache.window,
                   ref.data() + t0 * q_width, 0, slopes.empty() ? nullptr : slopes.data());
    t0 += s.n_new;
  }
  expect_close(label, dtype, d_out.download(), ref);
}

TEST_P(CudaOpTest, KvAppendThenAttention) {
  Rng rng(10);
  // {name, heads {n_q, n_kv, head_dim, first_q, group, first_kv}, cache {window, max_len, slots},
  //  sequences {slot, start, n_new}}. The first is rank 1 of 4 of a 32 q / 8 kv head model: local
  // q heads 8..15 read global kv heads 2..3.
  const std::vector<AttentionCase> cases = {
      {"prefill tp-rank gqa4 hd128 (37 new + chunk of 20 at 10)",
       {8, 2, 128, 8, 4, 2},
       {0, 64, 3},
       {{0, 0, 37}, {2, 10, 20}}},
      {"decode mha hd64 (5 slots, positions 0..1000)",
       {4, 4, 64, 0, 1, 0},
       {0, 1100, 5},
       {{0, 5, 1}, {1, 63, 1}, {2, 300, 1}, {3, 1000, 1}, {4, 0, 1}}},
      {"window 16 gqa4 hd80 (prefill 37 + decode at 100)",
       {8, 2, 80, 0, 4, 0},
       {16, 200, 2},
       {{0, 0, 37}, {1, 100, 1}}},
      {"window 300 hd256 group2 (decode at 700 + 3 at 128)",
       {2, 1, 256, 2, 2, 1},
       {300, 800, 2},
       {{0, 700, 1}, {1, 128, 3}}},
      {"decode one token tp-rank gqa4 hd128 at 4095",
       {8, 2, 128, 24, 4, 6},
       {0, 4096, 1},
       {{0, 4095, 1}}},
      // Heads whose rows are no multiple of 16 bytes: the kernel's one-element loads.
      {"hd30 element loads (prefill 37 + decode at 250)",
       {4, 4, 30, 0, 1, 0},
       {0, 256, 2},
       {{0, 0, 37}, {1, 250, 1}}},
      {"hd258 element loads group2 (decode at 300 + 5 at 20)",
       {2, 1, 258, 0, 2, 0},
       {0, 320, 2},
       {{0, 300, 1}, {1, 20, 5}}},
  };
  for (const AttentionCase& c : cases) {
    run_attention_case(c, dtype(), stream_, rng, tag(c.name));
    run_attention_case(c, dtype(), stream_, rng, tag(c.name + ", q k v as views of one buffer"),
                       true);
    // Splits that leave some of them empty, and one that is not a power of two.
    for (const int splits : {1, 7, 64}) {
      run_attention_case(c, dtype(), stream_, rng,
                         tag(c.name + ", " + std::to_string(splits) + " splits"), false,
                         {AttentionPath::kSplitKv, splits});
    }
  }
}

// The shapes the model families have: GQA ratios 1, 2, 4, 7 and 8 and MQA, head dims 64, 80,
// 96, 128 and 256, causal and sliding-window masks, ragged batches (prompts of different lengths,
// chunks continuing a cached prefix), a rank's q heads that start inside a kv group.
const std::vector<AttentionCase>& family_attention_cases() {
  static const std::vector<AttentionCase> cases = {
      {"mha hd64 ragged (200 + 33 + chunk of 64 at 100)",
       {8, 8, 64, 0, 1, 0},
       {0, 300, 3},
       {{0, 0, 200}, {1, 0, 33}, {2, 100, 64}}},
      {"gqa2 hd256 (130 + chunk of 17 at 300)",
       {4, 2, 256, 0, 2, 0},
       {0, 320, 2},
       {{0, 0, 130}, {1, 300, 17}}},
      {"gqa4 hd128 long (1000, cache 1024)", {8, 2, 128, 0, 4, 0}, {0, 1024, 1}, {{0, 0, 1000}}},
      {"gqa7 hd128 ragged (100 + chunk of 50 at 60)",
       {14, 2, 128, 0, 7, 0},
       {0, 128, 2},
       {{0, 0, 100}, {1, 60, 50}}},
      {"gqa8 hd128 window 64 (300 + chunk of 40 at 500)",
       {16, 2, 128, 0, 8, 0},
       {64, 600, 2},
       {{0, 0, 300}, {1, 500, 40}}},
      {"mqa hd64 (12 q heads, 1 kv; 150 + 20 at 7)",
       {12, 1, 64, 0, 12, 0},
       {0, 160, 2},
       {{0, 0, 150}, {1, 7, 20}}},
      {"mqa hd128 tp-rank (q heads 8..15 of 32, 1 kv; 90)",
       {8, 1, 128, 8, 32, 0},
       {0, 96, 1},
       {{0, 0, 90}}},
      {"gqa4 hd128 rank starting mid-group (q 3..8, kv 0..2; 77)",
       {6, 3, 128, 3, 4, 0},
       {0, 80, 1},
       {{0, 0, 77}}},
      {"gqa4 hd80 window 32 (120 + 2 new at 90)",
       {8, 2, 80, 0, 4, 0},
       {32, 128, 2},
       {{0, 0, 120}, {1, 90, 2}}},
      {"mha hd96 ragged (GPT-NeoX-20B's heads; 150 + chunk of 40 at 60)",
       {8, 8, 96, 0, 1, 0},
       {0, 160, 2},
       {{0, 0, 150}, {1, 60, 40}}},
      {"gqa2 hd96 window 48 (200 + chunk of 30 at 100)",
       {8, 4, 96, 0, 2, 0},
       {48, 256, 2},
       {{0, 0, 200}, {1, 100, 30}}},
      {"mqa hd80 tp-rank (q heads 4..7 of 16, 1 kv; 70)",
       {4, 1, 80, 4, 16, 0},
       {0, 80, 1},
       {{0, 0, 70}}},
      {"gqa2 hd256 window 100 (decode at 1500, 3 at 700)",
       {4, 2, 256, 0, 2, 0},
       {100, 1600, 2},
       {{0, 1500, 1}, {1, 700, 3}}},
      // 16-bit groups of head dim 64, 96 or 128 run on tensor cores in blocks of 16 q heads.
      {"mqa hd64 wide group (40 q heads, 1 kv: blocks of 16, 16 and 8; 130 + 2 at 60)",
       {40, 1, 64, 0, 40, 0},
       {0, 136, 2},
       {{0, 0, 130}, {1, 60, 2}}},
      {"gqa4 hd64 decode (at 1999, and 3 at 500)",
       {8, 2, 64, 0, 4, 0},
       {0, 2048, 2},
       {{0, 1999, 1}, {1, 500, 3}}},
  };
  return cases;
}

// ALiBi as BLOOM (6 heads: both branches of the slope formula), Falcon-rw (slopes scaled by
// 1/sqrt(head_dim)) and a grouped case on tensor cores run it: a rank's heads take their global
// slopes, on long keys (a bias of -slope * 1000 must still leave the nearest keys their weight).
TEST_P(CudaOpTest, AlibiAttention) {
  Rng rng(14);
  const std::vector<AttentionCase> cases = {
      {"alibi mha hd16 (BLOOM: heads 2..5 of 6; 40 + decode at 1000)",
       {4, 4, 16, 2, 1, 2},
       {0, 1024, 2},
       {{0, 0, 40}, {1, 1000, 1}},
       {8.0f, 1.0f, 6}},
      {"alibi mha hd64 falcon-rw scale (heads 0..3 of 8; 70 + 3 at 200)",
       {4, 4, 64, 0, 1, 0},
       {0, 256, 2},
       {{0, 0, 70}, {1, 200, 3}},
       {8.0f, 0.125f, 8}},
      {"alibi gqa4 hd128 tensor cores (q heads 8..15 of 32; 90 + decode at 700)",
       {8, 2, 128, 8, 4, 2},
       {0, 800, 2},
       {{0, 0, 90}, {1, 700, 1}},
       {8.0f, 1.0f, 32}},
  };
  for (const AttentionCase& c : cases) {
    run_attention_case(c, dtype(), stream_, rng, tag(c.name));
    run_attention_case(c, dtype(), stream_, rng, tag(c.name + ", 7 splits"), false,
                       {AttentionPath::kSplitKv, 7});
  }
}

TEST_P(CudaOpTest, AttentionMasksGroupsAndHeadDims) {
  Rng rng(12);
  for (const AttentionCase& c : family_attention_cases()) {
    run_attention_case(c, dtype(), stream_, rng, tag(c.name + ", split-KV"));
  }
}

// The same cases on the tensor-core prefill kernel, where it serves (f16/bf16 on Hopper; head
// dims 80 and 96 padded to 128, in scratch). A test of its own: compute-sanitizer's racecheck
// cannot follow FlashInfer's TMA and barrier pipeline (results come out wrong under it, with no
// hazard reported), so the device script leaves this one out of racecheck.
TEST_P(CudaOpTest, PrefillAttentionMasksGroupsAndHeadDims) {
  if (!prefill_attention_supported(dtype(), 128)) {
    GTEST_SKIP() << "no tensor-core prefill for " << dtype_name(dtype()) << " on this device";
  }
  Rng rng(13);
  for (const AttentionCase& c : family_attention_cases()) {
    ASSERT_TRUE(prefill_attention_supported(dtype(), c.heads.head_dim)) << c.name;
    run_attention_case(c, dtype(), stream_, rng, tag(c.name + ", prefill"), false,
                       {AttentionPath::kPrefill});
    run_attention_case(c, dtype(), stream_, rng, tag(c.name + ", prefill, views"), true,
                       {AttentionPath::kPrefill});
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM

TEST_P(CudaOpTest, GemmShapesWithAndWithoutBias) {
  Rng rng(11);
  Gemm gemm;
  struct Shape {
    int64_t in;
    int64_t out;
  };
  // Llama-7B's projections (q/k/v/o, gate/up, down) and small odd shapes.
  for (const Shape s : {Shape{4096, 4096}, Shape{4096, 11008}, Shape{11008, 4096}, Shape{67, 33},
                        Shape{1, 5}, Shape{129, 257}}) {
    const std::vector<float> w = rng.values(static_cast<size_t>(s.out * s.in), dtype());
    const std::vector<float> bias = rng.values(static_cast<size_t>(s.out), dtype());
    const DeviceTensor d_w(w, dtype());
    const DeviceTensor d_bias(bias, dtype());
    for (const int64_t tokens : {int64_t{1}, int64_t{8}, int64_t{129}}) {
      const std::vector<float> x = rng.values(static_cast<size_t>(tokens * s.in), dtype());
      const DeviceTensor d_x(x, dtype());
      for (const bool with_bias : {false, true}) {
        DeviceTensor d_y(static_cast<size_t>(tokens * s.out), dtype());
        gemm.linear(d_x.get(), tokens, s.in, d_w.get(), s.out, with_bias ? d_bias.get() : nullptr,
                    dtype(), d_y.get(), stream_);
        sync();
        std::vector<float> ref(static_cast<size_t>(tokens * s.out));
        cpu::linear(x.data(), tokens, s.in, w.data(), s.out, with_bias ? bias.data() : nullptr,
                    ref.data());
        expect_close(tag("gemm tokens " + std::to_string(tokens) + " in " + std::to_string(s.in) +
                         " out " + std::to_string(s.out) + (with_bias ? " bias" : "")),
                     dtype(), d_y.download(), ref);
      }
    }
  }
}

// The fused path's linear_activation: the activation applied to the fp32 product plus bias
// (cuBLASLt's epilogue for the tanh GELU and ReLU, the GEMV kernel's at 1 and 2 tokens and f32's
// up to 8, the activation kernel after cuBLASLt for the others), against the CPU's linear then
// activation in fp32. The outputs are mostly within |x| < 3, where the tanh GELU and the exact
// one differ by up to 4.7e-4: f32's tolerance tells them apart, so an epilogue computing the
// other GELU fails. Plans are cached per epilogue: the same shape runs with every activation.
TEST_P(CudaOpTest, GemmAppliesTheActivation) {
  Rng rng(17);
  Gemm gemm;
  struct Shape {
    int64_t in;
    int64_t out;
  };
  for (const Shape s : {Shape{67, 33}, Shape{256, 96}}) {
    const std::vector<float> w = rng.values(static_cast<size_t>(s.out * s.in), dtype());
    const std::vector<float> bias = rng.values(static_cast<size_t>(s.out), dtype());
    const DeviceTensor d_w(w, dtype());
    const DeviceTensor d_bias(bias, dtype());
    for (const int64_t tokens : {int64_t{1}, int64_t{2}, int64_t{5}, int64_t{129}}) {
      const std::vector<float> x = rng.values(static_cast<size_t>(tokens * s.in), dtype());
      const DeviceTensor d_x(x, dtype());
      for (const tpe_activation act :
           {TPE_ACT_SILU, TPE_ACT_GELU, TPE_ACT_GELU_TANH, TPE_ACT_RELU}) {
        for (const bool with_bias : {false, true}) {
          DeviceTensor d_y(static_cast<size_t>(tokens * s.out), dtype());
          gemm.linear(d_x.get(), tokens, s.in, d_w.get(), s.out, with_bias ? d_bias.get() : nullptr,
                      dtype(), d_y.get(), stream_, act);
          sync();
          std::vector<float> ref(static_cast<size_t>(tokens * s.out));
          cpu::linear(x.data(), tokens, s.in, w.data(), s.out, with_bias ? bias.data() : nullptr,
                      ref.data());
          cpu::activation(act, ref.data(), static_cast<int64_t>(ref.size()));
          expect_close(tag("gemm+act " + std::to_string(act) + " tokens " + std::to_string(tokens) +
                           " in " + std::to_string(s.in) + " out " + std::to_string(s.out) +
                           (with_bias ? " bias" : "")),
                       dtype(), d_y.download(), ref);
        }
      }
    }
  }
}

TEST_P(CudaOpTest, GemmUnalignedOperandsAndCachedPlans) {
  Rng rng(12);
  Gemm gemm;
  const int64_t tokens = 5;
  const int64_t in = 64;
  const int64_t out = 48;
  const std::vector<float> x = rng.values(static_cast<size_t>(tokens * in), dtype());
  const std::vector<float> w = rng.values(static_cast<size_t>(out * in), dtype());
  const std::vector<float> bias = rng.values(static_cast<size_t>(out), dtype());
  std::vector<float> ref(static_cast<size_t>(tokens * out));
  cpu::linear(x.data(), tokens, in, w.data(), out, bias.data(), ref.data());
  // Operands one element off the 16-byte grid, as slices of larger tensors can be.
  DeviceTensor d_x(x.size(), dtype());
  DeviceTensor d_w(w.size(), dtype());
  DeviceTensor d_bias(bias.size(), dtype());
  const auto put = [](const DeviceTensor& d, const std::vector<float>& v) {
    const std::vector<uint8_t> bytes = encode(v, d.dtype);
    CK(cudaMemcpy(d.unaligned(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  };
  put(d_x, x);
  put(d_w, w);
  put(d_bias, bias);
  DeviceTensor d_y(ref.size(), dtype());
  gemm.linear(d_x.unaligned(), tokens, in, d_w.unaligned(), out, d_bias.unaligned(), dtype(),
              d_y.unaligned(), stream_);
  sync();
  expect_close(tag("gemm unaligned operands"), dtype(), d_y.download(d_y.unaligned()), ref);
  // The same shape again with aligned operands, then unaligned once more: a plan made for one
  // alignment must not serve the other.
  const DeviceTensor a_x(x, dtype());
  const DeviceTensor a_w(w, dtype());
  const DeviceTensor a_bias(bias, dtype());
  DeviceTensor a_y(ref.size(), dtype());
  gemm.linear(a_x.get(), tokens, in, a_w.get(), out, a_bias.get(), dtype(), a_y.get(), stream_);
  d_y.poison();
  gemm.linear(d_x.unaligned(), tokens, in, d_w.unaligned(), out, d_bias.unaligned(), dtype(),
              d_y.unaligned(), stream_);
  sync();
  expect_close(tag("gemm aligned after unaligned"), dtype(), a_y.download(), ref);
  expect_close(tag("gemm unaligned again"), dtype(), d_y.download(d_y.unaligned()), ref);
}

// The GEMV path (gemv.cu): Gemm::linear sends f16/bf16 products of 1 or 2 tokens and f32 ones of
// up to 8 there, the rest to cuBLASLt. Every token count 1..9 on Llama-7B's shapes and on odd ones:
// `in` no multiple of the 16-byte pack (the one-element path), out of 1 and 3 (a warp with rows
// past the end), with and without bias. y is allocated with one spare row, which must keep its
// poison. forced: through detail::gemv_forced instead of Gemm::linear.
void run_linear_case(Gemm& gemm, DType dtype, cudaStream_t stream, Rng& rng, int64_t tokens,
                     int64_t in, int64_t out, const std::vector<float>& w,
                     const std::vector<float>& bias, const DeviceTensor& d_w,
                     const DeviceTensor& d_bias, bool w_unaligned, bool x_unaligned, bool with_bias,
                     const std::string& label, bool forced = false) {
  const std::vector<float> x = rng.values(static_cast<size_t>(tokens * in), dtype);
  DeviceTensor d_x(x.size(), dtype);
  const std::vector<uint8_t> x_bytes = encode(x, dtype);
  void* x_ptr = x_unaligned ? d_x.unaligned() : d_x.get();
  CK(cudaMemcpy(x_ptr, x_bytes.data(), x_bytes.size(), cudaMemcpyHostToDevice));
  DeviceTensor d_y(static_cast<size_t>((tokens + 1) * out), dtype);
  const void* b_ptr = nullptr;
  if (with_bias) b_ptr = w_unaligned ? d_bias.unaligned() : d_bias.get();
  const void* w_ptr = w_unaligned ? d_w.unaligned() : d_w.get();
  if (!forced) {
    gemm.linear(x_ptr, tokens, in, w_ptr, out, b_ptr, dtype, d_y.get(), stream);
  } else {
    ASSERT_TRUE(detail::gemv_forced(x_ptr, tokens, in, w_ptr, out, b_ptr, dtype, d_y.get(), stream))
        << label;
  }
  CK(cudaStreamSynchronize(stream));
  std::vector<float> ref(static_cast<size_t>(tokens * out));
  cpu::linear(x.data(), tokens, in, w.data(), out, with_bias ? bias.data() : nullptr, ref.data());
  std::vector<float> y = d_y.download();
  size_t spare_written = 0;
  for (size_t i = ref.size(); i < y.size(); ++i) spare_written += std::isnan(y[i]) ? 0 : 1;
  EXPECT_EQ(spare_written, 0u) << label << ": wrote past y[tokens, out]";
  y.resize(ref.size());
  // |x| . |w|^T + |bias|: the scale of the rounding error of each output.
  std::vector<float> abs_x(x.size()), abs_w(w.size()), abs_b(bias.size()), magnitude(ref.size());
  for (size_t i = 0; i < x.size(); ++i) abs_x[i] = std::abs(x[i]);
  for (size_t i = 0; i < w.size(); ++i) abs_w[i] = std::abs(w[i]);
  for (size_t i = 0; i < bias.size(); ++i) abs_b[i] = std::abs(bias[i]);
  cpu::linear(abs_x.data(), tokens, in, abs_w.data(), out, with_bias ? abs_b.data() : nullptr,
              magnitude.data());
  expect_close(label, dtype, y, ref, &magnitude);
}

TEST_P(CudaOpTest, GemvTokensOneToNine) {
  Rng rng(13);
  Gemm gemm;
  struct Shape {
    int64_t in;
    int64_t out;
  };
  for (const Shape s : {Shape{4096, 4096}, Shape{4096, 11008}, Shape{11008, 4096}, Shape{4100, 96},
                        Shape{77, 40}, Shape{4096, 1}, Shape{4096, 3}, Shape{8, 3}, Shape{1, 7}}) {
    const std::vector<float> w = rng.values(static_cast<size_t>(s.out * s.in), dtype());
    const std::vector<float> bias = rng.values(static_cast<size_t>(s.out), dtype());
    const DeviceTensor d_w(w, dtype());
    const DeviceTensor d_bias(bias, dtype());
    for (int64_t tokens = 1; tokens <= 9; ++tokens) {
      for (const bool with_bias : {false, true}) {
        run_linear_case(
            gemm, dtype(), stream_, rng, tokens, s.in, s.out, w, bias, d_w, d_bias, false, false,
            with_bias,
            tag("gemv tokens " + std::to_string(tokens) + " in " + std::to_string(s.in) + " out " +
                std::to_string(s.out) + (with_bias ? " bias" : "")));
      }
    }
  }
}

// Both kernels of gemv.cu on every token count, whichever Gemm::linear would pick: the CUDA-core
// one (every dtype) and the tensor-core one (f16, bf16), including an `in` that is a multiple of
// the 8-element pack but not of the tensor-core kernel's 32-element step, and one shorter than a
// step.
TEST_P(CudaOpTest, GemvKernelForced) {
  Rng rng(15);
  Gemm gemm;
  struct Shape {
    int64_t in;
    int64_t out;
  };
  for (const Shape s :
       {Shape{4096, 4096}, Shape{11008, 72}, Shape{4104, 33}, Shape{8, 3}, Shape{2056, 19}}) {
    const std::vector<float> w = rng.values(static_cast<size_t>(s.out * s.in), dtype());
    const std::vector<float> bias = rng.values(static_cast<size_t>(s.out), dtype());
    const DeviceTensor d_w(w, dtype());
    const DeviceTensor d_bias(bias, dtype());
    for (int64_t tokens = 1; tokens <= 8; ++tokens) {
      const bool with_bias = tokens % 2 == 1;
      run_linear_case(
          gemm, dtype(), stream_, rng, tokens, s.in, s.out, w, bias, d_w, d_bias, false, false,
          with_bias,
          tag("gemv forced tokens " + std::to_string(tokens) + " in " + std::to_string(s.in) +
              " out " + std::to_string(s.out) + (with_bias ? " bias" : "")),
          /*forced=*/true);
    }
  }
}

TEST_P(CudaOpTest, GemvUnalignedOperands) {
  Rng rng(14);
  Gemm gemm;
  struct Shape {
    int64_t in;
    int64_t out;
  };
  for (const Shape s : {Shape{4096, 72}, Shape{77, 3}}) {
    const std::vector<float> w = rng.values(static_cast<size_t>(s.out * s.in), dtype());
    const std::vector<float> bias = rng.values(static_cast<size_t>(s.out), dtype());
    // W and the bias one element off the 16-byte grid, as slices of larger tensors can be.
    DeviceTensor d_w(w.size(), dtype());
    DeviceTensor d_bias(bias.size(), dtype());
    const std::vector<uint8_t> w_bytes = encode(w, dtype());
    const std::vector<uint8_t> b_bytes = encode(bias, dtype());
    CK(cudaMemcpy(d_w.unaligned(), w_bytes.data(), w_bytes.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_bias.unaligned(), b_bytes.data(), b_bytes.size(), cudaMemcpyHostToDevice));
    const DeviceTensor a_w(w, dtype());
    const DeviceTensor a_bias(bias, dtype());
    for (const int64_t tokens :
         {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{5}, int64_t{8}, int64_t{9}}) {
      // {w unaligned, x unaligned}: each of the three mixes.
      for (const auto& [w_off, x_off] :
           {std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
        run_linear_case(gemm, dtype(), stream_, rng, tokens, s.in, s.out, w, bias,
                        w_off ? d_w : a_w, w_off ? d_bias : a_bias, w_off, x_off, true,
                        tag("gemv unaligned" + std::string(w_off ? " w" : "") +
                            (x_off ? " x" : "") + " tokens " + std::to_string(tokens) + " in " +
                            std::to_string(s.in) + " out " + std::to_string(s.out)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The one-shot all-reduce over peer memory, its ranks simulated on one GPU: every rank's region
// and message on this device, every rank's kernels on a stream of its own, running at once as
// they would on their GPUs. A test enqueues each kernel on every rank before the next kernel on
// any (PeerRanks::each): CUDA loads a kernel at its first launch, and loading may wait for the
// device to drain, which it never does while one rank's kernel waits for a rank whose kernel is
// not launched yet (here all ranks share the device; on real GPUs each rank's load waits only
// for its own device).

class PeerRanks {
 public:
  PeerRanks(int world, int64_t capacity) : world_(world) {
    for (int r = 0; r < world; ++r) {
      regions_.emplace_back(peer_region_bytes(capacity));
      CK(cudaMemset(regions_.back().get(), 0, regions_.back().bytes()));
      cudaStream_t stream = nullptr;
      CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      streams_.push_back(stream);
    }
    int* abort = nullptr;
    CK(cudaHostAlloc(reinterpret_cast<void**>(&abort), sizeof(int), cudaHostAllocMapped));
    abort_ = abort;
    *abort_ = 0;
    int* abort_device = nullptr;
    CK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&abort_device), abort, 0));
    std::vector<void*> bases;
    for (const DeviceBuffer& region : regions_) bases.push_back(region.get());
    for (int r = 0; r < world; ++r) {
      groups_.push_back(peer_group(bases.data(), world, r, capacity, abort_device));
    }
  }
  PeerRanks(const PeerRanks&) = delete;
  PeerRanks& operator=(const PeerRanks&) = delete;
  ~PeerRanks() {
    *abort_ = 1;  // a failed test must not leave a kernel waiting
    for (cudaStream_t s : streams_) {
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
    cudaFreeHost(const_cast<int*>(abort_));
  }
  int world() const { return world_; }
  // f(r, stream of r) for every rank.
  template <class F>
  void each(F&& f) const {
    for (int r = 0; r < world_; ++r) f(r, streams_[r]);
  }
  const PeerGroup& group(int r) const { return groups_[r]; }
  cudaStream_t stream(int r) const { return streams_[r]; }
  volatile int* abort() const { return abort_; }
  void sync() const {
    for (cudaStream_t s : streams_) CK(cudaStreamSynchronize(s));
  }

 private:
  int world_;
  std::vector<DeviceBuffer> regions_;
  std::vector<cudaStream_t> streams_;
  std::vector<PeerGroup> groups_;
  volatile int* abort_ = nullptr;
};

// Every rank ends with the sum of all ranks' messages taken in rank order in fp32 and rounded
// once: the same bits on every rank (a rank that summed in its own order, or rounded partial
// sums, would differ from the others). Calls of changing sizes follow each other (a whole pack
// short of nothing, fewer elements than blocks, a tail past the packs, the whole capacity, an
// unaligned message), so the staging halves alternate and every block's call count must agree
// across ranks; then the same calls recorded as a graph per rank and replayed, which the
// counters in device memory must keep apart.
TEST_P(CudaOpTest, PeerAllReduceSumsEveryRankInRankOrder) {
  Rng rng(45);
  const int64_t capacity = 64 << 10;
  const auto esize = static_cast<int64_t>(dtype_size(dtype()));
  const std::vector<int64_t> counts = {8, 3, 4099, capacity / esize, 1000, 17};
  for (const int world : {2, 3, 4, 8}) {
    PeerRanks ranks(world, capacity);
    std::vector<DeviceTensor> x, pristine;
    std::vector<std::vector<float>> inputs;
    for (int r = 0; r < world; ++r) {
      inputs.push_back(rng.values(static_cast<size_t>(capacity / esize), dtype(), -4, 4));
      x.emplace_back(inputs.back(), dtype());
      pristine.emplace_back(inputs.back(), dtype());
    }
    // One call on every rank: from the pristine inputs (aligned, or shifted by one element),
    // then the sum.
    auto load = [&](int r, cudaStream_t st, int64_t count, bool unaligned) {
      CK(cudaMemcpyAsync(unaligned ? x[r].unaligned() : x[r].get(), pristine[r].get(),
                         static_cast<size_t>(count * esize), cudaMemcpyDeviceToDevice, st));
    };
    auto sum = [&](int r, cudaStream_t st, int64_t count, bool unaligned) {
      peer_all_reduce(unaligned ? x[r].unaligned() : x[r].get(), count, dtype(), ranks.group(r),
                      st);
    };
    auto enqueue = [&](int64_t count, bool unaligned) {
      ranks.each([&](int r, cudaStream_t st) { load(r, st, count, unaligned); });
      ranks.each([&](int r, cudaStream_t st) { sum(r, st, count, unaligned); });
    };
    auto check = [&](int64_t count, bool unaligned, const std::string& how) {
      std::vector<float> expected(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) {
        float acc = 0.0f;
        for (int s = 0; s < world; ++s) acc += inputs[s][i];
        expected[i] = round_to(acc, dtype());
      }
      for (int r = 0; r < world; ++r) {
        std::vector<float> got = x[r].download(unaligned ? x[r].unaligned() : nullptr);
        got.resize(static_cast<size_t>(count));
        expect_exact(tag(how + " world " + std::to_string(world) + " rank " + std::to_string(r) +
                         " count " + std::to_string(count)),
                     dtype(), got, expected);
      }
    };
    for (int round = 0; round < 2; ++round) {
      for (const int64_t count : counts) {
        enqueue(count, false);
        ranks.sync();
        check(count, false, "eager");
      }
      enqueue(999, true);
      ranks.sync();
      check(999, true, "eager unaligned");
    }
    // Recorded: three calls per graph, the last one's result checked after every replay.
    std::vector<cudaGraphExec_t> graphs(static_cast<size_t>(world));
    ranks.each([&](int r, cudaStream_t st) {
      CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      for (const int64_t count : {int64_t{4099}, int64_t{8}, int64_t{1000}}) {
        load(r, st, count, false);
        sum(r, st, count, false);
      }
      cudaGraph_t graph = nullptr;
      CK(cudaStreamEndCapture(st, &graph));
      CK(cudaGraphInstantiate(&graphs[r], graph, 0));
      CK(cudaGraphDestroy(graph));
    });
    for (int replay = 0; replay < 3; ++replay) {
      ranks.each([&](int r, cudaStream_t st) { CK(cudaGraphLaunch(graphs[r], st)); });
      ranks.sync();
      check(1000, false, "replay " + std::to_string(replay));
    }
    for (cudaGraphExec_t g : graphs) CK(cudaGraphExecDestroy(g));
  }
}

// A rank whose peers never come waits until the host sets abort, then returns: a failed rank
// does not leave the others' kernels spinning forever.
TEST_P(CudaOpTest, PeerAllReduceGivesUpWhenAborted) {
  PeerRanks ranks(2, 4096);
  const DeviceTensor x(std::vector<float>(256, 1.0f), dtype());
  peer_all_reduce(x.get(), 256, dtype(), ranks.group(0), ranks.stream(0));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(cudaStreamQuery(ranks.stream(0)), cudaErrorNotReady) << "it did not wait for rank 1";
  *ranks.abort() = 1;
  const auto start = std::chrono::steady_clock::now();
  while (cudaStreamQuery(ranks.stream(0)) == cudaErrorNotReady &&
         std::chrono::steady_clock::now() - start < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(cudaStreamQuery(ranks.stream(0)), cudaSuccess) << "still waiting 10 s after abort";
  EXPECT_THROW(peer_all_reduce(x.get(), 4096, dtype(), ranks.group(0), ranks.stream(0)),
               tpe::Error);  // past the capacity
}

// The all-reduce fused with the norm that reads it writes what the one-shot all-reduce and then
// the norm kernel write, bit for bit, on every rank: x (the sum) and y (its norm). RMSNorm, and
// LayerNorm with and without a bias; one row (decode at batch 1), 3, and 40 (more rows than
// blocks); rows of 4096 elements and of 100 (no whole number of 16-byte packs). The two kernels'
// calls interleave on the same ranks, as a program makes them, so both must keep the blocks'
// call counts in step.
TEST_P(CudaOpTest, PeerAllReduceNormIsAllReduceThenNormBitForBit) {
  Rng rng(46);
  const int64_t capacity = 1 << 20;
  const auto esize = static_cast<int64_t>(dtype_size(dtype()));
  const float eps = 1e-5f;
  for (const int world : {2, 4}) {
    PeerRanks ranks(world, capacity);
    for (const auto& [kind, biased] :
         {std::pair{TPE_NORM_RMS, false}, std::pair{TPE_NORM_LAYER, true},
          std::pair{TPE_NORM_LAYER, false}}) {
      for (const int64_t width : {int64_t{4096}, int64_t{100}}) {
        for (const int64_t rows : {int64_t{1}, int64_t{3}, int64_t{40}}) {
          const auto n = static_cast<size_t>(rows * width);
          const DeviceTensor w(rng.values(static_cast<size_t>(width), dtype(), 0.5f, 1.5f),
                               dtype());
          const DeviceTensor b(rng.values(static_cast<size_t>(width), dtype()), dtype());
          std::vector<DeviceTensor> pristine, x_pair, y_pair, x_fused, y_fused;
          for (int r = 0; r < world; ++r) {
            pristine.emplace_back(rng.values(n, dtype(), -2, 2), dtype());
            x_pair.emplace_back(n, dtype());
            y_pair.emplace_back(n, dtype());
            x_fused.emplace_back(n, dtype());
            y_fused.emplace_back(n, dtype());
          }
          const size_t bytes = n * static_cast<size_t>(esize);
          const void* bias = biased ? b.get() : nullptr;
          ranks.each([&](int r, cudaStream_t st) {
            CK(cudaMemcpyAsync(x_pair[r].get(), pristine[r].get(), bytes, cudaMemcpyDeviceToDevice,
                               st));
            CK(cudaMemcpyAsync(x_fused[r].get(), pristine[r].get(), bytes, cudaMemcpyDeviceToDevice,
                               st));
          });
          ranks.each([&](int r, cudaStream_t st) {
            peer_all_reduce(x_pair[r].get(), rows * width, dtype(), ranks.group(r), st);
          });
          ranks.each([&](int r, cudaStream_t st) {
            if (kind == TPE_NORM_RMS) {
              rms_norm(x_pair[r].get(), rows, width, w.get(), eps, dtype(), y_pair[r].get(), st);
            } else {
              layer_norm(x_pair[r].get(), rows, width, w.get(), bias, eps, dtype(), y_pair[r].get(),
                         st);
            }
          });
          ranks.each([&](int r, cudaStream_t st) {
            peer_all_reduce_norm(kind, x_fused[r].get(), rows, width, w.get(), bias, eps, dtype(),
                                 y_fused[r].get(), ranks.group(r), st);
          });
          ranks.sync();
          const std::string what = std::string(kind == TPE_NORM_RMS ? "rms" : "layer") +
                                   (biased ? "+bias" : "") + " world " + std::to_string(world) +
                                   " rows " + std::to_string(rows) + " width " +
                                   std::to_string(width);
          for (int r = 0; r < world; ++r) {
            expect_exact(tag("all_reduce_norm sum " + what), dtype(), x_fused[r].download(),
                         x_pair[r].download());
            expect_exact(tag("all_reduce_norm norm " + what), dtype(), y_fused[r].download(),
                         y_pair[r].download());
          }
          expect_exact(tag("all_reduce_norm ranks agree " + what), dtype(), y_fused[0].download(),
                       y_fused[world - 1].download());
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sizes of zero and bad arguments

TEST_P(CudaOpTest, ZeroSizesWriteNothing) {
  Gemm gemm;
  DeviceTensor d_y(64, dtype());
  const DeviceTensor d_in(std::vector<float>(64, 1.0f), dtype());
  gemm.linear(d_in.get(), 0, 8, d_in.get(), 8, nullptr, dtype(), d_y.get(), stream_);
  gemm.linear(d_in.get(), 8, 8, d_in.get(), 0, d_in.get(), dtype(), d_y.get(), stream_);
  add(d_in.get(), d_in.get(), d_y.get(), 0, dtype(), stream_);
  rms_norm(d_in.get(), 0, 8, d_in.get(), 1e-6f, dtype(), d_y.get(), stream_);
  attention(d_in.get(), 0, 1, 8, nullptr, nullptr, d_in.get(), d_in.get(), 8, 1, 0, 1, 0, 1.0f, 0,
            dtype(), d_y.get(), stream_);
  sync();
  size_t written = 0;
  for (const float v : d_y.download()) written += std::isnan(v) ? 0 : 1;
  EXPECT_EQ(written, 0u);
}

TEST_P(CudaOpTest, BadArgumentsThrow) {
  const DeviceTensor d(std::vector<float>(64, 1.0f), dtype());
  EXPECT_THROW(rotary(d.get(), 1, 1, 8, 5, nullptr, nullptr, nullptr, dtype(), stream_),
               tpe::Error);
  EXPECT_THROW(attention(d.get(), 1, 1, 1000, nullptr, nullptr, d.get(), d.get(), 8, 1, 0, 1, 0,
                         1.0f, 0, dtype(), d.get(), stream_),
               tpe::Error);
  // q heads 0..3 with group 2 need kv heads 0..1; one local kv head is too few.
  EXPECT_THROW(attention(d.get(), 1, 4, 8, nullptr, nullptr, d.get(), d.get(), 8, 1, 0, 2, 0, 1.0f,
                         0, dtype(), d.get(), stream_),
               tpe::Error);
  EXPECT_THROW(add(d.get(), d.get(), d.get(), -1, dtype(), stream_), tpe::Error);
  EXPECT_THROW(Gemm().linear(d.get(), 1, 0, d.get(), 1, nullptr, dtype(), d.get(), stream_),
               tpe::Error);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOpTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const ::testing::TestParamInfo<DType>& param) {
                           return std::string(dtype_name(param.param));
                         });

}  // namespace
}  // namespace tpe::cuda
