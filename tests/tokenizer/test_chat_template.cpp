// Chat templates rendered as transformers' apply_chat_template renders them (jinja2 with
// trim_blocks and lstrip_blocks): data/chat/references.json, made by tools/make_chat_refs.py
// (SmolLM2-135M-Instruct's own template, and small ones exercising each supported construct).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/common/error.hpp"
#include "core/tokenizer/chat_template.hpp"

namespace {

using nlohmann::json;
using tpe::tokenizer::ChatMessage;
using tpe::tokenizer::render_chat_template;

const std::filesystem::path data_dir = TPE_TOKENIZER_DATA;

json references() {
  std::ifstream in(data_dir / "chat" / "references.json");
  return json::parse(in);
}

std::vector<ChatMessage> conversation(const json& messages) {
  std::vector<ChatMessage> out;
  for (const json& m : messages) out.push_back({m.at("role"), m.at("content")});
  return out;
}

TEST(ChatTemplate, RendersAsTransformers) {
  const json ref = references();
  const auto specials = ref.at("specials").get<std::map<std::string, std::string>>();
  size_t rendered = 0;
  size_t raised = 0;
  for (const json& c : ref.at("cases")) {
    const std::string name = c.at("template");
    const std::string tmpl = ref.at("templates").at(name);
    const auto messages = conversation(ref.at("conversations").at(c.at("conversation")));
    const bool gen = c.at("add_generation_prompt");
    const std::string what = name + " / " + c.at("conversation").get<std::string>() +
                             (gen ? " + generation prompt" : "");
    if (c.contains("text")) {
      EXPECT_EQ(render_chat_template(tmpl, name, messages, gen, specials),
                c.at("text").get<std::string>())
          << what;
      ++rendered;
    } else {
      try {
        (void)render_chat_template(tmpl, name, messages, gen, specials);
        ADD_FAILURE() << what << ": rendered, but transformers raised " << c.at("error");
      } catch (const tpe::Error& e) {
        EXPECT_NE(std::string(e.what()).find(c.at("error").get<std::string>()), std::string::npos)
            << what << ": " << e.what();
      }
      ++raised;
    }
  }
  EXPECT_GE(rendered, 20u);
  EXPECT_GE(raised, 2u);
}

std::string error_of(const std::string& tmpl) {
  try {
    (void)render_chat_template(tmpl, "t.json", {{"user", "hi"}}, false, {});
  } catch (const tpe::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ChatTemplate, RefusesWhatItDoesNotSupportByName) {
  EXPECT_EQ(error_of("a\n{% macro m() %}{% endmacro %}"),
            "t.json: chat template, line 2: '{% macro %}' is not supported (chat templates may "
            "use if, for, set)");
  EXPECT_EQ(error_of("{{ x | tojson }}"),
            "t.json: chat template, line 1: filter 'tojson' is not supported");
  EXPECT_EQ(error_of("{% if true %}x"),
            "t.json: chat template, line 1: this block is never closed with '{% endif %}'");
  EXPECT_EQ(error_of("{{ 'a' "), "t.json: chat template, line 1: '{{' is never closed");
  EXPECT_EQ(error_of("{% set ns.x = 1 %}"),
            "t.json: chat template, line 1: setting an attribute (namespace) is not supported");
  EXPECT_EQ(error_of("{{ messages[0].content.frobnicate() }}"),
            "t.json: chat template, line 1: method 'frobnicate' of a string is not supported");
  EXPECT_EQ(error_of("{% endfor %}"),
            "t.json: chat template, line 1: 'endfor' without its opening tag");
  // Found by fuzz_chat_template: numbers past int64 or with two points (they threw
  // std::out_of_range or were read in part), and quoted template text kept on one line.
  EXPECT_EQ(error_of("{{ 99999999999999999999 }}"),
            "t.json: chat template, line 1: integer '99999999999999999999' is out of range "
            "(64-bit)");
  EXPECT_EQ(error_of("{{ 1.2.3 }}"), "t.json: chat template, line 1: '1.2.3' is not a number");
  EXPECT_EQ(error_of("{{ 1 'a\nb' }}"), "t.json: chat template, line 1: unexpected 'a\\x0ab'");
}

}  // namespace
