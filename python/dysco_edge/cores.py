"""How many CPU threads llama.cpp gets by default: one per physical core this process may run
on, as llama.cpp's own tools choose (a second hyperthread of a core adds little to a matrix
multiply and slows decoding down when it competes with the first)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

SYSFS_CPUS = Path("/sys/devices/system/cpu")


def physical_cores(sysfs: Path = SYSFS_CPUS, allowed: Optional[Iterable[int]] = None) -> int:
    """Physical cores among the CPUs this process may use (Linux: cores whose thread-sibling sets
    differ; macOS: performance cores); elsewhere llama.cpp's fallback: all logical CPUs up to 4,
    half of them above."""
    found = _linux_cores(sysfs, _allowed_cpus() if allowed is None else allowed)
    if found is None and sys.platform == "darwin":
        found = _macos_performance_cores()
    if found:
        return found
    logical = len(_allowed_cpus()) or os.cpu_count() or 1
    return logical if logical <= 4 else logical // 2


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))  # a container or `taskset` may allow fewer than the machine has
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _linux_cores(sysfs: Path, allowed: Iterable[int]) -> Optional[int]:
    """Distinct thread-sibling sets of the allowed CPUs (one per core); None without sysfs."""
    siblings = set()
    for cpu in allowed:
        try:
            siblings.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return None
    return len(siblings) or None


def _macos_performance_cores() -> Optional[int]:
    """hw.perflevel0.physicalcpu: the performance cores of Apple Silicon (all cores on Intel Macs)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    for name in (b"hw.perflevel0.physicalcpu", b"hw.physicalcpu"):
        value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
        if libc.sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, 0) == 0 and value.value > 0:
            return value.value
    return None
