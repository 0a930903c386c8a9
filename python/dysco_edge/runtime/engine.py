"""One llama.cpp model and context, driven token by token: the only owner of llama.cpp
pointers (with native.py for the DySCO C API).

The DySCO loop needs finer control than `llama_cpp.Llama.eval` gives: which token gets
logits, removing cells, probing. Everything llama.cpp-specific the package needs is here:
decoding, KV truncation and state, tokens and text, metadata, end of generation, sampling.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import _llama  # noqa: F401  (points llama_cpp at our libllama before it loads)
import llama_cpp

from ..errors import EngineError, InputError
from .native import NativeContext, lib_dir
from .sampling import SamplingOptions

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class EngineOptions:
    n_ctx: int = 8192
    n_batch: int = 512
    n_ubatch: int = 512
    n_gpu_layers: int = 0
    flash_attn: bool = False
    type_k: Optional[int] = None  # a ggml type id (llama_cpp.GGML_TYPE_*); None = F16
    type_v: Optional[int] = None
    n_threads: Optional[int] = None
    n_seq_max: int = 1  # > 1: a unified KV cache shared by that many sequences

    def __post_init__(self):
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_ubatch > self.n_batch:
            raise InputError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")


FLASH_ATTN_CHOICES = ("auto", "on", "off")
_DEVICE_KINDS = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "accelerator"}


@dataclass(frozen=True)
class Device:
    kind: str  # CPU, GPU, iGPU, accelerator
    name: str
    description: str


def gpu_offload_supported() -> bool:
    """Whether this build of libllama has a GPU backend (CUDA, Metal, Vulkan, ...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def devices() -> list[Device]:
    """The compute devices ggml registered in this build (llama-cpp-python binds none of this)."""
    ggml = _ggml()
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        out.append(Device(_DEVICE_KINDS.get(ggml.ggml_backend_dev_type(dev), "other"),
                          ggml.ggml_backend_dev_name(dev).decode("utf-8", "replace"),
                          ggml.ggml_backend_dev_description(dev).decode("utf-8", "replace")))
    return out


def _ggml():
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):  # the backend registry lives here
        if (lib_dir() / name).exists():
            lib = ctypes.CDLL(str(lib_dir() / name))  # already loaded by libllama: the same handle
            break
    else:
        raise EngineError(f"no libggml in {lib_dir()}")
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [ctypes.c_void_p], ctypes.c_int
    return lib


def choose_offload(n_gpu_layers: Optional[int], flash_attn: "str | bool",
                   gpu: Optional[bool] = None) -> tuple[int, bool]:
    """(layers to offload, flash attention) as llama.cpp defaults them: with a GPU backend every
    layer is offloaded and flash attention is on; explicit choices win. `gpu` None: ask the build."""
    if isinstance(flash_attn, bool):
        flash_attn = "on" if flash_attn else "off"
    if flash_attn not in FLASH_ATTN_CHOICES:
        raise InputError(f"flash_attn must be one of {', '.join(FLASH_ATTN_CHOICES)}, got {flash_attn!r}")
    if n_gpu_layers is not None and n_gpu_layers < -1:
        raise InputError(f"n_gpu_layers must be >= -1 (-1: all), got {n_gpu_layers}")
    gpu = gpu_offload_supported() if gpu is None else gpu
    layers = n_gpu_layers if n_gpu_layers is not None else (-1 if gpu else 0)
    if not gpu:
        layers = 0  # a CPU build ignores offloading; say so by recording 0
    on = {"on": True, "off": False, "auto": gpu and layers != 0}[flash_attn]
    return layers, on


class Engine:
    """One model and one context; positions of sequence `seq_id` are managed by the caller."""

    def __init__(self, model_path: str | os.PathLike, options: EngineOptions = EngineOptions()):
        self.path = Path(model_path)
        self.options = options
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=options.n_ctx, n_batch=options.n_batch,
                n_ubatch=options.n_ubatch, n_gpu_layers=options.n_gpu_layers,
                flash_attn=options.flash_attn, type_k=options.type_k, type_v=options.type_v,
                n_threads=options.n_threads, verbose=False)
        except ValueError as err:  # llama-cpp-python's word for "llama.cpp refused it"
            raise EngineError(f"llama.cpp could not load {self.path}: {err}") from None
        self.model = self._llm.model
        self._own_ctx = self._new_context(options.n_ctx) if options.n_seq_max > 1 else None
        self._batch = None
        self._bind(self._own_ctx or self._llm.ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)

    def _bind(self, ctx) -> None:
        """Make ctx the context every call uses (its batch and DySCO controls with it)."""
        self.ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        # llama.cpp caps a batch at the requested n_ctx (it pads n_ctx itself): feed what it takes
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        self.native = NativeContext(ctypes.cast(ctx, ctypes.c_void_p).value)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _new_context(self, n_ctx: int):
        """A context like Llama's on the same weights; with several sequences, on one unified KV
        cache (llama-cpp-python offers no such option for its own context)."""
        params = llama_cpp.llama_context_params.from_buffer_copy(self._llm.context_params)
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, self.options.n_batch, self.options.n_ubatch
        params.n_seq_max = self.options.n_seq_max
        params.kv_unified = self.options.n_seq_max > 1
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise EngineError(f"could not create a context of {n_ctx} tokens with {self.options.n_seq_max} "
                              f"sequence(s) for {self.path}")
        return ctx

    def resize(self, n_ctx: int) -> None:
        """A context of n_ctx positions on the same loaded weights; sequence 0's cells move over
        (the caller's record of which tokens they hold stays true)."""
        cells = self.save_seq(0) if self.seq_pos_max(0) >= 0 else None
        ctx = self._new_context(n_ctx)
        old, self._own_ctx = self._own_ctx, ctx
        self._bind(ctx)
        self.options = replace(self.options, n_ctx=n_ctx)
        if old is not None:
            llama_cpp.llama_free(old)
        if cells is not None:
            self.load_seq(cells, 0)

    def close(self) -> None:
        if self._own_ctx is not None:
            llama_cpp.llama_free(self._own_ctx)
            self._own_ctx = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def where(self) -> str:
        """Where this engine runs, in words: the first line `run` prints."""
        o = self.options
        gpus = [d for d in devices() if d.kind != "CPU"]
        threads = o.n_threads or llama_cpp.llama_n_threads(self.ctx)
        if o.n_gpu_layers == 0 or not gpus:
            cpu = next((d.description for d in devices() if d.kind == "CPU"), "")
            return f"CPU{': ' + cpu if cpu else ''} ({threads} thread{'s' if threads != 1 else ''})"
        layers = self.n_layer if o.n_gpu_layers < 0 else min(o.n_gpu_layers, self.n_layer)
        names = ", ".join(d.description or d.name for d in gpus)
        return (f"{names} ({layers}/{self.n_layer} layers offloaded, flash attention "
                f"{'on' if o.flash_attn else 'off'})")

    # ---- the model's vocabulary and metadata ----

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp read it (values as strings)."""
        return self._llm.metadata

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of text; `special` parses special-token text such as '<|im_start|>'."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> bytes:
        """The bytes of ids (a token may end inside a UTF-8 character)."""
        return self._llm.detokenize(list(ids), special=special)

    def special_text(self, which: str) -> str:
        """The text of the 'bos' or 'eos' token ('' when the model has none)."""
        token = {"bos": llama_cpp.llama_vocab_bos, "eos": llama_cpp.llama_vocab_eos}[which](self._vocab)
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        """Whether the token ends a generation (EOS, end of turn, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # ---- the KV cache ----

    @property
    def memory(self):
        return llama_cpp.llama_get_memory(self.ctx)

    def clear(self) -> None:
        """Forget every sequence."""
        llama_cpp.llama_memory_clear(self.memory, True)

    def truncate(self, pos: int, seq_id: int = 0) -> None:
        """Drop positions >= pos of the sequence."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, pos, -1)

    def seq_pos_max(self, seq_id: int = 0) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.memory, seq_id)

    def seq_state(self, seq_id: int = 0) -> bytes:
        """The sequence's serialized KV cache (for comparing caches)."""
        return bytes(self.save_seq(seq_id))

    def save_seq(self, seq_id: int = 0) -> bytearray:
        """The sequence's KV cells, serialized by llama.cpp (its positions, tokens' K and V)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, view, size, seq_id)
        del view  # a live ctypes view pins the bytearray's size
        if written == 0 and size > 0:
            raise EngineError(f"llama.cpp could not serialize the cells of sequence {seq_id}")
        del data[written:]
        return data

    def load_seq(self, data: bytes | bytearray, seq_id: int = 0) -> None:
        """Replace the sequence's cells by ones save_seq produced (same model, KV types and backend)."""
        self.truncate(0, seq_id)
        n = len(data)
        array_type = ctypes.c_uint8 * n
        src = array_type.from_buffer(data) if isinstance(data, bytearray) else array_type.from_buffer_copy(data)
        read = llama_cpp.llama_state_seq_set_data(self.ctx, src, n, seq_id)
        del src
        if read == 0:  # llama.cpp has emptied the sequence again
            raise EngineError(f"llama.cpp refused {n} bytes of saved cells for sequence {seq_id} "
                              f"(another model, KV type or context size?)")

    def cells_identity(self) -> dict[str, object]:
        """What besides the model file and tokens decides the bytes of saved cells."""
        o = self.options
        return {"type_k": o.type_k, "type_v": o.type_v, "flash_attn": o.flash_attn,
                "n_gpu_layers": o.n_gpu_layers, "devices": [d.description for d in devices()],
                "llama_cpp": llama_cpp.__version__}

    # ---- decoding ----

    def decode(self, tokens: Sequence[int], start_pos: int, *, want_logits: bool = True,
               seq_id: int = 0, progress: Optional[ProgressFn] = None) -> None:
        """Feed tokens at start_pos.. in batches; only the last one gets logits (if asked)."""
        n = len(tokens)
        if n == 0:
            raise InputError("decode needs at least one token")
        if start_pos + n > self.n_ctx:
            raise InputError(f"{start_pos + n} positions do not fit the context of {self.n_ctx} tokens")
        for begin in range(0, n, self.n_batch):
            chunk = tokens[begin:begin + self.n_batch]
            self._fill_batch(chunk, start_pos + begin, seq_id, want_logits and begin + len(chunk) == n)
            rc = llama_cpp.llama_decode(self.ctx, self._batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed with {rc} at positions {start_pos + begin}.."
                                  f"{start_pos + begin + len(chunk) - 1}")
            if progress:
                progress(begin + len(chunk), n)

    def _fill_batch(self, chunk: Sequence[int], pos0: int, seq_id: int, last_logits: bool) -> None:
        b = self._batch
        b.n_tokens = len(chunk)
        for i, tok in enumerate(chunk):
            b.token[i] = int(tok)
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = 0
        b.logits[len(chunk) - 1] = 1 if last_logits else 0

    def logits(self) -> np.ndarray:
        """Logits of the last token decoded with want_logits (a copy, float32)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()


class Sampler:
    """A llama.cpp sampler chain; `sample(engine)` picks from the last decoded logits."""

    def __init__(self, options: SamplingOptions = SamplingOptions()):
        self.options = options
        params = llama_cpp.llama_sampler_chain_default_params()
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        for stage in self._stages(options):
            llama_cpp.llama_sampler_chain_add(self._chain, stage)

    @staticmethod
    def _stages(o: SamplingOptions):
        if o.greedy:
            return [llama_cpp.llama_sampler_init_greedy()]
        stages = []
        if o.top_k:
            stages.append(llama_cpp.llama_sampler_init_top_k(o.top_k))
        if o.top_p < 1:
            stages.append(llama_cpp.llama_sampler_init_top_p(o.top_p, 1))
        if o.min_p > 0:
            stages.append(llama_cpp.llama_sampler_init_min_p(o.min_p, 1))
        stages.append(llama_cpp.llama_sampler_init_temp(o.temperature))
        seed = o.seed if o.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        stages.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return stages

    def sample(self, engine: Engine) -> int:
        return int(llama_cpp.llama_sampler_sample(self._chain, engine.ctx, -1))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):
        self.close()
