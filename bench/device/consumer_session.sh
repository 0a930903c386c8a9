#!/usr/bin/env bash
# Issue 25's consumer-GPU configurations on the lent H200, after bench/device/api_session.sh has run in
# the same machine session: it built CUDA libllama into build/cuda/bin, took the real
# Qwen2.5-Coder-1.5B-Instruct into /tmp/models/qwen15.gguf and wrote the random-weight 8B shapes to
# /tmp/qwen3-8b.gguf and /tmp/llama-3.1-8b.gguf. Builds nothing; a missing shape is written here
# (run.sh model) and a missing real model ends the script. Results as Markdown in $OUT/consumer/:
#   check.md   partial offload (QR layers on both sides of the split), --no-kv-offload, q8_0 and q4_0
#              KV with flash attention: tokens and selected sets against the CPU (consumer_check.py)
#   speed-*.md plain / fast / exact of each configuration through the public API (bench_api.py)
#   budget.md  what --gpu-memory 8G/12G/24G chooses for the 1.5B model and the 8B shapes at 8K and 32K,
#              the device memory it took (nvidia-smi) and its decode speed (consumer_budget.py)
#   there:  bash bench/device/consumer_session.sh        (about 7 minutes; OUT defaults to /tmp/out)
# Here, without a GPU (the script's logic on the CPU, RPC servers standing in for the GPU):
#   MODEL=$(python -c 'from dysco_edge.models import resolve; print(resolve("smollm2-135m"))') SHAPES= \
#   LIB=$DYSCO_EDGE_LIB_DIR RPC=127.0.0.1:50052 THREADS=1 DOC=400 CONTEXTS="1024" BUDGET_CONTEXTS="1024 4096" \
#   BUDGETS="400M 1G" bash bench/device/consumer_session.sh
# Knobs: MODEL, HEADS, SHAPES, DOC (document tokens of the checks, 1500), GEN (24), CONTEXTS (speed, 4096),
# REPEATS (2), BUDGETS ("8G 12G 24G"), BUDGET_CONTEXTS ("8192 32768"), RPC, THREADS, LIB.
set -u
out=${OUT:-/tmp/out}/consumer; mkdir -p "$out"
if [ -d .dev/device/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib${PYTHONPATH:+:$PYTHONPATH}
export DYSCO_EDGE_LIB_DIR=${LIB:-$PWD/build/cuda/bin} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
model=${MODEL:-/tmp/models/qwen15.gguf}
heads=${HEADS:-}
[ -z "$heads" ] && [ "$(basename "$model")" = qwen15.gguf ] && heads=head_maps/qwen2.5-coder-1.5b-instruct.json
[ -f "$model" ] || { echo "no model at $model: run api_session.sh (and eval_gpu.sh take) first" | tee "$out/error.txt"; exit 1; }
rpc=${RPC:+--rpc $RPC}
threads=${THREADS:+--threads $THREADS}
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

stamp "checks against the CPU"
$py bench/device/consumer_check.py --model "$model" ${heads:+--head-map $heads} --doc-tokens "${DOC:-1500}" --gen "${GEN:-24}" $rpc $threads \
    > "$out/check.md" 2> "$out/check.err"; tail -2 "$out/check.err"

stamp "speed of each configuration"
n_gpu=$($py bench/device/consumer_check.py --model "$model" ${heads:+--head-map $heads} --print-split 2>/dev/null)
speed() {  # name, then bench_api options
    local name=$1; shift
    $py bench/speed/bench_api.py --model "$model" ${heads:+--head-map $heads} --contexts ${CONTEXTS:-4096} \
        --gen "${GEN:-24}" --repeats "${REPEATS:-2}" --no-prefill --no-llama --llama-bench /nonexistent \
        $threads $rpc "$@" --out "$out/speed-$name.md" > /dev/null 2> "$out/speed-$name.err" \
        || tail -3 "$out/speed-$name.err"
}
speed all --n-gpu-layers 99 --flash-attn on
speed partial --n-gpu-layers "$n_gpu" --flash-attn on
speed no-kv-offload --n-gpu-layers 99 --no-kv-offload --flash-attn on
speed q8_0 --n-gpu-layers 99 --cache-type-k q8_0 --cache-type-v q8_0 --flash-attn on
speed q4_0 --n-gpu-layers 99 --cache-type-k q4_0 --cache-type-v q4_0 --flash-attn on

stamp "memory budgets"
shapes=${SHAPES-qwen3-8b llama-3.1-8b}
models=("$model${heads:+=$heads}")
for s in $shapes; do  # random weights with the published heads, as run.sh measures them
    [ -f /tmp/$s.gguf ] || SHAPE=$s bash bench/device/run.sh model > "$out/make-$s.log" 2>&1
    case "$s" in llama-3.1-8b) hm=head_maps/llama-3.1-8b-instruct.json ;; *) hm=head_maps/$s.json ;; esac
    [ -f /tmp/$s.gguf ] && models+=("/tmp/$s.gguf=$hm")
done
$py bench/device/consumer_budget.py --models "${models[@]}" --contexts ${BUDGET_CONTEXTS:-8192 32768} \
    --budgets ${BUDGETS:-8G 12G 24G} --repeats "${REPEATS:-2}" $rpc > "$out/budget.md" 2> "$out/budget.err"
tail -2 "$out/budget.err"

{ cat "$out/check.md"; echo; for f in "$out"/speed-*.md; do echo "## $(basename "$f" .md)"; cat "$f"; echo; done
  cat "$out/budget.md"; } > "$out/consumer.md"
stamp "consumer session done: $out/consumer.md"
