"""Public objects: `Model` (generate with or without DySCO) and `DocumentSession`
(a long document prefilled once, many questions). Thin facades over runtime/ and heads/.

A Model is safe to share between threads: generations take turns on its context, or, with
`parallel=N`, up to N plain generations advance together in one batch.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .config import DyscoConfig
from .context_memory import available_bytes, check_n_ctx, kv_shape
from .documents.kv_cache import model_identity
from .documents.markers import token_span
from .documents.prefill import CacheSpec, as_cache, open_prefix
from .documents.readers import refuse_overlong
from .errors import ConfigError, ContextOverflow, InputError, NoHeadMap
from .heads.gguf_meta import check_gguf_file
from .heads.lookup import FoundHeadMap, locate_head_map, no_head_map_message
from .heads.maps import HeadMap, ModelShape, heads_outside, load_head_map
from .limits import MAX_SEQUENCES, int_in
from .models import resolve as resolve_model
from .placement import Fit, MemoryOptions, fit_model
from .runtime.batch import Batcher
from .runtime.engine import (CACHE_TYPE_IDS, Engine, EngineOptions, ProgressFn, SplitOptions, choose_offload,
                             connect_rpc, offload_free_bytes)
from .runtime.focus_trace import FocusTrace
from .runtime.generation import ContextLock, Generation, Request, TextStream
from .runtime.prefix_cache import PrefixCache
from .runtime.prompter import Messages, Prompter
from .runtime.sampling import SamplingOptions

DyscoSpec = Union[DyscoConfig, HeadMap, str, None]

__all__ = ["Model", "DocumentSession", "Generation", "ContextOverflow", "NoHeadMap"]


# the first context of a model whose n_ctx follows its inputs: enough to read its vocabulary
AUTO_CTX_START = 512
CTX_ROUNDING = 256  # llama.cpp pads a context to this anyway
DOCUMENT_TEMPLATE = "{document}\n\nQuestion: {question}"  # a document question's user turn


class Model:
    """A GGUF model on llama.cpp that generates with DySCO (or plainly).

    path: a GGUF file, a model's name from the catalog (`Model("qwen2.5-coder-1.5b")`; see
    dysco_edge.models; a part-based one is assembled on first use), or None for the default model.
    n_ctx None: the context grows to what each input needs (prompt + max_new_tokens, rounded up
    to 256), up to the model's training context. n_gpu_layers None and flash_attn "auto": where a
    device can take layers (a GPU, or an RPC server's device), every layer offloaded and flash
    attention on; on the CPU alone, neither. n_threads None: one CPU thread per physical core (as
    llama.cpp's tools choose; cores.py).

    Several devices: split_mode "layer" (whole layers per device, llama.cpp's default), "row"
    (rows of each matrix; CUDA) or "none" (only device main_gpu); tensor_split one share per device
    (default: by free memory); rpc the host:port of `dysco-edge rpc-server`s whose devices join
    this process's before it loads (for good: later models in the process see them too) and come
    first in the devices' order.

    Small GPUs: kv_offload False keeps the KV cache (and attention) in host memory; cache_type_k /
    cache_type_v "f16", "q8_0" or "q4_0" (a quantized V needs flash attention, which "auto" then
    turns on); gpu_memory (bytes, or a size such as "8G", with n_ctx) offloads the most layers whose
    weights, KV cells and compute buffers fit in that much device memory (`placement` says what it
    chose and why; placement.py).

    parallel N > 1: up to N generations called from different threads decode together, one batch
    per step, each in a sequence with n_ctx cells of its own (N times the KV memory; n_ctx must then
    be given). Plain and dynamic DySCO generations (fast or exact) share the batch, each DySCO sequence
    with its own importance and selection, its answer the one it gets alone; an exact sequence's probe
    is a decode of its own before each batch step. Static DySCO is refused: load the model with
    parallel=1 for it."""

    def __init__(self, path: Optional[Union[str, Path]] = None, *, n_ctx: Optional[int] = None,
                 n_gpu_layers: Optional[int] = None, flash_attn: Union[bool, str] = "auto", n_batch: int = 512,
                 n_threads: Optional[int] = None, head_map: Optional[Union[str, Path, HeadMap]] = None,
                 split_mode: str = "layer", main_gpu: int = 0, tensor_split: Union[Sequence[float], str, None] = None,
                 rpc: Union[str, Sequence[str], None] = None, kv_offload: bool = True, cache_type_k: str = "f16",
                 cache_type_v: str = "f16", gpu_memory: Union[int, str, None] = None, parallel: int = 1):
        parallel = _checked_parallel(parallel, n_ctx)
        self.path = check_gguf_file(resolve_model(path or None))
        split = SplitOptions(split_mode, main_gpu, tensor_split or (), rpc or ())
        memory = MemoryOptions(kv_offload, cache_type_k, cache_type_v, gpu_memory)
        if memory.gpu_memory is not None and n_gpu_layers is not None:
            raise InputError(f"give n_gpu_layers ({n_gpu_layers}) or gpu_memory, not both: gpu_memory chooses "
                             f"the layers")
        connect_rpc(split.rpc)  # before the offload choice: the servers' devices take the layers
        layers, flash = choose_offload(n_gpu_layers, memory.flash_attn_for(flash_attn))
        self.placement = self._fit(memory, n_ctx, flash, n_batch) if layers != 0 else None
        layers = self.placement.chosen.n_gpu_layers if self.placement else layers
        self._kv_shape = kv_shape(self.path)  # a context that cannot fit is refused before any work
        self._device_free = offload_free_bytes() if layers != 0 else 0
        if n_ctx is not None:
            n_ctx = check_n_ctx(n_ctx, self._kv_shape, available=available_bytes(self._device_free))
            if parallel > 1:  # a KV stream of n_ctx cells per sequence
                check_n_ctx(n_ctx * parallel, self._kv_shape, available=available_bytes(self._device_free),
                            name=f"n_ctx x parallel {parallel} =")
        self._auto_ctx = n_ctx is None
        self.engine = Engine(self.path, EngineOptions(n_ctx=n_ctx or AUTO_CTX_START, n_batch=n_batch,
                                                      n_ubatch=n_batch, n_gpu_layers=layers, flash_attn=flash,
                                                      n_threads=n_threads, n_seq_max=parallel, split=split,
                                                      type_k=CACHE_TYPE_IDS[memory.cache_type_k],
                                                      type_v=CACHE_TYPE_IDS[memory.cache_type_v],
                                                      offload_kqv=memory.kv_offload))
        self._file_identity: Optional[dict] = None
        self.shape = ModelShape.from_gguf_metadata(self.engine.metadata)
        self.prompter = Prompter(self.engine)
        self._user_head_map = load_head_map(head_map) if isinstance(head_map, (str, Path)) else head_map
        self._user_head_map_path = str(head_map) if isinstance(head_map, (str, Path)) else ""
        self._found_heads: Optional[tuple[Optional[FoundHeadMap]]] = None  # looked up once, on first use
        self._cache = PrefixCache(self.engine)
        self._batcher = Batcher(self.engine, self._cache, parallel) if parallel > 1 else None
        self._lock = self._batcher.solo() if self._batcher else ContextLock()

    def _fit(self, memory: MemoryOptions, n_ctx: Optional[int], flash: bool, n_batch: int) -> Optional[Fit]:
        """What the gpu_memory budget chose (None without a budget)."""
        if memory.gpu_memory is None:
            return None
        return fit_model(self.path, n_ctx, memory, flash_attn=flash, n_ubatch=n_batch)

    def close(self) -> None:
        with self._lock:
            if self._batcher is not None:
                self._batcher.close()
            self.engine.close()
        if self._batcher is not None:  # its thread needs the context back to see that it is closed
            self._batcher.join()

    @property
    def parallel(self) -> int:
        """How many generations may decode together (Model's `parallel`)."""
        return len(self._batcher.slots) if self._batcher else 1

    def slots(self) -> list[dict]:
        """What each slot runs now: id, state (idle, prefill, decode; "solo" on slot 0 while a job that
        needs the whole context holds the model: a prefill, a generation of a parallel=1 model) and its
        cached prompt tokens."""
        if self._batcher is not None:
            return self._batcher.describe()
        state = "idle" if self._lock.owner is None else "solo"
        return [{"id": 0, "state": state, "cached_tokens": len(self._cache.tokens)}]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained for (from its GGUF)."""
        return self.engine.n_ctx_train

    def where(self) -> str:
        """Where it runs, in words (CPU, or the GPU and how many layers are offloaded)."""
        return self.engine.where()

    @property
    def chat(self):
        """The model's chat template (runtime.chat.ChatTemplate), or None."""
        return self.prompter.chat

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of text; by default plain text (no BOS, special-token text such as
        '<|im_start|>' not parsed), as a raw completion prompt with add_bos and special."""
        return self.engine.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of token ids (special tokens as text; broken UTF-8 replaced)."""
        return self.engine.detokenize(token_ids, special=True).decode("utf-8", "replace")

    # ---- inputs ----

    def head_map(self) -> Optional[HeadMap]:
        """The QR heads this model gets (see `find_heads`), or None."""
        found = self.find_heads()
        return None if found is None else found.head_map

    def find_heads(self) -> Optional[FoundHeadMap]:
        """The head map and where it came from: the user's, else embedded in the GGUF,
        else shipped, else from the user's head-map folder; None when none fits."""
        if self._found_heads is None:
            embedded = any(key.startswith("dysco.") for key in self.engine.metadata)
            self._found_heads = (locate_head_map(self.shape, self.path, user_map=self._user_head_map,
                                                 user_map_path=self._user_head_map_path,
                                                 check_embedded=embedded),)
        return self._found_heads[0]

    def resolve_dysco(self, dysco: DyscoSpec) -> Optional[DyscoConfig]:
        if dysco is None or isinstance(dysco, DyscoConfig):
            config = dysco
        elif isinstance(dysco, HeadMap):
            config = dysco.to_config()
        elif dysco == "auto":
            found = self.head_map()
            if found is None:
                raise NoHeadMap(no_head_map_message(self.shape, self.path))
            config = found.to_config()
        else:
            raise InputError(f"dysco must be a DyscoConfig, a HeadMap, 'auto' or None, got {dysco!r}")
        self._check_fits(config)
        return self.prompter.with_template_sequences(config)

    def _check_fits(self, config: Optional[DyscoConfig]) -> None:
        """QR heads and template token ids inside this model, before they reach C."""
        if config is None:
            return
        outside = heads_outside(config.qr_heads, self.shape)
        if outside:
            raise ConfigError(f"qr_heads: {'; '.join(outside[:3])}")
        n_vocab = self.engine.n_vocab
        bad = next((t for seq in config.template_sequences for t in seq if t >= n_vocab), None)
        if bad is not None:
            raise ConfigError(f"template_sequences: token id {bad} is outside the vocabulary (0..{n_vocab - 1})")

    def prompt_ids(self, prompt: Optional[str] = None, *, messages: Optional[Messages] = None,
                   token_ids: Optional[Sequence[int]] = None) -> tuple[list[int], int]:
        """Token ids of the input and its intervention warmup for 'auto'."""
        return self.prompter.ids(prompt, messages=messages, token_ids=token_ids)

    # ---- generation ----

    def generate(self, prompt: Optional[str] = None, *, messages: Optional[Messages] = None,
                 token_ids: Optional[Sequence[int]] = None, dysco: DyscoSpec = "auto",
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: Optional[int] = None, stop: Sequence[str] = (),
                 stream: bool = False, trace: bool = False, progress: Optional[ProgressFn] = None,
                 stop_event: Optional[threading.Event] = None,
                 stop_on_repeat: int = 0) -> Union[Generation, TextStream]:
        """Generate an answer. With stream=True, returns an iterator of text pieces whose
        `.result` (set once it is exhausted) is the Generation. stop_on_repeat N > 0 ends the answer
        once its last N tokens repeat an earlier stretch of it, without the repetition
        (finish_reason "repeat")."""
        ids, warmup_auto = self.prompt_ids(prompt, messages=messages, token_ids=token_ids)
        max_new_tokens = int_in(max_new_tokens, "max_new_tokens", 1, 2**63 - 1)
        stop_on_repeat = int_in(stop_on_repeat, "stop_on_repeat", 0, 2**31 - 1)  # 0: off
        self.fit(len(ids), max_new_tokens)
        request = Request(ids, self.resolve_dysco(dysco),
                          SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed),
                          max_new_tokens, tuple(stop), FocusTrace(len(ids)) if trace else None, progress, stop_event,
                          warmup_auto, stop_on_repeat=stop_on_repeat)
        pieces = self._text_stream(request)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return pieces.result

    def _text_stream(self, request: Request) -> TextStream:
        """A generation alone on the context, or, for a parallel model, in its batch (plain or fast DySCO)."""
        if self._batcher is None:
            return TextStream(self.engine, self._cache, self._lock, request)
        self._check_batched(request.config)
        return TextStream(self.engine, self._cache, self._lock, request, tokens=self._batcher.tokens(request))

    def _check_batched(self, config: Optional[DyscoConfig]) -> None:
        """A parallel model's batch runs plain and dynamic DySCO generations (each sequence's importance in
        its own KV stream); static DySCO sets its bias from the host, for the whole context."""
        if config is None:
            return
        if not config.dynamic:
            raise InputError(f"Model(parallel={self.parallel}) runs dynamic DySCO only (static DySCO sets one "
                             f"bias from the host for the whole batch): pass a config with dynamic=True, "
                             f"dysco=None, or load the model with parallel=1 for static DySCO")
        if not self.engine.native.track_supported:
            raise InputError(f"Model(parallel={self.parallel}): this model's KV cache (sliding-window layers) keeps "
                             f"DySCO's state on the host, for one sequence: load it with parallel=1 for DySCO, "
                             f"or pass dysco=None")

    def fit(self, n_prompt: int, room: int = 1) -> None:
        """Check that a prompt of n_prompt tokens fits; when n_ctx follows the inputs, grow the
        context (keeping the cached prefix) to hold it and `room` more tokens."""
        if not self._auto_ctx:
            if n_prompt + 1 > self.n_ctx:
                raise ContextOverflow(f"the input is {n_prompt} tokens but the context holds {self.n_ctx} "
                                      f"(n_ctx={self.n_ctx}); shorten it or load the model with a larger n_ctx",
                                      n_prompt=n_prompt, n_ctx=self.n_ctx)
            return
        if n_prompt + 1 > self.n_ctx_train:
            raise ContextOverflow(f"the input is {n_prompt} tokens but {self.path.name} was trained for a "
                                  f"context of {self.n_ctx_train} tokens; shorten it (or pass a larger n_ctx "
                                  f"to go past the training length at your own risk)",
                                  n_prompt=n_prompt, n_ctx=self.n_ctx_train)
        want = min(-(-(n_prompt + max(room, 1)) // CTX_ROUNDING) * CTX_ROUNDING, self.n_ctx_train)
        if want > self.n_ctx:
            check_n_ctx(want, self._kv_shape, available=available_bytes(self._device_free))
            with self._lock:
                self.engine.resize(want)

    def prefill(self, token_ids: Sequence[int], progress: Optional[ProgressFn] = None) -> None:
        """Compute and keep the KV cache of a prefix (reused by later prompts that start with it)."""
        self.fit(len(token_ids))
        with self._lock:
            self._cache.keep(token_ids, progress)

    # ---- the kept prefix's cells, for the disk cache (documents/) ----

    def file_identity(self) -> dict:
        """The model file's size and header hash (computed once)."""
        if self._file_identity is None:
            self._file_identity = model_identity(self.path)
        return self._file_identity

    def cells_identity(self) -> dict:
        """What besides the file and the tokens decides the cells (KV types, backend, versions)."""
        return self.engine.cells_identity()

    def kept_prefix(self) -> list[int]:
        """The tokens whose unbiased cells the context holds now."""
        with self._lock:
            return list(self._cache.tokens)

    def prefix_cells(self) -> tuple[list[int], bytearray]:
        """The kept prefix's tokens and their serialized (unbiased) cells."""
        with self._lock:
            return list(self._cache.tokens), self._cache.cells()

    def restore_prefix(self, token_ids: Sequence[int], cells: Union[bytes, bytearray]) -> None:
        """Keep token_ids as the prefix from cells prefix_cells gave, instead of prefilling them."""
        self.fit(len(token_ids))
        with self._lock:
            self._cache.restore(token_ids, cells)

    @contextmanager
    def attention_scale(self, factor: float) -> Iterator[None]:
        """Generations inside run with every attention logit scaled by `factor` (AttnTS); the
        KV cache is emptied before and after, since its keys were computed unscaled. For the evaluation
        on a Model of its own: another thread generating meanwhile would run scaled too."""
        self.prefill([])
        with self._lock:
            self.engine.native.set_attn_scale(factor)
        try:
            yield
        finally:
            with self._lock:
                self.engine.native.set_attn_scale(1.0)
            self.prefill([])

    def text_span(self, token_ids: Sequence[int], text: str) -> Optional[tuple[int, int]]:
        """Positions lo..hi-1 of the tokens that hold text (its first occurrence), or None."""
        return token_span([self.engine.detokenize([t], special=True) for t in token_ids], text)

    def focus_passages(self, generation: Generation, *, count: int = 3, window: int = 12) -> list[str]:
        """Prompt passages around the positions most often among a traced run's most important."""
        return [text for _, text in self.focus_spans(generation, count=count, window=window)]

    def focus_spans(self, generation: Generation, *, count: int = 3, window: int = 12,
                    within: Optional[tuple[int, int]] = None) -> list[tuple[int, str]]:
        """(prompt position most up-weighted, text around it) of the passages focus_passages gives;
        `within` (lo, hi) keeps positions and text to prompt positions lo..hi-1 (a document's)."""
        if not generation.trace:
            return []
        lo, hi = within or (0, generation.n_prompt)
        hits = Counter(int(p) for step in generation.trace for p in step.top_positions if lo <= p < hi)
        spans, taken = [], []
        for pos, _ in hits.most_common():
            if any(abs(pos - t) < window for t in taken):
                continue
            taken.append(pos)
            piece = self.engine.detokenize(generation.prompt_ids[max(lo, pos - window):min(hi, pos + window)])
            spans.append((pos, " ".join(piece.decode("utf-8", "replace").split())))
            if len(spans) == count:
                break
        return spans

    def document(self, text: str, *, system: Optional[str] = None, progress: Optional[ProgressFn] = None,
                 template: str = DOCUMENT_TEMPLATE, cache: CacheSpec = True,
                 reserve: int = 512) -> "DocumentSession":
        """A document prefilled once (or loaded from the KV cache on disk: `cache` True is the
        default folder, False none, or a KVCacheConfig); `reserve` tokens of context are kept
        free for a question and its answer when n_ctx follows the input."""
        return DocumentSession(self, text, system=system, progress=progress, template=template,
                               cache=cache, reserve=reserve)


def _checked_parallel(parallel: int, n_ctx: Optional[int]) -> int:
    parallel = int_in(parallel, "parallel", 1, MAX_SEQUENCES, what="a number of sequences")
    if parallel > 1 and n_ctx is None:
        raise InputError(f"parallel={parallel} needs a fixed n_ctx (each of the {parallel} sequences gets that "
                         f"many KV cells), e.g. n_ctx=8192")
    return parallel


class DocumentSession:
    """A document prefilled once; each question reuses its KV cache and restarts DySCO."""

    def __init__(self, model: Model, text: str, *, system: Optional[str] = None,
                 progress: Optional[ProgressFn] = None, template: str = DOCUMENT_TEMPLATE,
                 cache: CacheSpec = True, reserve: int = 512):
        if not text.strip():
            raise InputError("the document is empty")
        if reserve < 1:
            raise InputError(f"reserve must be >= 1, got {reserve}")
        self.model, self.text, self.system, self.template = model, text, system, template
        refuse_overlong(text, model.tokenize, model.n_ctx_train if model._auto_ctx else model.n_ctx, reserve)
        # what any two questions share is the prefix worth prefilling once
        first = model.prompt_ids(**self._input("\u2063A"))[0]
        second = model.prompt_ids(**self._input("\u2063B"))[0]
        model.fit(len(first), reserve)  # before any work: an over-long document fails here
        self.n_document_tokens = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b),
                                      min(len(first), len(second)))
        self.opened = open_prefix(model, first[:self.n_document_tokens], as_cache(cache), progress)
        self._span: Optional[tuple[int, int]] = None

    def _input(self, question: str) -> dict:
        """generate() arguments for a question: chat messages, or plain text without a template."""
        content = self.template.format(document=self.text, question=question)
        if self.model.chat is None:
            return {"prompt": f"{self.system}\n\n{content}" if self.system else content}
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {"messages": system + [{"role": "user", "content": content}]}

    def document_span(self) -> tuple[int, int]:
        """Prompt positions lo..hi-1 holding the document's own text: not the system prompt, the chat
        template or the question (where `Model.focus_spans(within=...)` should look)."""
        if self._span is None:
            ids = self.model.prompt_ids(**self._input("\u2063A"))[0][:self.n_document_tokens]
            self._span = self.model.text_span(ids, self.text) or (0, self.n_document_tokens)
        return self._span

    def ask(self, question: str, **options) -> Union[Generation, Iterator[str]]:
        if not question.strip():
            raise InputError("the question is empty")
        return self.model.generate(**self._input(question), **options)
