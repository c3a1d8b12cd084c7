#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang, CPU-only) in build-fuzz and runs each for a
# short while from its committed corpus (tests/fuzz/corpus/TARGET, where there is one), as CI's
# smoke test: a finding fails it and leaves the input in build-fuzz/findings/TARGET. The long runs
# and their figures are in tests/fuzz/README.md.
#   tools/fuzz-smoke.sh [SECONDS]      per target, default 30
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
command -v clang++ >/dev/null || { echo "fuzz-smoke: clang++ not found (tools/install-deps.sh)" >&2; exit 1; }
CC=clang CXX=clang++ cmake -S . -B build-fuzz -DTPE_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
targets=()
for source in tests/fuzz/*.cpp; do targets+=("$(basename "$source" .cpp)"); done
cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]}"
status=0
for target in "${targets[@]}"; do
  work=$(mktemp -d)
  findings=build-fuzz/findings/$target
  mkdir -p "$findings"
  seeds=()
  [ -d "tests/fuzz/corpus/$target" ] && seeds=("tests/fuzz/corpus/$target")
  if build-fuzz/tests/fuzz/"$target" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
       -rss_limit_mb=2048 -artifact_prefix="$findings/" "$work" "${seeds[@]}" \
       >"$findings/log" 2>&1; then
    echo "fuzz-smoke: $target: $(grep -Eo 'Done [0-9]+ runs' "$findings/log" || echo ran), no finding"
  else
    echo "fuzz-smoke: $target: FINDING (input and log in $findings)"
    grep -E "ERROR|SUMMARY|deadly" "$findings/log" | head -5
    status=1
  fi
  rm -rf "$work"
done
exit $status
