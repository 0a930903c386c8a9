"""Several generations in one llama_decode batch (`Model(parallel=N)`): continuous batching, one
sequence (a slot) per generation, each with a KV stream of n_ctx cells of its own.

A thread of our own runs the steps. Each step feeds every decoding slot's last sampled token and,
in the room left up to n_batch, the next chunk of newcomers' prompts, then samples every slot whose
logits came out; a token goes to its generation's queue at once, so a slow reader holds no one
else up. A generation joins at the step after it claims a slot and leaves when it ends (end
token, its limit, its stop event, or its reader closing it). Each slot keeps its own unbiased
prompt prefix for the next request it serves (a newcomer takes the free slot sharing the longest
prefix with its prompt, and may share another free slot's cells).

Plain decoding only (DySCO's state is one sequence's: Model refuses DySCO when parallel > 1).
Whatever needs the whole context (a prefill to keep, restoring cells, closing) holds it alone
(`solo`): it waits for the running slots to finish and holds newcomers back until it is done.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..errors import EngineError, InputError
from .engine import Engine, Sampler
from .generation import ContextLock, Request
from .prefix_cache import PrefixCache

_END = object()  # a run's queue ends with it (or with an exception)


@dataclass
class _Run:
    """One generation in a slot: where its prompt and answer stand."""
    req: Request
    sampler: Sampler
    reuse: int                     # prompt tokens whose cells the slot held already
    limit: int                     # tokens it may generate
    pos: int                       # the next position to write
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    pending: Optional[int] = None  # the last sampled token, fed at the next step
    n_generated: int = 0
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.req.prompt)

    def finish(self, last=_END) -> None:
        self.done = True
        self.out.put(last)


@dataclass
class Slot:
    seq_id: int
    cache: PrefixCache
    run: Optional[_Run] = None
    owner: Optional[int] = None    # the thread whose generation holds it
    busy: bool = False
    released: float = 0.0          # when its last generation ended (newcomers reuse the least recent first)


class Batcher:
    """Slots 0..n-1 on one engine whose context has n sequences; slot 0's cache is the model's own
    (documents and prefill keep their prefix there)."""

    def __init__(self, engine: Engine, cache0: PrefixCache, n_slots: int):
        self.engine = engine
        self.slots = [Slot(0, cache0)] + [Slot(i, PrefixCache(engine, i)) for i in range(1, n_slots)]
        self._cond = threading.Condition()
        self._step = threading.Lock()  # the context: a step, a claim, a release, a solo holder
        self._solo = ContextLock()
        self._solo_waiting = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dysco-edge-batch", daemon=True)
        self._thread.start()

    # ---- what the slots run now (the server's /slots) ----

    def describe(self) -> list[dict]:
        with self._cond:
            return [_slot_view(s, self._solo.owner is not None) for s in self.slots]

    # ---- a generation's tokens ----

    def tokens(self, req: Request) -> Iterator[int]:
        """Token ids of a plain generation decoded in the shared batch (a slot is claimed on the first
        `next`, and freed, its prompt prefix kept, on any exit)."""
        slot, run = self._open(req)
        try:
            while (item := run.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                if run.req.stop_event is not None and run.req.stop_event.is_set():
                    return
                yield item
        finally:
            self._close(slot, run)

    def _open(self, req: Request) -> tuple[Slot, _Run]:
        me = threading.get_ident()
        with self._cond:
            while True:
                self._check_open(me)
                free = [s for s in self.slots if not s.busy]
                if free and not self._solo_waiting:
                    break
                self._cond.wait()
            # the longest shared prefix; else an empty slot; else the least recently used
            slot = max(free, key=lambda s: (s.cache.reusable(req.prompt, len(req.prompt) - 1), not s.cache.tokens,
                                            -s.released))
            slot.busy, slot.owner = True, me
        try:
            with self._step:
                run = self._claim(slot, req)
        except BaseException:
            self._free(slot)
            raise
        with self._cond:
            slot.run = run
            self._cond.notify_all()
        return slot, run

    def _check_open(self, me: int) -> None:
        if self._closed:
            raise EngineError("the model is closed: load it again to generate")
        if self._solo.owner == me or all(s.busy and s.owner == me for s in self.slots):
            raise InputError("this thread's open generations hold every slot (or the whole model): read a stream "
                             "to the end or close() it before starting another")

    def _claim(self, slot: Slot, req: Request) -> _Run:
        n = len(req.prompt)
        reuse = slot.cache.claim(req.prompt, n - 1)
        donor = max((s for s in self.slots if not s.busy), default=None,
                    key=lambda s: s.cache.reusable(req.prompt, n - 1))
        if donor is not None and donor.cache.reusable(req.prompt, n - 1) > reuse:
            reuse = donor.cache.reusable(req.prompt, n - 1)
            self.engine.copy_seq(donor.seq_id, slot.seq_id, reuse)
        req.n_cached = reuse
        limit = min(req.max_new_tokens, self.engine.n_ctx - n)
        return _Run(req, Sampler(req.sampling), reuse, limit, reuse)

    def _close(self, slot: Slot, run: _Run) -> None:
        with self._step:
            run.done = True
            run.sampler.close()
            if not self.engine.closed:
                slot.cache.release(run.req.prompt, len(run.req.prompt) - 1)
        self._free(slot)

    def _free(self, slot: Slot) -> None:
        with self._cond:
            slot.run, slot.busy, slot.owner, slot.released = None, False, None, time.monotonic()
            self._cond.notify_all()

    # ---- the whole context for one holder ----

    def solo(self) -> "_Solo":
        """A lock on the whole context (as ContextLock): entered once no slot runs, holding newcomers back."""
        return _Solo(self)

    def close(self) -> None:
        """No more generations; the step thread ends once it may take the context (join() waits)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def join(self) -> None:
        self._thread.join()

    # ---- the steps ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._active():
                    self._cond.wait()
                if self._closed and not self._active():
                    return
            with self._step:  # a solo holder may have taken it meanwhile: what runs is looked at again
                running = [s for s in self.slots if s.run is not None and not s.run.done]
                if not running:
                    continue
                try:
                    self._advance(running)
                except Exception as exc:  # noqa: BLE001 -- llama.cpp failed the step: its readers hear of it
                    for slot in running:
                        if not slot.run.done:
                            slot.run.finish(exc)

    def _active(self) -> bool:
        return any(s.run is not None and not s.run.done for s in self.slots)

    def _advance(self, slots: list[Slot]) -> None:
        """One step: the decoding slots' tokens, then prompt chunks in the room left; sample."""
        slots = [s for s in slots if not self._stopped(s.run)]
        decoding = [s for s in slots if not s.run.prefilling]
        items, budget = [], self.engine.n_batch - len(decoding)
        for slot in decoding:
            items.append((slot, [slot.run.pending]))
        for slot in (s for s in slots if s.run.prefilling):
            take = min(budget, len(slot.run.req.prompt) - slot.run.pos)
            if take > 0:
                items.append((slot, slot.run.req.prompt[slot.run.pos:slot.run.pos + take]))
                budget -= take
        # llama.cpp's ubatches over KV streams hold consecutive ascending sequence ids only: in that
        # order every slot's first token shares one ubatch
        items.sort(key=lambda item: item[0].seq_id)
        items = self._decode(items)
        index = -1
        for slot, tokens in items:
            index += len(tokens)
            self._after(slot.run, len(tokens), index)

    def _stopped(self, run: _Run) -> bool:
        if run.req.stop_event is not None and run.req.stop_event.is_set():
            run.finish()
        return run.done

    def _decode(self, items: list) -> list:
        """Decode the items; when the KV cache has no room, fail a newcomer's prompt first,
        else the longest generation, and try again without it. Returns the items decoded."""
        while items:
            batch = [(tokens, slot.run.pos, slot.seq_id, slot.run.pos + len(tokens) >= len(slot.run.req.prompt))
                     for slot, tokens in items]
            if self.engine.decode_batch(batch) == 0:
                return items
            victim = next((it for it in items if it[0].run.prefilling),
                          max(items, key=lambda it: it[0].run.pos))
            victim[0].run.finish(EngineError(
                f"llama.cpp found no room in the KV cache for the {len(self.slots)} parallel slots' step"))
            items = [it for it in items if it is not victim]
        return items

    def _after(self, run: _Run, n_fed: int, index: int) -> None:
        """Advance the run past the tokens just fed; sample where its logits came out."""
        was_prefill, run.pos = run.prefilling, run.pos + n_fed
        req = run.req
        total = len(req.prompt) - 1 - run.reuse
        if was_prefill and req.progress is not None and total > 0:
            try:
                req.progress(min(run.pos - run.reuse, total), total)
            except Exception as exc:  # noqa: BLE001 -- e.g. the server's "client went away": the reader raises it
                run.finish(exc)
                return
        if run.prefilling:
            return
        token = run.sampler.sample(self.engine, index)
        run.n_generated += 1
        run.out.put(token)
        if self.engine.is_end(token) or run.n_generated >= run.limit:
            run.finish()
        else:
            run.pending = token


class _Solo:
    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def __enter__(self):
        b = self.batcher
        if any(s.owner == threading.get_ident() for s in b.slots):
            raise InputError("this thread's open generation holds a slot: read its stream to the end or close() it "
                             "first")
        b._solo.__enter__()
        with b._cond:
            b._solo_waiting += 1
            while any(s.busy for s in b.slots):
                b._cond.wait()
        b._step.acquire()
        return self

    def __exit__(self, *exc):
        b = self.batcher
        b._step.release()
        with b._cond:
            b._solo_waiting -= 1
            b._cond.notify_all()
        b._solo.__exit__()


def _slot_view(slot: Slot, solo: bool) -> dict:
    run = slot.run
    state = "idle" if run is None else ("prefill" if run.prefilling else "decode")
    view = {"id": slot.seq_id, "state": "solo" if solo and slot.seq_id == 0 else state,
            "cached_tokens": len(slot.cache.tokens)}
    if run is not None:
        view.update(n_prompt=len(run.req.prompt), n_cached=run.reuse, n_generated=run.n_generated)
    return view
