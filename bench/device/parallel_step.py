"""Where a batched decode step's time goes (issue 26), plain against fast DySCO: `Model(parallel=N)` driven
by N threads, each with a document of its own, and the steps in which every one of them decodes one token
timed part by part. Private instrumentation: Batcher's and Engine's methods are wrapped in place.

- step: Batcher._advance, the whole step on the batch thread;
- decode: Engine.decode_batch and a llama_synchronize after it (the GPU's work plus the launch); of it,
  sync: the time in llama_synchronize, the engine's own (on one CUDA device decode_batch waits for the
  device after the launch) or the one after it: the GPU's work left once llama_decode returned, near 0
  when the host is the bound, building and launching the graph;
- hooks: DySCO's calls before and after the pass (fast_select, pass_selection), probes;
- sample: the token's readout (llama.cpp's sampled token, or the host's argmax over the logits row);
- the rest of the step is the batch thread's Python (queues, bookkeeping, the GIL);
- reused: the share of those steps whose one-token decode reused the graph of the decode before it
  (llama.cpp's graph reuse, llama_perf_context's n_reused), which saves building and allocating it.

`--host-sampling` makes every slot read its logits row and take the argmax on the host (what a DySCO
slot did before its greedy token was picked in the graph); `--llama-greedy` picks it in the graph with
llama.cpp's own greedy sampler instead of ours (native/dysco-sampler.cpp). `--slots` sets the model's
parallel slots (default: the clients, at least 2, so that one client runs through the batch too); `--note` labels the row. `--profile-step K` brackets the K-th timed
step's decode with cudaProfilerStart/Stop for `ncu --profile-from-start off` (kernel_profile.py
--summarize reads its CSV).

`--server` serves the model with `dysco-edge serve`'s app (uvicorn on the main thread, as the CLI runs it)
and drives it with N `openai` streaming clients in a subprocess, so the step is timed under the server's
event loop and worker threads. `period` is the median time from one timed step's start to the next one's
(the step plus the batch thread's wait between steps):

    python bench/device/parallel_step.py --model Q.gguf --clients 4 --doc-tokens 8192 --gen 96 --mode fast
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))

from bench_parallel import CUE, MODES, documents  # noqa: E402
from dysco_edge import Model  # noqa: E402  (loads our libllama before llama_cpp)
from dysco_edge.runtime import batch  # noqa: E402
from dysco_edge.runtime.engine import Engine, Sampler  # noqa: E402
from dysco_edge.runtime.native import NativeContext  # noqa: E402

import llama_cpp  # noqa: E402

PARTS = ("step", "decode", "sync", "hooks", "sample", "period")


class StepClock:
    """Per-step sums of the wrapped parts; a step counts when its one-token batch held every client."""

    def __init__(self, n_clients: int, profile_step: int | None):
        self.n, self.profile_step = n_clients, profile_step
        self.cur, self.steps, self.full = defaultdict(float), [], False
        self.n_reused = 0  # llama.cpp's count of decodes that reused the previous graph
        self.last_start = None  # when the last full step began

    def wrap(self, owner, name: str, part: str) -> None:
        fn = getattr(owner, name)
        clock = self

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock.cur[part] += time.perf_counter() - t0
        setattr(owner, name, timed)

    def wrap_decode(self) -> None:
        original, clock = Engine.decode_batch, self

        def decode(eng, items):
            every_client = len(items) == clock.n and all(len(t) == 1 for t, *_ in items)
            profile = every_client and clock.profile_step is not None and len(clock.steps) == clock.profile_step
            clock.full = clock.full or every_client
            t0 = time.perf_counter()
            if profile:
                cudart().cudaProfilerStart()
            rc = original(eng, items)
            llama_cpp.llama_synchronize(eng.ctx)  # timed into sync by wrap_sync
            if profile:
                cudart().cudaProfilerStop()
            clock.cur["decode"] += time.perf_counter() - t0
            reused = llama_cpp.llama_perf_context(eng.ctx).n_reused  # outside the timed part
            clock.cur["reused"] += reused > clock.n_reused
            clock.n_reused = reused
            return rc
        Engine.decode_batch = decode

    def wrap_sync(self) -> None:
        """Time every llama_synchronize (the engine calls it through the module, as this does)."""
        original, clock = llama_cpp.llama_synchronize, self

        def synchronize(ctx):
            t0 = time.perf_counter()
            original(ctx)
            clock.cur["sync"] += time.perf_counter() - t0
        llama_cpp.llama_synchronize = synchronize

    def wrap_step(self) -> None:
        original, clock = batch.Batcher._advance, self

        def advance(batcher, slots):
            clock.cur.clear()
            clock.full = False
            t0 = time.perf_counter()
            original(batcher, slots)
            clock.cur["step"] = time.perf_counter() - t0
            if clock.full:
                if clock.last_start is not None:
                    clock.cur["period"] = t0 - clock.last_start
                clock.steps.append(dict(clock.cur))
            clock.last_start = t0 if clock.full else None
        batch.Batcher._advance = advance


def cudart():
    from kernel_profile import cudart as load  # bench/device
    return load()


def llama_greedy() -> None:
    """Greedy slots take llama.cpp's greedy sampler (one ggml_argmax over the row) in their chain."""
    NativeContext.greedy_sampler = lambda self: ctypes.cast(llama_cpp.llama_sampler_init_greedy(), ctypes.c_void_p).value


def host_sampling() -> None:
    """Every slot samples on the host (the A/B of the in-graph greedy token)."""
    Engine.sample_on_device = lambda self, seq_id, on: False


def run(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    clock = StepClock(args.clients, args.profile_step)
    if args.host_sampling:
        host_sampling()
    if args.llama_greedy:
        llama_greedy()
    clock.wrap_sync()
    clock.wrap_decode()
    clock.wrap_step()
    for owner, name in ((batch._DyscoFeed, "before"), (batch._DyscoFeed, "after"), (batch.Batcher, "_probe")):
        clock.wrap(owner, name, "hooks")
    clock.wrap(Sampler, "sample", "sample")
    clock.wrap(Engine, "sampled_token", "sample")
    with Model(args.model, n_ctx=args.doc_tokens + args.gen + 64, parallel=args.slots or max(args.clients, 2), n_gpu_layers=args.n_gpu_layers,
               flash_attn=True) as model:
        texts = [d + CUE for d in documents(model, args.clients, args.doc_tokens)]
        t0 = time.perf_counter()
        tokens = (drive_server if args.server else drive_threads)(model, texts, args)
        wall = time.perf_counter() - t0
    steps = clock.steps[2:]  # the first steps with every client may still build graphs
    med = {p: 1e3 * statistics.median(s[p] for s in steps if p in s) if any(p in s for s in steps) else 0.0
           for p in PARTS}
    med["reused"] = sum(s.get("reused", 0.0) for s in steps) / max(len(steps), 1)
    sampling = "host" if args.host_sampling else "graph, llama.cpp's greedy" if args.llama_greedy else "graph"
    sampling += "; server" if args.server else ""
    sampling += f"; {args.note}" if args.note else ""
    return {"mode": args.mode, "sampling": sampling, "clients": args.clients,
            "steps": len(steps), "tokens": tokens, "wall_s": wall, **med}


def drive_threads(model, texts: list[str], args) -> int:
    """N threads each stream one generation through Model.generate; the tokens generated."""
    prompts = [model.tokenize(t, add_bos=True) for t in texts]
    config = None if args.mode == "plain" else model.head_map().to_config(**MODES[args.mode])
    gate = threading.Barrier(args.clients)
    counts = [0] * args.clients

    def one(i):
        gate.wait()
        stream = model.generate(token_ids=prompts[i], dysco=config, max_new_tokens=args.gen, stream=True)
        for _ in stream:
            pass
        counts[i] = len(stream.result.token_ids)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def drive_server(model, texts: list[str], args) -> int:
    """The server's app on this thread; N streaming clients in a subprocess (their own GIL), once."""
    import json
    import socket
    import subprocess
    import tempfile
    import uvicorn
    from dysco_edge.server.app import create_app
    from dysco_edge.server.settings import ServerSettings
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(model_id="m", max_queue=64)
    server = uvicorn.Server(uvicorn.Config(create_app(model, settings), host="127.0.0.1", port=port, log_level="warning"))
    result = {}

    def clients():
        while not server.started:
            time.sleep(0.05)
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(texts, f)
            f.flush()
            out = subprocess.run([sys.executable, __file__, "--client", f"http://127.0.0.1:{port}", "--prompts-file",
                                  f.name, "--gen", str(args.gen), "--mode", args.mode, "--model", args.model],
                                 capture_output=True, text=True)
        if out.returncode == 0:
            got = json.loads(out.stdout.splitlines()[-1])
            result["tokens"] = got["tokens"]
            args.note = f"{args.note}; clients saw {got['aggregate']:.1f} tok/s".lstrip("; ")
        else:
            print(out.stderr[-2000:], file=sys.stderr)
        server.should_exit = True
    threading.Thread(target=clients, daemon=True).start()
    server.run()
    return result.get("tokens", 0)


def run_clients(args) -> None:
    """--client: N streaming completions at once against a server; prints the tokens generated."""
    import json
    from bench_parallel import stream_one, summarise
    texts = json.loads(Path(args.prompts_file).read_text())
    dysco = None if args.mode == "plain" else MODES[args.mode]
    gate = threading.Barrier(len(texts))
    runs = [None] * len(texts)

    def one(i):
        try:
            runs[i] = stream_one(args.client, texts[i], args.gen, dysco, gate)
        except Exception as exc:  # noqa: BLE001 -- reported below, with the others' results
            runs[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in runs if isinstance(r, Exception)]
    if failed:
        sys.exit(f"parallel_step: {len(failed)} of {len(runs)} clients failed: {failed[0]!r}")
    print(json.dumps({"tokens": sum(r["tokens"] for r in runs), "aggregate": summarise(runs)["aggregate"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=96)
    ap.add_argument("--mode", choices=tuple(MODES), default="fast")
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--host-sampling", action="store_true")
    ap.add_argument("--llama-greedy", action="store_true")
    ap.add_argument("--slots", type=int, default=None)
    ap.add_argument("--profile-step", type=int, default=None)
    ap.add_argument("--note", default="", help="added to the row's sampling column (e.g. the environment of an A/B)")
    ap.add_argument("--server", action="store_true", help="through the server's app and N HTTP clients")
    ap.add_argument("--client", default="", help=argparse.SUPPRESS)  # the --server run's client subprocess
    ap.add_argument("--prompts-file", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return run_clients(args)
    r = run(args)
    if not r["steps"]:
        sys.exit("parallel_step: no step held every client at once (raise --gen)")
    rest = r["step"] - r["decode"] - r["hooks"] - r["sample"]
    print(f"| {r['mode']} | {r['sampling']} | {r['clients']} | {r['steps']} | {r['step']:.3f} | {r['decode']:.3f} | "
          f"{r['sync']:.3f} | {r['hooks']:.3f} | {r['sample']:.3f} | {rest:.3f} | {r['reused']:.2f} | {r['period']:.3f} |",
          flush=True)


if __name__ == "__main__":
    main()
