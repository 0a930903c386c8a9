"""`dysco-edge serve`: the OpenAI-compatible server on one model."""
from __future__ import annotations

import copy
import ipaddress
import os
import sys

from ..cli.models import add_model_arguments, chosen_model
from ..cli.devices import add_device_arguments, add_memory_arguments, device_options, memory_options
from ..cli.run import threads_help
from ..errors import DyscoEdgeError, InputError
from ..config import MODES, OFF

API_KEY_ENV = "DYSCO_EDGE_API_KEY"


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions) with DySCO")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--alias", help="the model name clients see (default: --model's NAME, else the GGUF file name)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else none)")
    serve.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                       help="allow browser requests from ORIGIN (repeatable; CORS is off without it)")
    serve.add_argument("--queue", type=int, default=16, help="requests that may wait behind the running ones "
                       "(more get 503 with Retry-After; default 16)")
    serve.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="requests decoded together in one batch, each with --n-ctx cells of its own (N times "
                            "the KV memory; default 1); plain and DySCO requests share the batch, each answer the "
                            "one it gets alone (an exact request's probe is a decode of its own before each "
                            "step); above 1, static DySCO is a 400")
    serve.add_argument("--max-tokens", type=int, default=None,
                       help="max_tokens of a request that gives none (default: until the context is full)")
    serve.add_argument("--head-map", metavar="FILE", help="QR heads for this model (JSON head map)")
    serve.add_argument("--dysco-mode", choices=(OFF, *MODES), default=OFF,
                       help="for requests that send no dysco (or \"auto\"): off (the default: plain), fast (no "
                            "probe; costs 2-14%% of decode speed on an H200) or exact (the paper's method); "
                            "requests sending dysco true or options get DySCO in this mode, fast when it is off")
    serve.add_argument("--n-ctx", type=int, default=8192,
                       help="context size, fixed so that the server's memory is known up front (default 8192)")
    serve.add_argument("--threads", type=int, default=None, help=threads_help())
    add_memory_arguments(serve)
    add_device_arguments(serve)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(handler=serve_command)


def serve_command(args) -> int:
    try:  # the `server` extra; checked before the model loads
        import uvicorn
        from .app import create_app
    except ImportError as e:
        raise DyscoEdgeError(f"the server needs its extra ({e.name} is missing): "
                             "pip install 'dysco-edge[server]'") from None
    from ..api import Model
    from .settings import ServerSettings
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if args.n_ctx < 1:
        raise InputError(f"--n-ctx must be >= 1, got {args.n_ctx}")
    memory = memory_options(args)
    model = Model(chosen_model(args), n_ctx=args.n_ctx, n_threads=args.threads, head_map=args.head_map,
                  parallel=args.parallel, **memory, **device_options(args))
    try:
        settings = ServerSettings(model_id=args.alias or args.model_name or model.path.name, api_key=args.api_key,
                                  cors_origins=tuple(args.cors), max_queue=args.queue, max_tokens=args.max_tokens,
                                  dysco_mode=args.dysco_mode, local_paths=_is_loopback(args.host))
        _announce(model, args)
        uvicorn.run(create_app(model, settings), host=args.host, port=args.port, log_level=args.log_level,
                    log_config=log_config(args.log_level))
    finally:
        model.close()
    return 0


def log_config(level: str) -> dict:
    """uvicorn's logging config with our "dysco_edge" loggers beside its own: the same handler and
    format ("INFO:     request 3: ..."), at --log-level."""
    from uvicorn.config import LOGGING_CONFIG
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["dysco_edge"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def _announce(model, args) -> None:
    found = model.find_heads()  # looked up now, not by the first request
    heads = (f"DySCO {args.dysco_mode} by default, with {found.describe()}" if found
             else "no QR heads: dysco \"auto\" answers plainly")
    if model.parallel > 1:
        heads = f"{model.parallel} parallel slots; {heads}"
    print(f"dysco-edge: serving {model.path.name} (n_ctx {model.n_ctx}; {heads}) on "
          f"http://{args.host}:{args.port}/v1 (the document page: http://{args.host}:{args.port}/); "
          f"running on {model.where()}", file=sys.stderr, flush=True)
    if model.placement:
        print(f"dysco-edge: {model.placement.describe()}", file=sys.stderr, flush=True)
    if model.parallel > 1 and model.engine.options.flash_attn:
        print("dysco-edge: note: with flash attention on, a request decoded beside others may get another answer "
              "than alone (llama.cpp's flash-attention kernels; --flash-attn off keeps them equal)",
              file=sys.stderr, flush=True)
    if not _is_loopback(args.host) and not args.api_key:
        print(f"dysco-edge: warning: {args.host} is reachable from other machines and no --api-key is set",
              file=sys.stderr, flush=True)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
