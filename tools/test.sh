#!/usr/bin/env bash
# Builds tpengine and runs the whole test suite (the README's test command; CI runs this).
#   tools/test.sh            release-with-debug-info build in build/
#   tools/test.sh --sanitize AddressSanitizer + UndefinedBehaviorSanitizer build in build-asan/
#                            (CPU code; the CUDA kernels are checked with compute-sanitizer on a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install-deps.sh
build=build
flags=()
if [ "${1:-}" = "--sanitize" ]; then
  build=build-asan
  flags=(-DTPE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DTPE_CUDA=OFF)
fi
jobs=$(nproc)
cmake -S . -B "$build" "${flags[@]}" >/dev/null
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs"
