"""Several users at once (issue 26): N concurrent streaming clients, each with a document of its own,
against `dysco-edge serve --parallel N` (plain, fast and exact DySCO at every N: the batch runs each
sequence's DySCO on its own) and llama.cpp's `llama-server --parallel N` (plain), both
driven by the same `openai` client code through their OpenAI endpoints (/v1/completions: the
document and a cue as raw text, greedy).

Per N and server: aggregate decode tok/s (all clients' tokens after their first, over the span from
the first client's first token to the last client's last), per-stream decode tok/s (median over
clients of (tokens - 1) / (last - first)), medians over rounds; and, where N >= 4, the time to first
token of a request arriving while 3 others decode.

    python bench/speed/bench_parallel.py [--model smollm2-135m] [--clients 1 2 4 8] [--doc-tokens 1024]
        [--gen 64] [--rounds 3] [--llama-server build/llama-server/bin/llama-server] [--out results.md]
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

import openai

from dysco_edge import Model
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
            "-c", str(args.n_ctx * n), "-np", str(n), "-b", "512", "-ub", "512", "-fa", args.flash_attn,
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
    return {"sent": sent, "first": times[0], "last": times[-1], "tokens": n}


def one_round(base: str, prompts: list[str], gen: int, dysco) -> dict:
    """All clients at once: aggregate and per-stream decode tok/s."""
    gate = threading.Barrier(len(prompts))
    with ThreadPoolExecutor(len(prompts)) as pool:
        runs = list(pool.map(lambda p: stream_one(base, p, gen, dysco, gate), prompts))
    span = max(r["last"] for r in runs) - min(r["first"] for r in runs)
    per = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in runs if r["last"] > r["first"]]
    return {"aggregate": sum(r["tokens"] - 1 for r in runs) / span if span > 0 else float("nan"),
            "per_stream": statistics.median(per) if per else float("nan"),
            "tokens": statistics.median(r["tokens"] for r in runs)}


def ttft_while_busy(base: str, prompts: list[str], gen: int, dysco) -> float:
    """ms to the first token of a request sent once 3 others stream their answers."""
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(stream_one, base, p, gen * 4, dysco) for p in prompts[:3]]
        time.sleep(0.5)
        while not _all_decoding(base, 3) and not all(f.done() for f in busy):
            time.sleep(0.05)
        late = stream_one(base, prompts[3], 4, dysco)
        [f.result() for f in busy]
    return (late["first"] - late["sent"]) * 1000


def _all_decoding(base: str, n: int) -> bool:
    """Whether n slots decode (ours: /slots; llama-server: its /slots too, when it offers them)."""
    try:
        slots = json.load(urllib.request.urlopen(f"{base}/slots", timeout=2))
    except OSError:
        return True
    busy = [s for s in slots if s.get("state") == "decode" or s.get("is_processing")]
    return len(busy) >= n


def measure(args, server: str, n: int, prompts: list[str], modes: list[str]) -> list[dict]:
    port = _free_port()
    cmd = (ours_cmd if server == "dysco-edge" else llama_cmd)(args, n, port)
    proc = start(cmd, port, Path(args.log_dir) / f"{server}-{n}.log")
    base, rows = f"http://127.0.0.1:{port}", []
    try:
        for mode in modes:
            dysco = MODES[mode] if server == "dysco-edge" else None
            stream_one(base, prompts[0], 4, dysco)  # warm
            rounds = [one_round(base, prompts[:n], args.gen, dysco) for _ in range(args.rounds)]
            row = {"server": server, "mode": mode, "clients": n,
                   **{k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}}
            if n >= 4:
                row["ttft_ms_3_busy"] = round(ttft_while_busy(base, prompts, args.gen, dysco), 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


def table(rows: list[dict]) -> str:
    one = {(r["server"], r["mode"]): r["aggregate"] for r in rows if r["clients"] == 1}
    out = ["| server | mode | clients | aggregate tok/s | x one client | per-stream tok/s | tokens/stream | "
           "TTFT ms, 3 busy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = one.get((r["server"], r["mode"]))
        out.append(f"| {r['server']} | {r['mode']} | {r['clients']} | {r['aggregate']} | "
                   f"{r['aggregate'] / base:.2f}x | {r['per_stream']} | {r['tokens']} | "
                   f"{r.get('ttft_ms_3_busy', '')} |" if base else "")
    return "\n".join(line for line in out if line)


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
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--out", default="", help="also write the table and rows here (.md; rows to .json beside)")
    args = ap.parse_args()
    args.model_path = str(resolve(args.model))
    args.n_ctx = args.n_ctx or -(-(args.doc_tokens + 64 + 5 * args.gen) // 256) * 256
    with Model(args.model_path, n_ctx=512, n_gpu_layers=0) as m:
        prompts = [doc + CUE for doc in documents(m, max(max(args.clients), 4), args.doc_tokens)]
    rows = []
    for n in args.clients:
        rows += measure(args, "dysco-edge", n, prompts, args.modes)
        if args.llama_server:
            rows += measure(args, "llama-server", n, prompts, ["plain"])
    text = table(sorted(rows, key=lambda r: (r["server"], r["mode"], r["clients"])))
    print(text)
    if args.out:
        Path(args.out).write_text(f"{' '.join(sys.argv)}\n\n{text}\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
