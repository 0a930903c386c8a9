"""One generation on a shared context: its request, the token stream (plain or DySCO, the
prefix cache restored on any exit), and the text stream with stop strings."""
from __future__ import annotations

import codecs
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from ..config import DyscoConfig
from ..errors import InputError
from .bookkeeping import StepTrace
from .decode import dysco_tokens, plain_tokens, plan_warmups
from .engine import Engine, ProgressFn, Sampler
from .prefix_cache import PrefixCache
from .prompter import Prompter
from .sampling import SamplingOptions


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
class Request:
    prompt: list[int]
    config: Optional[DyscoConfig]
    sampling: SamplingOptions
    max_new_tokens: int
    stop: tuple[str, ...]
    trace: Optional[list[StepTrace]]
    progress: Optional[ProgressFn]
    stop_event: Optional[threading.Event]
    warmup_auto: int


class ContextLock:
    """One generation at a time on a context. A plain lock, so that a stream dropped by one
    thread and collected in another still frees it; a thread that opens a second generation
    while its first is unfinished gets an error instead of waiting on itself forever."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: Optional[int] = None

    def __enter__(self):
        if self._owner == threading.get_ident():
            raise InputError("this thread's previous generation is still open: read its stream to the end "
                             "or close() it before starting another")
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()


def token_stream(engine: Engine, cache: PrefixCache, lock: ContextLock, req: Request) -> Iterator[int]:
    """Token ids of one generation, holding the context; cache and DySCO state restored on any exit."""
    with lock:
        sampler = Sampler(req.sampling)
        tokens, clean_end = _start(engine, cache, req, sampler)
        try:
            for token in tokens:
                if req.stop_event is not None and req.stop_event.is_set():
                    return
                yield token
        finally:
            tokens.close()
            engine.native.clear_bias(-1)
            engine.native.set_capture(False)
            cache.release(req.prompt, clean_end)
            sampler.close()


def _start(engine: Engine, cache: PrefixCache, req: Request, sampler: Sampler) -> tuple[Iterator[int], int]:
    """The token generator for this request and where its unbiased KV prefix ends."""
    n = len(req.prompt)
    limit = min(req.max_new_tokens, engine.n_ctx - n)
    if req.config is None:
        reuse = cache.claim(req.prompt, n - 1)
        return plain_tokens(engine, req.prompt, reuse=reuse, sampler=sampler, max_new_tokens=limit,
                            is_end=engine.is_end, progress=req.progress), n - 1
    warm = plan_warmups(n, req.config.context_warmup, Prompter.intervention_warmup(req.config, req.warmup_auto))
    reuse = cache.claim(req.prompt, n - warm.fed)
    return dysco_tokens(engine, req.prompt, req.config, warm, reuse=reuse, sampler=sampler,
                        max_new_tokens=limit, is_end=engine.is_end, trace=req.trace,
                        progress=req.progress), warm.first_intervention(n)


class TextStream:
    """Iterates text pieces of a generation; holds back text that may begin a stop string.
    `.result` is the Generation once the stream is exhausted; `close()` ends it early."""

    def __init__(self, engine: Engine, cache: PrefixCache, lock: ContextLock, req: Request):
        self.engine, self.req = engine, req
        self._tokens = token_stream(engine, cache, lock, req)
        self._pieces = self._iterate()
        self.result: Optional[Generation] = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating and free the model (the result stays None)."""
        self._pieces.close()
        self._tokens.close()

    def _iterate(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted, ids, reason = "", 0, [], "length"
        try:
            for token in self._tokens:
                ids.append(token)
                if self.engine.is_end(token):
                    reason = "stop"
                    break
                text += decoder.decode(self.engine.detokenize([token]))
                cut = _stop_index(text, self.req.stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    break
                safe = len(text) - _held_back(text, self.req.stop)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            else:
                reason = self._unforced_end(len(ids))
        finally:
            self._tokens.close()
        text += decoder.decode(b"", final=True) if reason != "stop" else ""
        if len(text) > emitted:
            yield text[emitted:]
        req = self.req
        self.result = Generation(text, ids, reason, len(req.prompt), req.config, req.trace, req.prompt)

    def _unforced_end(self, n_generated: int) -> str:
        if self.req.stop_event is not None and self.req.stop_event.is_set():
            return "interrupted"
        return "context" if len(self.req.prompt) + n_generated >= self.engine.n_ctx else "length"


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
