"""Progress on stderr for long work (prefill, head detection, evaluation), drawn by tqdm.

On a terminal the bar is redrawn in place; in a log (a GPU job's output, CI) a line is
written every LOG_EVERY_S seconds and at the end, so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

LOG_EVERY_S = 15.0
_FORMAT = "{desc} {bar} {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}, {rate_fmt}]{postfix}"


class _LogLines:
    """tqdm redraws with a carriage return; a log wants one line per update."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """A bar over `total` units. Call it as a `(done, total)` callback, or `step()` once per
    finished unit; it closes itself when done reaches the total. unit_scale shows counts as
    1.12G (bytes: unit "B")."""

    def __init__(self, label: str, *, total: Optional[int] = None, unit: str = "it",
                 stream: Optional[TextIO] = None, unit_scale: bool = False):
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        # sys.stderr looked up now, not at import: it may have been replaced since (tests, servers)
        self.label, self.unit, self.stream = label, unit, stream or sys.stderr
        self.unit_scale = unit_scale
        self._created = time.time()
        self._bar: Optional[tqdm] = None
        if total is not None:
            self._open(total)

    def _open(self, total: int) -> tqdm:
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = tqdm(total=total, desc=self.label, unit=self.unit, bar_format=_FORMAT,
                         unit_scale=self.unit_scale,
                         file=self.stream if tty else _LogLines(self.stream),
                         mininterval=0.1 if tty else LOG_EVERY_S, ascii=not tty, dynamic_ncols=tty, leave=True)
        # a callback's bar opens at its first report, which may already be the last: time from creation
        self._bar.start_t = min(self._bar.start_t, self._created)
        return self._bar

    def __call__(self, done: int, total: int) -> None:
        bar = self._bar if self._bar is not None and self._bar.total == total else self._open(total)
        bar.update(done - bar.n)
        if done >= total:
            self.close()

    def step(self, what: str = "") -> None:
        bar = self._bar if self._bar is not None else self._open(0)
        if what:
            bar.set_postfix_str(what, refresh=False)
        bar.update(1)
        if bar.total and bar.n >= bar.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
