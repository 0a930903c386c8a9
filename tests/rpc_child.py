"""Run by tests/test_rpc.py in a process of its own, since RPC devices, once registered, stay for
the whole process: SmolLM2 on the CPU, then on the RPC servers named in argv[1] (all layers), then
with PARTIAL_LAYERS offloaded to them (llama.cpp's count) and the rest on this CPU (QR layers on both sides of
the split, as partial offload to a small GPU puts them); JSON on stdout.

Every run uses one CPU thread, as the servers do: ggml's CPU flash attention splits the cells of a
one-token query over the threads and merges the partial softmaxes (ops.cpp, use_split_kv_path, from
512 cells), so its rounding, and with it the QR-head scores and the selected sets near the nucleus'
edge, depends on the thread count."""
from __future__ import annotations

import json
import random
import sys

from dysco_edge import Model

N_NEW = 24
PARTIAL_LAYERS = 20  # llama.cpp's count: the output head and layers 11-29 of 30; the QR heads sit in layers 2-18


def document() -> str:
    """A seeded log of about 1,000 tokens; the prompt ends where the next entry begins."""
    rng = random.Random(20)
    colours, items = ["red", "green", "blue", "amber", "white"], ["keys", "a lamp", "seeds", "a map", "tools"]
    lines = [f"Entry {i}: the {rng.choice(colours)} box in room {rng.randint(100, 999)} holds "
             f"{rng.choice(items)}, checked by inspector {rng.choice('ABCDEFGH')}." for i in range(42)]
    return "Storage log\n" + "\n".join(lines) + "\nEntry 42:"


def runs(model: Model, prompt: str) -> dict:
    """Tokens of a plain run, and tokens and every step's selected set of exact and fast DySCO."""
    out = {"where": model.where(), "plain": model.generate(prompt, dysco=None, max_new_tokens=N_NEW).token_ids}
    config = model.resolve_dysco("auto")
    for mode in ("exact", "fast"):
        g = model.generate(prompt, dysco=config.replace(mode=mode), max_new_tokens=N_NEW, trace=True)
        out[mode] = {"tokens": g.token_ids, "selected": [step.selected.tolist() for step in g.trace]}
    return out


def main() -> None:
    results = {}
    # local first: after the servers are registered, every model of this process could use them
    rpc = {"rpc": sys.argv[1]}
    for name, options in (("local", {}), ("rpc", rpc), ("partial", dict(rpc, n_gpu_layers=PARTIAL_LAYERS))):
        with Model("smollm2-135m", n_ctx=2048, flash_attn="on", n_threads=1, **options) as model:
            results[name] = runs(model, document())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
