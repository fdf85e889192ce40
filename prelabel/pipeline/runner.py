"""The runner: wires source -> worker -> router -> sink, and accounts for every frame.

A `Pipeline` (built by `prelabel.assemble.build_pipeline`) holds the loaded model and text
classifier; `run` can be called for any number of sources (a folder, each CVAT job) with
the same pipeline. Importing this module does not import torch or open_clip (the worker
does, when `run` first needs it), so that a CVAT run logs in and plans while they load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from tqdm import tqdm

from prelabel.interface import DecisionSink, FrameSource
from prelabel.pipeline.memory import PeriodicRelease
from prelabel.pipeline.priors import hub_warnings, predicted_shares
from prelabel.pipeline.router import RoutingPolicy, route
from prelabel.pipeline.stream import RunPools
from prelabel.pipeline.timing import StageTimer

if TYPE_CHECKING:  # torch and open_clip take seconds to import: a run logs in and plans meanwhile
    import torch

    from prelabel.interface import Frame
    from prelabel.pipeline.classifier import TextClassifier
    from prelabel.pipeline.model import LoadedModel
    from prelabel.pipeline.worker import Primed, WorkerOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pipeline:
    """Everything needed to label frames: model, classifier, routing and worker options."""

    loaded: LoadedModel
    classifier: TextClassifier
    policy: RoutingPolicy
    options: WorkerOptions
    calibrated: str | None = None
    """The calibration file applied, if any."""
    label_shares: dict[str, float] | None = None
    """Each label's expected share (from the calibration's ground truth; None: uniform)."""

    def images_only(self) -> Pipeline:
        """This pipeline on its model without the text tower (`LoadedModel.images_only`): for a
        process that labels with this pipeline and builds no other classifier. Scores, the
        fingerprint and the model identity are unchanged."""
        return replace(self, loaded=self.loaded.images_only())

    @property
    def fingerprint(self) -> str:
        """Of everything that decides a frame's outcome: model, prompts, calibration and thresholds."""
        cache = self.classifier.cache
        payload = json.dumps(
            [
                self.classifier.fingerprint,
                asdict(self.policy),
                self.classifier.temperature,
                len(cache) if cache is not None else 0,
                _floats(self.classifier.background),
                _floats(self.classifier.prior_shift),
            ],
            ensure_ascii=False,
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _floats(tensor: torch.Tensor | None) -> list[float] | None:
    """A tensor's values for the fingerprint (rounded; the first 4096)."""
    return None if tensor is None else [round(float(v), 6) for v in tensor.flatten()[:4096].tolist()]


@dataclass
class RunStats:
    """What happened to the frames of one run (or of several, once merged)."""

    frames: int = 0
    accepted: int = 0
    review: int = 0
    unreadable: int = 0
    no_fit: int = 0
    """Review frames that no label fits."""
    per_label: Counter[str] = field(default_factory=Counter)
    predicted: Counter[str] = field(default_factory=Counter)
    """Top-1 label of every scored frame, accepted or not."""
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: RunStats) -> None:
        """Add another run's counts and times to this one."""
        self.frames += other.frames
        self.accepted += other.accepted
        self.review += other.review
        self.unreadable += other.unreadable
        self.no_fit += other.no_fit
        self.per_label.update(other.per_label)
        self.predicted.update(other.predicted)
        self.seconds += other.seconds
        for name, seconds in other.stages.items():
            self.stages[name] = self.stages.get(name, 0.0) + seconds


def run(
    source: FrameSource,
    sink: DecisionSink,
    pipeline: Pipeline,
    *,
    progress: bool = True,
    timer: StageTimer | None = None,
    pools: RunPools | None = None,
    release: PeriodicRelease | None = None,
    close: bool = True,
    primed: Primed | None = None,
    then: Callable[[], None] | None = None,
) -> RunStats:
    """Label every frame of `source`; every decision reaches `sink` exactly once.

    The sink is closed at the end, also when the run fails part-way, so that what was
    decided so far is kept. With ``close=False`` a run that completes leaves the sink open
    for the caller to close (e.g. on another thread, so that the model need not wait for
    the last writes); a run that fails still closes it here. Frames are decoded on
    `pools.decode` (the threads of a run of several sources), else on threads started and
    stopped here. Free heap memory goes back to the OS every few seconds, so that a long
    run stays flat: through `release` (the one of a run of several sources, whose clock goes
    on from source to source), else through a `PeriodicRelease` of this call's own.

    `primed` is `prime` of `source` (on `pools`): its first batch is being decoded already.
    `then` is called, on this thread, once every frame of `source` has been taken for
    decoding: the moment to prime the next source, while the model finishes this one.
    """
    from prelabel.pipeline.worker import predict  # torch: imported once a model is needed

    timer = timer or StageTimer()
    stats = RunStats()
    release = release or PeriodicRelease()
    start = time.perf_counter()
    bar = tqdm(total=len(source), unit="img", disable=not progress, leave=False)
    completed = False
    frames: Iterable[Frame] | Primed = primed if primed is not None else source.frames()
    if then is not None:
        frames = _followed_by(frames, then)
    try:
        for prediction in predict(
            frames,
            pipeline.loaded,
            pipeline.classifier,
            pipeline.options,
            timer,
            decode_pool=pools.decode if pools is not None else None,
        ):
            decision = route(prediction, pipeline.policy)
            with timer.stage("sink"):
                sink.write(decision)
            stats.frames += 1
            if prediction.top_label is not None:
                stats.predicted[prediction.top_label] += 1
            if decision.accepted:
                stats.accepted += 1
                stats.per_label.update(label for label, _ in decision.tags)
            else:
                stats.review += 1
                stats.unreadable += prediction.error is not None
                stats.no_fit += decision.code == "no_fit"
            bar.update()
            release()
        completed = True
    finally:
        bar.close()
        if close or not completed:
            with timer.stage("sink"):
                sink.close()
    stats.seconds = time.perf_counter() - start
    stats.stages = timer.snapshot()
    return stats


def prime(source: FrameSource, pipeline: Pipeline, pools: RunPools, timer: StageTimer) -> Primed:
    """Start decoding the first batch of `source` on `pools` (`worker.prime`), to be passed
    to `run` as its `primed` when the source's turn comes; `Primed.close` drops it unused."""
    from prelabel.pipeline.worker import prime as prime_frames

    return prime_frames(
        source.frames(),
        pipeline.loaded,
        pipeline.options,
        timer,
        prime_pool=pools.prime,
        decode_pool=pools.decode,
    )


def _followed_by(frames: Iterable[Frame] | Primed, then: Callable[[], None]) -> Iterable[Frame] | Primed:
    """`frames` (or the rest of primed frames), calling `then` once the last one was taken."""
    from prelabel.pipeline.worker import Primed

    def followed(items: Iterable[Frame]) -> Iterator[Frame]:
        yield from items
        then()

    if isinstance(frames, Primed):
        return replace(frames, rest=followed(frames.rest))
    return followed(frames)


def format_summary(
    stats: RunStats,
    *,
    title: str = "done",
    labels: Sequence[str] = (),
    expected: dict[str, float] | None = None,
) -> str:
    """A few human-readable lines: counts, per-label counts, each label's predicted share
    beside its expected share (`expected`, else uniform over `labels`) with a warning for a
    label that takes more than twice its share, speed and stage times."""
    detail = ", ".join(
        f"{name}: {count}"
        for name, count in (("unreadable", stats.unreadable), ("no label fits", stats.no_fit))
        if count
    )
    lines = [
        f"{title}: {stats.frames} images in {stats.seconds:.1f}s ({stats.images_per_second:.1f} images/s)",
        f"  accepted: {stats.accepted}   for review: {stats.review}" + (f" ({detail})" if detail else ""),
    ]
    if stats.per_label:
        per_label = ", ".join(f"{label} {count}" for label, count in stats.per_label.most_common())
        lines.append(f"  per label: {per_label}")
    names = list(labels) or sorted(stats.predicted)
    if stats.predicted and names:
        shares = predicted_shares(stats.predicted, names)
        want = expected or {name: 1.0 / len(names) for name in names}
        listed = ", ".join(f"{name} {shares[name]:.0%} ({want.get(name, 0.0):.0%})" for name in names)
        lines.append(f"  predicted share (expected): {listed}")
        lines += [f"  warning: {text}" for text in hub_warnings(stats.predicted, want, names)]
    if stats.stages:
        stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in sorted(stats.stages.items()))
        lines.append(f"  time per stage: {stages}")
    return "\n".join(lines)
