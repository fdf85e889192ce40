"""How the process holds memory: glibc settings that keep torch's per-batch memory in place,
and the pages it can let go of.

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
tensors a checkpoint replaces, the text tower a labeling run frees):
`release_free_memory` hands it back once, after the model is ready. During a run, what the
batches leave scattered in the heap grows slowly (ViT-B-32 through a folder: about 7% more
peak RSS over 512 frames than over 64), so every run hands it back every few seconds
(`PeriodicRelease`; a CVAT run has one for all of its jobs). Fewer arenas (4) keep the worker
threads' free memory from multiplying. Figures: docs/benchmarks.md ("page faults removed",
"Memory over N and 8N frames"). On anything but glibc this is a no-op.

torch's CUDA build (what `pip install torch` gives on Linux x86_64) maps its CUDA libraries
at import even when the model runs on the CPU, and 200-350 MiB of them (cuBLASLt, NVRTC,
nvJitLink, libtorch_cuda, Triton) stay resident in the process, although a CPU run never
executes them. `release_gpu_libraries` unmaps those pages (they stay in the page cache, free
for the kernel to reclaim) before a CPU model is loaded: ViT-B-32 through a folder then peaks
at 1240-1430 MiB instead of 1650-1675 (docs/benchmarks.md, "GPU libraries on a CPU run").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MADV_DONTNEED = 4
_MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")  # a mapping's first line in /proc/self/smaps

GPU_LIBRARY = re.compile(
    r"/(nvidia|triton|cuda/bindings)/|/(libtorch_cuda|libc10_cuda|libtorch_nvshmem|libcudart|libnvjpeg)[^/]*$"
)
"""By path: the CUDA libraries of the `nvidia-*` wheels, Triton, cuda-bindings, torch's and
torchvision's CUDA parts."""

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


def release_gpu_libraries() -> int:
    """Unmap the GPU libraries' pages (`GPU_LIBRARY`, with `release_file_pages`) from a process
    whose model runs on the CPU; returns how many mappings were released.

    A no-op once CUDA is initialised in this process.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return 0
    return release_file_pages(GPU_LIBRARY)


def release_file_pages(path: re.Pattern[str]) -> int:
    """Unmap this process's resident pages of the files whose path `path` matches; returns how
    many mappings were released (0 without glibc, as off Linux).

    Only mappings that hold the file's own pages unchanged are released: not writable, no
    private copy of a page, nothing swapped out. Their contents stay as they were, and a page
    that is read again is mapped again from the file (or the page cache). 0 where
    /proc/self/smaps cannot be read.
    """
    libc = _libc()
    if libc is None:
        return 0
    try:
        mappings = _unchanged_mappings(path)
    except OSError:  # no /proc/self/smaps (a sandbox without /proc)
        return 0
    released = 0
    for start, end in mappings:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            released += 1
    return released


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    writable: bool
    file: str
    kib: dict[str, int]
    """Its counters in kB by name (Rss, Anonymous, Swap, ...)."""


def _unchanged_mappings(path: re.Pattern[str]) -> list[tuple[int, int]]:
    """(start, end) of this process's resident mappings of files matching `path` that are
    read-only and hold only the file's own pages (no copy-on-write page, none swapped)."""
    return [
        (m.start, m.end)
        for m in _mappings()
        if not m.writable and path.search(m.file) and m.kib.get("Rss") and not m.kib.get("Anonymous")
        and not m.kib.get("Swap")
    ]  # fmt: skip


def _mappings() -> Iterator[_Mapping]:
    """This process's memory mappings, as /proc/self/smaps lists them."""
    with open("/proc/self/smaps") as smaps:
        head: list[str] | None = None
        kib: dict[str, int] = {}
        for line in smaps:
            if _MAPPING.match(line):
                if head:
                    yield _parse(head, kib)
                head, kib = line.split(maxsplit=5), {}
            elif line.rstrip().endswith(" kB"):
                key, _, value = line.partition(":")
                kib[key] = int(value.split()[0])
        if head:
            yield _parse(head, kib)


def _parse(head: list[str], kib: dict[str, int]) -> _Mapping:
    start, end = (int(address, 16) for address in head[0].split("-"))
    return _Mapping(start, end, "w" in head[1], head[5].rstrip("\n") if len(head) == 6 else "", kib)
