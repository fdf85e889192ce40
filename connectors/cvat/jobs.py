"""Selecting work: which jobs of a project, task or job need pre-labels, and which frames.

Planning streams: `read_target` reads the target, its labels and its job listing, then
`plan_stream` plans the jobs on a few threads, a bounded number ahead of whoever consumes
them, and hands them out in job-id order (`find_work` collects them all). A job the caller
knows to be unchanged since prelabel finished it (`unchanged`) is not read at all.

A job needs pre-labels when it is an annotation job (not ground truth, not a consensus
replica, not the parent of consensus replicas) that is not finished (stage acceptance or
state completed), and some of its frames are neither deleted nor tagged. A frame that
carries any tag, manual or auto, is skipped unless `include_tagged` is set; a human's tag
is never touched either way. So is a frame whose tags from prelabel a person removed, when
the caller knows prelabel wrote them (`Tagged`, from the state file). Frame numbers are
CVAT's relative ones (`numbering`): a job covers every frame from its `start_frame` to its
`stop_frame`, whatever the task's frame step.
A 3D target (point clouds) is refused before anything is read of it but itself.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from connectors.cvat.errors import CvatError
from connectors.cvat.existing import JobOnServer, TaskIssues, read_job
from connectors.cvat.labels import CvatLabel, candidate_labels, text_value
from connectors.cvat.meta import JobMeta, TaskMetas, read_job_meta, whole_video
from connectors.cvat.numbering import frame_step
from connectors.cvat.session import CvatSession


@dataclass(frozen=True)
class Neighbour:
    """Another annotation job of the same task that shares frames with a job (overlapping jobs)."""

    job_id: int
    frames: range
    """Its relative task frames."""
    existing: JobOnServer = field(repr=False)
    """What it held when the work was planned."""


@dataclass(frozen=True)
class JobPlan:
    """One job's work: the (relative) task frame numbers to label, and how to fetch them."""

    job_id: int
    task_id: int
    project_id: int | None
    start_frame: int
    stop_frame: int
    step: int
    """The task's frame step: media frames between two task frames (never needed to find a frame)."""
    chunk_size: int
    chunk_type: str
    """``imageset`` (zip chunks of images) or ``video`` (mp4 chunks): the compressed chunks'."""
    original_chunk_type: str
    """The same for the original-quality chunks (a video task with zip chunks has both kinds)."""
    frames: tuple[int, ...]
    """Task frame numbers to label, ascending."""
    names: dict[int, str] = field(repr=False)
    sizes: dict[int, tuple[int, int]] = field(repr=False)
    existing: JobOnServer = field(default_factory=JobOnServer, repr=False)
    """What the job already holds: prelabel's tags and issues, and the human-tagged frames."""
    deleted: int = 0
    already_tagged: int = 0
    """Frames skipped because a person tagged them."""
    already_done: int = 0
    """Frames skipped because prelabel already tagged them or queued them for review."""
    removed: int = 0
    """Frames skipped because a person removed the tags prelabel wrote there (see `Tagged`)."""
    neighbours: tuple[Neighbour, ...] = field(default=(), repr=False)
    """The task's other annotation jobs that share frames with this one."""
    updated_date: str | None = field(default=None, repr=False)
    """The job's `updated_date` in the listing the plan was made from (ISO 8601)."""
    created_date: str | None = field(default=None, repr=False)
    """The job's `created_date` (ISO 8601): with its id, it names the job on its server."""
    truncated: bool = False
    """`--limit` left some of the job's frames out."""

    def chunk_type_of(self, quality: str) -> str:
        """The type of this job's chunks of `quality` (``original`` or ``compressed``)."""
        return self.original_chunk_type if quality == "original" else self.chunk_type

    @property
    def job_frames(self) -> range:
        """Every relative task frame this job covers (deleted ones included)."""
        return range(self.start_frame, self.stop_frame + 1)


@dataclass(frozen=True)
class Work:
    """What a run will do: the labels to choose from and the jobs, in id order."""

    where: str
    """``project 3``, ``task 7`` or ``job 12``: names the target in messages."""
    labels: list[CvatLabel]
    jobs: list[JobPlan]
    skipped_jobs: dict[int, str]
    """Job id -> why it is not worked on (its type, or nothing left to label)."""
    finished_jobs: list[JobPlan] = field(default_factory=list)
    """Annotation jobs with nothing left to label (their routing may still be due)."""

    @property
    def frame_count(self) -> int:
        return sum(len(job.frames) for job in self.jobs)


@dataclass(frozen=True)
class Listing:
    """A target as its listing shows it: name, candidate labels and jobs (by id)."""

    where: str
    labels: list[CvatLabel]
    jobs: list
    """The target's jobs (cvat-sdk `JobRead`), in id order."""
    siblings: list
    """The jobs whose frames may overlap the target's: its task's jobs, for a job target."""


@dataclass(frozen=True)
class Planned:
    """One job of a target as planning found it."""

    job_id: int
    plan: JobPlan | None
    """Its plan (no frames: finished); None when the job was not read."""
    skipped: str | None = None
    """Why it is not labeled; None when it has frames to label."""

    @property
    def finished(self) -> bool:
        """An annotation job that was read and has nothing left to label."""
        return self.plan is not None and not self.plan.frames


NOTHING_LEFT = (
    "nothing to label (every frame is tagged, queued for review or deleted, or a person removed its tag)"
)
UNCHANGED = "nothing to label (unchanged since prelabel finished it)"

Unchanged = Callable[[object], bool]
"""Whether a listed job (`JobRead`) is known finished and unchanged since: it is not read."""

Tagged = Callable[[object], frozenset[int]]
"""A listed job's (`JobRead`) frames where prelabel's tags were written before (the state
file's record of the job of that number and `created_date`)."""


def updated_date(job) -> str | None:
    """A job's `updated_date` as ISO 8601 text (None when the server gave none)."""
    return _date(job, "updated_date")


def created_date(job) -> str | None:
    """A job's `created_date` as ISO 8601 text (None when the server gave none)."""
    return _date(job, "created_date")


def _date(job, name: str) -> str | None:
    value = getattr(job, name, None)
    return value.isoformat() if value is not None and hasattr(value, "isoformat") else value


def find_work(
    session: CvatSession,
    *,
    project_id: int | None = None,
    task_id: int | None = None,
    job_id: int | None = None,
    include_tagged: bool = False,
    relabel: bool = False,
    suggestions: bool = True,
    limit: int | None = None,
) -> Work:
    """Read the target's labels and jobs, and plan each job that needs pre-labels.

    A frame is planned unless it is deleted, a person tagged it (see `include_tagged`), a
    reviewer resolved prelabel's issue on it, or prelabel already finished it (see
    `relabel`). A frame prelabel left half-done (a tag without its issue, say) is planned,
    and only its missing pieces will be written. `limit` caps the total number of frames
    (jobs are taken in id order). Jobs are planned concurrently (see `plan_stream`).
    """
    listing = read_target(session, project_id=project_id, task_id=task_id, job_id=job_id)
    stream = plan_stream(
        session,
        listing,
        include_tagged=include_tagged,
        relabel=relabel,
        suggestions=suggestions,
        limit=limit,
    )
    return collect(listing, stream)


def collect(listing: Listing, stream: Iterator[Planned]) -> Work:
    """The whole `Work` of a plan stream."""
    plans: list[JobPlan] = []
    finished: list[JobPlan] = []
    skipped: dict[int, str] = {}
    for item in stream:
        if item.skipped is not None:
            skipped[item.job_id] = item.skipped
        if item.finished:
            finished.append(item.plan)
        elif item.plan is not None and item.skipped is None:
            plans.append(item.plan)
    return Work(
        where=listing.where, labels=listing.labels, jobs=plans, skipped_jobs=skipped, finished_jobs=finished
    )


def read_target(
    session: CvatSession,
    *,
    project_id: int | None = None,
    task_id: int | None = None,
    job_id: int | None = None,
) -> Listing:
    """The target's name, candidate labels and job listing (read once, largest pages)."""
    where, labels, jobs = _read_target(session, project_id, task_id, job_id, with_jobs=True)
    jobs = sorted(jobs, key=lambda job: job.id)
    siblings = jobs
    if job_id is not None and jobs:
        siblings = _task_jobs(session, jobs[0].task_id)
    return Listing(where, labels, jobs, siblings)


def plan_stream(
    session: CvatSession,
    listing: Listing,
    *,
    include_tagged: bool = False,
    relabel: bool = False,
    suggestions: bool = True,
    limit: int | None = None,
    threads: int = 4,
    ahead: int | None = None,
    unchanged: Unchanged | None = None,
    tagged: Tagged | None = None,
) -> Iterator[Planned]:
    """Every job of the listing, planned, in job-id order: read on `threads` threads, at most
    `ahead` jobs (default: twice `threads`) read before the consumer takes them.

    The `limit` budget is spent in order as jobs are taken (a job that exceeds it is
    truncated, the ones after it are not read). Each plan with frames carries its
    overlapping neighbours: the jobs taken before it, or read now (never a job skipped
    as `unchanged`: its state was not read). A frame where `tagged` records prelabel's tags
    but the server holds none of prelabel's or a person's is not planned: a person removed
    them. Closing the iterator stops the planning.
    """
    labels = {label.id: label for label in listing.labels}
    budget = limit
    known: dict[int, JobOnServer] = {}
    """The taken jobs of the current task: their `existing`, for their neighbours."""
    known_task: int | None = None
    jobs = listing.jobs
    if budget is not None and budget <= 0:
        yield from (Planned(job.id, None, _skip_reason(job) or "beyond --limit") for job in jobs)
        return
    if budget is not None:
        ahead = 1 if ahead is None else ahead  # never read much beyond the budget
    planned = _planned_ahead(
        session,
        jobs,
        labels,
        include_tagged=include_tagged,
        relabel=relabel,
        suggestions=suggestions,
        threads=threads,
        ahead=ahead if ahead is not None else 2 * threads,
        unchanged=unchanged,
        tagged=tagged,
    )
    taken = 0
    try:
        for item in planned:
            taken += 1
            plan = item.plan
            if plan is None:
                yield item
                continue
            if plan.task_id != known_task:
                known, known_task = {}, plan.task_id
            known[plan.job_id] = plan.existing
            if not plan.frames:
                yield replace(item, skipped=NOTHING_LEFT)
                continue
            if budget is not None:
                if len(plan.frames) > budget:
                    plan = replace(plan, frames=plan.frames[:budget], truncated=True)
                budget -= len(plan.frames)
            yield Planned(plan.job_id, _with_neighbours(session, plan, listing.siblings, known, labels))
            if budget is not None and budget <= 0:
                break
    finally:
        planned.close()
    for job in jobs[taken:]:  # after the budget ran out: not read
        yield Planned(job.id, None, _skip_reason(job) or "beyond --limit")


def _skip_reason(job) -> str | None:
    """Why a job is never labeled, or None: only annotation jobs that are not finished (stage
    acceptance or state completed, as `review sync` reads them) are labeled, whoever finished
    them (reviewers, or prelabel's routing configured so).

    Nor is the parent job of consensus replicas. Its annotators work in the replicas, and
    CVAT's consensus merge clears the parent's annotations before writing the merged ones,
    and merges only into a parent still at stage annotation, from which prelabel's routing
    may move it.
    """
    if job.type != "annotation":
        return f"a {job.type.replace('_', ' ')} job"
    stage, state = text_value(job.stage), text_value(job.state)
    if stage == "acceptance" or state == "completed":
        return f"finished (stage {stage}, state {state}): left as it is"
    replicas = getattr(job, "replicas_count", None) or 0
    if replicas:
        return (
            f"its annotators work in its {replicas} consensus replica jobs, and CVAT's merge "
            "of them replaces its annotations: left as it is"
        )
    return None


def _planned_ahead(
    session: CvatSession,
    jobs: list,
    labels: dict[int, CvatLabel],
    *,
    include_tagged: bool,
    relabel: bool,
    suggestions: bool,
    threads: int,
    ahead: int,
    unchanged: Unchanged | None,
    tagged: Tagged | None,
) -> Iterator[Planned]:
    """Each job's `Planned` (no budget, no neighbours), in order, read on a bounded thread pool."""
    # A task's meta and issues are read whole only for a task several jobs of this run share:
    # a single job's own are smaller (a task of 100,000 frames lists every one in its meta).
    per_task = Counter(job.task_id for job in jobs if _skip_reason(job) is None)
    issues, metas = TaskIssues(session), TaskMetas(session)

    def plan(job) -> Planned:
        shared = per_task[job.task_id] > 1
        return Planned(
            job.id,
            _plan_job(
                session,
                job,
                labels,
                include_tagged=include_tagged,
                relabel=relabel,
                suggestions=suggestions,
                tagged=tagged(job) if tagged is not None else frozenset(),
                issues=issues if shared else None,
                metas=metas if shared else None,
            ),
        )

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="prelabel-plan")
    window: deque[Planned | Future[Planned]] = deque()
    reading = 0
    remaining = iter(jobs)

    def fill() -> None:
        nonlocal reading
        while reading < max(1, ahead):
            job = next(remaining, None)
            if job is None:
                return
            why = _skip_reason(job)
            if why is None and not relabel and unchanged is not None and unchanged(job):
                why = UNCHANGED
            if why is not None:
                window.append(Planned(job.id, None, why))
            else:
                window.append(pool.submit(plan, job))
                reading += 1

    try:
        fill()
        while window:
            item = window.popleft()
            if isinstance(item, Future):
                reading -= 1
                fill()
                item = item.result()
            else:
                fill()
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _task_jobs(session: CvatSession, task_id: int) -> list:
    api = session.client.api_client
    doing = f"listing the jobs of task {task_id}"
    return session.list_all(doing, api.jobs_api.list_endpoint, task_id=task_id)


def _with_neighbours(
    session: CvatSession,
    plan: JobPlan,
    jobs: list,
    known: dict[int, JobOnServer],
    labels: dict[int, CvatLabel],
) -> JobPlan:
    """The plan with the task's other annotation jobs that share its frames (read if not yet)."""
    found = []
    for job in sorted(jobs, key=lambda job: job.id):
        if job.id == plan.job_id or job.type != "annotation" or job.task_id != plan.task_id:
            continue
        if job.stop_frame < plan.start_frame or job.start_frame > plan.stop_frame:
            continue
        existing = known.get(job.id)
        if existing is None:
            existing = read_job(session, job.id, labels)
        found.append(Neighbour(job.id, range(job.start_frame, job.stop_frame + 1), existing))
    return replace(plan, neighbours=tuple(found)) if found else plan


def find_labels(
    session: CvatSession,
    *,
    project_id: int | None = None,
    task_id: int | None = None,
    job_id: int | None = None,
) -> tuple[str, list[CvatLabel]]:
    """The target's name for messages (``project 3``) and its candidate labels."""
    where, labels, _ = _read_target(session, project_id, task_id, job_id, with_jobs=False)
    return where, labels


def _read_target(
    session: CvatSession, project_id: int | None, task_id: int | None, job_id: int | None, *, with_jobs: bool
) -> tuple[str, list[CvatLabel], list]:
    if sum(value is not None for value in (project_id, task_id, job_id)) != 1:
        raise ValueError("exactly one of project_id, task_id and job_id")
    api = session.client.api_client
    if project_id is not None:
        where, key, value = f"project {project_id}", "project_id", project_id
        retrieve = session.client.projects.retrieve
    elif task_id is not None:
        where, key, value = f"task {task_id}", "task_id", task_id
        retrieve = session.client.tasks.retrieve
    else:
        where, key, value = f"job {job_id}", "job_id", job_id
        retrieve = session.client.jobs.retrieve
    target = session.call(f"reading {where}", lambda: retrieve(value))
    if getattr(target, "dimension", None) == "3d":  # a project's tasks are all 2D or all 3D
        raise CvatError(f"{where} holds 3D point clouds; prelabel tags 2D images and video frames only")
    labels = session.list_all(f"reading the labels of {where}", api.labels_api.list_endpoint, **{key: value})
    jobs = []
    if with_jobs and key == "job_id":
        jobs = [target._model]
    elif with_jobs:
        jobs = session.list_all(f"listing the jobs of {where}", api.jobs_api.list_endpoint, **{key: value})
    return where, candidate_labels(labels), jobs


def _plan_job(
    session: CvatSession,
    job,
    labels: dict[int, CvatLabel],
    *,
    include_tagged: bool,
    relabel: bool,
    suggestions: bool,
    tagged: frozenset[int] = frozenset(),
    issues: TaskIssues | None = None,
    metas: TaskMetas | None = None,
) -> JobPlan:
    meta = metas.of_job(job) if metas is not None else read_job_meta(session, job.id)
    found = issues.of_job(job.task_id, job.id) if issues is not None else None
    existing = read_job(session, job.id, labels, found)
    job_frames = range(job.start_frame, job.stop_frame + 1)
    deleted = set(meta.deleted_frames)
    removed = {frame for frame in tagged if frame in job_frames and not existing.tags.get(frame)}
    removed -= existing.human_frames | deleted
    live = [
        frame
        for frame in job_frames
        if frame not in deleted and frame not in removed and not existing.reviewed(frame)
    ]
    human = [frame for frame in live if frame in existing.human_frames]
    if not include_tagged:
        live = [frame for frame in live if frame not in existing.human_frames]
    done = [frame for frame in live if existing.complete(frame, suggestions=suggestions)]
    wanted = live if relabel else [frame for frame in live if frame not in set(done)]
    return plan_for(
        job,
        meta,
        wanted,
        existing,
        deleted=len(deleted & set(job_frames)),
        already_tagged=len(human),
        already_done=0 if relabel else len(done),
        removed=len(removed),
    )


def plan_for(job, meta: JobMeta, frames: Sequence[int], existing: JobOnServer, **counts: int) -> JobPlan:
    """A `JobPlan` for these task frames of `job`, from the job and its data meta.

    The job gives relative frame numbers, which are the only ones used for numbering (the
    meta's `frames` lists one entry per job frame, or one for a whole video).
    """
    step = _step(meta.frame_filter)
    job_frames = range(job.start_frame, job.stop_frame + 1)
    names, sizes = _frame_info(meta, job_frames, whole_video(job, meta.frames))
    return JobPlan(
        job_id=job.id,
        task_id=job.task_id,
        project_id=job.project_id,
        start_frame=job.start_frame,
        stop_frame=job.stop_frame,
        step=step,
        chunk_size=meta.chunk_size,
        chunk_type=job.data_compressed_chunk_type,
        original_chunk_type=getattr(job, "data_original_chunk_type", None) or job.data_compressed_chunk_type,
        frames=tuple(frames),
        names=names,
        sizes=sizes,
        existing=existing,
        updated_date=updated_date(job),
        created_date=created_date(job),
        **counts,
    )


def _frame_info(
    meta: JobMeta, job_frames: Sequence[int], video: bool
) -> tuple[dict[int, str], dict[int, tuple[int, int]]]:
    """Names and sizes by task frame number; a video's frames share its one entry."""
    entries = meta.frames
    if video:
        entry = entries[0]
        return (
            {frame: f"{entry.name}#{frame}" for frame in job_frames},
            {frame: (entry.width, entry.height) for frame in job_frames},
        )
    names, sizes = {}, {}
    for frame, entry in zip(job_frames, entries, strict=False):
        names[frame] = entry.name
        sizes[frame] = (entry.width, entry.height)
    return names, sizes


def _step(frame_filter: str | None) -> int:
    """CVAT's frame filter is ``step=N`` or empty."""
    return frame_step(frame_filter)
