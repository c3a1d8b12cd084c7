// The tpengine command line: generate, plan, policies, inspect. Settings come from a TOML file
// (--config) with flags overriding it. Every error is one line on stderr and a non-zero exit.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include "core/common/error.hpp"
#include "core/common/process.hpp"
#include "core/config/run_config.hpp"
#include "core/io/gguf.hpp"
#include "core/io/safetensors.hpp"
#include "core/program/report.hpp"
#include "core/runtime/bench.hpp"
#include "core/runtime/engine.hpp"
#include "core/tokenizer/chat_template.hpp"
#include "core/tokenizer/tokenizer.hpp"

namespace {

namespace fs = std::filesystem;
using tpe::config::RunConfig;

// Flags shared by the subcommands that run a model; unset ones leave the TOML's values alone.
struct CommonFlags {
  std::string config_file;
  std::string model;
  std::optional<int> tp;
  std::string dtype;
  std::string device;
  std::optional<std::string> kernel_inject;
  std::optional<std::vector<std::string>> fused_passes;
  std::optional<int64_t> prefill_chunk, max_batch;
  bool no_cuda_graph = false;
  std::string all_reduce;
  bool allow_long_context = false;
  std::string policy;
  std::vector<std::string> policy_paths;
  bool quiet = false;

  void add_to(CLI::App& app, bool with_runtime) {
    app.add_option("-c,--config", config_file, "TOML run configuration")->check(CLI::ExistingFile);
    app.add_option("-m,--model", model,
                   "model directory (config.json, *.safetensors) or .gguf file");
    app.add_option("--tp", tp, "tensor-parallel size (ranks)")->check(CLI::Range(1, 1024));
    app.add_option("--policy", policy, "use this policy plugin, by name");
    app.add_option("--policy-path", policy_paths, "extra directory of policy plugins (repeatable)");
    if (with_runtime) {
      app.add_option("--dtype", dtype, "auto | float32 | float16 | bfloat16");
      app.add_option("--device", device, "cpu | cuda");
      app.add_option("--kernel-inject", kernel_inject,
                     "fused kernels (true), plain (false), or auto: fused on cuda (default)")
          ->check(CLI::IsMember({"true", "false", "auto"}));
      app.add_option("--fused-passes", fused_passes,
                     "the fused path's passes to run, comma-separated (default: all)")
          ->delimiter(',');
      app.add_flag("--no-cuda-graph", no_cuda_graph,
                   "run every decode step op by op instead of replaying a CUDA graph");
      app.add_option("--all-reduce", all_reduce,
                     "cuda, TP > 1: auto (one-shot over peer memory for small messages) or nccl "
                     "(default)")
          ->check(CLI::IsMember({"auto", "nccl"}));
      app.add_flag("-q,--quiet", quiet, "no progress or log lines");
      app.add_flag("--allow-long-context", allow_long_context,
                   "run sequences past the model's max_position_embeddings");
      app.add_option("--prefill-chunk", prefill_chunk,
                     "most prompt tokens per forward pass (default 2048)")
          ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
      app.add_option("--max-batch", max_batch, "most sequences per generation (default 32)")
          ->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
    }
  }

  RunConfig resolve() const {
    RunConfig run;
    if (!config_file.empty()) run = tpe::config::load_run_config(config_file);
    if (!model.empty()) run.model_path = model;
    if (tp) run.tp_size = *tp;
    if (!dtype.empty()) run.dtype = dtype;
    if (!device.empty()) run.device = device;
    if (kernel_inject) {
      run.kernel_inject =
          *kernel_inject == "auto" ? std::nullopt : std::optional<bool>(*kernel_inject == "true");
    }
    if (fused_passes) run.fused_passes = *fused_passes;
    if (prefill_chunk) run.prefill_chunk = *prefill_chunk;
    if (max_batch) run.max_batch = *max_batch;
    if (no_cuda_graph) run.cuda_graph = false;
    if (!all_reduce.empty()) run.all_reduce = all_reduce;
    if (allow_long_context) run.allow_long_context = true;
    if (!policy.empty()) run.policy_name = policy;
    for (const std::string& p : policy_paths) run.policy_search_paths.emplace_back(p);
    return run;
  }
};

// A float in (low, high] (or (low, high) when !high_inclusive), with a message naming the option.
CLI::Validator number_in(const std::string& name, double low, double high, bool high_inclusive) {
  return CLI::Validator(
      [=](std::string& text) {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        const bool parsed = end != text.c_str() && *end == '\0';
        const bool ok = parsed && v > low && (high_inclusive ? v <= high : v < high);
        if (ok) return std::string();
        return fmt::format("{} must be a number in ({}, {}{}, got '{}'", name, low,
                           std::isinf(high) ? "inf" : fmt::format("{}", high),
                           high_inclusive ? "]" : ")", text);
      },
      "NUMBER");
}

// "1,2,3" (spaces around the commas allowed); an empty item ("1,,2", "1,2,") is an error.
// An integer >= 0, with a message naming the option (CLI11's own prints the range as doubles).
CLI::Validator non_negative(const std::string& name) {
  return CLI::Validator(
      [=](std::string& text) {
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(text.c_str(), &end, 10);
        if (end == text.c_str() || *end != '\0' || errno == ERANGE || v < 0) {
          return fmt::format("{} must be a non-negative integer, got '{}'", name, text);
        }
        return std::string();
      },
      "INT >= 0");
}

std::vector<int64_t> parse_ids(const std::string& text, const std::string& flag) {
  std::vector<int64_t> ids;
  size_t pos = 0;
  while (pos <= text.size()) {
    const size_t end = std::min(text.find(',', pos), text.size());
    std::string item = text.substr(pos, end - pos);
    pos = end + 1;
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    if (item.empty()) {
      if (ids.empty() && end == text.size()) break;  // no ids at all: said below
      tpe::fail("{} \"{}\": an empty id between commas", flag, text);
    }
    size_t used = 0;
    long long value = -1;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || value < 0) {
      tpe::fail("{} \"{}\": '{}' is not a token id (a non-negative integer)", flag, text, item);
    }
    ids.push_back(value);
  }
  if (ids.empty()) tpe::fail("{} \"{}\": no token ids", flag, text);
  return ids;
}

// generate --json: one object a line per sequence, as an API would return it.
void print_json(const std::vector<std::vector<int64_t>>& prompts,
                const std::vector<std::vector<int64_t>>& outputs,
                const tpe::runtime::GenerationParams& params,
                const std::optional<tpe::tokenizer::Tokenizer>& tokenizer, double seconds,
                const std::vector<std::vector<tpe::TokenLogprob>>* logprobs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const std::vector<int64_t>& ids = outputs[i];
    const bool stopped =
        !ids.empty() && std::find(params.stop_token_ids.begin(), params.stop_token_ids.end(),
                                  ids.back()) != params.stop_token_ids.end();
    nlohmann::json out = {{"index", i},
                          {"ids", ids},
                          {"finish_reason", stopped ? "stop" : "length"},
                          {"prompt_tokens", prompts[i].size()},
                          {"completion_tokens", ids.size()},
                          {"batch_seconds", seconds}};
    if (tokenizer) {
      out["text"] = tokenizer->decode(std::vector<uint32_t>(ids.begin(), ids.end()),
                                      /*skip_special_tokens=*/true);
    }
    if (logprobs != nullptr) {
      const auto piece = [&](int64_t id, nlohmann::json& entry) {
        if (tokenizer)
          entry["token"] = tokenizer->decode(std::vector<uint32_t>{static_cast<uint32_t>(id)});
      };
      nlohmann::json steps = nlohmann::json::array();
      for (const tpe::TokenLogprob& t : (*logprobs)[i]) {
        nlohmann::json step = {{"id", t.id}, {"logprob", t.logprob}};
        piece(t.id, step);
        nlohmann::json top = nlohmann::json::array();
        for (const auto& [id, logprob] : t.top) {
          nlohmann::json alt = {{"id", id}, {"logprob", logprob}};
          piece(id, alt);
          top.push_back(std::move(alt));
        }
        step["top"] = std::move(top);
        steps.push_back(std::move(step));
      }
      out["logprobs"] = std::move(steps);
    }
    // Decoded text may end inside a character; such bytes are replaced, never printed raw.
    fmt::print("{}\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  }
}

// SIGINT / SIGTERM during a generation: the engine stops before its next token, what each
// sequence has so far is printed, and the exit status is the conventional 128 + signal. The
// handler is armed once (SA_RESETHAND): a second signal ends the process at once.
std::atomic<int> g_interrupt{0};

extern "C" void on_interrupt(int signal) { g_interrupt.store(signal); }

void arm_interrupt() {
  g_interrupt.store(0);
  struct sigaction action = {};
  action.sa_handler = on_interrupt;
  action.sa_flags = SA_RESETHAND;  // no SA_RESTART: a read of stdin returns
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

// 0, or the exit status of an interrupted run (after saying so on stderr).
int interrupted_status() {
  const int signal = g_interrupt.load();
  if (signal == 0) return 0;
  std::fprintf(stderr, "tpengine: interrupted (%s): printed what was generated\n",
               signal == SIGINT ? "SIGINT" : "SIGTERM");
  return 128 + signal;
}

int run_generate(const CommonFlags& common, const std::vector<std::string>& prompt_ids,
                 const std::vector<std::string>& prompt_texts,
                 const tpe::config::GenerationSettings& overrides, bool json,
                 std::optional<int64_t> top_logprobs, const std::string& chat,
                 const std::string& system) {
  if (top_logprobs && !json) {
    tpe::fail("--logprobs prints with --json: add --json");
  }
  RunConfig run = common.resolve();
  auto& g = run.generation;
  if (overrides.max_new_tokens) g.max_new_tokens = overrides.max_new_tokens;
  if (overrides.do_sample) g.do_sample = overrides.do_sample;
  if (overrides.temperature) g.temperature = overrides.temperature;
  if (overrides.top_k) g.top_k = overrides.top_k;
  if (overrides.top_p) g.top_p = overrides.top_p;
  if (overrides.repetition_penalty) g.repetition_penalty = overrides.repetition_penalty;
  if (overrides.seed) g.seed = overrides.seed;
  if (overrides.stop_token_ids) g.stop_token_ids = overrides.stop_token_ids;
  if (overrides.ignore_eos) g.ignore_eos = overrides.ignore_eos;
  const int inputs =
      (prompt_ids.empty() ? 0 : 1) + (prompt_texts.empty() ? 0 : 1) + (chat.empty() ? 0 : 1);
  if (inputs != 1) {
    tpe::fail(
        "pass one of --prompt \"text\" or --prompt-ids \"1,2,3\" (each once per sequence), or "
        "--chat \"message\"");
  }
  if (!system.empty() && chat.empty()) tpe::fail("--system goes with --chat");
  std::vector<std::vector<int64_t>> prompts;
  for (const std::string& p : prompt_ids) prompts.push_back(parse_ids(p, "--prompt-ids"));

  tpe::runtime::Model model = tpe::runtime::prepare(run);
  std::optional<tpe::tokenizer::Tokenizer> tokenizer;
  if (!chat.empty()) {
    // The model's chat template renders the conversation, as transformers' apply_chat_template
    // with add_generation_prompt; its text is encoded without adding special tokens again.
    const tpe::runtime::ChatTemplate chat_template =
        tpe::runtime::load_chat_template(run.model_path);
    std::vector<tpe::tokenizer::ChatMessage> messages;
    if (!system.empty()) messages.push_back({"system", system});
    messages.push_back({"user", chat});
    const std::string text = tpe::tokenizer::render_chat_template(
        chat_template.text, chat_template.source, messages,
        /*add_generation_prompt=*/true, chat_template.variables);
    tokenizer = tpe::runtime::load_tokenizer(run.model_path);
    const std::vector<uint32_t> ids = tokenizer->encode(text, /*add_special_tokens=*/false);
    prompts.emplace_back(ids.begin(), ids.end());
  }
  if (!prompt_texts.empty()) {
    tokenizer = tpe::runtime::load_tokenizer(run.model_path);
    int64_t vocab = 0;
    model.config.get_int("vocab_size", vocab);
    tokenizer->check_embedding_size(vocab);
    for (const std::string& text : prompt_texts) {
      const std::vector<uint32_t> ids = tokenizer->encode(text);
      prompts.emplace_back(ids.begin(), ids.end());
    }
  }
  tpe::runtime::GenerationParams params =
      tpe::runtime::resolve_generation(run.generation, model.config.generation());
  params.top_logprobs = top_logprobs.value_or(0);
  tpe::runtime::Engine engine(std::move(model), common.quiet);
  arm_interrupt();
  params.interrupt = &g_interrupt;
  // Launched as one process per rank, every process generates and rank 0 prints.
  if (json) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::vector<tpe::TokenLogprob>> logprobs;
    const auto outputs =
        engine.generate(prompts, params, {}, nullptr, top_logprobs ? &logprobs : nullptr);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (engine.is_rank0()) {
      print_json(prompts, outputs, params, tokenizer, seconds, top_logprobs ? &logprobs : nullptr);
    }
    return interrupted_status();
  }
  if (!tokenizer) {
    const auto outputs = engine.generate(prompts, params);
    if (!engine.is_rank0()) return interrupted_status();
    for (const auto& out : outputs) fmt::print("{}\n", fmt::join(out, " "));
    return interrupted_status();
  }
  if (prompts.size() == 1) {  // one sequence: stream the text as it is generated
    auto decoder = tokenizer->incremental_decoder(/*skip_special_tokens=*/true);
    engine.generate(prompts, params, [&](size_t, int64_t id) {
      fmt::print("{}", decoder.step(static_cast<uint32_t>(id)));
      std::fflush(stdout);
    });
    if (engine.is_rank0()) fmt::print("{}\n", decoder.finish());
    return interrupted_status();
  }
  const auto outputs = engine.generate(prompts, params);
  if (!engine.is_rank0()) return interrupted_status();
  for (size_t i = 0; i < outputs.size(); ++i) {
    const std::vector<uint32_t> ids(outputs[i].begin(), outputs[i].end());
    fmt::print("[{}] {}\n", i, tokenizer->decode(ids, /*skip_special_tokens=*/true));
  }
  return interrupted_status();
}

// chat: a conversation read from stdin, a line a user turn, each answer streamed to stdout; end
// of input (Ctrl-D) ends it. Every turn renders the whole conversation with the model's chat
// template and prefills it again (no KV cache kept between turns).
int run_chat(const CommonFlags& common, const std::string& system,
             std::optional<int64_t> max_new_tokens) {
  RunConfig run = common.resolve();
  if (max_new_tokens) run.generation.max_new_tokens = max_new_tokens;
  const tpe::runtime::ChatTemplate chat_template = tpe::runtime::load_chat_template(run.model_path);
  const tpe::tokenizer::Tokenizer tokenizer = tpe::runtime::load_tokenizer(run.model_path);
  tpe::runtime::Model model = tpe::runtime::prepare(run);
  if (model.launch) tpe::fail("chat reads stdin in one process: run it without a launcher");
  int64_t vocab = 0;
  model.config.get_int("vocab_size", vocab);
  tokenizer.check_embedding_size(vocab);
  tpe::runtime::GenerationParams params =
      tpe::runtime::resolve_generation(run.generation, model.config.generation());
  params.interrupt = &g_interrupt;
  tpe::runtime::Engine engine(std::move(model), common.quiet);
  std::vector<tpe::tokenizer::ChatMessage> messages;
  if (!system.empty()) messages.push_back({"system", system});
  const bool interactive = isatty(STDIN_FILENO) != 0;
  std::string line;
  for (;;) {
    if (interactive) {
      std::fprintf(stderr, "> ");
      std::fflush(stderr);
    }
    // Ctrl-C while an answer is generated ends that answer; while waiting for a line, the chat.
    arm_interrupt();
    if (!std::getline(std::cin, line)) return interrupted_status();
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    messages.push_back({"user", line});
    const std::string text = tpe::tokenizer::render_chat_template(
        chat_template.text, chat_template.source, messages, /*add_generation_prompt=*/true,
        chat_template.variables);
    const std::vector<uint32_t> ids = tokenizer.encode(text, /*add_special_tokens=*/false);
    auto decoder = tokenizer.incremental_decoder(/*skip_special_tokens=*/true);
    const std::vector<int64_t> answer = engine.generate(
        {std::vector<int64_t>(ids.begin(), ids.end())}, params, [&](size_t, int64_t id) {
          fmt::print("{}", decoder.step(static_cast<uint32_t>(id)));
          std::fflush(stdout);
        })[0];
    fmt::print("{}{}\n", decoder.finish(), g_interrupt.load() != 0 ? " [interrupted]" : "");
    std::fflush(stdout);
    messages.push_back(
        {"assistant", tokenizer.decode(std::vector<uint32_t>(answer.begin(), answer.end()),
                                       /*skip_special_tokens=*/true)});
  }
  return 0;
}

// tokenize: text -> ids, as the model's tokenizer.json encodes it.
int run_tokenize(const std::string& model, const std::string& text, bool no_special) {
  const auto tokenizer = tpe::runtime::load_tokenizer(model);
  fmt::print("{}\n", fmt::join(tokenizer.encode(text, !no_special), " "));
  return 0;
}

// detokenize: ids -> text.
int run_detokenize(const std::string& model, const std::vector<std::string>& ids_text,
                   bool skip_special) {
  const auto tokenizer = tpe::runtime::load_tokenizer(model);
  std::vector<uint32_t> ids;
  for (const std::string& item : ids_text) {
    for (const int64_t id : parse_ids(item, "ids")) {
      if (id >= static_cast<int64_t>(tokenizer.vocab_size())) {
        tpe::fail("id {} is outside the vocabulary of {} tokens of {}", id, tokenizer.vocab_size(),
                  model);
      }
      ids.push_back(static_cast<uint32_t>(id));
    }
  }
  fmt::print("{}\n", tokenizer.decode(ids, skip_special));
  return 0;
}

// bench's sampling flags: greedy unless --do-sample true; the other flags alone are an error
// (a benchmark that silently measured greedy decoding would mislead).
tpe::SamplingParams bench_sampling_params(const tpe::config::GenerationSettings& flags) {
  tpe::SamplingParams p;
  p.do_sample = flags.do_sample.value_or(false);
  if (!p.do_sample && (flags.temperature || flags.top_k || flags.top_p)) {
    tpe::fail("bench: --temperature, --top-k and --top-p apply with --do-sample true");
  }
  p.temperature = flags.temperature.value_or(p.temperature);
  p.top_k = flags.top_k.value_or(p.top_k);
  p.top_p = flags.top_p.value_or(p.top_p);
  return p;
}

int run_bench(const CommonFlags& common, tpe::runtime::BenchOptions options,
              const std::vector<int64_t>& batches, bool random_weights, bool json) {
  RunConfig run = common.resolve();
  // Room for the largest batch measured; any length may be timed (the speed of a step past
  // max_position_embeddings is the speed of one before it).
  for (const int64_t b : batches) run.max_batch = std::max(run.max_batch, b);
  run.allow_long_context = true;
  tpe::runtime::Model model = tpe::runtime::prepare(run);
  const std::string policy = model.choice.policy->name;
  const std::string dtype = model.dtype;
  tpe::runtime::Engine engine(std::move(model), common.quiet || json,
                              random_weights ? std::optional<uint64_t>(0) : std::nullopt);
  // Host memory is bounded by the loader's buffers, not by the model: the evidence.
  const int64_t load_peak_rss = tpe::proc_status_kib("VmHWM") * 1024;
  std::vector<tpe::runtime::BenchResult> results;
  for (const int64_t batch : batches) {
    options.batch = batch;
    if (!json && !common.quiet && engine.is_rank0()) {
      spdlog::info("bench: batch {}, {} warm-up and {} timed run(s)", batch, options.warmup,
                   options.repeat);
    }
    results.push_back(tpe::runtime::run_bench(engine, options));
  }
  const double copy_gbs = engine.copy_bandwidth_gbs();
  if (!engine.is_rank0()) return 0;
  const auto mib = [](int64_t b) { return static_cast<double>(b) / (1 << 20); };
  const std::vector<int64_t> weight_bytes = engine.weight_bytes();
  int64_t loaded = 0;  // this process's ranks
  for (const int64_t b : weight_bytes) loaded += b;
  const double load_gbs = static_cast<double>(loaded) / std::max(engine.load_seconds(), 1e-9) / 1e9;
  if (json) {
    nlohmann::json runs = nlohmann::json::array();
    for (const tpe::runtime::BenchResult& r : results) {
      nlohmann::json memory = nlohmann::json::array();
      for (const auto& m : r.memory) {
        memory.push_back({{"weights", m.weights},
                          {"kv_cache", m.kv_cache},
                          {"workspace", m.workspace},
                          {"planned_arena", m.planned_arena},
                          {"device_in_use", m.device_in_use}});
      }
      const auto profile_json = [](const tpe::runtime::PassProfile& p) {
        nlohmann::json ops = nlohmann::json::array();
        for (const auto& op : p.ops)
          ops.push_back({{"op", op.label}, {"calls", op.calls}, {"ms", op.ms}});
        return ops;
      };
      runs.push_back(
          {{"batch", r.batch},
           {"ttft_ms", r.ttft_ms},
           {"tpot_ms", {{"mean", r.tpot_mean_ms}, {"p50", r.tpot_p50_ms}, {"p90", r.tpot_p90_ms}}},
           {"decode_tokens_per_s", r.decode_tokens_per_s},
           {"prefill_tokens_per_s", r.prefill_tokens_per_s},
           {"achieved_bandwidth_gbs", r.achieved_bandwidth_gbs},
           {"achieved_bandwidth_fraction", r.achieved_bandwidth_gbs / copy_gbs},
           {"memory_bytes_per_rank", memory},
           {"prompt_profile", profile_json(r.prompt_profile)},
           {"prompt_profile_total_ms", r.prompt_profile.total_ms},
           {"prompt_profile_tokens", r.prompt_profile.tokens},
           {"decode_profile", profile_json(r.decode_profile)},
           {"decode_profile_total_ms", r.decode_profile.total_ms},
           {"decode_profile_tokens", r.decode_profile.tokens},
           {"decode_steps_replayed", r.replays}});
    }
    const nlohmann::json out = {{"model", run.model_path.string()},
                                {"policy", policy},
                                {"device", run.device},
                                {"dtype", dtype},
                                {"tp", engine.world()},
                                {"random_weights", random_weights},
                                {"cuda_graph", run.cuda_graph && run.device == "cuda"},
                                {"all_reduce", engine.collectives()},
                                {"prefill_chunk", run.prefill_chunk},
                                {"prompt_len", options.prompt_len},
                                {"new_tokens", options.new_tokens},
                                {"warmup", options.warmup},
                                {"repeat", options.repeat},
                                {"sampling",
                                 {{"do_sample", options.sampling.do_sample},
                                  {"temperature", options.sampling.temperature},
                                  {"top_k", options.sampling.top_k},
                                  {"top_p", options.sampling.top_p}}},
                                {"load_s", engine.load_seconds()},
                                {"load_gbs", load_gbs},
                                {"host_peak_rss_bytes_after_load", load_peak_rss},
                                {"weight_bytes_per_rank", weight_bytes},
                                {"memory_bandwidth_gbs", copy_gbs},
                                {"runs", runs}};
    fmt::print("{}\n", out.dump(2));
    return 0;
  }
  fmt::print(
      "{} ({}), TP {}, {} {}{}{}: prompt {} (passes of up to {} tokens), {} new tokens {}, {} "
      "repeat(s)\n",
      run.model_path.string(), policy, engine.world(), run.device, dtype,
      random_weights ? ", random weights" : "",
      run.device == "cuda" ? (run.cuda_graph ? ", CUDA graph" : ", no CUDA graph") : "",
      options.prompt_len, run.prefill_chunk, options.new_tokens,
      options.sampling.do_sample ? fmt::format("sampled (temperature {}, top-k {}, top-p {})",
                                               options.sampling.temperature, options.sampling.top_k,
                                               options.sampling.top_p)
                                 : std::string("greedy"),
      options.repeat);
  fmt::print("  load          {:.2f} s, {:.2f} GB/s of weights; host peak RSS {:.1f} MiB\n",
             engine.load_seconds(), load_gbs, mib(load_peak_rss));
  fmt::print("  bandwidth     {:.1f} GB/s device copy, measured now\n", copy_gbs);
  if (!engine.collectives().empty()) fmt::print("  all-reduce    {}\n", engine.collectives());
  for (const tpe::runtime::BenchResult& r : results) {
    fmt::print("batch {}\n", r.batch);
    fmt::print("  TTFT          {:.2f} ms\n", r.ttft_ms);
    fmt::print("  TPOT          mean {:.3f} ms, p50 {:.3f}, p90 {:.3f}\n", r.tpot_mean_ms,
               r.tpot_p50_ms, r.tpot_p90_ms);
    fmt::print("  decode        {:.1f} tokens/s\n", r.decode_tokens_per_s);
    fmt::print("  prefill       {:.1f} tokens/s\n", r.prefill_tokens_per_s);
    fmt::print("  achieved      {:.1f} GB/s = {:.0f}% of the copy bandwidth\n",
               r.achieved_bandwidth_gbs, 100 * r.achieved_bandwidth_gbs / copy_gbs);
    for (size_t i = 0; i < r.memory.size(); ++i) {
      const auto& m = r.memory[i];
      fmt::print(
          "  rank {:<2}       weights {:.1f} MiB, KV cache {:.1f} MiB, workspace {:.1f} MiB "
          "(arena planned {:.1f})",
          i, mib(m.weights), mib(m.kv_cache), mib(m.workspace), mib(m.planned_arena));
      if (m.device_in_use > 0) fmt::print(", device in use {:.1f} MiB", mib(m.device_in_use));
      fmt::print("\n");
    }
    const auto print_profile = [](const tpe::runtime::PassProfile& p) {
      for (const auto& op : p.ops) {
        fmt::print("    {:<36} {:>4} x  {:8.3f} ms  {:5.1f}%\n", op.label, op.calls, op.ms,
                   100 * op.ms / p.total_ms);
      }
    };
    if (!r.prompt_profile.ops.empty()) {
      fmt::print(
          "  prompt's first pass ({} tokens) op by op (rank 0, ops queued ahead): {:.3f} ms in "
          "all, TTFT {:.2f}\n",
          r.prompt_profile.tokens, r.prompt_profile.total_ms, r.ttft_ms);
      print_profile(r.prompt_profile);
    }
    if (!r.decode_profile.ops.empty()) {
      fmt::print(
          "  decode step {} op by op (rank 0, ops queued ahead): {:.3f} ms in all, TPOT {:.3f}\n",
          options.new_tokens / 2, r.decode_profile.total_ms, r.tpot_mean_ms);
      print_profile(r.decode_profile);
    }
  }
  return 0;
}

int run_plan(const CommonFlags& common, int64_t batch, int64_t seq_len) {
  const RunConfig run = common.resolve();
  const tpe::runtime::Model model = tpe::runtime::prepare(run);
  const fs::path& source = model.config.path();  // config.json, or a GGUF file
  fmt::print("model:  {}\n",
             (source.extension() == ".gguf" ? source : source.parent_path()).string());
  fmt::print("policy: {} {} ({}): {}\n", model.choice.policy->name, model.choice.policy->version,
             model.choice.policy->file.string(), model.choice.reason);
  if (model.injection_policy) {
    std::vector<std::string> rules;
    for (const auto& [cls, names] : *model.injection_policy) {
      rules.push_back(fmt::format("{} = [{}]", cls, fmt::join(names, ", ")));
    }
    fmt::print("split:  injection policy {{{}}}\n", fmt::join(rules, "; "));
  } else {
    fmt::print("split:  automatic (sharding propagation over the graph)\n");
  }
  tpe::program::ReportOptions options;
  options.batch = batch;
  options.seq_len = seq_len;
  options.limits = model.limits;
  options.passes = model.passes;
  fmt::print("{}", tpe::program::format_plan(model.graph, model.plan, options));
  return 0;
}

int run_policies(const CommonFlags& common) {
  const RunConfig run = common.resolve();
  const auto dirs = tpe::plugin::Registry::default_search_path(run.policy_search_paths);
  const tpe::plugin::Registry registry =
      tpe::plugin::Registry::discover(dirs, run.isolate_policies, /*keep_broken=*/true);
  fmt::print("search path (earlier wins):\n");
  for (const auto& d : dirs) {
    fmt::print("  {} ({})\n", d.path.string(), tpe::plugin::origin_name(d.origin));
  }
  fmt::print("policies:\n");
  for (const auto& p : registry.policies()) {
    fmt::print("  {} {}  ABI {}.{}  model_types [{}]  architectures [{}]\n", p.name, p.version,
               p.abi_major, p.abi_minor, fmt::join(p.model_types, ", "),
               fmt::join(p.architectures, ", "));
    if (!p.description.empty()) fmt::print("    {}\n", p.description);
    fmt::print("    {} ({})\n", p.file.string(), tpe::plugin::origin_name(p.origin));
  }
  if (!registry.broken().empty()) {
    fmt::print("broken (not used):\n");
    for (const auto& b : registry.broken()) {
      fmt::print("  {} ({})\n    {}\n", tpe::printable(b.file.string()),
                 tpe::plugin::origin_name(b.origin), b.reason);
    }
  }
  // Where several plugins claim one model_type, say which wins: the first in search order.
  std::map<std::string, std::vector<const tpe::plugin::Policy*>> claims;
  for (const auto& p : registry.policies()) {
    for (const auto& type : p.model_types) claims[type].push_back(&p);
  }
  for (const auto& [type, claimants] : claims) {
    if (claimants.size() < 2) continue;
    std::vector<std::string> losers;
    for (size_t i = 1; i < claimants.size(); ++i) {
      losers.push_back(fmt::format("{} ({}, {})", claimants[i]->name, claimants[i]->file.string(),
                                   tpe::plugin::origin_name(claimants[i]->origin)));
    }
    fmt::print("model_type '{}': {} ({}, {}) wins over {}\n", type, claimants[0]->name,
               claimants[0]->file.string(), tpe::plugin::origin_name(claimants[0]->origin),
               fmt::join(losers, ", "));
  }
  if (!run.model_path.empty()) {
    const auto config = tpe::runtime::load_model_config(run.model_path);
    const auto choice = registry.choose(config, run.policy_name);
    fmt::print("for {} (model_type '{}'): {} from {}: {}\n",
               tpe::printable(run.model_path.string()), tpe::printable(config.model_type()),
               choice.policy->name, tpe::printable(choice.policy->file.string()), choice.reason);
  }
  return 0;
}

// A metadata value on one line: long strings and arrays shortened, control characters escaped.
std::string gguf_value_text(const tpe::io::GgufValue& v) {
  using Kind = tpe::io::GgufValue::Kind;
  const auto quoted = [](const std::string& text) {
    constexpr size_t kMax = 80;
    const std::string shown = tpe::printable(text.substr(0, kMax));
    return text.size() > kMax ? fmt::format("'{}'... ({} bytes)", shown, text.size())
                              : fmt::format("'{}'", shown);
  };
  switch (v.kind) {
    case Kind::kInt:
      return std::to_string(v.i);
    case Kind::kFloat:
      return fmt::format("{}", v.f);
    case Kind::kBool:
      return v.b ? "true" : "false";
    case Kind::kString:
      return quoted(v.s);
    case Kind::kArray:
      break;
  }
  const size_t n = v.strings.size() + v.ints.size() + v.floats.size();
  std::vector<std::string> head;
  for (size_t i = 0; i < std::min<size_t>(n, 4); ++i) {
    head.push_back(!v.strings.empty() ? quoted(v.strings[i])
                   : !v.ints.empty()  ? std::to_string(v.ints[i])
                                      : fmt::format("{}", v.floats[i]));
  }
  return fmt::format("[{}{}] ({} {})", fmt::join(head, ", "), n > head.size() ? ", ..." : "", n,
                     tpe::io::gguf_value_type_name(v.element_type));
}

// inspect --check: reads every tensor whole as fp32 (GGUF blocks dequantized), one at a time,
// and names those holding NaN or Inf.
class FiniteCheck {
 public:
  void add(const std::string& name, const std::vector<float>& values) {
    const auto bad = static_cast<size_t>(
        std::count_if(values.begin(), values.end(), [](float x) { return !std::isfinite(x); }));
    ++checked_;
    if (bad > 0) {
      fmt::print("{}: {} of {} values are NaN or Inf\n", tpe::printable(name), bad, values.size());
      bad_.push_back(fmt::format("{} ({})", tpe::printable(name), bad));
    }
  }
  int finish(const std::string& source) const {
    if (bad_.empty()) {
      fmt::print("checked {} tensors: every value finite\n", checked_);
      return 0;
    }
    const size_t shown = std::min<size_t>(bad_.size(), 3);
    tpe::fail("{}: {} of {} tensors hold NaN or Inf: {}{}", tpe::printable(source), bad_.size(),
              checked_, fmt::join(bad_.begin(), bad_.begin() + shown, ", "),
              bad_.size() > shown ? ", ..." : "");
  }

 private:
  size_t checked_ = 0;
  std::vector<std::string> bad_;
};

int run_inspect_gguf(const fs::path& path, bool check) {
  const auto file = tpe::io::GgufFile::open(path);
  fmt::print("GGUF version {}, {} metadata keys, {} tensors\n", file->version(),
             file->metadata().size(), file->tensors().size());
  for (const auto& [key, value] : file->metadata()) {
    fmt::print("{:<44} {:<8} {}\n", tpe::printable(key), tpe::io::gguf_value_type_name(value.type),
               gguf_value_text(value));
  }
  uint64_t total = 0;
  for (const tpe::io::GgufTensor& t : file->tensors()) {
    total += t.bytes;
    fmt::print("{:<56} {:<5} {:<16} {:>12}\n", tpe::printable(t.name),
               tpe::io::ggml_type_name(static_cast<uint32_t>(t.type)),
               fmt::format("[{}]", fmt::join(t.shape(), ", ")), t.bytes);
  }
  fmt::print("{} tensors, {} bytes\n", file->tensors().size(), total);
  if (!check) return 0;
  FiniteCheck finite;
  for (const tpe::io::GgufTensor& t : file->tensors()) {
    const std::vector<int64_t> shape = t.shape();
    int64_t n = 1;
    for (const int64_t d : shape) n *= d;
    std::vector<float> values(static_cast<size_t>(n));
    file->read_f32(t, shape, {}, {}, values);
    finite.add(t.name, values);
  }
  return finite.finish(path.string());
}

int run_inspect(const std::string& path, bool check) {
  if (fs::path(path).extension() == ".gguf") return run_inspect_gguf(path, check);
  const fs::path dir = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
  std::vector<const tpe::io::TensorInfo*> tensors;
  std::unique_ptr<tpe::io::SafetensorsFile> single;
  std::optional<tpe::io::Checkpoint> checkpoint;
  if (fs::is_directory(path)) {
    checkpoint = tpe::io::Checkpoint::open(dir);
    tensors = checkpoint->tensors();
  } else {
    single = tpe::io::SafetensorsFile::open(path);
    for (const auto& t : single->tensors()) tensors.push_back(&t);
  }
  uint64_t total = 0;
  for (const auto* t : tensors) {
    const uint64_t bytes = t->end - t->begin;
    total += bytes;
    fmt::print("{:<56} {:<5} {:<16} {:>12}  {}\n", t->name, tpe::io::dtype_name(t->dtype),
               fmt::format("[{}]", fmt::join(t->shape, ", ")), bytes, t->file.filename().string());
  }
  fmt::print("{} tensors, {} bytes\n", tensors.size(), total);
  if (!check) return 0;
  FiniteCheck finite;
  for (const auto* t : tensors) {
    finite.add(t->name, checkpoint ? checkpoint->read_f32(t->name, t->shape, {}, {})
                                   : single->read_f32(*t, t->shape, {}, {}));
  }
  return finite.finish(path);
}

}  // namespace

int main(int argc, char** argv) {
  spdlog::set_default_logger(spdlog::stderr_color_st("tpengine"));
  spdlog::set_pattern("[%l] %v");

  CLI::App app{"tpengine: tensor-parallel inference for Hugging Face checkpoints"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tpengine 0.1.0 (policy ABI " + std::to_string(TPE_ABI_MAJOR) +
                                        "." + std::to_string(TPE_ABI_MINOR) + ")");

  CommonFlags gen_flags, plan_flags, policies_flags;
  CLI::App* gen = app.add_subcommand("generate", "generate tokens from prompts");
  gen_flags.add_to(*gen, true);
  std::vector<std::string> prompt_ids;
  tpe::config::GenerationSettings overrides;
  std::vector<int64_t> stop_ids;
  std::vector<std::string> prompt_texts;
  gen->add_option("-p,--prompt", prompt_texts,
                  "text, encoded with the model's tokenizer; repeat for a batch");
  gen->add_option("--prompt-ids", prompt_ids, "comma-separated token ids; repeat for a batch");
  gen->add_option("-n,--max-new-tokens", overrides.max_new_tokens, "tokens to generate")
      ->check(non_negative("max_new_tokens"));
  gen->add_option("--do-sample", overrides.do_sample, "sample (true) or greedy (false)");
  gen->add_option("--temperature", overrides.temperature)
      ->check(number_in("temperature", 0, HUGE_VAL, false));
  gen->add_option("--top-k", overrides.top_k)->check(non_negative("top_k"));
  gen->add_option("--top-p", overrides.top_p)->check(number_in("top_p", 0, 1, true));
  gen->add_option("--repetition-penalty", overrides.repetition_penalty)->check(CLI::PositiveNumber);
  gen->add_option("--seed", overrides.seed)->check(non_negative("seed"));
  gen->add_option("--stop-ids", stop_ids, "stop token ids (replace the model's eos)")
      ->delimiter(',')
      ->check(non_negative("a stop token id"));
  gen->add_flag("--ignore-eos", overrides.ignore_eos, "never stop before max_new_tokens");
  std::string chat_message;
  std::string system_message;
  gen->add_option("--chat", chat_message,
                  "a user message, put in the model's chat template (its answer is generated)");
  gen->add_option("--system", system_message, "with --chat: a system message before it");
  bool gen_json = false;
  std::optional<int64_t> top_logprobs;
  gen->add_option("--logprobs", top_logprobs,
                  "with --json: each token's log-probability under the model (raw logits) and "
                  "its K most likely alternatives")
      ->check(non_negative("logprobs"));
  gen->add_flag("--json", gen_json,
                "one JSON object a line per sequence: ids, text, finish_reason, token counts, "
                "batch_seconds");

  CLI::App* plan = app.add_subcommand("plan", "show how a model splits, without loading weights");
  plan_flags.add_to(*plan, true);
  int64_t batch = 1, seq_len = 2048;
  plan->add_option("--batch", batch, "batch size for the KV-cache estimate")
      ->check(CLI::PositiveNumber);
  plan->add_option("--seq-len", seq_len, "tokens per sequence for the KV-cache estimate")
      ->check(CLI::PositiveNumber);

  CLI::App* bench = app.add_subcommand("bench", "measure latency, throughput and bandwidth");
  CommonFlags bench_flags;
  bench_flags.add_to(*bench, true);
  tpe::runtime::BenchOptions bench_options;
  bool random_weights = false, bench_json = false;
  std::vector<int64_t> bench_batches = {1};
  bench->add_option("--batch", bench_batches, "sequences per batch; several (1,8) share one load")
      ->delimiter(',')
      ->check(CLI::PositiveNumber);
  bench->add_option("--prompt-len", bench_options.prompt_len, "prompt tokens per sequence")
      ->check(CLI::PositiveNumber);
  bench->add_option("--new-tokens", bench_options.new_tokens, "generated tokens per sequence")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 30));
  bench->add_option("--warmup", bench_options.warmup, "untimed runs first")
      ->check(CLI::NonNegativeNumber);
  bench->add_option("--repeat", bench_options.repeat, "timed runs")->check(CLI::PositiveNumber);
  bench->add_flag("--random-weights", random_weights,
                  "random weights for the model's config.json; no checkpoint is read");
  bench->add_flag("--json", bench_json, "print the results as JSON");
  bench->add_flag("--profile", bench_options.profile,
                  "also time one decode step op by op (its ops queued ahead of the device)");
  tpe::config::GenerationSettings bench_sampling;
  bench->add_option("--do-sample", bench_sampling.do_sample,
                    "sample each token (true) instead of greedy decoding (false, the default)");
  bench->add_option("--temperature", bench_sampling.temperature, "with --do-sample true")
      ->check(number_in("temperature", 0, HUGE_VAL, false));
  bench->add_option("--top-k", bench_sampling.top_k, "with --do-sample true (default 50; 0: off)")
      ->check(non_negative("top_k"));
  bench->add_option("--top-p", bench_sampling.top_p, "with --do-sample true")
      ->check(number_in("top_p", 0, 1, true));

  CLI::App* policies = app.add_subcommand("policies", "list policy plugins and which one wins");
  policies_flags.add_to(*policies, false);

  CommonFlags chat_flags;
  CLI::App* chat = app.add_subcommand(
      "chat",
      "a conversation through the model's chat template: a line of stdin a turn, Ctrl-D ends");
  chat_flags.add_to(*chat, true);
  std::string chat_system;
  std::optional<int64_t> chat_max_new;
  chat->add_option("--system", chat_system, "a system message first");
  chat->add_option("-n,--max-new-tokens", chat_max_new, "most tokens per answer")
      ->check(CLI::PositiveNumber);
  CLI::App* tokenize = app.add_subcommand("tokenize", "text to token ids (tokenizer.json)");
  std::string tok_model, tok_text;
  bool no_special = false, skip_special = false;
  tokenize
      ->add_option("-m,--model", tok_model, "model directory with tokenizer.json, or .gguf file")
      ->required();
  tokenize->add_option("text", tok_text, "the text")->required();
  tokenize->add_flag("--no-special", no_special, "do not add special tokens (BOS, ...)");
  CLI::App* detokenize = app.add_subcommand("detokenize", "token ids to text (tokenizer.json)");
  std::vector<std::string> detok_ids;
  detokenize
      ->add_option("-m,--model", tok_model, "model directory with tokenizer.json, or .gguf file")
      ->required();
  detokenize->add_option("ids", detok_ids, "token ids (space- or comma-separated)")->required();
  detokenize->add_flag("--skip-special", skip_special, "leave special tokens out");

  CLI::App* inspect = app.add_subcommand("inspect", "list a checkpoint's tensors");
  std::string inspect_path;
  inspect->add_option("path", inspect_path, "model directory, .safetensors or .gguf file")
      ->required()
      ->check(CLI::ExistingPath);
  bool inspect_check = false;
  inspect->add_flag("--check", inspect_check,
                    "also read every tensor and name those holding NaN or Inf (exit 1)");

  // Usage errors are one line too; --help and --version print as usual.
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return std::string("tpengine: error: ") + e.what() + " (see --help)\n";
  });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (!stop_ids.empty()) overrides.stop_token_ids = stop_ids;

  int status = 0;
  try {
    if (*gen)
      status = run_generate(gen_flags, prompt_ids, prompt_texts, overrides, gen_json, top_logprobs,
                            chat_message, system_message);
    if (*chat) status = run_chat(chat_flags, chat_system, chat_max_new);
    if (*tokenize) status = run_tokenize(tok_model, tok_text, no_special);
    if (*detokenize) status = run_detokenize(tok_model, detok_ids, skip_special);
    if (*plan) status = run_plan(plan_flags, batch, seq_len);
    if (*bench) {
      bench_options.sampling = bench_sampling_params(bench_sampling);
      status = run_bench(bench_flags, bench_options, bench_batches, random_weights, bench_json);
    }
    if (*policies) status = run_policies(policies_flags);
    if (*inspect) status = run_inspect(inspect_path, inspect_check);
  } catch (const tpe::Error& e) {
    std::fprintf(stderr, "tpengine: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr,
                 "tpengine: error: out of memory: the model, batch or sequence length is too "
                 "large for this machine's memory (or its ulimit -v)\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tpengine: error: %s\n", e.what());
    return 1;
  }
  // Output that never reached its file (a full disk, a closed pipe) is a failed run.
  if (std::fflush(stdout) != 0 || std::ferror(stdout) != 0) {
    std::fprintf(stderr, "tpengine: error: writing the output failed: %s\n", std::strerror(errno));
    return 1;
  }
  return status;
}
