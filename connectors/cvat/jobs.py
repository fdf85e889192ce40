"""Selecting work: which jobs of a project, task or job need pre-labels, and which frames.

A job needs pre-labels when it is an annotation job (not ground truth, not a consensus
replica) and some of its frames are neither deleted nor tagged. A frame that carries any
tag, manual or auto, is skipped unless `include_tagged` is set; a human's tag is never
touched either way. Frame numbers are CVAT's relative ones (`numbering`): a job covers
every frame from its `start_frame` to its `stop_frame`, whatever the task's frame step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cvat_sdk.core.helpers import get_paginated_collection

from connectors.cvat.existing import JobOnServer, read_job
from connectors.cvat.labels import CvatLabel, candidate_labels
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
    """``imageset`` (zip chunks of images) or ``video`` (mp4 chunks)."""
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
    neighbours: tuple[Neighbour, ...] = field(default=(), repr=False)
    """The task's other annotation jobs that share frames with this one."""

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
    (jobs are taken in id order).
    """
    where, labels, jobs = _read_target(session, project_id, task_id, job_id, with_jobs=True)
    siblings = jobs
    if job_id is not None and jobs:
        siblings = _task_jobs(session, jobs[0].task_id)
    plans: list[JobPlan] = []
    finished: list[JobPlan] = []
    skipped: dict[int, str] = {}
    budget = limit
    for job in sorted(jobs, key=lambda job: job.id):
        if job.type != "annotation":
            skipped[job.id] = f"a {job.type.replace('_', ' ')} job"
            continue
        if budget is not None and budget <= 0:
            skipped[job.id] = "beyond --limit"
            continue
        plan = _plan_job(
            session,
            job,
            labels,
            include_tagged=include_tagged,
            relabel=relabel,
            suggestions=suggestions,
            budget=budget,
        )
        if not plan.frames:
            skipped[job.id] = "nothing to label (every frame is tagged, queued for review or deleted)"
            finished.append(plan)
            continue
        plans.append(plan)
        if budget is not None:
            budget -= len(plan.frames)
    known = {plan.job_id: plan.existing for plan in [*plans, *finished]}
    plans = [_with_neighbours(session, plan, siblings, known, labels) for plan in plans]
    return Work(where=where, labels=labels, jobs=plans, skipped_jobs=skipped, finished_jobs=finished)


def _task_jobs(session: CvatSession, task_id: int) -> list:
    return session.call(
        f"listing the jobs of task {task_id}",
        lambda: get_paginated_collection(session.client.api_client.jobs_api.list_endpoint, task_id=task_id),
    )


def _with_neighbours(
    session: CvatSession, plan: JobPlan, jobs: list, known: dict[int, JobOnServer], labels: list[CvatLabel]
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
            existing = read_job(session, job.id, {label.id: label for label in labels})
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
    labels = session.call(
        f"reading the labels of {where}",
        lambda: get_paginated_collection(api.labels_api.list_endpoint, **{key: value}),
    )
    jobs = []
    if with_jobs and key == "job_id":
        jobs = [target._model]
    elif with_jobs:
        jobs = session.call(
            f"listing the jobs of {where}",
            lambda: get_paginated_collection(api.jobs_api.list_endpoint, **{key: value}),
        )
    return where, candidate_labels(labels), jobs


def _plan_job(
    session: CvatSession,
    job,
    labels: list[CvatLabel],
    *,
    include_tagged: bool,
    relabel: bool,
    suggestions: bool,
    budget: int | None,
) -> JobPlan:
    meta, _ = session.call(
        f"reading job {job.id}", lambda: session.client.api_client.jobs_api.retrieve_data_meta(job.id)
    )
    existing = read_job(session, job.id, {label.id: label for label in labels})
    job_frames = range(job.start_frame, job.stop_frame + 1)
    deleted = set(meta.deleted_frames or ())
    live = [frame for frame in job_frames if frame not in deleted and not existing.reviewed(frame)]
    human = [frame for frame in live if frame in existing.human_frames]
    if not include_tagged:
        live = [frame for frame in live if frame not in existing.human_frames]
    done = [frame for frame in live if existing.complete(frame, suggestions=suggestions)]
    wanted = live if relabel else [frame for frame in live if frame not in set(done)]
    if budget is not None:
        wanted = wanted[:budget]
    return plan_for(
        job,
        meta,
        wanted,
        existing,
        deleted=len(deleted & set(job_frames)),
        already_tagged=len(human),
        already_done=0 if relabel else len(done),
    )


def plan_for(job, meta, frames: Sequence[int], existing: JobOnServer, **counts: int) -> JobPlan:
    """A `JobPlan` for these task frames of `job`, from the job and its data meta.

    The job gives relative frame numbers, its data meta absolute media frames: only the
    former are used for numbering (the meta's `frames` lists one entry per job frame, or
    one for a whole video).
    """
    step = _step(meta.frame_filter)
    job_frames = range(job.start_frame, job.stop_frame + 1)
    names, sizes = _frame_info(meta, job_frames, job.data_compressed_chunk_type)
    return JobPlan(
        job_id=job.id,
        task_id=job.task_id,
        project_id=job.project_id,
        start_frame=job.start_frame,
        stop_frame=job.stop_frame,
        step=step,
        chunk_size=meta.chunk_size,
        chunk_type=job.data_compressed_chunk_type,
        frames=tuple(frames),
        names=names,
        sizes=sizes,
        existing=existing,
        **counts,
    )


def _frame_info(
    meta, job_frames: Sequence[int], chunk_type: str
) -> tuple[dict[int, str], dict[int, tuple[int, int]]]:
    """Names and sizes by task frame number; a video's frames share its one entry."""
    entries = list(meta.frames)
    if chunk_type == "video" or len(entries) == 1 < len(job_frames):
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
