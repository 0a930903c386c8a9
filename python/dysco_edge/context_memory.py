"""Refuse a context that cannot fit before llama.cpp tries: its KV cache, estimated from the
GGUF's metadata, against the memory this machine has.

llama.cpp takes n_ctx as a uint32 (2**32 wraps to 0, "the model's own"), and asked for 10**9
positions it allocates and fills for a minute before it fails or the kernel kills it. The
estimate is a lower bound (F16 cells; a sliding-window model counted with one full-context
layer, MLA with its compressed width), so a context it refuses cannot fit; one it passes may
still fail in llama.cpp, with llama.cpp's own error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ContextOverflow, GGUFMetaError
from .heads.gguf_meta import read_gguf_metadata
from .limits import INT32_MAX, int_in

F16_BYTES = 2


@dataclass(frozen=True)
class KVShape:
    """What one position of context costs at least, per the GGUF."""
    full_bytes: int      # per position, over the layers that see the whole context
    window_bytes: int    # per position, over sliding-window layers (at most `window` positions each)
    window: int
    n_ctx_train: int

    def bytes_for(self, n_ctx: int) -> int:
        return self.full_bytes * n_ctx + self.window_bytes * min(n_ctx, self.window or n_ctx)


def kv_shape(path: Path) -> Optional[KVShape]:
    """The KV cost of the model at path; None when its metadata does not say (then nothing is refused)."""
    try:
        meta = read_gguf_metadata(path, lambda key: not key.startswith("tokenizer."))
        return _shape(meta)
    except (GGUFMetaError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _shape(meta: Mapping[str, Any]) -> Optional[KVShape]:
    arch = meta["general.architecture"]
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    n_layer, kv_heads = int(key("block_count")), key("attention.head_count_kv", key("attention.head_count"))
    if kv_heads is None:
        return None  # no attention cache to speak of (recurrent models)
    per_layer = list(kv_heads) if isinstance(kv_heads, list) else [kv_heads] * n_layer
    head_dim = int(key("embedding_length")) // int(key("attention.head_count"))
    width = int(key("attention.key_length", head_dim)) + int(key("attention.value_length", head_dim))
    lora = key("attention.kv_lora_rank")
    cells = [int(lora) if lora else int(h) * width for h in per_layer]  # elements per position per layer
    window = int(key("attention.sliding_window", 0) or 0)
    full = min(c for c in cells if c > 0) if window else sum(cells)  # with a window: one full layer at least
    rest = sum(cells) - full if window else 0
    return KVShape(full * F16_BYTES, rest * F16_BYTES, window, int(key("context_length", 0) or 0))


def available_bytes(device_free: int = 0) -> int:
    """Memory a KV cache may take here: free RAM and swap (Linux), else all RAM; plus free device memory."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
        host = info.get("MemAvailable", info.get("MemFree", 0)) + info.get("SwapFree", 0)
    except (OSError, ValueError, IndexError):
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host + device_free


def check_n_ctx(n_ctx: Any, shape: Optional[KVShape], *, available: int, name: str = "n_ctx") -> int:
    """n_ctx as an int the context can hold; ContextOverflow naming what it would need otherwise."""
    n_ctx = int_in(n_ctx, name, 1, INT32_MAX)
    if shape is None:
        return n_ctx
    need = shape.bytes_for(n_ctx)
    if need > available:
        fits = next((n for n in (shape.n_ctx_train, 32768, 8192, 2048) if n and shape.bytes_for(n) <= available), 0)
        hint = f"; the model was trained for {shape.n_ctx_train}" if shape.n_ctx_train else ""
        raise ContextOverflow(f"{name} {n_ctx}: its KV cache alone needs at least {_gb(need)} but this machine has "
                              f"{_gb(available)} free{hint}" + (f"; try {name} {fits}" if fits else ""),
                              n_prompt=0, n_ctx=n_ctx)
    return n_ctx


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"
