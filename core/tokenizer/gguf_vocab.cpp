// Tokenizer::from_gguf: the tokenizer.json that transformers' GGUF import
// (transformers/integrations/gguf/gguf_tokenizer_mapping.py, byte_level_tokenizer and
// add_gguf_special_tokens) builds from a file's metadata, written out and read like any other.
#include <algorithm>
#include <iterator>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/common/error.hpp"
#include "core/tokenizer/components.hpp"
#include "core/tokenizer/tokenizer.hpp"
#include "core/tokenizer/unicode.hpp"

namespace tpe::tokenizer {
namespace {

using nlohmann::json;

// The pre-tokenizer names transformers gives a split of their own; any other name means GPT-2's.
constexpr std::string_view kOwnSplits[] = {
    "llama3", "llama-v3",     "llama-bpe", "falcon3",   "falcon-h1", "pixtral", "midm-2.0",
    "lfm2",   "jina-v5-nano", "dbrx",      "smaug-bpe", "tekken",    "qwen2",   "deepseek-r1-qwen",
    "kormo",  "f2llmv2",      "megrez",    "qwen35",    "gpt-4o",    "llama4",  "kanana2",
    "talkie", "minimax-m2"};

// Every character of `token` is one of GPT-2's byte characters.
bool byte_spelled(std::string_view token) {
  for (size_t pos = 0; pos < token.size();) {
    if (detail::char_to_byte(unicode::next(token, pos)) < 0) return false;
  }
  return true;
}

// A token as the byte-level vocabulary spells it: unchanged when it already is, else its UTF-8
// bytes as GPT-2's characters.
std::string respelled(const std::string& token) {
  if (byte_spelled(token)) return token;
  std::string out;
  for (const char c : token) out += detail::byte_to_chars(static_cast<unsigned char>(c));
  return out;
}

json byte_level(bool add_prefix_space, bool use_regex) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", add_prefix_space},
          {"trim_offsets", true},
          {"use_regex", use_regex}};
}

}  // namespace

Tokenizer Tokenizer::from_gguf(const GgufVocab& v, const std::string& source) {
  const std::string where = printable(source);
  if (v.model != "gpt2") {
    fail(
        "{}: metadata 'tokenizer.ggml.model' is '{}'; tpengine reads GGUF tokenizers of type "
        "'gpt2' (byte-level BPE) only so far",
        where, printable(v.model));
  }
  if (std::ranges::find(kOwnSplits, v.pre) != std::end(kOwnSplits)) {
    fail(
        "{}: metadata 'tokenizer.ggml.pre' is '{}', a pre-tokenizer tpengine does not read from "
        "GGUF yet (its Hugging Face tokenizer.json works)",
        where, printable(v.pre));
  }
  if (v.add_bos || v.add_eos) {
    fail(
        "{}: metadata 'tokenizer.ggml.add_{}_token' is true, which tpengine does not read from "
        "GGUF yet (its Hugging Face tokenizer.json works)",
        where, v.add_bos ? "bos" : "eos");
  }
  if (!v.token_types.empty() && v.token_types.size() != v.tokens.size()) {
    fail("{}: {} entries in 'tokenizer.ggml.token_type' for {} tokens", where, v.token_types.size(),
         v.tokens.size());
  }
  json vocab = json::object();
  for (size_t id = 0; id < v.tokens.size(); ++id) vocab[respelled(v.tokens[id])] = id;
  json added = json::array();
  for (size_t id = 0; id < v.token_types.size(); ++id) {
    const std::string& token = v.tokens[id];
    // A control token outside the byte alphabet is a llama.cpp mislabel, which transformers skips.
    const bool control = v.token_types[id] == 3 && byte_spelled(token);
    const bool user = v.token_types[id] == 4 && vocab.contains(token);
    if (!control && !user) continue;
    added.push_back({{"id", id},
                     {"content", token},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", control}});
  }
  json merges = json::array();
  for (const std::string& m : v.merges) merges.push_back(m);
  const json tokenizer = {{"version", "1.0"},
                          {"truncation", nullptr},
                          {"padding", nullptr},
                          {"added_tokens", std::move(added)},
                          {"normalizer", nullptr},
                          {"pre_tokenizer", byte_level(false, true)},
                          {"post_processor",
                           {{"type", "TemplateProcessing"},
                            {"single", {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                            {"pair",
                             {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
                            {"special_tokens", json::object()}}},
                          {"decoder", byte_level(true, true)},
                          {"model",
                           {{"type", "BPE"},
                            {"dropout", nullptr},
                            {"unk_token", nullptr},
                            {"continuing_subword_prefix", ""},
                            {"end_of_word_suffix", ""},
                            {"fuse_unk", false},
                            {"byte_fallback", false},
                            {"ignore_merges", false},
                            {"vocab", std::move(vocab)},
                            {"merges", std::move(merges)}}}};
  return from_json(tokenizer.dump(), source);
}

}  // namespace tpe::tokenizer
