"""The CVAT side of the metrics: what a labeling outcome counts, when a task was created, and
whether the server answers (the readiness check)."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime

from connectors.cvat.driver import JobOutcome, TargetOutcome
from connectors.cvat.errors import CvatError, server_error
from connectors.cvat.session import CvatSession
from prelabel.errors import PrelabelError
from prelabel.service.metrics import Metrics

log = logging.getLogger(__name__)

READY_TIMEOUT = 3.0
"""Seconds the readiness check waits for CVAT."""


def observed(session: CvatSession, metrics: Metrics) -> CvatSession:
    """The same session, counting each retried call in `metrics`."""
    return dataclasses.replace(session, on_retry=metrics.retried)


def record_job(metrics: Metrics, outcome: JobOutcome) -> None:
    """Count one labeled job: frames by decision, tags and issues written, stage times."""
    result = outcome.result
    writes = {
        "tags": len(result.tags_created),
        "issues": len(result.issues_created),
        "tags_deleted": len(result.tags_deleted),
        "issues_deleted": len(result.issues_deleted),
    }
    metrics.labeled(outcome.stats, writes)


def record_target(metrics: Metrics, outcome: TargetOutcome) -> None:
    for job in outcome.jobs:
        record_job(metrics, job)


def task_created_at(session: CvatSession, task_id: int) -> float | None:
    """When the task was created in CVAT (epoch seconds); None if the server does not say or
    cannot be asked (a metric is not worth failing the work that was done)."""
    try:
        task = session.call(f"reading task {task_id}", lambda: session.client.tasks.retrieve(task_id))
    except PrelabelError as exc:
        log.warning("task %d: its creation time is unknown: %s", task_id, exc.one_line())
        return None
    created = getattr(task, "created_date", None)
    if isinstance(created, str):
        created = datetime.fromisoformat(created.replace("Z", "+00:00"))
    return created.timestamp() if isinstance(created, datetime) else None


def check_server(session: CvatSession, timeout: float = READY_TIMEOUT) -> None:
    """Return when the server answers ``GET /api/server/about`` with 200, once and without retries;
    raise one `CvatError` line when it does not."""
    url = f"{session.host}/api/server/about"
    pool = session.client.api_client.rest_client.pool_manager
    try:
        response = pool.request("GET", url, timeout=timeout, retries=False, preload_content=True)
    except Exception as exc:
        raise server_error(exc, "checking the CVAT server") from None
    if response.status != 200:
        raise CvatError(f"checking the CVAT server: it answered {response.status}")
