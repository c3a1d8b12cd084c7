// The stages of a Hugging Face tokenizer pipeline (normalizer, pre-tokenizer, model,
// post-processor, decoder) and their construction from tokenizer.json. Internal to core/tokenizer:
// users see tokenizer.hpp. Semantics follow tokenizers 0.23 (Rust) stage by stage; where a stage
// only changes offsets there, it is a no-op here, since the engine needs ids and text only.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/common/error.hpp"

namespace tpe::tokenizer::detail {

using json = nlohmann::json;

// Where a JSON value sits, for messages: "<file>: <dotted path>: ...".
struct Where {
  std::string file;
  std::string path;

  Where at(std::string_view key) const {
    return {file, path.empty() ? std::string(key) : path + "." + std::string(key)};
  }
  Where at(size_t index) const { return {file, path + "[" + std::to_string(index) + "]"}; }
  template <typename... Args>
  [[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) const {
    const std::string message = fmt::format(format, std::forward<Args>(args)...);
    if (path.empty()) tpe::fail("{}: {}", file, message);
    tpe::fail("{}: {}: {}", file, path, message);
  }
};

// Typed member access; a missing key or a wrong type is an error naming the key.
const json& member(const json& object, const char* key, const Where& where);
std::string get_string(const json& object, const char* key, const Where& where);
bool get_bool(const json& object, const char* key, bool fallback, const Where& where);
uint64_t get_uint(const json& object, const char* key, const Where& where);
// The component's "type" ("BPE", "Sequence", ...), required.
std::string get_type(const json& object, const Where& where);
// A single character given as a one-character string (Metaspace's replacement, Strip's content).
char32_t get_char(const json& object, const char* key, const Where& where);

// A piece of text on its way through the pipeline. `at_origin`: its first character comes from
// the first character of the input segment (Metaspace's prepend_scheme "first" asks this).
struct Piece {
  std::string text;
  bool at_origin = true;
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(Piece& piece) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces `pieces` by their split (empty pieces are dropped). `scratch` is reusable storage.
  virtual void pre_tokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  // Appends the ids of one pre-tokenized word.
  virtual void tokenize(std::string_view word, std::vector<uint32_t>& ids) const = 0;
  virtual std::optional<uint32_t> token_to_id(std::string_view token) const = 0;
  virtual const std::string* id_to_token(uint32_t id) const = 0;
  // One more than the largest id.
  virtual size_t vocab_size() const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds the special tokens around one sequence, or a pair (`second` non-null), into `out`.
  virtual void process(const std::vector<uint32_t>& first, const std::vector<uint32_t>* second,
                       std::vector<uint32_t>& out) const = 0;
};

std::unique_ptr<Normalizer> make_normalizer(const json& config, const Where& where);
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& config, const Where& where);
std::unique_ptr<Model> make_model(const json& config, const Where& where);
std::unique_ptr<Decoder> make_decoder(const json& config, const Where& where);
std::unique_ptr<PostProcessor> make_post_processor(const json& config, const Where& where);

// How a pre-tokenizer's split keeps its delimiters (tokenizers' SplitDelimiterBehavior).
enum class Behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };
Behavior get_behavior(const json& object, const Where& where);

// Splits `piece` at `matches` (ascending, non-overlapping byte ranges) with `behavior`, appending
// the non-empty parts to `out`. `invert` swaps matches and the text between them.
void split_piece(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches,
                 bool invert, Behavior behavior, std::vector<Piece>& out);

// GPT-2's reversible byte <-> printable character map (ByteLevel pre-tokenizer and decoder).
const std::string& byte_to_chars(unsigned char byte);
// The byte a character stands for, or -1.
int char_to_byte(char32_t c);

}  // namespace tpe::tokenizer::detail
