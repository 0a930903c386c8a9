#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the baseline of bench/speed/bench_parallel.py) and llama-batched-bench from the pristine pinned
# tree (native/fetch_llama.py) with that tree's own CMake: the server as users would build it, on its
# own unpatched libllama, no web UI, no HTTPS. Extra arguments go to CMake (e.g. -DGGML_CUDA=ON). JOBS
# parallel jobs (default 2) at nice 19, through ccache when found. GGML_PREFIX=DIR links it to a ggml
# installed there (`cmake --install` of our build: the pinned tree's ggml, which our patches leave alone,
# built with the same flags) instead of compiling ggml again: on a GPU machine that second ggml-cuda
# compile is most of the time. Run from the repository root:
#   bench/speed/build_llama_server.sh [BUILD_DIR [cmake args...]]     # BUILD_DIR default build/llama-server
set -euo pipefail
build=${1:-build/llama-server}
shift || true
tree=${DYSCO_LLAMA_SRC:-$(python3 native/fetch_llama.py)}
launcher=()
if command -v ccache > /dev/null; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
ggml=()
if [ -n "${GGML_PREFIX:-}" ]; then
    ggml=(-DLLAMA_USE_SYSTEM_GGML=ON "-DCMAKE_PREFIX_PATH=$GGML_PREFIX")
fi
cmake -S "$tree" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" "${ggml[@]}" \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF "$@"
# llama-batched-bench too: llama.cpp's own ceiling for N sequences decoding in one batch, no server
nice -n 19 cmake --build "$build" --target llama-server llama-batched-bench -j "${JOBS:-2}"
echo "$build/bin/llama-server"
