"""How the process allocates: glibc settings that keep torch's per-batch memory in place.

A forward pass of ViT-B-32 at batch 32 allocates and frees blocks of 5-20 MB dozens of
times (the residual stream, the qkv projection, the MLP's hidden layer). If such blocks
come from mmap, every batch maps them afresh and the kernel zero-fills them page by page:
with every block over 1 MiB mapped, a 512-frame run on 2 cores took 5 million page
faults and 15-18 s of system time, a fifth of the CPU, lost to the model's two threads.
So blocks up to 32 MiB (glibc's own ceiling for its adaptive threshold, fixed here so
that it holds from the first batch) come from the heap and are reused batch after
batch, and the heap keeps up to 128 MiB of free memory at its top instead of trimming
it after every batch.

What that heap would keep for good is the one-off garbage of loading the model (the
random initialisation a checkpoint overwrites, the text tower a labeling run frees):
`release_free_memory` hands it back once, after the model is ready. During a run, what the
batches leave scattered in the heap grows slowly (ViT-B-32 through a folder: about 7% more
peak RSS over 512 frames than over 64), so every run hands it back every few seconds
(`PeriodicRelease`; a CVAT run has one for all of its jobs). Fewer arenas (4) keep the worker
threads' free memory from multiplying. Figures: docs/benchmarks.md ("page faults removed",
"Memory over N and 8N frames"). On anything but glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import time
from dataclasses import dataclass, field
from functools import cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 << 20
"""Blocks this large or larger are mapped on their own and unmapped when freed."""
TRIM_THRESHOLD = 128 << 20
"""Free memory at the heap's top beyond this goes back to the OS."""
ARENA_MAX = 4
RELEASE_EVERY = 5.0
"""Seconds between two `PeriodicRelease` hand-backs (each about 10 ms and some page faults)."""


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_allocator() -> None:
    """Call once at start-up, before the worker threads exist."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)


def release_free_memory(*, collect_garbage: bool = False) -> None:
    """Hand every free page of the heap back to the OS (`malloc_trim`, about 10 ms), after
    a full garbage collection if `collect_garbage` (about 0.2 s once torch is loaded).

    For after a large release, such as loading the model and dropping its text tower, or
    at the end of a job; not per batch, where the freed memory is about to be used again.
    """
    if collect_garbage:
        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass
class PeriodicRelease:
    """`release_free_memory` at most every `every` seconds: call it after each frame of a run."""

    every: float = RELEASE_EVERY
    _last: float = field(default_factory=time.monotonic)

    def __call__(self) -> None:
        if time.monotonic() - self._last >= self.every:
            release_free_memory()
            self._last = time.monotonic()
