"""How many frames go to review in a benchmark run: all accepted, a share, or all to review.

A frame goes to review when its top-1 probability is below ``--accept-threshold`` (the margin
is left at 0). To send a given share, the benchmark scores the frames once in its own process
exactly as the CLI will see them (the uploaded files, which its default original-quality
chunks hold, through prelabel's own `predict` with the same seeded random weights and
classifier), and puts the
threshold between the two top-1 probabilities at that share. Float differences between batch
sizes can move a frame that sits right at the threshold, so the share reached is measured
from the CLI's own report and printed next to the case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prelabel.interface import Frame as PrelabelFrame
from prelabel.pipeline.runner import Pipeline
from prelabel.pipeline.worker import predict
from tests.cvat_server.media import Frame


@dataclass(frozen=True)
class Case:
    """A routing case: its name and the share of frames meant to go to review."""

    name: str
    review_share: float


CASES: tuple[Case, ...] = (Case("accepted", 0.0), Case("review-30%", 0.3), Case("review-all", 1.0))
"""The cases `make bench` measures; the issue's targets use "accepted" and "review-30%"."""


def case_by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise ValueError(f"unknown case {name!r}; known: {', '.join(c.name for c in CASES)}")


def routing_flags(threshold: float) -> tuple[str, ...]:
    """``prelabel run`` flags that route by the top-1 probability alone."""
    return ("--accept-threshold", repr(threshold), "--min-margin", "0")


def threshold_for(case: Case, top1: Sequence[float]) -> float:
    """An accept threshold that sends `case.review_share` of frames with these top-1 values to review."""
    if case.review_share <= 0:
        return 0.0
    if case.review_share >= 1:
        return 1.0  # a top-1 probability of random weights never reaches 1
    ranked = sorted(top1)
    below = round(case.review_share * len(ranked))
    if below == 0:
        return 0.0
    if below >= len(ranked):
        return 1.0
    return (ranked[below - 1] + ranked[below]) / 2


def top1_probabilities(frames: Sequence[Frame], pipeline: Pipeline) -> list[float]:
    """The top-1 probability of each frame as served in an original-quality chunk."""
    served = (PrelabelFrame(frame.name, frame.name, frame.data) for frame in frames)
    return [p.scores[0][1] for p in predict(served, pipeline.loaded, pipeline.classifier, pipeline.options)]
