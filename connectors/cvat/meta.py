"""A job's data meta (chunk size, frame filter, deleted frames, frame names and sizes), cut
from its task's.

CVAT computes a job's data meta from its task's (`JobViewSet.metadata` in
cvat/apps/engine/views.py): the same chunk size and frame filter, the task's deleted frames
that fall in the job (relative numbers, like the job's own), and for an image job the task's
frame entries from the job's `start_frame` to its `stop_frame` (a video has one entry for
the whole video). So one `GET /api/tasks/{id}/data/meta` serves every job of a task, in
place of one `GET /api/jobs/{id}/data/meta` each. An image task with a frame filter is the
exception this does not rely on: its jobs' meta are read one by one.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from connectors.cvat.session import CvatSession

TASKS_KEPT = 4
"""Tasks whose meta are kept at once: a run plans a task's jobs together (job ids are
given out task by task), a few threads ahead."""


class FrameEntry(NamedTuple):
    name: str
    width: int
    height: int


@dataclass(frozen=True)
class JobMeta:
    """What planning needs of a job's data meta."""

    chunk_size: int
    frame_filter: str
    deleted_frames: frozenset[int]
    """The job's deleted frames (relative task frame numbers)."""
    frames: list[FrameEntry]
    """One entry per job frame from `start_frame` to `stop_frame`, or one for a whole video."""


@dataclass(frozen=True)
class _TaskMeta:
    chunk_size: int
    frame_filter: str
    size: int
    deleted_frames: frozenset[int]
    frames: list[FrameEntry]


class TaskMetas:
    """Each job's meta, cut from its task's meta read once (the last `TASKS_KEPT` tasks
    kept); safe to use from several threads."""

    def __init__(self, session: CvatSession, kept: int = TASKS_KEPT) -> None:
        self.session = session
        self.kept = kept
        self._lock = threading.Lock()
        self._reading: dict[int, threading.Lock] = {}
        self._tasks: OrderedDict[int, _TaskMeta] = OrderedDict()

    def of_job(self, job) -> JobMeta:
        """The meta of `job` (a cvat-sdk job): from its task's meta, or read alone when the
        task's cannot be cut (an image task with a frame filter)."""
        task = self._task(job.task_id)
        job_frames = range(job.start_frame, job.stop_frame + 1)
        deleted = frozenset(frame for frame in task.deleted_frames if frame in job_frames)
        if whole_video(job, task.frames):
            return JobMeta(task.chunk_size, task.frame_filter, deleted, task.frames[:1])
        if not task.frame_filter and len(task.frames) == task.size and job.stop_frame < task.size:
            frames = task.frames[job.start_frame : job.stop_frame + 1]
            return JobMeta(task.chunk_size, task.frame_filter, deleted, frames)
        return read_job_meta(self.session, job.id)

    def _task(self, task_id: int) -> _TaskMeta:
        with self._lock:
            if task_id in self._tasks:
                self._tasks.move_to_end(task_id)
                return self._tasks[task_id]
            reading = self._reading.setdefault(task_id, threading.Lock())
        with reading:  # one read per task, whichever thread asks first
            with self._lock:
                if task_id in self._tasks:
                    return self._tasks[task_id]
            api = self.session.client.api_client.tasks_api
            data = _json(self.session, f"reading task {task_id}", api.retrieve_data_meta, task_id)
            meta = _TaskMeta(
                chunk_size=data["chunk_size"],
                frame_filter=data.get("frame_filter") or "",
                size=data["size"],
                deleted_frames=frozenset(data.get("deleted_frames") or ()),
                frames=_entries(data),
            )
            with self._lock:
                self._tasks[task_id] = meta
                self._reading.pop(task_id, None)
                while len(self._tasks) > self.kept:
                    self._tasks.popitem(last=False)
            return meta


def whole_video(job, entries: Sequence[FrameEntry]) -> bool:
    """Whether a meta's frame `entries` stand for a whole video (one entry for every frame of
    `job`, a cvat-sdk job) rather than one entry per frame."""
    frames = job.stop_frame - job.start_frame + 1
    return job.data_compressed_chunk_type == "video" or len(entries) == 1 < frames


def read_job_meta(session: CvatSession, job_id: int) -> JobMeta:
    """A job's own data meta (`GET /api/jobs/{id}/data/meta`)."""
    api = session.client.api_client.jobs_api
    data = _json(session, f"reading job {job_id}", api.retrieve_data_meta, job_id)
    return JobMeta(
        chunk_size=data["chunk_size"],
        frame_filter=data.get("frame_filter") or "",
        deleted_frames=frozenset(data.get("deleted_frames") or ()),
        frames=_entries(data),
    )


def _json(session: CvatSession, doing: str, retrieve: Callable[..., tuple], key: int) -> dict:
    """The answer's JSON, unparsed by cvat-sdk's models (a task's meta can list 100,000 frames)."""
    _, response = session.call(doing, lambda: retrieve(key, _parse_response=False))
    return json.loads(response.data)


def _entries(data: dict) -> list[FrameEntry]:
    return [FrameEntry(entry["name"], entry["width"], entry["height"]) for entry in data.get("frames") or ()]
