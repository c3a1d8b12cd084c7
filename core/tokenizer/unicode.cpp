#include "core/tokenizer/unicode.hpp"

#include <unicode/brkiter.h>
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/utext.h>

#include <memory>

#include "core/common/error.hpp"

namespace tpe::tokenizer::unicode {

namespace {

// The Rust crates Hugging Face tokenizers uses for these properties carry old tables:
// unicode_categories has Unicode 8.0, unicode-normalization-alignments 9.0 (found by probing
// tokenizers 0.23 with characters added in each later version). A character assigned later is
// not in their tables.
bool assigned_by(char32_t c, uint8_t major) {
  UVersionInfo age;
  u_charAge(static_cast<UChar32>(c), age);
  return age[0] <= major;
}

constexpr uint8_t unicode_categories_version = 8;
constexpr uint8_t normalization_alignments_version = 9;

}  // namespace

void append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

namespace {

// Length of the valid sequence at bytes[pos], 0 if the bytes there start an invalid sequence,
// and in `maximal` how many bytes form its maximal subpart (what from_utf8_lossy replaces by
// one U+FFFD). `truncated` is set when the sequence is a valid prefix cut by the end.
size_t valid_sequence(std::string_view bytes, size_t pos, size_t& maximal, bool& truncated) {
  const auto b0 = static_cast<unsigned char>(bytes[pos]);
  truncated = false;
  maximal = 1;
  if (b0 < 0x80) return 1;
  size_t len = 0;
  unsigned char lo = 0x80;
  unsigned char hi = 0xbf;
  if (b0 >= 0xc2 && b0 <= 0xdf) {
    len = 2;
  } else if (b0 >= 0xe0 && b0 <= 0xef) {
    len = 3;
    if (b0 == 0xe0) lo = 0xa0;
    if (b0 == 0xed) hi = 0x9f;
  } else if (b0 >= 0xf0 && b0 <= 0xf4) {
    len = 4;
    if (b0 == 0xf0) lo = 0x90;
    if (b0 == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  for (size_t i = 1; i < len; ++i) {
    if (pos + i >= bytes.size()) {
      truncated = true;
      return 0;
    }
    const auto b = static_cast<unsigned char>(bytes[pos + i]);
    const unsigned char low = i == 1 ? lo : 0x80;
    const unsigned char high = i == 1 ? hi : 0xbf;
    if (b < low || b > high) return 0;
    maximal = i + 1;
  }
  return len;
}

}  // namespace

size_t invalid_utf8_at(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    if (static_cast<unsigned char>(text[pos]) < 0x80) {
      ++pos;
      continue;
    }
    size_t maximal = 0;
    bool truncated = false;
    const size_t len = valid_sequence(text, pos, maximal, truncated);
    if (len == 0) return pos;
    pos += len;
  }
  return std::string_view::npos;
}

std::string from_utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t maximal = 0;
    bool truncated = false;
    const size_t len = valid_sequence(bytes, pos, maximal, truncated);
    if (len == 0) {
      out += "\xef\xbf\xbd";
      pos += maximal;
    } else {
      out.append(bytes.substr(pos, len));
      pos += len;
    }
  }
  return out;
}

bool is_whitespace(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0d);
  return u_isUWhiteSpace(static_cast<UChar32>(c));
}

bool is_alphabetic(char32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_ALPHABETIC);
}

bool is_numeric(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  const auto mask = U_GET_GC_MASK(static_cast<UChar32>(c));
  return (mask & (U_GC_ND_MASK | U_GC_NL_MASK | U_GC_NO_MASK)) != 0;
}

bool is_word(char32_t c) {
  if (c < 0x80) return is_alphabetic(c) || (c >= '0' && c <= '9') || c == '_';
  if (is_alphabetic(c)) return true;
  const auto mask = U_GET_GC_MASK(static_cast<UChar32>(c));
  return (mask & (U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK)) != 0 || c == 0x200c || c == 0x200d;
}

bool is_alphanumeric(char32_t c) { return is_alphabetic(c) || is_numeric(c); }

bool is_punctuation(char32_t c) {
  if (c < 0x80) return u_ispunct(static_cast<UChar32>(c));
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_P_MASK) != 0 &&
         assigned_by(c, unicode_categories_version);
}

bool is_other(char32_t c) {
  if (c < 0x80) return c < 0x20 || c == 0x7f;
  const auto mask = U_GET_GC_MASK(static_cast<UChar32>(c));
  return (mask & (U_GC_CC_MASK | U_GC_CF_MASK | U_GC_CS_MASK | U_GC_CO_MASK)) != 0 &&
         assigned_by(c, unicode_categories_version);
}

bool is_mark_nonspacing(char32_t c) {
  if (c < 0x80) return false;
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_MN_MASK) != 0 &&
         assigned_by(c, unicode_categories_version);
}

bool is_combining_mark(char32_t c) {
  if (c < 0x80) return false;
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_M_MASK) != 0 &&
         assigned_by(c, normalization_alignments_version);
}

void append_lowercase(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c);
  } else if (c == 0x130) {
    // The one unconditional multi-character lowercase mapping (SpecialCasing.txt): İ -> i̇.
    out += "i\xcc\x87";
  } else {
    append(out, static_cast<char32_t>(u_tolower(static_cast<UChar32>(c))));
  }
}

std::string normalize(std::string_view text, Form form) {
  bool ascii = true;
  for (const char c : text) {
    if (static_cast<unsigned char>(c) >= 0x80) {
      ascii = false;
      break;
    }
  }
  if (ascii) return std::string(text);
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* normalizer = nullptr;
  switch (form) {
    case Form::nfc:
      normalizer = icu::Normalizer2::getNFCInstance(status);
      break;
    case Form::nfd:
      normalizer = icu::Normalizer2::getNFDInstance(status);
      break;
    case Form::nfkc:
      normalizer = icu::Normalizer2::getNFKCInstance(status);
      break;
    case Form::nfkd:
      normalizer = icu::Normalizer2::getNFKDInstance(status);
      break;
  }
  TPE_CHECK(U_SUCCESS(status), "ICU normalizer: {}", u_errorName(status));
  const icu::StringPiece piece(text.data(), static_cast<int32_t>(text.size()));
  if (normalizer->isNormalizedUTF8(piece, status) && U_SUCCESS(status)) return std::string(text);
  status = U_ZERO_ERROR;
  std::string out;
  out.reserve(text.size() + text.size() / 4);
  icu::StringByteSink<std::string> sink(&out);
  normalizer->normalizeUTF8(0, piece, sink, nullptr, status);
  TPE_CHECK(U_SUCCESS(status), "ICU normalizeUTF8: {}", u_errorName(status));
  return out;
}

void grapheme_lengths(std::string_view text, std::basic_string<uint32_t>& lengths) {
  lengths.clear();
  UErrorCode status = U_ZERO_ERROR;
  // One break iterator per thread: creating one loads the rules, which costs far more than a
  // typical text.
  thread_local std::unique_ptr<icu::BreakIterator> iterator(
      icu::BreakIterator::createCharacterInstance(icu::Locale::getRoot(), status));
  TPE_CHECK(iterator && U_SUCCESS(status), "ICU character break iterator: {}", u_errorName(status));
  UText* utext = utext_openUTF8(nullptr, text.data(), static_cast<int64_t>(text.size()), &status);
  TPE_CHECK(U_SUCCESS(status), "ICU utext_openUTF8: {}", u_errorName(status));
  iterator->setText(utext, status);
  int32_t start = iterator->first();
  for (int32_t end = iterator->next(); end != icu::BreakIterator::DONE; end = iterator->next()) {
    lengths.push_back(static_cast<uint32_t>(end - start));
    start = end;
  }
  utext_close(utext);
}

}  // namespace tpe::tokenizer::unicode
