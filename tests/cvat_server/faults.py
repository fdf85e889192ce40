"""Fault injection for reliability tests: delays, error statuses, dropped connections."""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["delay", "status", "drop", "status_after_write", "drop_after_write"]
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class Fault:
    """One fault rule.

    It matches a request when `method` (or any method, if None) and the regular
    expression `path` (searched in the path without the query string) match, and then
    fires `times` times (None: forever), each time with `probability`.
    """

    kind: FaultKind
    path: str = ".*"
    method: str | None = None
    status: int = 503
    body: object = None
    delay: float = 0.0
    retry_after: int | None = None
    times: int | None = 1
    probability: float = 1.0
    fired: int = 0
    _regex: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._regex = re.compile(self.path)
        if self.method is not None:
            self.method = self.method.upper()

    def matches(self, method: str, path: str) -> bool:
        """Whether the rule applies to this request (ignoring times/probability)."""
        return (self.method is None or self.method == method) and bool(self._regex.search(path))

    @property
    def exhausted(self) -> bool:
        """Whether the rule has fired as often as allowed."""
        return self.times is not None and self.fired >= self.times

    @property
    def answer_status(self) -> int | None:
        """The status this fault answers with; None for a dropped connection."""
        return None if self.kind.startswith("drop") else self.status

    def response_headers(self) -> dict[str, str]:
        """Extra headers for a status fault (Retry-After for 429/503)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def response_body(self) -> object:
        """Body of a status fault; defaults to what a proxy in front of CVAT might say."""
        return self.body if self.body is not None else {"detail": f"injected {self.status}"}


class FaultInjector:
    """Thread-safe set of fault rules plus a global delay, drawn with a seeded RNG."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._rules: list[Fault] = []
        self._rng = random.Random(seed)
        self.global_delay = 0.0
        self.global_delay_methods: frozenset[str] | None = None

    def add(self, fault: Fault) -> Fault:
        """Register a rule; returns it so tests can read `fired`."""
        with self._lock:
            self._rules.append(fault)
        return fault

    def clear(self, seed: int | None = None) -> None:
        """Remove every rule and the global delay; optionally reseed the RNG."""
        with self._lock:
            self._rules.clear()
            self.global_delay = 0.0
            self.global_delay_methods = None
            if seed is not None:
                self._rng.seed(seed)

    def set_global_delay(self, seconds: float, methods: set[str] | None = None) -> None:
        """Sleep `seconds` before answering every request (or only those `methods`)."""
        with self._lock:
            self.global_delay = seconds
            self.global_delay_methods = frozenset(m.upper() for m in methods) if methods is not None else None

    def global_delay_for(self, method: str) -> float:
        """The global delay that applies to a request with this method."""
        methods = self.global_delay_methods
        return self.global_delay if methods is None or method in methods else 0.0

    def draw(self, method: str, path: str) -> list[Fault]:
        """The rules that fire for this request, each counted as fired.

        Every matching delay fires; of the other kinds only the first matching rule
        fires, so stacked rules answer successive requests in order.
        """
        fired: list[Fault] = []
        with self._lock:
            terminal = False
            for rule in self._rules:
                if rule.exhausted or not rule.matches(method, path):
                    continue
                if rule.kind != "delay" and terminal:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                fired.append(rule)
                terminal = terminal or rule.kind != "delay"
        return fired
