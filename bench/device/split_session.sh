#!/usr/bin/env bash
# The two-GPU session (nvidia-h200-x2), run in the background (setsid) so that it outlives the call
# that starts it; results and logs go to /tmp/res (copy them to $OUT from a later call):
#   build, split-check (MODEL=... or a random Qwen2.5-1.5B shape), split-speed (Llama-3.1-70B shape).
set -u
export OUT=/tmp/res; mkdir -p $OUT
{
    bash bench/device/run.sh build || exit 1
    nvidia-smi -L
    bash bench/device/run.sh split-check
    REPEATS=${REPEATS:-2} bash bench/device/run.sh split-speed
    echo "split session done"
} > $OUT/split-session.log 2>&1
