// Reading a reference fixture made by tools/make_fixtures.py: its prompts, transformers' logits
// for them, and transformers' greedy continuations.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/common/tensor.hpp"
#include "core/io/safetensors.hpp"
#include "core/runtime/engine.hpp"

namespace tpe::test {

struct Reference {
  std::vector<std::vector<int64_t>> prompts;
  std::vector<std::vector<int64_t>> greedy;
  std::vector<Tensor> logits;  // per prompt [len, vocab]
};

inline std::filesystem::path fixture_dir(const std::string& name) {
  return std::filesystem::path(TPE_FIXTURES_DIR) / name;
}

// Every fixture folder with a reference, sorted.
inline std::vector<std::string> fixture_names() {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(TPE_FIXTURES_DIR)) {
    if (std::filesystem::exists(entry.path() / "reference.json")) {
      names.push_back(entry.path().filename().string());
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

inline Reference load_reference(const std::string& name) {
  const auto dir = fixture_dir(name);
  std::ifstream in(dir / "reference.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  Reference ref;
  ref.prompts = j.at("prompts").get<std::vector<std::vector<int64_t>>>();
  ref.greedy = j.at("greedy").get<std::vector<std::vector<int64_t>>>();
  const auto file = io::SafetensorsFile::open(dir / "reference.safetensors");
  for (size_t i = 0; i < ref.prompts.size(); ++i) {
    const io::TensorInfo* info = file->find("logits." + std::to_string(i));
    if (info == nullptr || info->dtype != io::DType::F32 || info->shape.size() != 2) {
      throw std::runtime_error(name + ": reference.safetensors lacks F32 logits." +
                               std::to_string(i));
    }
    Tensor t({info->shape[0], info->shape[1]});
    t.data = file->read_f32(*info, info->shape, {}, {});
    ref.logits.push_back(std::move(t));
  }
  return ref;
}

// How far logits are from a reference: per prompt max |got - want| / max |want|, the largest
// over prompts (infinity when the prompts or shapes differ).
inline float logits_error(const std::vector<Tensor>& got, const std::vector<Tensor>& want) {
  if (got.size() != want.size()) return std::numeric_limits<float>::infinity();
  float worst = 0;
  for (size_t p = 0; p < want.size(); ++p) {
    if (got[p].shape != want[p].shape) return std::numeric_limits<float>::infinity();
    float max_ref = 0, max_diff = 0;
    for (size_t i = 0; i < want[p].data.size(); ++i) {
      max_ref = std::max(max_ref, std::abs(want[p].data[i]));
      max_diff = std::max(max_diff, std::abs(want[p].data[i] - got[p].data[i]));
    }
    worst = std::max(worst, max_diff / max_ref);
  }
  return worst;
}

// Sampled generation with a top-k filter (and top-p, a temperature and a seed), for the tests of
// sampling's candidates (Backend::top_rows).
inline runtime::GenerationParams top_k_sampling(int64_t top_k, int64_t new_tokens) {
  runtime::GenerationParams params;
  params.max_new_tokens = new_tokens;
  params.sampling.do_sample = true;
  params.sampling.temperature = 0.8;
  params.sampling.top_k = top_k;
  params.sampling.top_p = 0.9;
  params.seed = 4321;
  return params;
}

}  // namespace tpe::test
