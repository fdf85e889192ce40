"""A command's own peak RSS, whatever the size of the process that starts it.

Linux carries a process's RSS high-water mark across ``execve`` from the memory image it
replaces (``setmax_mm_hiwater_rss`` in fs/exec.c), and a child made by ``fork`` or ``vfork``
(what `subprocess` uses) starts out in its parent's. So the ``ru_maxrss`` that ``os.wait4``
reports for a child is at least its parent's RSS at the time: a benchmark that holds a
model, the frames or the test server would be measuring itself. `run_measured` puts this
module, run as a script (the Python interpreter and the standard library only, about 10 MB),
in between: it starts the command and reports that child's ``ru_maxrss``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class Measured:
    returncode: int
    """As `subprocess.Popen.returncode` would give it (-N: killed by signal N)."""
    peak_rss_bytes: int
    """The command's own ``ru_maxrss`` (0 when it was killed before it could be read)."""
    timed_out: bool = False
    """Killed at its timeout."""


def run_measured(command: Sequence[str], *, timeout: float, **popen: Any) -> Measured:
    """Run `command` (`popen`: Popen's keyword arguments) through the launcher; kill it and its
    children after `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="peak-rss-") as tmp:
        report = Path(tmp) / "peak"
        launcher = [sys.executable, "-P", __file__, str(report), *command]  # -P: stdlib only
        process = subprocess.Popen(launcher, start_new_session=True, **popen)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            _kill_group(process.pid)

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            returncode = process.wait()
        except BaseException:
            _kill_group(process.pid)
            raise
        finally:
            watchdog.cancel()
        peak = int(report.read_text()) if report.is_file() else 0
    if returncode >= 128:  # the launcher passes a signal death on as 128 + N
        returncode = -(returncode - 128)
    return Measured(returncode, peak, killed.is_set())


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _launch(report: str, command: list[str]) -> int:
    child = subprocess.Popen(command)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    _, status, usage = os.wait4(child.pid, 0)
    Path(report).write_text(str(usage.ru_maxrss * _UNIT))
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1], sys.argv[2:]))
