"""Run by tests/test_placement.py in a process of its own: loads a GGUF through llama-cpp-python with
llama.cpp's log on (stderr), so that the test reads the buffer sizes llama.cpp allocated.
argv: model n_ctx flash(on|off) cache_type n_gpu_layers [rpc endpoints]"""
from __future__ import annotations

import sys

from dysco_edge.runtime import engine

import llama_cpp  # after dysco_edge: our libllama


def main() -> None:
    path, n_ctx, flash, cache_type, n_gpu_layers = sys.argv[1:6]
    if len(sys.argv) > 6:
        engine.connect_rpc(sys.argv[6].split(","))
    type_id = engine.CACHE_TYPE_IDS[cache_type]
    llm = llama_cpp.Llama(model_path=path, n_ctx=int(n_ctx), n_batch=512, n_ubatch=512, flash_attn=flash == "on",
                          n_gpu_layers=int(n_gpu_layers), type_k=type_id, type_v=type_id, n_threads=1, verbose=True)
    llm.close()


if __name__ == "__main__":
    main()
