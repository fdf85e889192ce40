"""Putting work on the queue: one entry per CVAT job that needs pre-labels, never two.

The entries come from `connectors.cvat.queued.plan_entries` (the jobs `prelabel run`
would label); `enqueue_entries` adds an entry for each unless one with the same id is pending or
running. Concurrent enqueuers take turns under a Redis lock, so that check and add are
one step and two of them cannot both add the same job. The check reads every entry's status
in one pipeline and the adds go through RQ's `enqueue_many` in another, so thousands of
entries cost a few round trips, not a few per entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from redis import Redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.queue import EnqueueData

from connectors.queue.entries import ENQUEUE_LOCK, FUNCTION, SERIALIZER, Entry, entry_id, open_queue

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
    not have been planned. A job listed twice gets one entry. Redis is read and written in
    pipelines of `BATCH` entries (a few round trips for thousands of entries), all under the
    enqueue lock, so two enqueuers never both add the same job.
    """
    queue = open_queue(connection)
    done = Enqueued()
    retry = Retry(max=options.attempts - 1) if options.attempts > 1 else None
    unique: dict[str, Entry] = {}
    for entry in entries:
        key = entry_id(entry.host, entry.job_id)
        done.ids[entry.job_id] = key
        unique.setdefault(key, entry)
    with connection.lock(ENQUEUE_LOCK, timeout=120, blocking_timeout=120):
        items = list(unique.items())
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            statuses = _statuses(connection, queue, [key for key, _ in batch])
            new: list[Entry] = []
            stale: list[str] = []
            for key, entry in batch:
                present, status = statuses[key]
                if status in PENDING:
                    done.pending.append(entry.job_id)
                elif status == JobStatus.FAILED:
                    done.failed.append(entry.job_id)
                else:
                    if present:
                        stale.append(key)
                    new.append(entry)
            with connection.pipeline() as pipe:
                for job in Job.fetch_many(stale, connection=connection, serializer=SERIALIZER):
                    if job is not None:
                        job.delete(pipeline=pipe)
                queue.enqueue_many([_job_data(entry, options, retry) for entry in new], pipeline=pipe)
                pipe.execute()
            done.added += [entry.job_id for entry in new]
    return done


BATCH = 500
"""Entries per pipeline: bounds the memory of one round trip, not the number of round trips."""


def _statuses(connection: Redis, queue: Queue, keys: list[str]) -> dict[str, tuple[bool, JobStatus | None]]:
    """Entry id -> (whether its entry exists, its RQ status), in one round trip."""
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            job_key = queue.job_class.key_for(key)
            pipe.exists(job_key)
            pipe.hget(job_key, "status")
        replies = pipe.execute()
    found = {}
    for index, key in enumerate(keys):
        present, raw = replies[2 * index], replies[2 * index + 1]
        found[key] = (bool(present), _status(raw))
    return found


def _status(raw: bytes | None) -> JobStatus | None:
    try:
        return JobStatus(raw.decode()) if raw is not None else None
    except ValueError:  # a status this RQ does not know: treat the entry as replaceable
        return None


def _job_data(entry: Entry, options: QueueOptions, retry: Retry | None) -> EnqueueData:
    return Queue.prepare_data(
        FUNCTION,
        args=(entry.as_payload(),),
        job_id=entry_id(entry.host, entry.job_id),
        timeout=options.job_timeout,
        retry=retry,
        result_ttl=FINISHED_TTL,
        description=f"CVAT job {entry.job_id} ({entry.target})",
        meta={"cvat_job": entry.job_id, "host": entry.host, "attempts": options.attempts},
    )
