"""Host time per decoded token outside llama_decode, through `Model.generate` (chat template,
greedy), plain / fast / exact, broken down by step.

llama-bench's tg loop is llama_decode + synchronize per token and nothing else; whatever our loop
does between two llama_decode calls (sampling, feeding the batch, detokenizing, end and stop checks,
the generators between them, DySCO's calls around a pass) is what separates our plain from it. A
decode cycle runs from one token's sampling to the next's; its host time = the cycle minus
llama_decode, minus (exact) the native probe, which is a graph computation of its own. The steps
are timed by wrapping the functions that do them (per step the median over the cycles of one
generation, medians over --repeats generations). --clock thread (the default) takes this thread's
CPU time, which a shared machine's load does not stretch (with one thread llama_decode computes on
it too; a timestamp costs 1-2 us there), --clock wall perf_counter. "light" wraps only what the
cycle needs (sampling, llama_decode, the probe): its host total is the figure with the least
instrumentation; "by step" wraps every step (each wrapper adds a few microseconds). `rest` = what no
wrapper holds: the generators, the loop, stop strings and the text. The last column is the share of
a cycle that is computation: what plain / llama-bench would be if llama_decode took as long in both.

Every wrapped name exists in main's code as in this branch's, so 'before' runs the same script on
main's package (PYTHONPATH=/work/main/python):

    python bench/speed/host_overhead.py --model smollm2-135m --context 1024 --gen 64 --repeats 3 \
        [--flash-attn on] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import api_input, document, messages  # noqa: E402 (same prompt as bench_api.py)

import dysco_edge  # noqa: E402
from dysco_edge import Model  # noqa: E402
from dysco_edge.runtime import engine as engine_mod  # noqa: E402
from dysco_edge.runtime import native as native_mod  # noqa: E402

import llama_cpp  # noqa: E402  (after dysco_edge, which points it at the package's libllama)

MODES = ("plain", "fast", "exact")
COMPUTE = ("llama_decode", "probe")  # not host time: graph computations
# (owner, attribute, label): the host steps of a decode cycle
STEPS = ((engine_mod.Engine, "_fill_batch", "batch"),
         # this branch's per-token cache of detokenize, else (main) detokenize itself
         (engine_mod.Engine, "piece" if hasattr(engine_mod.Engine, "piece") else "detokenize", "detokenize"),
         (engine_mod.Engine, "is_end", "is_end"),
         (native_mod.NativeContext, "fast_select", "dysco calls"),
         (native_mod.NativeContext, "pass_selection", "dysco calls"),
         (native_mod.NativeContext, "clear_bias", "dysco calls"),
         (native_mod.NativeContext, "set_capture", "dysco calls"))
LIGHT = ((engine_mod.Sampler, "sample", "sample"), (native_mod.NativeContext, "probe_select", "probe"))
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}
COLUMNS = ("sample", "batch", "detokenize", "is_end", "dysco calls", "rest")


class Timeline:
    """(label, start, end) of every wrapped call, while installed."""

    def __init__(self, by_step: bool, clock):
        self.events: list[tuple[str, float, float]] = []
        self.clock = clock
        self._saved: list[tuple[object, str, object]] = []
        self._wrap(llama_cpp, "llama_decode", "llama_decode")
        for owner, name, label in LIGHT + (STEPS if by_step else ()):
            self._wrap(owner, name, label)

    def _wrap(self, owner, name: str, label: str) -> None:
        original, events, clock = getattr(owner, name), self.events, self.clock

        def timed(*args, **kwargs):
            t = clock()
            try:
                return original(*args, **kwargs)
            finally:
                events.append((label, t, clock()))
        self._saved.append((owner, name, original))
        setattr(owner, name, timed)

    def remove(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def cycles(events: list[tuple[str, float, float]]) -> list[dict[str, float]]:
    """Per decode cycle (one sampling to the next) microseconds: total, compute, host and each step."""
    starts = [t0 for label, t0, _ in events if label == "sample"]
    out = []
    for begin, end in zip(starts, starts[1:]):
        row = {"total": (end - begin) * 1e6}
        for label, t0, t1 in events:
            if begin <= t0 < end:
                row[label] = row.get(label, 0.0) + (t1 - t0) * 1e6
        row["host"] = row["total"] - sum(row.get(k, 0.0) for k in COMPUTE)
        row["rest"] = row["host"] - sum(row.get(k, 0.0) for k in COLUMNS if k != "rest")
        out.append(row)
    return out


def one_generation(model: Model, inp: dict, dysco, gen: int, by_step: bool, clock) -> dict[str, float]:
    """Medians over the cycles of one warm generation of gen+1 tokens."""
    timeline = Timeline(by_step, clock)
    try:
        result = model.generate(**inp, dysco=dysco, max_new_tokens=gen + 1)
    finally:
        timeline.remove()
    rows = cycles(timeline.events)
    keys = {k for row in rows for k in row}
    med = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}
    med["tokens"] = len(result.token_ids)
    return med


def measure(model: Model, modes, n_doc: int, gen: int, repeats: int, clock) -> dict[str, dict[str, dict]]:
    """{mode: {light|by step: medians over repeats}}, modes and instrumentations alternating."""
    inp = api_input(model, messages(document(model, n_doc)))
    config = model.resolve_dysco("auto") if set(modes) - {"plain"} else None
    dysco = {"plain": None} | ({"fast": config.replace(mode="fast"), "exact": config.replace(mode="exact")}
                               if config else {})
    for mode in modes:  # sizes the context, fills the prefix cache, builds every graph
        model.generate(**inp, dysco=dysco[mode], max_new_tokens=gen + 1)
    runs = {(m, kind): [] for m in modes for kind in ("light", "by step")}
    for i in range(repeats):
        for (mode, kind), got in runs.items():
            got.append(one_generation(model, inp, dysco[mode], gen, kind == "by step", clock))
            print(f"# {i + 1} {mode} {kind}: host {got[-1]['host']:.1f} us, "
                  f"llama_decode {got[-1].get('llama_decode', 0):.0f} us", file=sys.stderr, flush=True)
    out: dict[str, dict[str, dict]] = {m: {} for m in modes}
    for (mode, kind), got in runs.items():
        keys = {k for g in got for k in g}
        out[mode][kind] = {k: statistics.median(g.get(k, 0.0) for g in got) for k in keys}
    return out


HOT_CALLS = 200


def hot_sample_us(engine) -> float:
    """Median time of one greedy Sampler.sample on the same logits, caches warm (in a cycle they are
    not: a step's computation has evicted them on a CPU, where a GPU would have left them). The
    prefix cache is cleared first: call last."""
    engine.clear()
    engine.decode(engine.tokenize("Hello there", add_bos=True), 0)
    sampler, times = engine_mod.Sampler(), []
    for _ in range(HOT_CALLS):
        t = time.perf_counter()
        sampler.sample(engine)
        times.append((time.perf_counter() - t) * 1e6)
    sampler.close()
    return statistics.median(times)


def hot_fill_us(engine) -> float:
    """Median time of filling one full prefill batch (n_batch tokens) for llama_decode, hot."""
    tokens, times = list(range(engine.n_batch)), []
    for _ in range(HOT_CALLS // 4):
        t = time.perf_counter()
        engine._fill_batch(tokens, 0, 0, False)
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def table(results: dict[str, dict[str, dict]]) -> list[str]:
    head = ("| mode | llama_decode us | probe us | host us (light) | host us (by step) | "
            + " | ".join(f"{c} us" for c in COLUMNS) + " | decode / (decode + host) |")
    lines = [head, "|" + "---|" * (6 + len(COLUMNS))]
    for mode, kinds in results.items():
        light, step = kinds["light"], kinds["by step"]
        dec = light.get("llama_decode", 0.0) + light.get("probe", 0.0)
        cells = " | ".join(f"{step.get(c, 0.0):.1f}" for c in COLUMNS)
        lines.append(f"| {mode} | {light.get('llama_decode', 0):.0f} | {light.get('probe', 0):.0f} "
                     f"| {light['host']:.1f} | {step['host']:.1f} | {cells} | {dec / (dec + light['host']):.4f} |")
    return lines


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="catalog name or GGUF path")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--context", type=int, default=1024, help="document tokens")
    ap.add_argument("--gen", type=int, default=64, help="decode cycles per generation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flash-attn", default="off", choices=("on", "off"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", default="thread", choices=tuple(CLOCKS), help="thread CPU time or wall time")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    load = os.getloadavg()[0]
    with Model(args.model, n_threads=args.threads, flash_attn=args.flash_attn) as model:
        results = measure(model, args.modes, args.context, args.gen, args.repeats, CLOCKS[args.clock])
        hot, fill = hot_sample_us(model.engine), hot_fill_us(model.engine)
        lines = [f"`host_overhead.py {' '.join(sys.argv[1:])}`: {model.path.name}, vocabulary "
                 f"{model.engine.n_vocab}, package {Path(dysco_edge.__file__).parent}; {args.clock} clock, "
                 f"microseconds per decoded token, medians; load average {load:.1f} at the start; "
                 f"hot, alone: greedy sampling {hot:.1f} us (the same logits {HOT_CALLS} times), a batch of "
                 f"{model.engine.n_batch} prefill tokens filled {fill:.1f} us", ""]
        lines += table(results)
    results["hot"] = {"sample us": hot, "fill batch us": fill}
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
