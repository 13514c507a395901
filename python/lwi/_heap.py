"""glibc's allocator during the engine's long calls, as the `lwi` command sets it for its whole process.

Each sliding window's activations are tens of MiB: above glibc's mmap threshold (at most 32 MiB, dynamic), so every
block is mapped afresh and unmapped on free, and each window page-faults and zeroes its memory again — a quarter of
a CPU segmentation's time in a Python process (docs/performance.md). While a long call runs, freed blocks stay in
the heap for reuse (mmap and trim thresholds of 1 GiB); when the last running call returns, the thresholds go back
to glibc's defaults and the heap is trimmed, so the process keeps nothing. A threshold the user set
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) or `LWI_SYSTEM_MALLOC=1` leaves the allocator alone."""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator, Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
KEEP = 1 << 30
DEFAULT = 128 * 1024  # glibc's initial thresholds

_lock = threading.Lock()
_running = 0


def _libc() -> Optional[ctypes.CDLL]:
    if os.environ.get("LWI_SYSTEM_MALLOC") == "1":
        return None
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_LIBC = _libc()


@contextlib.contextmanager
def kept_for_reuse() -> Iterator[None]:
    """Freed memory stays in the heap while any long call runs (counted across threads)."""
    global _running
    if _LIBC is None:
        yield
        return
    with _lock:
        _running += 1
        if _running == 1:
            _LIBC.mallopt(M_MMAP_THRESHOLD, KEEP)
            _LIBC.mallopt(M_TRIM_THRESHOLD, KEEP)
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                _LIBC.mallopt(M_MMAP_THRESHOLD, DEFAULT)
                _LIBC.mallopt(M_TRIM_THRESHOLD, DEFAULT)
                _LIBC.malloc_trim(0)
