#!/usr/bin/env bash
# Packs what bench/device/vulkan_session.sh needs on the lent H200 (no network, no Vulkan loader) into
# DEST (default .vk, git-ignored): the libraries of a Vulkan build (bench/verify/build_vulkan.sh; they
# run there unchanged) as vulkan-libs.tar.xz, and Debian's Vulkan loader and glvnd packages (amd64,
# bookworm: NVIDIA's ICD there needs glvnd's libGLX/libEGL to be found). The session also needs the
# Python side of .dev/device (bench/device/prepare.sh). Run from the repository root:
#   bench/device/pack_vulkan.sh [BUILD_DIR [DEST]]      # defaults build/vulkan, .vk
set -euo pipefail
build=${1:-build/vulkan}
dest=${2:-.vk}
mkdir -p "$dest/debs"
# the real files under their sonames (libllama.so.0 -> libllama.so.0.5.0 ...), as the loader asks for them
tar -C "$build/bin" -cJf "$dest/vulkan-libs.tar.xz" --dereference $(cd "$build/bin" && ls lib*.so lib*.so.0)
(cd "$dest/debs" && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null)
du -sh "$dest"/vulkan-libs.tar.xz "$dest/debs"
