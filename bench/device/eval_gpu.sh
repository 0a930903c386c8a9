#!/usr/bin/env bash
# The evaluation on the lent GPU machine, in chunks that each end inside one call.
#
#   bench/device/eval_gpu.sh ship MODEL.gguf NAME           here: split a model into <= 50 MB parts in .evalship/
#   bench/device/eval_gpu.sh take NAME K [SHA256]           there: keep part K (call with carry
#                                                    [".evalship/NAME.partK"]), in any order; with the
#                                                    sha256 `ship` printed, join the parts kept, check
#                                                    and mark them (/tmp/models/NAME.ok)
#   bench/device/eval_gpu.sh eval NAME RESULTS [eval args]  there: one chunk of `dysco-edge eval` on the GPU,
#                                                    at most TIME_LIMIT s (default 420); RESULTS comes
#                                                    back in $OUT; run the same line again to continue
#   bench/device/eval_gpu.sh sweep NAME RESULTS [sweep args]  there: the same for bench/research/eval_sweep.py (dev)
#   bench/device/eval_gpu.sh par NAME DIR TASKS LENGTHS [eval args]  there: one `eval` process per task and
#                                                    length at once (a 270M model leaves the GPU and
#                                                    15 of 16 cores idle); results in DIR/TASK-LENGTH.jsonl
#
# A model does not fit the 64 MiB a call may carry (SmolLM2 Q4_1 is 98 MB, Gemma 3 270M 253 MB),
# so it travels in parts to a machine kept warm between calls. `eval` needs build/cuda from
# `bench/device/run.sh build` on the same machine, and RESULTS inside the working tree (so the file
# travels back and forth: copy it from $OUT into the checkout after each call).
set -uo pipefail
out=${OUT:-/tmp/out}
case "$1" in
ship)
    mkdir -p .evalship .git/info
    grep -qx '/.evalship/' .git/info/exclude 2>/dev/null || echo /.evalship/ >> .git/info/exclude
    rm -f ".evalship/$3".part*
    split -b 50000000 -d -a 2 "$2" ".evalship/$3.part"  # 50 MB: the working tree travels too (64 MiB a call)
    ls -l .evalship/; sha256sum "$2" ;;
take)
    mkdir -p /tmp/models/parts
    cp ".evalship/$2.part$3" /tmp/models/parts/ && ls -l /tmp/models/parts || exit 1
    [ -z "${4:-}" ] && exit 0
    cat $(ls /tmp/models/parts/"$2".part* | sort -V) > "/tmp/models/$2.gguf"
    # NAME.ok: the model is whole and checked (sessions waiting for it start then)
    echo "$4  /tmp/models/$2.gguf" | sha256sum -c && touch "/tmp/models/$2.ok" ;;
eval|sweep)
    what=$1 name=$2 results=$3; shift 3
    mkdir -p "$out" "$(dirname "$results")"
    [ -d /tmp/site/cffi ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin PYTHONUNBUFFERED=1
    if [ "$what" = eval ]; then
        run=(python3 -m dysco_edge.cli eval "/tmp/models/$name.gguf" --batch 2048)
    else
        run=(python3 bench/research/eval_sweep.py "/tmp/models/$name.gguf")
    fi
    "${run[@]}" --out "$results" --n-gpu-layers 99 --flash-attn --time-limit "${TIME_LIMIT:-420}" "$@" \
        > "$out/$(basename "$results" .jsonl).log" 2>&1
    rc=$?
    [ -n "${IN_PAR:-}" ] || cp "$results" "$out/"
    tail -n 30 "$out/$(basename "$results" .jsonl).log"
    exit $rc ;;
par)
    name=$2 dir=$3 tasks=$4 lengths=$5; shift 5
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl >/dev/null 2>&1
    for task in ${tasks//,/ }; do
        for length in ${lengths//,/ }; do
            IN_PAR=1 bash "$0" eval "$name" "$dir/$task-$length.jsonl" --tasks "$task" --lengths "$length" "$@" > /dev/null &
        done
    done
    wait
    for log in "$out"/*.log; do echo "== $log"; tail -n 1 "$log"; done
    # a call returns at most 8 files: one archive (unpack it into DIR here before the next call)
    tar czf "$out/results.tgz" "$dir" && rm -f "$out"/*.log ;;
*)
    echo "usage: bench/device/eval_gpu.sh ship|take|eval|sweep|par ... (see the comments at the top)" >&2; exit 2 ;;
esac
