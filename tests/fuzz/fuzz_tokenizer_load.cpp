// Arbitrary bytes as tokenizer.json: loading either succeeds or throws one one-line tpe::Error
// that is not an internal (TPE_CHECK) error; a tokenizer that loads must encode and decode a few
// texts without crashing (encoding may only fail with such an error, e.g. a missing unk token).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/common/error.hpp"
#include "core/tokenizer/tokenizer.hpp"

namespace {

void check_error(const tpe::Error& e) {
  const std::string message = e.what();
  if (message.find('\n') != std::string::npos || message.starts_with("internal error")) {
    std::fprintf(stderr, "bad error message: %s\n", message.c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto tokenizer = tpe::tokenizer::Tokenizer::from_json(text, "fuzz.json");
    for (const char* sample : {"Hello world", " a  b\n\tc", "héllo <s> 中文 😀", ""}) {
      try {
        const auto ids = tokenizer.encode(sample);
        tokenizer.decode(ids, false);
        tokenizer.decode(ids, true);
        auto stream = tokenizer.incremental_decoder();
        for (const uint32_t id : ids) stream.step(id);
        stream.finish();
      } catch (const tpe::Error& e) {
        check_error(e);
      }
    }
    const uint32_t probe[] = {0, 1, 2, 3, 255, 256, 1000, 0xffffffffu};
    tokenizer.decode(probe, false);
  } catch (const tpe::Error& e) {
    check_error(e);
  }
  return 0;
}
