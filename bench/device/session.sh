#!/usr/bin/env bash
# One lent-GPU session's measurements, run in the background (setsid) so that it outlives the call
# that starts it; results and logs go to /tmp/res (copy them to $OUT from a later call):
#   build, then fast/exact/plain decode speed for the Qwen2.5-1.5B and Qwen3-8B shapes at 4K and 32K,
#   then the KV cache on disk for a 30K-token document on the Qwen2.5-1.5B shape.
set -u
export OUT=/tmp/res; mkdir -p $OUT
{
    bash bench/device/run.sh build || exit 1
    for shape in qwen2.5-1.5b qwen3-8b; do
        SHAPE=$shape CONTEXTS="4096 32768" REPEATS=3 GEN=128 bash bench/device/run.sh speed
    done
    SHAPE=qwen2.5-1.5b TOKENS=30000 bash bench/device/run.sh doccache
    echo "session done"
} > $OUT/session.log 2>&1
