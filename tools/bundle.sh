#!/usr/bin/env bash
# Makes one relocatable folder of tpengine that runs on another x86-64 Linux machine with no
# build and none of the Debian -dev packages:
#   bin/tpengine                 the CLI, RPATH $ORIGIN/../lib
#   lib/tpengine/policies/*.so   the model-family plugins (found beside bin/, as installed)
#   lib/*.so.*                   the shared libraries it needs that are not part of the target's
#                                base system (toml++, spdlog, fmt, OpenBLAS, PCRE2, ICU, ...), each
#                                with RPATH $ORIGIN
#   README                       what the target machine must have (glibc, libstdc++, and for
#                                --device cuda the NVIDIA driver, CUDA runtime, cuBLASLt, NCCL)
# and packs it as DIR.tar.xz beside it.
#
#   tools/bundle.sh [--build BUILD] [DIR]
# BUILD: an existing build folder to bundle (default: a Release build made in build-release,
# with CUDA when nvcc is found, for CMAKE_CUDA_ARCHITECTURES, default 90); DIR: the folder to
# write (default dist/tpengine-VERSION-x86_64).
#
# Left out on purpose: glibc and the compiler's runtime (libstdc++, libgcc_s), which every
# target has and which must match its own loader; the NVIDIA driver (libcuda), which must match
# the kernel module; and the CUDA runtime libraries (libcudart, libcublasLt, libnccl), which are
# large (cuBLASLt alone is ~500 MB), come with every CUDA install or container, and are only
# needed for --device cuda.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

build=""
out=""
while [ $# -gt 0 ]; do
  case $1 in
    --build) build=${2:?--build needs a folder}; shift 2 ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) echo "bundle: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
for tool in patchelf objdump strip; do
  command -v "$tool" >/dev/null ||
    { echo "bundle: $tool not found (tools/install-deps.sh installs it)" >&2; exit 1; }
done

if [ -z "$build" ]; then
  build=$repo/build-release
  echo "bundle: building (Release) in $build"
  cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j "$(nproc)" --target tpengine
fi
[ -f "$build/CMakeCache.txt" ] || { echo "bundle: $build is not a CMake build folder" >&2; exit 1; }
version=$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$build/CMakeCache.txt")
out=${out:-$repo/dist/tpengine-${version:-0}-x86_64}
out=$(realpath -m "$out")
case $out in / | "$repo" | "$HOME") echo "bundle: refusing to write into $out" >&2; exit 1 ;; esac

rm -rf "$out"
cmake --install "$build" --prefix "$out" --component runtime >/dev/null
# Whatever the install's libdir was called (lib, lib64, lib/x86_64-linux-gnu), the registry
# looks in bin/../lib/tpengine/policies.
if [ ! -d "$out/lib/tpengine/policies" ]; then
  policies=$(find "$out" -type d -path '*/tpengine/policies' | head -1)
  [ -n "$policies" ] || { echo "bundle: the install holds no tpengine/policies folder" >&2; exit 1; }
  mkdir -p "$out/lib/tpengine"
  mv "$policies" "$out/lib/tpengine/policies"
fi
exe=$out/bin/tpengine
[ -x "$exe" ] || { echo "bundle: the install holds no bin/tpengine" >&2; exit 1; }

# The libraries to carry: everything the loader resolves for the binary and the plugins, less
# the base system and CUDA (see above).
system='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libutil|libgcc_s|libstdc\+\+|libcuda|libcudart|libcublas|libcublasLt|libnccl|libnvidia-.*)\.so'
mapfile -t libs < <(ldd "$exe" "$out"/lib/tpengine/policies/*.so |
  awk '$2 == "=>" && $3 ~ /^\// {print $1 " " $3}' | sort -u)
mkdir -p "$out/lib"
for entry in "${libs[@]}"; do
  name=${entry%% *} path=${entry#* }
  if grep -qE "$system" <<<"$name"; then continue; fi
  cp -L "$path" "$out/lib/$name"
  chmod u+w "$out/lib/$name"
  patchelf --set-rpath '$ORIGIN' "$out/lib/$name"
done
unresolved=$(ldd "$exe" | grep "not found" || true)
if [ -n "$unresolved" ] && ! grep -qE "libcud|libcublas|libnccl" <<<"$unresolved"; then
  echo "bundle: bin/tpengine has unresolved libraries here:" >&2
  echo "$unresolved" >&2
  exit 1
fi
strip --strip-debug "$exe" "$out"/lib/tpengine/policies/*.so "$out"/lib/*.so*
patchelf --set-rpath '$ORIGIN/../lib' "$exe"

# The oldest target: the newest symbol versions anything in the bundle asks of glibc and
# libstdc++.
newest() {
  objdump -T "$exe" "$out"/lib/*.so* "$out"/lib/tpengine/policies/*.so 2>/dev/null |
    grep -oE "\b$1_[0-9.]+" | sed "s/^$1_//" | sort -uV | tail -1
}
glibc=$(newest GLIBC)
glibcxx=$(newest GLIBCXX)
cuda_libs=$(objdump -p "$exe" | awk '/NEEDED/ && /libcud|libcublas|libnccl/ {print $2}' | xargs)
if [ -n "$cuda_libs" ]; then
  cuda="For --device cuda the machine also needs the NVIDIA driver and these CUDA libraries on
the loader's path (any CUDA 13 install or container has them): $cuda_libs.
Check with: ldd bin/tpengine | grep 'not found'"
else
  cuda="This build has no CUDA backend (--device cpu only)."
fi
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
cat >"$out/README" <<EOF
tpengine $version ($commit), a relocatable bundle made by tools/bundle.sh on $(date -u +%F).

Run bin/tpengine from wherever this folder is; it finds its plugins in lib/tpengine/policies
and its libraries in lib/ (RPATH \$ORIGIN/../lib). Extra plugin folders: TPENGINE_POLICY_PATH.

The target machine needs x86-64 Linux, glibc $glibc or newer and libstdc++ with
GLIBCXX_$glibcxx or newer (GCC 12's; Debian 12, Ubuntu 22.04 and later have both).
$cuda
EOF

tar -cJf "$out.tar.xz" -C "$(dirname "$out")" "$(basename "$out")"
echo "bundle: $(du -sh "$out" | cut -f1) in $out ($(du -sh "$out.tar.xz" | cut -f1) packed);" \
  "needs glibc $glibc, GLIBCXX_$glibcxx${cuda_libs:+, and for CUDA $cuda_libs}"
