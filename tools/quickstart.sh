#!/usr/bin/env bash
# Installs what tpengine needs, builds it, and runs the main job: a model split over two ranks
# (here the tiny Llama-architecture checkpoint shipped in tests/fixtures), greedy generation.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
cmake -S . -B build >/dev/null
cmake --build build -j "$(nproc)" --target tpengine
model=tests/fixtures/llama_gqa
echo "== how $model splits over 2 ranks"
build/tpengine plan --model "$model" --tp 2
echo "== generate 16 tokens at TP 2"
build/tpengine generate --model "$model" --tp 2 --prompt-ids 1,15,27,33,8 --max-new-tokens 16
