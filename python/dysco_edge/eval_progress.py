"""A progress line with rate and ETA on stderr: redrawn in place on a terminal, a plain line
every few seconds in a log (a GPU job's output)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_EVERY_S = 15.0
BAR = 24


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    def __init__(self, total: int, *, stream: TextIO = sys.stderr, label: str = "eval"):
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total, self.stream, self.label = total, stream, label
        self.done, self.start, self.last_log = 0, time.perf_counter(), 0.0
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def line(self, what: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        each = elapsed / self.done if self.done else 0.0
        eta = format_duration(each * (self.total - self.done)) if self.done else "?"
        filled = int(BAR * self.done / self.total) if self.total else BAR
        return (f"{self.label} [{'#' * filled:<{BAR}}] {self.done}/{self.total} {each:.1f}s each, "
                f"elapsed {format_duration(elapsed)}, ETA {eta}" + (f" | {what}" if what else ""))

    def step(self, what: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if self.tty:
            end = "\n" if self.done >= self.total else ""
            print("\r" + self.line(what)[:160].ljust(160), end=end, file=self.stream, flush=True)
        elif now - self.last_log >= LOG_EVERY_S or self.done >= self.total:
            self.last_log = now
            print(self.line(what), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and self.done < self.total:
            print(file=self.stream, flush=True)
