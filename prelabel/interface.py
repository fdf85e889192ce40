"""The contract between the pipeline's stages: what flows, and what a connector provides.

Data flows one way::

    FrameSource.frames() -> Frame -> worker -> Prediction -> router -> Decision -> DecisionSink

A connector (a folder, a CVAT server) supplies a `FrameSource` and a `DecisionSink`;
the pipeline never looks inside a frame's `ref`, which belongs to the connector. For
evaluation and calibration a connector also supplies a `GroundTruthSource`: labeled
`Example`s and their frames.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterator
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True, eq=False)
class Frame:
    """One image to label.

    `data` is the encoded file (JPEG, PNG, ...) or an image the source already decoded
    (video frames). When the source could not read the frame at all, `data` is None and
    `error` says why; such a frame still flows through the pipeline and ends in review.
    """

    ref: Hashable
    """The connector's handle for writing results back (a path, a (job, frame) pair)."""
    name: str
    """A human-readable name, used in reports."""
    data: bytes | Image.Image | None
    error: str | None = None


@dataclass(frozen=True)
class Prediction:
    """The model's scores for one frame.

    `scores` holds the top-k (label, probability) pairs, most likely first. A frame that
    could not be decoded has no scores and an `error` instead.
    """

    ref: Hashable
    name: str
    scores: tuple[tuple[str, float], ...] = ()
    error: str | None = None
    size: tuple[int, int] | None = None
    """(width, height) of the decoded frame, when it could be decoded."""
    fit: float | None = None
    """How well any label fits: the best raw image-text cosine over the labels."""
    background: float | None = None
    """Lead of the best background prompt's cosine over the best label's (above 0: the
    background wins); None when no background prompt is configured."""

    @property
    def top_label(self) -> str | None:
        return self.scores[0][0] if self.scores else None

    @property
    def confidence(self) -> float:
        """The top-1 probability (0 for an unreadable frame)."""
        return self.scores[0][1] if self.scores else 0.0

    @property
    def margin(self) -> float:
        """The gap between the first and second probability (the top-1 alone if one label)."""
        if not self.scores:
            return 0.0
        second = self.scores[1][1] if len(self.scores) > 1 else 0.0
        return self.scores[0][1] - second


@dataclass(frozen=True)
class Decision:
    """What to do with one frame: tag it with `tags`, or send it to review for `reason`."""

    prediction: Prediction
    tags: tuple[tuple[str, float], ...] = ()
    """(label, probability) pairs to write as tags; empty when the frame goes to review."""
    reason: str | None = None
    """Why a human must look; None when the frame is accepted."""
    code: str | None = None
    """The reason as a word: low_confidence, small_margin, no_label, no_fit or unreadable."""

    @property
    def accepted(self) -> bool:
        return self.reason is None


class FrameSource(Protocol):
    """Yields the frames to label, in a stable order."""

    def frames(self) -> Iterator[Frame]: ...

    def __len__(self) -> int:
        """How many frames `frames()` will yield (for progress bars)."""
        ...


class DecisionSink(Protocol):
    """Receives every decision exactly once, then is closed."""

    def write(self, decision: Decision) -> None: ...

    def close(self) -> None:
        """Flush everything; after this returns the results are durable."""
        ...


@dataclass(frozen=True)
class Example:
    """One labeled frame: what it is and where it came from."""

    ref: Hashable
    """The source's handle for fetching the frame."""
    key: str
    """Stable across runs: names the frame in the embedding store and in splits."""
    labels: tuple[str, ...]
    """The true labels; empty when a person said that none of the labels applies."""
    source: str
    """How the truth is known: ``reviewed``, ``accepted job``, ``manual``, ``folder``..."""


class GroundTruthSource(Protocol):
    """Where labeled examples come from."""

    where: str
    """Names the source in messages (``project 3``, ``folder data/``)."""

    def examples(self) -> list[Example]: ...

    def frames(self, refs: Collection[Hashable]) -> Iterator[Frame]:
        """The frames of these examples (any order; each frame's `ref` is its example's)."""
        ...
