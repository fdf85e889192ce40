"""Pre-labeling CVAT jobs: each job's frames run source -> worker -> router -> sink.

`label_target` is the one composition of that work, used by `prelabel run`, the webhook
service, the queue worker and (through `plan_target`) queue planning: find the jobs that
need labels, check the candidate labels, then label each job and route it to review.
Entry points only gather their inputs (a session, a target, a config, a pipeline maker)
and call it.

Planning streams (`jobs.plan_stream`): jobs are planned on `cvat.write_concurrency` threads,
at most `cvat.plan_ahead` ahead of the labeling, so the first frame reaches the model after
its job is planned, not after every job. The pipeline (the model) is built on a thread of
its own from the moment the first job with frames to label is planned, while that job's
first chunks download. A job the state file saw finished at the `updated_date` the listing
still shows is not read again (the server stays the authority: any change re-reads it).

Jobs share the download, decode and upload threads of the run (`ChunkDownloads`,
`RunPools`), started once and stopped at its end: while one job finishes
(its last chunks, its uploads, its routing), the first chunks of the next
`cvat.prefetch_jobs` jobs are already being built and downloaded, so no job starts cold,
and once the current job's frames have all gone to decoding, the next job's first batch is
decoded (`runner.prime`), so the model goes from one job to the next without waiting.
A job is routed (assignee, stage, state) on a thread of its own while the next job is
labeled, one routing at a time and in job order.

The job is the unit of work. Labeling one job depends only on the job, the config and the
server's state (the local state file is a record), so jobs can be processed in any order,
again after a crash, or on different machines, without writing anything twice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from connectors.cvat.assign import Reviewer, Routing, resolve_reviewers, route_job
from connectors.cvat.frames import DEFAULT_QUALITY, ChunkDownloads, JobFrameSource
from connectors.cvat.jobs import (
    JobPlan,
    Listing,
    Planned,
    Work,
    collect,
    created_date,
    plan_stream,
    read_target,
    updated_date,
)
from connectors.cvat.labels import CvatLabel, check_schema
from connectors.cvat.overlap import RememberingSink, SharedFrames, count, decided_elsewhere, shared_frames
from connectors.cvat.session import CvatSession
from connectors.cvat.sink import CvatSink, JobResult, SinkSettings
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.pipeline.memory import PeriodicRelease
from prelabel.pipeline.runner import Pipeline, RunStats, prime, run
from prelabel.pipeline.stream import RunPools
from prelabel.pipeline.timing import StageTimer
from prelabel.state import RunState

if TYPE_CHECKING:
    from prelabel.interface import Decision
    from prelabel.pipeline.worker import Primed

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
    quality: str = DEFAULT_QUALITY
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
    routing_refused: str | None = None
    """Why CVAT refused to route the job (left as it was), if it did."""


@dataclass(frozen=True)
class TargetOutcome:
    """What `label_target` did, job by job."""

    plan: TargetPlan
    jobs: list[JobOutcome]
    pipeline: Pipeline | None = None
    """The pipeline the jobs were labeled with (None: nothing needed one)."""
    marks: dict[str, float] = field(default_factory=dict)
    """Seconds from the run's start: ``model_ready_at`` (the pipeline was built) and
    ``first_tag_at`` (the server had stored the run's first tag)."""

    @property
    def stats(self) -> RunStats:
        """The jobs' stats added up; the stages include the `marks`."""
        total = RunStats()
        for outcome in self.jobs:
            total.merge(outcome.stats)
        total.stages.update(self.marks)
        return total

    @property
    def tags(self) -> int:
        return sum(len(outcome.result.tags_created) for outcome in self.jobs)

    @property
    def issues(self) -> int:
        return sum(len(outcome.result.issues_created) for outcome in self.jobs)


@dataclass(frozen=True)
class PrimedJob:
    """A job whose first batch is being decoded before its turn (`prelabel.pipeline.runner.prime`)."""

    source: JobFrameSource
    frames: Primed


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


def candidate_names(work: Work | Listing, config: Config, hint: str) -> list[str]:
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


def plan_flags(config: Config, request: LabelRequest) -> str:
    """The planning settings under which a job counts as finished (recorded with it)."""
    return f"include_tagged={int(request.include_tagged)} suggestions={int(config.review.upload_suggestion)}"


def _stream(
    session: CvatSession, listing: Listing, config: Config, request: LabelRequest, state: RunState | None
) -> Iterator[Planned]:
    """The listing's jobs, planned as `label_target` takes them. With a state file, a frame
    where it records prelabel's tags and the server now holds none is left (a person removed
    them: a reviewer's "none of these", never undone, with --relabel too); and without
    relabel, a job it saw finished at the `updated_date` the listing shows is not read."""
    unchanged = None
    if state is not None and not request.relabel:
        seen = state.finished_jobs(plan_flags(config, request))

        def unchanged(job) -> bool:
            return job.id in seen and seen[job.id] == updated_date(job)

    return plan_stream(
        session,
        listing,
        include_tagged=request.include_tagged,
        relabel=request.relabel,
        suggestions=config.review.upload_suggestion,
        limit=request.limit,
        threads=config.cvat.write_concurrency,
        ahead=config.cvat.plan_ahead if request.limit is None else None,
        unchanged=unchanged,
        tagged=(lambda job: state.tagged_frames(job.id, created_date(job))) if state is not None else None,
    )


def plan_target(
    session: CvatSession,
    target: Target,
    config: Config,
    request: LabelRequest | None = None,
    state: RunState | None = None,
) -> TargetPlan:
    """The target's jobs that need labels (read from the server, planned concurrently), with the
    label names checked first; with `state`, as a run with that state file would plan them."""
    request = request or LabelRequest()
    listing = read_target(session, **target)
    names = candidate_names(listing, config, setup_hint(target))
    return TargetPlan(target, collect(listing, _stream(session, listing, config, request, state)), names)


def _replay(work: Work) -> Iterator[Planned]:
    """A planned `Work` as the stream that made it, in job-id order."""
    finished = {plan.job_id for plan in work.finished_jobs}
    items = [Planned(plan.job_id, plan) for plan in work.jobs]
    items += [Planned(plan.job_id, plan, work.skipped_jobs.get(plan.job_id)) for plan in work.finished_jobs]
    items += [Planned(job, None, why) for job, why in work.skipped_jobs.items() if job not in finished]
    return iter(sorted(items, key=lambda item: item.job_id))


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
    listing: Listing | None = None,
    on_job: Callable[[JobOutcome], None] | None = None,
    on_planned: Callable[[Planned], None] | None = None,
    started: float | None = None,
) -> TargetOutcome:
    """Label what the target still needs and route each job; `on_job` hears about each job.

    Jobs are planned as they are labeled (`on_planned` hears of each, in job-id order),
    unless `planned` is given (a `plan_target` result the caller already showed); `listing`
    is the target's `read_target` when the caller already read it (and checked its labels).
    `reviewers` are the resolved `review.reviewers` (resolved here when None). With no job
    to label or route, no pipeline is asked for; otherwise it is built on a thread of its
    own as soon as the first job to label is planned. `started` (`time.perf_counter()`) is
    the run's start for the `marks` (default: now).
    """
    started = time.perf_counter() if started is None else started
    request = request or LabelRequest()
    if planned is not None:
        listing = Listing(planned.work.where, planned.work.labels, [], [])
        names, stream = planned.names, _replay(planned.work)
    else:
        listing = listing or read_target(session, **target)
        names = candidate_names(listing, config, setup_hint(target))
        stream = _stream(session, listing, config, request, state)
    labels = {label.name: label for label in listing.labels}
    plans: list[JobPlan] = []
    finished: list[JobPlan] = []
    skipped: dict[int, str] = {}
    outcomes: list[JobOutcome] = []
    marks: dict[str, float] = {}
    shared = SharedFrames()  # this run's predictions, for the frames overlapping jobs share
    timers: dict[int, StageTimer] = {}
    expected: dict[int, list[int]] = {}
    seen: set[tuple[int, int]] = set()
    pending: deque[JobPlan] = deque()
    primed: dict[int, PrimedJob] = {}
    # With lookahead on, one job more is planned than prefetched: the next job is primed
    # before its turn, and its source asks for the chunks of the jobs after it.
    prefetch_jobs = config.cvat.prefetch_jobs
    lookahead = prefetch_jobs + 1 if prefetch_jobs else 0
    builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prelabel-model")
    building: Future[Pipeline] | None = None
    labeling: Labeling | None = None

    def start_pipeline() -> Future[Pipeline]:
        nonlocal building
        if building is None:

            def build() -> Pipeline:
                pipeline = pipeline_for(names)
                marks["model_ready_at"] = time.perf_counter() - started
                return pipeline

            building = builder.submit(build)
        return building

    def labeling_now() -> Labeling:
        nonlocal labeling, reviewers
        if labeling is None:
            if reviewers is None:
                reviewers = resolve_reviewers(session, config.review.reviewers)
            labeling = Labeling(session, start_pipeline().result(), config, request, reviewers, state)
        return labeling

    def pools_now() -> RunPools:
        """The run's decode and upload threads, started with the first job labeled."""
        nonlocal pools
        if pools is None:
            pools = threads.enter_context(run_pools(labeling_now()))
        return pools

    def finish(outcome: JobOutcome) -> None:
        if outcome.result.first_tag_at is not None:
            first = outcome.result.first_tag_at - started
            marks["first_tag_at"] = min(marks.get("first_tag_at", first), first)
        outcomes.append(outcome)
        if on_job:
            on_job(outcome)

    pools: RunPools | None = None
    release = PeriodicRelease()  # free heap memory back to the OS every few seconds, across jobs
    router = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prelabel-route")
    routing: deque[Future[JobOutcome]] = deque()
    try:
        with (
            ExitStack() as threads,
            ChunkDownloads(
                session, quality=request.quality, threads=config.cvat.download_threads
            ) as downloads,
        ):

            def take() -> bool:
                """Take the next planned job from the stream; False when there is none."""
                item = next(stream, None)
                if item is None:
                    return False
                if on_planned is not None:
                    on_planned(item)
                if item.skipped is not None:
                    skipped[item.job_id] = item.skipped
                if item.finished:
                    finished.append(item.plan)
                elif item.plan is not None and item.skipped is None:
                    plan = item.plan
                    plans.append(plan)
                    pending.append(plan)
                    timers[plan.job_id] = StageTimer()
                    expected[plan.job_id] = [f for f in plan.frames if (plan.task_id, f) not in seen]
                    seen.update((plan.task_id, frame) for frame in plan.frames)
                    if building is None:  # the first job: its chunks download while the model loads
                        start_pipeline()
                        downloads.prefetch(
                            plan, expected[plan.job_id], config.cvat.prefetch_chunks, timers[plan.job_id]
                        )
                return True

            def prefetch(following: list[JobPlan]) -> None:
                """Ask for the first chunks of these jobs (each job's planned frames and timer
                were kept when it was taken, and are dropped only once it is labeled)."""
                for later in following:
                    frames, timer = expected[later.job_id], timers[later.job_id]
                    downloads.prefetch(later, frames, config.cvat.prefetch_chunks, timer)

            def prime_next() -> None:
                """Every frame of the job being labeled went to decoding: start decoding the
                first batch of the next one, unless it shares frames with another job (those
                take the decisions the jobs before it make, not known yet)."""
                if not lookahead or not pending or pending[0].job_id in primed or shared_frames(pending[0]):
                    return
                plan, following = pending[0], list(pending)[1 : 1 + prefetch_jobs]
                with_labels, timer = labeling_now(), timers[plan.job_id]
                source = job_source(with_labels, plan, downloads, timer, then=lambda: prefetch(following))
                frames = prime(source, with_labels.pipeline, pools_now(), timer)
                primed[plan.job_id] = PrimedJob(source, frames)

            more = True
            try:
                while True:
                    while more and len(pending) <= lookahead:
                        more = take()
                    if not pending:
                        break
                    plan = pending.popleft()
                    following = list(pending)[:prefetch_jobs]
                    route = label_job(
                        labeling_now(),
                        plan,
                        labels,
                        shared,
                        downloads=downloads,
                        pools=pools_now(),
                        timer=timers.pop(plan.job_id),
                        then=lambda following=following: prefetch(following),
                        release=release,
                        primed=primed.pop(plan.job_id, None),
                        taken=prime_next,
                    )
                    expected.pop(plan.job_id, None)
                    routing.append(router.submit(route))  # in job order, while the next job is labeled
                    while len(routing) > 1 or (routing and routing[0].done()):
                        finish(routing.popleft().result())
                while routing:
                    finish(routing.popleft().result())
            finally:
                # Also on a failure: the jobs already labeled finish their last writes (on the
                # run's upload threads, which stop when this block ends) and are routed.
                router.shutdown(wait=True)
        if state is not None:  # jobs finished before an interruption may still await their routing
            for plan in finished:
                if not state.job_routed(plan.job_id):
                    _route(labeling_now(), plan, review_items=plan.existing.open_issue_count(), wrote=False)
                elif not request.relabel and plan.updated_date is not None:
                    state.record_finished(plan.job_id, plan.updated_date, plan_flags(config, request))
    finally:
        for unused in primed.values():  # a failed or interrupted run: their downloads stopped with it
            unused.frames.close()
        if hasattr(stream, "close"):
            stream.close()
        builder.shutdown(wait=True, cancel_futures=True)
    work = Work(listing.where, listing.labels, plans, skipped, finished)
    pipeline = labeling.pipeline if labeling is not None else None
    return TargetOutcome(TargetPlan(target, work, names), outcomes, pipeline, marks)


def run_pools(labeling: Labeling) -> RunPools:
    """The decode and upload threads for a run of jobs labeled with `labeling` (to be closed)."""
    from prelabel.pipeline.worker import decode_threads  # torch: loaded with the pipeline by now

    return RunPools(
        decode_workers=decode_threads(labeling.pipeline.options),
        upload_workers=labeling.config.cvat.write_concurrency,
        decode_nice=labeling.pipeline.options.decode_nice,
    )


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
    release: PeriodicRelease | None = None,
    primed: PrimedJob | None = None,
    taken: Callable[[], None] | None = None,
) -> Callable[[], JobOutcome]:
    """Label the planned frames of one job; returns the rest of the job, to be called once,
    which waits for its last writes, routes it (assignee, stage, state) and gives its outcome.

    Accepted frames get tags; the others get a review issue (and a suggestion tag, if
    configured). Only what the job does not hold yet is written. A frame the job shares
    with another job of the task gets the decision already made there (`overlap`); the
    predictions made here are added to `shared` for the jobs labeled after this one.
    `downloads` are the run's shared download threads (with the chunks fetched for this job
    ahead of time), `pools` its shared decode and upload threads (this job's writes are all
    done once its routing has run); `then` is called once every chunk of this job has been
    asked for; `release` is the run's periodic hand-back of free memory (`runner.run`).
    `primed` is this job's source with its first batch decoding already (a job that shares no
    frames: nothing is copied); `taken` is called once every frame of the job went to
    decoding (`runner.run`'s `then`: the moment to prime the next job). The
    stage times include ``wait_job`` (from the job's start, or from its priming, to its first frame),
    ``last_writes`` (the wait for the writes still running when the model was done with the
    job) and ``route``. Those last writes and the routing are returned rather than waited
    for, so that the model can go on with the next job.
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
    if primed is not None:  # it shares no frames, so no decision is copied (`prime_next`)
        copied: dict[int, Decision] = {}
        source = primed.source
    else:
        copied = decided_elsewhere(plan, shared, pipeline.policy, pipeline.fingerprint, labeling.state)
        source = job_source(
            labeling,
            replace(plan, frames=tuple(frame for frame in plan.frames if frame not in copied)),
            downloads,
            timer,
            then=then,
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
    # The sink is left open: its last tags go out now, and the routing thread waits for them
    # while the model goes on with the next job.
    stats = run(
        source,
        remembering,
        pipeline,
        progress=request.progress,
        timer=timer,
        pools=pools,
        release=release,
        close=False,
        primed=primed.frames if primed is not None else None,
        then=taken,
    )
    try:
        sink.send_pending()
    except BaseException:  # an earlier write failed: wait for the others, as `run` would have
        sink.close()
        raise
    count(stats, list(copied.values()))

    def route() -> JobOutcome:
        closing = time.perf_counter()
        remembering.close()  # waits for the job's last writes; re-raises a failed one
        written_at = time.perf_counter()
        stats.stages.update(timer.snapshot())  # with the uploads that ended after the model moved on
        routing = _route(labeling, plan, review_items=sink.result.open_issues, wrote=bool(sink.result.writes))
        stats.stages["last_writes"] = written_at - closing
        stats.stages["route"] = time.perf_counter() - written_at
        return JobOutcome(plan, stats, sink.result, routing.changes, routing.refused)

    return route


def job_source(
    labeling: Labeling,
    plan: JobPlan,
    downloads: ChunkDownloads | None,
    timer: StageTimer,
    *,
    then: Callable[[], None] | None = None,
    started: float | None = None,
) -> JobFrameSource:
    """The planned frames of the job, from `downloads` (the run's) or threads of its own;
    `then` and `started` as `JobFrameSource`'s ``on_last_chunk`` and ``started``."""
    return JobFrameSource(
        labeling.session,
        plan,
        quality=labeling.request.quality,
        io_threads=labeling.config.cvat.download_threads,
        prefetch_chunks=labeling.config.cvat.prefetch_chunks,
        timer=timer,
        downloads=downloads,
        on_last_chunk=then,
        started=started,
    )


def _route(labeling: Labeling, plan: JobPlan, *, review_items: int, wrote: bool) -> Routing:
    """Route the job once: after any write to it, or when the state has no record of routing it.

    A job that was already routed and got no new writes is left alone, so that a person
    can move it on without a rerun moving it back. A job that `--limit` cut short is not
    routed: its outcome is not known yet, and a stage such as acceptance would have the
    next run skip it as finished. A job CVAT refused to route is recorded as not routed. The
    state records the job's `updated_date` after its writes and routing as the moment it was
    seen finished (a job finished when planned: the listing's date, unless routing just
    changed the job), unless `--limit` left frames out or the run relabels.
    """
    state = labeling.state
    routing = Routing({}, None)
    routed = not plan.truncated
    if routed and (wrote or state is None or not state.job_routed(plan.job_id)):
        review = labeling.config.review
        routing = route_job(labeling.session, plan.job_id, review_items, labeling.reviewers, review)
        routed = routing.refused is None
    changes, date = routing.changes, routing.updated_date
    if state is not None:
        finished = not plan.truncated and not labeling.request.relabel
        if not plan.frames:  # finished when planned: as the listing showed it, unless routing changed it
            date = None if changes else plan.updated_date
        elif finished and date is None:
            date = _updated_date(labeling.session, plan.job_id)
        state.record_job(
            plan.job_id,
            plan.task_id,
            labeling.pipeline.fingerprint,
            review_items,
            routed=routed or state.job_routed(plan.job_id),
            finished_at=date if finished else None,
            finished_flags=plan_flags(labeling.config, labeling.request),
            created_at=plan.created_date,
        )
    return routing


def _updated_date(session: CvatSession, job_id: int) -> str | None:
    """The job's `updated_date` now (one request)."""
    job, _ = session.call(
        f"reading job {job_id}", lambda: session.client.api_client.jobs_api.retrieve(job_id)
    )
    return updated_date(job)
