"""Per-stage wall-clock accounting, so that a slow stage is visible after every run."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class StageTimer:
    """Sums the seconds spent in named stages; safe to use from several threads.

    Stages that run in parallel threads (decode) can add up to more than the wall time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)
