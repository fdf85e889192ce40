"""The benchmarks' peak RSS is the command's own, not that of the process that starts it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.peak_rss import run_measured

MIB = 1024 * 1024
ALLOCATE = "x = bytearray({size}); x[::4096] = b'\\1' * len(x[::4096])"


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def _alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False


def test_a_small_child_of_a_large_parent_reports_its_own_peak():
    ballast = bytearray(600 * MIB)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touched: resident in this process
    assert _rss() > 600 * MIB
    small = run_measured([sys.executable, "-c", "pass"], timeout=60)
    large = run_measured([sys.executable, "-c", ALLOCATE.format(size=300 * MIB)], timeout=60)
    del ballast
    assert small.returncode == 0 and large.returncode == 0
    assert 0 < small.peak_rss_bytes < 100 * MIB, small
    assert 300 * MIB < large.peak_rss_bytes < 400 * MIB, large


def test_exit_codes_pass_through_and_a_timeout_kills_the_command_too(tmp_path):
    assert run_measured([sys.executable, "-c", "raise SystemExit(3)"], timeout=60).returncode == 3
    marker = tmp_path / "pid"
    code = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    began = time.monotonic()
    measured = run_measured([sys.executable, "-c", code], timeout=3)
    assert measured.returncode < 0 and time.monotonic() - began < 30
    pid = int(marker.read_text())
    for _ in range(50):  # the command itself is gone, not only the launcher
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the command {pid} outlived the timeout")
