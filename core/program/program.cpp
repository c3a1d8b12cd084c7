#include "core/program/program.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "core/common/error.hpp"

namespace tpe::program {

using graph::Op;
using parallel::Step;

int64_t Program::bytes(int v, const Limits& l) const {
  const Value& value = values[v];
  if (!value.stored) return 0;
  const int64_t rows = value.rows == Rows::kTokens      ? l.tokens
                       : value.rows == Rows::kLogitRows ? l.logit_rows
                                                        : l.second_tokens;
  return (rows * value.width * l.element_bytes + 255) / 256 * 256;
}

int Program::storage(int v) const {
  while (values[v].alias >= 0) v = values[v].alias;
  return v;
}

namespace {

// A weight slice's identity: two ops reading the same slice (tied embeddings) share it.
std::string slice_key(const std::string& tensor, const IndexSet& rows, const IndexSet& cols) {
  std::string key = tensor;
  for (const Range& r : rows) key += "|r" + std::to_string(r.begin) + "-" + std::to_string(r.end);
  for (const Range& c : cols) key += "|c" + std::to_string(c.begin) + "-" + std::to_string(c.end);
  return key;
}

// Field by field: struct_size and padding are not part of a rope's meaning.
bool same_rope(const tpe_rope_desc& a, const tpe_rope_desc& b) {
  return a.type == b.type && a.theta == b.theta &&
         a.partial_rotary_factor == b.partial_rotary_factor && a.factor == b.factor &&
         a.low_freq_factor == b.low_freq_factor && a.high_freq_factor == b.high_freq_factor &&
         a.original_max_position_embeddings == b.original_max_position_embeddings;
}

class Lowering final : public ops::Lowering {
 public:
  Lowering(const graph::Graph& g, const parallel::Plan& plan, int rank, Passes passes)
      : g_(g), plan_(plan), rank_(rank), passes_(passes) {
    p_.rank = rank;
    p_.world = plan.world;
    p_.vocab = plan.vocab;
    readers_.resize(g.values.size());
    for (size_t op = 0; op < g.ops.size(); ++op) {
      for (int v : g.ops[op].inputs) readers_[v].push_back(static_cast<int>(op));
    }
    for (size_t v = 0; v < g.values.size(); ++v) {
      held_.push_back(parallel::held_features(g, plan, static_cast<int>(v), rank));
      Value value;
      value.width = index_count(held_.back());
      if (g.values[v].stream == 1) value.rows = Rows::kSecondTokens;
      p_.values.push_back(value);
    }
  }

  Program run() {
    for (const Step& step : plan_.steps) {
      if (step.kind == Step::Kind::kAllReduce) {
        emit(ops::make_instr(Code::kAllReduce, -1, {step.index}, step.index));
      } else {
        ops::traits(g_.ops[step.index].kind).lower(*this, step.index);
      }
    }
    if (on(Pass::kMergeLinears)) merge_linears();
    if (on(Pass::kLinearActivation)) linear_activations();
    if (on(Pass::kGatedActivation)) gate_activations();
    if (on(Pass::kAddNorm)) norms_into(Code::kAdd, Code::kAddNorm, "add");
    if (on(Pass::kRotaryAttention)) rotary_into_attention();
    if (on(Pass::kAllReduceNorm)) norms_into(Code::kAllReduce, Code::kAllReduceNorm, "all_reduce");
    if (passes_.any()) drop_unused_weights();
    compact_views();
    alias_in_place();
    return std::move(p_);
  }

  // ---- ops::Lowering -----------------------------------------------------------------------
  const graph::Graph& graph() const override { return g_; }
  int rank() const override { return rank_; }
  int world() const override { return plan_.world; }
  const IndexSet& held(int value) const override { return held_[value]; }
  Range vocab() const override { return plan_.vocab[rank_]; }
  parallel::LinearKind linear_kind(int op) const override { return plan_.linear_kind[op]; }
  const IndexSet& split_part(int op, size_t part) const override {
    return plan_.split_parts[op][rank_][part];
  }
  int added_once(int op) const override { return plan_.add_replicated_input[op]; }

  const std::vector<int>& readers(int value) const override { return readers_[value]; }

  void view(int value, int of, int64_t col_offset) override {
    Value& v = p_.values[value];
    v.alias = of;
    v.col_offset = col_offset;
    v.ld = p_.values[of].width;
  }

  int weight(Weight slice) override {
    for (const Range& r : slice.rows) {
      TPE_CHECK(r.begin >= 0 && r.end <= slice.shape[0],
                "a weight slice's rows lie outside its tensor");
    }
    for (const Range& c : slice.cols) {
      TPE_CHECK(slice.shape.size() > 1 && c.begin >= 0 && c.end <= slice.shape[1],
                "a weight slice's columns lie outside its tensor");
    }
    TPE_CHECK(!slice.transposed || slice.shape.size() == 2, "a transposed weight is a matrix");
    const std::string key = slice_key(slice.tensor, slice.rows, slice.cols);
    auto it = weight_index_.find(key);
    if (it != weight_index_.end()) return it->second;
    const int index = static_cast<int>(p_.weights.size());
    p_.weights.push_back(std::move(slice));
    weight_index_.emplace(key, index);
    return index;
  }

  int new_value(int64_t width, Rows rows) override {
    p_.values.push_back({width, rows});
    return static_cast<int>(p_.values.size()) - 1;
  }

  Value& value(int v) override { return p_.values[v]; }

  int rope(const tpe_rope_desc& desc, int64_t head_dim) override {
    for (size_t r = 0; r < p_.ropes.size(); ++r) {
      const backend::RopeSpec& known = p_.ropes[r];
      if (known.head_dim == head_dim && same_rope(known.desc, desc)) {
        return static_cast<int>(r);
      }
    }
    p_.ropes.push_back({desc, head_dim});
    return static_cast<int>(p_.ropes.size()) - 1;
  }

  int kv_layer(int64_t width, bool cross) override {
    p_.cache_layers.push_back({width, cross});
    return static_cast<int>(p_.cache_layers.size()) - 1;
  }

  void set_logits(int value, int64_t vocab_size) override {
    p_.logits = value;
    p_.vocab_size = vocab_size;
  }

  void emit(Instr instr) override { p_.instrs.push_back(std::move(instr)); }

 private:
  // ---- rewrite passes of the fused path ----------------------------------------------------
  // Linears that read one value become one matrix product over their weights' rows in turn
  // (q/k/v, gate/up, Falcon's parallel qkv and MLP up): one GEMM reading the input once, whose
  // output the linears' outputs are views of. A linear whose output others already view (a
  // fused projection a split reads) stays as it is, as do linears of differing bias.
  void merge_linears() {
    std::vector<std::vector<size_t>> by_input(p_.values.size());
    const std::vector<bool> viewed = viewed_values();
    for (size_t i = 0; i < p_.instrs.size(); ++i) {
      const Instr& instr = p_.instrs[i];
      if (instr.code == Code::kLinear && g_.ops[instr.op].kind == graph::OpKind::kLinear &&
          !viewed[instr.out] && p_.values[instr.in[0]].ld == 0) {
        by_input[instr.in[0]].push_back(i);
      }
    }
    std::vector<bool> gone(p_.instrs.size(), false);
    for (const std::vector<size_t>& group : by_input) {
      if (group.size() < 2) continue;
      const bool bias = p_.instrs[group[0]].bias >= 0;
      if (std::any_of(group.begin(), group.end(),
                      [&](size_t i) { return (p_.instrs[i].bias >= 0) != bias; })) {
        continue;
      }
      Weight weight, biases;
      int64_t width = 0;
      for (size_t i : group) {
        weight.concat.push_back(p_.weights[p_.instrs[i].weight]);
        if (bias) biases.concat.push_back(p_.weights[p_.instrs[i].bias]);
        width += p_.values[p_.instrs[i].out].width;
      }
      Instr& first = p_.instrs[group[0]];
      const int fused = new_value(width, p_.values[first.out].rows);
      int64_t offset = 0;
      for (size_t i : group) {
        const int out = p_.instrs[i].out;
        view(out, fused, offset);
        offset += p_.values[out].width;
        if (i != group[0]) gone[i] = true;
      }
      std::vector<std::string> names;
      for (size_t i : group) names.push_back(g_.relative_name(p_.instrs[i].op));
      first.label = fmt::format("linear {}", fmt::join(names, "+"));
      first.out = fused;
      first.weight = add_weight(std::move(weight));
      if (bias) first.bias = add_weight(std::move(biases));
    }
    erase_instrs(gone);
  }

  // A linear whose output only an activation reads applies it in its epilogue, on the fp32
  // product and bias before the one rounding (GPT-2's, BLOOM's, OPT's and GPT-NeoX's MLP up
  // projection): no pass over the activation's buffer. A merged projection's outputs are views,
  // which this leaves to gated_activation.
  void linear_activations() {
    const std::vector<int> reads = read_counts();
    const std::vector<int> producer = producers();
    const std::vector<bool> viewed = viewed_values();
    std::vector<bool> gone(p_.instrs.size(), false);
    for (size_t a = 0; a < p_.instrs.size(); ++a) {
      const Instr& act = p_.instrs[a];
      if (act.code != Code::kActivation) continue;
      const int l = producer[act.in[0]];
      if (l < 0 || p_.instrs[l].code != Code::kLinear || reads[act.in[0]] != 1 ||
          viewed[act.in[0]] || p_.values[act.in[0]].ld != 0 || p_.values[act.out].ld != 0) {
        continue;
      }
      Instr& linear = p_.instrs[l];
      linear.code = Code::kLinearActivation;
      linear.label = instr_label(g_, linear) + "+" + instr_label(g_, act);
      linear.op = act.op;  // the activation's kind
      linear.out = act.out;
      gone[a] = true;
    }
    erase_instrs(gone);
  }

  // act(gate) * up, where gate and up are views of one merged projection and each is read only
  // there, becomes one instruction reading both views: no copies of the views, no activation
  // buffer (Llama's and Qwen2's gated MLP).
  void gate_activations() {
    const std::vector<int> reads = read_counts();
    const std::vector<int> producer = producers();
    std::vector<bool> gone(p_.instrs.size(), false);
    for (Instr& mul : p_.instrs) {
      if (mul.code != Code::kMul) continue;
      for (int k = 0; k < 2; ++k) {
        const int act_out = mul.in[k], up = mul.in[1 - k];
        const int a = producer[act_out];
        if (a < 0 || p_.instrs[a].code != Code::kActivation || reads[act_out] != 1) continue;
        const int gate = p_.instrs[a].in[0];
        const Value& g = p_.values[gate];
        const Value& u = p_.values[up];
        if (g.ld == 0 || u.ld == 0 || g.alias != u.alias || reads[gate] != 1 || reads[up] != 1) {
          continue;
        }
        mul.code = Code::kGatedActivation;
        mul.op = p_.instrs[a].op;  // the activation's kind
        mul.label = "gated_activation";
        mul.in = {gate, up};
        gone[a] = true;
        break;
      }
    }
    erase_instrs(gone);
  }

  // The instruction that last writes each value (-1: none), how many instructions read it, and
  // whether a view or an in-place value shares its memory.
  std::vector<int> producers() const {
    std::vector<int> producer(p_.values.size(), -1);
    for (size_t i = 0; i < p_.instrs.size(); ++i) producer[p_.instrs[i].out] = static_cast<int>(i);
    return producer;
  }
  std::vector<int> read_counts() const {
    std::vector<int> reads(p_.values.size(), 0);
    for (const Instr& instr : p_.instrs) {
      for (int v : instr.in) ++reads[v];
    }
    return reads;
  }
  std::vector<bool> viewed_values() const {
    std::vector<bool> viewed(p_.values.size(), false);
    for (const Value& v : p_.values) {
      if (v.alias >= 0) viewed[v.alias] = true;
    }
    return viewed;
  }

  // A norm joins the instruction that makes its input whole, which then writes the norm too and
  // still the sum, at `sum` (read again by the next residual add): a residual add (the add's
  // output; the sum is not read back from memory) or, at TP > 1, where the residual sum is made on
  // the partial values, the all-reduce (in place; the CUDA backend's one-shot all-reduce does both
  // in one kernel). Of two norms reading one sum (GPT-NeoX's parallel block) the first joins, and
  // the second reads the sum as before.
  void norms_into(Code producer_code, Code fused, const char* name) {
    const std::vector<int> producer = producers();
    std::vector<bool> gone(p_.instrs.size(), false);
    for (size_t n = 0; n < p_.instrs.size(); ++n) {
      const Instr& norm = p_.instrs[n];
      if (norm.code != Code::kNorm) continue;
      const int a = producer[norm.in[0]];
      if (a < 0 || p_.instrs[a].code != producer_code || p_.values[norm.in[0]].ld != 0) continue;
      Instr& first = p_.instrs[a];
      first.code = fused;
      first.sum = first.out;
      first.out = norm.out;
      first.op = norm.op;  // the norm's kind and eps
      first.weight = norm.weight;
      first.bias = norm.bias;
      first.label = std::string(name) + "+" + instr_label(g_, norm);
      gone[n] = true;
    }
    erase_instrs(gone);
  }

  // Rotary of q and k that only attention reads moves into the attention instruction, which
  // rotates them in place (their unrotated values have no other reader) as it appends k and v to
  // the cache: one kernel for rotary and the KV append instead of three.
  void rotary_into_attention() {
    const std::vector<int> producer = producers();
    const std::vector<int> reads = read_counts();
    std::vector<bool> gone(p_.instrs.size(), false);
    for (Instr& att : p_.instrs) {
      if (att.code != Code::kAttention || att.attention.cross) continue;
      const int rq = producer[att.in[0]], rk = producer[att.in[1]];
      if (rq < 0 || rk < 0 || rq == rk) continue;
      const Instr& q = p_.instrs[rq];
      const Instr& k = p_.instrs[rk];
      if (q.code != Code::kRotary || k.code != Code::kRotary || q.rope != k.rope ||
          reads[att.in[0]] != 1 || reads[att.in[1]] != 1 || reads[q.in[0]] != 1 ||
          reads[k.in[0]] != 1 || q.in[0] == k.in[0]) {
        continue;
      }
      att.in[0] = q.in[0];
      att.in[1] = k.in[0];
      att.rope = q.rope;
      att.label = "rotary+" + instr_label(g_, att);
      gone[rq] = gone[rk] = true;
    }
    erase_instrs(gone);
  }

  void erase_instrs(const std::vector<bool>& gone) {
    std::vector<Instr> kept;
    for (size_t i = 0; i < p_.instrs.size(); ++i) {
      if (!gone[i]) kept.push_back(std::move(p_.instrs[i]));
    }
    p_.instrs = std::move(kept);
  }

  // The merged linears' own slices are no longer read: the rank does not load them.
  void drop_unused_weights() {
    std::vector<int> remap(p_.weights.size(), -1);
    std::vector<Weight> kept;
    for (Instr& instr : p_.instrs) {
      for (int* w : {&instr.weight, &instr.bias}) {
        if (*w < 0) continue;
        if (remap[*w] < 0) {
          remap[*w] = static_cast<int>(kept.size());
          kept.push_back(std::move(p_.weights[*w]));
        }
        *w = remap[*w];
      }
    }
    p_.weights = std::move(kept);
  }

  int add_weight(Weight w) {
    p_.weights.push_back(std::move(w));
    return static_cast<int>(p_.weights.size()) - 1;
  }

  // Views reach only the instructions that read them in place of a whole buffer (rotary,
  // attention, copy, gated activation); any other reader gets a copy made just before it.
  void compact_views() {
    std::vector<Instr> out;
    for (Instr& instr : p_.instrs) {
      const bool reads_views = instr.code == Code::kRotary || instr.code == Code::kAttention ||
                               instr.code == Code::kCopy || instr.code == Code::kGatedActivation;
      for (size_t k = 0; k < instr.in.size() && !reads_views; ++k) {
        const int v = instr.in[k];
        if (p_.values[v].ld == 0) continue;
        const int whole = new_value(p_.values[v].width, p_.values[v].rows);
        out.push_back(ops::make_instr(Code::kCopy, instr.op, {v}, whole));
        instr.in[k] = whole;
      }
      out.push_back(std::move(instr));
    }
    p_.instrs = std::move(out);
  }

  // Elementwise ops whose input dies with them write over it: rotary and activations then run in
  // place, and a copy of a dying value is no copy at all. A view is a region of its fused value:
  // it dies with its own last reader, and only rotary (which takes views) writes over one.
  void alias_in_place() {
    const int n = static_cast<int>(p_.instrs.size());
    std::vector<int> last(p_.values.size(), -1);
    for (int i = 0; i < n; ++i) {
      for (int v : p_.instrs[i].in) last[v] = i;
    }
    last[p_.logits] = n;
    std::vector<int> region(p_.values.size());  // the value whose memory region v uses
    for (size_t v = 0; v < region.size(); ++v) {
      region[v] = p_.values[v].ld != 0 ? static_cast<int>(v) : p_.storage(static_cast<int>(v));
    }
    std::vector<int> region_last = last;  // per region, the last use of any value in it
    std::vector<Instr> kept;
    for (int i = 0; i < n; ++i) {
      Instr& instr = p_.instrs[i];
      const bool elementwise = instr.code == Code::kRotary || instr.code == Code::kActivation ||
                               instr.code == Code::kCopy || instr.code == Code::kAdd ||
                               instr.code == Code::kMul || instr.code == Code::kAddNorm;
      // The output written element by element from its inputs' same elements (an add-norm's sum).
      const int written = instr.code == Code::kAddNorm ? instr.sum : instr.out;
      if (elementwise && written != p_.logits) {
        for (int v : instr.in) {
          const int r = region[v];
          const Value& in = p_.values[v];
          if (!in.stored || region_last[r] != i || (in.ld != 0 && instr.code != Code::kRotary)) {
            continue;
          }
          Value& out = p_.values[written];
          out.alias = p_.storage(v);
          out.col_offset = in.col_offset;
          out.ld = in.ld;
          region[written] = r;
          region_last[r] = std::max(region_last[r], last[written]);
          break;
        }
      }
      const bool no_op = instr.code == Code::kCopy &&
                         p_.storage(instr.out) == p_.storage(instr.in[0]) &&
                         p_.values[instr.out].col_offset == p_.values[instr.in[0]].col_offset;
      if (!no_op) kept.push_back(std::move(instr));
    }
    p_.instrs = std::move(kept);
  }

  const graph::Graph& g_;
  const parallel::Plan& plan_;
  int rank_;
  bool on(Pass pass) const { return passes_.test(static_cast<size_t>(pass)); }

  Passes passes_;
  std::vector<IndexSet> held_;             // per graph value
  std::vector<std::vector<int>> readers_;  // per graph value: the ops that read it
  Program p_;
  std::map<std::string, int> weight_index_;
};

}  // namespace

Passes passes_named(const std::vector<std::string>& names) {
  Passes passes;
  for (const std::string& name : names) {
    const auto* it = std::find(kPassNames.begin(), kPassNames.end(), name);
    if (it == kPassNames.end()) {
      fail("no pass named '{}' (the passes: {})", name, fmt::join(kPassNames, ", "));
    }
    passes.set(static_cast<size_t>(it - kPassNames.begin()));
  }
  return passes;
}

Program lower(const graph::Graph& graph, const parallel::Plan& plan, int rank, Passes passes) {
  TPE_CHECK(rank >= 0 && rank < plan.world, "rank out of range");
  return Lowering(graph, plan, rank, passes).run();
}

void plan_memory(Program& p, const Limits& limits) {
  TPE_CHECK(limits.tokens >= 1 && limits.logit_rows >= 1, "empty limits");
  const int n = static_cast<int>(p.instrs.size());
  // Each storage root lives from the first instruction that touches it to the last.
  std::vector<int> first(p.values.size(), n + 1), last(p.values.size(), -1);
  for (int i = 0; i < n; ++i) {
    const Instr& instr = p.instrs[i];
    auto touch = [&](int v) {
      const int root = p.storage(v);
      first[root] = std::min(first[root], i);
      last[root] = std::max(last[root], i);
    };
    for (int v : instr.in) touch(v);
    touch(instr.out);
    if (instr.sum >= 0) touch(instr.sum);
  }
  last[p.storage(p.logits)] = n;  // read after the pass
  struct Block {
    int64_t offset, size;
    int value;
  };
  std::vector<Block> live;  // sorted by offset
  int64_t arena = 0;
  auto allocate = [&](int v) {
    const int64_t size = p.bytes(v, limits);
    int64_t offset = 0;
    auto pos = live.begin();
    for (; pos != live.end(); ++pos) {
      if (pos->offset - offset >= size) break;
      offset = std::max(offset, pos->offset + pos->size);
    }
    live.insert(pos, {offset, size, v});
    p.values[v].offset = offset;
    arena = std::max(arena, offset + size);
  };
  std::vector<std::vector<int>> starting(n + 1), ending(n + 1);
  for (size_t v = 0; v < p.values.size(); ++v) {
    if (!p.values[v].stored || p.values[v].alias >= 0 || last[v] < 0) continue;
    starting[first[v]].push_back(static_cast<int>(v));
    ending[last[v]].push_back(static_cast<int>(v));
  }
  for (int i = 0; i <= n; ++i) {
    for (int v : starting[i]) allocate(v);
    for (int v : ending[i]) {
      live.erase(
          std::find_if(live.begin(), live.end(), [v](const Block& b) { return b.value == v; }));
    }
  }
  for (size_t v = 0; v < p.values.size(); ++v) {
    Value& value = p.values[v];
    if (value.alias < 0) continue;
    value.offset =
        p.values[p.storage(static_cast<int>(v))].offset + value.col_offset * limits.element_bytes;
  }
  p.limits = limits;
  p.arena_bytes = arena;
}

std::string instr_label(const graph::Graph& graph, const Instr& instr) {
  if (!instr.label.empty()) return instr.label;
  if (instr.op < 0) return code_name(instr.code);
  const std::string name = graph.relative_name(instr.op);
  const std::string kind = graph::op_kind_name(graph.ops[instr.op].kind);
  return name.empty() ? kind : kind + " " + name;
}

}  // namespace tpe::program
