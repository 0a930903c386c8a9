#!/usr/bin/env bash
# Builds llama.cpp's llama-bench from the tree the package builds from (the pinned llama.cpp, patched
# by native/ggml-dysco) with this project's CMake and -DDYSCO_LLAMA_BENCH=ON, into BUILD_DIR/bin beside
# that build's libllama. Extra arguments go to CMake (e.g. -DGGML_CUDA=ON). JOBS parallel jobs
# (default 2) at nice 19; ccache is used when found (CMakeLists.txt). Run from the repository root:
#   bench/speed/build_llama_bench.sh [BUILD_DIR [cmake args...]]     # BUILD_DIR default build/llama-bench
# bench/speed/bench_api.py runs it with the package's own libllama first on the library path.
set -euo pipefail
build=${1:-build/llama-bench}
shift || true
cmake -S . -B "$build" -G Ninja -DDYSCO_LLAMA_BENCH=ON -DPython3_EXECUTABLE="$(command -v python3)" "$@"
nice -n 19 cmake --build "$build" --target llama-bench -j "${JOBS:-2}"
echo "$build/bin/llama-bench"
