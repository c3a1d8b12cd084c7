#!/usr/bin/env python3
"""Reference outputs of transformers for a real GGUF model: tests/real/smollm2/.

transformers loads the GGUF file (`from_pretrained(..., gguf_file=...)`, which dequantizes it to
fp32) with its tokenizer, and for each prompt records the ids, the last position's logits (fp32,
eager attention) and 32 greedy tokens; the first 16 greedy tokens in bf16, with eager and with
sdpa attention (the two disagree where bf16's rounding flips a near tie); and for one chat message
the ids apply_chat_template gives (the model's template) and 32 greedy tokens. tests/real/test_smollm2.cpp compares tpengine with them.
Needs torch, transformers, accelerate and gguf (pip).

Usage:
    python3 tools/make_real_refs.py --gguf .deps/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out tests/real/smollm2
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
NEW_TOKENS = 32
BF16_TOKENS = 16
CHAT = "What color is the sky on a clear day?"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    prompts, greedy, logits = [], [], {}
    with torch.no_grad():
        for i, text in enumerate(PROMPTS):
            ids = tokenizer(text, return_tensors="pt").input_ids
            prompts.append(ids[0].tolist())
            logits[f"last.{i}"] = model(ids).logits[0, -1].float().contiguous()
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.eos_token_id)
            greedy.append(out[0, ids.shape[1]:].tolist())
        # A chat turn: the model's own template (it adds its default system prompt).
        chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}],
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        ids = torch.tensor([chat_ids])
        # An explicit mask: the prompt holds <|im_end|>, which is also the pad id, and an
        # inferred mask would hide those tokens.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.eos_token_id)
        chat = {"message": CHAT, "ids": chat_ids, "greedy": out[0, ids.shape[1]:].tolist()}
    greedy_bf16 = {}
    for impl in ("eager", "sdpa"):
        half = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                    attn_implementation=impl)
        half = half.to(torch.bfloat16).eval()
        with torch.no_grad():
            greedy_bf16[impl] = [
                half.generate(ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=BF16_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.eos_token_id)[0, len(p):].tolist()
                for p in prompts for ids in [torch.tensor([p])]]
    os.makedirs(args.out, exist_ok=True)
    save_file(logits, os.path.join(args.out, "reference.safetensors"))
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"model": name, "transformers": transformers.__version__,
                   "torch": torch.__version__, "texts": PROMPTS, "prompts": prompts,
                   "greedy": greedy, "greedy_bf16": greedy_bf16, "chat": chat}, f, indent=1)
    for text, g in zip(PROMPTS, greedy):
        print(repr(text), "->", repr(tokenizer.decode(g)))
    print(repr(CHAT), "->", repr(tokenizer.decode(chat["greedy"])))


if __name__ == "__main__":
    main()
