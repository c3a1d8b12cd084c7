#!/usr/bin/env bash
# A real model end to end: SmolLM2-135M-Instruct from its GGUF file (Q4_1; tools/fetch-smollm2.sh
# fetches it into a cache the first time), text in and text out through the GGUF's own
# tokenizer, split over two ranks. Greedy, so the completion is fixed: llama.cpp on the same file
# gives " Paris." too.
# usage: smollm2.sh TPENGINE
set -euo pipefail
tpengine=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
model=$("$root/tools/fetch-smollm2.sh")
out=$("$tpengine" generate --model "$model" --tp 2 --prompt "The capital of France is" \
  --max-new-tokens 16)
echo "$out"
grep -q "Paris" <<<"$out"
echo PASS
