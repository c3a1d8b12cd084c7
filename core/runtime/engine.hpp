// The engine: a model prepared for a tensor-parallel group (config, policy, graph, plan), its
// weights loaded rank by rank, and prompt logits and generation on top. Ranks are threads with an
// in-process communicator. Owns: orchestration of ranks. May not touch: kernels directly.
#pragma once

#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/comm/launch.hpp"
#include "core/common/tensor.hpp"
#include "core/config/model_config.hpp"
#include "core/config/run_config.hpp"
#include "core/graph/graph.hpp"
#include "core/parallel/plan.hpp"
#include "core/plugin/registry.hpp"
#include "core/program/program.hpp"
#include "core/runtime/executor.hpp"
#include "core/runtime/sampler.hpp"
#include "core/tokenizer/tokenizer.hpp"

namespace tpe::runtime {

// Everything known before a weight is read.
struct Model {
  config::ModelConfig config;
  plugin::Registry registry;
  plugin::Choice choice;
  graph::Graph graph;
  parallel::Plan plan;
  // The injection policy the plan followed (the TOML's, else the plugin's), if any.
  std::optional<config::InjectionPolicy> injection_policy;
  std::string device;  // "cpu" | "cuda"
  // Set when a launcher (torchrun, mpirun, srun) started one process per rank; this process then
  // runs rank launch->rank only.
  std::optional<comm::LaunchEnv> launch;
  std::string dtype;  // resolved: "float32" | "float16" | "bfloat16"
  // The largest pass each rank's memory plan is sized for: a prompt chunk or a decode batch.
  program::Limits limits;
  bool replay = true;            // record decode steps and replay them where the backend can
  bool peer_all_reduce = false;  // inference.all_reduce = "auto" (CUDA, TP > 1)
  // The fused path's rewrite passes each rank's program gets (kernel_inject, "auto": on CUDA;
  // inference.fused_passes, default all); none: the plain path.
  program::Passes passes;
  // The most positions a sequence may reach (prompt + new tokens): config.json's
  // max_position_embeddings; 0 when unchecked (inference.allow_long_context, dynamic NTK rope,
  // which extends the context by design, or no such key).
  int64_t max_positions = 0;
  // The positions of the smallest learned position table (GPT-2's wpe), a limit no option lifts;
  // 0: none.
  int64_t learned_positions = 0;
};

// The model's config: a directory's config.json (and generation_config.json), or a GGUF file's
// metadata read as the config.json of the checkpoint it was converted from.
config::ModelConfig load_model_config(const std::filesystem::path& model_path);
// The model's tokenizer: a directory's tokenizer.json (and tokenizer_config.json), or a GGUF
// file's tokenizer.ggml.* metadata (Tokenizer::from_gguf).
tokenizer::Tokenizer load_tokenizer(const std::filesystem::path& model_path);

// The model's chat template and the special tokens a template may name (bos_token, eos_token,
// unk_token, pad_token): tokenizer_config.json's `chat_template` (the "default" one of a list),
// or a GGUF file's tokenizer.chat_template. tpe::Error naming the file when there is none.
struct ChatTemplate {
  std::string text;
  std::map<std::string, std::string> variables;
  std::string source;  // for messages
};
ChatTemplate load_chat_template(const std::filesystem::path& model_path);

// Reads the config, finds the policy, builds the graph and plans it for run.tp_size ranks
// (device = "cuda" needs neither a GPU nor a CUDA build to be planned; the Engine checks).
Model prepare(const config::RunConfig& run);

struct GenerationParams {
  SamplingParams sampling;
  int64_t max_new_tokens = 32;
  uint64_t seed = 0;
  std::vector<int64_t> stop_token_ids;
  // With `logprobs` given to generate: each chosen token's log-probability and this many
  // alternatives (token_logprob).
  int64_t top_logprobs = 0;
  // When set and nonzero (a signal handler's flag), generation stops before its next token and
  // returns what it has; rank 0 reads it and tells the others, so all stop at the same step.
  const std::atomic<int>* interrupt = nullptr;
};

// The seed of sequence i's generator in a generation (the first takes the seed itself): one
// generator per sequence, so that rows can be sampled at once on several threads and still give
// the same tokens for a seed.
inline uint64_t sequence_seed(uint64_t seed, size_t i) { return seed + i * 0x9E3779B97F4A7C15ull; }

// The user's settings over the model's generation_config.json defaults.
GenerationParams resolve_generation(const config::GenerationSettings& settings,
                                    const config::GenerationDefaults& defaults);

class Engine {
 public:
  // Loads each rank's weight slices from the checkpoint (progress on stderr unless quiet), or,
  // given a seed, makes random ones (see random_weights.hpp) and reads no checkpoint.
  Engine(Model model, bool quiet, std::optional<uint64_t> random_weights_seed = std::nullopt);
  ~Engine();

  const Model& model() const { return model_; }
  int world() const { return model_.plan.world; }
  // Whether this process runs rank 0, the one that prints (every process returns the results).
  bool is_rank0() const;

  // The logits at every position of each prompt, each prompt in its own KV-cache slot of one
  // batch: [len_i, vocab] per prompt.
  std::vector<Tensor> prompt_logits(const std::vector<std::vector<int64_t>>& prompts);

  // Generates up to max_new_tokens per prompt (batched); a sequence ends after emitting a stop
  // token (which is kept). on_token(sequence, token) is called as tokens are chosen. With
  // `profile`, the forward pass that makes token profile->step + 1 (0: the prompt pass) is timed
  // op by op and rank 0's times are left in profile->times (a prompt longer than one pass: its
  // first pass), with the token rows that pass ran.
  struct StepProfile {
    int64_t step = 1;
    std::vector<StepTime> times;
    int64_t tokens = 0;
  };
  // `logprobs`, when given, gets each sequence's tokens' token_logprob (rank 0's process).
  std::vector<std::vector<int64_t>> generate(
      const std::vector<std::vector<int64_t>>& prompts, const GenerationParams& params,
      const std::function<void(size_t, int64_t)>& on_token = {}, StepProfile* profile = nullptr,
      std::vector<std::vector<TokenLogprob>>* logprobs = nullptr);

  // All-reduces issued so far (each counted once, not per rank).
  int64_t all_reduce_count() const;
  // Decode steps rank 0 replayed from a recording (a CUDA graph) so far.
  int64_t replays() const;
  // How this process's first rank runs the all-reduce ("NCCL", "one-shot over peer memory ...");
  // empty for a single rank.
  const std::string& collectives() const;
  // Weight bytes each rank holds (fp32 on the CPU backend).
  std::vector<int64_t> weight_bytes() const;
  // Device memory of each of this process's ranks: weights, the KV cache now allocated, the most
  // the other buffers (the activation arena, per-pass data) held at once since
  // reset_memory_peak(), all memory in use on the device (0 where the backend cannot say;
  // includes the runtime's and NCCL's own), and the arena its memory plan asked for, bytes.
  struct RankMemory {
    int64_t weights = 0, kv_cache = 0, workspace = 0, device_in_use = 0, planned_arena = 0;
  };
  std::vector<RankMemory> memory();
  // Frees the KV caches (the next generation makes its own) and starts the peak afresh.
  void reset_memory_peak();
  double load_seconds() const { return load_seconds_; }
  // Rank 0's device memory bandwidth, measured now (see Backend::copy_bandwidth_gbs).
  double copy_bandwidth_gbs();

 private:
  struct Ranks;
  // The backend of this process's local-th rank, global rank `rank`.
  std::unique_ptr<backend::Backend> make_backend(int local, int rank);
  // Runs the prompts' tokens in passes within the memory plan's limits; every token's logits
  // (all_rows) or each prompt's last, [rows, vocab] per prompt, on every rank's thread; with
  // `profile`, the first pass is timed op by op into it.
  std::vector<Tensor> prefill(Executor& executor, const std::vector<std::vector<int64_t>>& prompts,
                              bool all_rows, StepProfile* profile);
  Model model_;
  std::unique_ptr<Ranks> ranks_;
  double load_seconds_ = 0;
};

}  // namespace tpe::runtime
