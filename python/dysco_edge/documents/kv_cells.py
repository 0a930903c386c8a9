"""What saved cells claim, checked before llama.cpp reads a byte of them.

A file can pass its checksum and still be wrong (edited and summed again, or written by a
bug). llama.cpp checks the layer count, the KV types and the row sizes against the model,
but takes each cell's position as written: negative, repeated or reordered positions load
and change the answer, or make a later decode fail. So the layout llama_state_seq_get_data
writes (pinned llama.cpp: context magic and sequence id; then for each KV cache a stream
count, and for each stream a cell count, each cell's position and sequence ids, and each
layer's K rows then V rows) is walked here, every count bounded by what is left of the
payload before it is used, and the cells of a document of n tokens must be:
- in the first cache (the full-attention one), exactly positions 0..n-1 in order;
- in a later cache (a sliding-window one), the last c positions, in order up to one wrap of
  its ring;
- each of one sequence, the one the header names.
A payload of any other layout (a recurrent model's state) is not cached at all.
"""
from __future__ import annotations

import numpy as np

_CTX_MAGIC = 0xAF143CD8
_MAX_SEQ = 256  # LLAMA_MAX_SEQ
_MAX_LAYERS = 1 << 12
_MAX_TYPE = 1 << 10  # ggml type ids are small; llama.cpp checks the exact one against the model
_MAX_ROW = 1 << 32
_EXT_SIZES = (0, 12)  # a cell's extension: none, or llama_kv_cell_ext (M-RoPE x, y; token id)


class CellsError(ValueError):
    """Saved cells that are not what a prefill of the document writes; the message says how."""


class _Reader:
    def __init__(self, data: bytes | bytearray):
        self.data, self.at = memoryview(data), 0

    def left(self) -> int:
        return len(self.data) - self.at

    def skip(self, n: int, what: str) -> int:
        if n < 0 or n > self.left():
            raise CellsError(f"{what} runs past the end of the cells ({n} bytes, {self.left()} left)")
        start, self.at = self.at, self.at + n
        return start

    def int(self, fmt: str, what: str, low: int, high: int) -> int:
        size = np.dtype(fmt).itemsize
        value = int(np.frombuffer(self.data, dtype=fmt, count=1, offset=self.skip(size, what))[0])
        if not low <= value <= high:
            raise CellsError(f"{what} is {value}, outside {low}..{high}")
        return value


def check_cells(data: bytes | bytearray, n_tokens: int) -> None:
    """Raise CellsError unless data are one sequence's cells for n_tokens tokens (see above)."""
    r = _Reader(data)
    if r.left() < 8 or r.int("<u4", "magic", 0, 2**32 - 1) != _CTX_MAGIC:
        raise CellsError("not llama.cpp's saved cells of a sequence")
    seq = r.int("<i4", "sequence id", 0, _MAX_SEQ - 1)
    caches = 0
    while r.left():
        _check_cache(r, n_tokens, seq, first=caches == 0)
        caches += 1
    if not caches:
        raise CellsError("no KV cache in the cells")


def _check_cache(r: _Reader, n_tokens: int, seq: int, first: bool) -> None:
    n_stream = r.int("<u4", "stream count", 1, _MAX_SEQ)
    filled = 0
    for _ in range(n_stream):
        count = r.int("<u4", "cell count", 0, n_tokens)
        if count:
            filled += 1
            _check_positions(_cells(r, count, seq), n_tokens, first)
            _skip_layers(r, count)
    if filled != 1:
        raise CellsError(f"{filled} streams hold cells; one sequence fills exactly one")


def _cells(r: _Reader, count: int, seq: int) -> np.ndarray:
    """The positions of count cells, each of the one sequence seq (with or without extensions)."""
    for ext in _EXT_SIZES:
        fields = [("pos", "<i4"), ("n_seq", "<u4"), ("ext", f"V{ext}"), ("seq", "<i4")]
        dtype = np.dtype([f for f in fields if f[0] != "ext" or ext])
        if count * dtype.itemsize > r.left():
            continue
        cells = np.frombuffer(r.data, dtype=dtype, count=count, offset=r.at)
        if (cells["n_seq"] == 1).all() and (cells["seq"] == seq).all():
            r.skip(count * dtype.itemsize, "cells")
            return cells["pos"]
    raise CellsError(f"cells that are not each of sequence {seq} alone")


def _check_positions(pos: np.ndarray, n_tokens: int, first: bool) -> None:
    count = len(pos)
    if first and count != n_tokens:
        raise CellsError(f"{count} cells for a document of {n_tokens} tokens")
    low = n_tokens - count
    steps = np.diff(pos.astype(np.int64))
    wraps = int((steps == -(count - 1)).sum()) if count > 1 else 0
    in_order = (steps == 1).sum() + wraps == len(steps) and wraps <= (0 if first else 1)
    if not in_order or int(pos.min()) != low or int(pos.max()) != n_tokens - 1:
        raise CellsError(f"cell positions {_show(pos)} are not {low}..{n_tokens - 1} in order")


def _show(pos: np.ndarray) -> str:
    head = ", ".join(str(int(p)) for p in pos[:4])
    return f"[{head}{', ...' if len(pos) > 4 else ''}]"


def _skip_layers(r: _Reader, count: int) -> None:
    """K rows then V rows (per cell, or per embedding column when V is transposed) of each layer."""
    v_trans = r.int("<u4", "V transposition", 0, 1)
    n_layer = r.int("<u4", "layer count", 1, _MAX_LAYERS)
    for _ in range(n_layer):
        r.int("<i4", "K type", 0, _MAX_TYPE)
        r.skip(count * r.int("<u8", "K row size", 1, _MAX_ROW), "K rows")
    for _ in range(n_layer):
        r.int("<i4", "V type", 0, _MAX_TYPE)
        if v_trans:
            size = r.int("<u4", "V element size", 1, 64)
            r.skip(r.int("<u4", "V columns", 1, _MAX_ROW) * count * size, "V columns")
        else:
            r.skip(count * r.int("<u8", "V row size", 1, _MAX_ROW), "V rows")
