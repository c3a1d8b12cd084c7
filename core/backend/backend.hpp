// Where a rank's tensors live and how its instructions run. The executor runs the rank's program
// (core/program: which slices, which collectives, which buffers) and calls a Backend for the
// arithmetic, the memory and the collectives, so CPU and CUDA share every decision and differ
// only in kernels and memory. Level: below the program and the runtime; knows no graph or plan.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <tpengine/policy.h>

#include "core/common/index_set.hpp"
#include "core/common/tensor.hpp"

namespace tpe::backend {

// Which of the pass's ids an embedding looks up: kPositions are each token's position in its
// sequence (learned position tables).
enum class Ids { kTokens, kTokenTypes, kSecondTokens, kSecondTokenTypes, kPositions };

// The inputs of one forward pass: its tokens grouped by sequence.
struct Batch {
  struct Segment {
    int slot = 0;           // which sequence's KV cache
    int64_t start_pos = 0;  // position of its first token
    int64_t count = 0;
    // The sequence length its rotary frequencies are computed for (dynamic NTK scaling depends
    // on it): 0 means start_pos + count. A prompt processed in chunks gives every chunk the
    // whole prompt's length, as one pass over the prompt would.
    int64_t rope_len = 0;
    // Tokens of the sequence's second stream that cross-attention sees (held after this pass).
    int64_t second_len = 0;
  };
  std::vector<int64_t> tokens;
  std::vector<Segment> segments;
  std::vector<int64_t> logit_rows;   // rows of `tokens` whose logits are wanted
  std::vector<int64_t> token_types;  // one per token, for graphs that read them; else empty
  // A second token stream (an encoder's input) that the first attends to: its tokens, grouped by
  // sequence like `tokens` (a segment's slot names the same sequence). Empty for most models.
  struct Stream {
    std::vector<int64_t> tokens;
    std::vector<int64_t> token_types;
    std::vector<Segment> segments;
  };
  Stream second;

  // Every sequence adds one token and every row's logits are wanted: a decode step, whose
  // instructions are the same for every step of the same batch size.
  bool is_decode() const;
  // The ids an embedding of kind `which` reads.
  std::vector<int64_t> ids(Ids which) const;
};

// One set of rotary parameters the program uses; Backend::rotary names it by index.
struct RopeSpec {
  tpe_rope_desc desc{};
  int64_t head_dim = 0;
};

// Sampling's candidates (Backend::top_rows): per row, its k largest values and their columns in
// no order, and whether the row is finite.
struct TopRows {
  int64_t k = 0;
  std::vector<float> values;    // [rows, k]
  std::vector<int32_t> ids;     // [rows, k]
  std::vector<uint8_t> finite;  // [rows]: 0 where the row holds a NaN or an infinity
  std::span<const float> values_of(size_t row) const {
    return {values.data() + row * static_cast<size_t>(k), static_cast<size_t>(k)};
  }
  std::span<const int32_t> ids_of(size_t row) const {
    return {ids.data() + row * static_cast<size_t>(k), static_cast<size_t>(k)};
  }
};

// A rank-local matrix [rows, cols] in the backend's memory and element type. A view (ld > cols)
// is some columns of a wider buffer: a part of a fused projection's output. Only rotary,
// attention and copy take views; the program gives every other instruction whole buffers.
struct Buffer {
  std::shared_ptr<void> storage;  // owns the memory
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;  // elements from one row to the next; 0: cols
  int64_t stride() const { return ld > 0 ? ld : cols; }
};

// One attention layer's keys and values for every slot: [slots * max_len, width] each.
struct KvLayer {
  Buffer k, v;
  int64_t max_len = 0;
};

// How a rank's local q heads map to its local kv heads: local q head h reads local kv head
// (first_q + h) / group - first_kv.
struct AttentionShape {
  int64_t head_dim = 0;
  int64_t first_q = 0;
  int64_t group = 1;
  int64_t first_kv = 0;
  float scale = 1;
  int64_t window = 0;
  // ALiBi (0 = none): local q head h adds alibi_slope(first_q + h, alibi_heads, alibi_max_bias) *
  // alibi_scale * (key_pos - query_pos) to its scaled score (kernels/alibi.hpp).
  float alibi_max_bias = 0;
  float alibi_scale = 1;
  int64_t alibi_heads = 0;
  // Cross-attention: k and v are the second stream's rows, appended at its positions, and every
  // query sees all of its sequence's second-stream keys (Segment::second_len), unmasked.
  bool cross = false;
};

// Bytes of a backend's live buffers, and their most since reset_peak(); thread-safe.
class MemoryTally {
 public:
  void add(int64_t bytes) {
    const int64_t live = live_ += bytes;
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
  }
  void sub(int64_t bytes) { live_ -= bytes; }
  int64_t peak() const { return peak_; }
  void reset_peak() { peak_ = live_.load(); }

 private:
  std::atomic<int64_t> live_ = 0, peak_ = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // ---- memory ----
  // Called first on every thread that uses this backend (a CUDA device is per-thread state).
  virtual void bind_thread() {}
  // Writes rows [first, first + count) of a weight, row-major fp32, into out.
  using RowFill = std::function<void(int64_t first, int64_t count, std::span<float> out)>;
  // A rows x cols weight whose values `fill` writes, in pieces of whole rows. The backend may
  // call fill on other threads and return before the piece reaches the device: whatever fill
  // refers to must outlive end_loading(), which waits for every piece (and rethrows the first
  // fill's error).
  virtual Buffer load(int64_t rows, int64_t cols, const RowFill& fill) = 0;
  virtual void end_loading() {}
  // Uninitialised memory: every op writes the whole of its output.
  virtual Buffer alloc(int64_t rows, int64_t cols) = 0;
  virtual int64_t element_bytes() const = 0;
  // The most memory the backend's buffers (weights, KV caches, activations) have held at once
  // since reset_memory_peak(), and (where the device can say) all memory in use on the device
  // now, bytes.
  struct MemoryUse {
    int64_t buffers_peak = 0;
    int64_t device_in_use = 0;
  };
  virtual MemoryUse memory_use() { return {tally_->peak(), 0}; }
  void reset_memory_peak() { tally_->reset_peak(); }
  virtual Tensor to_host(const Buffer& x) = 0;  // fp32
  // The memory bandwidth the weights are read at, from a large copy (bytes read + written per
  // second, GB/s): the roofline a decode step is measured against.
  virtual double copy_bandwidth_gbs() = 0;
  // Called by every rank at once when its weights are loaded: sets up what the collectives need
  // beyond the communicator. Returns how the all-reduce runs, for the log (empty: the default).
  virtual std::string connect() { return {}; }

  // ---- one forward pass ----
  // Sizes the per-pass inputs once, for passes of up to max_tokens tokens and max_logit_rows
  // logit rows, with the rotary parameter sets the program uses (fixed device buffers: a replayed
  // pass reads its inputs from the same addresses).
  virtual void reserve_inputs(int64_t max_tokens, int64_t max_logit_rows,
                              std::vector<RopeSpec> ropes) = 0;
  // Makes the batch's token ids, positions, slots, rotary tables and logit rows available to the
  // ops below.
  virtual void begin(const Batch& batch) = 0;
  // Rows of table (vocabulary rows vocab.begin..end) for the batch's ids of kind `ids`; zeros
  // elsewhere.
  virtual void embedding(const Buffer& table, Range vocab, Ids ids, Buffer& out) = 0;
  virtual void norm(tpe_norm_kind kind, const Buffer& x, const Buffer& w, const Buffer* b,
                    float eps, Buffer& y) = 0;
  virtual void linear(const Buffer& x, const Buffer& w, const Buffer* bias, Buffer& y) = 0;
  virtual void gather_columns(const Buffer& x, const IndexSet& cols, Buffer& out) = 0;
  // Rotates x in place (heads of the rope's head_dim) by each token's position, with rotary
  // parameter set `rope` (reserve_inputs); frequencies per sequence.
  virtual void rotary(Buffer& x, int rope) = 0;
  // Appends the batch's keys and values at their positions, then attends causally.
  virtual void attention(const Buffer& q, const Buffer& k, const Buffer& v, KvLayer& cache,
                         const AttentionShape& shape, Buffer& out) = 0;
  // The fused path's two of these in one: rotates q and k in place (rotary parameter set
  // `rope`), then attention; and sum = a + b (rounded to the dtype), then y = norm(sum). Devices
  // that fuse them override these; the results are those of the separate ops.
  virtual void rotary_attention(Buffer& q, Buffer& k, const Buffer& v, KvLayer& cache,
                                const AttentionShape& shape, int rope, Buffer& out) {
    rotary(q, rope);
    rotary(k, rope);
    attention(q, k, v, cache, shape, out);
  }
  virtual void add_norm(tpe_norm_kind kind, const Buffer& a, const Buffer& b, const Buffer& w,
                        const Buffer* bias, float eps, Buffer& sum, Buffer& y) {
    add(a, b, sum);
    norm(kind, sum, w, bias, eps, y);
  }
  virtual void activation(tpe_activation act, Buffer& x) = 0;
  // y = act(x · w^T (+ bias)): a device whose matrix products apply the activation in their
  // epilogue (on the fp32 sum, rounded once) overrides this; here it acts on the rounded y.
  virtual void linear_activation(tpe_activation act, const Buffer& x, const Buffer& w,
                                 const Buffer* bias, Buffer& y) {
    linear(x, w, bias, y);
    activation(act, y);
  }
  // out = act(gate) * up; gate and up may be views (columns of one merged projection).
  virtual void gated_activation(tpe_activation act, const Buffer& gate, const Buffer& up,
                                Buffer& out) = 0;
  virtual void add(const Buffer& a, const Buffer& b, Buffer& out) = 0;
  virtual void mul(const Buffer& a, const Buffer& b, Buffer& out) = 0;
  virtual void copy(const Buffer& src, Buffer& dst) = 0;
  // The batch's logit rows of x.
  virtual void select_rows(const Buffer& x, Buffer& out) = 0;
  // Per row of x, the index of its largest value (the first among equals), or -1 where the row
  // holds a NaN or an infinity: greedy decoding's choice without the logits leaving the device.
  virtual std::vector<int64_t> argmax_rows(const Buffer& x);
  // Per row of x, its min(k, cols) largest values and their columns (among values equal to the
  // smallest of them, any), and whether it is finite: what sampling with top-k needs of the
  // logits, chosen where they are.
  virtual TopRows top_rows(const Buffer& x, int64_t k);

  // ---- collectives over the tensor-parallel group ----
  virtual void all_reduce(Buffer& x) = 0;
  // all_reduce(x), then y = norm(x): the fused path's pair at TP > 1, one kernel where the
  // backend has one.
  virtual void all_reduce_norm(tpe_norm_kind kind, Buffer& x, const Buffer& w, const Buffer* b,
                               float eps, Buffer& y);
  // Rank 0's values to every rank (the sampled tokens).
  virtual void broadcast(std::vector<int64_t>& values) = 0;
  // Every rank's [rows, vocab[r].size()] slice of the logits into full [rows, vocab].
  virtual void gather_vocab(const Buffer& local, const std::vector<Range>& vocab, Buffer& full) = 0;

  // ---- recording a pass once and replaying it (CUDA graphs) ----
  // A backend that can record the work a pass queues and replay it, reading new inputs from the
  // buffers begin() fills, says so here. Between record_begin() and record_end(key) nothing runs;
  // replay(key) runs the recording, or says false when there is none. forget_recordings() drops
  // them (the memory they refer to moved); the backend may also drop them itself, when a pass
  // that runs op by op has to grow scratch memory that recordings refer to.
  virtual bool can_replay() const { return false; }
  virtual void record_begin() {}
  virtual void record_end(int /*key*/) {}
  virtual bool replay(int /*key*/) { return false; }
  virtual void forget_recordings() {}

  // ---- timing one forward pass op by op (tpengine bench --profile) ----
  // After profile_begin(), profile_mark() follows each step; profile_end() returns the
  // milliseconds between consecutive marks (the first from profile_begin). A device backend
  // holds its queue until the host has queued the pass (or must wait for it), so that the marks
  // time the device's work rather than the host's launches.
  virtual void profile_begin() = 0;
  virtual void profile_mark() = 0;
  virtual std::vector<double> profile_end() = 0;

 protected:
  // A backend counts the memory its buffers take here (shared: a buffer may outlive it).
  std::shared_ptr<MemoryTally> tally_ = std::make_shared<MemoryTally>();
};

}  // namespace tpe::backend
