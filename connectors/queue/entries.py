"""What a queue entry holds, and the names of the Redis keys prelabel keeps beside RQ's.

An entry is one CVAT job. Its id is deterministic (the server and the job id), so the
same job never has two entries. Its payload holds the job id, the server's URL and
organization, the config and the run options; never a credential: each worker logs in
with its own (`CVAT_ACCESS_TOKEN`, `CVAT_USERNAME`/`CVAT_PASSWORD` or a cvat-cli profile).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Any

from rq import Queue
from rq.serializers import JSONSerializer

QUEUE_NAME = "prelabel"
FUNCTION = "connectors.cvat.queued.label_entry"
"""The job function a worker runs for an entry, called as ``FUNCTION(payload, worker=context)``
with the worker's context (see `connectors.queue.worker`); found by its path, not imported."""
OLD_FUNCTION = "connectors.queue.tasks.label_entry"
"""What entries queued by prelabel 0.1 name; `connectors.queue.tasks` forwards them."""
SERIALIZER = JSONSerializer
"""JSON, not pickle: entries are plain data that any worker version can read."""


@dataclass(frozen=True)
class Entry:
    """One CVAT job to pre-label, as a worker receives it."""

    host: str
    job_id: int
    organization: str | None
    config: dict[str, Any]
    """The validated config, as JSON data (the worker may override device and batch size)."""
    relabel: bool = False
    include_tagged: bool = False
    quality: str = "original"
    target: str = ""
    """What was enqueued (``project 3``), for messages."""
    calibration: dict[str, Any] | None = None
    """The calibration file in use where the entry was made (`prelabel calibrate`), so that
    every worker routes with the same learned temperature and thresholds."""

    def as_payload(self) -> dict[str, Any]:
        """The fields as a dict for the JSON serializer; the config and calibration dicts are
        shared with this entry, not copied (thousands of entries often share one config)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Entry:
        return cls(**payload)


def entry_id(host: str, job_id: int) -> str:
    """``prelabel-job-<server hash>-<job id>``: the same job on the same server, the same id."""
    server = hashlib.sha256(host.rstrip("/").lower().encode()).hexdigest()[:10]
    return f"prelabel-job-{server}-{job_id}"


def open_queue(connection) -> Queue:
    return Queue(QUEUE_NAME, connection=connection, serializer=SERIALIZER)


def stats_key(worker_name: str) -> str:
    """A hash of per-worker counters: jobs, frames, seconds (time spent labeling)."""
    return f"prelabel:{QUEUE_NAME}:worker-stats:{worker_name}"


STATS_INDEX = f"prelabel:{QUEUE_NAME}:workers-seen"
"""The set of worker names that have counters."""
COMPLETIONS = f"prelabel:{QUEUE_NAME}:completions"
"""A capped list of JSON records, one per entry a worker completed (newest last)."""
ENQUEUE_LOCK = f"prelabel:{QUEUE_NAME}:enqueue-lock"
