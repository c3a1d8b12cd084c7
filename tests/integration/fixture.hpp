// Reading a reference fixture made by tools/make_fixtures.py: its prompts, transformers' logits
// for them, and transformers' greedy continuations.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/common/tensor.hpp"
#include "core/io/safetensors.hpp"

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

}  // namespace tpe::test
