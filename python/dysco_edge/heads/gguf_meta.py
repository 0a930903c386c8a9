"""A fast reader of a GGUF file's key/value metadata (no tensors, no dependencies).

Why not gguf.GGUFReader: it builds a numpy view per string of every array, so
opening SmolLM2 takes ~5 s and Gemma 3 (262K-token vocabulary) ~20 s. Model
loading only needs a few keys; this walks the header once and decodes only
the keys asked for (others are skipped; string arrays cost one length read
per entry). Values come back typed: int, float, bool, str, or a list of them.
"""
from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import GGUFMetaError, ModelFileError

__all__ = ["GGUFMetaError", "check_gguf_file", "read_gguf_metadata", "gguf_index_end", "read_tensor_index"]

_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format of one value (strings and arrays handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_NESTING = 16  # arrays of arrays: real files nest one level deep; a hostile one recursed without end


def check_gguf_file(path: str | Path) -> Path:
    """The path, once it names a file that starts as a GGUF does (before llama.cpp sees it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    return path


def read_gguf_metadata(path: str | Path, want: Callable[[str], bool] = lambda key: True) -> dict[str, Any]:
    """The metadata entries whose key satisfies `want`, in file order."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFMetaError(f"{path}: not a GGUF file (empty)") from None
    with data:
        try:
            return _Walker(data, path).read(want)
        except struct.error:
            raise GGUFMetaError(f"{path}: truncated GGUF metadata") from None


def read_tensor_index(path: str | Path) -> list[tuple[str, int, tuple[int, ...]]]:
    """(name, ggml type id, dimensions) of every tensor, in file order: what the weights weigh
    without reading them (placement.py sizes the layers from it)."""
    return _past_metadata(path, _Walker.tensor_index, "truncated GGUF tensor index")


def gguf_index_end(path: str | Path) -> int:
    """Byte offset where the tensor index ends (metadata and every tensor's name, shape, type
    and offset lie before it): what identifies a model file without reading its weights."""
    def end(walker: "_Walker") -> int:
        walker.skip_tensor_index()
        return walker.pos
    return _past_metadata(path, end, "truncated GGUF header")


def _past_metadata(path: str | Path, use, truncated: str):
    """use(walker) on a walker that has read the file's metadata (none of it kept)."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise GGUFMetaError(f"{path}: not a GGUF file (empty)") from None
    with data:
        try:
            walker = _Walker(data, path)
            walker.read(lambda key: False)
            return use(walker)
        except struct.error:
            raise GGUFMetaError(f"{path}: {truncated}") from None


class _Walker:
    """Cursor over the mapped header; `order` is '<' or '>' (the file's byte order)."""

    def __init__(self, data: mmap.mmap, path: Path):
        self.data, self.path, self.pos, self.order = data, path, 0, "<"

    def read(self, want: Callable[[str], bool]) -> dict[str, Any]:
        if self.data[:4] != b"GGUF":
            raise GGUFMetaError(f"{self.path}: not a GGUF file (starts with {bytes(self.data[:4])!r})")
        self.pos = 4
        version = self.take("I")
        if version > 0xFFFF:  # a big-endian file reads as a huge version
            self.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version < 2:
            raise GGUFMetaError(f"{self.path}: GGUF version {version} is too old (2 or later needed)")
        self.n_tensors = self.take("Q")
        out = {}
        for _ in range(self.take("Q")):
            key = self.string()
            vtype = self.take("I")
            if want(key):
                out[key] = self.value(vtype)
            else:
                self.skip(vtype)
        return out

    def skip_tensor_index(self) -> None:
        """Past the tensor infos that follow the metadata: name, dims, type, data offset."""
        for _ in range(self.n_tensors):
            name_length = self.take("Q")  # read before pos is, as in skip()
            self.pos += name_length
            n_dims = self.take("I")
            self.pos += 8 * n_dims + 4 + 8
        if self.pos > len(self.data):
            raise struct.error("tensor index past the end")

    def tensor_index(self) -> list[tuple[str, int, tuple[int, ...]]]:
        out = []
        for _ in range(self.n_tensors):
            name = self.string()
            n_dims = self.take("I")
            if n_dims > 4:  # ggml tensors have at most 4 dimensions
                raise GGUFMetaError(f"{self.path}: tensor {name} has {n_dims} dimensions: a damaged file")
            dims = tuple(self.take("Q") for _ in range(n_dims))
            ggml_type = self.take("I")
            self.pos += 8  # data offset
            out.append((name, ggml_type, dims))
        return out

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        raw = self.data[self.pos:self.pos + n]
        if len(raw) != n:
            raise struct.error("string past the end")
        self.pos += n
        return raw.decode("utf-8", "replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self._array_head(depth)
            return [self.value(item_type, depth + 1) for _ in range(count)]
        return self.take(self._format(vtype))

    def _array_head(self, depth: int) -> tuple[int, int]:
        if depth >= _MAX_NESTING:
            raise GGUFMetaError(f"{self.path}: GGUF arrays nested more than {_MAX_NESTING} deep at byte "
                                f"{self.pos}: a damaged file")
        return self.take("I"), self.take("Q")

    def skip(self, vtype: int, depth: int = 0) -> None:
        if vtype == _STRING:
            length = self.take("Q")  # read before pos is: `pos += take()` would lose the advance
            self.pos += length
        elif vtype == _ARRAY:
            item_type, count = self._array_head(depth)
            if item_type in (_STRING, _ARRAY):
                for _ in range(count):
                    self.skip(item_type, depth + 1)
            else:
                self.pos += count * struct.calcsize(self._format(item_type))
        else:
            self.pos += struct.calcsize(self._format(vtype))

    def _format(self, vtype: int) -> str:
        if vtype not in _SCALARS:
            raise GGUFMetaError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")
        return _SCALARS[vtype]
