"""The queue's job function: one CVAT job through the same per-job path as `prelabel run`.

A worker process calls `configure` once; then `label_entry` runs for each entry it takes.
The model and text classifier are built on first use and kept for the life of the
process (one per config and label set), as are the CVAT client and the reviewer list, so
an entry costs the job's own work and no model loading.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cvat_sdk import Client
from pydantic import ValidationError
from redis import Redis

from connectors.cvat import retry
from connectors.cvat.access import require_write_access
from connectors.cvat.assign import Reviewer, resolve_reviewers
from connectors.cvat.connect import ServerOptions, connect
from connectors.cvat.driver import JobOptions, candidate_names, label_jobs
from connectors.cvat.jobs import find_work
from connectors.queue.entries import COMPLETIONS, STATS_INDEX, Entry, stats_key
from prelabel.calibrate import Calibration
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.runner import Pipeline, build_pipeline
from prelabel.state import RunState

log = logging.getLogger(__name__)

COMPLETIONS_KEPT = 10_000


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process adds to each entry: its identity, device and login."""

    name: str
    state: RunState | None
    """This worker's own state file (a record; the server's state decides what is written)."""
    device: str | None = None
    batch_size: int | None = None
    auth: str | None = None
    profile: str | None = None
    insecure: bool = False
    ca_bundle: str | None = None


PipelineBuilder = Callable[..., Pipeline]
"""Called as ``builder(config, labels, calibration=...)``, like `build_pipeline`."""

_settings: WorkerSettings | None = None
_connection: Redis | None = None
_builder: PipelineBuilder = build_pipeline
_pipelines: dict[str, Pipeline] = {}
_clients: dict[tuple[str, str | None], Client] = {}
_reviewers: dict[tuple[str, str], list[Reviewer]] = {}


def configure(settings: WorkerSettings, connection: Redis, builder: PipelineBuilder = build_pipeline) -> None:
    """Set this process's worker settings, the Redis for its counters, and the pipeline builder."""
    global _settings, _connection, _builder
    _settings, _connection, _builder = settings, connection, builder
    _pipelines.clear()
    _clients.clear()
    _reviewers.clear()


def label_entry(payload: dict[str, Any]) -> dict[str, Any]:
    """Label the CVAT job of one entry and route it; returns what was done.

    What the job already holds on the server is never written again, so an entry that ran
    part-way on a worker that died completes here without duplicates. A failure raises,
    and the queue retries the entry or moves it to the failed list.
    """
    if _settings is None:
        raise RuntimeError("label_entry runs in a prelabel worker (call configure first)")
    entry = Entry.from_payload(payload)
    config = _config(entry)
    client = _client(entry, config)
    start = time.perf_counter()
    work = find_work(
        client,
        job_id=entry.job_id,
        include_tagged=entry.include_tagged,
        relabel=entry.relabel,
        suggestions=config.review.upload_suggestion,
    )
    hint = "prelabel setup --project-id N (or --task-id N) for the job's project or task"
    names = candidate_names(work, config, hint)
    pipeline = _pipeline(config, names, entry.calibration)
    options = JobOptions(
        quality=entry.quality,
        relabel=entry.relabel,
        progress=False,
        reviewers=_reviewers_for(client, entry, config),
    )
    outcomes = label_jobs(client, work, pipeline, config, options, _settings.state)
    seconds = time.perf_counter() - start
    result = {
        "cvat_job": entry.job_id,
        "worker": _settings.name,
        "frames": sum(o.stats.frames for o in outcomes),
        "accepted": sum(o.stats.accepted for o in outcomes),
        "review": sum(o.stats.review for o in outcomes),
        "tags": sum(len(o.result.tags_created) for o in outcomes),
        "issues": sum(len(o.result.issues_created) for o in outcomes),
        "seconds": round(seconds, 3),
    }
    _record(result)
    log.info(
        "job %d: %d frames, %d accepted, %d for review; wrote %d tags, %d issues in %.1fs",
        entry.job_id, result["frames"], result["accepted"], result["review"], result["tags"],
        result["issues"], seconds,
    )  # fmt: skip
    return result


def _config(entry: Entry) -> Config:
    data = copy.deepcopy(entry.config)
    model = data.setdefault("model", {})
    if _settings.device:
        model["device"] = _settings.device
    if _settings.batch_size:
        model["batch_size"] = _settings.batch_size
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"the entry's config is not valid here: {exc.errors()[0]['msg']}") from None


def _client(entry: Entry, config: Config) -> Client:
    retry.configure(config.retry)
    key = (entry.host, entry.organization)
    if key not in _clients:
        client = connect(
            ServerOptions(
                host=entry.host,
                auth=_settings.auth,
                profile=_settings.profile,
                organization=entry.organization,
                insecure=_settings.insecure,
                ca_bundle=_settings.ca_bundle,
                timeout=config.retry.timeout,
            )
        )
        require_write_access(client, "worker")  # before the entry's model is built
        _clients[key] = client
    return _clients[key]


def _pipeline(config: Config, names: list[str], calibration: dict[str, Any] | None) -> Pipeline:
    """Built once per process for each config, label set and calibration.

    Only the entry's calibration applies, never a calibration file on the worker machine.
    """
    key = hashlib.sha256(
        json.dumps([config.model_dump(mode="json"), names, calibration], sort_keys=True).encode()
    ).hexdigest()
    if key not in _pipelines:
        began = time.perf_counter()
        config = config.model_copy(
            update={"calibration": config.calibration.model_copy(update={"use": False})}
        )
        learned = Calibration(**calibration) if calibration else None
        _pipelines[key] = _builder(config, names, calibration=learned)
        loaded = _pipelines[key].loaded
        log.info(
            "worker %s: built the pipeline (model %s on %s) in %.1fs",
            _settings.name, loaded.identity, loaded.device, time.perf_counter() - began,
        )  # fmt: skip
    return _pipelines[key]


def _reviewers_for(client: Client, entry: Entry, config: Config) -> list[Reviewer]:
    key = (entry.host, json.dumps(config.review.reviewers))
    if key not in _reviewers:
        _reviewers[key] = resolve_reviewers(client, config.review.reviewers)
    return _reviewers[key]


def _record(result: dict[str, Any]) -> None:
    """Per-worker counters and the completion log that `prelabel status` reads."""
    if _connection is None:
        return
    try:
        with _connection.pipeline() as pipe:
            key = stats_key(result["worker"])
            pipe.hincrby(key, "jobs", 1)
            pipe.hincrby(key, "frames", result["frames"])
            pipe.hincrbyfloat(key, "seconds", result["seconds"])
            pipe.sadd(STATS_INDEX, result["worker"])
            pipe.rpush(COMPLETIONS, json.dumps({**result, "at": time.time()}))
            pipe.ltrim(COMPLETIONS, -COMPLETIONS_KEPT, -1)
            pipe.execute()
    except Exception as exc:  # counters are for people; losing one must not fail the job
        log.warning("could not record the worker's counters: %s", exc)
