#!/usr/bin/env bash
# Issue 16 on the lent 2-GPU machine, start to end in the background (a call may last 10 minutes,
# the machine stays ours only while calls follow each other):
#   setsid nohup bash bench/device/long_eval.sh > /tmp/long_eval.log 2>&1 &
# build -> (wait for /tmp/models/qwen15.ok, made once `bench/device/eval_gpu.sh take` checked the model)
# -> head detection (default, long calibration prompts, layer cap) with the difficulty calibration
# (plain, dev, 8K) -> dev at 16K (every variant) -> the variant chosen on dev against plain and
# random heads on test at 16K (n=100), with the gold-attention measurement -> the 2-GPU split
# speed (issue 20) -> test at 32K with the time left. Results in /tmp/i16; STAGE.done marks each.
set -u
M=/tmp/models/qwen15.gguf R=/tmp/i16 START=$(date +%s)
export OUT=$R  # run.sh writes there too: a call's own $OUT is emptied when the call ends
mkdir -p $R
left() { echo $(( START + ${BUDGET_S:-1500} - $(date +%s) )); }
stage() { echo "$(date +%T) $1" >> $R/stages.txt; }

ev() {  # GPU NAME [eval args]: one `dysco-edge eval` process on one GPU
    local gpu=$1 name=$2; shift 2
    CUDA_VISIBLE_DEVICES=$gpu python3 -m dysco_edge.cli eval $M --batch 2048 --n-gpu-layers 99 --flash-attn \
        --out $R/$name.jsonl "$@" > $R/$name.log 2>&1
}

detect() {  # NAME [detect args]
    local name=$1; shift
    CUDA_VISIBLE_DEVICES=0 python3 -m dysco_edge.cli heads detect $M --n-gpu-layers 99 \
        --name Qwen2.5-Coder-1.5B-Instruct -o $R/heads-$name.json "$@" > $R/detect-$name.log 2>&1
}

setup() {
    bash bench/device/run.sh build > $R/build.log 2>&1 || { stage "build failed"; exit 1; }
    [ -d /tmp/site/cffi ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
        .dev/device/wheels/*.whl > /dev/null 2>&1
    export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin
    export PYTHONUNBUFFERED=1
    # issue 20's 70B file, written on the CPU while the GPUs evaluate (run.sh split-speed finds it)
    [ -f /tmp/llama-3.1-70b.gguf ] || ( python3 bench/device/make_random_gguf.py --shape llama-3.1-70b \
        --vocab-from .dev/device/tiny-qwen3-v1-f32.gguf --out /tmp/70b.part > $R/make-70b.log 2>&1 \
        && mv /tmp/70b.part /tmp/llama-3.1-70b.gguf ) &
    until [ -f /tmp/models/qwen15.ok ]; do sleep 2; done
    stage "built, model here"
}

calibrate() {  # detection and calibration together: calibration is plain decoding, no heads
    detect default & detect long --documents 24 & detect cap --max-layer 13 &
    local gpu=1
    for spec in route:hops=4+ordered=0 route:hops=8+decoys=0 route:hops=8+decoys=1 route:hops=12+decoys=2 \
                passage:repeats=1 passage:repeats=2 passage:repeats=3 \
                chain:hops=3+decoys=2 chain:hops=5+decoys=2 chain:hops=5+decoys=4 chain:hops=8+decoys=2; do
        ev $gpu "calib-${spec//[:=+]/_}" --tasks $spec --lengths 8192 --n 20 --methods plain --time-limit 120 &
        gpu=$(( 1 - gpu ))
    done
    wait
    python3 bench/research/long_eval_pick.py levels $R > $R/levels.txt 2>> $R/picks.txt
    stage "calibrated: $(cat $R/levels.txt)"
}

dev() {
    local maps=$R/heads-default.json t
    for t in ${TASKS//,/ }; do
        ev 0 "dev-A-${t//[:=+]/_}" --tasks $t --lengths 16384 --n 20 --methods plain,dysco,fast --head-map $maps \
            --time-limit 240 &
        ev 1 "dev-B-${t//[:=+]/_}" --tasks $t --lengths 16384 --n 20 --head-map $maps --time-limit 240 \
            --methods "random,dysco:strength=4,dysco:top_k_ratio=0.02,dysco:decay=0.5" &
        ev 0 "dev-long-${t//[:=+]/_}" --tasks $t --lengths 16384 --n 20 --methods dysco \
            --head-map $R/heads-long.json --time-limit 240 &
        ev 1 "dev-cap-${t//[:=+]/_}" --tasks $t --lengths 16384 --n 20 --methods dysco \
            --head-map $R/heads-cap.json --time-limit 240 &
    done
    wait
    python3 bench/research/long_eval_pick.py config $R > $R/config.txt 2>> $R/picks.txt
    stage "dev done: $(cat $R/config.txt)"
}

test_at() {  # LENGTH SECONDS: the chosen variant, plain and random heads on test, two shards a task
    local length=$1 limit=$2 t k method twin map
    read -r method twin map < $R/config.txt
    for t in ${TASKS//,/ }; do
        for k in 0 1; do
            ev $k "test-$length-${t//[:=+]/_}-$k" --tasks $t --lengths $length --n 100 --split test \
                --methods "plain,$method,$twin" --head-map $map --shard $k/2 --time-limit $limit &
        done
    done
}

main() {
    setup
    calibrate
    TASKS=$(cat $R/levels.txt)
    OUT=$R MODEL=$M bash bench/device/run.sh split-check > $R/split-check.log 2>&1 &
    dev
    read -r method twin map < $R/config.txt
    CUDA_VISIBLE_DEVICES=1 timeout 420 python3 bench/research/gold_attention.py $M --tasks $TASKS --length 16384 --n 5 \
        --methods "plain;dysco;$method" --head-map $map --n-gpu-layers 99 --flash-attn \
        --out $R/gold.jsonl > $R/gold.md 2> $R/gold.log &
    test_at 16384 420
    wait
    stage "test 16K done"
    until [ -f /tmp/llama-3.1-70b.gguf ]; do sleep 2; done
    OUT=$R REPEATS=2 bash bench/device/run.sh split-speed > $R/split-speed.log 2>&1
    stage "split speed done"
    [ "$(left)" -gt 120 ] && test_at 32768 $(( $(left) - 60 )) && wait
    stage "all done"
}

main
