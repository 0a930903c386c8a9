"""`dysco-edge devices [--check MODEL]`: the devices llama.cpp sees here; with --check, where every node
DySCO adds to the decode graphs runs on them (a short plain, fast and exact decode and a head capture),
exiting 1 when one falls back to the CPU while its layer runs on a GPU. What a Mac (Metal) or Vulkan user
runs first."""
from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .models import add_model_arguments, chosen_model

FLASH_ATTN = ("auto", "on", "off")
K_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids (llama_cpp.GGML_TYPE_*)
PROMPT_TOKENS = 48


def add_parser(subparsers) -> None:
    dev = subparsers.add_parser("devices", help="the devices llama.cpp sees; --check: where DySCO's graph nodes run",
                                description=__doc__.split("\n\n")[0])
    dev.add_argument("--check", action="store_true",
                     help="decode a few tokens with the model (plain, fast, exact) and report each DySCO node's "
                          "device; exit 1 if one falls back to the CPU while its layer is on a GPU")
    add_model_arguments(dev, positional_help="GGUF file for --check")
    dev.add_argument("--head-map", metavar="FILE", help="QR heads for this model (JSON head map)")
    dev.add_argument("--n-gpu-layers", type=int, default=None, help="layers offloaded (default: all, where a GPU is)")
    dev.add_argument("--flash-attn", default="auto", choices=FLASH_ATTN,
                     help="flash attention (default auto: on where layers run on a GPU)")
    dev.add_argument("--cache-type-k", default="f16", choices=sorted(K_CACHE_TYPES), help="K cache type (default f16)")
    dev.set_defaults(handler=devices_command)


def devices_command(args: argparse.Namespace) -> int:
    path = chosen_model(args)
    if args.check and path is None:
        raise InputError("--check needs a model: a GGUF file, or --model NAME")
    from ..runtime.engine import devices  # heavy imports after argument parsing
    for d in devices():
        print(f"{d.name:<10} {d.kind:<11} {d.backend:<8} {d.description}")
    if not args.check:
        return 0
    return _check(path, args)


def _check(path, args: argparse.Namespace) -> int:
    import numpy as np

    from ..heads.lookup import locate_head_map
    from ..heads.maps import ModelShape, load_head_map
    from ..runtime.engine import Engine, EngineOptions, choose_offload
    from ..runtime.node_placement import record_placement, summarize

    layers, flash = choose_offload(args.n_gpu_layers, args.flash_attn)
    opts = EngineOptions(n_ctx=512, n_gpu_layers=layers, flash_attn=flash, type_k=K_CACHE_TYPES[args.cache_type_k])
    with Engine(path, opts) as eng:
        user_map = load_head_map(args.head_map) if args.head_map else None
        found = locate_head_map(ModelShape.from_gguf_metadata(eng.metadata), path, user_map=user_map,
                                user_map_path=args.head_map or "")
        if found is None:
            raise InputError(f"no head map fits {path.name}: pass one with --head-map")
        prompt = np.random.default_rng(0).integers(100, min(eng.n_vocab, 20000), size=PROMPT_TOKENS).tolist()
        placed = summarize(record_placement(eng, found.head_map.to_config(), prompt))
    offloaded = "all" if layers < 0 else str(layers)
    print(f"\nDySCO nodes of {path.name} ({offloaded} layers offloaded, flash attention {'on' if flash else 'off'}, "
          f"K cache {args.cache_type_k}):")
    print(f"{'part':<19} {'op':<15} {'runs on':<10} {'its layer on':<13} layers")
    for p in placed:
        mark = "  <- CPU fallback" if p.cpu_fallback else ""
        print(f"{p.part:<19} {p.op:<15} {p.backend:<10} {p.attention_backend or '?':<13} {_layers(p.layers)}{mark}")
    fallbacks = [p for p in placed if p.cpu_fallback]
    if fallbacks:
        print(f"\n{len(fallbacks)} DySCO op(s) fall back to the CPU while their layer runs on a GPU "
              "(a copy to the host and back every step)", file=sys.stderr)
        return 1
    print("\nno DySCO node falls back to the CPU")
    return 0


def _layers(layers) -> str:
    return ",".join(str(x) for x in layers) if layers and layers[0] >= 0 else "-"
