"""Public objects: `Model` (generate with or without DySCO) and `DocumentSession`
(a long document prefilled once, many questions)."""
from __future__ import annotations

import codecs
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

from .chat import NO_TEMPLATE_WARMUP, ChatTemplate
from .config import AUTO, DyscoConfig
from .decode import StepTrace, dysco_tokens, plain_tokens, plan_warmups
from .engine import Engine, EngineOptions, ProgressFn
from .head_lookup import FoundHeadMap, locate_head_map, no_head_map_message
from .head_maps import HeadMap, ModelShape, load_head_map
from .models import default_model_path
from .sampling import Sampler, SamplingOptions

import llama_cpp

Messages = Sequence[Mapping[str, str]]
DyscoSpec = Union[DyscoConfig, HeadMap, str, None]


class ContextOverflow(ValueError):
    """The input does not fit the context window."""


class NoHeadMap(LookupError):
    """dysco='auto' found no QR heads for this model."""


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (end token or stop string), "length", "context", "interrupted"
    n_prompt: int
    dysco: Optional[DyscoConfig]
    trace: Optional[list[StepTrace]] = None
    prompt_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class _Request:
    prompt: list[int]
    config: Optional[DyscoConfig]
    sampling: SamplingOptions
    max_new_tokens: int
    stop: tuple[str, ...]
    trace: Optional[list[StepTrace]]
    progress: Optional[ProgressFn]
    stop_event: Optional[threading.Event]
    warmup_auto: int = NO_TEMPLATE_WARMUP


class Model:
    """A GGUF model on llama.cpp that generates with DySCO (or plainly)."""

    def __init__(self, path: Optional[Union[str, Path]] = None, *, n_ctx: int = 8192, n_gpu_layers: int = 0,
                 flash_attn: bool = False, n_batch: int = 512, n_threads: Optional[int] = None,
                 head_map: Optional[Union[str, Path, HeadMap]] = None):
        self.path = Path(path) if path else default_model_path()
        _check_gguf_file(self.path)
        self.engine = Engine(self.path, EngineOptions(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                                      n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                                                      n_threads=n_threads))
        self.shape = ModelShape.from_gguf_metadata(self.engine.llm.metadata)
        self.chat = ChatTemplate.from_engine(self.engine)
        self._user_head_map = load_head_map(head_map) if isinstance(head_map, (str, Path)) else head_map
        self._user_head_map_path = str(head_map) if isinstance(head_map, (str, Path)) else ""
        self._found_heads: Optional[tuple[Optional[FoundHeadMap]]] = None  # looked up once, on first use
        self._clean: list[int] = []  # tokens whose KV cells were written without bias
        self._vocab = llama_cpp.llama_model_get_vocab(self.engine.model)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    # ---- inputs ----

    def head_map(self) -> Optional[HeadMap]:
        """The QR heads this model gets (see `find_heads`), or None."""
        found = self.find_heads()
        return None if found is None else found.head_map

    def find_heads(self) -> Optional[FoundHeadMap]:
        """The head map and where it came from: the user's, else embedded in the GGUF,
        else shipped, else from the user's head-map folder; None when none fits."""
        if self._found_heads is None:
            embedded = any(key.startswith("dysco.") for key in self.engine.llm.metadata)
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
            raise ValueError(f"dysco must be a DyscoConfig, a HeadMap, 'auto' or None, got {dysco!r}")
        if config is not None and not config.template_sequences and self.chat is not None:
            config = config.replace(template_sequences=tuple(map(tuple, self.chat.role_markers())))
        return config

    def prompt_ids(self, prompt: Optional[str] = None, *, messages: Optional[Messages] = None,
                   token_ids: Optional[Sequence[int]] = None) -> tuple[list[int], int]:
        """Token ids of the input and its intervention warmup for 'auto'."""
        given = [x is not None for x in (prompt, messages, token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or token_ids")
        if token_ids is not None:
            return [int(t) for t in token_ids], NO_TEMPLATE_WARMUP
        if prompt is not None and self.chat is None:
            return self.engine.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False), NO_TEMPLATE_WARMUP
        messages = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
        if self.chat is None:
            raise ValueError("this model has no chat template: pass prompt= text or token_ids=")
        return self.chat.prompt_ids(messages), self.chat.generation_prompt_length(messages)

    # ---- generation ----

    def generate(self, prompt: Optional[str] = None, *, messages: Optional[Messages] = None,
                 token_ids: Optional[Sequence[int]] = None, dysco: DyscoSpec = "auto",
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: Optional[int] = None, stop: Sequence[str] = (),
                 stream: bool = False, trace: bool = False, progress: Optional[ProgressFn] = None,
                 stop_event: Optional[threading.Event] = None) -> Union[Generation, Iterator[str]]:
        """Generate an answer. With stream=True, returns an iterator of text pieces whose
        `.result` (set once it is exhausted) is the Generation."""
        ids, warmup_auto = self.prompt_ids(prompt, messages=messages, token_ids=token_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self._check_fits(len(ids))
        request = _Request(ids, self.resolve_dysco(dysco),
                           SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed),
                           max_new_tokens, tuple(stop), [] if trace else None, progress, stop_event, warmup_auto)
        pieces = _TextStream(self, request)
        if stream:
            return pieces
        for _ in pieces:
            pass
        return pieces.result

    def _check_fits(self, n_prompt: int) -> None:
        if n_prompt + 1 > self.n_ctx:
            raise ContextOverflow(f"the input is {n_prompt} tokens but the context holds {self.n_ctx} "
                                  f"(n_ctx={self.n_ctx}); shorten it or load the model with a larger n_ctx")

    def _reusable_prefix(self, prompt: list[int], limit: int) -> int:
        """Length of the cached, unbiased prefix shared with this prompt (at most limit)."""
        n = 0
        for a, b in zip(self._clean[:limit], prompt[:limit]):
            if a != b:
                break
            n += 1
        return n

    def prefill(self, token_ids: Sequence[int], progress: Optional[ProgressFn] = None) -> None:
        """Compute and keep the KV cache of a prefix (reused by later prompts that start with it)."""
        ids = [int(t) for t in token_ids]
        self._check_fits(len(ids))
        reuse = self._reusable_prefix(ids, len(ids))
        self.engine.truncate(reuse)
        if len(ids) > reuse:
            self.engine.decode(ids[reuse:], reuse, want_logits=False, progress=progress)
        self._clean = ids

    def _token_stream(self, req: _Request) -> Iterator[int]:
        """Token ids of one generation; KV bookkeeping and DySCO state restored on any exit."""
        sampler = Sampler(req.sampling)
        tokens, clean_end = self._start(req, sampler)
        self._clean = []
        try:
            for token in tokens:
                if req.stop_event is not None and req.stop_event.is_set():
                    return
                yield token
        finally:
            tokens.close()
            self.engine.native.clear_bias(-1)
            self.engine.native.set_capture(False)
            # cells past clean_end were written with a bias (or are generated): drop them
            self.engine.truncate(clean_end)
            self._clean = req.prompt[:self.engine.seq_pos_max() + 1]
            sampler.close()

    def _start(self, req: _Request, sampler: Sampler) -> tuple[Iterator[int], int]:
        """The token generator for this request and where its unbiased KV prefix ends."""
        n = len(req.prompt)
        is_end = lambda t: llama_cpp.llama_vocab_is_eog(self._vocab, t)
        limit = min(req.max_new_tokens, self.n_ctx - n)
        if req.config is None:
            reuse = self._reusable_prefix(req.prompt, n - 1)
            self.engine.truncate(reuse)
            return plain_tokens(self.engine, req.prompt, reuse=reuse, sampler=sampler, max_new_tokens=limit,
                                is_end=is_end, progress=req.progress), n - 1
        wi = req.warmup_auto if req.config.intervention_warmup == AUTO else req.config.intervention_warmup
        warm = plan_warmups(n, req.config.context_warmup, wi)
        reuse = self._reusable_prefix(req.prompt, n - warm.fed)
        self.engine.truncate(reuse)
        return dysco_tokens(self.engine, req.prompt, req.config, warm, reuse=reuse, sampler=sampler,
                            max_new_tokens=limit, is_end=is_end, trace=req.trace,
                            progress=req.progress), warm.first_intervention(n)

    def focus_passages(self, generation: Generation, *, count: int = 3, window: int = 12) -> list[str]:
        """Prompt passages around the positions most often among a traced run's most important."""
        if not generation.trace:
            return []
        hits = Counter(int(p) for step in generation.trace for p in step.top_positions
                       if p < generation.n_prompt)
        passages, taken = [], []
        for pos, _ in hits.most_common():
            if any(abs(pos - t) < window for t in taken):
                continue
            taken.append(pos)
            lo, hi = max(0, pos - window), min(generation.n_prompt, pos + window)
            piece = self.engine.llm.detokenize(generation.prompt_ids[lo:hi], special=False)
            passages.append(" ".join(piece.decode("utf-8", "replace").split()))
            if len(passages) == count:
                break
        return passages

    def document(self, text: str, *, system: Optional[str] = None, progress: Optional[ProgressFn] = None,
                 template: str = "{document}\n\nQuestion: {question}") -> "DocumentSession":
        return DocumentSession(self, text, system=system, progress=progress, template=template)


class DocumentSession:
    """A document prefilled once; each question reuses its KV cache and restarts DySCO."""

    def __init__(self, model: Model, text: str, *, system: Optional[str], progress: Optional[ProgressFn],
                 template: str):
        if not text.strip():
            raise ValueError("the document is empty")
        self.model, self.text, self.system, self.template = model, text, system, template
        # what any two questions share is the prefix worth prefilling once
        first = model.prompt_ids(**self._input("\u2063A"))[0]
        second = model.prompt_ids(**self._input("\u2063B"))[0]
        model._check_fits(len(first))
        self.n_document_tokens = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b),
                                      min(len(first), len(second)))
        model.prefill(first[:self.n_document_tokens], progress=progress)

    def _input(self, question: str) -> dict:
        """generate() arguments for a question: chat messages, or plain text without a template."""
        content = self.template.format(document=self.text, question=question)
        if self.model.chat is None:
            return {"prompt": f"{self.system}\n\n{content}" if self.system else content}
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {"messages": system + [{"role": "user", "content": content}]}

    def ask(self, question: str, **options) -> Union[Generation, Iterator[str]]:
        if not question.strip():
            raise ValueError("the question is empty")
        return self.model.generate(**self._input(question), **options)


class _TextStream:
    """Iterates text pieces of a generation; holds back text that may begin a stop string."""

    def __init__(self, model: Model, req: _Request):
        self.model, self.req = model, req
        self.result: Optional[Generation] = None

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted, ids, reason = "", 0, [], "length"
        tokens = self.model._token_stream(self.req)
        try:
            for token in tokens:
                ids.append(token)
                if llama_cpp.llama_vocab_is_eog(self.model._vocab, token):
                    reason = "stop"
                    break
                text += decoder.decode(self.model.engine.llm.detokenize([token], special=False))
                cut = _stop_index(text, self.req.stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    break
                safe = len(text) - _held_back(text, self.req.stop)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            else:
                reason = "interrupted" if self.req.stop_event is not None and self.req.stop_event.is_set() else (
                    "context" if len(self.req.prompt) + len(ids) >= self.model.n_ctx else "length")
        finally:
            tokens.close()
        text += decoder.decode(b"", final=True) if reason != "stop" else ""
        if len(text) > emitted:
            yield text[emitted:]
        self.result = Generation(text, ids, reason, len(self.req.prompt), self.req.config, self.req.trace,
                                 self.req.prompt)


def _stop_index(text: str, stops: Sequence[str]) -> Optional[int]:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text that could start a stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                longest = max(longest, k)
                break
    return longest


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
