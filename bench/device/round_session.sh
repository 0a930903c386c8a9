#!/usr/bin/env bash
# One lease of the lent GPU machine (nvidia-h200) for issues 24-26, run in the background (setsid) so that it
# outlives the call that starts it. In order: build libllama, llama-bench and llama-server with CUDA
# (run.sh build); check CUDA against the CPU backend (run.sh check); the golden cases on CUDA with flash
# attention off and on (once SmolLM2 arrives) and, once the real Qwen2.5-Coder-1.5B arrives, Vulkan against
# the CPU (vulkan_session.sh), all while llama-server builds; then the timed parts: Vulkan's speed, the
# consumer-GPU configurations (consumer_session.sh),
# issue 24's speed table again (run.sh speed) and parallel sequences against llama-server
# (parallel_session.sh). Each writes under /tmp/res.
#   here, once:  bash bench/device/prepare.sh; cp ../shared/golden/smollm2_reference.json .dev/device/
#                bash bench/device/eval_gpu.sh ship QWEN.gguf qwen15; the same for SmolLM2 Q4_1 as smol
#   there, call 1, carry [".dev"]:  setsid nohup bash bench/device/round_session.sh > /dev/null 2>&1 &
#   there, a call per part:         bash bench/device/eval_gpu.sh take NAME K [SHA256 on the last]
#   there, to collect:              tail /tmp/res/round-session.log; tar czf "$OUT"/res.tgz -C /tmp res
# Not in the default, issue 26's: parallel-cpu runs its CPU table (SmolLM2, 2 cores pinned, no GPU, and
# llama-batched-bench there) in the background; argsort-check ggml_argsort on CUDA against a stable sort
# (bench/device/argsort_check.cpp); parallel-check a sequence in a batch against alone on CUDA
# (check_parallel.py); parallel-step a batched step's parts and one step's kernels (parallel_step.py at
# STEP_CLIENTS clients, default "4 8"; ncu: NCU_MODES at NCU_CLIENTS (default 4; batch steps only, so at least 2), HOST_AB=1 adds host-sampled rows, GREEDY_AB=1 rows with llama.cpp's greedy sampler,
# STEP_ENV_AB=1 rows with CUDA graphs off and with graph reuse off, STEP_ENVS rows in other environments at STEP_ENV_CLIENTS); batched llama.cpp's llama-batched-bench at 8K tokens.
# PARTS (default "golden vulkan-check vulkan-speed consumer speed parallel") picks what runs after the build and check (each
# part under a time limit: VK_S, CONSUMER_S, SPEED_S, PARALLEL_S seconds); speed is
# run.sh speed (issue 24's table) on the real model at SPEED_CONTEXTS (default "4096 30720").
set -u
# every call to the machine syncs its working tree again, and a file being synced is missing for a moment
# (a server started then failed to import dysco_edge): the session runs from a copy of the tree
if [ -z "${ROUND_SESSION_COPY:-}" ]; then
    rm -rf /tmp/wt && mkdir -p /tmp/wt && cp -a . /tmp/wt && cd /tmp/wt && ROUND_SESSION_COPY=1 exec bash bench/device/round_session.sh
fi
export OUT=/tmp/res; mkdir -p $OUT
export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib PYTHONUNBUFFERED=1

# "$@" for at most $1 seconds, then the whole process group it started: timeout signals only its child, and
# a timed-out part's bench and server went on decoding beside the next part's measurement
limit() {
    local s=$1; shift
    setsid "$@" &
    local pid=$!
    ( sleep "$s"; kill -TERM -- -$pid 2>/dev/null; sleep 5; kill -KILL -- -$pid 2>/dev/null ) &
    local watch=$!
    wait $pid
    local rc=$?
    kill $watch 2>/dev/null
    return $rc
}

wait_model() {  # eval_gpu.sh take marks a whole, checked model with NAME.ok
    until [ -f "/tmp/models/$1.ok" ]; do sleep 2; done
}

# the catalog's cache path: there Model finds the shipped head map for the file (no part packages there)
QWEN=$HOME/.cache/dysco-edge/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf
export QWEN
place_qwen() {
    wait_model qwen15
    mkdir -p "$(dirname "$QWEN")" && ln -f /tmp/models/qwen15.gguf "$QWEN"
}

golden() {
    wait_model smol
    python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from models import dequantize_gguf
dequantize_gguf(Path('/tmp/models/smol.gguf'), Path('/tmp/models/smol-f32.gguf'))"
    for fa in "" --flash-attn; do
        echo "## golden cases on CUDA, all layers offloaded, flash attention ${fa:+on}${fa:-off}"
        DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin python3 bench/verify/conformance.py --model /tmp/models/smol-f32.gguf \
            --golden .dev/device/smollm2_reference.json --n-gpu-layers 99 $fa
    done > $OUT/golden-cuda.md 2> $OUT/golden-cuda.err
}

step_rows() {
    local py="python3 bench/device/parallel_step.py --model $QWEN --doc-tokens 8192"
    export DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin
    { echo "| mode | sampling | clients | steps | step ms | decode+sync ms | of it sync ms | hooks ms | sample ms | rest ms | graph reused | period ms |"
      echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
      for mode in plain fast; do for n in ${STEP_CLIENTS:-4 8}; do for hs in "" ${HOST_AB:+--host-sampling} ${GREEDY_AB:+--llama-greedy}; do
          echo "## $mode $n $hs" >&2  # DySCO's host timeline of the run follows, in parallel-step.err
          DYSCO_HOST_TIMELINE=1 timeout 120 taskset -c 0-13 $py --clients $n --gen 128 --mode $mode $hs
      done; done; done
      # STEP_ENV_AB=1: the last STEP_CLIENTS again with CUDA graphs off, then with llama.cpp's graph reuse off
      # (whether a fast step's extra host time inside llama_decode is a CUDA graph update or a rebuild)
      # STEP_ENVS: other environments to run those rows in instead (e.g. "GGML_CUDA_DISABLE_GRAPHS=1"), at
      # STEP_ENV_CLIENTS clients (default the last of STEP_CLIENTS)
      last=${STEP_CLIENTS:-4 8}; last=${last##* }
      for env in ${STEP_ENVS:-${STEP_ENV_AB:+GGML_CUDA_DISABLE_GRAPHS=1 LLAMA_GRAPH_REUSE_DISABLE=1}}; do
          for n in ${STEP_ENV_CLIENTS:-$last}; do for mode in plain fast; do
              echo "## $mode $n $env" >&2
              env $env DYSCO_HOST_TIMELINE=1 timeout 120 taskset -c 0-13 $py --clients $n --gen 128 --mode $mode --note "$env"
          done; done
      done; } > $OUT/parallel-step.md 2> $OUT/parallel-step.err
    for mode in ${NCU_MODES-plain fast}; do
        limit ${NCU_S:-150} ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
            $py --clients ${NCU_CLIENTS:-4} --gen 48 --mode $mode --profile-step 10 > $OUT/ncu-$mode.csv 2> $OUT/ncu-$mode.err
        python3 bench/device/kernel_profile.py --summarize $OUT/ncu-$mode.csv > $OUT/kernels-$mode.md 2>&1
    done
}

{
    start=$(date +%s)
    bash bench/device/run.sh build || exit 1
    # llama-server (parallel_session.sh's baseline) builds while the correctness checks run
    ( bash bench/device/run.sh build-server > $OUT/build-server.log 2>&1 ) &
    server_build=$!
    ( for s in ${SHAPES-qwen3-8b llama-3.1-8b}; do SHAPE=$s bash bench/device/run.sh model; done ) > $OUT/make-shapes.log 2>&1 &
    if [ "${CHECK:-1}" = 1 ]; then  # CHECK=0: a lease that already ran it skips it
        bash bench/device/run.sh check > $OUT/check.log 2>&1
        echo "check rc=$? at $(( $(date +%s) - start )) s"
    fi
    for part in ${PARTS:-golden vulkan-check vulkan-speed consumer speed parallel}; do
        echo "== $part at $(( $(date +%s) - start )) s"
        case $part in
            golden) golden ;;
            speed) place_qwen; wait $server_build
                   MODEL=$QWEN HEADS=head_maps/qwen2.5-coder-1.5b-instruct.json CONTEXTS="${SPEED_CONTEXTS:-4096 30720}" \
                       limit ${SPEED_S:-300} bash bench/device/run.sh speed > $OUT/speed.log 2>&1 ;;
            vulkan-check) place_qwen  # correctness only: it may share the machine with the llama-server build
                    MODEL=$QWEN VK_PARTS="check devices" limit ${VK_S:-330} bash bench/device/vulkan_session.sh > /dev/null ;;
            vulkan-speed) place_qwen; wait $server_build
                    MODEL=$QWEN VK_PARTS=speed CONTEXTS="${VK_CONTEXTS:-4096 16384}" limit ${VK_S:-330} \
                        bash bench/device/vulkan_session.sh > /dev/null ;;
            consumer) place_qwen; wait $server_build; limit ${CONSUMER_S:-420} bash bench/device/consumer_session.sh > /dev/null ;;
            parallel) place_qwen; wait $server_build; MODEL=$QWEN ROUNDS=${ROUNDS:-1} limit ${PARALLEL_S:-540} \
                          taskset -c 0-13 bash bench/device/parallel_session.sh > /dev/null ;;
            parallel-cpu) wait_model smol; wait $server_build  # issue 26's CPU row: 2 cores of 16, no GPU, beside the GPU run
                mkdir -p $OUT/parallel-cpu
                ( export CUDA_VISIBLE_DEVICES= DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin
                  limit ${PARALLEL_CPU_S:-600} taskset -c 14,15 \
                    python3 bench/speed/bench_parallel.py --model /tmp/models/smol.gguf --clients 1 2 4 --doc-tokens 1024 \
                    --gen 128 --rounds 2 --threads 2 --n-gpu-layers 0 --in-process --llama-server build/llama-server/bin/llama-server \
                    --log-dir $OUT/parallel-cpu --out $OUT/parallel-cpu/parallel.md > $OUT/parallel-cpu/session.log 2>&1
                  taskset -c 14,15 build/llama-server/bin/llama-batched-bench -m /tmp/models/smol.gguf -c 8192 -b 512 -ub 512 \
                    -npp 1024 -ntg 128 -npl 1,2,4 -t 2 -ngl 0 -fa off > $OUT/parallel-cpu/batched.log 2>&1 ) & ;;
            parallel-check) wait_model smol; place_qwen  # issue 26: a sequence in a batch vs alone, on CUDA
                DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin limit ${PCHECK_S:-300} taskset -c 0-13 python3 bench/device/check_parallel.py \
                    --smol /tmp/models/smol.gguf --qwen $QWEN > $OUT/check-parallel.md 2> $OUT/check-parallel.err ;;
            parallel-step) place_qwen; wait $server_build  # issue 26: a batched step's parts, plain against fast, and one step's kernels under ncu
                step_rows ;;
            argsort-check)  # ggml_argsort on CUDA against a stable sort on the host, timed
                g++ -O2 -std=c++17 bench/device/argsort_check.cpp -I .dev/device/llama.cpp/ggml/include -L build/cuda/bin \
                    -lggml -lggml-base -Wl,-rpath,$PWD/build/cuda/bin -o /tmp/argsort_check &&
                    timeout 120 /tmp/argsort_check > $OUT/argsort-check.md 2> $OUT/argsort-check.err ;;
            batched) place_qwen; wait $server_build  # llama.cpp's own batched decode, no server: the ceiling of issue 26's table
                taskset -c 0-13 build/llama-server/bin/llama-batched-bench -m $QWEN -c $((8 * 8448)) -b 2048 -ub 512 \
                    -npp 8192 -ntg 128 -npl 1,2,4,8 -ngl 99 -fa on > $OUT/batched.log 2>&1 ;;
        esac
        echo "== $part rc=$? at $(( $(date +%s) - start )) s"
    done
    wait
    echo "round session done at $(( $(date +%s) - start )) s"
} > $OUT/round-session.log 2>&1
