#!/usr/bin/env bash
# Packs what a CUDA run on the lent GPU machine needs (it has no network) into .dev/device:
# the pristine llama.cpp tree without other backends (RPC stays: the build has it by default), with
# its common library and llama-bench (run.sh build builds them: bench/speed/bench_api.py compares),
# llama-cpp-python's Python files, a cffi wheel for its Python, and the tiny test model.
# Run from the repository root.
set -euo pipefail
dest=.dev/device
tree=$(python3 native/fetch_llama.py)
rm -rf "$dest" && mkdir -p "$dest/llama.cpp/ggml/src" "$dest/pylib" "$dest/wheels"
cp -r "$tree"/{CMakeLists.txt,LICENSE,cmake,include,src,vendor,common} "$dest/llama.cpp/"
# llama-server (bench/speed/bench_parallel.py's baseline) builds from this same pristine tree with its own
# CMake (run.sh build-server): every tool directory its tools/ CMakeLists names, and the UI script; the
# UI's sources stay behind (built without the UI), so that .dev fits in one call
cp -r "$tree"/{tools,scripts} "$dest/llama.cpp/"
( cd "$dest/llama.cpp/tools/ui" && rm -rf node_modules src tests static package-lock.json )
cp -r "$tree"/ggml/{CMakeLists.txt,cmake,include,.gitignore} "$dest/llama.cpp/ggml/" 2>/dev/null || true
( cd "$tree/ggml/src" && cp -r $(ls | grep -vE '^ggml-(blas|cann|et|hexagon|hip|metal|musa|opencl|openvino|sycl|virtgpu|vulkan|webgpu|zdnn|zendnn)$') "$OLDPWD/$dest/llama.cpp/ggml/src/" )
cp -r "$tree"/gguf-py/gguf "$dest/pylib/gguf"
# find_spec does not import llama_cpp: importing it needs a libllama (LLAMA_CPP_LIB_PATH) a fresh venv lacks
site=$(python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llama_cpp').origin))")
mkdir -p "$dest/pylib/llama_cpp" && cp "$site"/*.py "$dest/pylib/llama_cpp/"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest/wheels" cffi==2.0.0 pycparser
# the server extra and the openai client, for bench_parallel.py (serve --parallel against llama-server)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest/wheels" \
    fastapi uvicorn sse-starlette openai
# pytest: bench/device/check_parallel.py runs a test module's cases on the GPU
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest/wheels" pytest
# llama-cpp-python's llama_cache imports diskcache (pure Python)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest/wheels" diskcache
cp "${DYSCO_TEST_MODELS:-$HOME/.cache/dysco-edge/test-models}/tiny-qwen3-v1-f32.gguf" "$dest/"
du -sh "$dest"
