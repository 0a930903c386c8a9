"""The DySCO decoding loop (DYSCO_SPEC.md "Procedure"), built from small named steps:
prefill, context warmup, probe, select, bias, full pass; and the plain loop beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from ..config import DyscoConfig
from ..errors import InputError
from .bookkeeping import StepTrace, default_bookkeeping
from .engine import Engine, ProgressFn, Sampler
from .selection import template_mask


@dataclass(frozen=True)
class Warmups:
    context: int       # Wc
    intervention: int  # Wi

    @property
    def fed(self) -> int:
        return self.context + self.intervention

    def first_intervention(self, n_prompt: int) -> int:
        """Position of the first intervention step (Wi + 1 prompt tokens, Wi when Wc = 0)."""
        return max(n_prompt - self.fed, n_prompt - self.intervention - 1)


def plan_warmups(n_prompt: int, context: int, intervention: int) -> Warmups:
    """Shrink Wc, then Wi, until at least one prompt token is prefilled (in one step: a warmup
    of 10**12 must not count down one by one)."""
    if n_prompt < 1:
        raise InputError("the prompt is empty")
    context = min(context, max(0, n_prompt - 1 - intervention))
    return Warmups(context, min(intervention, n_prompt - 1 - context))


def prefill(engine: Engine, tokens: Sequence[int], start: int, end: int,
            progress: Optional[ProgressFn] = None, *, last_logits: bool = False) -> None:
    """Positions start..end-1 the usual way, without bias; logits for end-1 only if asked."""
    if end > start:
        engine.decode(tokens[start:end], start, want_logits=last_logits, progress=progress)


def warm_context(engine: Engine, books, tokens: Sequence[int], first: int, stop: int) -> None:
    """Spec step 2: plain full passes whose QR-head scores update the importance."""
    if stop <= first:
        return
    engine.native.set_capture(True)
    try:
        for pos in range(first, stop):
            engine.decode([tokens[pos]], pos, want_logits=False)
            books.observe(engine.native)
    finally:
        engine.native.set_capture(False)


def intervene(engine: Engine, books, token: int, pos: int, want_logits: bool) -> None:
    """Spec step 3: probe, select, bias, full pass (as the bookkeeping strategy does them)."""
    books.before_pass(engine.native, token, pos)
    try:
        engine.decode([token], pos, want_logits=want_logits)
        books.after_pass(engine.native, pos)
    finally:
        engine.native.clear_bias()


Feed = Callable[[int, int, bool], None]  # (token, pos, want_logits)


def sample_loop(engine: Engine, feed: Feed, sampler: Sampler, first_pos: int, max_new_tokens: int,
                is_end: Callable[[int], bool]) -> Iterator[int]:
    """Sample, yield, feed back; stops after an end token, max_new_tokens, or a full context."""
    for i in range(max_new_tokens):
        token = sampler.sample(engine)
        yield token
        pos = first_pos + i
        if is_end(token) or i == max_new_tokens - 1 or pos >= engine.n_ctx:
            return
        feed(token, pos, True)


def plain_tokens(engine: Engine, prompt: Sequence[int], *, reuse: int, sampler: Sampler,
                 max_new_tokens: int, is_end: Callable[[int], bool],
                 progress: Optional[ProgressFn] = None) -> Iterator[int]:
    """Plain decoding: prefill, then the usual one-token steps."""
    n = len(prompt)
    prefill(engine, prompt, reuse, n - 1, progress)
    engine.decode([prompt[-1]], n - 1)

    def feed(token: int, pos: int, want_logits: bool) -> None:
        engine.decode([token], pos, want_logits=want_logits)

    yield from sample_loop(engine, feed, sampler, n, max_new_tokens, is_end)


def dysco_tokens(engine: Engine, prompt: Sequence[int], config: DyscoConfig, warmups: Warmups, *,
                 reuse: int, sampler: Sampler, max_new_tokens: int, is_end: Callable[[int], bool],
                 trace: Optional[list[StepTrace]] = None, progress: Optional[ProgressFn] = None,
                 bookkeeping=None) -> Iterator[int]:
    """DySCO decoding of one prompt, exactly as the spec's procedure.

    `bookkeeping`: the strategy class that keeps the importance and selects (bookkeeping.py);
    None: `default_bookkeeping` for the config and this engine's KV cache."""
    n = len(prompt)
    start_fed = n - warmups.fed
    first_iv = warmups.first_intervention(n)
    # Wc = Wi = 0 (a one-token prompt shrinks them so): no prompt token is fed one at a time, and
    # the first token comes from the prefill's logits, as in plain decoding
    prefill(engine, prompt, reuse, start_fed, progress, last_logits=warmups.fed == 0)
    engine.native.set_heads(config.qr_heads)
    strategy = bookkeeping or default_bookkeeping(config, engine.native.track_supported)
    books = strategy(config, template_mask(prompt, config.template_sequences), start_fed,
                     capacity=engine.n_ctx + 1, trace=trace)
    books.begin(engine.native)
    warm_context(engine, books, prompt, start_fed, first_iv)
    for pos in range(first_iv, n):
        intervene(engine, books, prompt[pos], pos, want_logits=pos == n - 1)

    def feed(token: int, pos: int, want_logits: bool) -> None:
        intervene(engine, books, token, pos, want_logits)

    yield from sample_loop(engine, feed, sampler, n, max_new_tokens, is_end)
