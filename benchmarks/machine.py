"""The machine a benchmark ran on, and how busy other processes kept it meanwhile."""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Machine:
    """CPU model, logical cores, torch version and the device the model ran on."""

    cpu: str
    cores: int
    torch: str
    device: str

    @classmethod
    def here(cls, device: torch.device) -> Machine:
        name = str(device)
        if device.type == "cuda":
            name = f"{device} ({torch.cuda.get_device_name(device)})"
        return cls(cpu=_cpu_model(), cores=os.cpu_count() or 1, torch=torch.__version__, device=name)

    def describe(self) -> str:
        return f"{self.cpu}, {self.cores} cores"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OtherLoad:
    """The share of the machine's CPU time that processes other than ours used.

    Busy CPU time of the whole machine (``/proc/stat``) minus that of this process and its
    waited-for children (``getrusage``), over the wall time times the core count. On a quiet
    machine it stays near 0; a parallel build or test run shows up here and makes the
    figures measured meanwhile too low. None where ``/proc/stat`` cannot be read.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(value) for value in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
        usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        ours = sum(usage.ru_utime + usage.ru_stime for usage in usages)
        return time.monotonic(), busy, ours

    def share(self) -> float | None:
        """Other processes' CPU share since this meter was made (0..1), or None."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        if wall <= 0:
            return None
        return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def percent(share: float | None) -> str:
    return "?" if share is None else f"{100 * share:.0f}%"
