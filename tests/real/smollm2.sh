#!/usr/bin/env bash
# A real model end to end: SmolLM2-135M-Instruct from its GGUF file (Q4_1; tools/fetch-smollm2.sh
# fetches it into a cache the first time). tpe_real_tests compares it with transformers loading
# the same file (tests/real/smollm2); then the CLI completes a prompt at TP 2 through the GGUF's
# own tokenizer, greedy, which must name Paris (llama.cpp on the same file says " Paris." too),
# and answers a chat message through the GGUF's chat template, which must say blue.
# With cuda, only the GPU cases (fp32 and bf16 on one GPU; exit 77, skipped, without one).
# usage: smollm2.sh TPENGINE TPE_REAL_TESTS [cuda]
set -euo pipefail
tpengine=$1 tests=$2 device=${3:-cpu}
root=$(cd "$(dirname "$0")/../.." && pwd)
if [ "$device" = cuda ]; then
  nvidia-smi -L >/dev/null 2>&1 || { echo "SKIP: no CUDA device"; exit 77; }
fi
# The model on a line of its own: a fetch that fails stops the script with its message (in a
# command's environment prefix its failure would go unnoticed).
model=$("$root/tools/fetch-smollm2.sh")
if [ "$device" = cuda ]; then
  TPE_SMOLLM2_GGUF=$model "$tests" --gtest_filter='RealSmolLm2Cuda.*'
  exit
fi
TPE_SMOLLM2_GGUF=$model "$tests" --gtest_filter='-RealSmolLm2Cuda.*'
out=$("$tpengine" generate --model "$model" --tp 2 --prompt "The capital of France is" \
  --max-new-tokens 16)
echo "$out"
grep -q "Paris" <<<"$out"
# A chat turn through the model's own template (which adds its default system prompt).
out=$("$tpengine" generate --model "$model" --tp 2 --chat "What color is the sky on a clear day?" \
  --max-new-tokens 32)
echo "$out"
grep -q "blue" <<<"$out"
# The same as a conversation on stdin: two turns, two answers, the second one after the first.
out=$(printf 'What color is the sky on a clear day?\nAnd at night?\n' |
  "$tpengine" chat --model "$model" --tp 2 --max-new-tokens 24 --quiet)
echo "$out"
[ "$(wc -l <<<"$out")" -eq 2 ]
grep -q "blue" <<<"$(head -1 <<<"$out")"
grep -qi "night" <<<"$(tail -1 <<<"$out")"
echo PASS
