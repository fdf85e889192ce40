"""Putting work on the queue: one entry per CVAT job that needs pre-labels, never two.

`plan_entries` selects the jobs exactly as `prelabel run` does (`find_work`), and
`enqueue_entries` adds an entry for each unless one with the same id is pending or
running. Concurrent enqueuers take turns under a Redis lock, so that check and add are
one step and two of them cannot both add the same job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cvat_sdk import Client
from redis import Redis
from rq import Retry
from rq.job import JobStatus

from connectors.cvat.driver import candidate_names
from connectors.cvat.jobs import Work, find_work
from connectors.queue.entries import ENQUEUE_LOCK, FUNCTION, Entry, entry_id, open_queue
from prelabel.calibration.fitting import read_calibration
from prelabel.config import Config

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


def plan_entries(
    client: Client,
    target: dict[str, int],
    config: Config,
    setup_hint: str,
    *,
    relabel: bool = False,
    include_tagged: bool = False,
    quality: str = "compressed",
) -> tuple[Work, list[Entry]]:
    """The jobs of `target` that need pre-labels, as entries; checks labels and schema first."""
    work = find_work(
        client,
        **target,
        include_tagged=include_tagged,
        relabel=relabel,
        suggestions=config.review.upload_suggestion,
    )
    candidate_names(work, config, setup_hint)
    host = client.api_map.host
    organization = client.organization_slug
    data = config.model_dump(mode="json")
    calibration = _calibration(config)
    entries = [
        Entry(
            host=host,
            job_id=plan.job_id,
            organization=organization,
            config=data,
            relabel=relabel,
            include_tagged=include_tagged,
            quality=quality,
            target=work.where,
            calibration=calibration,
        )
        for plan in work.jobs
    ]
    return work, entries


def _calibration(config: Config) -> dict | None:
    """The calibration file's content when `run` would apply it here, for the workers."""
    path = Path(config.calibration.path)
    if not (config.calibration.use and path.is_file()):
        return None
    return asdict(read_calibration(path))


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
