"""The flags `run` and `serve` share for placing a model: offload, flash attention and the KV cache
(checked by placement.MemoryOptions), and several devices: llama.cpp's split options and RPC servers
(checked by runtime.engine.SplitOptions when the model loads)."""
from __future__ import annotations

from ..placement import CACHE_TYPES, MemoryOptions

SPLIT_MODES = ("layer", "row", "none")  # runtime.engine.SPLIT_MODES, without importing llama.cpp to parse
FLASH_ATTN = ("auto", "on", "off")  # runtime.engine.FLASH_ATTN_CHOICES, without importing llama.cpp to parse


def add_memory_arguments(parser) -> None:
    group = parser.add_argument_group("GPU offload and the KV cache (small GPUs: README \"Small GPUs\")")
    group.add_argument("--n-gpu-layers", type=int, default=None,
                       help="layers offloaded to the GPU(s) or RPC servers (default: all, where there are any; 0: "
                            "CPU); above the layer count the output head too")
    group.add_argument("--gpu-memory", metavar="SIZE",
                       help="offload the most layers that fit in SIZE of device memory (e.g. 8G), KV cache and "
                            "compute buffers included; says what it chose (instead of --n-gpu-layers)")
    group.add_argument("--no-kv-offload", dest="kv_offload", action="store_false",
                       help="keep the KV cache (and attention) in host memory: more layers fit, attention runs "
                            "on the CPU")
    group.add_argument("--cache-type-k", choices=CACHE_TYPES, default="f16", help="KV cache type of K (default f16)")
    group.add_argument("--cache-type-v", choices=CACHE_TYPES, default="f16",
                       help="KV cache type of V (default f16; q8_0 and q4_0 need flash attention)")
    group.add_argument("--flash-attn", nargs="?", const="on", default="auto", choices=FLASH_ATTN,
                       help="flash attention (default auto: on where layers run on a GPU or V is quantized)")


def memory_options(args) -> dict:
    """Model(...) keyword arguments for the offload and KV cache flags, checked before the model loads."""
    options = dict(kv_offload=args.kv_offload, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                   gpu_memory=args.gpu_memory)
    memory = MemoryOptions(**options)
    memory.flash_attn_for(args.flash_attn)
    if args.gpu_memory is not None and args.n_gpu_layers is not None:
        from ..errors import InputError
        raise InputError(f"give --n-gpu-layers ({args.n_gpu_layers}) or --gpu-memory ({args.gpu_memory}), not both")
    return dict(options, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn)


def add_device_arguments(parser) -> None:
    group = parser.add_argument_group("several GPUs or machines")
    group.add_argument("--split-mode", choices=SPLIT_MODES, default="layer",
                       help="how layers spread over several devices: layer (default: whole layers per device), "
                            "row (rows of each matrix; CUDA) or none (only --main-gpu)")
    group.add_argument("--tensor-split", metavar="SHARES",
                       help="share of each device, e.g. 3,1 (default: by free memory); RPC servers' devices "
                            "come first, then this machine's GPUs")
    group.add_argument("--main-gpu", type=int, default=0, metavar="N",
                       help="with --split-mode none the device used (default 0); with row the one for small tensors")
    group.add_argument("--rpc", metavar="HOST:PORT[,...]",
                       help="put layers on these `dysco-edge rpc-server`s too (trusted networks only)")


def device_options(args) -> dict:
    """Model(...) keyword arguments for the flags."""
    return dict(split_mode=args.split_mode, main_gpu=args.main_gpu, tensor_split=args.tensor_split,
                rpc=args.rpc)
