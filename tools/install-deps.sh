#!/usr/bin/env bash
# Installs everything tpengine needs to build and test: Debian's packages, then FlashInfer's
# CUDA headers (the attention kernels; see flashinfer below). Idempotent: it installs only what
# is missing. Needs root (or sudo) on Debian 12 / Ubuntu 22.04 or newer for the packages.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

packages=(
  build-essential cmake pkg-config ccache python3
  libtomlplusplus-dev   # TOML run configuration
  libspdlog-dev libfmt-dev
  libboost-dev          # Boost.DLL (header-only) for loading policy plugins
  nlohmann-json3-dev    # config.json and safetensors headers
  libcli11-dev          # the command line
  libopenblas-dev       # CPU matrix products
  libpcre2-dev          # tokenizer split regexes (Unicode properties, look-ahead, JIT)
  libicu-dev            # tokenizer Unicode normalisation and character classes
  zlib1g-dev            # the tokenizer tests' gzipped expected outputs
  libgtest-dev libgmock-dev
  patchelf              # tools/bundle.sh: RPATHs of the relocatable folder
  clang libclang-rt-dev # the libFuzzer targets (tools/fuzz-smoke.sh)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
else
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install-deps: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# FlashInfer's CUDA headers (the Hopper attention kernels), pinned.
"$repo/tools/fetch-flashinfer.sh"
