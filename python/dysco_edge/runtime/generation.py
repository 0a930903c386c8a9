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
    finish_reason: str            # "stop" (end token or stop string), "length", "context", "interrupted",
                                  # "repeat" (the answer began repeating itself: Request.stop_on_repeat)
    n_prompt: int
    dysco: Optional[DyscoConfig]
    trace: Optional[list[StepTrace]] = None
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    n_cached: int = 0             # prompt tokens whose KV cells came from the prefix cache


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
    n_cached: Optional[int] = None  # set once the generation holds the context (progress reports it)
    stop_on_repeat: int = 0  # > 0: end when the answer's last that many tokens repeat an earlier stretch of it


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

    @property
    def owner(self) -> Optional[int]:
        """The thread that holds it, or None."""
        return self._owner

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
            if not engine.closed:  # a stream collected at interpreter exit may outlive its model
                engine.native.clear_bias(-1)
                engine.native.set_capture(False)
                cache.release(req.prompt, clean_end)
            sampler.close()


def _start(engine: Engine, cache: PrefixCache, req: Request, sampler: Sampler) -> tuple[Iterator[int], int]:
    """The token generator for this request and where its unbiased KV prefix ends."""
    n = len(req.prompt)
    limit = min(req.max_new_tokens, engine.n_ctx - n)
    if req.config is None:
        reuse = req.n_cached = cache.claim(req.prompt, n - 1)
        return plain_tokens(engine, req.prompt, reuse=reuse, sampler=sampler, max_new_tokens=limit,
                            is_end=engine.is_end, progress=req.progress), n - 1
    warm = plan_warmups(n, req.config.context_warmup, Prompter.intervention_warmup(req.config, req.warmup_auto))
    # at least the last prompt token is decoded again: its logits give the first token; only the
    # prefilled cells are kept after (the context warmup's, fed one at a time, round otherwise than a
    # prefill: a later request reusing them would answer otherwise than alone)
    prefilled = min(n - warm.fed, n - 1)
    reuse = req.n_cached = cache.claim(req.prompt, prefilled)
    return dysco_tokens(engine, req.prompt, req.config, warm, reuse=reuse, sampler=sampler,
                        max_new_tokens=limit, is_end=engine.is_end, trace=req.trace,
                        progress=req.progress), prefilled


class TextStream:
    """Iterates text pieces of a generation; holds back text that may begin a stop string.
    `.result` is the Generation once the stream is exhausted; `close()` ends it early.

    Nothing the stream owns points back at it, so dropping the last reference to a
    half-read stream closes it at once (freeing the model) without waiting for the
    cycle collector."""

    def __init__(self, engine: Engine, cache: PrefixCache, lock: ContextLock, req: Request,
                 tokens: Optional[Iterator[int]] = None):
        """`tokens`: the token ids from elsewhere (a slot of a shared batch) instead of this context alone."""
        self.engine, self.req = engine, req
        self._tokens = tokens if tokens is not None else token_stream(engine, cache, lock, req)
        self._outcome: list[Generation] = []
        self._pieces = _text_pieces(engine, req, self._tokens, self._outcome)

    @property
    def result(self) -> Optional[Generation]:
        return self._outcome[0] if self._outcome else None

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating and free the model (the result stays None)."""
        self._pieces.close()
        self._tokens.close()


def _text_pieces(engine: Engine, req: Request, tokens: Iterator[int], outcome: list) -> Iterator[str]:
    """Text pieces of the token stream; appends the Generation to `outcome` at the end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted, ids, reason = "", 0, [], "length"
    repeats = RepeatWatch(req.stop_on_repeat)
    try:
        for token in tokens:
            ids.append(token)
            if engine.is_end(token):
                reason = "stop"
                break
            text += decoder.decode(engine.piece(token))
            cut = _stop_index(text, req.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
                break
            held = repeats.push(token, len(text))
            if repeats.looped:
                text, reason = text[:held], "repeat"
                break
            safe = min(len(text) - _held_back(text, req.stop), held)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        else:
            reason = _unforced_end(engine, req, len(ids))
    finally:
        tokens.close()
    text += decoder.decode(b"", final=True) if reason not in ("stop", "repeat") else ""
    if len(text) > emitted:
        yield text[emitted:]
    outcome.append(Generation(text, ids, reason, len(req.prompt), req.config, req.trace, req.prompt,
                              n_cached=req.n_cached or 0))


class RepeatWatch:
    """Whether an answer has begun repeating itself: its longest suffix that also occurs earlier
    in it reached `length` tokens. Until then the text of that suffix is held back (as text that may
    begin a stop string is), so that a loop is cut where its repetition starts: greedy decoding
    that repeats `length` tokens verbatim goes on repeating them until max_new_tokens."""

    def __init__(self, length: int):
        self.length = length
        self._ids: list[int] = []
        self._text_ends: list[int] = [0]  # the text's length before token i
        self._ends: list[int] = []  # where the suffix's earlier occurrences end
        self._matched = 0  # the suffix's length
        self.looped = False

    def push(self, token: int, text_length: int) -> int:
        """Record the next token (the text is text_length long with it); returns how much of the
        text may be shown: all of it but the repeating suffix."""
        if self.length < 1:
            return text_length
        ids = self._ids
        ends = [e + 1 for e in self._ends if ids[e + 1] == token]
        ids.append(token)
        self._text_ends.append(text_length)
        if ends:  # the longest suffix grew by this token
            self._matched += 1
        else:  # a shorter one: among the token's earlier occurrences, those with the longest common suffix
            lengths = {e: self._common_suffix(e) for e in range(len(ids) - 1) if ids[e] == token}
            self._matched = max(lengths.values(), default=0)
            ends = [e for e, k in lengths.items() if k == self._matched]
        self._ends = ends
        self.looped = self._matched >= self.length
        return self._text_ends[len(ids) - self._matched]

    def _common_suffix(self, e: int) -> int:
        """How many tokens ending at e equal the tokens ending at the last one (at most length)."""
        ids, last, k = self._ids, len(self._ids) - 1, 0
        while k < self.length and k <= e and ids[e - k] == ids[last - k]:
            k += 1
        return k


def _unforced_end(engine: Engine, req: Request, n_generated: int) -> str:
    if req.stop_event is not None and req.stop_event.is_set():
        return "interrupted"
    return "context" if len(req.prompt) + n_generated >= engine.n_ctx else "length"


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
