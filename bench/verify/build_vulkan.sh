#!/usr/bin/env bash
# Builds the package's libraries with ggml's Vulkan backend (-DGGML_VULKAN=ON) on Debian 12, into
# BUILD_DIR (default build/vulkan; the libraries land in BUILD_DIR/bin). Run from the repository root:
#   bench/verify/build_vulkan.sh [BUILD_DIR [cmake args...]]
# Debian 12's Vulkan headers (1.3.239) are too old for the pinned ggml-vulkan (it needs
# VK_EXT_layer_settings): libvulkan-dev and spirv-headers (1.4.309) come from Debian 13 (trixie)
# through a private apt list (the system's sources are untouched) and are unpacked with `dpkg -x`
# into BUILD_DIR/vk-sdk; the libraries link to the system's loader (bookworm's libvulkan1: trixie's
# needs glibc 2.38) and bookworm's glslc compiles the shaders. Needs root for `apt-get install` of
# glslc, libvulkan1 and mesa-vulkan-drivers (lavapipe, to run without a GPU) unless installed.
# JOBS parallel jobs (default 2) at nice 19; ccache when found (CMakeLists.txt). About 10 minutes
# on 2 cores from an empty ccache.
set -euo pipefail
build=${1:-build/vulkan}
shift || true
sdk="$build/vk-sdk"
arch=$(dpkg --print-architecture)

multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
need_pkgs=()
command -v glslc >/dev/null || need_pkgs+=(glslc)
[ -e "/usr/lib/$multiarch/libvulkan.so.1" ] || need_pkgs+=(libvulkan1)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e "/usr/share/vulkan/icd.d/lvp_icd.$(uname -m).json" ] \
    || need_pkgs+=(mesa-vulkan-drivers)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt-get install -y --no-install-recommends "${need_pkgs[@]}"
fi

if [ ! -e "$sdk/usr/include/vulkan/vulkan.hpp" ]; then
    apt_dir="$build/vk-apt"
    mkdir -p "$apt_dir/lists/partial" "$sdk"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$apt_dir/sources.list"
    apt_opts=(-o "Dir::Etc::sourcelist=$PWD/$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::Lists=$PWD/$apt_dir/lists" -o "APT::Architecture=$arch")
    apt-get "${apt_opts[@]}" update
    (cd "$apt_dir" && apt-get "${apt_opts[@]}" download libvulkan-dev spirv-headers)
    for deb in "$apt_dir"/*.deb; do dpkg -x "$deb" "$sdk"; done
fi
sdk_abs=$(cd "$sdk" && pwd)

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON \
    -DPython3_EXECUTABLE="$(command -v python3)" \
    -DVulkan_INCLUDE_DIR="$sdk_abs/usr/include" -DCMAKE_PREFIX_PATH="$sdk_abs/usr" \
    -DVulkan_LIBRARY="/usr/lib/$multiarch/libvulkan.so.1" \
    -DCMAKE_CXX_FLAGS="-I$sdk_abs/usr/include" "$@"
nice -n 19 cmake --build "$build" -j "${JOBS:-2}"
ls "$build"/bin/lib*.so
