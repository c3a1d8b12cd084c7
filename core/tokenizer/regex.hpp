// Regular expressions as Hugging Face tokenizers runs them (Oniguruma, Ruby syntax), on PCRE2
// with JIT. Patterns are translated where the two engines disagree (see translate_onig).
// Internal to core/tokenizer.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tpe::tokenizer {

class Regex {
 public:
  // Throws tpe::Error "<where>: invalid regex '<pattern>': <PCRE2's message>".
  Regex(const std::string& pattern, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Non-overlapping matches as [start, end) byte ranges of valid UTF-8 `text`, left to right;
  // an empty match advances by one character, as Oniguruma's search loop does.
  void find_all(std::string_view text, std::vector<std::pair<size_t, size_t>>& matches) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Oniguruma's \s also matches U+0085, \w also matches marks and connector punctuation, and
// ^ / $ are line anchors; PCRE2's do not. Returns the PCRE2 pattern with the same meaning.
std::string translate_onig(std::string_view pattern);

}  // namespace tpe::tokenizer
