// Arbitrary bytes as a chat template (tokenizer_config.json's chat_template, or a GGUF file's
// tokenizer.chat_template: text from the checkpoint, not from us): rendering a short
// conversation either gives text or throws one one-line tpe::Error that is not an internal
// (TPE_CHECK) error, within the renderer's step and output limits (no hang, no blow-up).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "core/common/error.hpp"
#include "core/tokenizer/chat_template.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  static const std::vector<tpe::tokenizer::ChatMessage> messages = {
      {"system", "Be brief."},
      {"user", "Hi {{ there }} {% x %}"},
      {"assistant", "Hello."},
      {"user", "héllo 中文 😀\n"}};
  static const std::map<std::string, std::string> variables = {
      {"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}};
  for (const bool generation_prompt : {false, true}) {
    try {
      tpe::tokenizer::render_chat_template(text, "fuzz.json", messages, generation_prompt,
                                           variables);
    } catch (const tpe::Error& e) {
      const std::string message = e.what();
      if (message.find('\n') != std::string::npos || message.starts_with("internal error")) {
        std::fprintf(stderr, "bad error message: %s\n", message.c_str());
        std::abort();
      }
    }
  }
  return 0;
}
