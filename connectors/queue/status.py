"""Reading the queue for people: entries by state, workers and their throughput, errors.

Also `requeue_failed` (send the failed entries back) and `wait_for` (follow entries
until each has finished or failed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq import Worker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

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


@dataclass
class QueueStatus:
    pending: list[EntryView] = field(default_factory=list)
    running: list[EntryView] = field(default_factory=list)
    finished: list[EntryView] = field(default_factory=list)
    failed: list[EntryView] = field(default_factory=list)
    workers: list[WorkerView] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        def entries(views: list[EntryView]) -> list[dict[str, Any]]:
            return [view.__dict__ for view in views]

        return {
            "pending": entries(self.pending),
            "running": entries(self.running),
            "finished": entries(self.finished),
            "failed": entries(self.failed),
            "workers": [
                {**worker.__dict__, "images_per_second": round(worker.images_per_second, 3)}
                for worker in self.workers
            ],
        }


def read_status(connection: Redis) -> QueueStatus:
    """Every entry the queue knows, and every worker that registered or counted work.

    Reading the running entries also hands back those whose worker's lease ran out.
    """
    queue = open_queue(connection)
    status = QueueStatus()
    running_ids = StartedJobRegistry(queue=queue).get_job_ids()
    groups = (
        (status.pending, queue.get_job_ids()),
        (status.running, running_ids),
        (status.finished, FinishedJobRegistry(queue=queue).get_job_ids()),
        (status.failed, FailedJobRegistry(queue=queue).get_job_ids()),
    )
    for views, ids in groups:
        for job in Job.fetch_many(ids, connection=connection, serializer=SERIALIZER):
            if job is not None:
                views.append(_view(job))
    status.workers = _workers(connection, queue)
    return status


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


def _workers(connection: Redis, queue) -> list[WorkerView]:
    live = {worker.name: worker for worker in Worker.all(queue=queue, serializer=SERIALIZER)}
    names = sorted(set(live) | {name.decode() for name in connection.smembers(STATS_INDEX)})
    views = []
    for name in names:
        counters = {
            key.decode(): value.decode() for key, value in connection.hgetall(stats_key(name)).items()
        }
        worker = live.get(name)
        cvat_job = None
        if worker is not None and (job_id := worker.get_current_job_id()):
            job = Job.fetch_many([job_id], connection=connection, serializer=SERIALIZER)[0]
            cvat_job = job.meta.get("cvat_job") if job is not None else None
        views.append(
            WorkerView(
                name=name,
                state=_text(worker.get_state()) if worker is not None else "gone",
                cvat_job=cvat_job,
                jobs=int(counters.get("jobs", 0)),
                frames=int(counters.get("frames", 0)),
                seconds=float(counters.get("seconds", 0.0)),
            )
        )
    return views


def format_status(status: QueueStatus) -> str:
    """A few lines per section, as `prelabel status` prints them."""
    lines = [
        f"pending {len(status.pending)}, running {len(status.running)}, "
        f"finished {len(status.finished)}, failed {len(status.failed)}"
    ]
    for title, views in (("pending", status.pending), ("running", status.running)):
        if views:
            lines.append(f"{title}:")
            lines += [
                f"  CVAT job {view.cvat_job}" + (f" on {view.worker}" if view.worker else "")
                for view in sorted(views, key=lambda v: v.cvat_job or 0)
            ]
    if status.finished:
        lines.append("finished:")
        for view in sorted(status.finished, key=lambda v: v.cvat_job or 0):
            result = view.result or {}
            lines.append(
                f"  CVAT job {view.cvat_job} on {view.worker}: {result.get('frames', '?')} frames, "
                f"{result.get('tags', '?')} tags, {result.get('issues', '?')} issues written"
            )
    if status.failed:
        lines.append("failed:")
        lines += [
            f"  CVAT job {view.cvat_job}" + (f" on {view.worker}" if view.worker else "") + f": {view.error}"
            for view in sorted(status.failed, key=lambda v: v.cvat_job or 0)
        ]
    if status.workers:
        lines.append("workers:")
        for worker in status.workers:
            doing = f", on CVAT job {worker.cvat_job}" if worker.cvat_job is not None else ""
            lines.append(
                f"  {worker.name}: {worker.state}{doing}; {worker.jobs} jobs, {worker.frames} frames, "
                f"{worker.images_per_second:.1f} images/s"
            )
    return "\n".join(lines)


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
    while remaining:
        ids = sorted(remaining)
        for entry, job in zip(
            ids, Job.fetch_many(ids, connection=connection, serializer=SERIALIZER), strict=True
        ):
            state = job.get_status(refresh=False) if job is not None else None
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
