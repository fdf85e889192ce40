"""What an operator watches: Prometheus metrics, and the liveness and readiness answers.

`Metrics` owns its `CollectorRegistry` (made by the caller or here, never the module-global
one), so that `serve`, a `worker` and each test have their own. Every metric is named
``prelabel_*``:

- ``prelabel_frames_labeled_total{decision}``: accepted, review or unreadable frames
- ``prelabel_cvat_writes_total{kind}``: tags and issues created in CVAT (and deleted, with
  ``--relabel``)
- ``prelabel_cvat_retries_total{kind}``: retried server calls by failure (429, 502, 503,
  504, dropped, timeout, connection)
- ``prelabel_webhook_deliveries_total{outcome}``: queued, duplicate, ignored, busy,
  unauthorized, unsupported, malformed
- ``prelabel_work_items_total{kind,outcome}``: work items done or failed
- ``prelabel_work_queue_depth``: work queued and not started (read at scrape time)
- ``prelabel_stage_seconds_total{stage}`` and ``prelabel_labeling_seconds_total``: where
  the labeling time goes
- ``prelabel_images_per_second``: the throughput of the last labeled job
- ``prelabel_task_created_to_labeled_seconds``: from a task's creation in CVAT to its
  pre-labels being written (a histogram)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from prelabel.pipeline.runner import RunStats

log = logging.getLogger(__name__)

DECISIONS = ("accepted", "review", "unreadable")
WRITE_KINDS = ("tags", "issues", "tags_deleted", "issues_deleted")
DELIVERY_OUTCOMES = ("queued", "duplicate", "ignored", "busy", "unauthorized", "unsupported", "malformed")
LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


class Metrics:
    """The metrics of one process, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.frames = Counter(
            "prelabel_frames_labeled", "Frames labeled, by routing decision.", ["decision"], registry=r
        )
        self.writes = Counter("prelabel_cvat_writes", "Writes to CVAT, by kind.", ["kind"], registry=r)
        self.retries = Counter(
            "prelabel_cvat_retries", "CVAT calls retried, by failure.", ["kind"], registry=r
        )
        self.deliveries = Counter(
            "prelabel_webhook_deliveries", "Webhook deliveries, by how they were answered.", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.work = Counter(
            "prelabel_work_items", "Work items, by kind and outcome.", ["kind", "outcome"], registry=r
        )
        self.queue_depth = Gauge("prelabel_work_queue_depth", "Work queued and not yet started.", registry=r)
        self.stage_seconds = Counter(
            "prelabel_stage_seconds", "Seconds spent in each labeling stage.", ["stage"], registry=r
        )
        self.labeling_seconds = Counter("prelabel_labeling_seconds", "Seconds spent labeling.", registry=r)
        self.images_per_second = Gauge(
            "prelabel_images_per_second", "Frames per second of the last labeled job.", registry=r
        )
        self.latency = Histogram(
            "prelabel_task_created_to_labeled_seconds",
            "Seconds from a task's creation in CVAT to its pre-labels being written.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for decision in DECISIONS:
            self.frames.labels(decision)
        for kind in WRITE_KINDS:
            self.writes.labels(kind)
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(outcome)

    def labeled(self, stats: RunStats, writes: Mapping[str, int]) -> None:
        """Count one labeled job: its frames, its writes by kind (`WRITE_KINDS`) and stage times."""
        self.frames.labels("accepted").inc(stats.accepted)
        self.frames.labels("review").inc(stats.review)
        self.frames.labels("unreadable").inc(stats.unreadable)
        for kind, count in writes.items():
            self.writes.labels(kind).inc(count)
        for stage, seconds in stats.stages.items():
            self.stage_seconds.labels(stage).inc(max(seconds, 0.0))
        self.labeling_seconds.inc(max(stats.seconds, 0.0))
        if stats.frames and stats.seconds > 0:
            self.images_per_second.set(stats.images_per_second)

    def task_labeled(self, created_at: float | None, now: float | None = None) -> None:
        """Observe the time from a task's creation (epoch seconds) to now."""
        if created_at is not None:
            self.latency.observe(max((now if now is not None else time.time()) - created_at, 0.0))

    def retried(self, kind: str) -> None:
        self.retries.labels(kind).inc()

    def delivered(self, outcome: str) -> None:
        self.deliveries.labels(outcome).inc()

    def worked(self, kind: str, outcome: str) -> None:
        self.work.labels(kind, outcome).inc()

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth from `depth` at each scrape (NaN while it cannot be read)."""

        def read() -> float:
            try:
                return float(depth())
            except Exception:
                return float("nan")

        self.queue_depth.set_function(read)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


Check = Callable[[], None]
"""A readiness check: returns when the dependency answers, raises (one line) when not."""


@dataclass
class Probes:
    """The answers to ``/metrics``, ``/healthz`` and ``/readyz``, for any HTTP front.

    ``/healthz`` says the process serves (liveness); ``/readyz`` runs each check (CVAT,
    Redis) and is 503 while one fails or while the process drains. Check results are kept
    for `cache_seconds` so that frequent probes do not hammer the servers.
    """

    metrics: Metrics
    checks: Mapping[str, Check] = field(default_factory=dict)
    health: Callable[[], dict] = field(default=lambda: {"status": "ok"})
    cache_seconds: float = 1.0
    draining: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cached: tuple[float, int, dict] | None = field(default=None, repr=False)

    def answer(self, path: str) -> tuple[int, str, bytes] | None:
        """(status, content type, body) for a probe path; None for any other path."""
        path = path.split("?")[0].rstrip("/") or "/"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if path == "/healthz":
            return 200, "application/json", json.dumps(self.health()).encode()
        if path == "/readyz":
            status, body = self.ready()
            return status, "application/json", json.dumps(body).encode()
        return None

    def ready(self) -> tuple[int, dict]:
        """(200 or 503, what each check said)."""
        if self.draining.is_set():
            return 503, {"status": "draining", "checks": {}}
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.cache_seconds:
                return self._cached[1], self._cached[2]
            results = {}
            for name, check in self.checks.items():
                try:
                    check()
                    results[name] = "ok"
                except Exception as exc:
                    results[name] = _one_line(exc)
            ok = all(value == "ok" for value in results.values())
            body = {"status": "ready" if ok else "not ready", "checks": results}
            self._cached = (now, 200 if ok else 503, body)
            return self._cached[1], body


def _one_line(exc: BaseException) -> str:
    one_line = getattr(exc, "one_line", None)
    text = one_line() if callable(one_line) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:300]
