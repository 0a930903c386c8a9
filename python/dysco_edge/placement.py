"""What a small GPU holds: the KV cache's placement and types, and `gpu_memory`, a budget that
decides how many layers are offloaded.

The pinned llama.cpp (0c1e570) has no parameter fitting, so the bytes that n_gpu_layers puts on
the devices are computed here from the GGUF's tensor index and metadata, as llama.cpp places them
(llama-model.cpp, load_tensors: the output head counts as a layer after the last, and the last
n_gpu_layers of those n_layer + 1 go to the devices): the output head (the token embedding again
when the model ties them) from n_gpu_layers 1, then the blocks from the last one back, the token
embedding never; an offloaded layer's KV cells go with it unless the KV cache is kept in
host memory (offload_kqv false); DySCO's per-cell tensors go where most of the KV cache is
(native/dysco-track.cpp). The compute buffer is an allowance from the graph's largest
intermediates (README "Small GPUs" compares it with llama.cpp's own figures).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError, InputError
from .heads.gguf_meta import read_gguf_metadata, read_tensor_index

CACHE_TYPES = ("f16", "q8_0", "q4_0")
# ggml type id -> (elements per block, bytes per block): ggml.h/ggml.c type traits at the pinned commit;
# the quantized weight types a GGUF holds come from the gguf package's table of the same
_CACHE_BLOCKS = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}
KV_CELL_PADDING = 256         # llama.cpp pads the KV cache's size to this (llama_context, n_ctx)
DYSCO_CELL_TENSORS = 3        # importance, S and the template flags: one F32 per KV cell each
# the device's own share that no llama.cpp buffer shows (the CUDA context, cuBLAS's workspace, the
# kernels' memory pools): an allowance, checked against what the device really holds by
# bench/device/consumer_budget.py
DEVICE_RESERVE = 768 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryOptions:
    """Where the KV cache lives and in what types, and the devices' memory budget (bytes; a size
    such as "8G" is read too); None: no budget (n_gpu_layers decides)."""
    kv_offload: bool = True
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    gpu_memory: Union[int, str, None] = None

    def __post_init__(self):
        for name in ("cache_type_k", "cache_type_v"):
            if getattr(self, name) not in CACHE_TYPES:
                raise InputError(f"{name} must be one of {', '.join(CACHE_TYPES)}, got {getattr(self, name)!r}")
        if not isinstance(self.kv_offload, bool):
            raise InputError(f"kv_offload must be True or False, got {self.kv_offload!r}")
        if self.gpu_memory is not None:
            object.__setattr__(self, "gpu_memory", _budget(self.gpu_memory))

    @property
    def quantized_v(self) -> bool:
        return self.cache_type_v != "f16"

    def flash_attn_for(self, flash_attn: Union[bool, str]) -> Union[bool, str]:
        """flash_attn as asked, "on" for "auto" when V is quantized (llama.cpp needs it then);
        ConfigError when it is asked off with a quantized V."""
        if not self.quantized_v:
            return flash_attn
        if flash_attn in ("off", False):
            raise ConfigError(f"cache_type_v {self.cache_type_v} needs flash attention (llama.cpp quantizes the V "
                              f"cache only there): turn flash attention on, or keep cache_type_v f16")
        return "on" if flash_attn == "auto" else flash_attn


def _budget(value: Union[int, str]) -> int:
    from .documents.kv_cache import parse_size
    size = parse_size(value) if isinstance(value, str) else value
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InputError(f"gpu_memory must be a size such as 8G (or bytes > 0), got {value!r}")
    return size


def row_bytes(cache_type: str, n: int) -> int:
    per, size = _CACHE_BLOCKS[cache_type]
    return n // per * size


@dataclass(frozen=True)
class ModelBytes:
    """What a GGUF's parts weigh, and the shapes the KV cache and compute buffer follow."""
    layers: tuple[int, ...]      # weight bytes of each block
    output: int                  # output head and final norm: on the devices only with every layer
    embedding: int               # token embedding: always in host memory
    n_vocab: int
    n_embd: int
    n_ff: int
    n_head: int
    kv_width: tuple[tuple[int, int], ...]  # per layer: K and V elements per cell (n_head_kv * head size)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def kv_layer(self, layer: int, n_cells: int, type_k: str, type_v: str) -> int:
        k, v = self.kv_width[layer]
        return n_cells * (row_bytes(type_k, k) + row_bytes(type_v, v))


def tensor_bytes(ggml_type: int, dims: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def model_bytes(path: Union[str, Path]) -> ModelBytes:
    """The parts' bytes and shapes of the GGUF at path (its index and metadata; no weights read)."""
    meta = read_gguf_metadata(path, lambda key: not key.startswith("tokenizer."))
    arch = meta["general.architecture"]
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    n_layer, n_head = int(key("block_count")), int(key("attention.head_count"))
    n_embd = int(key("embedding_length"))
    layers, named = [0] * n_layer, {}
    for name, ggml_type, dims in read_tensor_index(path):
        size = tensor_bytes(ggml_type, dims)
        if name.startswith("blk."):
            layers[int(name.split(".")[1])] += size
        else:
            named[name] = (size, dims)
    embd, embd_dims = named["token_embd.weight"]
    head = named.get("output.weight", (embd, None))[0]  # tied: llama.cpp loads the embedding again as the head
    norm = sum(size for name, (size, _) in named.items() if name.startswith("output_norm"))
    kv_heads = key("attention.head_count_kv", n_head)
    kv_heads = kv_heads if isinstance(kv_heads, list) else [kv_heads] * n_layer
    dk = int(key("attention.key_length", n_embd // n_head))
    dv = int(key("attention.value_length", n_embd // n_head))
    return ModelBytes(tuple(layers), head + norm, embd, int(embd_dims[1]), n_embd, int(key("feed_forward_length", 0)),
                      n_head, tuple((int(h) * dk, int(h) * dv) for h in kv_heads))


def n_cells(n_ctx: int) -> int:
    return -(-n_ctx // KV_CELL_PADDING) * KV_CELL_PADDING


def compute_allowance(m: ModelBytes, n_ctx: int, *, n_ubatch: int, flash_attn: bool, output: bool) -> int:
    """The device's compute buffer, over-estimated from the graph's largest live intermediates (F32) plus
    a tenth: a ubatch's FFN and hidden states, with either its attention (without flash attention the
    KQ matrix of all heads, which the softmax overwrites; with it, F16 copies of K and V) or, where the
    head is offloaded, its logits (computed after the last attention has freed its memory)."""
    cells = n_cells(n_ctx)
    hidden = n_ubatch * 4 * (3 * m.n_ff + 6 * m.n_embd)
    k, v = max(m.kv_width)
    attention = cells * (k + v) * 2 if flash_attn else cells * n_ubatch * m.n_head * 4
    logits = n_ubatch * 4 * m.n_vocab if output else 0
    dysco = 4 * cells * m.n_head * 4  # a QR layer's score probabilities, partial sums, selection ops
    return (hidden + max(attention, logits) + dysco) * 11 // 10


@dataclass(frozen=True)
class Placement:
    """Bytes on the offload devices for n_gpu_layers (llama.cpp's count, the output head included)."""
    n_gpu_layers: int
    n_layer: int
    kv_on_device: bool
    weights: int
    kv: int
    dysco: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.dysco + self.compute + (DEVICE_RESERVE if self.n_gpu_layers else 0)

    @property
    def blocks(self) -> int:
        """Repeating layers offloaded (n_gpu_layers counts the output head first)."""
        return max(0, self.n_gpu_layers - 1)

    def layers_text(self) -> str:
        head = " and the output head" if self.n_gpu_layers else ""
        return f"{self.blocks}/{self.n_layer} layers{head}"

    def parts_text(self) -> str:
        reserve = DEVICE_RESERVE if self.n_gpu_layers else 0
        return (f"weights {self.weights / GIB:.2f}, KV {self.kv / GIB:.2f}, compute {self.compute / GIB:.2f}, "
                f"DySCO {self.dysco / GIB:.3f}, reserve {reserve / GIB:.2f} GiB")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def place(m: ModelBytes, n_gpu_layers: int, n_ctx: int, memory: MemoryOptions, *, flash_attn: bool,
          n_ubatch: int = 512) -> Placement:
    """The device bytes of n_gpu_layers (llama.cpp's count: the output head, then the blocks from the
    last one back; n_layer + 1 is everything)."""
    n = max(0, min(n_gpu_layers, m.n_layer + 1))
    offloaded = range(m.n_layer + 1 - n, m.n_layer) if n else range(0)
    cells = n_cells(n_ctx)
    kv_layers = [m.kv_layer(i, cells, memory.cache_type_k, memory.cache_type_v) for i in range(m.n_layer)]
    kv = sum(kv_layers[i] for i in offloaded) if memory.kv_offload else 0
    # the per-cell tensors sit in the buffer type holding most of the KV cache
    dysco = DYSCO_CELL_TENSORS * 4 * cells if kv * 2 > sum(kv_layers) else 0
    compute = compute_allowance(m, n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn, output=True) if n else 0
    weights = sum(m.layers[i] for i in offloaded) + (m.output if n else 0)
    return Placement(n, m.n_layer, memory.kv_offload and n > 0, weights, kv, dysco, compute)


@dataclass(frozen=True)
class Fit:
    """What a budget chose, and why, in one line (`describe`)."""
    budget: int
    chosen: Placement
    everything: Placement        # all layers and the head offloaded, for the "why"

    def describe(self) -> str:
        c, whole = self.chosen, self.everything
        kv = ("KV cache in host memory" if not c.kv_on_device and c.n_gpu_layers
              else "KV cache with the offloaded layers" if c.n_gpu_layers else "nothing offloaded")
        if c.n_gpu_layers == whole.n_gpu_layers:
            why = f"all of it fits in {_gib(c.total)}"
        else:
            why = f"everything would need {_gib(whole.total)}; this takes {_gib(c.total)}"
        return f"gpu memory {_gib(self.budget)}: {c.layers_text()} offloaded, {kv} ({why}: {c.parts_text()})"


def fit(m: ModelBytes, n_ctx: int, memory: MemoryOptions, *, flash_attn: bool, n_ubatch: int = 512) -> Fit:
    """The most layers (with their KV cells, unless the KV cache stays in host memory) whose bytes fit
    memory.gpu_memory."""
    budget = memory.gpu_memory
    if budget is None:
        raise InputError("fit needs a gpu_memory budget")
    options = [place(m, n, n_ctx, memory, flash_attn=flash_attn, n_ubatch=n_ubatch) for n in range(m.n_layer + 2)]
    chosen = next(p for p in reversed(options) if p.n_gpu_layers == 0 or p.total <= budget)
    return Fit(budget, chosen, options[-1])


def fit_model(path: Union[str, Path], n_ctx: Optional[int], memory: MemoryOptions, *, flash_attn: bool,
              n_ubatch: int = 512) -> Fit:
    """fit() for the GGUF at path; the context must be known (what fits depends on its KV cache)."""
    if n_ctx is None:
        raise InputError(f"gpu_memory {_gib(memory.gpu_memory)}: give n_ctx too (what fits depends on the KV "
                         f"cache's size), e.g. n_ctx 8192")
    return fit(model_bytes(path), n_ctx, memory, flash_attn=flash_attn, n_ubatch=n_ubatch)
