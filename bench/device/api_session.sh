#!/usr/bin/env bash
# Issue 24's speed table on the lent GPU machine (nvidia-h200), run in the background (setsid) so that it
# outlives the call that starts it: builds libllama and llama-bench with CUDA for sm_90 (run.sh build),
# waits for the model that `eval_gpu.sh take` joins, checks and marks (/tmp/models/NAME.ok), then runs
# bench/speed/bench_api.py (run.sh speed: plain / fast / exact through the public API, llama-cpp-python's
# Llama and llama-bench, all layers offloaded, flash attention on) at 4K, 16K and 32K.
#   here, once:  bash bench/device/prepare.sh && bash bench/device/eval_gpu.sh ship QWEN.gguf qwen15
#                (QWEN.gguf: python -c 'from dysco_edge.models import resolve; print(resolve("qwen2.5-coder-1.5b"))')
#   there, call 1, carry [".dev"]:   setsid nohup bash bench/device/api_session.sh > /dev/null 2>&1 &
#   there, a call per part K, carry [".evalship/qwen15.partK"]:
#                                    bash bench/device/eval_gpu.sh take qwen15 K    (SHA256 as 3rd argument on the last)
#   there, until the log ends with "api session done":  tail /tmp/res/api-session.log; cp /tmp/res/* "$OUT"/
# NAME (default qwen15), HEADS, CONTEXTS, REPEATS and FLASH_ATTN (on) pass through. After the build it
# checks CUDA against the CPU backend (run.sh check) and writes the random-weight 8B shapes of SHAPES
# (default qwen3-8b llama-3.1-8b) while the real model is measured; then measures those shapes too.
set -u
export OUT=/tmp/res; mkdir -p $OUT
name=${NAME:-qwen15}
{
    bash bench/device/run.sh build || exit 1
    bash bench/device/run.sh check > $OUT/check.log 2>&1
    shapes=${SHAPES-qwen3-8b llama-3.1-8b}
    ( for s in $shapes; do SHAPE=$s bash bench/device/run.sh model; done ) > $OUT/make-shapes.log 2>&1 &
    until [ -f /tmp/models/$name.ok ]; do sleep 2; done
    MODEL=/tmp/models/$name.gguf HEADS=${HEADS:-head_maps/qwen2.5-coder-1.5b-instruct.json} \
        CONTEXTS="${CONTEXTS:-4096 16384 32768}" bash bench/device/run.sh speed
    wait
    for s in $shapes; do SHAPE=$s CONTEXTS="${CONTEXTS:-4096 16384 32768}" bash bench/device/run.sh speed; done
    echo "api session done"
} > $OUT/api-session.log 2>&1
