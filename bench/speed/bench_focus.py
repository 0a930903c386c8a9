"""What the `dysco.focus` field (`"return_focus": true`) costs the server: the same streamed
DySCO answer about a registered document, asked with and without it, alternating (with,
without, without, with, ...); the table gives medians.

- time to first token (the document's cells already in the context: a follow-up question);
- decode tok/s: (tokens - 1) / (last piece - first piece); tracing reads the importance back
  every step;
- end ms: last piece to the end of the stream, where the focus is computed (the prompt's
  tokens placed in the document, its passages weighed) and sent.

    python bench/speed/bench_focus.py [--model M.gguf] [--doc-tokens 6000] [--gen 128] [--repeats 5] [--mode fast]
"""
from __future__ import annotations

import base64
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import openai


# bench_server.py's start_server, whether it lives in bench/ or beside this file
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from bench_server import server_bench_parser, start_server  # noqa: E402

QUESTION = "Copy out the entries of page 2 of the log, one per line."  # a long answer: decode is timed


def document(n_lines: int) -> str:
    """A seeded harbour log with a "[page N]" line every 40 entries, as the PDF reader writes them."""
    rng = random.Random(7)
    ships, ports = ["Heron", "Osprey", "Tern", "Plover", "Gannet", "Petrel"], ["Arden", "Brill", "Calder", "Dunmore"]
    cargo, captains = ["salt", "timber", "wool", "copper", "grain", "tea"], ["Hale", "Moss", "Reyes", "Okafor", "Lind"]
    lines = []
    for i in range(n_lines):
        if i % 40 == 0:
            lines.append(f"\n[page {i // 40 + 1}]")
        lines.append(f"In {rng.randint(1790, 1850)} the {rng.choice(ships)} left {rng.choice(ports)} with "
                     f"{rng.randint(5, 60)} crew and a cargo of {rng.choice(cargo)}, captained by {rng.choice(captains)}.")
    return "\n".join(lines).strip()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.loads(r.read())


def register(base: str, n_tokens: int) -> dict:
    """The largest log of whole pages whose question turn stays under n_tokens (the server counts)."""
    lines, doc = 40, None
    while True:
        data = base64.b64encode(document(lines).encode()).decode()
        candidate = post(f"{base}/v1/documents", {"filename": "log.txt", "data": data})
        if doc is not None and candidate["n_tokens"] > n_tokens:
            return doc
        doc, lines = candidate, lines + 40


def ask(client, doc_id: str, gen: int, mode: str, focus: bool) -> dict:
    extra = {"document": doc_id, "dysco": {"mode": mode}, "return_focus": focus}
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=gen, stream=True, extra_body=extra,
                                            stream_options={"include_usage": True})
    times, text, n, passages = [], "", 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text += chunk.choices[0].delta.content
        if chunk.usage:
            n = chunk.usage.completion_tokens
        if (chunk.model_extra or {}).get("dysco"):
            passages = chunk.model_extra["dysco"]["focus"]["passages"]
    end = time.perf_counter()
    return {"ttft_ms": (times[0] - t0) * 1000, "tok_s": (n - 1) / (times[-1] - times[0]),
            "end_ms": (end - times[-1]) * 1000, "tokens": n, "text": text, "passages": passages}


def main() -> None:
    ap = server_bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--mode", default="fast", choices=["fast", "exact"])
    args = ap.parse_args()
    proc, base = start_server(args.model, args.n_ctx)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=3600)
        doc = register(base, args.doc_tokens)
        post(f"{base}/v1/documents/{doc['id']}/open", {})
        for focus in (True, False):  # untimed: the first answers warm the server up
            ask(client, doc["id"], 4, args.mode, focus)
        runs = {True: [], False: []}
        for r in range(args.repeats):
            for focus in ((True, False) if r % 2 == 0 else (False, True)):
                runs[focus].append(ask(client, doc["id"], args.gen, args.mode, focus))
    finally:
        proc.terminate()
        proc.wait(30)
    report(doc, args, runs)


def report(doc: dict, args, runs: dict) -> None:
    same = all(a["text"] == b["text"] for a, b in zip(runs[True], runs[False]))
    for key in ("ttft_ms", "tok_s", "end_ms"):
        with_, without = (statistics.median(x[key] for x in runs[f]) for f in (True, False))
        print(json.dumps({"measure": key, "with_focus": round(with_, 2), "without": round(without, 2),
                          "with/without": round(with_ / without, 3), "runs": args.repeats,
                          "with_all": [round(x[key], 2) for x in runs[True]],
                          "without_all": [round(x[key], 2) for x in runs[False]]}))
    print(json.dumps({"document_tokens": doc["n_tokens"], "answer_tokens": runs[True][0]["tokens"], "mode": args.mode,
                      "same_answers": same, "top_passage": runs[True][0]["passages"][0]}))


if __name__ == "__main__":
    main()
