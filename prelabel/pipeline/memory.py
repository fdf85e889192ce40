"""Keeping a long run's memory down: glibc settings that hand freed memory back to the OS.

By default glibc raises its mmap threshold after large blocks are freed, so torch's
per-batch activations end up in heap arenas that grow and fragment over a long run. A
fixed threshold makes those blocks mmapped (returned on free), and fewer arenas fragment
less. Measured in one process on ViT-B-32, 128 frames: peak RSS 1555 MiB without it, 1452
MiB with it; without it, freeing the text tower (`LoadedModel.images_only`) hands back 96 of
its 240 MiB. On anything but glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def tune_allocator() -> None:
    """Call once at start-up, before the worker threads exist."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)  # blocks over 1 MiB come from mmap
        libc.mallopt(_M_ARENA_MAX, 4)
