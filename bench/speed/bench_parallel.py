"""Several users at once (issue 26): N concurrent streaming clients, each with a document of its own,
against `dysco-edge serve --parallel N` (plain, fast and exact DySCO at every N: the batch runs each
sequence's DySCO on its own; a mode a server refuses is reported and left out) and llama.cpp's
`llama-server --parallel N` (plain, its defaults), both
driven by the same `openai` client code through their OpenAI endpoints (/v1/completions: the
document and a cue as raw text, greedy).

Per N and server, medians over rounds:
- steady aggregate decode tok/s: tokens that arrived while every client was decoding (from the last
  client's first token to the first client's last one) over that window: the batch's decode rate,
  without the prompts' prefill (8K-token documents prefill for longer than 128 tokens decode);
- overall tok/s: all clients' tokens after their first, over the span from the first client's first
  token to the last client's last (prefill of the late clients' documents included);
- per-stream decode tok/s: median over clients of (tokens - 1) / (last - first);
- where N >= 4, the time to first token of a request arriving while 3 others decode.
`--in-process` adds the same rows for `Model(parallel=N)` driven by N threads in one process (no HTTP):
what batching gives before the server's per-token work.

    python bench/speed/bench_parallel.py [--model smollm2-135m] [--clients 1 2 4 8] [--doc-tokens 1024]
        [--gen 64] [--rounds 3] [--llama-server build/llama-server/bin/llama-server] [--in-process]
        [--out results.md]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import openai

from dysco_edge import Model
from dysco_edge.errors import InputError
from dysco_edge.models import resolve

MODES = {"plain": False, "fast": {"mode": "fast"}, "exact": {"mode": "exact"}}
CUE = "\n\nContinue the log with the next entries:\n"


def documents(model: Model, n_docs: int, n_tokens: int) -> list[str]:
    """A harbour log of about n_tokens tokens per client, each seeded differently."""
    return [_document(model, n_tokens, seed) for seed in range(n_docs)]


def _document(model: Model, n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    ships = ["Heron", "Osprey", "Tern", "Plover", "Gannet", "Petrel", "Skua", "Fulmar"]
    ports, cargo = ["Arden", "Brill", "Calder", "Dunmore", "Esk"], ["salt", "timber", "wool", "copper", "grain", "tea"]
    lines = [f"In {rng.randint(1790, 1850)} the {rng.choice(ships)} left {rng.choice(ports)} with "
             f"{rng.randint(5, 60)} crew and {rng.choice(cargo)}, captained by "
             f"{rng.choice(['Hale', 'Moss', 'Reyes', 'Okafor', 'Lind'])}." for _ in range(n_tokens // 12 + 8)]
    ids = model.tokenize(" ".join(lines))[:n_tokens]
    return model.detokenize(ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """A server process, once its /health answers 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()[-2000:]}")


def ours_cmd(args, n: int, port: int) -> list[str]:
    return [sys.executable, "-m", "dysco_edge.cli", "serve", args.model_path, "--port", str(port),
            "--n-ctx", str(args.n_ctx), "--parallel", str(n), "--queue", "64", "--log-level", "warning",
            "--flash-attn", args.flash_attn, *(["--threads", str(args.threads)] if args.threads else []),
            *(["--n-gpu-layers", str(args.n_gpu_layers)] if args.n_gpu_layers is not None else [])]


def llama_cmd(args, n: int, port: int) -> list[str]:
    return [args.llama_server, "-m", args.model_path, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(args.n_ctx * n), "-np", str(n), "-fa", args.flash_attn,
            "-ngl", str(args.n_gpu_layers if args.n_gpu_layers is not None else 0),
            *(["-t", str(args.threads), "-tb", str(args.threads)] if args.threads else [])]


def stream_one(base: str, prompt: str, gen: int, dysco, gate: threading.Barrier | None = None) -> dict:
    """One streamed completion: when it was sent, when each text piece came, tokens generated."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=3600)
    extra = {} if dysco is None else {"dysco": dysco}
    if gate is not None:
        gate.wait()
    sent, times, n = time.perf_counter(), [], 0
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=gen, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return {"sent": sent, "times": times, "tokens": n}


def generate_one(model: Model, prompt: str, gen: int, mode: str, gate: threading.Barrier | None = None) -> dict:
    """The same through the public API in this process (`Model.generate(stream=True)`, raw token ids)."""
    ids = model.tokenize(prompt, add_bos=True)
    if gate is not None:
        gate.wait()
    sent, times = time.perf_counter(), []
    config = None if mode == "plain" else model.head_map().to_config(mode=mode)
    pieces = model.generate(token_ids=ids, dysco=config, max_new_tokens=gen, stream=True)
    for piece in pieces:
        if piece:
            times.append(time.perf_counter())
    return {"sent": sent, "times": times, "tokens": len(pieces.result.token_ids)}


def summarise(runs: list[dict]) -> dict:
    """Steady aggregate (every client decoding), overall aggregate and per-stream decode tok/s."""
    runs = [r for r in runs if len(r["times"]) > 1]
    start, end = max(r["times"][0] for r in runs), min(r["times"][-1] for r in runs)
    inside = sum(sum(1 for t in r["times"] if start < t <= end) for r in runs)
    span = max(r["times"][-1] for r in runs) - min(r["times"][0] for r in runs)
    per = [(r["tokens"] - 1) / (r["times"][-1] - r["times"][0]) for r in runs]
    return {"aggregate": inside / (end - start) if end > start else float("nan"),
            "overall": sum(r["tokens"] - 1 for r in runs) / span if span > 0 else float("nan"),
            "per_stream": statistics.median(per) if per else float("nan"),
            "tokens": statistics.median(r["tokens"] for r in runs)}


def one_round(one, prompts: list[str], gen: int, dysco) -> dict:
    """All clients at once (`one(prompt, gen, dysco, gate)` runs a client)."""
    gate = threading.Barrier(len(prompts))
    with ThreadPoolExecutor(len(prompts)) as pool:
        return summarise(list(pool.map(lambda p: one(p, gen, dysco, gate), prompts)))


def ttft_while_busy(one, prompts: list[str], gen: int, dysco, busy_now) -> float:
    """ms to the first token of a request sent once 3 others stream their answers."""
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(one, p, gen * 4, dysco) for p in prompts[:3]]
        time.sleep(0.5)
        while not busy_now(3) and not all(f.done() for f in busy):
            time.sleep(0.05)
        late = one(prompts[-1], 4, dysco)  # a document no slot has seen: no server reuses its prefix
        [f.result() for f in busy]
    return (late["times"][0] - late["sent"]) * 1000


def _all_decoding(base: str, n: int) -> bool:
    """Whether n slots decode (ours: /slots; llama-server: its /slots too, when it offers them)."""
    try:
        slots = json.load(urllib.request.urlopen(f"{base}/slots", timeout=2))
    except OSError:
        return True
    busy = [s for s in slots if s.get("state") == "decode" or s.get("is_processing")]
    return len(busy) >= n


def measure(args, server: str, n: int, prompts: list[str], modes: list[str]) -> list[dict]:
    """Rows of one server process with --parallel n (its modes one after the other)."""
    port = _free_port()
    cmd = (ours_cmd if server == "dysco-edge" else llama_cmd)(args, n, port)
    proc = start(cmd, port, Path(args.log_dir) / f"{server}-{n}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        def one(prompt, gen, mode, gate=None):
            return stream_one(base, prompt, gen, MODES[mode] if server == "dysco-edge" else None, gate)
        rows = [measure_mode(args, server, n, prompts, mode, one, lambda k: _all_decoding(base, k)) for mode in modes]
        return [r for r in rows if r]
    finally:
        proc.terminate()
        proc.wait(60)


def measure_in_process(args, n: int, prompts: list[str], modes: list[str]) -> list[dict]:
    """Rows of `Model(parallel=n)` in this process, n threads as the clients."""
    with Model(args.model_path, n_ctx=args.n_ctx, parallel=n, flash_attn=args.flash_attn == "on",
               n_gpu_layers=args.n_gpu_layers, n_threads=args.threads) as model:
        def one(prompt, gen, mode, gate=None):
            return generate_one(model, prompt, gen, mode, gate)

        def busy_now(k):
            return sum(s["state"] == "decode" for s in model.slots()) >= k
        rows = [measure_mode(args, "dysco-edge in process", n, prompts, mode, one, busy_now) for mode in modes]
        return [r for r in rows if r]


def measure_mode(args, server: str, n: int, prompts: list[str], mode: str, one, busy_now) -> Optional[dict]:
    """One mode's rounds; None where the server (or Model) refuses the mode with this many slots."""
    try:
        one(prompts[0], 4, mode)  # warm
    except (openai.BadRequestError, InputError) as exc:
        print(json.dumps({"server": server, "mode": mode, "clients": n, "refused": str(exc)[:300]}), flush=True)
        return None
    rounds = [one_round(one, prompts[:n], args.gen, mode) for _ in range(args.rounds)]
    row = {"server": server, "mode": mode, "clients": n,
           **{k: round(_median(r[k] for r in rounds), 2) for k in rounds[0]}, "rounds": rounds}
    if n >= 4:
        row["ttft_ms_3_busy"] = round(ttft_while_busy(one, prompts, args.gen, mode, busy_now), 1)
    print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    return row


def table(rows: list[dict]) -> str:
    one = {(r["server"], r["mode"]): r["aggregate"] for r in rows if r["clients"] == 1}
    ref = {r["clients"]: r["aggregate"] for r in rows if r["server"] == "llama-server"}
    out = ["| server | mode | clients | steady aggregate tok/s | x one client | x llama-server | overall tok/s | "
           "per-stream tok/s | tokens/stream | TTFT ms, 3 busy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base, theirs = one.get((r["server"], r["mode"])), ref.get(r["clients"])
        out.append(f"| {r['server']} | {r['mode']} | {r['clients']} | {r['aggregate']} | "
                   f"{_ratio(r['aggregate'], base)} | {_ratio(r['aggregate'], theirs)} | {r['overall']} | "
                   f"{r['per_stream']} | {r['tokens']} | {r.get('ttft_ms_3_busy', '')} |")
    return "\n".join(out)


def _median(values) -> float:
    """Median of the rounds that have the value (a round whose clients never all decoded at once has none)."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF or a catalog name (default SmolLM2)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=None, help="per sequence (default: doc tokens + gen*5, rounded)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    ap.add_argument("--flash-attn", default="off", choices=["on", "off"])
    ap.add_argument("--llama-server", default="", help="llama-server binary (none: ours only)")
    ap.add_argument("--in-process", action="store_true", help="also Model(parallel=N) driven by N threads")
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--out", default="", help="also write the table and rows here (.md; rows to .json beside)")
    args = ap.parse_args()
    args.model_path = str(resolve(args.model))
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    args.n_ctx = args.n_ctx or -(-(args.doc_tokens + 64 + 5 * args.gen) // 256) * 256
    with Model(args.model_path, n_ctx=512, n_gpu_layers=0) as m:
        # one more than the most clients: the late request of the time-to-first-token check
        prompts = [doc + CUE for doc in documents(m, max(max(args.clients), 4) + 1, args.doc_tokens)]
    rows = []
    for n in args.clients:
        # every mode is asked for; one the server refuses with n slots is left out of the table
        rows += measure(args, "dysco-edge", n, prompts, args.modes)
        if args.in_process:
            rows += measure_in_process(args, n, prompts, args.modes)
        if args.llama_server:
            rows += measure(args, "llama-server", n, prompts, ["plain"])
    text = table(sorted(rows, key=lambda r: (r["server"], r["mode"], r["clients"])))
    print(text)
    if args.out:
        Path(args.out).write_text(f"{' '.join(sys.argv)}\n\n{text}\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
