// Tokenizer: loader errors, UTF-8 handling, streaming decode, the Oniguruma-to-PCRE2 pattern
// translation. Parity with Hugging Face on a corpus is tests/tokenizer.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/common/error.hpp"
#include "core/tokenizer/regex.hpp"
#include "core/tokenizer/tokenizer.hpp"
#include "core/tokenizer/unicode.hpp"

namespace {

using tpe::tokenizer::Tokenizer;

// A small byte-level BPE as tokenizer.json text; `model` and `extra` replace parts of it.
std::string bpe_json(const std::string& merges = R"(["h e", "he l"])",
                     const std::string& extra = "") {
  return R"({"version": "1.0", "added_tokens": [{"id": 5, "content": "<s>", "special": true,
    "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}],)" +
         extra +
         R"("model": {"type": "BPE", "vocab": {"h": 0, "e": 1, "l": 2, "he": 3, "hel": 4, "<s>": 5},
    "merges": )" +
         merges + R"(, "unk_token": null}})";
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const tpe::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Tokenizer, BothMergeFormsGiveTheSameIds) {
  const Tokenizer strings = Tokenizer::from_json(bpe_json(), "t.json");
  const Tokenizer pairs = Tokenizer::from_json(bpe_json(R"([["h", "e"], ["he", "l"]])"), "t.json");
  EXPECT_EQ(strings.encode("hell"), (std::vector<uint32_t>{4, 2}));
  EXPECT_EQ(pairs.encode("hell"), strings.encode("hell"));
  EXPECT_EQ(strings.encode("<s>hel"), (std::vector<uint32_t>{5, 4}));
  EXPECT_EQ(strings.decode(std::vector<uint32_t>{5, 4, 2}, true),
            "hel l");  // no decoder: joined by spaces
}

TEST(Tokenizer, MalformedFilesNameFileAndKey) {
  EXPECT_EQ(error_of([] { Tokenizer::from_json(R"({"normalizer": null})", "a/tokenizer.json"); }),
            "a/tokenizer.json: missing key 'model'");
  EXPECT_EQ(error_of([] { Tokenizer::from_json(bpe_json(R"([1, 2])"), "t.json"); }),
            "t.json: model.merges[0]: expected \"a b\" or [\"a\", \"b\"], got number");
  EXPECT_EQ(error_of([] { Tokenizer::from_json(bpe_json(R"(["he"])"), "t.json"); }),
            "t.json: model.merges[0]: expected \"a b\", got 'he'");
  EXPECT_EQ(error_of([] { Tokenizer::from_json(bpe_json(R"(["h x"])"), "t.json"); }),
            "t.json: model.merges[0]: 'x' is not in the vocabulary");
  EXPECT_EQ(error_of([] {
              Tokenizer::from_json(bpe_json("[]", R"("normalizer": {"type": "Frobnicate"},)"),
                                   "t.json");
            }),
            "t.json: normalizer: unknown normalizer type 'Frobnicate'");
  EXPECT_EQ(
      error_of([] {
        Tokenizer::from_json(
            bpe_json(
                "[]",
                R"("pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Nope"}]},)"),
            "t.json");
      }),
      "t.json: pre_tokenizer.pretokenizers[0]: unknown pre-tokenizer type 'Nope'");
  EXPECT_EQ(error_of([] {
              Tokenizer::from_json(bpe_json("[]", R"("decoder": {"type": "X"},)"), "t.json");
            }),
            "t.json: decoder: unknown decoder type 'X'");
  EXPECT_EQ(error_of([] {
              Tokenizer::from_json(bpe_json("[]", R"("post_processor": {"type": "Y"},)"), "t.json");
            }),
            "t.json: post_processor: unknown post-processor type 'Y'");
  EXPECT_EQ(error_of([] { Tokenizer::from_json(R"({"model": {"type": "Nope"}})", "t.json"); }),
            "t.json: model: unknown model type 'Nope'");
  EXPECT_EQ(
      error_of([] {
        Tokenizer::from_json(
            bpe_json(
                "[]",
                R"("pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a"}, "behavior": "Isolated", "invert": false},)"),
            "t.json");
      }).substr(0, 58),
      "t.json: pre_tokenizer.pattern: invalid regex '(a': missing");
  EXPECT_EQ(error_of([] { Tokenizer::from_json("{\"model\": ", "t.json"); }).substr(0, 23),
            "t.json: not valid JSON:");
  EXPECT_EQ(error_of([] { Tokenizer::from_file("/nonexistent/tokenizer.json"); }),
            "/nonexistent/tokenizer.json: not found");
}

TEST(Tokenizer, InvalidUtf8InputIsAnError) {
  const Tokenizer tokenizer = Tokenizer::from_json(bpe_json(), "t.json");
  EXPECT_EQ(error_of([&] { tokenizer.encode("he\xc3(l"); }),
            "t.json: cannot encode: the text is not valid UTF-8 (byte 2 of 5)");
  EXPECT_EQ(error_of([&] { tokenizer.encode("\xed\xa0\x80"); }),  // a surrogate
            "t.json: cannot encode: the text is not valid UTF-8 (byte 0 of 3)");
}

TEST(Tokenizer, EmbeddingSizeMismatch) {
  const Tokenizer tokenizer = Tokenizer::from_json(bpe_json(), "t.json");
  EXPECT_EQ(tokenizer.vocab_size(), 6u);
  tokenizer.check_embedding_size(6);
  tokenizer.check_embedding_size(64);  // models pad their embedding
  EXPECT_EQ(error_of([&] { tokenizer.check_embedding_size(5); }),
            "t.json: the tokenizer has 6 ids but the model's embedding has 5 rows (config.json "
            "vocab_size); "
            "is this the model's own tokenizer?");
}

TEST(Tokenizer, LoadTakesSpecialTokensFromTokenizerConfig) {
  const auto dir = std::filesystem::temp_directory_path() / "tpe_tokenizer_load_test";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << bpe_json();
  std::ofstream(dir / "tokenizer_config.json")
      << R"({"bos_token": "<s>", "eos_token": {"content": "</s>"},
    "add_bos_token": true})";
  const Tokenizer tokenizer = Tokenizer::load(dir);
  EXPECT_EQ(tokenizer.bos_token_id(), 5u);
  EXPECT_EQ(tokenizer.eos_token_id(), 6u);  // a new id after the vocabulary
  EXPECT_TRUE(tokenizer.is_special(6));
  EXPECT_EQ(tokenizer.encode("he</s>"), (std::vector<uint32_t>{3, 6}));
  std::ofstream(dir / "tokenizer_config.json") << R"({"bos_token": 3})";
  EXPECT_EQ(error_of([&] { Tokenizer::load(dir); }),
            (dir / "tokenizer_config.json").string() +
                ": bos_token: expected a token string or object, got number");
  std::filesystem::remove_all(dir);
}

TEST(Tokenizer, StreamingNeverSplitsACharacter) {
  // Byte-level tokens: "é" is two byte tokens, "😀" four.
  const std::string json =
      R"({"model": {"type": "BPE", "vocab": {"Ã": 0, "©": 1, "ð": 2, "ĺ": 3, "Ģ": 4, "a": 5, "Ł": 6},
    "merges": []}, "decoder": {"type": "ByteLevel"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false}})";
  const Tokenizer tokenizer = Tokenizer::from_json(json, "t.json");
  const std::vector<uint32_t> ids = tokenizer.encode(
      "a\xc3\xa9\xf0\x9f\x98\x80"
      "a");
  ASSERT_EQ(ids, (std::vector<uint32_t>{5, 0, 1, 2, 6, 3, 4, 5}));
  auto stream = tokenizer.incremental_decoder();
  std::vector<std::string> pieces;
  for (const uint32_t id : ids) pieces.push_back(stream.step(id));
  EXPECT_EQ(pieces,
            (std::vector<std::string>{"a", "", "\xc3\xa9", "", "", "", "\xf0\x9f\x98\x80", "a"}));
  EXPECT_EQ(stream.finish(), "");
  // A sequence cut short comes out at finish, as decode shows it.
  EXPECT_EQ(stream.step(2), "");
  EXPECT_EQ(stream.finish(), "\xef\xbf\xbd");
  EXPECT_EQ(tokenizer.decode(std::vector<uint32_t>{2}), "\xef\xbf\xbd");
}

TEST(TokenizerUnicode, LossyConversionReplacesMaximalSubparts) {
  namespace u = tpe::tokenizer::unicode;
  EXPECT_EQ(u::from_utf8_lossy("a\xf0\x9f\x98"), "a\xef\xbf\xbd");
  EXPECT_EQ(u::from_utf8_lossy("\xff\xfe"), "\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(u::from_utf8_lossy("\xe0\x80"), "\xef\xbf\xbd\xef\xbf\xbd");  // overlong: each byte
}

// A pattern that backtracks past PCRE2's match limit is an error naming where it came from, the
// pattern and the text's size, not a bare "match limit exceeded".
TEST(TokenizerRegex, AFailedMatchNamesThePatternAndWhereItCameFrom) {
  const tpe::tokenizer::Regex regex("(a+)+$", "t.json: pre_tokenizer.pattern");
  std::vector<std::pair<size_t, size_t>> matches;
  const std::string text = std::string(64, 'a') + "!";
  const std::string message = error_of([&] { regex.find_all(text, matches); });
  EXPECT_EQ(message.find("t.json: pre_tokenizer.pattern: regex '(a+)+$' failed on a text of 65 "
                         "bytes: "),
            0u)
      << message;
}

TEST(TokenizerRegex, OnigurumaClassesKeepTheirMeaning) {
  using tpe::tokenizer::translate_onig;
  EXPECT_EQ(translate_onig(R"(\s+(?!\S))"), R"([\s\x{85}]+(?![^\s\x{85}]))");
  EXPECT_EQ(translate_onig(R"([^\s\p{L}])"), R"([^\s\x{85}\p{L}])");
  EXPECT_EQ(translate_onig(R"(\w+|[]\w])"),
            R"([\p{L}\p{M}\p{Nd}\p{Pc}]+|[]\p{L}\p{M}\p{Nd}\p{Pc}])");
  EXPECT_EQ(translate_onig(R"(\\s)"), R"(\\s)");
  const tpe::tokenizer::Regex regex(R"(\s+)", "test");
  std::vector<std::pair<size_t, size_t>> matches;
  regex.find_all(
      "a\xc2\x85"
      "b",
      matches);  // U+0085 is \s in Oniguruma
  EXPECT_EQ(matches, (std::vector<std::pair<size_t, size_t>>{{1, 3}}));
}

}  // namespace

// A SentencePiece vocabulary without merges: they are recovered from the scores, and merges of
// equal score go longest left piece first. Here (ab, c) must outrank (c, d), which comes first in
// the vocabulary: "abcd" is "abc" "d", not "ab" "cd" (as transformers' sentencepiece_tokenizer
// gives for these tokens and scores).
TEST(Tokenizer, GgufSentencePieceMergesFollowScoresThenLengths) {
  tpe::tokenizer::GgufVocab v;
  v.model = "llama";
  v.architecture = "llama";
  v.tokens = {"\u2581", "a", "b", "c", "d", "ab", "cd", "abc"};
  v.scores = {0, 0, 0, 0, 0, -1, -2, -2};
  v.add_bos = false;
  EXPECT_EQ(Tokenizer::from_gguf(v, "m.gguf").encode("abcd"), (std::vector<uint32_t>{0, 7, 4}));
}

TEST(Tokenizer, GgufVocabulariesItDoesNotReadAreRefusedByKey) {
  tpe::tokenizer::GgufVocab v;
  v.model = "gpt2";
  v.tokens = {"a", "b", "ab"};
  v.merges = {"a b"};
  EXPECT_EQ(Tokenizer::from_gguf(v, "m.gguf").encode("ab"), (std::vector<uint32_t>{2}));
  v.model = "t5";
  EXPECT_EQ(error_of([&] { Tokenizer::from_gguf(v, "m.gguf"); }),
            "m.gguf: metadata 'tokenizer.ggml.model' is 't5'; tpengine reads GGUF tokenizers "
            "of type 'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)");
  v.model = "llama";
  v.architecture = "gemma3";
  EXPECT_NE(error_of([&] {
              Tokenizer::from_gguf(v, "m.gguf");
            }).find("a SentencePiece tokenizer of architecture 'gemma3'"),
            std::string::npos);
  v.architecture = "llama";
  EXPECT_EQ(error_of([&] { Tokenizer::from_gguf(v, "m.gguf"); }),
            "m.gguf: BOS is added but no 'tokenizer.ggml.bos_token_id' names it");
  v.add_bos = false;
  v.merges.clear();
  EXPECT_NE(error_of([&] {
              Tokenizer::from_gguf(v, "m.gguf");
            }).find("0 entries in 'tokenizer.ggml.scores' for 3 tokens"),
            std::string::npos);
  v.scores = {0, 0, -1};
  EXPECT_EQ(Tokenizer::from_gguf(v, "m.gguf").encode("ab"), (std::vector<uint32_t>{2}));
  v.special_ids = {3};
  EXPECT_EQ(error_of([&] { Tokenizer::from_gguf(v, "m.gguf"); }),
            "m.gguf: a special token id 3 (tokenizer.ggml.*_token_id) is not one of the 3 tokens");
  v.special_ids.clear();
  v.merges = {"a b"};
  v.model = "gpt2";
  v.scores.clear();
  v.pre = "llama-bpe";
  EXPECT_NE(error_of([&] {
              Tokenizer::from_gguf(v, "m.gguf");
            }).find("'tokenizer.ggml.pre' is 'llama-bpe', a pre-tokenizer tpengine does not read"),
            std::string::npos);
  v.pre = "smollm";
  v.add_bos = true;
  EXPECT_NE(error_of([&] {
              Tokenizer::from_gguf(v, "m.gguf");
            }).find("'tokenizer.ggml.add_bos_token' is true"),
            std::string::npos);
  v.add_bos = false;
  v.token_types = {1, 1};
  EXPECT_EQ(error_of([&] { Tokenizer::from_gguf(v, "m.gguf"); }),
            "m.gguf: 2 entries in 'tokenizer.ggml.token_type' for 3 tokens");
}
