#include "core/tokenizer/tokenizer.hpp"

#include <array>
#include <unordered_map>
#include <unordered_set>

#include "core/common/json_error.hpp"
#include "core/common/text_file.hpp"
#include "core/tokenizer/components.hpp"
#include "core/tokenizer/unicode.hpp"

namespace tpe::tokenizer {

using detail::json;
using detail::Piece;
using detail::Where;
namespace u = unicode;

namespace {

// Leftmost-longest, non-overlapping matching of added tokens (tokenizers uses Aho-Corasick with
// MatchKind::LeftmostLongest).
class Matcher {
 public:
  void add(std::string pattern, size_t token) {
    if (pattern.empty()) return;
    const auto first = static_cast<unsigned char>(pattern[0]);
    auto& bucket = buckets_[first];
    bucket.push_back({std::move(pattern), token});
    // Longest first, so the first hit at a position is the longest.
    std::stable_sort(bucket.begin(), bucket.end(), [](const Entry& a, const Entry& b) {
      return a.pattern.size() > b.pattern.size();
    });
  }
  bool empty() const {
    return std::all_of(buckets_.begin(), buckets_.end(), [](const auto& b) { return b.empty(); });
  }
  // The first match at or after `from`: (start, length, token), or start == npos.
  std::tuple<size_t, size_t, size_t> find(std::string_view text, size_t from) const {
    for (size_t pos = from; pos < text.size(); ++pos) {
      const auto& bucket = buckets_[static_cast<unsigned char>(text[pos])];
      for (const Entry& entry : bucket) {
        if (text.compare(pos, entry.pattern.size(), entry.pattern) == 0)
          return {pos, entry.pattern.size(), entry.token};
      }
    }
    return {std::string_view::npos, 0, 0};
  }

 private:
  struct Entry {
    std::string pattern;
    size_t token;
  };
  std::array<std::vector<Entry>, 256> buckets_;
};

json parse_json(std::string_view text, const std::string& source) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", source, json_error_message(e));
  }
}

bool ends_with_word(std::string_view text) {
  if (text.empty()) return false;
  const char32_t c = u::previous(text, text.size());
  return u::is_alphanumeric(c) || c == '_';
}

bool starts_with_word(std::string_view text) {
  if (text.empty()) return false;
  size_t pos = 0;
  const char32_t c = u::next(text, pos);
  return u::is_alphanumeric(c) || c == '_';
}

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  std::unique_ptr<detail::Normalizer> normalizer;
  std::unique_ptr<detail::PreTokenizer> pre_tokenizer;
  std::unique_ptr<detail::Model> model;
  std::unique_ptr<detail::PostProcessor> post_processor;
  std::unique_ptr<detail::Decoder> decoder;

  std::vector<AddedToken> added;
  std::unordered_map<std::string, size_t> added_by_content;
  std::unordered_map<uint32_t, size_t> added_by_id;
  std::unordered_set<std::string> special_contents;
  Matcher raw_matcher;         // tokens matched in the text as given
  Matcher normalized_matcher;  // tokens matched after normalisation (normalized: true)

  std::optional<uint32_t> bos, eos, pad, unk;

  // tokenizers' AddedVocabulary::add_tokens: an existing added token keeps its id, a token of
  // the model's vocabulary gets that id, any other the next id after both.
  void add_token(AddedToken token) {
    if (token.content.empty() || added_by_content.contains(token.content)) return;
    if (const auto id = model->token_to_id(token.content)) {
      token.id = *id;
    } else {
      const auto model_size = static_cast<uint32_t>(model->vocab_size());
      uint32_t max_added = 0;
      bool any = false;
      for (const AddedToken& t : added) {
        max_added = std::max(max_added, t.id);
        any = true;
      }
      token.id = !any ? model_size
                      : (max_added >= model_size || model_size == 0 ? max_added + 1 : model_size);
    }
    added_by_content[token.content] = added.size();
    added_by_id[token.id] = added.size();
    if (token.special) special_contents.insert(token.content);
    added.push_back(std::move(token));
  }

  void build_matchers() {
    raw_matcher = Matcher();
    normalized_matcher = Matcher();
    for (size_t i = 0; i < added.size(); ++i) {
      const AddedToken& token = added[i];
      if (token.normalized && normalizer) {
        Piece piece{token.content, true};
        normalizer->normalize(piece);
        normalized_matcher.add(piece.text, i);
      } else if (token.normalized) {
        normalized_matcher.add(token.content, i);
      } else {
        raw_matcher.add(token.content, i);
      }
    }
  }

  // tokenizers' AddedVocabulary::find_matches: calls on_text(begin, end) for text between
  // tokens and on_token(id) for each token, in order.
  template <typename OnText, typename OnToken>
  void split_added(std::string_view text, const Matcher& matcher, OnText on_text,
                   OnToken on_token) const {
    size_t start_offset = 0;
    size_t from = 0;
    if (!matcher.empty()) {
      while (from < text.size()) {
        auto [start, length, index] = matcher.find(text, from);
        if (start == std::string_view::npos) break;
        size_t stop = start + length;
        from = stop;
        const AddedToken& token = added[index];
        if (token.single_word) {
          const bool start_space = start == 0 || !ends_with_word(text.substr(0, start));
          const bool stop_space = stop == text.size() || !starts_with_word(text.substr(stop));
          if (!start_space || !stop_space) continue;
        }
        if (token.lstrip) {
          size_t new_start = start;
          while (new_start > 0) {
            size_t char_start = new_start - 1;
            while (char_start > 0 && (static_cast<unsigned char>(text[char_start]) & 0xc0) == 0x80)
              --char_start;
            size_t pos = char_start;
            if (!u::is_whitespace(u::next(text, pos))) break;
            new_start = char_start;
          }
          // The previous match may have taken these spaces already.
          start = std::max(new_start, start_offset);
        }
        if (token.rstrip) {
          while (stop < text.size()) {
            size_t pos = stop;
            if (!u::is_whitespace(u::next(text, pos))) break;
            stop = pos;
          }
        }
        if (start_offset < start) on_text(start_offset, start);
        on_token(token.id);
        start_offset = stop;
      }
    }
    if (start_offset < text.size()) on_text(start_offset, text.size());
  }

  void encode_into(std::string_view text, std::vector<uint32_t>& ids) const {
    if (const size_t bad = u::invalid_utf8_at(text); bad != std::string_view::npos) {
      fail("{}: cannot encode: the text is not valid UTF-8 (byte {} of {})", source, bad,
           text.size());
    }
    std::vector<Piece> pieces;
    std::vector<Piece> scratch;
    auto model_words = [&](Piece piece) {
      pieces.clear();
      pieces.push_back(std::move(piece));
      if (pre_tokenizer) pre_tokenizer->pre_tokenize(pieces, scratch);
      for (const Piece& word : pieces) model->tokenize(word.text, ids);
    };
    auto push_id = [&](uint32_t id) { ids.push_back(id); };
    split_added(
        text, raw_matcher,
        [&](size_t begin, size_t end) {
          Piece segment{std::string(text.substr(begin, end - begin)), begin == 0};
          if (normalizer) normalizer->normalize(segment);
          if (segment.text.empty()) return;
          split_added(
              segment.text, normalized_matcher,
              [&](size_t b, size_t e) {
                model_words(Piece{segment.text.substr(b, e - b), segment.at_origin && b == 0});
              },
              push_id);
        },
        push_id);
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& source) {
  const json root = parse_json(json_text, source);
  const Where where{source, ""};
  if (!root.is_object()) where.fail("expected a JSON object, got {}", root.type_name());
  auto impl = std::make_unique<Impl>();
  impl->source = source;
  auto optional = [&](const char* key) -> const json* {
    const auto it = root.find(key);
    return it == root.end() || it->is_null() ? nullptr : &*it;
  };
  impl->model = detail::make_model(detail::member(root, "model", where), where.at("model"));
  if (const json* c = optional("normalizer"))
    impl->normalizer = detail::make_normalizer(*c, where.at("normalizer"));
  if (const json* c = optional("pre_tokenizer")) {
    impl->pre_tokenizer = detail::make_pre_tokenizer(*c, where.at("pre_tokenizer"));
  }
  if (const json* c = optional("post_processor")) {
    impl->post_processor = detail::make_post_processor(*c, where.at("post_processor"));
  }
  if (const json* c = optional("decoder"))
    impl->decoder = detail::make_decoder(*c, where.at("decoder"));
  if (const json* list = optional("added_tokens")) {
    if (!list->is_array()) where.at("added_tokens").fail("expected a list");
    for (size_t i = 0; i < list->size(); ++i) {
      const json& entry = (*list)[i];
      const Where at = where.at("added_tokens").at(i);
      AddedToken token;
      token.content = detail::get_string(entry, "content", at);
      if (u::invalid_utf8_at(token.content) != std::string::npos)
        at.at("content").fail("not valid UTF-8");
      token.special = detail::get_bool(entry, "special", false, at);
      token.lstrip = detail::get_bool(entry, "lstrip", false, at);
      token.rstrip = detail::get_bool(entry, "rstrip", false, at);
      token.single_word = detail::get_bool(entry, "single_word", false, at);
      token.normalized = detail::get_bool(entry, "normalized", !token.special, at);
      impl->add_token(std::move(token));
    }
  }
  impl->build_matchers();
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_file(const std::filesystem::path& tokenizer_json) {
  return from_json(read_text_file(tokenizer_json, kTokenizerFileLimit), tokenizer_json.string());
}

Tokenizer Tokenizer::load(const std::filesystem::path& model_dir) {
  Tokenizer tokenizer = from_file(model_dir / "tokenizer.json");
  const std::filesystem::path config_path = model_dir / "tokenizer_config.json";
  if (!std::filesystem::exists(config_path)) return tokenizer;
  const std::string source = config_path.string();
  const json config = parse_json(read_text_file(config_path, kConfigFileLimit), source);
  const Where where{source, ""};
  if (!config.is_object()) where.fail("expected a JSON object, got {}", config.type_name());
  Impl& impl = *tokenizer.impl_;

  // A special token is a string or an AddedToken object ({"content": ..., "lstrip": ...}).
  auto parse_token = [&](const json& value, const Where& at) -> std::optional<AddedToken> {
    if (value.is_null()) return std::nullopt;
    AddedToken token;
    token.special = true;
    if (value.is_string()) {
      token.content = value.get<std::string>();
    } else if (value.is_object()) {
      token.content = detail::get_string(value, "content", at);
      token.lstrip = detail::get_bool(value, "lstrip", false, at);
      token.rstrip = detail::get_bool(value, "rstrip", false, at);
      token.single_word = detail::get_bool(value, "single_word", false, at);
      token.special = detail::get_bool(value, "special", true, at);
      token.normalized = detail::get_bool(value, "normalized", !token.special, at);
    } else {
      at.fail("expected a token string or object, got {}", value.type_name());
    }
    if (u::invalid_utf8_at(token.content) != std::string::npos) at.fail("not valid UTF-8");
    return token;
  };
  auto add = [&](const json& value, const Where& at) -> std::optional<uint32_t> {
    auto token = parse_token(value, at);
    if (!token || token->content.empty()) return std::nullopt;
    const std::string content = token->content;
    impl.add_token(std::move(*token));
    return impl.added[impl.added_by_content.at(content)].id;
  };
  // transformers adds added_tokens_decoder's entries, then the named special tokens.
  if (const auto it = config.find("added_tokens_decoder"); it != config.end() && it->is_object()) {
    for (const auto& [id, value] : it->items()) add(value, where.at("added_tokens_decoder").at(id));
  }
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                          "cls_token", "mask_token"}) {
    if (!config.contains(key)) continue;
    const std::optional<uint32_t> id = add(config[key], where.at(key));
    if (std::string_view(key) == "bos_token") impl.bos = id;
    if (std::string_view(key) == "eos_token") impl.eos = id;
    if (std::string_view(key) == "pad_token") impl.pad = id;
    if (std::string_view(key) == "unk_token") impl.unk = id;
  }
  for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
    const auto it = config.find(key);
    if (it == config.end() || it->is_null()) continue;
    if (it->is_array()) {
      for (size_t i = 0; i < it->size(); ++i) add((*it)[i], where.at(key).at(i));
    } else if (it->is_object()) {
      for (const auto& [name, value] : it->items()) add(value, where.at(key).at(name));
    } else {
      where.at(key).fail("expected a list of tokens");
    }
  }
  impl.build_matchers();
  return tokenizer;
}

std::vector<uint32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<uint32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  impl_->encode_into(text, ids);
  if (add_special_tokens && impl_->post_processor) {
    std::vector<uint32_t> out;
    impl_->post_processor->process(ids, nullptr, out);
    return out;
  }
  return ids;
}

std::vector<uint32_t> Tokenizer::encode_pair(std::string_view first, std::string_view second,
                                             bool add_special_tokens) const {
  std::vector<uint32_t> a;
  std::vector<uint32_t> b;
  impl_->encode_into(first, a);
  impl_->encode_into(second, b);
  if (add_special_tokens && impl_->post_processor) {
    std::vector<uint32_t> out;
    impl_->post_processor->process(a, &b, out);
    return out;
  }
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::string Tokenizer::decode(std::span<const uint32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const uint32_t id : ids) {
    const std::string* token = nullptr;
    if (const auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
      token = &impl_->added[it->second].content;
    } else {
      token = impl_->model->id_to_token(id);
    }
    if (token == nullptr) continue;
    if (skip_special_tokens && impl_->special_contents.contains(*token)) continue;
    tokens.push_back(*token);
  }
  if (!impl_->decoder) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) out += ' ';
      out += tokens[i];
    }
    return out;
  }
  impl_->decoder->decode_chain(tokens);
  std::string out;
  for (const std::string& token : tokens) out += token;
  return out;
}

IncrementalDecoder Tokenizer::incremental_decoder(bool skip_special_tokens) const {
  return IncrementalDecoder(*this, skip_special_tokens);
}

std::optional<uint32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = impl_->added_by_content.find(std::string(token));
      it != impl_->added_by_content.end()) {
    return impl_->added[it->second].id;
  }
  return impl_->model->token_to_id(token);
}

std::optional<std::string> Tokenizer::id_to_token(uint32_t id) const {
  if (const auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) {
    return impl_->added[it->second].content;
  }
  const std::string* token = impl_->model->id_to_token(id);
  return token ? std::optional<std::string>(*token) : std::nullopt;
}

size_t Tokenizer::vocab_size() const {
  size_t size = impl_->model->vocab_size();
  for (const AddedToken& token : impl_->added)
    size = std::max(size, static_cast<size_t>(token.id) + 1);
  return size;
}

bool Tokenizer::is_special(uint32_t id) const {
  const auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }
std::optional<uint32_t> Tokenizer::bos_token_id() const { return impl_->bos; }
std::optional<uint32_t> Tokenizer::eos_token_id() const { return impl_->eos; }
std::optional<uint32_t> Tokenizer::pad_token_id() const { return impl_->pad; }
std::optional<uint32_t> Tokenizer::unk_token_id() const { return impl_->unk; }
const std::string& Tokenizer::source() const { return impl_->source; }

void Tokenizer::check_embedding_size(int64_t embedding_rows) const {
  const size_t size = vocab_size();
  if (embedding_rows < 0 || size > static_cast<uint64_t>(embedding_rows)) {
    fail(
        "{}: the tokenizer has {} ids but the model's embedding has {} rows (config.json "
        "vocab_size); "
        "is this the model's own tokenizer?",
        impl_->source, size, embedding_rows);
  }
}

// ---------------------------------------------------------------------------------------------

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(&tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string IncrementalDecoder::step(uint32_t id) {
  ids_.push_back(id);
  std::string text = tokenizer_->decode(ids_, skip_special_tokens_);
  // Hold back while the text ends inside a character (decode shows it as U+FFFD) or while the
  // new id changed text already given out (then a later id may settle it).
  if (text.size() <= prefix_.size() || text.ends_with("\xef\xbf\xbd") || !text.starts_with(prefix_))
    return {};
  std::string fresh = text.substr(prefix_.size());
  // The window keeps the ids after the old prefix: the last ones given out are the context that
  // decoders which look at their neighbours (Metaspace, WordPiece, Strip) need.
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_end_));
  prefix_ = tokenizer_->decode(ids_, skip_special_tokens_);
  prefix_end_ = ids_.size();
  return fresh;
}

std::string IncrementalDecoder::finish() {
  const std::string text = tokenizer_->decode(ids_, skip_special_tokens_);
  std::string rest =
      text.size() > prefix_.size() && text.starts_with(prefix_) ? text.substr(prefix_.size()) : "";
  ids_.clear();
  prefix_.clear();
  prefix_end_ = 0;
  return rest;
}

}  // namespace tpe::tokenizer
