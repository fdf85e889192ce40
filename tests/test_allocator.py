"""The allocator settings of `prelabel.pipeline.memory`, on the real glibc, in a fresh process.

What they promise: torch's per-batch blocks (5-20 MB each) are reused from the heap instead
of being mapped and zero-filled by the kernel again on every batch, and the one-off garbage
of loading a model goes back to the OS when `release_free_memory` is called.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, resident_kib

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")

_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from prelabel.pipeline.memory import release_free_memory, tune_allocator

    def faults():
        return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    if sys.argv[1] == "tuned":
        tune_allocator()
    else:  # every block over 1 MiB mapped on its own, as prelabel once set it
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    sizes = [4_915_200, 14_745_600, 19_660_800, 4_915_200]  # a ViT-B-32 layer's blocks at batch 32
    def batch():
        blocks = [torch.ones(size // 4) for size in sizes]
        del blocks
    batch()
    before = faults()
    for _ in range(20):
        batch()
    pages = 20 * sum(sizes) // 4096
    per_batch = (faults() - before) / pages

    garbage = [torch.ones(2_000_000) for _ in range(60)]  # a model load's: 480 MB of 8 MB blocks
    del garbage  # the heap keeps up to TRIM_THRESHOLD of it resident
    held = rss()
    release_free_memory()
    print(json.dumps({"fault_share": per_batch, "held": held, "released": held - rss()}))
    """
)


def _probe(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_per_batch_blocks_are_reused_not_faulted_in_again():
    tuned, mapped = _probe("tuned"), _probe("mapped")
    # Mapped afresh, every page of every block is faulted in (and zero-filled) each batch.
    assert mapped["fault_share"] > 0.9, mapped
    # Tuned, the blocks come back from the heap: nearly no page is touched for the first time.
    assert tuned["fault_share"] < 0.2, tuned


def test_release_free_memory_hands_the_heap_garbage_back():
    tuned = _probe("tuned")
    assert tuned["released"] > 64 * 2**20, tuned


_PERIODIC = textwrap.dedent(
    """
    import json, sys
    import torch
    from prelabel.pipeline.memory import PeriodicRelease, tune_allocator

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    tune_allocator()
    later, now = PeriodicRelease(every=3600), PeriodicRelease(every=0)
    garbage = [torch.ones(2_000_000) for _ in range(60)]
    del garbage
    held = rss()
    later()  # not due for an hour: keeps the heap as it is
    kept = held - rss()
    now()
    print(json.dumps({"not_due": kept, "due": held - rss()}))
    """
)


def test_periodic_release_hands_back_only_when_due():
    done = subprocess.run(
        [sys.executable, "-c", _PERIODIC], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    released = json.loads(done.stdout)
    assert abs(released["not_due"]) < 8 * 2**20, released
    assert released["due"] > 64 * 2**20, released


def _resident_kib(address: int) -> int:
    """Rss of the mapping of this process that starts at `address`."""
    return resident_kib(lambda start, _file: start == address)


def test_release_file_pages_unmaps_clean_file_pages_and_keeps_changed_ones(tmp_path: Path):
    """Pages that are the file's own go (and come back, unchanged, when read); a mapping that
    holds a changed private copy of a page is left alone, so the change is not lost."""
    from prelabel.pipeline.memory import release_file_pages

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    size = 64 * mmap.PAGESIZE
    content = bytes(range(256)) * (size // 256)
    clean_path, changed_path = tmp_path / "clean.bin", tmp_path / "changed.bin"
    for path in (clean_path, changed_path):
        path.write_bytes(content)
    with open(clean_path, "rb") as clean_file, open(changed_path, "r+b") as changed_file:
        clean = mmap.mmap(clean_file.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        changed = mmap.mmap(changed_file.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    view = ctypes.c_char.from_buffer(changed)
    changed_at = ctypes.addressof(view)
    changed[:5] = b"HUMAN"  # a private copy of the first page, as the dynamic linker makes
    assert libc.mprotect(ctypes.c_void_p(changed_at), ctypes.c_size_t(size), mmap.PROT_READ) == 0
    del view
    assert clean[:] == content and changed[5:] == content[5:]  # every page resident
    clean_at = _address(clean_path)
    assert _resident_kib(clean_at) >= size // 1024 and _resident_kib(changed_at) >= size // 1024

    released = release_file_pages(re.compile(re.escape(str(tmp_path)) + "/"))

    assert released == 1
    assert _resident_kib(clean_at) == 0
    assert _resident_kib(changed_at) >= size // 1024
    assert clean[:] == content  # read in again from the file
    assert changed[:5] == b"HUMAN" and changed[5:] == content[5:]
    clean.close()
    changed.close()


def _address(path: Path) -> int:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(str(path)):
            return int(line.split("-", 1)[0], 16)
    raise AssertionError(f"{path} is not mapped")
