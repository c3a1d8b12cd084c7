// Normalizers, pre-tokenizers, decoders and post-processors (tokenizers' normalizers/,
// pre_tokenizers/, decoders/, processors/), and what they share.
#include <algorithm>
#include <array>
#include <map>

#include "core/tokenizer/components.hpp"
#include "core/tokenizer/regex.hpp"
#include "core/tokenizer/unicode.hpp"

namespace tpe::tokenizer::detail {

namespace u = unicode;

// ---------------------------------------------------------------------------------------------
// JSON access

const json& member(const json& object, const char* key, const Where& where) {
  if (!object.is_object()) where.fail("expected an object, got {}", object.type_name());
  const auto it = object.find(key);
  if (it == object.end()) where.fail("missing key '{}'", key);
  return *it;
}

std::string get_string(const json& object, const char* key, const Where& where) {
  const json& value = member(object, key, where);
  if (!value.is_string()) where.at(key).fail("expected a string, got {}", value.type_name());
  return value.get<std::string>();
}

bool get_bool(const json& object, const char* key, bool fallback, const Where& where) {
  if (!object.is_object()) where.fail("expected an object, got {}", object.type_name());
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) where.at(key).fail("expected true or false, got {}", it->type_name());
  return it->get<bool>();
}

uint64_t get_uint(const json& object, const char* key, const Where& where) {
  const json& value = member(object, key, where);
  if (!value.is_number_unsigned())
    where.at(key).fail("expected a non-negative integer, got {}", value.dump());
  return value.get<uint64_t>();
}

std::string get_type(const json& object, const Where& where) {
  return get_string(object, "type", where);
}

char32_t get_char(const json& object, const char* key, const Where& where) {
  const std::string text = get_string(object, key, where);
  if (u::invalid_utf8_at(text) != std::string::npos) where.at(key).fail("not valid UTF-8");
  size_t pos = 0;
  if (text.empty() || (u::next(text, pos), pos != text.size())) {
    where.at(key).fail("expected one character, got '{}'", printable(text));
  }
  pos = 0;
  return u::next(text, pos);
}

Behavior get_behavior(const json& object, const Where& where) {
  const std::string name = get_string(object, "behavior", where);
  static const std::map<std::string, Behavior, std::less<>> names = {
      {"Removed", Behavior::removed},
      {"Isolated", Behavior::isolated},
      {"MergedWithPrevious", Behavior::merged_with_previous},
      {"MergedWithNext", Behavior::merged_with_next},
      {"Contiguous", Behavior::contiguous}};
  const auto it = names.find(name);
  if (it == names.end()) where.at("behavior").fail("unknown split behavior '{}'", printable(name));
  return it->second;
}

// A {"String": s} or {"Regex": r} pattern.
struct Pattern {
  std::string literal;
  std::unique_ptr<Regex> regex;

  Pattern(const json& config, const Where& where) {
    if (config.is_object() && config.contains("Regex") && config["Regex"].is_string()) {
      regex = std::make_unique<Regex>(config["Regex"].get<std::string>(),
                                      where.file + ": " + where.path);
    } else if (config.is_object() && config.contains("String") && config["String"].is_string()) {
      literal = config["String"].get<std::string>();
      if (u::invalid_utf8_at(literal) != std::string::npos)
        where.fail("pattern is not valid UTF-8");
    } else {
      where.fail("expected {{\"String\": ...}} or {{\"Regex\": ...}}");
    }
  }

  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& matches) const {
    if (regex) {
      regex->find_all(text, matches);
      return;
    }
    matches.clear();
    // An empty string matches nothing (tokenizers' Pattern for &str).
    if (literal.empty()) return;
    for (size_t pos = text.find(literal); pos != std::string_view::npos;
         pos = text.find(literal, pos)) {
      matches.emplace_back(pos, pos + literal.size());
      pos += literal.size();
    }
  }
};

// Replaces every match of `pattern` by `content` (NormalizedString::replace).
void replace_all(Piece& piece, const Pattern& pattern, const std::string& content) {
  thread_local std::vector<std::pair<size_t, size_t>> matches;
  pattern.find_all(piece.text, matches);
  if (matches.empty()) return;
  std::string out;
  out.reserve(piece.text.size());
  size_t last = 0;
  for (const auto& [begin, end] : matches) {
    out.append(piece.text, last, begin - last);
    out += content;
    last = end;
  }
  out.append(piece.text, last);
  if (content.empty() && matches.front().first == 0 && matches.front().second > 0)
    piece.at_origin = false;
  piece.text = std::move(out);
}

// ---------------------------------------------------------------------------------------------
// Byte-level map

namespace {

// Replaces every occurrence of `from` in text.
void replace_in(std::string& text, std::string_view from, std::string_view to) {
  size_t pos = text.find(from);
  if (pos == std::string::npos) return;
  std::string out;
  size_t last = 0;
  for (; pos != std::string::npos; pos = text.find(from, last)) {
    out.append(text, last, pos - last);
    out += to;
    last = pos + from.size();
  }
  out.append(text, last);
  text = std::move(out);
}

struct ByteMap {
  std::array<std::string, 256> to_chars;
  std::array<int, 324> to_byte{};

  ByteMap() {
    to_byte.fill(-1);
    // GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest map to
    // U+0100 onwards in byte order.
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      const char32_t c = printable ? static_cast<char32_t>(b) : next++;
      u::append(to_chars[b], c);
      to_byte[c] = b;
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap map;
  return map;
}

}  // namespace

const std::string& byte_to_chars(unsigned char byte) { return byte_map().to_chars[byte]; }

int char_to_byte(char32_t c) { return c < 324 ? byte_map().to_byte[c] : -1; }

// ---------------------------------------------------------------------------------------------
// Normalizers

namespace {

// Keeps the characters for which keep(c) holds (NormalizedString::filter).
template <typename Keep>
void filter_chars(Piece& piece, Keep keep) {
  std::string out;
  out.reserve(piece.text.size());
  size_t pos = 0;
  bool kept_any = false;
  while (pos < piece.text.size()) {
    const size_t start = pos;
    const char32_t c = u::next(piece.text, pos);
    if (keep(c)) {
      out.append(piece.text, start, pos - start);
      kept_any = true;
    } else if (!kept_any) {
      piece.at_origin = false;
    }
  }
  piece.text = std::move(out);
}

void lowercase(Piece& piece) {
  std::string out;
  out.reserve(piece.text.size());
  size_t pos = 0;
  while (pos < piece.text.size()) u::append_lowercase(out, u::next(piece.text, pos));
  piece.text = std::move(out);
}

bool is_ascii(std::string_view text) {
  return std::all_of(text.begin(), text.end(),
                     [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(u::Form form) : form_(form) {}
  void normalize(Piece& piece) const override { piece.text = u::normalize(piece.text, form_); }

 private:
  u::Form form_;
};

class Lowercase final : public Normalizer {
 public:
  void normalize(Piece& piece) const override { lowercase(piece); }
};

class StripAccents final : public Normalizer {
 public:
  void normalize(Piece& piece) const override {
    if (!is_ascii(piece.text))
      filter_chars(piece, [](char32_t c) { return !u::is_combining_mark(c); });
  }
};

class Strip final : public Normalizer {
 public:
  Strip(bool left, bool right) : left_(left), right_(right) {}
  void normalize(Piece& piece) const override {
    std::string_view text = piece.text;
    if (right_) {
      while (!text.empty()) {
        const char32_t c = u::previous(text, text.size());
        if (!u::is_whitespace(c)) break;
        size_t start = text.size() - 1;
        while ((static_cast<unsigned char>(text[start]) & 0xc0) == 0x80) --start;
        text = text.substr(0, start);
      }
    }
    size_t skip = 0;
    if (left_) {
      while (skip < text.size()) {
        size_t pos = skip;
        if (!u::is_whitespace(u::next(text, pos))) break;
        skip = pos;
      }
    }
    if (skip > 0 && skip < text.size()) piece.at_origin = false;
    piece.text = std::string(text.substr(skip));
  }

 private:
  bool left_;
  bool right_;
};

class Replace final : public Normalizer {
 public:
  Replace(const json& config, const Where& where)
      : pattern_(member(config, "pattern", where), where.at("pattern")),
        content_(get_string(config, "content", where)) {}
  void normalize(Piece& piece) const override { replace_all(piece, pattern_, content_); }

 private:
  Pattern pattern_;
  std::string content_;
};

class Prepend final : public Normalizer {
 public:
  explicit Prepend(std::string prepend) : prepend_(std::move(prepend)) {}
  void normalize(Piece& piece) const override {
    if (!piece.text.empty()) piece.text = prepend_ + piece.text;
  }

 private:
  std::string prepend_;
};

bool is_chinese_char(char32_t c) {
  return (c >= 0x4e00 && c <= 0x9fff) || (c >= 0x3400 && c <= 0x4dbf) ||
         (c >= 0x20000 && c <= 0x2a6df) || (c >= 0x2a700 && c <= 0x2b73f) ||
         (c >= 0x2b740 && c <= 0x2b81f) || (c >= 0x2b920 && c <= 0x2ceaf) ||
         (c >= 0xf900 && c <= 0xfaff) || (c >= 0x2f800 && c <= 0x2fa1f);
}

class BertNormalizer final : public Normalizer {
 public:
  BertNormalizer(const json& config, const Where& where)
      : clean_text_(get_bool(config, "clean_text", true, where)),
        chinese_chars_(get_bool(config, "handle_chinese_chars", true, where)),
        lowercase_(get_bool(config, "lowercase", true, where)),
        strip_accents_(get_bool(config, "strip_accents", lowercase_, where)) {}

  void normalize(Piece& piece) const override {
    if (clean_text_) {
      std::string out;
      out.reserve(piece.text.size());
      size_t pos = 0;
      bool kept_any = false;
      while (pos < piece.text.size()) {
        const size_t start = pos;
        const char32_t c = u::next(piece.text, pos);
        const bool control = c != '\t' && c != '\n' && c != '\r' && u::is_other(c);
        if (c == 0 || c == 0xfffd || control) {
          if (!kept_any) piece.at_origin = false;
          continue;
        }
        kept_any = true;
        if (c == '\t' || c == '\n' || c == '\r' || u::is_whitespace(c)) {
          out += ' ';
        } else {
          out.append(piece.text, start, pos - start);
        }
      }
      piece.text = std::move(out);
    }
    if (chinese_chars_ && !is_ascii(piece.text)) {
      std::string out;
      out.reserve(piece.text.size() + 16);
      size_t pos = 0;
      while (pos < piece.text.size()) {
        const size_t start = pos;
        const char32_t c = u::next(piece.text, pos);
        if (is_chinese_char(c)) out += ' ';
        out.append(piece.text, start, pos - start);
        if (is_chinese_char(c)) out += ' ';
      }
      piece.text = std::move(out);
    }
    if (strip_accents_ && !is_ascii(piece.text)) {
      piece.text = u::normalize(piece.text, u::Form::nfd);
      filter_chars(piece, [](char32_t c) { return !u::is_mark_nonspacing(c); });
    }
    if (lowercase_) lowercase(piece);
  }

 private:
  bool clean_text_;
  bool chinese_chars_;
  bool lowercase_;
  bool strip_accents_;
};

// SentencePiece's compiled character map: a Darts double-array trie over UTF-8 input, whose
// values index NUL-terminated replacement strings (spm_precompiled).
class Precompiled final : public Normalizer {
 public:
  Precompiled(const json& config, const Where& where) {
    const std::string encoded = get_string(config, "precompiled_charsmap", where);
    const std::string data = base64_decode(encoded, where.at("precompiled_charsmap"));
    if (data.empty()) return;  // an empty map normalises nothing
    if (data.size() < 4)
      where.at("precompiled_charsmap").fail("truncated charsmap ({} bytes)", data.size());
    const uint32_t trie_size = static_cast<uint32_t>(static_cast<unsigned char>(data[0])) |
                               static_cast<uint32_t>(static_cast<unsigned char>(data[1])) << 8 |
                               static_cast<uint32_t>(static_cast<unsigned char>(data[2])) << 16 |
                               static_cast<uint32_t>(static_cast<unsigned char>(data[3])) << 24;
    if (trie_size % 4 != 0 || trie_size > data.size() - 4) {
      where.at("precompiled_charsmap")
          .fail("trie size {} does not fit the {} bytes of the charsmap", trie_size, data.size());
    }
    units_.resize(trie_size / 4);
    for (size_t i = 0; i < units_.size(); ++i) {
      const auto* p = reinterpret_cast<const unsigned char*>(data.data() + 4 + 4 * i);
      units_[i] = p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24;
    }
    normalized_ = data.substr(4 + trie_size);
    if (u::invalid_utf8_at(normalized_) != std::string::npos) {
      where.at("precompiled_charsmap").fail("replacement strings are not valid UTF-8");
    }
  }

  void normalize(Piece& piece) const override {
    if (units_.empty()) return;
    std::string out;
    out.reserve(piece.text.size());
    bool modified = false;
    bool first = true;
    // tokenizers looks a whole grapheme up first (SentencePiece matches longer keys than one
    // character), then each of its characters.
    u::for_each_grapheme(piece.text, [&](std::string_view grapheme) {
      const size_t before = out.size();
      if (grapheme.size() < 6) {
        if (const auto norm = transform(grapheme)) {
          modified = true;
          out += *norm;
          if (first && out.size() == before) piece.at_origin = false;
          first = false;
          return;
        }
      }
      size_t pos = 0;
      while (pos < grapheme.size()) {
        const size_t start = pos;
        u::next(grapheme, pos);
        const std::string_view part = grapheme.substr(start, pos - start);
        if (const auto norm = transform(part)) {
          modified = true;
          out += *norm;
        } else {
          out += part;
        }
      }
      if (first && out.size() == before) piece.at_origin = false;
      first = false;
    });
    if (modified) piece.text = std::move(out);
  }

 private:
  static std::string base64_decode(const std::string& text, const Where& where) {
    std::string out;
    out.reserve(text.size() * 3 / 4);
    uint32_t buffer = 0;
    int bits = 0;
    for (const char c : text) {
      int value = -1;
      if (c >= 'A' && c <= 'Z') value = c - 'A';
      if (c >= 'a' && c <= 'z') value = c - 'a' + 26;
      if (c >= '0' && c <= '9') value = c - '0' + 52;
      if (c == '+') value = 62;
      if (c == '/') value = 63;
      if (c == '=') break;
      if (value < 0) where.fail("not base64 (character '{}')", printable(std::string(1, c)));
      buffer = (buffer << 6) | static_cast<uint32_t>(value);
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        out += static_cast<char>((buffer >> bits) & 0xff);
      }
    }
    return out;
  }

  // The replacement of the shortest key that prefixes `chunk` (spm_precompiled's transform
  // takes the first result of its common-prefix search).
  std::optional<std::string_view> transform(std::string_view chunk) const {
    auto offset = [](uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); };
    size_t node = offset(units_[0]);
    for (const char ch : chunk) {
      const auto c = static_cast<unsigned char>(ch);
      if (c == 0) break;
      node ^= c;
      if (node >= units_.size()) return std::nullopt;
      const uint32_t unit = units_[node];
      if ((unit & ((1u << 31) | 0xff)) != c) return std::nullopt;
      node ^= offset(unit);
      if (node >= units_.size()) return std::nullopt;
      if ((unit >> 8) & 1) {
        const size_t index = units_[node] & ((1u << 31) - 1);
        if (index >= normalized_.size()) return std::string_view();
        const size_t end = normalized_.find('\0', index);
        const std::string_view replacement =
            std::string_view(normalized_)
                .substr(index, end == std::string::npos ? std::string::npos : end - index);
        // A replacement cut inside a character would make invalid text: leave the chunk as is.
        if (u::invalid_utf8_at(replacement) != std::string::npos) return std::nullopt;
        return replacement;
      }
    }
    return std::nullopt;
  }

  std::vector<uint32_t> units_;
  std::string normalized_;
};

class ByteLevelNormalizer final : public Normalizer {
 public:
  void normalize(Piece& piece) const override {
    std::string out;
    out.reserve(piece.text.size() * 2);
    for (const char c : piece.text) out += byte_to_chars(static_cast<unsigned char>(c));
    piece.text = std::move(out);
  }
};

class NormalizerSequence final : public Normalizer {
 public:
  explicit NormalizerSequence(std::vector<std::unique_ptr<Normalizer>> steps)
      : steps_(std::move(steps)) {}
  void normalize(Piece& piece) const override {
    for (const auto& step : steps_) step->normalize(piece);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const json& config, const Where& where) {
  const std::string type = get_type(config, where);
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(u::Form::nfc);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(u::Form::nfd);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(u::Form::nfkc);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(u::Form::nfkd);
  if (type == "Lowercase") return std::make_unique<Lowercase>();
  if (type == "StripAccents") return std::make_unique<StripAccents>();
  if (type == "Strip") {
    return std::make_unique<Strip>(get_bool(config, "strip_left", true, where),
                                   get_bool(config, "strip_right", true, where));
  }
  if (type == "Replace") return std::make_unique<Replace>(config, where);
  if (type == "Prepend") return std::make_unique<Prepend>(get_string(config, "prepend", where));
  if (type == "BertNormalizer") return std::make_unique<BertNormalizer>(config, where);
  if (type == "Precompiled") return std::make_unique<Precompiled>(config, where);
  if (type == "ByteLevel") return std::make_unique<ByteLevelNormalizer>();
  if (type == "Sequence") {
    const json& list = member(config, "normalizers", where);
    if (!list.is_array()) where.at("normalizers").fail("expected a list");
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (size_t i = 0; i < list.size(); ++i)
      steps.push_back(make_normalizer(list[i], where.at("normalizers").at(i)));
    return std::make_unique<NormalizerSequence>(std::move(steps));
  }
  where.fail("unknown normalizer type '{}'", printable(type));
}

// ---------------------------------------------------------------------------------------------
// Splitting

void split_piece(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches,
                 bool invert, Behavior behavior, std::vector<Piece>& out) {
  const std::string& text = piece.text;
  if (text.empty()) return;
  // (range, is_match) covering the whole text, as tokenizers' Pattern::find_matches.
  struct Part {
    size_t begin;
    size_t end;
    bool match;
  };
  thread_local std::vector<Part> parts;
  parts.clear();
  size_t prev = 0;
  for (const auto& [begin, end] : matches) {
    if (begin == end) continue;
    if (prev != begin) parts.push_back({prev, begin, invert});
    parts.push_back({begin, end, !invert});
    prev = end;
  }
  if (prev != text.size()) parts.push_back({prev, text.size(), invert});

  auto emit = [&](size_t begin, size_t end) {
    if (begin < end)
      out.push_back({text.substr(begin, end - begin), piece.at_origin && begin == 0});
  };
  switch (behavior) {
    case Behavior::removed:
      for (const Part& p : parts) {
        if (!p.match) emit(p.begin, p.end);
      }
      break;
    case Behavior::isolated:
      for (const Part& p : parts) emit(p.begin, p.end);
      break;
    case Behavior::merged_with_previous: {
      // A match joins the piece before it.
      thread_local std::vector<std::pair<size_t, size_t>> merged;
      merged.clear();
      bool previous_match = false;
      for (const Part& p : parts) {
        if (p.match && !previous_match && !merged.empty()) {
          merged.back().second = p.end;
        } else {
          merged.emplace_back(p.begin, p.end);
        }
        previous_match = p.match;
      }
      for (const auto& [b, e] : merged) emit(b, e);
      break;
    }
    case Behavior::merged_with_next: {
      thread_local std::vector<std::pair<size_t, size_t>> merged;
      merged.clear();
      bool previous_match = false;
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->match && !previous_match && !merged.empty()) {
          merged.back().first = it->begin;
        } else {
          merged.emplace_back(it->begin, it->end);
        }
        previous_match = it->match;
      }
      for (auto it = merged.rbegin(); it != merged.rend(); ++it) emit(it->first, it->second);
      break;
    }
    case Behavior::contiguous: {
      thread_local std::vector<std::pair<size_t, size_t>> merged;
      merged.clear();
      bool previous_match = false;
      for (const Part& p : parts) {
        if (p.match == previous_match && !merged.empty()) {
          merged.back().second = p.end;
        } else {
          merged.emplace_back(p.begin, p.end);
        }
        previous_match = p.match;
      }
      for (const auto& [b, e] : merged) emit(b, e);
      break;
    }
  }
}

namespace {

// Each character for which pred(c) holds is a match of its own (tokenizers' Pattern for
// Fn(char) -> bool).
template <typename Pred>
void char_matches(std::string_view text, Pred pred,
                  std::vector<std::pair<size_t, size_t>>& matches) {
  matches.clear();
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    if (pred(u::next(text, pos))) matches.emplace_back(start, pos);
  }
}

// Applies split(piece, out) to every piece.
template <typename Split>
void split_all(std::vector<Piece>& pieces, std::vector<Piece>& scratch, Split split) {
  scratch.clear();
  for (const Piece& piece : pieces) split(piece, scratch);
  pieces.swap(scratch);
}

// char::is_ascii_punctuation (which takes ASCII symbols such as $ + < too) or P*.
bool is_bert_punctuation(char32_t c) {
  if (c < 0x80)
    return (c >= 0x21 && c <= 0x2f) || (c >= 0x3a && c <= 0x40) || (c >= 0x5b && c <= 0x60) ||
           (c >= 0x7b && c <= 0x7e);
  return u::is_punctuation(c);
}

const Regex& gpt2_regex() {
  static const Regex regex(
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)",
      "ByteLevel pre-tokenizer");
  return regex;
}

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex)
      : add_prefix_space_(add_prefix_space), use_regex_(use_regex) {}

  void pre_tokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    thread_local std::vector<std::pair<size_t, size_t>> matches;
    split_all(pieces, scratch, [&](const Piece& original, std::vector<Piece>& out) {
      Piece piece = original;
      if (add_prefix_space_ && !piece.text.starts_with(' ')) piece.text = " " + piece.text;
      if (!use_regex_) {
        if (!piece.text.empty()) out.push_back(std::move(piece));
        return;
      }
      gpt2_regex().find_all(piece.text, matches);
      split_piece(piece, matches, false, Behavior::isolated, out);
    });
    for (Piece& piece : pieces) {
      std::string mapped;
      mapped.reserve(piece.text.size() + piece.text.size() / 4);
      for (const char c : piece.text) mapped += byte_to_chars(static_cast<unsigned char>(c));
      piece.text = std::move(mapped);
    }
  }

 private:
  bool add_prefix_space_;
  bool use_regex_;
};

class Split final : public PreTokenizer {
 public:
  Split(const json& config, const Where& where)
      : pattern_(member(config, "pattern", where), where.at("pattern")),
        behavior_(get_behavior(config, where)),
        invert_(get_bool(config, "invert", false, where)) {}

  void pre_tokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    thread_local std::vector<std::pair<size_t, size_t>> matches;
    split_all(pieces, scratch, [&](const Piece& piece, std::vector<Piece>& out) {
      pattern_.find_all(piece.text, matches);
      split_piece(piece, matches, invert_, behavior_, out);
    });
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

enum class PrependScheme { always, first, never };

PrependScheme get_prepend_scheme(const json& config, const Where& where) {
  if (config.contains("prepend_scheme") && !config["prepend_scheme"].is_null()) {
    const std::string scheme = get_string(config, "prepend_scheme", where);
    if (scheme == "always") return PrependScheme::always;
    if (scheme == "first") return PrependScheme::first;
    if (scheme == "never") return PrependScheme::never;
    where.at("prepend_scheme").fail("unknown prepend_scheme '{}'", printable(scheme));
  }
  // Files written before tokenizers 0.14 have add_prefix_space instead.
  return get_bool(config, "add_prefix_space", true, where) ? PrependScheme::always
                                                           : PrependScheme::never;
}

class Metaspace final : public PreTokenizer {
 public:
  Metaspace(const json& config, const Where& where)
      : scheme_(get_prepend_scheme(config, where)), split_(get_bool(config, "split", true, where)) {
    u::append(replacement_, get_char(config, "replacement", where));
  }

  void pre_tokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    thread_local std::vector<std::pair<size_t, size_t>> matches;
    split_all(pieces, scratch, [&](const Piece& original, std::vector<Piece>& out) {
      Piece piece{std::string(), original.at_origin};
      piece.text.reserve(original.text.size() + 8);
      for (const char c : original.text) {
        if (c == ' ') {
          piece.text += replacement_;
        } else {
          piece.text += c;
        }
      }
      const bool prepend =
          scheme_ == PrependScheme::always || (scheme_ == PrependScheme::first && piece.at_origin);
      if (prepend && !piece.text.starts_with(replacement_)) piece.text = replacement_ + piece.text;
      if (!split_) {
        if (!piece.text.empty()) out.push_back(std::move(piece));
        return;
      }
      matches.clear();
      for (size_t pos = piece.text.find(replacement_); pos != std::string::npos;
           pos = piece.text.find(replacement_, pos + replacement_.size())) {
        matches.emplace_back(pos, pos + replacement_.size());
      }
      split_piece(piece, matches, false, Behavior::merged_with_next, out);
    });
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

class Whitespace final : public PreTokenizer {
 public:
  void pre_tokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    split_all(pieces, scratch, [&](const Piece& piece, std::vector<Piece>& out) {
      const std::string& text = piece.text;
      size_t pos = 0;
      // Runs of word characters and runs of other non-space characters; spaces are dropped.
      int run = 0;  // 0 none, 1 word, 2 other
      size_t run_start = 0;
      auto close = [&](size_t end) {
        if (run != 0)
          out.push_back(
              {text.substr(run_start, end - run_start), piece.at_origin && run_start == 0});
        run = 0;
      };
      while (pos < text.size()) {
        const size_t start = pos;
        const char32_t c = u::next(text, pos);
        const int kind = u::is_word(c) ? 1 : u::is_whitespace(c) ? 0 : 2;
        if (kind != run) {
          close(start);
          run = kind;
          run_start = start;
        }
      }
      close(text.size());
    });
  }
};

template <typename Pred>
class CharSplit final : public PreTokenizer {
 public:
  CharSplit(Pred pred, Behavior behavior) : pred_(pred), behavior_(behavior) {}
  void pre_tokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    thread_local std::vector<std::pair<size_t, size_t>> matches;
    split_all(pieces, scratch, [&](const Piece& piece, std::vector<Piece>& out) {
      char_matches(piece.text, pred_, matches);
      split_piece(piece, matches, false, behavior_, out);
    });
  }

 private:
  Pred pred_;
  Behavior behavior_;
};

template <typename Pred>
std::unique_ptr<PreTokenizer> char_split(Pred pred, Behavior behavior) {
  return std::make_unique<CharSplit<Pred>>(pred, behavior);
}

class PreTokenizerSequence final : public PreTokenizer {
 public:
  explicit PreTokenizerSequence(std::vector<std::unique_ptr<PreTokenizer>> steps)
      : steps_(std::move(steps)) {}
  void pre_tokenize(std::vector<Piece>& pieces, std::vector<Piece>& scratch) const override {
    for (const auto& step : steps_) step->pre_tokenize(pieces, scratch);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

}  // namespace

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& config, const Where& where) {
  const std::string type = get_type(config, where);
  if (type == "ByteLevel") {
    return std::make_unique<ByteLevelPreTokenizer>(
        get_bool(config, "add_prefix_space", true, where),
        get_bool(config, "use_regex", true, where));
  }
  if (type == "Split") return std::make_unique<Split>(config, where);
  if (type == "Metaspace") return std::make_unique<Metaspace>(config, where);
  if (type == "Whitespace") return std::make_unique<Whitespace>();
  if (type == "WhitespaceSplit") return char_split(u::is_whitespace, Behavior::removed);
  if (type == "Punctuation") {
    const Behavior behavior =
        config.contains("behavior") ? get_behavior(config, where) : Behavior::isolated;
    return char_split(is_bert_punctuation, behavior);
  }
  if (type == "BertPreTokenizer") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    steps.push_back(char_split(u::is_whitespace, Behavior::removed));
    steps.push_back(char_split(is_bert_punctuation, Behavior::isolated));
    return std::make_unique<PreTokenizerSequence>(std::move(steps));
  }
  if (type == "Digits") {
    return char_split(u::is_numeric, get_bool(config, "individual_digits", false, where)
                                         ? Behavior::isolated
                                         : Behavior::contiguous);
  }
  if (type == "CharDelimiterSplit") {
    const char32_t delimiter = get_char(config, "delimiter", where);
    return char_split([delimiter](char32_t c) { return c == delimiter; }, Behavior::removed);
  }
  if (type == "Sequence") {
    const json& list = member(config, "pretokenizers", where);
    if (!list.is_array()) where.at("pretokenizers").fail("expected a list");
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    for (size_t i = 0; i < list.size(); ++i) {
      steps.push_back(make_pre_tokenizer(list[i], where.at("pretokenizers").at(i)));
    }
    return std::make_unique<PreTokenizerSequence>(std::move(steps));
  }
  where.fail("unknown pre-tokenizer type '{}'", printable(type));
}

// ---------------------------------------------------------------------------------------------
// Decoders

namespace {

class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& token : tokens) {
      const size_t mark = bytes.size();
      size_t pos = 0;
      bool mapped = true;
      while (pos < token.size()) {
        const int byte = char_to_byte(u::next(token, pos));
        if (byte < 0) {
          mapped = false;
          break;
        }
        bytes += static_cast<char>(byte);
      }
      // A token with a character outside the map is taken as its own UTF-8.
      if (!mapped) {
        bytes.resize(mark);
        bytes += token;
      }
    }
    tokens.assign(1, u::from_utf8_lossy(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(const json& config, const Where& where)
      : scheme_(get_prepend_scheme(config, where)) {
    u::append(replacement_, get_char(config, "replacement", where));
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& token = tokens[i];
      if (token.find(replacement_) == std::string::npos) continue;
      // Every replacement character of the first token goes (not only a leading one), as in
      // tokenizers.
      const std::string with = i == 0 && scheme_ != PrependScheme::never ? "" : " ";
      replace_in(token, replacement_, with);
    }
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
};

class WordPieceDecoder final : public Decoder {
 public:
  WordPieceDecoder(std::string prefix, bool cleanup)
      : prefix_(std::move(prefix)), cleanup_(cleanup) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& token = tokens[i];
      if (i != 0) {
        // replacen(prefix, "", 1): the first occurrence anywhere, if the token starts with it.
        if (token.starts_with(prefix_)) {
          token.erase(0, prefix_.size());
        } else {
          token = " " + token;
        }
      }
      if (cleanup_) cleanup(token);
    }
  }

 private:
  static void cleanup(std::string& token) {
    replace_in(token, " .", ".");
    replace_in(token, " ?", "?");
    replace_in(token, " !", "!");
    replace_in(token, " ,", ",");
    replace_in(token, " ' ", "'");
    replace_in(token, " n't", "n't");
    replace_in(token, " 'm", "'m");
    replace_in(token, " do not", " don't");
    replace_in(token, " 's", "'s");
    replace_in(token, " 've", "'ve");
    replace_in(token, " 're", "'re");
  }

  std::string prefix_;
  bool cleanup_;
};

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string bytes;
    size_t byte_tokens = 0;
    auto flush = [&] {
      if (byte_tokens == 0) return;
      if (u::invalid_utf8_at(bytes) == std::string::npos) {
        out.push_back(bytes);
      } else {
        for (size_t i = 0; i < byte_tokens; ++i) out.emplace_back("\xef\xbf\xbd");
      }
      bytes.clear();
      byte_tokens = 0;
    };
    for (std::string& token : tokens) {
      const int byte = parse_byte(token);
      if (byte >= 0) {
        bytes += static_cast<char>(byte);
        ++byte_tokens;
      } else {
        flush();
        out.push_back(std::move(token));
      }
    }
    flush();
    tokens = std::move(out);
  }

 private:
  // "<0xHH>" -> HH (u8::from_str_radix, which also takes "+H").
  static int parse_byte(std::string_view token) {
    if (token.size() != 6 || !token.starts_with("<0x") || token[5] != '>') return -1;
    if (token[3] == '+') return hex_digit(token[4]);
    const int hi = hex_digit(token[3]);
    const int lo = hex_digit(token[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }
};

class FuseDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const std::string& token : tokens) all += token;
    tokens.assign(1, std::move(all));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& token : tokens) {
      size_t begin = 0;
      for (size_t i = 0; i < start_ && begin < token.size(); ++i) {
        size_t pos = begin;
        if (u::next(token, pos) != content_) break;
        begin = pos;
      }
      size_t end = token.size();
      for (size_t i = 0; i < stop_ && end > begin; ++i) {
        if (u::previous(token, end) != content_) break;
        --end;
        while (end > begin && (static_cast<unsigned char>(token[end]) & 0xc0) == 0x80) --end;
      }
      token = token.substr(begin, end - begin);
    }
  }

 private:
  char32_t content_;
  size_t start_;
  size_t stop_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(const json& config, const Where& where)
      : pattern_(member(config, "pattern", where), where.at("pattern")),
        content_(get_string(config, "content", where)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    Piece piece;
    for (std::string& token : tokens) {
      piece.text = std::move(token);
      replace_all(piece, pattern_, content_);
      token = std::move(piece.text);
    }
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class BpeDecoder final : public Decoder {
 public:
  explicit BpeDecoder(std::string suffix) : suffix_(std::move(suffix)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    if (suffix_.empty()) return;
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& token = tokens[i];
      const std::string_view with = i + 1 == tokens.size() ? "" : " ";
      replace_in(token, suffix_, with);
    }
  }

 private:
  std::string suffix_;
};

class DecoderSequence final : public Decoder {
 public:
  explicit DecoderSequence(std::vector<std::unique_ptr<Decoder>> steps)
      : steps_(std::move(steps)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& step : steps_) step->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(const json& config, const Where& where) {
  const std::string type = get_type(config, where);
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") return std::make_unique<MetaspaceDecoder>(config, where);
  if (type == "WordPiece") {
    const std::string prefix =
        config.contains("prefix") ? get_string(config, "prefix", where) : "##";
    return std::make_unique<WordPieceDecoder>(prefix, get_bool(config, "cleanup", true, where));
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    return std::make_unique<StripDecoder>(get_char(config, "content", where),
                                          get_uint(config, "start", where),
                                          get_uint(config, "stop", where));
  }
  if (type == "Replace") return std::make_unique<ReplaceDecoder>(config, where);
  if (type == "BPEDecoder") {
    return std::make_unique<BpeDecoder>(
        config.contains("suffix") ? get_string(config, "suffix", where) : "</w>");
  }
  if (type == "Sequence") {
    const json& list = member(config, "decoders", where);
    if (!list.is_array()) where.at("decoders").fail("expected a list");
    std::vector<std::unique_ptr<Decoder>> steps;
    for (size_t i = 0; i < list.size(); ++i)
      steps.push_back(make_decoder(list[i], where.at("decoders").at(i)));
    return std::make_unique<DecoderSequence>(std::move(steps));
  }
  where.fail("unknown decoder type '{}'", printable(type));
}

// ---------------------------------------------------------------------------------------------
// Post-processors

namespace {

// ids of a [token, id] pair (BertProcessing, RobertaProcessing).
uint32_t pair_id(const json& config, const char* key, const Where& where) {
  const json& value = member(config, key, where);
  if (!value.is_array() || value.size() != 2 || !value[0].is_string() ||
      !value[1].is_number_unsigned() || value[1].get<uint64_t>() > UINT32_MAX) {
    where.at(key).fail("expected [token, id]");
  }
  return value[1].get<uint32_t>();
}

class BertProcessing final : public PostProcessor {
 public:
  BertProcessing(uint32_t cls, uint32_t sep, bool roberta)
      : cls_(cls), sep_(sep), roberta_(roberta) {}
  void process(const std::vector<uint32_t>& first, const std::vector<uint32_t>* second,
               std::vector<uint32_t>& out) const override {
    out.clear();
    out.push_back(cls_);
    out.insert(out.end(), first.begin(), first.end());
    out.push_back(sep_);
    if (second != nullptr) {
      if (roberta_) out.push_back(sep_);
      out.insert(out.end(), second->begin(), second->end());
      out.push_back(sep_);
    }
  }

 private:
  uint32_t cls_;
  uint32_t sep_;
  bool roberta_;
};

class TemplateProcessing final : public PostProcessor {
 public:
  TemplateProcessing(const json& config, const Where& where) {
    const json& specials = member(config, "special_tokens", where);
    if (!specials.is_object()) where.at("special_tokens").fail("expected an object");
    std::map<std::string, std::vector<uint32_t>, std::less<>> special_ids;
    for (const auto& [name, token] : specials.items()) {
      const Where at = where.at("special_tokens").at(name);
      const json& ids = member(token, "ids", at);
      if (!ids.is_array()) at.at("ids").fail("expected a list of ids");
      std::vector<uint32_t>& list = special_ids[name];
      for (const json& id : ids) {
        if (!id.is_number_unsigned() || id.get<uint64_t>() > UINT32_MAX)
          at.at("ids").fail("expected ids");
        list.push_back(id.get<uint32_t>());
      }
    }
    single_ = parse_template(member(config, "single", where), special_ids, where.at("single"));
    pair_ = parse_template(member(config, "pair", where), special_ids, where.at("pair"));
  }

  void process(const std::vector<uint32_t>& first, const std::vector<uint32_t>* second,
               std::vector<uint32_t>& out) const override {
    out.clear();
    for (const Item& item : second != nullptr ? pair_ : single_) {
      if (item.sequence == 0) {
        out.insert(out.end(), first.begin(), first.end());
      } else if (item.sequence == 1) {
        if (second != nullptr) out.insert(out.end(), second->begin(), second->end());
      } else {
        out.insert(out.end(), item.ids.begin(), item.ids.end());
      }
    }
  }

 private:
  struct Item {
    int sequence = -1;  // 0 for $A, 1 for $B, -1 for a special token
    std::vector<uint32_t> ids;
  };

  static std::vector<Item> parse_template(
      const json& list, const std::map<std::string, std::vector<uint32_t>, std::less<>>& specials,
      const Where& where) {
    if (!list.is_array()) where.fail("expected a list");
    std::vector<Item> items;
    for (size_t i = 0; i < list.size(); ++i) {
      const Where at = where.at(i);
      const json& piece = list[i];
      if (piece.is_object() && piece.contains("Sequence")) {
        const std::string id = get_string(piece["Sequence"], "id", at.at("Sequence"));
        if (id != "A" && id != "B") at.fail("unknown sequence '{}'", printable(id));
        items.push_back({id == "A" ? 0 : 1, {}});
      } else if (piece.is_object() && piece.contains("SpecialToken")) {
        const std::string id = get_string(piece["SpecialToken"], "id", at.at("SpecialToken"));
        const auto it = specials.find(id);
        if (it == specials.end())
          at.fail("special token '{}' is not in special_tokens", printable(id));
        items.push_back({-1, it->second});
      } else {
        at.fail("expected {{\"Sequence\": ...}} or {{\"SpecialToken\": ...}}");
      }
    }
    return items;
  }

  std::vector<Item> single_;
  std::vector<Item> pair_;
};

class NoProcessing final : public PostProcessor {
 public:
  void process(const std::vector<uint32_t>& first, const std::vector<uint32_t>* second,
               std::vector<uint32_t>& out) const override {
    out = first;
    if (second != nullptr) out.insert(out.end(), second->begin(), second->end());
  }
};

class ProcessorSequence final : public PostProcessor {
 public:
  explicit ProcessorSequence(std::vector<std::unique_ptr<PostProcessor>> steps)
      : steps_(std::move(steps)) {}
  void process(const std::vector<uint32_t>& first, const std::vector<uint32_t>* second,
               std::vector<uint32_t>& out) const override {
    // The first step joins a pair; the later ones see one sequence.
    std::vector<uint32_t> current = first;
    const std::vector<uint32_t>* pair = second;
    for (const auto& step : steps_) {
      step->process(current, pair, out);
      current.swap(out);
      pair = nullptr;
    }
    out.swap(current);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> steps_;
};

}  // namespace

std::unique_ptr<PostProcessor> make_post_processor(const json& config, const Where& where) {
  const std::string type = get_type(config, where);
  if (type == "TemplateProcessing") return std::make_unique<TemplateProcessing>(config, where);
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    return std::make_unique<BertProcessing>(
        pair_id(config, "cls", where), pair_id(config, "sep", where), type == "RobertaProcessing");
  }
  // ByteLevel post-processing only trims offsets.
  if (type == "ByteLevel") return std::make_unique<NoProcessing>();
  if (type == "Sequence") {
    const json& list = member(config, "processors", where);
    if (!list.is_array()) where.at("processors").fail("expected a list");
    std::vector<std::unique_ptr<PostProcessor>> steps;
    for (size_t i = 0; i < list.size(); ++i) {
      steps.push_back(make_post_processor(list[i], where.at("processors").at(i)));
    }
    return std::make_unique<ProcessorSequence>(std::move(steps));
  }
  where.fail("unknown post-processor type '{}'", printable(type));
}

}  // namespace tpe::tokenizer::detail
