"""`dysco-edge rpc-server`: lend this machine's devices to `run`/`serve --rpc` elsewhere (ggml's RPC
server, protocol 7.0, the same as llama.cpp's rpc-server of the pinned version)."""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
from pathlib import Path

from ..errors import InputError

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default


def add_parser(subparsers) -> None:
    rpc = subparsers.add_parser("rpc-server", help="serve this machine's CPU or GPUs to `run --rpc` on others "
                                                   "(trusted networks only: no authentication)")
    rpc.add_argument("--host", default="127.0.0.1",
                     help="IPv4 address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    rpc.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    rpc.add_argument("--threads", type=int, default=None,
                     help="CPU threads for the CPU device (default: half the cores, as llama.cpp)")
    rpc.add_argument("--cache-dir", metavar="DIR",
                     help="keep large tensors clients send here, so a client loading the same model again "
                          "sends their hashes only (default: no cache)")
    rpc.add_argument("--device", action="append", default=[], metavar="NAME",
                     help="a device to serve (CPU, CUDA0, ...; repeatable; default: every GPU, else the CPU)")
    rpc.set_defaults(handler=rpc_server_command)


def check_address(host: str, port: int) -> str:
    """host:port for ggml, which listens on IPv4 addresses only (not host names)."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise InputError(f"--host must be an IPv4 address such as 127.0.0.1 or 0.0.0.0, got {host!r}") from None
    if not 0 < port < 65536:
        raise InputError(f"--port must be in 1..65535, got {port}")
    return f"{host}:{port}"


def rpc_server_command(args) -> int:
    endpoint = check_address(args.host, args.port)
    threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    cache_dir = None
    if args.cache_dir:
        cache_dir = str(Path(args.cache_dir).expanduser().resolve())
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    from ..runtime.engine import rpc_server_devices, serve_rpc  # heavy imports after argument parsing
    served = rpc_server_devices(args.device)
    print(f"dysco-edge: RPC server on {endpoint} serving {', '.join(d.label() for d in served)} "
          f"({threads} CPU thread{'s' if threads != 1 else ''}); no authentication: trusted networks only",
          file=sys.stderr, flush=True)
    if not ipaddress.IPv4Address(args.host).is_loopback:
        print(f"dysco-edge: warning: {args.host} accepts connections from other machines; anyone who reaches "
              f"port {args.port} can use this machine's devices and memory", file=sys.stderr, flush=True)
    # ggml's server loop never returns to Python, so Python's Ctrl-C handler would never run
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    serve_rpc(endpoint, served, n_threads=threads, cache_dir=cache_dir)
    return 1  # not reached: serve_rpc raises when the server stops
