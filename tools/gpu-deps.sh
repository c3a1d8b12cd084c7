#!/usr/bin/env bash
# Prepares a folder holding the Debian -dev packages that tpengine's CMake needs (headers, CMake
# and pkg-config files, the few shared libraries the tests load), unpacked, relocatable and
# trimmed, for a machine that has a compiler, CMake and CUDA but none of those packages and no
# network to fetch them: a lent GPU machine, a CUDA container.
#
# Run it here, on Debian 12 with apt (no root needed once `apt-get update` has run):
#   tools/gpu-deps.sh [DIR]                  # DIR defaults to .gpu-deps
# It also writes DIR.tar.xz (about a third of the size, mostly ICU's data and OpenBLAS) for
# carrying; on the target `tar -xJf DIR.tar.xz` restores DIR.
# Copy DIR (about 45 MB) to the target machine, x86-64 with glibc 2.36 or newer, and there:
#   source DIR/env.sh
#   cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release && cmake --build build-gpu
#
# What it does to the packages, and why:
# - unpacks them with dpkg -x (no install, no maintainer scripts), then drops documentation,
#   static archives (GoogleTest's excepted: it ships no shared library) and LAPACK;
# - keeps only the Boost headers the project's sources include, with what they include in turn
#   (found by the host compiler), plus boost/config and boost/predef whole for other compilers:
#   all of Boost is 160 MB, the part used well under 2 MB. Each library touched is kept whole,
#   so that another compiler's #if branches find their headers too. Rerun the script after
#   adding a Boost include;
# - makes the links that update-alternatives would have made for OpenBLAS (libopenblas.so,
#   cblas.h), so that CMake's FindBLAS and find_path find them where they look;
# - rewrites the .pc files' /usr prefixes relative to ${pcfiledir}, so the folder may move;
# - adds FlashInfer's headers (tools/fetch-flashinfer.sh) as DIR/flashinfer;
# - writes env.sh, which points CMake (CMAKE_PREFIX_PATH), pkg-config (a pkgconf from the
#   folder, reading only the folder's .pc files) and the loader (LD_LIBRARY_PATH) at the folder.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$repo/.gpu-deps}
arch=x86_64-linux-gnu

# Package names as in Debian 12 (bookworm); tools/install-deps.sh installs the same -dev set.
packages=(
  libgtest-dev
  libfmt-dev libfmt9
  libspdlog-dev libspdlog1.10
  libtomlplusplus-dev libtomlplusplus3
  nlohmann-json3-dev
  libboost1.74-dev
  libcli11-dev
  libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libgfortran5
  libpcre2-dev libpcre2-8-0
  libicu-dev libicu72
  zlib1g-dev zlib1g
  pkgconf-bin libpkgconf3
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt's download user must be able to write there.
chmod 0777 "$work"
echo "gpu-deps: downloading ${#packages[@]} packages"
if ! (cd "$work" && apt-get download "${packages[@]}" 2> >(grep -v "unsandboxed" >&2)); then
  echo "gpu-deps: apt-get download failed (run 'apt-get update' first?)" >&2
  exit 1
fi

# The project's Boost includes, read from its source folders (so a release tarball or a copy
# without .git works too, and no unpacked dependency under the tree contributes its own).
rm -rf "$dir"
boost_tu=$work/boost_includes.cpp
(cd "$repo" && grep -rhE '^\s*#\s*include\s*<boost/' --include='*.cpp' --include='*.hpp' \
  --include='*.h' --include='*.cu' core kernels policies sdk tools tests || true) |
  sort -u >"$boost_tu"
if [ ! -s "$boost_tu" ]; then
  echo "gpu-deps: no #include <boost/...> found under $repo/{core,kernels,policies,sdk,tools,tests};" \
    "expected Boost.DLL's (core/plugin): is this a tpengine source tree?" >&2
  exit 1
fi

mkdir -p "$dir"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$dir"; done
usr=$dir/usr
lib=$usr/lib/$arch

# Packages that still install under /lib join the rest in usr/lib, and absolute links (zlib's
# libz.so -> /lib/...) become relative ones inside the folder.
if [ -d "$dir/lib" ]; then
  cp -a "$dir/lib/." "$usr/lib/"
  rm -rf "${dir:?}/lib"
fi
while read -r link; do
  target=$(readlink "$link")
  ln -sfr "$usr${target#/usr}" "$link"
done < <(find "$dir" -type l -lname '/*')

rm -rf "$usr/share/doc" "$usr/share/man" "$usr/share/lintian" "$usr/share/bug" "$usr/src"
find "$usr" -name '*.a' ! -name 'libgtest*.a' -delete
find "$lib" -name 'liblapack*' -delete

# Boost: those includes and their closure under the host compiler.
keep=$work/boost_keep
echo "boost/version.hpp" >"$keep"
# BOOST_DLL_USE_STD_FS: the definition core/CMakeLists.txt compiles Boost.DLL with. -M lists
# the headers separated by spaces and backslash-newlines.
# shellcheck disable=SC1003
"${CXX:-c++}" -std=c++20 -DBOOST_DLL_USE_STD_FS -I"$usr/include" -M "$boost_tu" |
  tr -s ' \\' '\n' | sed -n "s#^$usr/include/\(boost/.*\)#\1#p" >>"$keep"
(cd "$usr/include" && find boost/config boost/predef -type f) >>"$keep"
# Each Boost library touched is kept whole (boost/X/ and boost/X.hpp): another compiler than
# this one takes other #if branches, and a header missing here would be taken from any other
# Boost on that machine's default include path (CMake's "one Boost" check stops such a mix).
while read -r module; do
  (cd "$usr/include" && find "boost/$module" -type f 2>/dev/null || true
   [ ! -f "boost/$module.hpp" ] || echo "boost/$module.hpp")
done < <(sed -n 's#^boost/\([^/.]*\)[/.].*#\1#p' "$keep" | sort -u) >>"$keep.modules"
cat "$keep.modules" >>"$keep"
mv "$usr/include/boost" "$work/boost"
while read -r header; do
  mkdir -p "$usr/include/$(dirname "$header")"
  cp -p "$work/$header" "$usr/include/$header"
done < <(sort -u "$keep")

# OpenBLAS: the alternatives links, relative.
for header in cblas.h f77blas.h openblas_config.h; do
  ln -sf "openblas-pthread/$header" "$usr/include/$arch/$header"
done
for so in libopenblas.so libopenblas.so.0 libblas.so libblas.so.3; do
  ln -sf "openblas-pthread/$so" "$lib/$so"
done

# pkg-config files: prefix=/usr and friends become paths relative to the .pc file.
while read -r pc; do
  rel=$(realpath --relative-to="$(dirname "$pc")" "$usr")
  sed -i -E "s#^([A-Za-z_]+)=/usr(/|\$)#\\1=\${pcfiledir}/$rel\\2#" "$pc"
done < <(find "$usr" -name '*.pc')

# FlashInfer's headers (tools/fetch-flashinfer.sh), found by CMake on CMAKE_PREFIX_PATH.
"$repo/tools/fetch-flashinfer.sh"
cp -a "$repo/.deps/flashinfer" "$dir/flashinfer"

cat >"$dir/env.sh" <<'EOF'
# Source from bash: points CMake, pkg-config and the loader at the packages in this folder.
tpe_deps_usr=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/usr
export CMAKE_PREFIX_PATH="$tpe_deps_usr:${tpe_deps_usr%/usr}/flashinfer${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export PKG_CONFIG="$tpe_deps_usr/bin/pkgconf"
export PKG_CONFIG_LIBDIR="$tpe_deps_usr/lib/x86_64-linux-gnu/pkgconfig:$tpe_deps_usr/share/pkgconfig"
export LD_LIBRARY_PATH="$tpe_deps_usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset tpe_deps_usr
EOF

tar -cJf "$dir.tar.xz" -C "$(dirname "$dir")" "$(basename "$dir")"
echo "gpu-deps: $(du -sh "$dir" | cut -f1) in $dir, $(du -sh "$dir.tar.xz" | cut -f1) packed in" \
  "$dir.tar.xz; on the target: source $(basename "$dir")/env.sh"
