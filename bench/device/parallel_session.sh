#!/usr/bin/env bash
# Issue 26's table on the lent GPU machine (nvidia-h200): 1/2/4/8 concurrent streaming clients, each with an
# 8K-token document of its own, against `dysco-edge serve --parallel N` (plain, fast, exact) and llama.cpp's
# `llama-server --parallel N` (plain), same openai client code (bench/speed/bench_parallel.py), real
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M, all layers offloaded, flash attention on. Results in $OUT/parallel/.
#   here, once:   bash bench/device/prepare.sh      (packs the pristine tree for llama-server, and the server's wheels)
#   there, carry [".dev"]:   bash bench/device/parallel_session.sh
# Builds (run.sh build, run.sh build-server) are skipped when their outputs exist (a warm machine of an
# earlier call); the measurement itself takes about 4 minutes. MODEL, CLIENTS, DOC_TOKENS, GEN (512: the
# steady window needs every client decoding at once), MODES (of bench_parallel.py), ROUNDS and BENCH_S (seconds) pass through;
# IN_PROCESS= leaves out the rows of Model(parallel=N) in one process.
set -u
OUT=${OUT:-/tmp/out}; res=$OUT/parallel; mkdir -p "$res"
export OUT=$res
model=${MODEL:-$HOME/.cache/dysco-edge/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf}
{
    [ -f build/cuda/bin/libllama.so ] || bash bench/device/run.sh build || exit 1
    [ -x build/llama-server/bin/llama-server ] || bash bench/device/run.sh build-server || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl > /dev/null 2>&1
    export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin PYTHONUNBUFFERED=1
    nvidia-smi -L
    start=$(date +%s)
    timeout ${BENCH_S:-540} python3 bench/speed/bench_parallel.py --model "$model" --clients ${CLIENTS:-1 2 4 8} \
        --doc-tokens ${DOC_TOKENS:-8192} --gen ${GEN:-512} --rounds ${ROUNDS:-2} ${MODES:+--modes $MODES} --n-gpu-layers 99 --flash-attn on ${IN_PROCESS---in-process} \
        --llama-server build/llama-server/bin/llama-server --log-dir "$res" --out "$res/parallel.md"
    echo "bench rc=$? in $(( $(date +%s) - start )) s"
    echo "parallel session done"
} > "$res/session.log" 2>&1
tail -30 "$res/session.log"
