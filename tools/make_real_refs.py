#!/usr/bin/env python3
"""Reference outputs of transformers for a real GGUF model: tests/real/smollm2/.

transformers loads the GGUF file (`from_pretrained(..., gguf_file=...)`, which dequantizes it to
fp32) with its tokenizer, and for each prompt records the ids, the last position's logits (fp32,
eager attention) and 32 greedy tokens. tests/real/test_smollm2.cpp compares tpengine with them.
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
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
            greedy.append(out[0, ids.shape[1]:].tolist())
    os.makedirs(args.out, exist_ok=True)
    save_file(logits, os.path.join(args.out, "reference.safetensors"))
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"model": name, "transformers": transformers.__version__,
                   "torch": torch.__version__, "texts": PROMPTS, "prompts": prompts,
                   "greedy": greedy}, f, indent=1)
    for text, g in zip(PROMPTS, greedy):
        print(repr(text), "->", repr(tokenizer.decode(g)))


if __name__ == "__main__":
    main()
