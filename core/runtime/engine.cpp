#include "core/runtime/engine.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <functional>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/backend/cpu_backend.hpp"
#include "core/comm/communicator.hpp"
#include "core/common/error.hpp"
#include "core/common/json_error.hpp"
#include "core/common/text_file.hpp"
#include "core/io/gguf_model.hpp"
#include "core/io/safetensors.hpp"
#include "core/plugin/isolate.hpp"
#include "core/program/report.hpp"
#include "core/runtime/executor.hpp"
#include "core/runtime/random_weights.hpp"
#include "core/runtime/row_pool.hpp"
#include "kernels/cpu/ops.hpp"
#if TPE_HAVE_CUDA
#include "core/cuda/cuda_backend.hpp"
#endif

namespace tpe::runtime {

#if TPE_HAVE_CUDA
constexpr bool kHaveCuda = true;
#else
constexpr bool kHaveCuda = false;
#endif

namespace {

bool is_gguf_file(const std::filesystem::path& path) {
  return path.extension() == ".gguf" && !std::filesystem::is_directory(path);
}

// The special tokens a GGUF file names by id: their chat-template variables and the keys.
constexpr std::pair<const char*, const char*> kGgufSpecials[] = {
    {"bos_token", "tokenizer.ggml.bos_token_id"},
    {"eos_token", "tokenizer.ggml.eos_token_id"},
    {"unk_token", "tokenizer.ggml.unknown_token_id"},
    {"pad_token", "tokenizer.ggml.padding_token_id"}};

// The fused path's passes the run asks for: none when kernel_inject is off (or "auto" on the
// CPU), else inference.fused_passes (default: all of them).
program::Passes fused_passes(const config::RunConfig& run) {
  if (!run.kernel_inject.value_or(run.device == "cuda")) {
    if (run.fused_passes) {
      fail(
          "inference.fused_passes chooses passes of the fused path, which kernel_inject = {} "
          "turns off",
          run.kernel_inject ? "false" : "\"auto\" (on the cpu)");
    }
    return {};
  }
  if (!run.fused_passes) return program::all_passes();
  try {
    return program::passes_named(*run.fused_passes);
  } catch (const Error& e) {
    fail("inference.fused_passes: {}", e.what());
  }
}

}  // namespace

config::ModelConfig load_model_config(const std::filesystem::path& model_path) {
  if (is_gguf_file(model_path)) {
    return config::ModelConfig::from_json(io::gguf_config_json(*io::GgufFile::open(model_path)),
                                          model_path);
  }
  return config::ModelConfig::load(model_path);
}

tokenizer::Tokenizer load_tokenizer(const std::filesystem::path& model_path) {
  if (!is_gguf_file(model_path)) return tokenizer::Tokenizer::load(model_path);
  const auto file = io::GgufFile::open(model_path);
  tokenizer::GgufVocab vocab;
  vocab.architecture = file->string("general.architecture");
  vocab.model = file->string("tokenizer.ggml.model");
  if (file->find_value("tokenizer.ggml.pre") != nullptr)
    vocab.pre = file->string("tokenizer.ggml.pre");
  vocab.tokens = file->array("tokenizer.ggml.tokens").strings;
  if (file->find_value("tokenizer.ggml.merges") != nullptr) {
    vocab.merges = file->array("tokenizer.ggml.merges").strings;
  }
  if (file->find_value("tokenizer.ggml.scores") != nullptr) {
    vocab.scores = file->array("tokenizer.ggml.scores").floats;
  }
  if (file->find_value("tokenizer.ggml.token_type") != nullptr) {
    vocab.token_types = file->array("tokenizer.ggml.token_type").ints;
  }
  for (auto [key, flag] : {std::pair{"tokenizer.ggml.add_bos_token", &vocab.add_bos},
                           std::pair{"tokenizer.ggml.add_eos_token", &vocab.add_eos}}) {
    const io::GgufValue* value = file->find_value(key);
    if (value != nullptr && value->kind == io::GgufValue::Kind::kBool) *flag = value->b;
  }
  for (const auto& [name, id_key] : kGgufSpecials) {
    if (file->find_value(id_key) != nullptr) vocab.special_ids.push_back(file->integer(id_key));
  }
  if (file->find_value("tokenizer.ggml.bos_token_id") != nullptr) {
    vocab.bos_id = file->integer("tokenizer.ggml.bos_token_id");
  }
  return tokenizer::Tokenizer::from_gguf(vocab, model_path.string());
}

ChatTemplate load_chat_template(const std::filesystem::path& model_path) {
  ChatTemplate t;
  if (is_gguf_file(model_path)) {
    const auto file = io::GgufFile::open(model_path);
    t.source = model_path.string();
    if (file->find_value("tokenizer.chat_template") == nullptr) {
      fail(
          "{}: no metadata 'tokenizer.chat_template': this model has no chat template; pass "
          "the prompt as --prompt",
          printable(t.source));
    }
    t.text = file->string("tokenizer.chat_template");
    const std::vector<std::string>& tokens = file->array("tokenizer.ggml.tokens").strings;
    for (const auto& [name, id_key] : kGgufSpecials) {
      if (file->find_value(id_key) == nullptr) continue;
      const int64_t id = file->integer(id_key);
      if (id >= 0 && static_cast<size_t>(id) < tokens.size()) {
        t.variables[name] = tokens[static_cast<size_t>(id)];
      }
    }
    return t;
  }
  const std::filesystem::path config_path = model_path / "tokenizer_config.json";
  t.source = config_path.string();
  if (!std::filesystem::exists(config_path)) {
    fail("{}: not found, so the model has no chat template", printable(t.source));
  }
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(read_text_file(config_path, kConfigFileLimit));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not JSON: {}", printable(t.source), json_error_message(e));
  }
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) {
    fail("{}: no 'chat_template': this model has no chat template; pass the prompt as --prompt",
         printable(t.source));
  }
  if (it->is_string()) {
    t.text = it->get<std::string>();
  } else if (it->is_array()) {  // named templates: the "default" one
    for (const auto& named : *it) {
      if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
          named["template"].is_string()) {
        t.text = named["template"].get<std::string>();
      }
    }
    if (t.text.empty())
      fail("{}: 'chat_template' has no template named 'default'", printable(t.source));
  } else {
    fail("{}: 'chat_template' must be a string or a list of named templates", printable(t.source));
  }
  for (const auto& [name, gguf_key] : kGgufSpecials) {
    const auto v = config.find(name);
    if (v == config.end()) continue;
    if (v->is_string()) t.variables[name] = v->get<std::string>();
    if (v->is_object() && v->contains("content") && (*v)["content"].is_string()) {
      t.variables[name] = (*v)["content"].get<std::string>();
    }
  }
  return t;
}

Model prepare(const config::RunConfig& run) {
  if (run.model_path.empty()) {
    fail("no model given: set [model] path in the config file or pass --model DIR");
  }
  if (run.device != "cpu" && run.device != "cuda") {
    fail("device '{}' is not one of cpu, cuda", run.device);
  }
  config::ModelConfig config = load_model_config(run.model_path);
  const std::string dtype =
      run.dtype == "auto" ? (run.device == "cpu" ? "float32" : config.dtype()) : run.dtype;
  if (run.device == "cpu" && dtype != "float32") {
    fail(
        "dtype '{}': the cpu backend computes in float32 (use dtype = \"auto\" or \"float32\", "
        "or device = \"cuda\"; `plan --device cuda` plans for GPUs without one)",
        dtype);
  }
  plugin::Registry registry = plugin::Registry::discover(
      plugin::Registry::default_search_path(run.policy_search_paths), run.isolate_policies);
  // The first plugin serving the model builds its graph; one that crashes or hangs doing so
  // (isolated, that is an error naming it) gives way to the next, if there is one.
  plugin::Choice choice;
  graph::Graph graph;
  std::optional<plugin::ChildFailure> first_failure;
  for (const plugin::Choice& candidate : registry.candidates(config, run.policy_name)) {
    try {
      graph = plugin::build_graph(*candidate.policy, config);
    } catch (const plugin::ChildFailure& e) {
      if (!first_failure) first_failure.emplace(e);
      continue;
    }
    choice = candidate;
    if (first_failure) {
      spdlog::warn("{}; using policy '{}' ({}) instead", first_failure->what(),
                   candidate.policy->name, printable(candidate.policy->file.string()));
    }
    break;
  }
  if (choice.policy == nullptr) throw *first_failure;
  std::optional<config::InjectionPolicy> injection = run.injection_policy;
  if (!injection && !choice.policy->injection_policy.empty()) {
    injection.emplace(choice.policy->injection_policy.begin(),
                      choice.policy->injection_policy.end());
  }
  std::optional<comm::LaunchEnv> launch = comm::launch_env_from_environment();
  int world = run.tp_size;
  if (launch) {
    if (run.device != "cuda") {
      fail("started as {} processes by {}: one process per rank needs device = \"cuda\"",
           launch->world, launch->launcher);
    }
    if (run.tp_size != 1 && run.tp_size != launch->world) {
      fail("tp_size {} does not match the {} processes {} started", run.tp_size, launch->world,
           launch->launcher);
    }
    world = launch->world;
  }
  parallel::Plan plan = parallel::make_plan(graph, world, injection ? &*injection : nullptr);
  if (run.prefill_chunk < 1 || run.max_batch < 1) {
    fail("inference.prefill_chunk ({}) and inference.max_batch ({}) must be at least 1",
         run.prefill_chunk, run.max_batch);
  }
  program::Limits limits;
  limits.tokens = std::max(run.prefill_chunk, run.max_batch);
  limits.logit_rows = run.max_batch;
  limits.element_bytes = dtype == "float32" ? 4 : 2;
  int64_t max_positions = 0;
  if (run.allow_long_context || config.rope().type == TPE_ROPE_DYNAMIC ||
      config.get_int("max_position_embeddings", max_positions) != TPE_FOUND) {
    max_positions = 0;
  }
  // A learned position table ends where its rows do, whatever allow_long_context says.
  int64_t learned_positions = 0;
  for (const graph::Op& op : graph.ops) {
    if (op.kind != graph::OpKind::kEmbedding) continue;
    const graph::Op& ids = graph.ops[graph.values[op.inputs[0]].producer];
    if (ids.input != graph::InputKind::kPositions) continue;
    const int64_t rows = op.out_features - ids.offset;
    learned_positions = learned_positions > 0 ? std::min(learned_positions, rows) : rows;
  }
  return Model{std::move(config),
               std::move(registry),
               choice,
               std::move(graph),
               std::move(plan),
               std::move(injection),
               run.device,
               std::move(launch),
               dtype,
               limits,
               run.cuda_graph,
               run.all_reduce == "auto",
               fused_passes(run),
               max_positions,
               learned_positions};
}

GenerationParams resolve_generation(const config::GenerationSettings& s,
                                    const config::GenerationDefaults& d) {
  GenerationParams p;
  SamplingParams& o = p.sampling;  // transformers' defaults until a setting says otherwise
  o.do_sample = s.do_sample.value_or(d.do_sample.value_or(o.do_sample));
  o.temperature = s.temperature.value_or(d.temperature.value_or(o.temperature));
  o.top_k = s.top_k.value_or(d.top_k.value_or(o.top_k));
  o.top_p = s.top_p.value_or(d.top_p.value_or(o.top_p));
  o.repetition_penalty =
      s.repetition_penalty.value_or(d.repetition_penalty.value_or(o.repetition_penalty));
  p.max_new_tokens = s.max_new_tokens.value_or(d.max_new_tokens.value_or(p.max_new_tokens));
  p.seed = s.seed.value_or(0);
  if (!s.ignore_eos.value_or(false)) {
    p.stop_token_ids = s.stop_token_ids.value_or(d.eos_token_ids);
  }
  return p;
}

struct Engine::Ranks {
  explicit Ranks(int local) : group(local) {}
  comm::ThreadGroup group;  // this process's ranks: the CPU backend's collectives, aborts
#if TPE_HAVE_CUDA
  std::unique_ptr<backend::NcclGroup> nccl;
#endif
  std::vector<std::unique_ptr<Executor>> executors;

  // Runs fn(i) for each of this process's ranks (executors[i]) on a thread of its own. The first
  // failure aborts the group, so the other ranks stop waiting in collectives, and is rethrown.
  void run(const std::function<void(int)>& fn) {
    std::exception_ptr first;
    std::mutex mutex;
    std::vector<std::thread> threads;
    for (int r = 0; r < group.world(); ++r) {
      threads.emplace_back([&, r] {
        try {
          fn(r);
        } catch (...) {
          std::lock_guard lock(mutex);
          if (!first) first = std::current_exception();
          group.abort();
        }
      });
    }
    for (std::thread& t : threads) t.join();
    if (first) std::rethrow_exception(first);
  }
};

namespace {

// Names the policy when the graph it built reads tensors the checkpoint lacks: the usual cause is
// a policy written for another revision of the architecture. Rank 0 reads every tensor some rank
// reads (a row-parallel bias is rank 0's alone). Then every shape against the graph's, before
// anything is allocated (a config.json with a huge width would otherwise allocate it first).
struct HeaderShape {
  std::vector<int64_t> shape;
  std::string file;
};
void check_tensors(const Model& model, const program::Program& rank0,
                   const std::function<std::optional<HeaderShape>(const std::string&)>& header,
                   const std::string& source) {
  std::vector<std::string> missing;
  for (const program::Weight& w : rank0.weights) {
    const std::optional<HeaderShape> found = header(w.tensor);
    if (!found) {
      if (std::find(missing.begin(), missing.end(), w.tensor) == missing.end()) {
        missing.push_back(w.tensor);
      }
    } else if (found->shape != w.stored_shape()) {
      fail("tensor '{}' in {} has shape [{}], expected [{}]", printable(w.tensor),
           printable(found->file), fmt::join(found->shape, ", "),
           fmt::join(w.stored_shape(), ", "));
    }
  }
  if (missing.empty()) return;
  const size_t shown = std::min<size_t>(missing.size(), 3);
  fail("policy '{}' ({}) reads tensor{} {}{}, which checkpoint {} does not have",
       model.choice.policy->name, model.choice.policy->file.string(), missing.size() > 1 ? "s" : "",
       fmt::format("'{}'", fmt::join(missing.begin(), missing.begin() + shown, "', '")),
       missing.size() > shown ? fmt::format(" and {} more", missing.size() - shown) : "", source);
}

// The KV cache is sized up front; refuse one the machine cannot hold rather than die allocating.
void check_cache_fits(const std::vector<std::unique_ptr<Executor>>& ranks, int64_t slots,
                      int64_t max_len) {
  int64_t elements = 0;
  for (const auto& rank : ranks) {
    for (const auto& layer : rank->program().cache_layers) elements += 2 * layer.width;
  }
  const double bytes = static_cast<double>(elements) * sizeof(float) * slots * max_len;
  const double memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  if (bytes > memory) {
    fail(
        "the KV cache for {} sequence(s) of up to {} tokens needs {:.1f} GiB, more than this "
        "machine's {:.1f} GiB: lower max_new_tokens or the batch",
        slots, max_len, bytes / (1 << 30), memory / (1 << 30));
  }
}

// Refuses an empty batch or prompt, a batch past max_batch, and a sequence (its prompt plus
// `new_tokens`) past the model's positions.
void check_prompts(const std::vector<std::vector<int64_t>>& prompts, const Model& model,
                   int64_t new_tokens) {
  if (prompts.empty()) fail("no prompt given");
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) fail("prompt {} is empty", i);
    const int64_t positions = static_cast<int64_t>(prompts[i].size()) + new_tokens;
    if (model.learned_positions > 0 && positions > model.learned_positions) {
      fail(
          "prompt {} of {} tokens and {} new tokens need {} positions, more than the {} of the "
          "model's learned position table ({}): shorten them",
          i, prompts[i].size(), new_tokens, positions, model.learned_positions,
          printable(model.config.path().string()));
    }
    if (model.max_positions > 0 && positions > model.max_positions) {
      fail(
          "prompt {} of {} tokens and {} new tokens need {} positions, more than the model's "
          "max_position_embeddings = {} ({}): shorten them, or --allow-long-context "
          "(inference.allow_long_context) to run past it",
          i, prompts[i].size(), new_tokens, positions, model.max_positions,
          printable(model.config.path().string()));
    }
  }
  if (static_cast<int64_t>(prompts.size()) > model.limits.logit_rows) {
    fail("{} prompts in one batch, more than inference.max_batch = {} (--max-batch)",
         prompts.size(), model.limits.logit_rows);
  }
}

// One pass of a chunked prefill and, per logit row, the prompt and position it belongs to.
struct Chunk {
  backend::Batch batch;
  std::vector<std::pair<size_t, int64_t>> rows;
};

// Packs the prompts' tokens into passes of at most max_tokens tokens and max_rows logit rows; a
// prompt may straddle passes. Each wants the logits of its last token, or of every token.
std::vector<Chunk> chunk_prompts(const std::vector<std::vector<int64_t>>& prompts,
                                 int64_t max_tokens, int64_t max_rows, bool all_rows) {
  std::vector<Chunk> chunks;
  Chunk current;
  const auto close = [&] {
    if (!current.batch.tokens.empty()) chunks.push_back(std::move(current));
    current = {};
  };
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t n = static_cast<int64_t>(prompts[i].size());
    for (int64_t p = 0; p < n;) {
      const int64_t used = static_cast<int64_t>(current.batch.tokens.size());
      const int64_t rows = static_cast<int64_t>(current.rows.size());
      int64_t room = max_tokens - used;
      if (all_rows) room = std::min(room, max_rows - rows);
      const int64_t take = std::min(room, n - p);
      if (take <= 0 || (!all_rows && p + take == n && rows == max_rows)) {
        close();
        continue;
      }
      current.batch.segments.push_back({static_cast<int>(i), p, take, n});
      for (int64_t t = p; t < p + take; ++t) {
        current.batch.tokens.push_back(prompts[i][static_cast<size_t>(t)]);
        if (all_rows || t == n - 1) {
          current.batch.logit_rows.push_back(static_cast<int64_t>(current.batch.tokens.size()) - 1);
          current.rows.emplace_back(i, t);
        }
      }
      p += take;
    }
  }
  close();
  return chunks;
}

}  // namespace

Engine::Engine(Model model, bool quiet, std::optional<uint64_t> random_weights_seed)
    : model_(std::move(model)) {
  // Planning for GPUs needs none, nor CUDA; running on them does.
  if (model_.device == "cuda" && !kHaveCuda) {
    fail("device = \"cuda\": this tpengine was built without CUDA (no nvcc at build time)");
  }
  std::optional<io::Checkpoint> checkpoint;
  std::unique_ptr<io::GgufFile> gguf;
  std::optional<io::GgufWeights> gguf_weights;
  Executor::WeightReader reader;
  std::string source;
  if (random_weights_seed) {
    source = fmt::format("random weights (seed {}) for {}", *random_weights_seed,
                         model_.config.path().string());
    reader = [seed = *random_weights_seed](const std::string& name, std::span<const int64_t> shape,
                                           const IndexSet& rows, const IndexSet& cols,
                                           std::span<float> out) {
      random_weights(seed, name, shape, rows, cols, out);
    };
  } else {
    // A directory's safetensors or a GGUF file, both read by Hugging Face tensor names.
    // A checkpoint saved from the base model rather than the LM (GPT-2's, BLOOM's and OPT's
    // originals on the hub) names its tensors without the base model's prefix: "h.0.ln_1.weight"
    // for the policy's "transformer.h.0.ln_1.weight". A name the checkpoint lacks is looked up
    // once more without its first component, as transformers' base_model_prefix does.
    const auto read_from = [&](const auto& weights, const auto& header) {
      const auto stored = [header](const std::string& name) {
        const size_t dot = name.find('.');
        if (header(name) || dot == std::string::npos || !header(name.substr(dot + 1))) return name;
        return name.substr(dot + 1);
      };
      check_tensors(
          model_, program::lower(model_.graph, model_.plan, 0),
          [&](const std::string& name) { return header(stored(name)); }, source);
      reader = [&weights, stored](const std::string& name, std::span<const int64_t> shape,
                                  const IndexSet& rows, const IndexSet& cols,
                                  std::span<float> out) {
        weights.read_f32(stored(name), shape, rows, cols, out);
      };
    };
    if (is_gguf_file(model_.config.path())) {
      gguf = io::GgufFile::open(model_.config.path());
      source = model_.config.path().string();
      const io::GgufWeights& weights = gguf_weights.emplace(*gguf);
      read_from(weights, [&](const std::string& name) -> std::optional<HeaderShape> {
        const io::GgufTensor* t = weights.find(name);
        if (t == nullptr) return std::nullopt;
        return HeaderShape{t->shape(), source};
      });
    } else {
      checkpoint = io::Checkpoint::open(model_.config.path().parent_path());
      source = checkpoint->dir().string();
      read_from(*checkpoint, [&](const std::string& name) -> std::optional<HeaderShape> {
        const io::TensorInfo* t = checkpoint->find(name);
        if (t == nullptr) return std::nullopt;
        return HeaderShape{t->shape, t->file.string()};
      });
    }
  }
  // One process drives every rank, or (launched) just its own.
  std::vector<int> local_ranks;
  if (model_.launch) {
    local_ranks = {model_.launch->rank};
  } else {
    for (int r = 0; r < world(); ++r) local_ranks.push_back(r);
  }
  ranks_ = std::make_unique<Ranks>(static_cast<int>(local_ranks.size()));
  int64_t total = 0;
  for (size_t i = 0; i < local_ranks.size(); ++i) {
    program::Program program =
        program::lower(model_.graph, model_.plan, local_ranks[i], model_.passes);
    program::plan_memory(program, model_.limits);
    total += static_cast<int64_t>(program.weights.size());
    ranks_->executors.push_back(std::make_unique<Executor>(
        model_.graph, std::move(program), make_backend(static_cast<int>(i), local_ranks[i]),
        model_.replay));
  }
  std::atomic<int64_t> done = 0;
  quiet = quiet || !is_rank0();
  const bool progress = !quiet && isatty(STDERR_FILENO);
  std::mutex print;
  const auto start = std::chrono::steady_clock::now();
  ranks_->run([&](int r) {
    ranks_->executors[r]->load(reader, [&] {
      const int64_t n = ++done;
      if (progress && (n % 16 == 0 || n == total)) {
        std::lock_guard lock(print);
        std::fprintf(stderr, "\rloading %s: %lld/%lld tensor slices", source.c_str(),
                     static_cast<long long>(n), static_cast<long long>(total));
      }
    });
  });
  if (progress) std::fprintf(stderr, "\n");
  load_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!quiet) {
    int64_t loaded = 0;
    for (const int64_t b : weight_bytes()) loaded += b;
    spdlog::info("loaded {} on {} rank(s) in {:.2f} s ({:.2f} GB/s), {:.1f} MiB per rank", source,
                 ranks_->executors.size(), load_seconds_,
                 static_cast<double>(loaded) / std::max(load_seconds_, 1e-9) / 1e9,
                 static_cast<double>(weight_bytes()[0]) / (1 << 20));
    if (!collectives().empty()) spdlog::info("all-reduce: {}", collectives());
  }
}

Engine::~Engine() = default;

bool Engine::is_rank0() const { return ranks_->executors.front()->rank() == 0; }

std::unique_ptr<backend::Backend> Engine::make_backend(int local, [[maybe_unused]] int rank) {
#if TPE_HAVE_CUDA
  if (model_.device == "cuda") {
    const int device = model_.launch ? model_.launch->local_rank : rank;
    if (local == 0) {
      backend::check_gpu_count(model_.launch ? model_.launch->local_rank + 1 : world());
      const auto memory = program::rank_memory(model_.graph, model_.plan);
      const int64_t element =
          static_cast<int64_t>(cuda::dtype_size(backend::cuda_dtype(model_.dtype)));
      if (model_.launch) {
        backend::check_fits(device, memory[rank].weight_elements * element);
        ranks_->nccl = std::make_unique<backend::NcclGroup>(*model_.launch);
      } else {
        for (int r = 0; r < world(); ++r)
          backend::check_fits(r, memory[r].weight_elements * element);
        if (world() > 1) ranks_->nccl = std::make_unique<backend::NcclGroup>(world());
      }
    }
    return std::make_unique<backend::CudaBackend>(rank, device, backend::cuda_dtype(model_.dtype),
                                                  ranks_->nccl.get(), ranks_->group,
                                                  model_.peer_all_reduce);
  }
#endif
  // Each rank thread gets its share of the cores for matrix products.
  cpu::set_gemm_threads(static_cast<int>(std::thread::hardware_concurrency()) / world());
  return std::make_unique<backend::CpuBackend>(local, ranks_->group);
}

std::vector<Tensor> Engine::prefill(Executor& executor,
                                    const std::vector<std::vector<int64_t>>& prompts, bool all_rows,
                                    StepProfile* profile) {
  const program::Limits& l = model_.limits;
  std::vector<Tensor> out;
  for (const auto& p : prompts) {
    out.emplace_back(std::vector<int64_t>{all_rows ? static_cast<int64_t>(p.size()) : 1,
                                          executor.program().vocab_size});
  }
  bool first = true;
  for (const Chunk& chunk : chunk_prompts(prompts, l.tokens, l.logit_rows, all_rows)) {
    const bool timed = first && profile != nullptr;
    if (timed) profile->tokens = static_cast<int64_t>(chunk.batch.tokens.size());
    const Tensor logits = executor.forward(chunk.batch, timed ? &profile->times : nullptr);
    first = false;
    for (size_t r = 0; r < chunk.rows.size(); ++r) {
      const auto [prompt, position] = chunk.rows[r];
      std::copy_n(logits.row(static_cast<int64_t>(r)), logits.cols(),
                  out[prompt].row(all_rows ? position : 0));
    }
  }
  return out;
}

std::vector<Tensor> Engine::prompt_logits(const std::vector<std::vector<int64_t>>& prompts) {
  check_prompts(prompts, model_, 0);
  int64_t max_len = 0;
  for (const auto& p : prompts) max_len = std::max(max_len, static_cast<int64_t>(p.size()));
  std::vector<Tensor> all;
  ranks_->run([&](int r) {
    ranks_->executors[r]->reset_cache(static_cast<int>(prompts.size()), max_len);
    std::vector<Tensor> logits = prefill(*ranks_->executors[r], prompts, true, nullptr);
    if (r == 0) all = std::move(logits);
  });
  return all;
}

std::vector<std::vector<int64_t>> Engine::generate(
    const std::vector<std::vector<int64_t>>& prompts, const GenerationParams& params,
    const std::function<void(size_t, int64_t)>& on_token, StepProfile* profile,
    std::vector<std::vector<TokenLogprob>>* logprobs) {
  check_prompts(prompts, model_, std::max<int64_t>(params.max_new_tokens, 0));
  const size_t n = prompts.size();
  std::vector<std::vector<int64_t>> generated(n);
  if (logprobs != nullptr) logprobs->assign(n, {});
  if (params.max_new_tokens <= 0) return generated;
  int64_t max_prompt = 0;
  for (const auto& p : prompts) max_prompt = std::max(max_prompt, static_cast<int64_t>(p.size()));
  if (model_.device == "cpu") {
    check_cache_fits(ranks_->executors, static_cast<int64_t>(n),
                     max_prompt + params.max_new_tokens);
  }
  std::vector<Sampler> samplers;
  for (size_t i = 0; i < n; ++i) samplers.emplace_back(sequence_seed(params.seed, i));
  // Plain greedy decoding needs only each row's largest logit: the backend picks it where the
  // logits are (Backend::argmax_rows), and only the chosen ids reach the host.
  const bool pick_on_device = !params.sampling.do_sample &&
                              params.sampling.repetition_penalty == 1.0 && logprobs == nullptr;
  // Sampling with a top-k filter (transformers' default keeps 50) needs only each row's largest
  // logits: the backend picks top_k and a quarter more of them (at least 64) where the logits are,
  // and a row they cannot decide (Sampler::sample_top: logits equal to the top_k-th largest
  // reaching the smallest candidate) takes its whole logits after all; the room past top_k makes
  // that rare with 16-bit logits. Twice top_k cost more (one H100, 7B, top_k 50, batch 32: 100
  // candidates 0.45 ms a step over greedy, 64 none measurable). Past top_k 128 the rows go whole
  // (sorting more candidates on one thread would cost what the copy saves).
  const int64_t top_k = params.sampling.top_k;
  const int64_t candidates = std::max<int64_t>(64, top_k + top_k / 4);
  const bool pick_candidates = params.sampling.do_sample && top_k > 0 && top_k <= 128 &&
                               params.sampling.repetition_penalty == 1.0 && logprobs == nullptr;
  ranks_->run([&](int r) {
    Executor& executor = *ranks_->executors[r];
    executor.reset_cache(static_cast<int>(n), max_prompt + params.max_new_tokens);
    // Rank 0 samples whole rows on up to a core each (greedy on the device: only the prompts'
    // last rows, on this thread).
    RowPool rows(executor.rank() == 0 && !pick_on_device
                     ? std::min<size_t>(n, std::max(1u, std::thread::hardware_concurrency()))
                     : 1);
    std::vector<std::vector<int64_t>> history = prompts;
    std::vector<int> live(n);  // the sequences still generating, in the order of their rows
    for (size_t i = 0; i < n; ++i) live[i] = static_cast<int>(i);
    StepProfile timing;  // this rank's, of the pass that profile->step names
    const bool profile_prompt = profile != nullptr && profile->step == 0;
    const std::vector<Tensor> last =
        prefill(executor, prompts, false, profile_prompt ? &timing : nullptr);
    Tensor logits({static_cast<int64_t>(n), executor.program().vocab_size});
    for (size_t i = 0; i < n; ++i)
      std::copy(last[i].data.begin(), last[i].data.end(), logits.row(i));
    const auto keep_timing = [&] {
      if (executor.rank() != 0) return;
      profile->times = std::move(timing.times);
      profile->tokens = timing.tokens;
    };
    if (profile_prompt) keep_timing();
    std::vector<int64_t> picked;  // the device's choices for the rows (pick_on_device, step > 0)
    backend::TopRows top;         // the rows' candidates (pick_candidates, step > 0)
    for (int64_t step = 0;; ++step) {
      // Rank 0 samples; every rank takes its choice so all caches stay identical.
      std::vector<int64_t> next(live.size());
      constexpr int64_t kNotFinite = -1, kInterrupted = -2;  // rank 0's verdicts, broadcast
      constexpr int64_t kWholeRow = -3;  // the candidates could not decide: sample the row
      if (executor.rank() == 0 && params.interrupt != nullptr && params.interrupt->load() != 0) {
        std::fill(next.begin(), next.end(), kInterrupted);
      } else if (executor.rank() == 0 && step > 0 && pick_on_device) {
        for (size_t j = 0; j < live.size(); ++j) next[j] = picked[j] < 0 ? kNotFinite : picked[j];
      } else if (executor.rank() == 0) {
        std::vector<size_t> whole(live.size());  // the rows to sample over all their logits
        std::iota(whole.begin(), whole.end(), size_t{0});
        if (step > 0 && pick_candidates) {
          // A row's candidates take a microsecond or two: on this thread, as handing them to
          // other threads costs more than the rows (7B at batch 32 on an H200, threads started
          // each step: 7.10 ms a step; here 5.59; greedy 5.31).
          const int64_t vocab = executor.program().vocab_size;
          for (size_t j = 0; j < live.size(); ++j) {
            next[j] = top.finite[j] == 0
                          ? kNotFinite
                          : samplers[static_cast<size_t>(live[j])]
                                .sample_top(top.values_of(j), top.ids_of(j), vocab, params.sampling)
                                .value_or(kWholeRow);
          }
          std::erase_if(whole, [&](size_t j) { return next[j] != kWholeRow; });
          if (!whole.empty()) logits = executor.logits();
        }
        rows.run(whole.size(), [&](size_t i) {
          const size_t j = whole[i];
          const size_t seq = static_cast<size_t>(live[j]);
          const std::span<float> row{logits.row(static_cast<int64_t>(j)),
                                     static_cast<size_t>(logits.cols())};
          if (!all_finite(row)) {
            next[j] = kNotFinite;
            return;
          }
          std::vector<float> raw;
          if (logprobs != nullptr) raw.assign(row.begin(), row.end());  // sample changes row
          next[j] = samplers[seq].sample(row, history[seq], params.sampling);
          if (logprobs != nullptr) {
            (*logprobs)[seq].push_back(token_logprob(raw, next[j], params.top_logprobs));
          }
        });
      }
      executor.broadcast(next);
      if (!next.empty() && next[0] == kInterrupted) break;
      for (size_t j = 0; j < live.size(); ++j) {
        if (next[j] != kNotFinite) continue;
        fail(
            "generated token {} of sequence {}: its logits are not finite (NaN or Inf), so no "
            "token can be chosen: the weights hold NaN/Inf (tpengine inspect --check finds them) "
            "or the activations overflowed (a wider --dtype)",
            step, live[j]);
      }
      backend::Batch following;
      std::vector<int> still;
      for (size_t j = 0; j < live.size(); ++j) {
        const size_t seq = static_cast<size_t>(live[j]);
        history[seq].push_back(next[j]);
        if (r == 0) generated[seq].push_back(next[j]);  // every process returns the tokens
        if (on_token && executor.rank() == 0) on_token(seq, next[j]);
        const auto& stop = params.stop_token_ids;
        if (std::find(stop.begin(), stop.end(), next[j]) != stop.end()) continue;
        following.segments.push_back(
            {static_cast<int>(seq), static_cast<int64_t>(history[seq].size()) - 1, 1});
        following.tokens.push_back(next[j]);
        following.logit_rows.push_back(static_cast<int64_t>(following.tokens.size()) - 1);
        still.push_back(live[j]);
      }
      if (following.segments.empty() || step + 1 == params.max_new_tokens) break;
      live = std::move(still);
      const bool timed = profile != nullptr && profile->step == step + 1;
      if (timed) timing.tokens = static_cast<int64_t>(following.tokens.size());
      if (pick_on_device) {
        picked = executor.forward_greedy(following, timed ? &timing.times : nullptr);
      } else if (pick_candidates) {
        top = executor.forward_top(following, candidates, timed ? &timing.times : nullptr);
      } else {
        logits = executor.forward(following, timed ? &timing.times : nullptr);
      }
      if (timed) keep_timing();
    }
  });
  return generated;
}

double Engine::copy_bandwidth_gbs() {
  double gbs = 0;
  ranks_->run([&](int r) {
    if (r == 0) gbs = ranks_->executors[0]->copy_bandwidth_gbs();
  });
  return gbs;
}

int64_t Engine::all_reduce_count() const { return ranks_->group.all_reduce_count(); }

int64_t Engine::replays() const { return ranks_->executors.front()->replays(); }

const std::string& Engine::collectives() const { return ranks_->executors.front()->collectives(); }

std::vector<Engine::RankMemory> Engine::memory() {
  std::vector<RankMemory> out(ranks_->executors.size());
  ranks_->run([&](int r) {
    Executor& e = *ranks_->executors[r];
    e.backend().bind_thread();
    const backend::Backend::MemoryUse use = e.backend().memory_use();
    const int64_t weights = e.weight_bytes(), cache = e.kv_cache_bytes();
    out[r] = {weights, cache, std::max<int64_t>(0, use.buffers_peak - weights - cache),
              use.device_in_use, e.program().arena_bytes};
  });
  return out;
}

void Engine::reset_memory_peak() {
  ranks_->run([&](int r) {
    Executor& e = *ranks_->executors[r];
    e.reset_cache(0, 0);
    e.backend().reset_memory_peak();
  });
}

std::vector<int64_t> Engine::weight_bytes() const {
  std::vector<int64_t> bytes;
  for (const auto& e : ranks_->executors) bytes.push_back(e->weight_bytes());
  return bytes;
}

}  // namespace tpe::runtime
