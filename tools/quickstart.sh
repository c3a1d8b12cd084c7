#!/usr/bin/env bash
# Installs what tpengine needs, builds it, and runs the main job: a model split over two ranks
# (here the tiny random-weight Llama checkpoint with a byte-level BPE tokenizer shipped in
# tests/fixtures: its text is gibberish, but every stage of a real run is there), greedy.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" --target tpengine
model=tests/fixtures/llama_text
echo "== how $model splits over 2 ranks"
build/tools/tpengine plan --model "$model" --tp 2
echo "== generate 24 tokens at TP 2"
build/tools/tpengine generate --model "$model" --tp 2 --prompt "Call me Ishmael." --max-new-tokens 24
