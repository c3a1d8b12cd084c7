#!/usr/bin/env bash
# Fetches FlashInfer's CUDA headers into DIR (default .deps/flashinfer); tools/install-deps.sh
# calls it. Needs python3 with pip and access to PyPI; idempotent (keeps a DIR of this version).
#   tools/fetch-flashinfer.sh [DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

# FlashInfer (Apache-2.0): its header-only CUDA kernels, with the CUTLASS and CCCL headers they
# need, serve prefill attention on Hopper (kernels/cuda/flashinfer/). The wheel on PyPI is the
# release that carries them; pinned by version and hash, and only its headers and licences are
# unpacked (about 60 MB; nothing of Python is used). The CUDA build finds them in
# .deps/flashinfer, or on CMAKE_PREFIX_PATH (tools/gpu-deps.sh packs them for machines without a
# network).
flashinfer_version=0.7.4
flashinfer_sha256=a051a62e09a2738e8b0de47a1944fd2f0f3eff01b728b662141ea660cb09dd32
flashinfer_dir=${1:-$repo/.deps/flashinfer}
if [ "$(cat "$flashinfer_dir/VERSION" 2>/dev/null)" = "$flashinfer_version" ]; then
  echo "fetch-flashinfer: FlashInfer $flashinfer_version headers present"
else
  echo "fetch-flashinfer: fetching FlashInfer $flashinfer_version headers"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" \
    "flashinfer-python==$flashinfer_version"
  wheel=("$work"/flashinfer_python-*.whl)
  echo "$flashinfer_sha256  ${wheel[0]}" | sha256sum --check --quiet ||
    {
      echo "fetch-flashinfer: ${wheel[0]}: not the pinned FlashInfer wheel (sha256 differs)" >&2
      exit 1
    }
  rm -rf "$flashinfer_dir"
  python3 - "${wheel[0]}" "$work/flashinfer" <<'PY'
import sys, zipfile
keep = ("flashinfer/data/include/", "flashinfer/data/cutlass/include/",
        "flashinfer/data/cutlass/tools/util/include/", "flashinfer/data/cccl/")
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith(keep):
            target = name[len("flashinfer/data/"):]
        elif "/licenses/" in name and name.endswith(".txt") or name.endswith("/LICENSE"):
            target = "licenses/" + name.rsplit("/", 1)[1]
        else:
            continue
        info = wheel.getinfo(name)
        info.filename = target
        wheel.extract(info, sys.argv[2])
PY
  echo "$flashinfer_version" >"$work/flashinfer/VERSION"
  mkdir -p "$(dirname "$flashinfer_dir")"
  mv "$work/flashinfer" "$flashinfer_dir"
fi
