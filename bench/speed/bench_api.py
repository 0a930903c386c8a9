"""Decode and prefill speed as a user gets it: plain, fast and exact DySCO through
`dysco_edge.Model.generate` with its defaults (chat template, greedy), against llama-cpp-python's
own `Llama.create_chat_completion` and llama.cpp's `llama-bench` on the same GGUF and libllama,
in one run.

Decode tok/s = (tokens of a warm call asking for GEN+1) - (tokens of a warm call asking for 1),
over the difference of their times: prefill, the first token and the call's fixed costs cancel.
`--clock cpu` takes this process's CPU time instead of wall time (llama-bench: its CPU time in a run
of gen+1 tokens minus one of 1 token): the work per token where a shared machine's load swamps the
wall clock; with one thread it is the thread's compute, with more it also counts their waiting.
Every mode's calls alternate with the others' in one process; medians of --repeats runs. Prefill
tok/s = the prompt tokens a warm call found cached, over (cold call - warm call), both asking for
one token. The prompt is a document of N tokens and a question, in the model's chat template.
llama-bench (tg GEN at depth N, `-d`) runs once per context with --repeats repetitions and the
package's libllama first on the library path.

    python bench/speed/bench_api.py --model smollm2-135m --contexts 1024 4096 --threads 1 \
        --flash-attn off --repeats 3 --out results.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dysco_edge import Model
from dysco_edge.runtime.native import lib_dir

import llama_cpp  # after dysco_edge: the package points it at our libllama (runtime/_llama.py)

MODES = ("plain", "fast", "exact")
QUESTION = "Copy the records above, one per line, word for word, starting from the first."
SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
               "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}
DEFAULT_LLAMA_BENCH = Path("build/llama-bench/bin/llama-bench")
WORDS = ("lantern garden river archive harbor signal copper meadow ledger orchard bridge canal "
         "station beacon quarry mill tower market chapel granary ferry school").split()
NAMES = "Sofia Amara Jonas Lena Tomas Ines Mateo Greta Yusuf Hana Pavel Noor".split()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="catalog name or GGUF path (default: the package's default)")
    ap.add_argument("--head-map", default=None, help="head map JSON (default: the one Model finds)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="document tokens")
    ap.add_argument("--gen", type=int, default=128, help="tokens whose decode is timed")
    ap.add_argument("--threads", type=int, default=None, help="n_threads (default: the API's default)")
    ap.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--n-gpu-layers", type=int, default=None, help="default: the API's (all where a GPU is)")
    ap.add_argument("--no-kv-offload", dest="kv_offload", action="store_false", help="KV cache in host memory")
    ap.add_argument("--cache-type-k", default="f16", help="KV cache type of K: f16, q8_0, q4_0")
    ap.add_argument("--cache-type-v", default="f16", help="KV cache type of V (quantized: flash attention on)")
    ap.add_argument("--gpu-memory", default=None, help="a device memory budget, e.g. 8G (with --n-ctx)")
    ap.add_argument("--n-ctx", type=int, default=None, help="fixed context size (default: what the inputs need)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-cpp-python's Llama (and llama-bench)")
    ap.add_argument("--rpc", default=None, help="host:port,... of rpc-servers whose devices take layers")
    ap.add_argument("--split-mode", default="layer", help="layer, row or none (several GPUs)")
    ap.add_argument("--tensor-split", default="", help="a share per GPU, e.g. 1,1 (default: by free memory)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per mode (medians)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="time taken: wall, or CPU time")
    ap.add_argument("--no-prefill", action="store_true", help="skip the cold (prefill) calls")
    ap.add_argument("--llama-bench", type=Path, default=DEFAULT_LLAMA_BENCH,
                    help="llama-bench binary (bench/speed/build_llama_bench.sh); skipped when missing")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    return ap.parse_args()


def document(model: Model, n_tokens: int) -> str:
    """Numbered records of seeded words and names, cut to n_tokens tokens of this model."""
    lines, i = [], 0
    while len(lines) * 12 < n_tokens * 1.5:
        w = [WORDS[(i * 7 + k * 5) % len(WORDS)] for k in range(3)]
        lines.append(f"Record {i + 1}: the {w[0]} by the {w[1]} was painted by {NAMES[i % len(NAMES)]} "
                     f"in {1900 + (i * 37) % 120}, next to the {w[2]}.")
        i += 1
    ids = model.tokenize("\n".join(lines))[:n_tokens]
    return model.detokenize(ids)


def messages(doc: str) -> list[dict]:
    return [{"role": "user", "content": f"{doc}\n\nQuestion: {QUESTION}"}]


def api_input(model: Model, msgs: list[dict]) -> dict:
    """generate()'s input: the chat messages, or their text where the model has no chat template."""
    return {"messages": msgs} if model.chat is not None else {"prompt": msgs[0]["content"]}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# llama-bench's CPU time includes its prefill of the depth (once per run: later repetitions restore
# it), which varies by seconds on a loaded machine: enough repetitions make the decode outweigh that
CPU_CLOCK_REPS = 10


def timed(call, clock=time.perf_counter) -> tuple[float, object]:
    t = clock()
    out = call()
    return clock() - t, out


class ApiRun:
    """One mode through Model.generate: a cold call (nothing cached) unless prefill is off, then
    warm calls asking for 1 and for gen+1 tokens."""

    def __init__(self, model, msgs: list[dict], dysco, gen: int, prefill: bool, clock=time.perf_counter):
        self.model, self.msgs, self.dysco, self.gen, self.prefill = model, msgs, dysco, gen, prefill
        self.clock = clock

    def timed(self, k: int):
        return timed(lambda: self.call(k), self.clock)

    def call(self, k: int):
        return self.model.generate(**api_input(self.model, self.msgs), dysco=self.dysco, max_new_tokens=k)

    def warm(self) -> None:
        self.call(self.gen + 1)  # sizes the context and builds every graph of this mode

    def __call__(self) -> dict:
        if self.prefill:
            self.model.prefill([])  # forget every cached prefix: a cold start
            t_cold, _ = self.timed(1)
        else:
            self.call(1)  # leaves the cache as this mode's own calls leave it
        t1, g1 = self.timed(1)
        tn, gn = self.timed(self.gen + 1)
        tokens = len(gn.token_ids) - len(g1.token_ids)
        out = {"decode": tokens / (tn - t1), "tokens": tokens, "n_prompt": g1.n_prompt}
        if self.prefill:
            out.update(prefill=g1.n_cached / (t_cold - t1), ttft=t_cold)
        return out


class LlamaRun(ApiRun):
    """The same measurement through llama-cpp-python's Llama.create_chat_completion (greedy)."""

    def call(self, k: int):
        return self.model.create_chat_completion(messages=self.msgs, max_tokens=k, temperature=0.0)

    def __call__(self) -> dict:
        if self.prefill:
            self.model.reset()  # its next call evaluates the whole prompt
            t_cold, _ = self.timed(1)
        else:
            self.call(1)
        t1, c1 = self.timed(1)
        tn, cn = self.timed(self.gen + 1)
        tokens = cn["usage"]["completion_tokens"] - c1["usage"]["completion_tokens"]
        out = {"decode": tokens / (tn - t1), "tokens": tokens, "n_prompt": c1["usage"]["prompt_tokens"]}
        if self.prefill:  # a warm call re-evaluates the prompt's last token
            out.update(prefill=(c1["usage"]["prompt_tokens"] - 1) / (t_cold - t1), ttft=t_cold)
        return out


def alternate(runs: dict, repeats: int) -> dict[str, dict]:
    """Each run `repeats` times, in turn (drift in machine load hits all alike); medians."""
    samples = {name: [] for name in runs}
    for i in range(max(1, repeats)):
        for name, run in runs.items():
            samples[name].append(run())
            print(f"# run {i + 1} {name}: {samples[name][-1]}", file=sys.stderr, flush=True)
    # medians; tokens: the fewest decoded in any run (below gen when a run met an end token)
    return {name: {**{key: statistics.median(r[key] for r in rs) for key in rs[0]},
                   "tokens": min(r["tokens"] for r in rs)} for name, rs in samples.items()}


def llama_bench_env() -> dict:
    """The environment that makes llama-bench load the package's libllama and ggml (its RUNPATH
    names its own build folder; LD_LIBRARY_PATH comes first)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir()), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def libllama_used(binary: Path) -> str:
    """The libllama the dynamic loader gives llama-bench under llama_bench_env (ldd)."""
    lines = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=llama_bench_env()).stdout
    return next((line.split("=>")[1].split("(")[0].strip() for line in lines.splitlines()
                 if line.strip().startswith("libllama.so") and "=>" in line), "?")


def llama_bench(args, model: Model, settings: dict, depth: int) -> float | None:
    """llama-bench's tg of gen tokens at `depth` (median tok/s of its repetitions; with --clock cpu,
    gen x repetitions over the CPU time its run of gen+1 tokens took beyond one of 1 token)."""
    if not args.llama_bench.exists():
        return None
    if args.clock == "wall":
        return statistics.median(run_llama_bench(args, model, settings, depth, args.gen)[0]["samples_ts"])
    cpu = []
    for n_gen in (1, args.gen + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run_llama_bench(args, model, settings, depth, n_gen, CPU_CLOCK_REPS)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return args.gen * CPU_CLOCK_REPS / (cpu[1] - cpu[0])


def run_llama_bench(args, model: Model, settings: dict, depth: int, n_gen: int, reps: int = 0) -> list[dict]:
    ngl = settings["n_gpu_layers"]
    cmd = [str(args.llama_bench), "-m", str(model.path), "-p", "0", "-n", str(n_gen), "-d", str(depth),
           "-t", str(settings["threads"]), "-fa", "on" if settings["flash_attn"] else "off",
           "-ngl", str(999 if ngl < 0 else ngl), "-sm", args.split_mode, "-r", str(reps or max(1, args.repeats)),
           "-nkvo", "0" if args.kv_offload else "1", "-ctk", args.cache_type_k, "-ctv", args.cache_type_v, "-o", "json"]
    if args.tensor_split:
        cmd += ["-ts", args.tensor_split.replace(",", "/")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=llama_bench_env())
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    print(f"# {' '.join(cmd)}", file=sys.stderr)
    return json.loads(done.stdout)


def measure_context(args, model: Model, settings: dict, n: int) -> dict[str, dict]:
    msgs = messages(document(model, n))
    config = model.resolve_dysco("auto")
    dysco = {"plain": None, "fast": config.replace(mode="fast"), "exact": config.replace(mode="exact")}
    clock = CLOCKS[args.clock]
    runs = {mode: ApiRun(model, msgs, dysco[mode], args.gen, not args.no_prefill, clock) for mode in MODES}
    for run in runs.values():
        run.warm()
    if args.no_llama:
        return alternate(runs, args.repeats)
    o = model.engine.options
    llm = llama_cpp.Llama(model_path=str(model.path), n_ctx=model.n_ctx, n_batch=512, n_ubatch=512,
                          n_gpu_layers=settings["n_gpu_layers"], flash_attn=settings["flash_attn"],
                          n_threads=settings["threads"], split_mode=SPLIT_MODES[args.split_mode],
                          tensor_split=[float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None,
                          offload_kqv=o.offload_kqv, type_k=o.type_k, type_v=o.type_v, verbose=False)
    try:
        runs["Llama"] = LlamaRun(llm, msgs, None, args.gen, not args.no_prefill, clock)
        runs["Llama"].warm()
        results = alternate(runs, args.repeats)
    finally:
        llm.close()
    results["llama-bench"] = {"decode": llama_bench(args, model, settings, int(results["plain"]["n_prompt"]))}
    return results


def ratio(a, b) -> str:
    return f"{a / b:.3f}x" if a and b else "-"


def decode_row(n: int, r: dict, bound: float) -> str:
    p, f, e, llm, lb = (r[k]["decode"] if k in r else None for k in ("plain", "fast", "exact", "Llama", "llama-bench"))
    lb_cells = f"{lb:.1f} | {ratio(p, lb)}" if lb else "- | -"
    return (f"| {n} | {int(r['plain']['n_prompt'])} | {p:.1f} | {f:.1f} | {e:.1f} | {ratio(f, p)} | {ratio(e, p)} "
            f"| {bound:.3f}x | {e / p / bound:.3f} | {f'{llm:.1f}' if llm else '-'} | {ratio(p, llm)} | {lb_cells} |")


def prefill_row(n: int, r: dict) -> str:
    p, f, e, llm = (r.get(k, {}) for k in ("plain", "fast", "exact", "Llama"))
    return (f"| {n} | {p['prefill']:.0f} | {ratio(f['prefill'], p['prefill'])} | {ratio(e['prefill'], p['prefill'])} "
            f"| {llm.get('prefill', 0):.0f} | {p['ttft']:.2f} | {ratio(p['ttft'], f['ttft'])} | {ratio(p['ttft'], e['ttft'])} |")


def tables(results: dict[int, dict], bound: float, prefill: bool) -> list[str]:
    out = ["| context | prompt tokens | plain tok/s | fast tok/s | exact tok/s | fast / plain | exact / plain "
           "| exact's bound 1/(1+(L_max+1)/L) | exact / bound | Llama tok/s | plain / Llama "
           "| llama-bench tg tok/s | plain / llama-bench |", "|" + "---|" * 13]
    out += [decode_row(n, r, bound) for n, r in results.items()]
    short = [f"{n}: {name} {r['tokens']}" for n, rs in results.items() for name, r in rs.items()
             if "tokens" in r and r["tokens"] < rs["plain"]["tokens"] * 0.9]
    if short:
        out.append(f"\nDecoded fewer tokens (an end token came first; the fewest of any run): {', '.join(short)}")
    if prefill:
        out += ["", "| context | plain prefill tok/s | fast / plain | exact / plain | Llama prefill tok/s "
                "| plain time to first token (s, cold) | plain / fast | plain / exact |", "|" + "---|" * 8]
        out += [prefill_row(n, r) for n, r in results.items()]
    return out


def resolved_settings(model: Model) -> dict:
    """What the API chose where the options left it the default (threads, offload, flash attention)."""
    o = model.engine.options
    return {"threads": llama_cpp.llama_n_threads(model.engine.ctx), "n_gpu_layers": o.n_gpu_layers,
            "flash_attn": o.flash_attn, "load": os.getloadavg()[0]}


def header(args, model: Model, settings: dict, config) -> list[str]:
    lb = args.llama_bench
    lb_text = f"`{lb}` with libllama `{libllama_used(lb)}`" if lb.exists() else "not built (skipped)"
    return [f"`python bench/speed/bench_api.py {' '.join(sys.argv[1:])}` ({datetime.date.today()})", "",
            f"- model: {model.path.name}; heads: {model.find_heads().describe()}, {len(config.qr_heads)} QR heads, "
            f"L_max {config.l_max} of {model.shape.n_layer} layers",
            *([f"- {model.placement.describe()}"] if model.placement else []),
            f"- where: {model.where()}; threads {settings['threads']}; flash attention "
            f"{'on' if settings['flash_attn'] else 'off'}; n_gpu_layers {settings['n_gpu_layers']}",
            f"- decode of {args.gen} tokens, greedy, chat template; medians of {args.repeats} alternating runs; "
            f"{'wall' if args.clock == 'wall' else 'CPU'} time; "
            f"load average at the start {settings['load']:.1f} on {os.cpu_count()} CPUs",
            f"- package libllama: `{lib_dir()}`; llama-bench: {lb_text}", ""]


def main() -> None:
    args = parse_args()
    model = Model(args.model, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn, n_threads=args.threads,
                  head_map=args.head_map, split_mode=args.split_mode, tensor_split=args.tensor_split or None,
                  n_ctx=args.n_ctx, kv_offload=args.kv_offload, cache_type_k=args.cache_type_k,
                  cache_type_v=args.cache_type_v, gpu_memory=args.gpu_memory, rpc=args.rpc)
    settings = resolved_settings(model)
    config = model.resolve_dysco("auto")
    results = {n: measure_context(args, model, settings, n) for n in args.contexts}
    bound = 1 / (1 + (config.l_max + 1) / model.shape.n_layer)
    text = "\n".join(header(args, model, settings, config) + tables(results, bound, not args.no_prefill)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    model.close()


if __name__ == "__main__":
    main()
