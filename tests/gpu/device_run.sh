#!/usr/bin/env bash
# Builds and runs the GPU tests and the benchmark on a CUDA machine that lacks the Debian -dev
# packages, using the folder tools/gpu-deps.sh prepared (TPE_GPU_DEPS, default .gpu-deps), then
# runs the tests again under compute-sanitizer (memcheck, and racecheck on the kernels that use
# shared memory) where it is installed. Logs go to OUT; the summary goes to stdout.
#
#   tests/gpu/device_run.sh [OUT]        OUT defaults to build-gpu/logs
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
out=${1:-build-gpu/logs}
mkdir -p "$out"
deps=${TPE_GPU_DEPS:-.gpu-deps}
# The folder travels packed (tools/gpu-deps.sh writes both).
if [ ! -d "$deps" ] && [ -f "$deps.tar.xz" ]; then tar -xJf "$deps.tar.xz"; fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
cmake --version | head -1
c++ --version | head -1
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
  export PATH=$PATH:/usr/local/cuda/bin
fi
# shellcheck source=/dev/null
source "$deps/env.sh"

# CMake before 3.26 has no nvcc flag for C++20, which the top level asks of CUDA sources.
if ! cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_CUDA20_STANDARD_COMPILE_OPTION=-std=c++20 \
  -DCMAKE_CUDA20_EXTENSION_COMPILE_OPTION=-std=c++20 >"$out/configure.log" 2>&1; then
  tail -50 "$out/configure.log"
  exit 1
fi
if ! cmake --build build-gpu -j"$(nproc)" --target tpe_gpu_tests tpe_gpu_bench >"$out/build.log" 2>&1; then
  grep -E -A8 "error|Error" "$out/build.log" | head -120
  exit 1
fi

status=0
echo "== tests"
build-gpu/tests/gpu/tpe_gpu_tests >"$out/gpu_tests.log" 2>&1 || status=1
grep -E "^\[  (FAILED|SKIPPED) |Failure|^\[==========\]|^\[  PASSED  \]" "$out/gpu_tests.log" | tail -60

echo "== bench"
build-gpu/tests/gpu/tpe_gpu_bench 2>&1 | tee "$out/bench.log" || status=1

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$sanitizer" ]; then
  echo "== memcheck (all but the large GEMM shapes)"
  timeout 150 "$sanitizer" --tool memcheck --error-exitcode 3 build-gpu/tests/gpu/tpe_gpu_tests \
    --gtest_filter='-*GemmShapes*' >"$out/memcheck.log" 2>&1
  echo "memcheck exit $?"
  tail -4 "$out/memcheck.log"
  echo "== racecheck (attention, norms)"
  timeout 100 "$sanitizer" --tool racecheck --error-exitcode 3 build-gpu/tests/gpu/tpe_gpu_tests \
    --gtest_filter='*Attention*:*Norm*' >"$out/racecheck.log" 2>&1
  echo "racecheck exit $?"
  tail -4 "$out/racecheck.log"
fi
exit $status
