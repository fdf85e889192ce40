"""The CVAT side of the queue: planning entries, and labeling one entry's job on a worker.

`plan_entries` turns a target into one `Entry` per CVAT job that needs pre-labels (the
jobs `label_target` would label). On a worker, RQ calls `label_entry` (by its dotted path,
`connectors.queue.entries.FUNCTION`) with the entry and the worker's `EntryWorker`, which
keeps for the life of the process the sessions, the reviewer lists and the pipelines it
built (one model), so an entry costs the job's own work and no model loading.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis import Redis

from connectors.cvat.access import require_write_access
from connectors.cvat.assign import Reviewer, resolve_reviewers
from connectors.cvat.connect import ServerOptions, connect
from connectors.cvat.driver import LabelRequest, Target, TargetPlan, label_target, plan_target
from connectors.cvat.observe import check_server, observed, record_job, task_created_at
from connectors.cvat.session import CvatSession
from connectors.queue.entries import COMPLETIONS, STATS_INDEX, Entry, stats_key
from prelabel.assemble import PipelineBuilder, PipelineCache, build_pipeline
from prelabel.calibration.fitting import Calibration, read_calibration
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.pipeline.runner import Pipeline
from prelabel.service.metrics import Metrics
from prelabel.state import StatesByServer

log = logging.getLogger(__name__)

COMPLETIONS_KEPT = 10_000


def plan_entries(
    session: CvatSession, target: Target, config: Config, request: LabelRequest | None = None
) -> tuple[TargetPlan, list[Entry]]:
    """The jobs of `target` that need pre-labels, as entries; checks labels and schema first."""
    request = request or LabelRequest()
    planned = plan_target(session, target, config, request)
    data = config.model_dump(mode="json")
    calibration = _calibration(config)
    entries = [
        Entry(
            host=session.host,
            job_id=plan.job_id,
            organization=session.organization,
            config=data,
            relabel=request.relabel,
            include_tagged=request.include_tagged,
            quality=request.quality,
            target=planned.work.where,
            calibration=calibration,
        )
        for plan in planned.work.jobs
    ]
    return planned, entries


def _calibration(config: Config) -> dict | None:
    """The calibration file's content when `run` would apply it here, for the workers."""
    path = Path(config.calibration.path)
    if not (config.calibration.use and path.is_file()):
        return None
    return asdict(read_calibration(path))


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process adds to each entry: its identity, device and login."""

    name: str
    states: StatesByServer | None
    """This worker's own state files, one per CVAT server (a record; the server's state
    decides what is written)."""
    device: str | None = None
    batch_size: int | None = None
    auth: str | None = None
    profile: str | None = None
    insecure: bool = False
    ca_bundle: str | None = None


class EntryWorker:
    """One worker process's context: its settings, its counters' Redis, and what it built."""

    def __init__(
        self,
        settings: WorkerSettings,
        connection: Redis | None,
        builder: PipelineBuilder = build_pipeline,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.connection = connection
        self.pipelines = PipelineCache(builder)
        self._sessions: dict[tuple[str, str | None, str], CvatSession] = {}
        self._reviewers: dict[tuple[str, str], list[Reviewer]] = {}

    def label(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Label the CVAT job of one entry and route it; returns what was done."""
        entry = Entry.from_payload(payload)
        config = self.config(entry)
        session = self.session(entry, config)
        start = time.perf_counter()
        metrics = self.metrics
        try:
            outcome = label_target(
                session,
                {"job_id": entry.job_id},
                config,
                lambda names: self.pipeline(entry, config, names),
                request=LabelRequest(
                    include_tagged=entry.include_tagged,
                    relabel=entry.relabel,
                    quality=entry.quality,
                    progress=False,
                ),
                state=self.settings.states.for_host(session.host) if self.settings.states else None,
                reviewers=self.reviewers(session, config),
                on_job=(lambda job: record_job(metrics, job)) if metrics is not None else None,
            )
        except BaseException:
            if metrics is not None:
                metrics.worked("label_job", "failed")
            raise
        if metrics is not None:
            metrics.worked("label_job", "done")
            if outcome.jobs:
                metrics.task_labeled(task_created_at(session, outcome.jobs[0].plan.task_id))
        seconds = time.perf_counter() - start
        stats = outcome.stats
        result = {
            "cvat_job": entry.job_id,
            "worker": self.settings.name,
            "frames": stats.frames,
            "accepted": stats.accepted,
            "review": stats.review,
            "tags": outcome.tags,
            "issues": outcome.issues,
            "seconds": round(seconds, 3),
        }
        self._record(result)
        log.info(
            "job %d: %d frames, %d accepted, %d for review; wrote %d tags, %d issues in %.1fs",
            entry.job_id, result["frames"], result["accepted"], result["review"], result["tags"],
            result["issues"], seconds,
        )  # fmt: skip
        return result

    def config(self, entry: Entry) -> Config:
        """The entry's config, with this worker's device and batch size."""
        data = copy.deepcopy(entry.config)
        model = data.setdefault("model", {})
        if self.settings.device:
            model["device"] = self.settings.device
        if self.settings.batch_size:
            model["batch_size"] = self.settings.batch_size
        try:
            return Config.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"the entry's config is not valid here: {exc.errors()[0]['msg']}") from None

    def pipeline(self, entry: Entry, config: Config, names: Sequence[str]) -> Pipeline:
        """Built once per process for each config, label set and calibration.

        Only the entry's calibration applies, never a calibration file on the worker machine.
        """
        learned = Calibration(**entry.calibration) if entry.calibration else None
        own = config.model_copy(update={"calibration": config.calibration.model_copy(update={"use": False})})
        return self.pipelines.get(own, names, learned)

    def session(self, entry: Entry, config: Config) -> CvatSession:
        """One session per server, organization and retry policy, logged in with this worker's login."""
        key = (entry.host, entry.organization, config.retry.model_dump_json())
        if key not in self._sessions:
            settings = self.settings
            self._sessions[key] = connect(
                ServerOptions(
                    host=entry.host,
                    auth=settings.auth,
                    profile=settings.profile,
                    organization=entry.organization,
                    insecure=settings.insecure,
                    ca_bundle=settings.ca_bundle,
                ),
                config.retry,
            )
            if self.metrics is not None:
                self._sessions[key] = observed(self._sessions[key], self.metrics)
            require_write_access(self._sessions[key], "worker")  # before the entry's model is built
        return self._sessions[key]

    def check_servers(self) -> None:
        """Return when every CVAT server this worker logged in to answers (readiness)."""
        for session in list(self._sessions.values()):
            check_server(session)

    def reviewers(self, session: CvatSession, config: Config) -> list[Reviewer]:
        key = (session.host, json.dumps(config.review.reviewers))
        if key not in self._reviewers:
            self._reviewers[key] = resolve_reviewers(session, config.review.reviewers)
        return self._reviewers[key]

    def _record(self, result: dict[str, Any]) -> None:
        """Per-worker counters and the completion log that `prelabel status` reads."""
        if self.connection is None:
            return
        try:
            with self.connection.pipeline() as pipe:
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


def label_entry(payload: dict[str, Any], worker: EntryWorker | None = None) -> dict[str, Any]:
    """The queue's job function: label the entry's CVAT job on this `worker`.

    What the job already holds on the server is never written again, so an entry that ran
    part-way on a worker that died completes here without duplicates. A failure raises,
    and the queue retries the entry or moves it to the failed list.
    """
    if worker is None:
        raise RuntimeError("label_entry runs in a prelabel worker (prelabel worker passes its context)")
    return worker.label(payload)
