"""Ground truth from CVAT: the frames whose labels people gave or confirmed.

A frame of an annotation job counts, with its tags as truth, when:

- a person tagged it (``manual``): its labels are every tag on it;
- its job is at stage ``acceptance`` or in state ``completed`` (``accepted job``): the job's
  tags were accepted as they stand, prelabel's included, except suggestions whose review
  issue is still open;
- a reviewer resolved prelabel's review issue on it (``reviewed``): the tags it kept; none
  left means none of the labels applies;
- a reviewer deleted a tag prelabel had accepted (``reviewed``, from `review sync`): none of
  the labels applies, as far as the reviewer said.

Frames prelabel accepted that nobody looked at are not ground truth: counting them would
grade the model by its own answers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Hashable, Iterator
from dataclasses import replace

from connectors.cvat.existing import JobOnServer, read_job
from connectors.cvat.frames import DEFAULT_QUALITY, CvatFrameRef, JobFrameSource
from connectors.cvat.jobs import JobPlan, _read_target, plan_for
from connectors.cvat.labels import CvatLabel
from connectors.cvat.meta import read_job_meta
from connectors.cvat.session import CvatSession
from prelabel.interface import Example, Frame
from prelabel.state import RunState


class CvatGroundTruth:
    """A `GroundTruthSource` over a CVAT project, task or job."""

    def __init__(
        self,
        session: CvatSession,
        *,
        project_id: int | None = None,
        task_id: int | None = None,
        job_id: int | None = None,
        state: RunState | None = None,
        quality: str = DEFAULT_QUALITY,
    ) -> None:
        self.session = session
        self.quality = quality
        self.where, self.labels, jobs = _read_target(session, project_id, task_id, job_id, with_jobs=True)
        by_id = {label.id: label for label in self.labels}
        deleted_by_us = _deleted_accepted_tags(state)
        host = session.client.api_map.host.rstrip("/")
        self._plans: dict[int, JobPlan] = {}
        self._examples: list[Example] = []
        for job in sorted(jobs, key=lambda job: job.id):
            if job.type != "annotation":
                continue
            plan, truths = _job_truth(session, job, by_id, deleted_by_us.get(job.id, set()))
            self._plans[job.id] = plan
            for frame, (labels, source) in sorted(truths.items()):
                self._examples.append(
                    Example(
                        ref=CvatFrameRef(job.id, frame),
                        key=f"{host}/tasks/{job.task_id}/frames/{frame}",
                        labels=labels,
                        source=source,
                    )
                )

    def examples(self) -> list[Example]:
        return list(self._examples)

    def frames(self, refs: Collection[Hashable]) -> Iterator[Frame]:
        wanted: dict[int, list[int]] = defaultdict(list)
        for ref in refs:
            if not isinstance(ref, CvatFrameRef):
                raise TypeError(f"not a frame of this ground truth: {ref!r}")
            wanted[ref.job_id].append(ref.frame)
        for job_id, frames in sorted(wanted.items()):
            plan = self._plans[job_id]
            source = JobFrameSource(self.session, _with_frames(plan, frames), quality=self.quality)
            yield from source.frames()


def _job_truth(
    session: CvatSession, job, labels: dict[int, CvatLabel], deleted_by_us: set[int]
) -> tuple[JobPlan, dict[int, tuple[tuple[str, ...], str]]]:
    meta = read_job_meta(session, job.id)
    existing = read_job(session, job.id, labels)
    job_frames = range(job.start_frame, job.stop_frame + 1)  # relative: the step never enters
    deleted = set(meta.deleted_frames)
    accepted_job = job.stage == "acceptance" or job.state == "completed"
    truths = {}
    for frame in job_frames:
        if frame in deleted:
            continue
        found = _frame_truth(existing, frame, accepted_job, frame in deleted_by_us)
        if found is not None:
            truths[frame] = found
    plan = plan_for(job, meta, sorted(truths), existing)
    return plan, truths


def _frame_truth(
    existing: JobOnServer, frame: int, accepted_job: bool, tag_deleted: bool
) -> tuple[tuple[str, ...], str] | None:
    humans = existing.human_labels.get(frame, [])
    accepted = [tag.label for tag in existing.accepted_tags(frame)]
    open_issue = existing.open_issue(frame) is not None
    suggested = [] if open_issue else [tag.label for tag in existing.suggestions(frame)]
    labels = tuple(sorted(set(humans + accepted + suggested)))
    if humans:
        return labels, "accepted job" if accepted_job else "manual"
    if accepted_job and labels:
        return labels, "accepted job"
    if existing.reviewed(frame) and not open_issue:
        if frame in existing.unreadable_frames:
            return None
        return labels, "reviewed"
    if tag_deleted and not labels:
        return (), "reviewed"
    return None


def _deleted_accepted_tags(state: RunState | None) -> dict[int, set[int]]:
    """Job -> frames whose accepted prelabel tag a reviewer deleted (per `review sync`)."""
    found: dict[int, set[int]] = defaultdict(set)
    if state is None:
        return found
    for outcome in state.outcomes():
        if outcome.decision == "accept" and outcome.outcome == "deleted":
            found[outcome.job_id].add(outcome.frame)
    return found


def _with_frames(plan: JobPlan, frames: list[int]) -> JobPlan:
    return replace(plan, frames=tuple(sorted(frames)))
