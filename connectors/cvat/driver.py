"""Pre-labeling CVAT jobs: each job's frames run source -> worker -> router -> sink.

`label_target` is the one composition of that work, used by `prelabel run`, the webhook
service, the queue worker and (through `plan_target`) queue planning: find the jobs that
need labels, check the candidate labels, then label each job and route it to review.
Entry points only gather their inputs (a session, a target, a config, a pipeline maker)
and call it.

Jobs share the download, decode and upload threads of the run (`ChunkDownloads`,
`RunPools`), started once and stopped at its end: while one job finishes
(its last chunks, its uploads, its routing), the first chunks of the next
`cvat.prefetch_jobs` jobs are already being built and downloaded, so no job starts cold.

The job is the unit of work. Labeling one job depends only on the job, the config and the
server's state (the local state file is a record), so jobs can be processed in any order,
again after a crash, or on different machines, without writing anything twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from connectors.cvat.assign import Reviewer, resolve_reviewers, route_job
from connectors.cvat.frames import ChunkDownloads, JobFrameSource
from connectors.cvat.jobs import JobPlan, Work, find_work
from connectors.cvat.labels import CvatLabel, check_schema
from connectors.cvat.overlap import RememberingSink, SharedFrames, count, decided_elsewhere
from connectors.cvat.session import CvatSession
from connectors.cvat.sink import CvatSink, JobResult, SinkSettings
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.pipeline.runner import Pipeline, RunStats, run
from prelabel.pipeline.stream import RunPools
from prelabel.pipeline.timing import StageTimer
from prelabel.pipeline.worker import decode_threads
from prelabel.state import RunState

Target = dict[str, int]
"""Exactly one of ``{"project_id": N}``, ``{"task_id": N}``, ``{"job_id": N}``."""

PipelineFor = Callable[[Sequence[str]], Pipeline]
"""Gives the pipeline for a list of candidate label names (built, or kept from before)."""


@dataclass(frozen=True)
class LabelRequest:
    """Which frames of a target to label, and how."""

    include_tagged: bool = False
    """Also frames a person tagged (their tags are never changed)."""
    relabel: bool = False
    """Again the frames prelabel already did, replacing only prelabel's own tags and open issues."""
    quality: str = "compressed"
    limit: int | None = None
    """At most this many frames (trials)."""
    progress: bool = True


@dataclass(frozen=True)
class TargetPlan:
    """The jobs of a target that need work, and the label names to classify into."""

    target: Target
    work: Work
    names: list[str]


@dataclass(frozen=True)
class JobOutcome:
    plan: JobPlan
    stats: RunStats
    result: JobResult
    job_changes: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetOutcome:
    """What `label_target` did, job by job."""

    plan: TargetPlan
    jobs: list[JobOutcome]
    pipeline: Pipeline | None = None
    """The pipeline the jobs were labeled with (None: nothing needed one)."""

    @property
    def stats(self) -> RunStats:
        total = RunStats()
        for outcome in self.jobs:
            total.merge(outcome.stats)
        return total

    @property
    def tags(self) -> int:
        return sum(len(outcome.result.tags_created) for outcome in self.jobs)

    @property
    def issues(self) -> int:
        return sum(len(outcome.result.issues_created) for outcome in self.jobs)


@dataclass(frozen=True)
class Labeling:
    """What every job of one target is labeled with."""

    session: CvatSession
    pipeline: Pipeline
    config: Config
    request: LabelRequest
    reviewers: list[Reviewer]
    state: RunState | None = None


def setup_hint(target: Target) -> str:
    """The `prelabel setup` command that fixes the target's label schema."""
    key, value = next(iter(target.items()))
    if key == "job_id":
        return "prelabel setup --project-id N (or --task-id N) for the job's project or task"
    return f"prelabel setup --{key.replace('_', '-')} {value}"


def candidate_names(work: Work, config: Config, hint: str) -> list[str]:
    """The CVAT label names to classify into, checked against the config and the schema.

    A config label that names no CVAT candidate label is an error, as is a target without
    candidates or one whose labels lack the attributes `setup` adds.
    """
    check_schema(work.labels, work.where, hint)
    names = [label.name for label in work.labels]
    unknown = [label.name for label in config.labels if label.name not in names]
    if unknown:
        raise ConfigError(
            f"the config describes labels that {work.where} does not have: {', '.join(map(repr, unknown))}",
            hint=f"its tag labels are: {', '.join(map(repr, names))}",
        )
    return names


def plan_target(
    session: CvatSession, target: Target, config: Config, request: LabelRequest | None = None
) -> TargetPlan:
    """The target's jobs that need labels (read from the server), with the label names checked."""
    request = request or LabelRequest()
    work = find_work(
        session,
        **target,
        include_tagged=request.include_tagged,
        relabel=request.relabel,
        suggestions=config.review.upload_suggestion,
        limit=request.limit,
    )
    return TargetPlan(target, work, candidate_names(work, config, setup_hint(target)))


def label_target(
    session: CvatSession,
    target: Target,
    config: Config,
    pipeline_for: PipelineFor,
    *,
    request: LabelRequest | None = None,
    state: RunState | None = None,
    reviewers: list[Reviewer] | None = None,
    planned: TargetPlan | None = None,
    on_job: Callable[[JobOutcome], None] | None = None,
) -> TargetOutcome:
    """Label what the target still needs and route each job; `on_job` hears about each job.

    `planned` is the `plan_target` result when the caller already has it (to show it
    first), `reviewers` the resolved `review.reviewers` (resolved here when None). With no
    job to label or route, no pipeline is asked for.
    """
    request = request or LabelRequest()
    planned = planned or plan_target(session, target, config, request)
    work = planned.work
    if not work.jobs and not work.finished_jobs:
        return TargetOutcome(planned, [])
    if reviewers is None:
        reviewers = resolve_reviewers(session, config.review.reviewers)
    labeling = Labeling(session, pipeline_for(planned.names), config, request, reviewers, state)
    labels = {label.name: label for label in work.labels}
    shared = SharedFrames()  # this run's predictions, for the frames overlapping jobs share
    outcomes = []
    timers = {plan.job_id: StageTimer() for plan in work.jobs}
    expected = _expected_frames(work.jobs)
    with (
        ChunkDownloads(session, quality=request.quality, threads=config.cvat.download_threads) as downloads,
        run_pools(labeling) as pools,
    ):
        for position, plan in enumerate(work.jobs):
            following = work.jobs[position + 1 : position + 1 + config.cvat.prefetch_jobs]

            def prefetch(following: list[JobPlan] = following) -> None:
                for later in following:
                    downloads.prefetch(
                        later, expected[later.job_id], config.cvat.prefetch_chunks, timers[later.job_id]
                    )

            outcome = label_job(
                labeling,
                plan,
                labels,
                shared,
                downloads=downloads,
                pools=pools,
                timer=timers[plan.job_id],
                then=prefetch,
            )
            outcomes.append(outcome)
            if on_job:
                on_job(outcome)
    if state is not None:  # jobs finished before an interruption may still await their routing
        for plan in work.finished_jobs:
            if not state.job_routed(plan.job_id):
                _route(labeling, plan, review_items=plan.existing.open_issue_count(), wrote=False)
    return TargetOutcome(planned, outcomes, labeling.pipeline)


def run_pools(labeling: Labeling) -> RunPools:
    """The decode and upload threads for a run of jobs labeled with `labeling` (to be closed)."""
    return RunPools(
        decode_workers=decode_threads(labeling.pipeline.options),
        upload_workers=labeling.config.cvat.write_concurrency,
    )


def _expected_frames(plans: list[JobPlan]) -> dict[int, list[int]]:
    """Job id -> the planned frames it will score itself: those no earlier job of the run plans
    (a frame shared with an earlier job gets that job's decision)."""
    seen: set[tuple[int, int]] = set()
    expected = {}
    for plan in plans:
        expected[plan.job_id] = [frame for frame in plan.frames if (plan.task_id, frame) not in seen]
        seen.update((plan.task_id, frame) for frame in plan.frames)
    return expected


def label_job(
    labeling: Labeling,
    plan: JobPlan,
    labels: dict[str, CvatLabel],
    shared: SharedFrames | None = None,
    *,
    downloads: ChunkDownloads | None = None,
    pools: RunPools | None = None,
    timer: StageTimer | None = None,
    then: Callable[[], None] | None = None,
) -> JobOutcome:
    """Label the planned frames of one job, then route the job (assignee, stage, state).

    Accepted frames get tags; the others get a review issue (and a suggestion tag, if
    configured). Only what the job does not hold yet is written. A frame the job shares
    with another job of the task gets the decision already made there (`overlap`); the
    predictions made here are added to `shared` for the jobs labeled after this one.
    `downloads` are the run's shared download threads (with the chunks fetched for this job
    ahead of time), `pools` its shared decode and upload threads (this job's writes are all
    done when it returns); `then` is called once every chunk of this job has been asked for. The
    stage times include ``wait_job`` (from the job's start to its first frame) and ``route``.
    """
    started = time.perf_counter()
    config, request, pipeline = labeling.config, labeling.request, labeling.pipeline
    shared = shared if shared is not None else SharedFrames()
    settings = SinkSettings(
        model_identity=pipeline.loaded.identity,
        fingerprint=pipeline.fingerprint,
        suggestions=config.review.upload_suggestion,
        message_length=config.review.message_length,
        batch_size=config.cvat.upload_batch_size,
        relabel=request.relabel,
        upload_queue=config.cvat.upload_queue,
        write_concurrency=config.cvat.write_concurrency,
    )
    timer = timer or StageTimer()
    copied = decided_elsewhere(plan, shared, pipeline.policy, pipeline.fingerprint, labeling.state)
    source = JobFrameSource(
        labeling.session,
        replace(plan, frames=tuple(frame for frame in plan.frames if frame not in copied)),
        quality=request.quality,
        io_threads=config.cvat.download_threads,
        prefetch_chunks=config.cvat.prefetch_chunks,
        timer=timer,
        downloads=downloads,
        on_last_chunk=then,
        started=started,
    )
    sink = CvatSink(
        labeling.session,
        plan,
        labels,
        settings,
        labeling.state,
        timer,
        upload_pool=pools.upload if pools is not None else None,
    )
    remembering = RememberingSink(sink, shared, plan.task_id)
    try:
        for decision in copied.values():
            remembering.write(decision)
    except BaseException:
        sink.close()
        raise
    stats = run(source, remembering, pipeline, progress=request.progress, timer=timer, pools=pools)
    count(stats, list(copied.values()))
    routing = time.perf_counter()
    changes = _route(labeling, plan, review_items=sink.result.open_issues, wrote=bool(sink.result.writes))
    stats.stages["route"] = time.perf_counter() - routing
    return JobOutcome(plan, stats, sink.result, changes)


def _route(labeling: Labeling, plan: JobPlan, *, review_items: int, wrote: bool) -> dict[str, object]:
    """Route the job once: after any write to it, or when the state has no record of routing it.

    A job that was already routed and got no new writes is left alone, so that a person
    can move it on without a rerun moving it back.
    """
    state = labeling.state
    changes: dict[str, object] = {}
    if wrote or state is None or not state.job_routed(plan.job_id):
        changes = route_job(
            labeling.session, plan.job_id, review_items, labeling.reviewers, labeling.config.review
        )
    if state is not None:
        state.record_job(plan.job_id, plan.task_id, labeling.pipeline.fingerprint, review_items, routed=True)
    return changes
