"""Documents' KV cells on disk, so a document opened again is loaded instead of prefilled.

One file per key, named by the key's digest. The key holds everything that decides the
cells: the model file's identity (its size and a hash of its header and tensor index, not of
gigabytes of weights), the token ids, the KV types, flash attention, offloading and devices,
llama-cpp-python's version and ours. A file is a fixed header (magic, format version, key
digest, token count, payload length, payload CRC) and the payload llama.cpp serialized; the
header is checked before llama.cpp sees a byte, so a truncated, corrupt, foreign or old file
is removed with a one-line warning and the document is prefilled again.

Writes go to a temporary file renamed into place, so readers and other writers only ever see
whole files. Use is recorded in the file's mtime; after a save, the least recently used files
go until the folder fits its size limit.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .._version import __version__
from ..errors import InputError
from ..heads.gguf_meta import gguf_index_end
from ..paths import user_cache_dir

MAGIC = b"DYSCOKV\0"
FORMAT_VERSION = 1
# magic, format version, key digest, n_tokens, payload length, payload crc32
_HEADER = struct.Struct("<8sI32sQQI")
SUFFIX = ".kv"
DEFAULT_MAX_BYTES = 8 << 30
MAX_LIMIT = 1 << 50  # 1024T: a size limit past this is a typo, not a disk
# only files named as we name them are ever read, evicted or cleared (and only if their header is ours)
_OUR_NAME = re.compile(r"[0-9a-f]{64}\.kv")
_OUR_TEMP = re.compile(r"\.[0-9a-f]{16}\.[a-z0-9_]{8}\.tmp")
_STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a process that died mid-write


def default_cache_dir() -> Path:
    """$DYSCO_EDGE_KV_CACHE, else $XDG_CACHE_HOME/dysco-edge/kv, else ~/.cache/dysco-edge/kv."""
    return user_cache_dir("DYSCO_EDGE_KV_CACHE", "kv")


def parse_size(text: str) -> int:
    """Bytes from '4G', '512M', '1.5GB', '1000000'."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise InputError(f"not a size: {text!r} (examples: 4G, 512M)") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_LIMIT:
        raise InputError(f"a size must be a number from 0 to {MAX_LIMIT >> 40}T, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class KVCacheConfig:
    """Where documents' cells are kept and how much room they may take (0: save nothing)."""
    directory: Path = field(default_factory=default_cache_dir)
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        object.__setattr__(self, "directory", Path(self.directory).expanduser())
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) \
                or not 0 <= self.max_bytes <= MAX_LIMIT:
            raise InputError(f"the cache size limit must be a whole number of bytes from 0 to {MAX_LIMIT}, "
                             f"got {self.max_bytes!r}")


def model_identity(path: Path) -> dict[str, object]:
    """The model file's size and a hash of everything before its weights."""
    end = gguf_index_end(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while f.tell() < end:
            digest.update(f.read(min(1 << 20, end - f.tell())))
    return {"size": path.stat().st_size, "header_sha256": digest.hexdigest()}


def cache_key(model: dict[str, object], cells: dict[str, object], tokens: Sequence[int]) -> bytes:
    """The 32-byte digest of what decides a document's cells."""
    ids = struct.pack(f"<{len(tokens)}i", *tokens)
    described = json.dumps({"model": model, "cells": cells, "dysco_edge": __version__,
                            "format": FORMAT_VERSION, "n_tokens": len(tokens),
                            "tokens_sha256": hashlib.sha256(ids).hexdigest()}, sort_keys=True)
    return hashlib.sha256(described.encode()).digest()


def warn(message: str) -> None:
    print(f"dysco-edge: warning: {message}", file=sys.stderr)


class NotARegularFile(Exception):
    """A path where the cache would read that holds what it never writes (a FIFO, a directory, a
    link): never read, overwritten or removed."""


def _open_regular(path: Path):
    """The file opened for reading, refusing without blocking anything that is not a regular file
    (open() on a FIFO waits for a writer)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise NotARegularFile("not a regular file")
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between lstat and open
        os.close(fd)
        raise NotARegularFile("not a regular file")
    return os.fdopen(fd, "rb")


def is_ours(path: Path) -> bool:
    """A regular file under one of our names that begins with our magic (or with a part of it:
    one cut short). Eviction and clearing touch nothing else."""
    if not (_OUR_NAME.fullmatch(path.name) or _OUR_TEMP.fullmatch(path.name)):
        return False
    try:
        with _open_regular(path) as f:
            return MAGIC.startswith(f.read(len(MAGIC)))
    except (NotARegularFile, OSError):
        return False


def _read_checked(f, key: bytes, n_tokens: int) -> bytearray:
    """The payload, after every header field is checked against its bounds and the file's size
    (nothing is allocated for a length the file does not hold)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise ValueError("truncated header")
    magic, version, digest, count, length, crc = _HEADER.unpack(head)
    if magic != MAGIC:
        raise ValueError("not a dysco-edge KV file")
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version}, this dysco-edge reads {FORMAT_VERSION}")
    if digest != key or count != n_tokens:
        raise ValueError("saved for another model, document or setting")
    held = os.fstat(f.fileno()).st_size - _HEADER.size
    if length != held:
        raise ValueError(f"the header says {length} bytes of cells, the file holds {held}")
    payload = bytearray(length)
    if f.readinto(payload) != length or f.read(1):
        raise ValueError("truncated or overlong payload")
    if zlib.crc32(payload) != crc:
        raise ValueError("checksum mismatch")
    return payload


class KVCache:
    """A folder of saved cells. load() and save() never raise for the cache's own troubles
    (a bad file, a full disk): they warn in one line and the caller prefills instead."""

    def __init__(self, config: KVCacheConfig = KVCacheConfig()):
        self.config = config
        self.directory = config.directory

    def path(self, key: bytes) -> Path:
        return self.directory / f"{key.hex()}{SUFFIX}"

    def load(self, key: bytes, n_tokens: int) -> Optional[bytearray]:
        """The payload saved under key, or None (missing; bad: removed with a warning, as nothing
        but this cache names a file by a key's digest; not a regular file: left alone, with a warning)."""
        path = self.path(key)
        try:
            with _open_regular(path) as f:
                payload = _read_checked(f, key, n_tokens)
        except FileNotFoundError:
            return None
        except NotARegularFile as e:
            warn(f"not reading {path} ({e}); left as it is, prefilling instead")
            return None
        except (OSError, ValueError, MemoryError) as e:
            self.discard(path, str(e))
            return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        return payload

    def discard(self, path: Path, why: str) -> bool:
        """Remove a file of ours that failed a check; True when it was removed."""
        try:
            path.unlink()
            removed = "removed"
        except FileNotFoundError:
            removed = "gone already"
        except OSError as e:
            removed = f"could not remove it: {e.strerror}"
        warn(f"ignoring cached cells {path.name} ({why}); {removed}, prefilling again")
        return removed == "removed"

    def save(self, key: bytes, n_tokens: int, payload: bytes | bytearray) -> Optional[Path]:
        """Write the payload atomically, then evict down to the limit; None when not saved."""
        size = _HEADER.size + len(payload)
        if size > self.config.max_bytes:
            if self.config.max_bytes:
                warn(f"not caching {size} bytes of cells: over the cache limit of {self.config.max_bytes}")
            return None
        target = self.path(key)
        if os.path.lexists(target) and not stat.S_ISREG(os.lstat(target).st_mode):
            warn(f"not caching cells at {target}: not a regular file; left as it is")
            return None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_atomic(target, _HEADER.pack(MAGIC, FORMAT_VERSION, key, n_tokens, len(payload),
                                                    zlib.crc32(payload)), payload)
        except OSError as e:
            warn(f"could not save cells to {self.directory}: {e}")
            return None
        self.evict(keep=target)
        return target

    def _write_atomic(self, target: Path, header: bytes, payload: bytes | bytearray) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{target.stem[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, target)  # atomic: a reader sees the old file or the new, never half
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of each file of ours, oldest first; files vanishing meanwhile skipped."""
        out = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                st = path.lstat()
            except OSError:
                continue
            if is_ours(path):
                out.append((st.st_mtime, st.st_size, path))
        return sorted(out)

    def evict(self, keep: Optional[Path] = None) -> None:
        """Remove least recently used files of ours until they fit the limit; our stale temp files too."""
        self._remove_stale_temps()
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.config.max_bytes:
                break
            if path == keep:
                continue
            try:
                path.unlink()
            except OSError:
                continue
            total -= size

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for tmp in self.directory.glob(".*.tmp"):
            try:
                if now - tmp.lstat().st_mtime > _STALE_TEMP_S and is_ours(tmp):
                    tmp.unlink()
            except OSError:
                pass

    def clear(self) -> int:
        """Remove every file of ours; returns how many."""
        removed = 0
        for _, _, path in self.entries():
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
        return removed
