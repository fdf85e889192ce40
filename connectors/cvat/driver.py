"""Pre-labeling CVAT jobs: each job's frames run source -> worker -> router -> sink.

The job is the unit of work. Labeling one job depends only on the job, the config and the
server's state (the local state file is a record), so jobs can be processed in any order,
again after a crash, or on different machines, without writing anything twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cvat_sdk import Client

from connectors.cvat.assign import Reviewer, route_job
from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import JobPlan, Work
from connectors.cvat.labels import CvatLabel, check_schema
from connectors.cvat.overlap import RememberingSink, SharedFrames, count, decided_elsewhere
from connectors.cvat.sink import CvatSink, JobResult, SinkSettings
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.runner import Pipeline, RunStats, run
from prelabel.state import RunState
from prelabel.timing import StageTimer


@dataclass(frozen=True)
class JobOutcome:
    plan: JobPlan
    stats: RunStats
    result: JobResult
    job_changes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class JobOptions:
    """How jobs are labeled, beyond the pipeline itself."""

    quality: str = "compressed"
    relabel: bool = False
    progress: bool = True
    reviewers: list[Reviewer] = field(default_factory=list)


def candidate_names(work: Work, config: Config, setup_hint: str) -> list[str]:
    """The CVAT label names to classify into, checked against the config and the schema.

    A config label that names no CVAT candidate label is an error, as is a target without
    candidates or one whose labels lack the attributes `setup` adds.
    """
    check_schema(work.labels, work.where, setup_hint)
    names = [label.name for label in work.labels]
    unknown = [label.name for label in config.labels if label.name not in names]
    if unknown:
        raise ConfigError(
            f"the config describes labels that {work.where} does not have: {', '.join(map(repr, unknown))}",
            hint=f"its tag labels are: {', '.join(map(repr, names))}",
        )
    return names


def label_job(
    client: Client,
    plan: JobPlan,
    labels: dict[str, CvatLabel],
    pipeline: Pipeline,
    config: Config,
    options: JobOptions,
    state: RunState | None = None,
    shared: SharedFrames | None = None,
) -> JobOutcome:
    """Label the planned frames of one job, then route the job (assignee, stage, state).

    Accepted frames get tags; the others get a review issue (and a suggestion tag, if
    configured). Only what the job does not hold yet is written. A frame the job shares
    with another job of the task gets the decision already made there (`overlap`); the
    predictions made here are added to `shared` for the jobs labeled after this one.
    """
    shared = shared if shared is not None else SharedFrames()
    settings = SinkSettings(
        model_identity=pipeline.loaded.identity,
        fingerprint=pipeline.fingerprint,
        suggestions=config.review.upload_suggestion,
        message_length=config.review.message_length,
        batch_size=config.cvat.upload_batch_size,
        relabel=options.relabel,
        upload_queue=config.cvat.upload_queue,
    )
    timer = StageTimer()
    copied = decided_elsewhere(plan, shared, pipeline.policy, pipeline.fingerprint, state)
    source = JobFrameSource(
        client,
        replace(plan, frames=tuple(frame for frame in plan.frames if frame not in copied)),
        quality=options.quality,
        io_threads=config.cvat.download_threads,
        prefetch_chunks=config.cvat.prefetch_chunks,
        timer=timer,
    )
    sink = CvatSink(client, plan, labels, settings, state, timer)
    remembering = RememberingSink(sink, shared, plan.task_id)
    try:
        for decision in copied.values():
            remembering.write(decision)
    except BaseException:
        sink.close()
        raise
    stats = run(source, remembering, pipeline, progress=options.progress, timer=timer)
    count(stats, list(copied.values()))
    changes = _route(
        client,
        plan,
        len(sink.result.issues_created),
        bool(sink.result.writes),
        config,
        options,
        state,
        settings.fingerprint,
    )
    return JobOutcome(plan, stats, sink.result, changes)


def _route(
    client: Client,
    plan: JobPlan,
    new_issues: int,
    wrote: bool,
    config: Config,
    options: JobOptions,
    state: RunState | None,
    fingerprint: str,
) -> dict[str, object]:
    """Route the job once: after any write to it, or when the state has no record of routing it.

    A job that was already routed and got no new writes is left alone, so that a person
    can move it on without a rerun moving it back.
    """
    open_issues = sum(plan.existing.open_issue(frame) is not None for frame in list(plan.existing.issues))
    review_items = open_issues + new_issues
    changes: dict[str, object] = {}
    if wrote or state is None or not state.job_routed(plan.job_id):
        changes = route_job(client, plan.job_id, review_items, options.reviewers, config.review)
    if state is not None:
        state.record_job(plan.job_id, plan.task_id, fingerprint, review_items, routed=True)
    return changes


def label_jobs(
    client: Client,
    work: Work,
    pipeline: Pipeline,
    config: Config,
    options: JobOptions,
    state: RunState | None = None,
    on_job: Callable[[JobOutcome], None] | None = None,
) -> list[JobOutcome]:
    """Label every planned job in turn; `on_job` hears about each as it finishes."""
    labels = {label.name: label for label in work.labels}
    shared = SharedFrames()  # this run's predictions, for the frames overlapping jobs share
    outcomes = []
    for plan in work.jobs:
        outcome = label_job(client, plan, labels, pipeline, config, options, state, shared)
        outcomes.append(outcome)
        if on_job:
            on_job(outcome)
    if state is not None:  # jobs finished before an interruption may still await their routing
        for plan in work.finished_jobs:
            if not state.job_routed(plan.job_id):
                _route(client, plan, 0, False, config, options, state, pipeline.fingerprint)
    return outcomes
