#!/usr/bin/env bash
# On the lent GPU machine, from the repository root, after bench/device/prepare.sh ran here and
# .dev was carried: build with CUDA, check against the CPU backend, then measure speed.
#   bench/device/run.sh build|build-server|check|speed|doccache|native|profile|kernels|model|split-check|split-speed
# SHAPE=llama-3.1-8b (default), qwen3-8b, qwen2.5-1.5b or llama-3.1-70b picks the random-weight model and its
# heads (published; for qwen2.5-1.5b bench/speed/qwen2.5-1.5b-bench-heads.json, L_max as its detected map).
# split-check and split-speed need two GPUs (bench/device/split_session.sh runs both in the background).
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/device/wheels/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/python:$PWD/.dev/device/pylib
export DYSCO_EDGE_LIB_DIR=$PWD/build/cuda/bin PYTHONUNBUFFERED=1
shape=${SHAPE:-llama-3.1-8b}
m=/tmp/$shape.gguf
case "$shape" in
    llama-3.1-8b) heads=head_maps/llama-3.1-8b-instruct.json ;;
    llama-3.1-70b) heads=head_maps/llama-3.1-70b-instruct.json ;;
    qwen2.5-1.5b) heads=bench/speed/qwen2.5-1.5b-bench-heads.json ;;
    *) heads=head_maps/$shape.json ;;
esac
make_model() {
    [ -f $m ] || python3 bench/device/make_random_gguf.py --shape $shape --vocab-from .dev/device/tiny-qwen3-v1-f32.gguf --out $m > "$out/make.log" 2>&1
    tail -2 "$out/make.log"
}
case "$1" in
build)
    nvidia-smi -L | tee "$out/device.txt"
    start=$(date +%s)
    # a .dev packed before RPC was built by default lacks ggml-rpc: build without it then
    rpc=$([ -d .dev/device/llama.cpp/ggml/src/ggml-rpc ] && echo ON || echo OFF)
    # llama-bench beside the libraries (build/cuda/bin) when prepare.sh packed it
    lb=$([ -d .dev/device/llama.cpp/tools/llama-bench ] && echo ON || echo OFF)
    cmake -S . -B build/cuda -G Ninja -DGGML_CUDA=ON -DGGML_RPC=$rpc -DDYSCO_LLAMA_BENCH=$lb \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" \
        -DDYSCO_LLAMA_SRC=$PWD/.dev/device/llama.cpp -DPython3_EXECUTABLE=$(which python3) > "$out/cmake.log" 2>&1 \
      && cmake --build build/cuda -j "$(nproc)" > "$out/build.log" 2>&1
    rc=$?; echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$out/device.txt"; tail -5 "$out/build.log"
    exit $rc ;;
build-server)
    # llama.cpp's llama-server from the pristine tree (prepare.sh packs it), no web UI: its own libllama and
    # server on the ggml of run.sh build (the pinned tree's, unpatched, CUDA for sm_90), installed to /tmp/ggml
    start=$(date +%s)
    cmake --install build/cuda --prefix /tmp/ggml > "$out/build-server.log" 2>&1 || exit 1
    GGML_PREFIX=/tmp/ggml DYSCO_LLAMA_SRC=$PWD/.dev/device/llama.cpp JOBS=$(nproc) bash bench/speed/build_llama_server.sh \
        build/llama-server -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" >> "$out/build-server.log" 2>&1
    rc=$?; echo "llama-server build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$out/device.txt"
    tail -3 "$out/build-server.log"; exit $rc ;;
diag)
    for args in "0 nofa" "99 nofa" "99 fa"; do
        echo "== diag $args"; python3 -X faulthandler bench/device/diag.py .dev/device/tiny-qwen3-v1-f32.gguf $args 2>&1 | tail -25
    done ;;
check)
    DYSCO_SCHED_REPORT=1 python3 bench/device/check_cuda.py .dev/device/tiny-qwen3-v1-f32.gguf > "$out/check.md" 2> "$out/check.err"
    rc=$?; cat "$out/check.md"; sort "$out/check.err" | uniq -c | grep "dysco sched" | head; tail -3 "$out/check.err"; exit $rc ;;
speed)
    # through the public API against llama-cpp-python and llama-bench; MODEL=file.gguf (HEADS=map.json,
    # default: the one the model finds), else the random model of SHAPE and its heads
    if [ -n "${MODEL:-}" ]; then m=$MODEL name=$(basename "$MODEL" .gguf) hm=${HEADS:-}
    else make_model; name=$shape hm=$heads; fi
    python3 bench/speed/bench_api.py --model "$m" ${hm:+--head-map $hm} --contexts ${CONTEXTS:-4096 16384 32768} \
        --gen ${GEN:-128} --repeats ${REPEATS:-3} --n-gpu-layers 99 --flash-attn ${FLASH_ATTN:-on} \
        --llama-bench build/cuda/bin/llama-bench --out "$out/speed-$name.md" 2>"$out/speed-$name.err"
    rc=$?; cat "$out/speed-$name.md"; tail -3 "$out/speed-$name.err"; exit $rc ;;
doccache)
    # the KV cache on disk: cold vs cached time to the first answer token (TOKENS long document)
    make_model
    python3 bench/speed/bench_doc_cache.py --model $m --tokens ${TOKENS:-30000} --n-gpu-layers 99 --flash-attn on \
        2>"$out/doccache-$shape.err" | tee "$out/doccache-$shape.md"; tail -3 "$out/doccache-$shape.err" ;;
native)
    python3 bench/speed/bench_native.py --model $m --head-map $heads \
        --contexts ${CONTEXTS:-4096 16384} --steps 48 --n-gpu-layers 99 --flash-attn 2>"$out/native.err" \
        | tee "$out/native.md"; tail -3 "$out/native.err" ;;
profile)
    for c in ${CONTEXTS:-32768}; do
        python3 bench/device/step_profile.py $m $heads --context $c \
            2>>"$out/profile.err" | tee -a "$out/profile.md"
    done; tail -3 "$out/profile.err" ;;
kernels)
    for part in ${PARTS:-probe plain capture}; do
        ${NCU:-$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)} --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file "$out/ncu-$part.csv" \
            python3 bench/device/kernel_profile.py $m $heads \
            --context ${CONTEXTS:-32768} --part $part > "$out/kernels-$part.txt" 2>"$out/kernels-$part.err"
        python3 bench/device/kernel_profile.py --summarize "$out/ncu-$part.csv" >> "$out/kernels-$part.txt"
        head -30 "$out/kernels-$part.txt"
    done ;;
model)
    make_model ;;
split-check)
    # layers split over 2 GPUs (layer, TENSOR_SPLIT 1,1) against 1 GPU (split mode none): scores, logits,
    # exact and fast DySCO decodes; MODEL=file.gguf, else a random model of SHAPE (default qwen2.5-1.5b)
    if [ -z "${MODEL:-}" ]; then shape=${SHAPE:-qwen2.5-1.5b}; m=/tmp/$shape.gguf; make_model; fi
    DYSCO_SCHED_REPORT=1 python3 bench/device/split_check.py "${MODEL:-$m}" --tensor-split "${TENSOR_SPLIT:-1,1}" \
        > "$out/split-check.md" 2> "$out/split-check.err"
    rc=$?; cat "$out/split-check.md"
    echo "graphs with DySCO nodes, by backend (expect CUDA0 and CUDA1, no CPU):"
    grep "dysco sched" "$out/split-check.err" | sed 's/.* nodes on //' | sort | uniq -c
    tail -3 "$out/split-check.err" | grep -v "dysco sched"; exit $rc ;;
split-speed)
    # decode tok/s of plain, exact and fast DySCO on 1 GPU and on 2 (layer split), Llama-3.1-70B shape
    # (random Q4_K_M, ~40 GB written directly), its published heads, flash attention
    shape=llama-3.1-70b; m=/tmp/$shape.gguf; heads=head_maps/llama-3.1-70b-instruct.json; make_model
    args="--model $m --head-map $heads --contexts ${CONTEXTS:-4096 32768} --gen ${GEN:-128} --repeats ${REPEATS:-3}
          --n-gpu-layers 99 --flash-attn on --llama-bench build/cuda/bin/llama-bench --no-prefill"
    CUDA_VISIBLE_DEVICES=0 python3 bench/speed/bench_api.py $args --split-mode none \
        > "$out/split-speed-1gpu.md" 2> "$out/split-speed-1gpu.err"
    python3 bench/speed/bench_api.py $args --split-mode layer --tensor-split "${TENSOR_SPLIT:-1,1}" \
        > "$out/split-speed-2gpu.md" 2> "$out/split-speed-2gpu.err"
    python3 bench/device/split_table.py "$out/split-speed-1gpu.md" "$out/split-speed-2gpu.md" | tee "$out/split-speed.md"
    tail -n 1 "$out/split-speed-1gpu.md" "$out/split-speed-2gpu.md"; tail -n 2 "$out"/split-speed-*.err ;;
esac
