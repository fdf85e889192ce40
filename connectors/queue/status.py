"""Reading the queue for people: counts by state first, entries of the states asked for,
workers and their throughput, errors.

Also `requeue_failed` (send the failed entries back) and `wait_for` (follow entries
until each has finished or failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq import Worker
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import (
    BaseRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from connectors.queue.entries import SERIALIZER, STATS_INDEX, open_queue, stats_key


@dataclass(frozen=True)
class EntryView:
    entry_id: str
    cvat_job: int | None
    status: str
    worker: str | None = None
    """The worker holding it (running) or that ran it (finished, failed)."""
    error: str | None = None
    """The last line of the failure (failed entries)."""
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class WorkerView:
    name: str
    state: str
    """busy, idle, suspended or gone (not registered any more: stopped or dead)."""
    cvat_job: int | None
    jobs: int
    frames: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


STATES = ("pending", "running", "finished", "failed", "scheduled", "deferred")
"""The states an entry can be in, as `prelabel status` names them: pending is RQ's queued,
running its started; scheduled waits for a retry's time, deferred for another entry."""


@dataclass
class QueueStatus:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    """Entries per state (every state, always)."""
    listed: tuple[str, ...] = ()
    """The states whose entries were read (below); the others' lists stay empty."""
    limit: int | None = None
    """Entries read per listed state at most (None: all)."""
    pending: list[EntryView] = field(default_factory=list)
    running: list[EntryView] = field(default_factory=list)
    finished: list[EntryView] = field(default_factory=list)
    failed: list[EntryView] = field(default_factory=list)
    scheduled: list[EntryView] = field(default_factory=list)
    deferred: list[EntryView] = field(default_factory=list)
    workers: list[WorkerView] = field(default_factory=list)

    def views(self, state: str) -> list[EntryView]:
        return getattr(self, state)

    def as_dict(self) -> dict[str, Any]:
        """Counts and workers, and the entries of the listed states only."""
        listed = {state: [view.__dict__ for view in self.views(state)] for state in self.listed}
        return {
            "counts": dict(self.counts),
            **listed,
            "workers": [
                {**worker.__dict__, "images_per_second": round(worker.images_per_second, 3)}
                for worker in self.workers
            ],
        }


def count_entries(connection: Redis) -> dict[str, int]:
    """Entries per state: one length read per state, whatever the number of entries.

    Counting the running entries also hands back those whose worker's lease ran out.
    """
    queue = open_queue(connection)
    return {state: _count(registry) for state, registry in _sources(queue).items()}


def read_status(
    connection: Redis, lists: Iterable[str] = (), limit: int | None = None, workers: bool = True
) -> QueueStatus:
    """The counts by state, the entries of the states in `lists` (at most `limit` each, oldest
    first) and, with `workers`, every worker that registered or counted work."""
    queue = open_queue(connection)
    sources = _sources(queue)
    listed = tuple(state for state in STATES if state in set(lists))
    status = QueueStatus(counts={state: _count(source) for state, source in sources.items()})
    status.listed, status.limit = listed, limit
    for state in listed:
        ids = _ids(sources[state], limit)
        for job in Job.fetch_many(ids, connection=connection, serializer=SERIALIZER):
            if job is not None:
                status.views(state).append(_view(job))
    if workers:
        status.workers = _workers(connection, queue)
    return status


def _sources(queue: Queue) -> dict[str, Queue | BaseRegistry]:
    """State -> where RQ keeps its entries: the queue itself (pending) or a registry."""
    return {
        "pending": queue,
        "running": StartedJobRegistry(queue=queue),
        "finished": FinishedJobRegistry(queue=queue),
        "failed": FailedJobRegistry(queue=queue),
        "scheduled": ScheduledJobRegistry(queue=queue),
        "deferred": DeferredJobRegistry(queue=queue),
    }


def _count(source: Queue | BaseRegistry) -> int:
    return source.count  # LLEN of the queue, cleanup and ZCARD of a registry


def _ids(source: Queue | BaseRegistry, limit: int | None) -> list[str]:
    if isinstance(source, Queue):
        return source.get_job_ids(0, -1 if limit is None else limit)
    if limit == 0:
        return []
    return source.get_job_ids(0, -1 if limit is None else limit - 1)


def _view(job: Job) -> EntryView:
    state = job.get_status(refresh=False)
    result = job.return_value() if state == JobStatus.FINISHED else None
    error = None
    if state == JobStatus.FAILED and (latest := job.latest_result()) is not None:
        error = _last_line(latest.exc_string)
    return EntryView(
        entry_id=job.id,
        cvat_job=job.meta.get("cvat_job"),
        status=_text(state) if state is not None else "unknown",
        worker=job.worker_name or None,
        error=error,
        result=result if isinstance(result, dict) else None,
    )


def _text(value) -> str:
    """An RQ status, which is an enum or (read back from Redis) a plain string."""
    return str(getattr(value, "value", value))


def _last_line(text: str | None) -> str | None:
    """``CvatError: reading job 5: not found`` from a traceback."""
    if not text:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    name, sep, message = lines[-1].partition(": ")
    return f"{name.rsplit('.', 1)[-1]}{sep}{message}"


def _workers(connection: Redis, queue: Queue) -> list[WorkerView]:
    live = {worker.name: worker for worker in Worker.all(queue=queue, serializer=SERIALIZER)}
    names = sorted(set(live) | {name.decode() for name in connection.smembers(STATS_INDEX)})
    with connection.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(stats_key(name))
        stats = pipe.execute()
    current = {name: job_id for name, worker in live.items() if (job_id := worker.get_current_job_id())}
    jobs = Job.fetch_many(list(current.values()), connection=connection, serializer=SERIALIZER)
    doing = {
        name: job.meta.get("cvat_job") for name, job in zip(current, jobs, strict=True) if job is not None
    }
    views = []
    for name, raw in zip(names, stats, strict=True):
        counters = {key.decode(): value.decode() for key, value in raw.items()}
        worker = live.get(name)
        views.append(
            WorkerView(
                name=name,
                state=_text(worker.get_state()) if worker is not None else "gone",
                cvat_job=doing.get(name),
                jobs=int(counters.get("jobs", 0)),
                frames=int(counters.get("frames", 0)),
                seconds=float(counters.get("seconds", 0.0)),
            )
        )
    return views


def format_status(status: QueueStatus) -> str:
    """The counts, then the listed entries (a few lines per state) and the workers."""
    counts = status.counts
    shown = [state for state in STATES if state in STATES[:4] or counts.get(state)]
    lines = [", ".join(f"{state} {counts.get(state, 0)}" for state in shown)]
    for state in status.listed:
        views = sorted(status.views(state), key=lambda v: v.cvat_job or 0)
        if not views:
            continue
        lines.append(f"{state}:")
        lines += [_line(view) for view in views]
        if (more := counts.get(state, 0) - len(views)) > 0:
            lines.append(f"  ... and {more} more (--limit)")
    if counts.get("failed") and "failed" not in status.listed:
        lines.append("(prelabel status --list failed shows why they failed)")
    if status.workers:
        lines.append("workers:")
        for worker in status.workers:
            doing = f", on CVAT job {worker.cvat_job}" if worker.cvat_job is not None else ""
            lines.append(
                f"  {worker.name}: {worker.state}{doing}; {worker.jobs} jobs, {worker.frames} frames, "
                f"{worker.images_per_second:.1f} images/s"
            )
    return "\n".join(lines)


def _line(view: EntryView) -> str:
    where = f" on {view.worker}" if view.worker else ""
    if view.status == "finished":
        result = view.result or {}
        return (
            f"  CVAT job {view.cvat_job}{where}: {result.get('frames', '?')} frames, "
            f"{result.get('tags', '?')} tags, {result.get('issues', '?')} issues written"
        )
    if view.status == "failed":
        return f"  CVAT job {view.cvat_job}{where}: {view.error}"
    return f"  CVAT job {view.cvat_job}{where}"


def requeue_failed(connection: Redis, attempts: int | None = None) -> list[int]:
    """Send every failed entry back to the queue, with its attempts renewed; their CVAT job ids."""
    queue = open_queue(connection)
    registry = FailedJobRegistry(queue=queue)
    requeued = []
    for job in Job.fetch_many(registry.get_job_ids(), connection=connection, serializer=SERIALIZER):
        if job is None:
            continue
        tries = attempts or job.meta.get("attempts", 1)
        job.retries_left = max(0, tries - 1) or None
        job.save()
        registry.requeue(job)
        requeued.append(job.meta.get("cvat_job"))
    return requeued


def wait_for(
    connection: Redis,
    entry_ids: Sequence[str],
    on_progress: Callable[[int, int], None] | None = None,
    poll: float = 0.5,
) -> dict[str, list[str]]:
    """Follow the entries until each has finished or failed (or vanished); ids by outcome.

    `on_progress(done, total)` hears each change.
    """
    remaining = set(entry_ids)
    outcome: dict[str, list[str]] = {"finished": [], "failed": []}
    reported = -1
    key_for = open_queue(connection).job_class.key_for
    while remaining:
        ids = sorted(remaining)
        with connection.pipeline(transaction=False) as pipe:  # one round trip, however many entries
            for entry in ids:
                pipe.hget(key_for(entry), "status")
            states = pipe.execute()
        for entry, raw in zip(ids, states, strict=True):
            state = raw.decode() if raw is not None else None
            if state == JobStatus.FINISHED:
                outcome["finished"].append(entry)
            elif state in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                outcome["failed"].append(entry)
            else:
                continue
            remaining.discard(entry)
        done = len(entry_ids) - len(remaining)
        if on_progress and done != reported:
            on_progress(done, len(entry_ids))
            reported = done
        if remaining:
            time.sleep(poll)
    return outcome
