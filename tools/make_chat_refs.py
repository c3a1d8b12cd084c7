#!/usr/bin/env python3
"""Reference renderings of chat templates: tests/tokenizer/data/chat/references.json.

transformers' apply_chat_template (jinja2, trim_blocks and lstrip_blocks) renders each template
for each conversation, with and without add_generation_prompt, given SmolLM2's special tokens;
tpengine's renderer is compared with that (tests/tokenizer/test_chat_template.cpp). The templates:
SmolLM2-135M-Instruct's own (from its GGUF's tokenizer.chat_template) and small ones written here
to exercise each construct the renderer claims (their reference is still jinja2's output).
A template that raises records the message instead.

Usage (torch not needed):
    python3 tools/make_chat_refs.py --smollm2-gguf .deps/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-cpp SRC --out tests/tokenizer/data/chat/references.json
"""
import argparse
import json
import os
import sys

import transformers
from transformers import PreTrainedTokenizerFast

TEMPLATES = {
    # The ChatML shape with a default system prompt, as SmolLM2 and Qwen2 write it (replaced by
    # the real SmolLM2 template below).
    "smollm2": None,
    # Whitespace: trim_blocks, lstrip_blocks, '-' on both sides, comments.
    "whitespace": (
        "{# a comment #}\n"
        "{%- for m in messages %}\n"
        "    {%- if m.role == 'user' %}\n"
        "  <user>{{ m.content | trim }}</user>\n"
        "    {% elif m.role == 'assistant' -%}\n"
        "  <bot>  {{- m.content -}}  </bot>\n"
        "    {%- else %}\n"
        "[{{ m['role'] | upper }}] {{ m.content }}\n"
        "    {%- endif %}\n"
        "{% endfor %}\n"
        "{%- if add_generation_prompt %}\n<bot>\n{% endif %}\n"
        "{# trim_blocks drops the newline after a block tag, not after an expression: #}\n"
        "{{ messages | length }}\n{% if true %}\n  kept indent\n{% endif %}"),
    # Loop variables, set, slicing, tests and filters, as Llama-3 / Mistral / Gemma templates use.
    "constructs": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set rest = messages[1:] %}{% else %}{% set system = none %}{% set rest = messages %}"
        "{% endif %}"
        "{% if system is not none %}<<SYS>>{{ system.strip() }}<</SYS>>{% endif %}"
        "{% for message in rest %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% set content = message['content'] if message['content'] is string else '' %}"
        "{{ loop.index }}/{{ loop.length }}{{ ' first' if loop.first }}{{ ' last' if loop.last }}: "
        "{{ message.role | capitalize }} says {{ content | length }} chars"
        "{% if content.startswith('Hi') %} (greets){% endif %}"
        "{% if 'sky' in content %} (sky){% endif %}"
        " [{{ content.split(' ') | first }}~{{ content[:3] ~ '|' ~ content[-2:] }}]"
        "{{ eos_token if message['role'] == 'assistant' else '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' * 2 }}{{ rest | length }}"
        "{% else %}{{ [1, 2] + [3] }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 1.5 * 2 }} {{ (2 > 1) and 'yes' }}"
        "{% endif %}"),
}

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "What color is the sky on a clear day?"}],
    "system_and_user": [{"role": "system", "content": "  Be brief.  "},
                        {"role": "user", "content": "Hi there"}],
    "multi_turn": [{"role": "user", "content": "Hi, who are you?"},
                   {"role": "assistant", "content": "  I am a small model.\n"},
                   {"role": "user", "content": "Tell me about the sky."}],
    "not_alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2-gguf", required=True)
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp source (for gguf-py)")
    parser.add_argument("--tokenizer-json", default=os.path.join(
        os.path.dirname(__file__), "..", "tests", "tokenizer", "data", "smollm2", "tokenizer.json"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(args.llama_cpp, "gguf-py"))
    import gguf
    reader = gguf.GGUFReader(args.smollm2_gguf)
    templates = dict(TEMPLATES)
    templates["smollm2"] = str(reader.fields["tokenizer.chat_template"].contents())
    specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    tok = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer_json, **specials)
    cases = []
    for tname, template in templates.items():
        for cname, messages in CONVERSATIONS.items():
            for gen in (False, True):
                case = {"template": tname, "conversation": cname, "add_generation_prompt": gen}
                try:
                    case["text"] = tok.apply_chat_template(messages, chat_template=template,
                                                           tokenize=False,
                                                           add_generation_prompt=gen)
                except Exception as e:  # jinja2's TemplateError from raise_exception
                    case["error"] = str(e)
                cases.append(case)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "specials": specials,
                   "templates": templates, "conversations": CONVERSATIONS, "cases": cases}, f,
                  indent=1, ensure_ascii=False)
    print(f"{args.out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
