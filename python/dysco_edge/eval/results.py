"""The results file: JSON lines, one per (case, method), appended as each finishes.

A line is written whole and flushed before the next case starts, so an interrupted run loses
nothing already reported; a re-run reads the file and skips every (case, method) in it.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

KEY_FIELDS = ("model", "task", "split", "length", "seed", "method")


def record_key(record: Mapping[str, Any]) -> tuple:
    return tuple(record[name] for name in KEY_FIELDS)


def read_records(path: str | Path) -> list[dict]:
    """Every readable line of a results file ([] when it does not exist); a torn line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_key(record)
            except (json.JSONDecodeError, KeyError, TypeError):
                print(f"dysco-edge: note: {path}:{number} is not a complete result (an interrupted write?); "
                      f"ignored, its case will run again", file=sys.stderr)
                continue
            records.append(record)
    return records


def read_many(paths: Iterable[str | Path]) -> list[dict]:
    """Records of several files; a (case, method) seen twice keeps its last line."""
    latest: dict[tuple, dict] = {}
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"results file not found: {path}")
        for record in read_records(path):
            latest[record_key(record)] = record
    return list(latest.values())


def done_keys(path: str | Path) -> set[tuple]:
    return {record_key(r) for r in read_records(path)}


def open_for_append(path: str | Path) -> TextIO:
    """The results file opened for appending, on a fresh line even if a crash cut the last one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            torn = r.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (the caller closes it)
    if torn:
        f.write("\n")
    return f


def append_record(f: TextIO, record: Mapping[str, Any]) -> None:
    """One whole line, flushed and synced: a crash after this returns cannot lose it."""
    f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
