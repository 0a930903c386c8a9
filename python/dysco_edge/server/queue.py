"""Generations on the model, `parallel` at a time (one unless the model batches several): a
bounded queue of jobs and the worker threads that run them in order, handing each one's events to
the event loop that waits for them.

A job's text stream is made (tokenized, checked against the context) before it is queued,
so bad requests fail before they wait. Cancelling a job (its client went away) stops it
between two tokens, or between two prefill batches, and the worker moves on at once.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
from typing import AsyncIterator

from ..errors import DyscoEdgeError

log = logging.getLogger("dysco_edge.server")
PROGRESS_LOG_S = 10.0  # a long prefill logs its progress this often


class GenerationCancelled(DyscoEdgeError):
    """The client of a job went away during its prefill."""


class QueueFull(DyscoEdgeError):
    """Every place in the queue is taken; `retry_after` estimates when one frees, in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Channel:
    """Events from the worker thread to one request's event loop, and its cancel flag
    (also the generation's stop_event). Holds nothing of the generation itself."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._events = loop, asyncio.Queue()
        self.cancel = threading.Event()
        self.started = 0.0  # perf_counter when the worker took the job
        self.name = "request"  # "request N" once queued, in the log
        self._logged = 0.0

    def put(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel.set()

    def progress(self, done: int, total: int) -> None:
        """Model.generate's prefill callback: report, or stop if the client went away."""
        if self.cancel.is_set():
            raise GenerationCancelled("the client disconnected during the prefill")
        now = time.perf_counter()
        if done < total and now - max(self._logged, self.started) >= PROGRESS_LOG_S:
            self._logged = now
            log.info("%s: prefill %d/%d tokens, %.0f s", self.name, done, total, now - self.started)
        self.put("progress", (done, (now - self.started) * 1000))

    async def events(self) -> AsyncIterator[tuple]:
        """(kind, value) until the job ends: progress, text..., then done, error or cancelled."""
        while True:
            kind, value = await self._events.get()
            yield kind, value
            if kind in ("done", "error", "cancelled"):
                return


class Job:
    def __init__(self, channel: Channel, stream):
        self.channel, self.stream = channel, stream

    def describe(self) -> str:
        own = getattr(self.stream, "describe", None)  # a job that is not a generation says what it is
        if own is not None:
            return own()
        req = self.stream.req
        dysco = f"DySCO {req.config.mode}" if req.config is not None else "DySCO off"
        return f"{len(req.prompt)} prompt tokens, at most {req.max_new_tokens} new, {dysco}"


class Worker:
    """Runs queued jobs in order on `n_threads` threads of its own (the model's parallel slots)."""

    def __init__(self, max_waiting: int, n_threads: int = 1):
        self._jobs: queue.Queue = queue.Queue()
        # jobs queued or running: a job beyond the threads and max_waiting is refused (a job a thread is
        # about to take does not count as waiting, so N requests at once never find the queue full)
        self._admitted, self._capacity, self._count = 0, n_threads + max_waiting, threading.Lock()
        self._mean_s = 1.0  # running mean of a job's duration, for Retry-After
        self._ids = itertools.count(1)
        self._threads = [threading.Thread(target=self._loop, name=f"dysco-edge-worker-{i}", daemon=True)
                         for i in range(n_threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the queued jobs finish, then end the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        job.channel.name = f"request {next(self._ids)}"
        with self._count:
            waiting = max(0, self._admitted - len(self._threads))
            full = self._admitted >= self._capacity
            self._admitted += not full
        if full:
            log.warning("%s refused (503): %d requests are waiting", job.channel.name, waiting)
            raise QueueFull(f"the server is busy: {waiting} requests are waiting; retry later",
                            max(1, math.ceil(self._mean_s * (waiting + 1) / len(self._threads))))
        self._jobs.put(job)
        log.info("%s: %s; %d ahead in the queue", job.channel.name, job.describe(), waiting)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            began = time.perf_counter()
            try:
                self._serve(job)
            finally:
                with self._count:
                    self._admitted -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - began)

    def _serve(self, job: Job) -> None:
        channel, stream = job.channel, job.stream
        if channel.cancel.is_set():  # its client left while it waited
            stream.close()
            channel.put("cancelled")
            log.info("%s: cancelled while waiting (the client went away)", channel.name)
            return
        channel.started, first = time.perf_counter(), None
        try:
            for piece in stream:
                first = first or time.perf_counter()
                channel.put("text", piece)
            channel.put("done", stream.result)
            _log_done(channel, stream.result, first)
        except GenerationCancelled:
            channel.put("cancelled")
            log.info("%s: cancelled during the prefill (the client went away)", channel.name)
        except Exception as exc:  # noqa: BLE001 -- whatever fails, its client must hear of it
            if not isinstance(exc, DyscoEdgeError):
                log.exception("%s: generation failed", channel.name)
            else:
                log.warning("%s failed: %s", channel.name, exc)
            channel.put("error", exc)
        finally:
            stream.close()


def _log_done(channel: Channel, generation, first_text) -> None:
    """One line per finished request: the prefill (up to the first text) and the decode, timed."""
    end = time.perf_counter()
    if not hasattr(generation, "token_ids"):  # e.g. a document opened: its result says how
        log.info("%s: done in %.1f s: %s", channel.name, end - channel.started, generation)
        return
    first_text = first_text or end
    prefill_s, decode_s = first_text - channel.started, end - first_text
    n_new, n_prefilled = len(generation.token_ids), generation.n_prompt - generation.n_cached
    log.info("%s: done in %.1f s: prefill %d tokens (%d cached) in %.1f s (%.0f tok/s); %d tokens generated, "
             "%.1f tok/s after the first; finish %s", channel.name, end - channel.started, n_prefilled,
             generation.n_cached, prefill_s, n_prefilled / max(prefill_s, 1e-9), n_new,
             max(n_new - 1, 0) / max(decode_s, 1e-9), generation.finish_reason)
