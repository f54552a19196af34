"""Giving freed memory back to the operating system while a pool is streamed.

glibc keeps freed heap memory for reuse, and raises its mmap threshold after large frees, so a long stream
of volume-sized tensors (allocated and freed one volume at a time) fragments the heap and the resident set
creeps up with the pool size although nothing is retained (measured: 200 phantom volumes scored took the
resident set from 444 to 783 MB, all of it returned by one ``malloc_trim``). Trimming after each volume keeps
the peak flat (benchmarks/results/speed.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        return None


def release_freed_memory() -> None:
    """Returns the heap's free pages to the OS where the C library can (glibc ``malloc_trim(0)``); a no-op
    elsewhere. Costs a few milliseconds: call it between volumes, not inside a volume's computation."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
