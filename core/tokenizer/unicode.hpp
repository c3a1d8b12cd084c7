// UTF-8 and Unicode character properties as the Rust crates behind Hugging Face tokenizers see
// them (std's char methods, unicode_categories, unicode-normalization-alignments), on top of ICU.
// Owns: code point decoding, validation, lossy conversion, normalisation forms, graphemes.
// Internal to core/tokenizer.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace tpe::tokenizer::unicode {

// Length of the UTF-8 sequence starting with this byte (1 for a continuation byte, so that a
// loop over valid text always advances).
inline size_t sequence_length(unsigned char lead) {
  if (lead < 0xc0) return 1;
  if (lead < 0xe0) return 2;
  if (lead < 0xf0) return 3;
  return 4;
}

// Decodes the code point at text[pos] of valid UTF-8 and advances pos past it.
inline char32_t next(std::string_view text, size_t& pos) {
  const auto lead = static_cast<unsigned char>(text[pos]);
  const size_t len = sequence_length(lead);
  char32_t cp = len == 1   ? lead
                : len == 2 ? (lead & 0x1f)
                : len == 3 ? (lead & 0x0f)
                           : (lead & 0x07);
  for (size_t i = 1; i < len; ++i) {
    cp = (cp << 6) | (static_cast<unsigned char>(text[pos + i]) & 0x3f);
  }
  pos += len;
  return cp;
}

// Decodes the code point that ends at text[end] (exclusive) of valid UTF-8.
inline char32_t previous(std::string_view text, size_t end) {
  size_t start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xc0) == 0x80) --start;
  return next(text, start);
}

void append(std::string& out, char32_t cp);

// Offset of the first byte that is not part of valid UTF-8, or npos.
size_t invalid_utf8_at(std::string_view text);

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes U+FFFD.
std::string from_utf8_lossy(std::string_view bytes);

// Rust char::is_whitespace (White_Space property).
bool is_whitespace(char32_t c);
// Rust char::is_alphanumeric (Alphabetic or Nd/Nl/No).
bool is_alphanumeric(char32_t c);
// Rust char::is_numeric (Nd/Nl/No).
bool is_numeric(char32_t c);
// Rust char::is_alphabetic.
bool is_alphabetic(char32_t c);
// Rust regex's \w (Alphabetic, marks, Nd, Pc, joiners).
bool is_word(char32_t c);
// unicode_categories' is_punctuation (P*) and is_other (C*), with that crate's Unicode version:
// code points assigned later count as unassigned, i.e. other and not punctuation.
bool is_punctuation(char32_t c);
bool is_other(char32_t c);
// unicode_categories' is_mark_nonspacing (Mn).
bool is_mark_nonspacing(char32_t c);
// unicode-normalization-alignments' is_combining_mark (M*).
bool is_combining_mark(char32_t c);
// Rust char::to_lowercase, appended to out.
void append_lowercase(std::string& out, char32_t c);

enum class Form { nfc, nfd, nfkc, nfkd };
// Normalises valid UTF-8 text.
std::string normalize(std::string_view text, Form form);

// Calls f(grapheme) for each extended grapheme cluster of valid UTF-8 text.
template <typename F>
void for_each_grapheme(std::string_view text, F&& f);
// Byte lengths of the extended grapheme clusters of valid UTF-8 text, in order.
void grapheme_lengths(std::string_view text, std::basic_string<uint32_t>& lengths);

template <typename F>
void for_each_grapheme(std::string_view text, F&& f) {
  std::basic_string<uint32_t> lengths;
  grapheme_lengths(text, lengths);
  size_t pos = 0;
  for (const uint32_t len : lengths) {
    f(text.substr(pos, len));
    pos += len;
  }
}

}  // namespace tpe::tokenizer::unicode
