// Tokenizer::from_gguf: the tokenizer.json that transformers' GGUF import
// (transformers/integrations/gguf/gguf_tokenizer_mapping.py: byte_level_tokenizer or
// sentencepiece_tokenizer with LlamaTokenizer, then add_gguf_special_tokens) builds from a file's
// metadata, written out and read like any other.
#include <algorithm>
#include <iterator>
#include <string_view>
#include <tuple>
#include <unordered_map>

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

// The merges a SentencePiece vocabulary implies (transformers' generate_merges with scores):
// every split of a token into two tokens of the vocabulary, ordered by the merged token's score,
// best first, then by the pieces' lengths in characters, longest first; ties keep the tokens'
// order. (generate_merges also orders one token's splits by the pieces' ids first, which the
// lengths then overrule: no two splits of a token have the same left length.)
json recovered_merges(const GgufVocab& v, const std::string& where) {
  if (v.scores.size() != v.tokens.size()) {
    fail(
        "{}: {} entries in 'tokenizer.ggml.scores' for {} tokens (a SentencePiece vocabulary "
        "without merges needs one score per token)",
        where, v.scores.size(), v.tokens.size());
  }
  std::unordered_map<std::string_view, size_t> last;  // a token's last id, as a Python dict
  for (size_t i = 0; i < v.tokens.size(); ++i) last[v.tokens[i]] = i;
  // (score, left length, right length, left, right)
  using Merge = std::tuple<double, size_t, size_t, std::string_view, std::string_view>;
  std::vector<Merge> merges;
  std::unordered_map<std::string_view, bool> seen;
  for (const std::string& owned : v.tokens) {
    const std::string_view token = owned;
    if (!seen.emplace(token, true).second) continue;  // a repeated token scores as its last
    const double score = v.scores[last[token]];
    size_t chars = 0;
    for (size_t pos = 0; pos < token.size(); ++chars) unicode::next(token, pos);
    size_t left_chars = 0;
    for (size_t pos = 0; pos < token.size();) {
      unicode::next(token, pos);
      ++left_chars;
      if (pos == token.size()) break;
      const std::string_view left = token.substr(0, pos), right = token.substr(pos);
      if (last.contains(left) && last.contains(right)) {
        merges.emplace_back(score, left_chars, chars - left_chars, left, right);
      }
    }
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    return std::tie(std::get<0>(a), std::get<1>(a), std::get<2>(a)) >
           std::tie(std::get<0>(b), std::get<1>(b), std::get<2>(b));
  });
  json out = json::array();
  for (const Merge& m : merges) out.push_back({std::get<3>(m), std::get<4>(m)});
  return out;
}

json template_processing(const std::optional<std::string>& bos, int64_t bos_id) {
  json single = json::array(), pair = json::array();
  json specials = json::object();
  if (bos) {
    single.push_back({{"SpecialToken", {{"id", *bos}, {"type_id", 0}}}});
    pair.push_back({{"SpecialToken", {{"id", *bos}, {"type_id", 0}}}});
    specials[*bos] = {{"id", *bos}, {"ids", {bos_id}}, {"tokens", {*bos}}};
  }
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  pair.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  if (bos) pair.push_back({{"SpecialToken", {{"id", *bos}, {"type_id", 1}}}});
  pair.push_back({{"Sequence", {{"id", "B"}, {"type_id", 1}}}});
  return {{"type", "TemplateProcessing"},
          {"single", std::move(single)},
          {"pair", std::move(pair)},
          {"special_tokens", std::move(specials)}};
}

}  // namespace

Tokenizer Tokenizer::from_gguf(const GgufVocab& v, const std::string& source) {
  const std::string where = printable(source);
  const bool sentencepiece = v.model == "llama";
  if (v.model != "gpt2" && !sentencepiece) {
    fail(
        "{}: metadata 'tokenizer.ggml.model' is '{}'; tpengine reads GGUF tokenizers of type "
        "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)",
        where, printable(v.model));
  }
  constexpr std::string_view kOtherSentencePiece[] = {"gemma", "gemma2", "gemma3", "phi3"};
  if (sentencepiece &&
      std::ranges::find(kOtherSentencePiece, v.architecture) != std::end(kOtherSentencePiece)) {
    fail(
        "{}: a SentencePiece tokenizer of architecture '{}', whose variant tpengine does not "
        "read from GGUF yet (its Hugging Face tokenizer.json works)",
        where, printable(v.architecture));
  }
  if (!sentencepiece && std::ranges::find(kOwnSplits, v.pre) != std::end(kOwnSplits)) {
    fail(
        "{}: metadata 'tokenizer.ggml.pre' is '{}', a pre-tokenizer tpengine does not read from "
        "GGUF yet (its Hugging Face tokenizer.json works)",
        where, printable(v.pre));
  }
  // transformers adds BOS to a SentencePiece vocabulary unless the file says otherwise.
  const bool add_bos = v.add_bos.value_or(sentencepiece);
  if (v.add_eos.value_or(false) || (add_bos && !sentencepiece)) {
    fail(
        "{}: metadata 'tokenizer.ggml.add_{}_token' is true, which tpengine does not read from "
        "GGUF {}yet (its Hugging Face tokenizer.json works)",
        where, v.add_eos.value_or(false) ? "eos" : "bos",
        sentencepiece ? "" : "for a byte-level vocabulary ");
  }
  if (!v.token_types.empty() && v.token_types.size() != v.tokens.size()) {
    fail("{}: {} entries in 'tokenizer.ggml.token_type' for {} tokens", where, v.token_types.size(),
         v.tokens.size());
  }
  for (const int64_t id : v.special_ids) {
    if (id < 0 || static_cast<size_t>(id) >= v.tokens.size()) {
      fail("{}: a special token id {} (tokenizer.ggml.*_token_id) is not one of the {} tokens",
           where, id, v.tokens.size());
    }
  }
  json vocab = json::object();
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    vocab[sentencepiece ? v.tokens[id] : respelled(v.tokens[id])] = id;
  }
  json added = json::array();
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    const std::string& token = v.tokens[id];
    const int64_t type = id < v.token_types.size() ? v.token_types[id] : 0;
    // A control token outside the byte alphabet is a llama.cpp mislabel, which transformers skips.
    const bool control = type == 3 && (sentencepiece || byte_spelled(token));
    const bool named =
        std::ranges::find(v.special_ids, static_cast<int64_t>(id)) != v.special_ids.end();
    const bool user = type == 4 && vocab.contains(token);
    if (!control && !named && !user) continue;
    added.push_back({{"id", id},
                     {"content", token},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", control || named}});
  }
  json merges = json::array();
  if (!v.merges.empty() || !sentencepiece) {
    for (const std::string& m : v.merges) merges.push_back(m);
  } else {
    merges = recovered_merges(v, where);
  }
  std::optional<std::string> bos;
  if (add_bos) {
    if (!v.bos_id) fail("{}: BOS is added but no 'tokenizer.ggml.bos_token_id' names it", where);
    bos = v.tokens[static_cast<size_t>(*v.bos_id)];
  }
  json pre_tokenizer = byte_level(false, true);
  json decoder = byte_level(true, true);
  if (sentencepiece) {
    pre_tokenizer = {{"type", "Metaspace"},
                     {"replacement", "\u2581"},
                     {"prepend_scheme", "first"},
                     {"split", false}};
    decoder = {{"type", "Sequence"},
               {"decoders",
                {{{"type", "Replace"}, {"pattern", {{"String", "\u2581"}}}, {"content", " "}},
                 {{"type", "ByteFallback"}},
                 {{"type", "Fuse"}},
                 {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  }
  const json tokenizer = {{"version", "1.0"},
                          {"truncation", nullptr},
                          {"padding", nullptr},
                          {"added_tokens", std::move(added)},
                          {"normalizer", nullptr},
                          {"pre_tokenizer", std::move(pre_tokenizer)},
                          {"post_processor", template_processing(bos, v.bos_id.value_or(-1))},
                          {"decoder", std::move(decoder)},
                          {"model",
                           {{"type", "BPE"},
                            {"dropout", nullptr},
                            {"unk_token", nullptr},
                            {"continuing_subword_prefix", ""},
                            {"end_of_word_suffix", ""},
                            {"fuse_unk", sentencepiece},
                            {"byte_fallback", sentencepiece},
                            {"ignore_merges", false},
                            {"vocab", std::move(vocab)},
                            {"merges", std::move(merges)}}}};
  return from_json(tokenizer.dump(), source);
}

}  // namespace tpe::tokenizer
