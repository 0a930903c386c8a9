"""What the server costs over in-process calls, same model, prompt and settings (greedy, DySCO
"auto"): `dysco-edge serve` in a subprocess spoken to by the `openai` client, against
`Model.generate` in this process. Runs alternate (server, in-process, in-process, server, ...)
and the table gives medians.

1. Decode rate of a streamed DySCO answer: (tokens - 1) / (last piece - first piece).
2. Time to first token of a follow-up question on a document already prefilled (the first
   question prefilled it; each timed question reuses its KV cells).

    python bench/speed/bench_server.py [--model M.gguf] [--doc-tokens 6000] [--gen 128] [--repeats 5]
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
import time
import urllib.request

import openai

from dysco_edge import Model
from dysco_edge.models import get, locate

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
QUESTIONS = ["Which ship reached Arden first?", "How many crew did the Heron carry?",
             "Which port saw the most ships?", "What cargo did the Osprey bring?", "Who captained the Tern?",
             "Which year was busiest?", "Which ship carried salt?", "Where did the Plover sail from?"]


def document(model: Model, n_tokens: int) -> str:
    """A harbour log of about n_tokens tokens (seeded, so every run reads the same text)."""
    rng = random.Random(7)
    ships, ports = ["Heron", "Osprey", "Tern", "Plover", "Gannet", "Petrel"], ["Arden", "Brill", "Calder", "Dunmore"]
    cargo = ["salt", "timber", "wool", "copper", "grain", "tea"]
    lines = []
    while len(model.tokenize(" ".join(lines))) < n_tokens:
        lines.append(f"In {rng.randint(1790, 1850)} the {rng.choice(ships)} left {rng.choice(ports)} with "
                     f"{rng.randint(5, 60)} crew and a cargo of {rng.choice(cargo)}, captained by "
                     f"{rng.choice(['Hale', 'Moss', 'Reyes', 'Okafor', 'Lind'])}.")
    return " ".join(lines)


def start_server(model_path: str, n_ctx: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dysco_edge.cli", "serve", model_path, "--port", str(port),
                             "--n-ctx", str(n_ctx), "--log-level", "warning",
                             "--dysco-mode", "exact"],  # as Model.generate's "auto": the same decoding on both sides
                            env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def server_stream(client, messages, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    times, text, n = [], "", 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text += chunk.choices[0].delta.content
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return _timing(t0, times, text, n)


def local_stream(model: Model, messages, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stream = model.generate(messages=messages, max_new_tokens=max_tokens, stream=True)
    times, text = [], ""
    for piece in stream:
        times.append(time.perf_counter())
        text += piece
    return _timing(t0, times, text, len(stream.result.token_ids))


def _timing(t0: float, times: list[float], text: str, n_tokens: int) -> dict:
    decode_s = times[-1] - times[0]
    return {"ttft_ms": (times[0] - t0) * 1000, "tok_s": (n_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
            "tokens": n_tokens, "text": text}


def alternate(repeats: int, server_run, local_run) -> tuple[list[dict], list[dict]]:
    served, local = [], []
    for r in range(repeats):
        pair = [(served, server_run), (local, local_run)]
        for out, run in (pair if r % 2 == 0 else pair[::-1]):
            out.append(run(r))
    return served, local


def summarize(name: str, served: list[dict], local: list[dict], key: str) -> dict:
    s, l_ = statistics.median(x[key] for x in served), statistics.median(x[key] for x in local)
    same = all(a["text"] == b["text"] for a, b in zip(served, local))
    return {"measure": name, "server": round(s, 2), "in_process": round(l_, 2), "server/in_process": round(s / l_, 3),
            "runs": len(served), "same_answers": same, "server_all": [round(x[key], 2) for x in served],
            "in_process_all": [round(x[key], 2) for x in local]}


def server_bench_parser(description: str) -> argparse.ArgumentParser:
    """The options the server benchmarks share; the model defaults to SmolLM2 (the figures' model),
    not to the catalog's default."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=str(locate(get("smollm2-135m"))))
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--doc-tokens", type=int, default=6000)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    return ap


def main() -> None:
    args = server_bench_parser(__doc__.splitlines()[0]).parse_args()
    model = Model(args.model, n_ctx=args.n_ctx)
    proc, base = start_server(args.model, args.n_ctx)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=3600)
        rows = [summarize("decode tok/s, streamed DySCO answer", *alternate(
            args.repeats, lambda r: server_stream(client, STORY, args.gen),
            lambda r: local_stream(model, STORY, args.gen)), "tok_s")]
        doc = document(model, args.doc_tokens)
        ask = lambda q: [{"role": "user", "content": f"{doc}\n\nQuestion: {q}"}]  # noqa: E731
        server_stream(client, ask(QUESTIONS[-1]), 4)  # each side prefills the document once
        local_stream(model, ask(QUESTIONS[-1]), 4)
        rows.append(summarize(f"follow-up TTFT ms, {args.doc_tokens}-token document prefilled", *alternate(
            args.repeats, lambda r: server_stream(client, ask(QUESTIONS[r % 7]), 8),
            lambda r: local_stream(model, ask(QUESTIONS[r % 7]), 8)), "ttft_ms"))
    finally:
        proc.terminate()
        proc.wait(30)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
