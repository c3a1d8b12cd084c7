// The user's run configuration: a TOML file ([model], [parallel], [inference], [generation],
// [policy]) that CLI flags override. Unknown keys and wrong types are errors naming the key and
// the file line. Owns: the TOML schema. May not touch: models, plugins.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tpe::config {

// Block class -> linears (relative to the block prefix) that are row-parallel, all-reduced.
using InjectionPolicy = std::map<std::string, std::vector<std::string>>;

// Generation settings; unset ones come from the model's generation_config.json.
struct GenerationSettings {
  std::optional<int64_t> max_new_tokens;
  std::optional<bool> do_sample;
  std::optional<double> temperature;
  std::optional<int64_t> top_k;
  std::optional<double> top_p;
  std::optional<double> repetition_penalty;
  std::optional<uint64_t> seed;
  std::optional<std::vector<int64_t>> stop_token_ids;  // replaces the model's eos ids
  std::optional<bool> ignore_eos;
};

struct RunConfig {
  // [model]
  std::filesystem::path model_path;  // relative paths resolve against the TOML file's folder
  std::string dtype = "auto";        // auto | float32 | float16 | bfloat16
  // [parallel]
  int tp_size = 1;
  // [inference]
  std::string device = "cpu";
  // Fused kernels (rewrite passes over each rank's program) or plain ones; unset: "auto", fused
  // on CUDA and plain on the CPU.
  std::optional<bool> kernel_inject;
  // The fused path's rewrite passes, by name (program::kPassNames); unset: all of them. For
  // measuring what each pass brings.
  std::optional<std::vector<std::string>> fused_passes;
  // Prompts run in passes of at most this many tokens, so activation memory does not grow with
  // the prompt.
  int64_t prefill_chunk = 2048;
  // The most sequences one generation runs at once (sizes the logits' buffers).
  int64_t max_batch = 32;
  // cuda: record the decode step once per batch size and replay it (a CUDA graph).
  bool cuda_graph = true;
  // cuda, TP > 1: "auto" sums small messages (decode's) with the one-shot all-reduce over peer
  // memory where every rank can address every other's, NCCL otherwise; "nccl": NCCL always.
  std::string all_reduce = "nccl";
  // Run sequences past the model's max_position_embeddings (refused by default).
  bool allow_long_context = false;
  // [policy]
  std::optional<std::string> policy_name;  // force this plugin
  std::vector<std::filesystem::path> policy_search_paths;
  std::optional<InjectionPolicy> injection_policy;
  // Plugins are loaded and built in child processes, so that a crash in their code is an error
  // naming them (false: in this process, e.g. to debug a plugin).
  bool isolate_policies = true;
  // [generation]
  GenerationSettings generation;
};

// Parses a TOML file. Errors: "FILE:LINE: unknown key 'parallel.tp'",
// "FILE:LINE: key 'parallel.tp_size' must be an integer, not a string", TOML syntax errors with
// their line, values out of range (tp_size < 1, top_p outside (0, 1], ...).
RunConfig load_run_config(const std::filesystem::path& toml_file);
// Same, from text (for tests and fuzzing); `source` names it in messages.
RunConfig parse_run_config(std::string_view toml_text, const std::string& source,
                           const std::filesystem::path& base_dir);

}  // namespace tpe::config
