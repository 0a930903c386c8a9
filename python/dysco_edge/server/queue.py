"""One generation at a time on the model: a bounded queue of jobs and the worker thread
that runs them in order, handing each one's events to the event loop that waits for them.

A job's text stream is made (tokenized, checked against the context) before it is queued,
so bad requests fail before they wait. Cancelling a job (its client went away) stops it
between two tokens, or between two prefill batches, and the worker moves on at once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from typing import AsyncIterator

from ..errors import DyscoEdgeError

log = logging.getLogger("dysco_edge.server")


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

    def put(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel.set()

    def progress(self, done: int, total: int) -> None:
        """Model.generate's prefill callback: report, or stop if the client went away."""
        if self.cancel.is_set():
            raise GenerationCancelled("the client disconnected during the prefill")
        self.put("progress", (done, (time.perf_counter() - self.started) * 1000))

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


class Worker:
    """Runs queued jobs one after another on a thread of its own."""

    def __init__(self, max_waiting: int):
        self._jobs: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._mean_s = 1.0  # running mean of a job's duration, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="dysco-edge-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the queued jobs finish, then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            waiting = self._jobs.qsize()
            raise QueueFull(f"the server is busy: {waiting} requests are waiting; retry later",
                            max(1, math.ceil(self._mean_s * (waiting + 1)))) from None

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            began = time.perf_counter()
            self._serve(job)
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - began)

    def _serve(self, job: Job) -> None:
        channel, stream = job.channel, job.stream
        if channel.cancel.is_set():  # its client left while it waited
            stream.close()
            channel.put("cancelled")
            return
        channel.started = time.perf_counter()
        try:
            for piece in stream:
                channel.put("text", piece)
            channel.put("done", stream.result)
        except GenerationCancelled:
            channel.put("cancelled")
        except Exception as exc:  # noqa: BLE001 -- whatever fails, its client must hear of it
            if not isinstance(exc, DyscoEdgeError):
                log.exception("generation failed")
            channel.put("error", exc)
        finally:
            stream.close()
