"""Keep the C heap from growing with the slide: a bound on glibc's malloc arenas.

glibc gives each thread that allocates concurrently its own heap ("arena"), up to
8 × the CPU count of them. Tile-by-tile work allocates and frees large numpy
buffers from a pool of threads; freed blocks stay in the arena that served them
and are reused only by that arena, so the process's peak memory creeps up with
the number of tiles processed instead of staying at what the tiles in flight
need (measured: segmenting a 8192² nuclear plane in 2048² tiles peaked 0.81 GiB
above its start with the default arenas, 0.40 GiB with two; 4096²: 0.67 and
0.51). :func:`bound_arenas` caps the number of arenas for arenas made from now
on (``mallopt(M_ARENA_MAX)``, the same as ``MALLOC_ARENA_MAX`` in the
environment); elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["bound_arenas"]

_M_ARENA_MAX = -8
_done: set[int] = set()


def bound_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas at ``n`` (≥ 1) for the rest of the process; True when applied."""
    n = max(1, int(n))
    if n in _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_ARENA_MAX, n))
    except (OSError, AttributeError):  # musl and others: no mallopt / no arenas
        return False
    if ok:
        _done.add(n)
    return ok
