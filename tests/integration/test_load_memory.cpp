// Loading one rank's share at TP = 4 must not materialise the model: the peak resident memory
// while rank 1 loads stays near that rank's slices plus one tensor's pages, not the whole model.
// Runs alone in its own process (peak RSS is per process); not under sanitizers, whose shadow
// memory would be measured too.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "core/backend/cpu_backend.hpp"
#include "core/comm/communicator.hpp"
#include "core/common/process.hpp"
#include "core/io/safetensors.hpp"
#include "core/runtime/engine.hpp"
#include "core/runtime/executor.hpp"

namespace tpe {
namespace {

namespace fs = std::filesystem;

// Writes a random-weight Llama checkpoint tensor by tensor, never holding more than one chunk.
int64_t write_checkpoint(const fs::path& dir) {
  const int64_t hidden = 512, ffn = 1536, vocab = 4096, layers = 4;
  nlohmann::json config = {{"model_type", "llama"},         {"hidden_size", hidden},
                           {"intermediate_size", ffn},      {"num_attention_heads", 8},
                           {"num_key_value_heads", 8},      {"num_hidden_layers", layers},
                           {"vocab_size", vocab},           {"rms_norm_eps", 1e-5},
                           {"rope_theta", 10000.0},         {"tie_word_embeddings", false},
                           {"max_position_embeddings", 128}};
  std::ofstream(dir / "config.json") << config.dump();
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors = {
      {"model.embed_tokens.weight", {vocab, hidden}},
      {"model.norm.weight", {hidden}},
      {"lm_head.weight", {vocab, hidden}}};
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      tensors.push_back({p + ".self_attn." + n + ".weight", {hidden, hidden}});
    }
    tensors.push_back({p + ".mlp.gate_proj.weight", {ffn, hidden}});
    tensors.push_back({p + ".mlp.up_proj.weight", {ffn, hidden}});
    tensors.push_back({p + ".mlp.down_proj.weight", {hidden, ffn}});
    tensors.push_back({p + ".input_layernorm.weight", {hidden}});
    tensors.push_back({p + ".post_attention_layernorm.weight", {hidden}});
  }
  nlohmann::json header = nlohmann::json::object();
  int64_t offset = 0;
  for (const auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {offset, offset + 4 * n}}};
    offset += 4 * n;
  }
  const std::string text = header.dump();
  std::ofstream out(dir / "model.safetensors", std::ios::binary);
  const uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << text;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-0.05f, 0.05f);
  std::vector<float> chunk(1 << 16);
  for (int64_t written = 0; written < offset; written += 4 * static_cast<int64_t>(chunk.size())) {
    for (float& f : chunk) f = dist(rng);
    const int64_t bytes =
        std::min<int64_t>(offset - written, 4 * static_cast<int64_t>(chunk.size()));
    out.write(reinterpret_cast<const char*>(chunk.data()), bytes);
  }
  return offset;
}

TEST(LoadMemory, OneRankOfFourStaysNearItsShare) {
  const fs::path dir = fs::temp_directory_path() / ("tpe_load_memory_" + std::to_string(getpid()));
  fs::create_directories(dir);
  const int64_t model_bytes = write_checkpoint(dir);
  config::RunConfig run;
  run.model_path = dir;
  run.tp_size = 4;
  run.prefill_chunk = 16;  // a small activation arena: this measures the weights
  run.max_batch = 1;
  const runtime::Model model = runtime::prepare(run);
  const io::Checkpoint checkpoint = io::Checkpoint::open(dir);
  comm::ThreadGroup group(4);
  program::Program program = program::lower(model.graph, model.plan, 1);
  program::plan_memory(program, model.limits);
  runtime::Executor rank1(model.graph, std::move(program),
                          std::make_unique<backend::CpuBackend>(1, group), /*replay=*/false);

  std::ofstream("/proc/self/clear_refs") << "5";  // reset the peak (VmHWM) to the current RSS
  const int64_t before_kib = proc_status_kib("VmRSS");
  ASSERT_LE(proc_status_kib("VmHWM"), before_kib + 1024) << "could not reset the peak RSS";
  rank1.load(
      [&checkpoint](const std::string& name, std::span<const int64_t> shape, const IndexSet& rows,
                    const IndexSet& cols,
                    std::span<float> out) { checkpoint.read_f32(name, shape, rows, cols, out); },
      [] {});
  const int64_t peak_growth = (proc_status_kib("VmHWM") - before_kib) * 1024;
  const int64_t share = rank1.weight_bytes();
  const int64_t largest_tensor = 4096 * 512 * 4;
  std::printf("model %.1f MiB, rank 1 share %.1f MiB, peak RSS growth while loading %.1f MiB\n",
              model_bytes / 1048576.0, share / 1048576.0, peak_growth / 1048576.0);
  EXPECT_LT(share, model_bytes / 3);
  EXPECT_LT(peak_growth, share + largest_tensor / 2);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tpe
