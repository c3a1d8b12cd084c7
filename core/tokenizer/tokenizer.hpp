// Hugging Face tokenizers in C++: a checkpoint's tokenizer.json (+ tokenizer_config.json), encoding
// and decoding with the ids and text of tokenizers 0.23, and streaming decode for generation.
// Owns: text <-> ids. May not touch: weights, graphs, the runtime. See docs/tokenizer.md.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tpe::tokenizer {

class IncrementalDecoder;

// A token matched in the text before the model sees it (tokenizer.json's added_tokens).
struct AddedToken {
  std::string content;
  uint32_t id = 0;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool normalized = false;
};

// A GGUF file's tokenizer: its tokenizer.ggml.* metadata (core/runtime reads the file).
struct GgufVocab {
  std::string architecture;  // general.architecture (Gemma's and Phi-3's SentencePiece differ)
  std::string model;  // tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
  std::string pre;    // tokenizer.ggml.pre: which split the merges were learned with
  std::vector<std::string> tokens;
  std::vector<std::string> merges;   // "a b"; SentencePiece files usually have none
  std::vector<double> scores;        // per token (SentencePiece: the merges follow from them)
  std::vector<int64_t> token_types;  // per token; 3 control, 4 user-defined
  std::vector<int64_t> special_ids;  // the bos, eos, unknown and padding ids the file names
  std::optional<int64_t> bos_id;     // the bos among them
  std::optional<bool> add_bos;       // absent: transformers' default for the model
  std::optional<bool> add_eos;
};

class Tokenizer {
 public:
  // A checkpoint directory, as transformers' AutoTokenizer reads it: dir/tokenizer.json, plus the
  // special tokens named in dir/tokenizer_config.json (optional) that tokenizer.json lacks. As in
  // transformers 5, add_bos_token / add_eos_token there do not change tokenizer.json's
  // post-processor. Errors name the file and the JSON key.
  static Tokenizer load(const std::filesystem::path& model_dir);
  // One tokenizer.json, as tokenizers' Tokenizer.from_file.
  static Tokenizer from_file(const std::filesystem::path& tokenizer_json);
  // tokenizer.json's text; `source` names it in messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& source);
  // The tokenizer transformers' GGUF import builds from this metadata: byte-level BPE with
  // GPT-2's split, or SentencePiece-style BPE with byte fallback (Llama, Mistral: merges
  // recovered from the scores, BOS added unless the file says not to); control tokens and the
  // named bos/eos/unknown/padding tokens special, user-defined ones added. Refuses, naming the
  // key, what it does not read yet: the pre-tokenizers with their own split (llama-bpe, qwen2,
  // ...), Gemma's and Phi-3's SentencePiece variants, add_eos_token, and add_bos_token on a
  // byte-level vocabulary.
  static Tokenizer from_gguf(const GgufVocab& vocab, const std::string& source);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text must be valid UTF-8 (else tpe::Error naming the byte offset). add_special_tokens
  // applies the post-processor (BOS, [CLS] ... [SEP], ...). Truncation and padding settings in
  // tokenizer.json are not applied.
  std::vector<uint32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  std::vector<uint32_t> encode_pair(std::string_view first, std::string_view second,
                                    bool add_special_tokens = true) const;
  // Unknown ids are skipped, as in tokenizers; invalid UTF-8 from byte tokens becomes U+FFFD.
  std::string decode(std::span<const uint32_t> ids, bool skip_special_tokens = false) const;
  // Streaming decode of generated ids; see IncrementalDecoder.
  IncrementalDecoder incremental_decoder(bool skip_special_tokens = false) const;

  std::optional<uint32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(uint32_t id) const;
  // Number of ids, added tokens included (tokenizers' get_vocab_size(with_added_tokens=True)).
  size_t vocab_size() const;
  bool is_special(uint32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;

  // From tokenizer_config.json (load() only); nullopt when not set there.
  std::optional<uint32_t> bos_token_id() const;
  std::optional<uint32_t> eos_token_id() const;
  std::optional<uint32_t> pad_token_id() const;
  std::optional<uint32_t> unk_token_id() const;

  // Throws tpe::Error if an id this tokenizer can produce has no row in an embedding of
  // `embedding_rows` (config.json's vocab_size): a tokenizer from another model.
  void check_embedding_size(int64_t embedding_rows) const;

  // tokenizer.json's path (or the name given to from_json).
  const std::string& source() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class IncrementalDecoder;
};

// Turns ids into text one id at a time for generation. Each step() returns the text that the
// new id completes (often empty while a multi-byte character is still open); the concatenation
// of every step() and the final finish() is decode(all ids). Text is never cut inside a UTF-8
// sequence. Works on a short window of recent ids, so each step costs O(1) whatever the length.
class IncrementalDecoder {
 public:
  IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens);
  std::string step(uint32_t id);
  // Whatever is held back (an incomplete character at the very end comes out as U+FFFD, as in
  // decode). The decoder can be reused after it, for a new sequence.
  std::string finish();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  std::vector<uint32_t> ids_;  // the window: ids from the last emitted context on
  std::string prefix_;         // decode of ids_[0, prefix_end_)
  size_t prefix_end_ = 0;
};

}  // namespace tpe::tokenizer
