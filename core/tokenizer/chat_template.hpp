// Chat templates: the Jinja text in tokenizer_config.json's `chat_template` (or a GGUF file's
// tokenizer.chat_template) rendered as transformers' apply_chat_template renders it (jinja2 with
// trim_blocks and lstrip_blocks). A subset of Jinja, the part chat templates use: text, {{ }},
// {% if / elif / else %}, {% for x in xs %} with loop.*, {% set %}, {# #}, whitespace control
// with '-'; literals, lists, names, .attr and [index] / [a:b], + - * / % ~, comparisons, in,
// and / or / not, `x if c else y`, tests (defined, none, string, ...), filters (trim, length,
// upper, lower, ...), string methods (strip, startswith, ...) and raise_exception(). Anything
// else is refused with a tpe::Error naming the construct and where it is.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace tpe::tokenizer {

struct ChatMessage {
  std::string role;
  std::string content;
};

// `variables`: the special tokens transformers passes (bos_token, eos_token, ...). `source`
// names the template in messages.
std::string render_chat_template(std::string_view source_text, const std::string& source,
                                 const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt,
                                 const std::map<std::string, std::string>& variables);

}  // namespace tpe::tokenizer
