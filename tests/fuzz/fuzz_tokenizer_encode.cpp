// Arbitrary text through the committed parity tokenizers (tests/tokenizer/data). The first byte
// picks the tokenizer, the rest is the text. Valid UTF-8 must encode; decode must give valid
// UTF-8; streaming decode must concatenate to decode; invalid UTF-8 must be a tpe::Error. The
// same bytes read as ids (4 bytes each) must decode without error.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "core/common/error.hpp"
#include "core/tokenizer/tokenizer.hpp"
#include "core/tokenizer/unicode.hpp"

namespace {

namespace u = tpe::tokenizer::unicode;

const std::vector<std::unique_ptr<tpe::tokenizer::Tokenizer>>& tokenizers() {
  static const auto all = [] {
    const auto data =
        std::filesystem::path(__FILE__).parent_path().parent_path() / "tokenizer" / "data";
    std::vector<std::unique_ptr<tpe::tokenizer::Tokenizer>> out;
    for (const char* name : {"gpt2_bpe", "llama3_bpe", "qwen2_bpe", "smollm2", "llama2_legacy",
                             "llama2_metaspace", "bert_uncased", "minilm", "t5_unigram",
                             "misc_wordlevel", "misc_charbpe", "misc_unigram"}) {
      out.push_back(std::make_unique<tpe::tokenizer::Tokenizer>(
          tpe::tokenizer::Tokenizer::load(data / name)));
    }
    return out;
  }();
  return all;
}

[[noreturn]] void die(const char* what, const std::string& detail) {
  std::fprintf(stderr, "%s: %s\n", what, detail.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const auto& tokenizer = *tokenizers()[data[0] % tokenizers().size()];
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  const bool valid = u::invalid_utf8_at(text) == std::string_view::npos;
  std::vector<uint32_t> ids;
  try {
    ids = tokenizer.encode(text);
    if (!valid) die("invalid UTF-8 encoded", tokenizer.source());
  } catch (const tpe::Error& e) {
    if (valid) die("valid text failed to encode", e.what());
    return 0;
  }
  for (const bool skip : {false, true}) {
    const std::string decoded = tokenizer.decode(ids, skip);
    if (u::invalid_utf8_at(decoded) != std::string::npos)
      die("decode gave invalid UTF-8", tokenizer.source());
    auto stream = tokenizer.incremental_decoder(skip);
    std::string streamed;
    for (const uint32_t id : ids) {
      const std::string piece = stream.step(id);
      if (u::invalid_utf8_at(piece) != std::string::npos)
        die("stream gave invalid UTF-8", tokenizer.source());
      streamed += piece;
    }
    streamed += stream.finish();
    if (streamed != decoded) die("stream differs from decode", tokenizer.source());
  }
  std::vector<uint32_t> raw(size / 4);
  if (!raw.empty()) std::memcpy(raw.data(), data, raw.size() * 4);
  for (uint32_t& id : raw) id %= static_cast<uint32_t>(tokenizer.vocab_size() + 8);
  auto stream = tokenizer.incremental_decoder();
  std::string streamed;
  for (const uint32_t id : raw) streamed += stream.step(id);
  streamed += stream.finish();
  if (u::invalid_utf8_at(tokenizer.decode(raw)) != std::string::npos)
    die("decode of ids gave invalid UTF-8", "");
  return 0;
}
