#!/usr/bin/env bash
# Vulkan on the lent H200, through NVIDIA's Vulkan driver, with libraries built here (no build there):
# (a) bench/device/check_vulkan.py, CPU vs Vulkan of the same libraries (probe/capture scores, biased
# logits, plain/exact/fast tokens and S), flash attention off and on, F16 and q8_0 K cache; (b)
# `dysco-edge devices --check` (exit 1 on a DySCO node falling back to the CPU), F16 and q8_0 K; (c) the
# speed table plain / fast / exact through the public API (bench/speed/bench_api.py, beside
# llama-cpp-python's Llama on the same libllama), every layer on the GPU, flash attention on, decode only
# (--no-prefill: the cold calls would take most of the time at 30K).
# Results in $OUT/vk. Meant to take about 6 minutes there with the defaults (not yet timed there; locally on
# lavapipe with SmolLM2 and the small settings below, (a) and (b) took 11 minutes).
#   here:  bench/verify/build_vulkan.sh && bench/device/pack_vulkan.sh && bash bench/device/prepare.sh
#   there, carry [".vk", ".dev"], from the repository root:  bash bench/device/vulkan_session.sh
# MODEL (default qwen2.5-coder-1.5b: its file in ~/.cache/dysco-edge/models there), CONTEXTS
# ("4096 16384 30720"), GEN (64), REPEATS (2), PROMPT (400), TOKENS (16), FA ("off on") and KTYPES
# ("f16 q8_0") pick the work; VK_PARTS (default "check devices speed") which of (a), (b), (c) run.
# VK_LOCAL=1 tests the script on a machine with a Vulkan loader (lavapipe here: VK_LOCAL=1
# GGML_VK_VISIBLE_DEVICES=0 MODEL=smollm2-135m CONTEXTS=512 ...): no packages unpacked into /.
set -uo pipefail
out=${OUT:-/tmp/out}/vk; mkdir -p "$out"
if [ -d .dev/device/wheels ]; then  # the Python side prepare.sh packs (run.sh does the same)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib
else
    export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${VK_LOCAL:-}" ]; then
    # NVIDIA's ICD is there, the loader and glvnd are not: without glvnd the loader cannot get
    # vkCreateInstance from libGLX_nvidia and ggml silently finds no device
    for deb in .vk/debs/*.deb; do dpkg -x "$deb" /; done
    ldconfig
    export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
fi
lib=/tmp/vklib; rm -rf $lib; mkdir -p $lib && tar -xJf .vk/vulkan-libs.tar.xz -C $lib
export DYSCO_EDGE_LIB_DIR=$lib LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PYTHONUNBUFFERED=1
model=${MODEL:-qwen2.5-coder-1.5b}
start=$(date +%s)
part() { case " ${VK_PARTS:-check devices speed} " in *" $1 "*) return 0 ;; esac; return 1; }
{
    python3 -m dysco_edge.cli devices
    part check && echo "== (a) CPU vs Vulkan" && {
    python3 bench/device/check_vulkan.py --model "$model" --prompt "${PROMPT:-400}" --tokens "${TOKENS:-16}" \
        --flash-attn ${FA:-off on} --type-k ${KTYPES:-f16 q8_0} --json "$out/check.json" > "$out/check.md" 2> "$out/check.err"
    echo "check rc=$?"; cat "$out/check.md"; }
    part devices && echo "== (b) devices --check" && for k in ${KTYPES:-f16 q8_0}; do
        python3 -m dysco_edge.cli devices --check "$model" --flash-attn on --cache-type-k $k \
            > "$out/devices-$k.txt" 2> "$out/devices-$k.err"
        echo "devices --check K $k rc=$?"; tail -n 4 "$out/devices-$k.txt"
    done
    part speed && echo "== (c) speed, $(( $(date +%s) - start )) s in" && {
    python3 bench/speed/bench_api.py --model "$model" --contexts ${CONTEXTS:-4096 16384 30720} --gen "${GEN:-64}" \
        --repeats "${REPEATS:-2}" --n-gpu-layers 99 --flash-attn on --no-prefill --out "$out/speed.md" 2> "$out/speed.err"
    echo "speed rc=$?"; tail -n 3 "$out/speed.err"; }
    echo "vulkan session (${VK_PARTS:-check devices speed}) done in $(( $(date +%s) - start )) s"
} 2>&1 | tee -a "$out/session.log"
