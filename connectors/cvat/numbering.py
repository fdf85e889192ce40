"""How CVAT numbers the frames of a task, a job and a job's chunks.

CVAT 2.73 (see ``tests/assets/cvat-2.73/README.md``, "Video tasks with a frame step..."):

- A task's data is the uploaded media filtered by ``start_frame``, ``stop_frame`` and
  ``frame_filter`` (``step=N``). Frame numbers in tasks, jobs, annotations and issues are
  **relative**: 0 to size - 1, one per frame kept by the filter, whatever the step.
  Relative frame r shows media frame ``start_frame + r * step``.
- ``GET /api/jobs/{id}`` gives the job's relative ``start_frame``/``stop_frame``; every
  relative frame of that range belongs to the job (deleted ones included).
  ``GET /api/jobs/{id}/data/meta`` gives **absolute** media frames instead (with the
  ``frame_filter``), and its ``deleted_frames`` are relative.
- Jobs of one task may overlap (video tasks do by default): a relative frame then
  belongs to two jobs, each of which holds its own annotations on it.
"""

from __future__ import annotations


def frame_step(frame_filter: str | None) -> int:
    """The step of CVAT's frame filter (``step=N``, or empty for 1)."""
    if frame_filter and frame_filter.startswith("step="):
        return max(1, int(frame_filter.removeprefix("step=")))
    return 1


def chunk_position(job_start: int, frame: int, chunk_size: int) -> tuple[int, int]:
    """(chunk index, offset in that chunk) of relative task frame `frame` in a job's chunks.

    Rule: job chunk i (``GET /api/jobs/{id}/data?type=chunk&index=i``) holds the job's
    frames ``job_start + i * chunk_size`` to ``job_start + (i + 1) * chunk_size - 1``, in
    order; all numbers are relative, so the frame step and the task's start frame never
    enter (the chunk holds frames already filtered). Image tasks and video tasks alike.
    """
    if frame < job_start:
        raise ValueError(f"frame {frame} is before the job's first frame {job_start}")
    return divmod(frame - job_start, chunk_size)


def media_frame(frame: int, data_start: int, step: int) -> int:
    """The absolute media frame (a video's frame number) that relative frame `frame` shows."""
    return data_start + frame * step
