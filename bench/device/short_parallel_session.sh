#!/usr/bin/env bash
# A short lease for issue 26 (about 8 minutes): build libllama with CUDA, a batched step's parts in process
# (parallel_step.py, plain and fast at 4 and 8 clients), then `dysco-edge serve --parallel N`'s rows of
# bench_parallel.py (plain and fast, 1/2/4/8 clients), without llama-server or the in-process rows (whose
# builds and runs round_session.sh's `parallel` part adds; IN_PROCESS=1 adds the in-process rows).
# Results under /tmp/res; `done` marks the end.
#   there, call 1, carry [".dev"]:  setsid nohup bash bench/device/short_parallel_session.sh > /dev/null 2>&1 < /dev/null &
#   there, a call per model part:   bash bench/device/eval_gpu.sh take qwen15 K [SHA256 on the last]
#   there, to collect:              tar czf "$OUT"/res.tgz -C /tmp res
set -u
if [ -z "${SESSION_COPY:-}" ]; then  # every call syncs the working tree again: run from a copy of it
    rm -rf /tmp/wt && mkdir -p /tmp/wt && cp -a . /tmp/wt && cd /tmp/wt && SESSION_COPY=1 exec bash bench/device/short_parallel_session.sh
fi
export OUT=/tmp/res; mkdir -p $OUT
export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib PYTHONUNBUFFERED=1
QWEN=$HOME/.cache/dysco-edge/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf  # where Model finds its head map
{
    start=$(date +%s)
    bash bench/device/run.sh build || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl > /dev/null 2>&1
    until [ -f /tmp/models/qwen15.ok ]; do sleep 2; done
    mkdir -p "$(dirname "$QWEN")" && ln -f /tmp/models/qwen15.gguf "$QWEN"
    export DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin
    echo "== steps at $(( $(date +%s) - start )) s"
    # STEP_ROWS: parallel_step.py's arguments per row, ';' between rows (none: no step rows)
    rows=${STEP_ROWS:-"--mode plain --clients 4;--mode plain --clients 8;--mode fast --clients 4;--mode fast --clients 8"}
    [ "$rows" = none ] && rows=""
    { echo "| mode | sampling | clients | steps | step ms | decode+sync ms | of it sync ms | hooks ms | sample ms | rest ms | graph reused | period ms |"
      echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
      list=(); [ -n "$rows" ] && IFS=';' read -ra list <<< "$rows"
      for row in ${list[@]+"${list[@]}"}; do
          echo "## $row" >&2
          DYSCO_HOST_TIMELINE=1 timeout 90 taskset -c 0-13 python3 bench/device/parallel_step.py --model "$QWEN" \
              --doc-tokens 8192 --gen ${STEP_GEN:-128} $row
      done; } > $OUT/parallel-step.md 2> $OUT/parallel-step.err
    echo "== server rows at $(( $(date +%s) - start )) s"
    timeout ${BENCH_S:-330} taskset -c 0-13 python3 bench/speed/bench_parallel.py --model "$QWEN" \
        --clients ${CLIENTS:-1 2 4 8} --doc-tokens 8192 --gen 512 --rounds ${ROUNDS:-2} --modes ${MODES:-plain fast} \
        --n-gpu-layers 99 --flash-attn on ${IN_PROCESS:+--in-process} --log-dir $OUT/parallel --out $OUT/parallel/parallel.md \
        > $OUT/session-parallel.log 2>&1
    echo "== done at $(( $(date +%s) - start )) s"
} > $OUT/session.log 2>&1
touch $OUT/done
