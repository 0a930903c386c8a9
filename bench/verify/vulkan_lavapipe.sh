#!/usr/bin/env bash
# The Vulkan check without a GPU, run by hand (too long for CI's 2 cores: the Vulkan build alone takes
# about 10-15 minutes there, and lavapipe decodes SmolLM2 at a few tokens a second). Builds the
# libraries with Vulkan (bench/verify/build_vulkan.sh), then on Mesa's lavapipe (mesa-vulkan-drivers,
# GGML_VK_VISIBLE_DEVICES=0): `dysco-edge devices --check` with an F16 and a q8_0 K cache (fails on a
# DySCO node falling back to the CPU), then bench/device/check_vulkan.py (CPU vs Vulkan: scores, biased
# logits, plain/exact/fast tokens and S). Run from the repository root with the package's Python:
#   bench/verify/vulkan_lavapipe.sh [BUILD_DIR]        # default build/vulkan
# MODEL (default smollm2-135m), PROMPT (200), TOKENS (8), FA ("off on") choose the check.
set -euo pipefail
build=${1:-build/vulkan}
bench/verify/build_vulkan.sh "$build" >/dev/null
export DYSCO_EDGE_LIB_DIR="$PWD/$build/bin" GGML_VK_VISIBLE_DEVICES=0 PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
rc=0
for k in f16 q8_0; do
    "$py" -m dysco_edge.cli devices --check --model "${MODEL:-smollm2-135m}" --flash-attn on --cache-type-k "$k" || rc=1
done
# shellcheck disable=SC2086
"$py" bench/device/check_vulkan.py --model "${MODEL:-smollm2-135m}" --prompt "${PROMPT:-200}" --tokens "${TOKENS:-8}" \
    --n-ctx 1024 --flash-attn ${FA:-off on} --type-k f16 q8_0 || rc=1
exit $rc
