"""The flags `run` and `serve` share for placing a model on several devices: llama.cpp's split
options and RPC servers (checked by runtime.engine.SplitOptions when the model loads)."""
from __future__ import annotations

SPLIT_MODES = ("layer", "row", "none")  # runtime.engine.SPLIT_MODES, without importing llama.cpp to parse


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
