"""Putting work on the queue: one entry per CVAT job that needs pre-labels, never two.

The entries come from `connectors.cvat.queued.plan_entries` (the jobs `prelabel run`
would label); `enqueue_entries` adds an entry for each unless one with the same id is pending or
running. Concurrent enqueuers take turns under a Redis lock, so that check and add are
one step and two of them cannot both add the same job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from redis import Redis
from rq import Retry
from rq.job import JobStatus

from connectors.queue.entries import ENQUEUE_LOCK, FUNCTION, Entry, entry_id, open_queue

PENDING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
FINISHED_TTL = 7 * 24 * 3600
"""Seconds a finished entry stays visible in `prelabel status`."""


@dataclass(frozen=True)
class QueueOptions:
    """How entries are run: the time one may take and how often it is tried."""

    job_timeout: int = 4 * 3600
    """Seconds one CVAT job may take on a worker before it is stopped and counted as failed."""
    attempts: int = 3
    """Tries per entry (failures and dead workers alike) before it lands in the failed list."""


@dataclass
class Enqueued:
    """What `enqueue_entries` did, by CVAT job id."""

    added: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    """Already queued or running: left as they are."""
    failed: list[int] = field(default_factory=list)
    """In the failed list: left there (``prelabel requeue-failed`` sends them back)."""
    ids: dict[int, str] = field(default_factory=dict)
    """CVAT job id -> entry id, for every job above."""


def enqueue_entries(connection: Redis, entries: Sequence[Entry], options: QueueOptions) -> Enqueued:
    """Add each entry unless its job has one pending, running or failed; see `Enqueued`.

    A finished entry is replaced: its job needs work again (new frames, say), or it would
    not have been planned.
    """
    queue = open_queue(connection)
    done = Enqueued()
    retry = Retry(max=options.attempts - 1) if options.attempts > 1 else None
    with connection.lock(ENQUEUE_LOCK, timeout=120, blocking_timeout=120):
        for entry in entries:
            key = entry_id(entry.host, entry.job_id)
            done.ids[entry.job_id] = key
            existing = queue.fetch_job(key)
            status = existing.get_status(refresh=False) if existing is not None else None
            if status in PENDING:
                done.pending.append(entry.job_id)
                continue
            if status == JobStatus.FAILED:
                done.failed.append(entry.job_id)
                continue
            if existing is not None:
                existing.delete()
            queue.enqueue(
                FUNCTION,
                entry.as_payload(),
                job_id=key,
                job_timeout=options.job_timeout,
                retry=retry,
                result_ttl=FINISHED_TTL,
                description=f"CVAT job {entry.job_id} ({entry.target})",
                meta={"cvat_job": entry.job_id, "host": entry.host, "attempts": options.attempts},
            )
            done.added.append(entry.job_id)
    return done
