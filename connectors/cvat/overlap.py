"""Frames that two jobs share (overlapping jobs): scored once, the same decision in each job.

CVAT gives video tasks overlapping jobs by default; each job holds its own annotations
on the shared frames, and the task view merges identical tags there. So a shared frame
is scored on one image, and every job that holds it gets the same decision (its tags, or
its review issue: each job is reviewed on its own). The decision already made elsewhere
wins, looked up in this order:

1. this run: the prediction of the job of the task that was labeled first (`SharedFrames`);
2. the state file: a prediction recorded for another job of the task, under the same
   model, prompts and thresholds (fingerprint);
3. the server: prelabel's tags or open issue on that frame in the other job.

Otherwise the frame is scored in this job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from connectors.cvat.frames import CvatFrameRef
from connectors.cvat.jobs import JobPlan, Neighbour
from prelabel.interface import Decision, Prediction
from prelabel.pipeline.router import RoutingPolicy, route
from prelabel.pipeline.runner import RunStats
from prelabel.state import RunState


@dataclass
class SharedFrames:
    """Per run: the prediction each (task, relative frame) got, in the first job that scored it."""

    predictions: dict[tuple[int, int], Prediction] = field(default_factory=dict)

    def remember(self, task_id: int, prediction: Prediction) -> None:
        ref = prediction.ref
        if not isinstance(ref, CvatFrameRef):
            raise TypeError(f"a CVAT job's prediction carries a CvatFrameRef, not {type(ref).__name__}")
        self.predictions.setdefault((task_id, ref.frame), prediction)


class RememberingSink:
    """A sink that tells `shared` each prediction before passing the decision on."""

    def __init__(self, sink, shared: SharedFrames, task_id: int) -> None:
        self.sink, self.shared, self.task_id = sink, shared, task_id

    def write(self, decision: Decision) -> None:
        self.shared.remember(self.task_id, decision.prediction)
        self.sink.write(decision)

    def close(self) -> None:
        self.sink.close()


def shared_frames(plan: JobPlan) -> set[int]:
    """The planned frames of the job that another job of its task holds too."""
    return {frame for frame in plan.frames if any(frame in neighbour.frames for neighbour in plan.neighbours)}


def decided_elsewhere(
    plan: JobPlan,
    shared: SharedFrames,
    policy: RoutingPolicy,
    fingerprint: str,
    state: RunState | None = None,
) -> dict[int, Decision]:
    """Planned frame -> the decision another job of the task already has for it."""
    common = shared_frames(plan)
    if not common:
        return {}
    recorded: dict[int, Prediction] = {}
    if state is not None:
        for record in state.frames(task_id=plan.task_id):
            if (
                record.task_id == plan.task_id
                and record.job_id != plan.job_id
                and record.frame in common
                and record.fingerprint == fingerprint
            ):
                error = None if record.scores else (record.reason or "").removeprefix("unreadable: ")
                scores = tuple((str(label), float(p)) for label, p in record.scores)
                recorded.setdefault(record.frame, Prediction(None, record.name, scores, error))
    found: dict[int, Decision] = {}
    for frame in sorted(common):
        ref = CvatFrameRef(plan.job_id, frame)
        prediction = shared.predictions.get((plan.task_id, frame)) or recorded.get(frame)
        if prediction is not None:
            found[frame] = route(replace(prediction, ref=ref), policy)
            continue
        for neighbour in plan.neighbours:
            decision = _from_server(neighbour, frame, ref, plan.names.get(frame, f"frame {frame}"))
            if decision is not None:
                found[frame] = decision
                break
    return found


def _from_server(neighbour: Neighbour, frame: int, ref: CvatFrameRef, name: str) -> Decision | None:
    """The decision the other job holds on the server: its accepted tags, or its open issue."""
    if frame not in neighbour.frames:
        return None
    existing = neighbour.existing
    accepted = existing.accepted_tags(frame)
    if accepted:
        tags = tuple((tag.label, tag.confidence) for tag in accepted)
        return Decision(Prediction(ref, name, tags), tags=tags)
    if existing.open_issue(frame) is not None:
        scores = tuple((tag.label, tag.confidence) for tag in existing.suggestions(frame))
        if frame in existing.unreadable_frames:
            reason = f"unreadable in job {neighbour.job_id}"
            prediction = Prediction(ref, name, (), reason)
            return Decision(prediction, reason=f"unreadable: {reason}", code="unreadable")
        return Decision(
            Prediction(ref, name, scores),
            reason=f"sent to review in job {neighbour.job_id}",
            code="overlap",
        )
    return None


def count(stats: RunStats, decisions: list[Decision]) -> None:
    """Add decisions copied from another job to a job's counts."""
    for decision in decisions:
        stats.frames += 1
        if decision.accepted:
            stats.accepted += 1
            stats.per_label.update(label for label, _ in decision.tags)
        else:
            stats.review += 1
            stats.unreadable += decision.prediction.error is not None
