"""Several generations in one llama_decode batch (`Model(parallel=N)`): continuous batching, one
sequence (a slot) per generation, each with a KV stream of n_ctx cells of its own.

A thread of our own runs the steps. Each step feeds every decoding slot's last sampled token, then
newcomers' prompts in chunks of n_batch for up to STEP_PREFILL_S, and samples every slot whose
logits came out; a token goes to its generation's queue at once, so a slow reader holds no one
else up. A generation joins at the step after it claims a slot and leaves when it ends (end
token, its limit, its stop event, or its reader closing it). Each slot keeps its own unbiased
prompt prefix for the next request it serves (a newcomer takes the free slot sharing the longest
prefix with its prompt, and may share another free slot's cells).

A generation with dynamic DySCO runs its steps as items of the same batch (`_DyscoFeed`): its
prompt up to the warmups in chunks, then one token per step (context warmup passes that fold their
QR-head scores, intervention steps the bookkeeping strategy arms before the batch's llama_decode and
checks after it), then each sampled token as an intervention step. Its importance, selection and bias
are its own KV stream's (native/dysco-track.cpp), so its answer is the one it gets alone, and plain
generations share the batch untouched. The probes a step asks for (every step of exact mode; fast
mode's step that no scored pass precedes) go in one probe decode before the batch's, each folding into
its own sequence's importance. Static DySCO (a bias set from the host) is not batched: Model refuses it.
Whatever needs the whole context (a prefill to keep, restoring cells, closing) holds it alone
(`solo`): it waits for the running slots to finish and holds newcomers back until it is done.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..errors import DyscoEdgeError, EngineError, InputError
from .bookkeeping import default_bookkeeping
from .decode import plan_warmups
from .engine import Engine, Sampler
from .generation import ContextLock, Request
from .native import SequenceControls
from .prefix_cache import PrefixCache
from .prompter import Prompter
from .selection import template_mask

_END = object()  # a run's queue ends with it (or with an exception)
# prompt chunks a step feeds, for this long at most (at least one): a GPU prefills about what
# llama-server's n_batch of 2048 holds, a CPU one chunk, so the decoding slots wait little either way
STEP_PREFILL_S = 0.1


class _PlainFeed:
    """What a plain generation feeds: prompt chunks, then each sampled token; no DySCO calls."""

    def __init__(self, req: Request):
        self.n = len(req.prompt)

    def claim_end(self) -> int:
        """Prompt tokens whose cached (unbiased) cells it may reuse."""
        return self.n - 1

    def clean_end(self) -> int:
        """Prompt tokens whose cells are kept for the next request: unbiased, and computed by a prefill
        (cells fed one token at a time round differently, and the next answer would depend on them)."""
        return self.n - 1

    def single(self, run: "_Run") -> bool:
        """Whether it feeds one token this step (a step of its own), not a prompt chunk. The last prompt
        token goes alone, as decode.plain_tokens feeds it: its cells and logits are then the same."""
        return run.pos >= self.n - 1

    def tokens(self, run: "_Run", budget: int) -> list[int]:
        if run.pos >= self.n:
            return [run.pending]
        end = run.pos + 1 if run.pos == self.n - 1 else min(self.n - 1, run.pos + budget)
        return run.req.prompt[run.pos:end]

    def before(self, native, run: "_Run", seq_id: int) -> None:
        pass

    def after(self, native, run: "_Run", pos: int) -> None:
        pass

    def end(self, native, seq_id: int) -> None:
        pass


class _DyscoFeed(_PlainFeed):
    """Dynamic DySCO's steps (decode.dysco_tokens) as batch items of one sequence: the prompt in chunks
    up to the warmups, then one token a step; the in-graph bookkeeping strategy of its config
    (default_bookkeeping: FastBookkeeping, or InPassBookkeeping for exact) keeps its importance in its
    stream's row and arms (probing first, where it probes) each intervention pass before the batch."""

    def __init__(self, req: Request, heads: "_Heads", probes: "_Probes"):
        super().__init__(req)
        cfg = req.config
        warm = plan_warmups(self.n, cfg.context_warmup, Prompter.intervention_warmup(cfg, req.warmup_auto))
        self.start, self.first_iv = self.n - warm.fed, warm.first_intervention(self.n)
        self.req, self.heads, self.probes, self.books, self.seq = req, heads, probes, None, None

    def claim_end(self) -> int:
        # at least the last prompt token is decoded again: its logits give the first token
        return min(self.start, self.n - 1)

    def clean_end(self) -> int:
        # the context warmup's cells are unbiased but fed one at a time: a request reusing them would
        # answer otherwise than alone
        return self.claim_end()

    def single(self, run: "_Run") -> bool:
        return run.pos >= self.start

    def tokens(self, run: "_Run", budget: int) -> list[int]:
        if run.pos < self.start:
            return run.req.prompt[run.pos:min(self.start, run.pos + budget)]
        return [run.req.prompt[run.pos]] if run.pos < self.n else [run.pending]

    def before(self, native, run: "_Run", seq_id: int) -> None:
        """Spec steps 2-3 before the pass at run.pos: start the bookkeeping once the prefix is in, keep
        capture on through the context warmup, then arm (or, with nothing scored yet, probe) the pass."""
        if run.pos < self.start:
            return
        if self.books is None:
            self._begin(native, seq_id)
        if run.pos >= self.first_iv:
            if run.pos == self.first_iv:
                self.seq.set_capture(False)  # fast_select turns it on again for its own pass
            self.books.before_pass(self.seq, self.tokens(run, 1)[0], run.pos)

    def _begin(self, native, seq_id: int) -> None:
        cfg = self.req.config
        self.heads.use(native, cfg.qr_heads, seq_id)
        self.seq = _ProbesTogether(native, seq_id, self.probes)
        strategy = default_bookkeeping(cfg, in_graph=True)
        self.books = strategy(cfg, template_mask(self.req.prompt, cfg.template_sequences), self.start,
                              capacity=self.n + self.req.max_new_tokens + 1, trace=self.req.trace)
        self.books.begin(self.seq)
        self.seq.set_capture(self.first_iv > self.start)

    def after(self, native, run: "_Run", pos: int) -> None:
        if self.books is not None and pos >= self.first_iv:
            self.books.after_pass(self.seq, pos)

    def end(self, native, seq_id: int) -> None:
        if self.books is not None:
            native.track_end(seq_id)
            self.heads.release(seq_id)


class _Probes:
    """The probes a step's DySCO sequences ask for, decoded together before the step's batch."""

    def __init__(self):
        self.asked: list[tuple[int, int, int]] = []  # (token, pos, seq_id)

    def take(self) -> list[tuple[int, int, int]]:
        asked, self.asked = self.asked, []
        return asked


class _ProbesTogether(SequenceControls):
    """A sequence's controls whose probe waits for the step's other probes (_Probes)."""

    def __init__(self, native, seq_id: int, probes: _Probes):
        super().__init__(native, seq_id)
        self.probes = probes

    def probe_select(self, token: int, pos: int) -> None:
        self.probes.asked.append((token, pos, self.seq_id))


class _Heads:
    """The QR heads set on the context: one set at a time (dysco_set_heads restarts every tracked
    sequence), changed only while no DySCO generation runs."""

    def __init__(self):
        self.heads, self.users = None, set()

    def use(self, native, heads, seq_id: int) -> None:
        heads = tuple(tuple(int(v) for v in h) for h in heads)
        if self.users and heads != self.heads:
            raise InputError("a parallel model runs DySCO with one set of QR heads at a time: this request's "
                             "qr_heads differ from those of the DySCO generations running; send it once they end, "
                             "or use the model's head map")
        if not self.users:  # set again: a solo holder may have set others meanwhile
            native.set_heads(heads)
            self.heads = heads
        self.users.add(seq_id)

    def release(self, seq_id: int) -> None:
        self.users.discard(seq_id)


@dataclass
class _Run:
    """One generation in a slot: where its prompt and answer stand."""
    req: Request
    sampler: Sampler
    reuse: int                     # prompt tokens whose cells the slot held already
    limit: int                     # tokens it may generate
    pos: int                       # the next position to write
    feed: _PlainFeed               # what it feeds each step (plain, or DySCO's steps)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    pending: Optional[int] = None  # the last sampled token, fed at the next step
    on_device: bool = False        # llama.cpp samples it (greedy) in the graph: no logits row comes back
    n_generated: int = 0
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.req.prompt)

    @property
    def in_chunks(self) -> bool:
        """Whether it feeds prompt chunks now (else one token a step)."""
        return not self.feed.single(self)

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
        self._between = 0  # threads waiting for the context between two steps (a claim, a release)
        self._solo = ContextLock()
        self._solo_waiting = 0
        self._closed = False
        self._heads, self._probes = _Heads(), _Probes()
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
            with self._between_steps():
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
        feed = _DyscoFeed(req, self._heads, self._probes) if req.config is not None else _PlainFeed(req)
        end = feed.claim_end()
        reuse = slot.cache.claim(req.prompt, end)
        donor = max((s for s in self.slots if not s.busy), default=None,
                    key=lambda s: s.cache.reusable(req.prompt, end))
        if donor is not None and donor.cache.reusable(req.prompt, end) > reuse:
            reuse = donor.cache.reusable(req.prompt, end)
            self.engine.copy_seq(donor.seq_id, slot.seq_id, reuse)
        req.n_cached = reuse
        limit = min(req.max_new_tokens, self.engine.n_ctx - n)
        # a greedy answer needs the argmax only: llama.cpp's graph picks it, and no logits row comes back (a
        # DySCO probe has no logits, so its graph gets no sampler nodes)
        on_device = req.sampling.greedy and self.engine.sample_on_device(slot.seq_id, True)
        return _Run(req, Sampler(req.sampling), reuse, limit, reuse, feed, on_device=on_device)

    def _close(self, slot: Slot, run: _Run) -> None:
        with self._between_steps():
            run.done = True
            run.sampler.close()
            if not self.engine.closed:
                if run.on_device:
                    self.engine.sample_on_device(slot.seq_id, False)
                run.feed.end(self.engine.native, slot.seq_id)
                slot.cache.release(run.req.prompt, run.feed.clean_end())
        self._free(slot)

    @contextmanager
    def _between_steps(self):
        """The context for a claim or a release, before the next step: the step thread takes the lock again
        right after each step, so a thread that merely blocked on it could wait many steps."""
        with self._cond:
            self._between += 1
        try:
            with self._step:
                yield
        finally:
            with self._cond:
                self._between -= 1
                self._cond.notify_all()

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
                while (not self._closed and not self._active()) or self._between:
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
        """One step: the one-token items (decoding, DySCO's steps) in one llama_decode, then prompt chunks
        for up to STEP_PREFILL_S, each in a llama_decode of its own, n_batch tokens from where the
        sequence's prompt starts, as it is cut alone: a chunk sharing the batch with other sequences'
        tokens is split by llama.cpp's ubatches (a token of each sequence first), and its cells would
        round otherwise than alone."""
        slots = [s for s in slots if not self._stopped(s.run)]
        self._probes.take()  # none left over from a step that failed
        # llama.cpp's ubatches over KV streams hold consecutive ascending sequence ids only: in that
        # order every single token shares one ubatch
        single = sorted((s for s in slots if not s.run.in_chunks), key=lambda s: s.seq_id)
        self._feed([(slot, slot.run.feed.tokens(slot.run, 1)) for slot in single])
        began = time.perf_counter()
        while (chunked := next((s for s in slots if s.run.in_chunks and not s.run.done), None)) is not None:
            self._feed([(chunked, chunked.run.feed.tokens(chunked.run, self.engine.n_batch))])
            if time.perf_counter() - began >= STEP_PREFILL_S:
                return

    def _feed(self, items: list) -> None:
        """One llama_decode of the items, DySCO's calls before and after it; sample where logits came out."""
        items = [it for it in items if it[1] and self._hook(it[0], it[0].run.feed.before, it[0].seq_id)]
        items = self._decode(self._probe(items))
        index = -1
        for slot, tokens in items:
            index += len(tokens)
            if self._hook(slot, slot.run.feed.after, slot.run.pos + len(tokens) - 1):
                self._after(slot.run, len(tokens), index)

    def _probe(self, items: list) -> list:
        """The probes the items' DySCO sequences asked for, in one decode; if it fails, those runs end."""
        asked = self._probes.take()
        if not asked:
            return items
        try:
            self.engine.native.probe_select_batch(asked)
        except DyscoEdgeError as exc:
            failed = {seq for _, _, seq in asked}
            for slot in (it[0] for it in items if it[0].seq_id in failed):
                slot.run.finish(exc)
            return [it for it in items if it[0].seq_id not in failed]
        return items

    def _hook(self, slot: Slot, call, arg: int) -> bool:
        """A feed's DySCO call for the slot's run; a failure (a selection that did not happen, heads
        in use) ends that run alone, its reader hearing why."""
        try:
            call(self.engine.native, slot.run, arg)
        except DyscoEdgeError as exc:
            slot.run.finish(exc)
            return False
        return True

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
        token = self.engine.sampled_token(index) if run.on_device else run.sampler.sample(self.engine, index)
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
