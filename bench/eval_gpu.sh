#!/usr/bin/env bash
# The evaluation on the lent GPU machine, in chunks that each end inside one call.
#
#   bench/eval_gpu.sh ship MODEL.gguf NAME           here: split a model into <= 60 MB parts in .evalship/
#   bench/eval_gpu.sh take NAME K [SHA256]           there: append part K to /tmp/models/NAME.gguf
#                                                    (call with carry [".evalship/NAME.partK"]); with
#                                                    the sha256 `ship` printed, check the whole file
#   bench/eval_gpu.sh eval NAME RESULTS [eval args]  there: one chunk of `dysco-edge eval` on the GPU,
#                                                    at most TIME_LIMIT s (default 420); RESULTS comes
#                                                    back in $OUT; run the same line again to continue
#   bench/eval_gpu.sh sweep NAME RESULTS [sweep args]  there: the same for bench/eval_sweep.py (dev)
#
# A model does not fit the 64 MiB a call may carry (SmolLM2 Q4_1 is 98 MB, Gemma 3 270M 253 MB),
# so it travels in parts to a machine kept warm between calls. `eval` needs build/cuda from
# `bench/cuda/run.sh build` on the same machine, and RESULTS inside the working tree (so the file
# travels back and forth: copy it from $OUT into the checkout after each call).
set -uo pipefail
out=${OUT:-/tmp/out}
case "$1" in
ship)
    mkdir -p .evalship .git/info
    grep -qx '/.evalship/' .git/info/exclude 2>/dev/null || echo /.evalship/ >> .git/info/exclude
    rm -f ".evalship/$3".part*
    split -b 60000000 -d -a 1 "$2" ".evalship/$3.part"
    ls -l .evalship/; sha256sum "$2" ;;
take)
    mkdir -p /tmp/models
    [ "$3" = 0 ] && rm -f "/tmp/models/$2.gguf"
    cat ".evalship/$2.part$3" >> "/tmp/models/$2.gguf" && ls -l "/tmp/models/$2.gguf" || exit 1
    [ -z "${4:-}" ] || echo "$4  /tmp/models/$2.gguf" | sha256sum -c ;;
eval|sweep)
    what=$1 name=$2 results=$3; shift 3
    mkdir -p "$out" "$(dirname "$results")"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin PYTHONUNBUFFERED=1
    if [ "$what" = eval ]; then
        run=(python3 -m dysco_edge.cli eval "/tmp/models/$name.gguf" --batch 2048)
    else
        run=(python3 bench/eval_sweep.py "/tmp/models/$name.gguf")
    fi
    "${run[@]}" --out "$results" --n-gpu-layers 99 --flash-attn --time-limit "${TIME_LIMIT:-420}" "$@" \
        > "$out/$what.log" 2>&1
    rc=$?
    cp "$results" "$out/"
    tail -n 30 "$out/$what.log"
    exit $rc ;;
*)
    echo "usage: bench/eval_gpu.sh ship|take|eval ... (see the comments at the top)" >&2; exit 2 ;;
esac
