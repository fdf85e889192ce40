"""The runner: wires source -> worker -> router -> sink, and accounts for every frame.

`build_pipeline` loads the model and text classifier once; `run` can then be called for
any number of sources (a folder, each CVAT job) with the same pipeline.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from prelabel.classifier import TextClassifier, build_classifier, label_prompts
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.interface import DecisionSink, FrameSource
from prelabel.model import LoadedModel, load_model
from prelabel.router import RoutingPolicy, route
from prelabel.timing import StageTimer
from prelabel.worker import WorkerOptions, predict

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "prelabel"


@dataclass(frozen=True)
class Pipeline:
    """Everything needed to label frames: model, classifier, routing and worker options."""

    loaded: LoadedModel
    classifier: TextClassifier
    policy: RoutingPolicy
    options: WorkerOptions

    @property
    def fingerprint(self) -> str:
        """Of everything that decides a frame's outcome: model, prompts and thresholds."""
        payload = json.dumps([self.classifier.fingerprint, repr(self.policy)], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_pipeline(config: Config, labels: Sequence[str], loaded: LoadedModel | None = None) -> Pipeline:
    """Load the configured model (unless `loaded` is given) and build the classifier for `labels`."""
    if not labels:
        raise ConfigError("no labels: give --labels a,b,c or list them under 'labels' in the config")
    loaded = loaded or load_model(config.model)
    cache_dir = Path(config.model.cache_dir) if config.model.cache_dir else DEFAULT_CACHE_DIR
    classifier = build_classifier(loaded, label_prompts(labels, config), cache_dir)
    default_batch = 128 if loaded.device.type == "cuda" else 32
    options = WorkerOptions(
        batch_size=config.model.batch_size or default_batch,
        top_k=len(labels) if config.routing.multi_label else config.routing.top_k,
        draft=config.decode.draft,
        decode_workers=config.decode.workers,
        prefetch_batches=config.decode.prefetch_batches,
    )
    return Pipeline(loaded, classifier, RoutingPolicy.from_config(config), options)


@dataclass
class RunStats:
    """What happened to the frames of one run (or of several, once merged)."""

    frames: int = 0
    accepted: int = 0
    review: int = 0
    unreadable: int = 0
    per_label: Counter[str] = field(default_factory=Counter)
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
        self.per_label.update(other.per_label)
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
) -> RunStats:
    """Label every frame of `source`; every decision reaches `sink` exactly once.

    The sink is closed at the end, also when the run fails part-way, so that what was
    decided so far is kept.
    """
    timer = timer or StageTimer()
    stats = RunStats()
    start = time.perf_counter()
    bar = tqdm(total=len(source), unit="img", disable=not progress, leave=False)
    try:
        for prediction in predict(
            source.frames(), pipeline.loaded, pipeline.classifier, pipeline.options, timer
        ):
            decision = route(prediction, pipeline.policy)
            with timer.stage("sink"):
                sink.write(decision)
            stats.frames += 1
            if decision.accepted:
                stats.accepted += 1
                stats.per_label.update(label for label, _ in decision.tags)
            else:
                stats.review += 1
                stats.unreadable += prediction.error is not None
            bar.update()
    finally:
        bar.close()
        with timer.stage("sink"):
            sink.close()
    stats.seconds = time.perf_counter() - start
    stats.stages = timer.snapshot()
    return stats


def format_summary(stats: RunStats, *, title: str = "done") -> str:
    """A few human-readable lines: counts, per-label counts, speed and stage times."""
    lines = [
        f"{title}: {stats.frames} images in {stats.seconds:.1f}s ({stats.images_per_second:.1f} images/s)",
        f"  accepted: {stats.accepted}   for review: {stats.review}"
        + (f" (unreadable: {stats.unreadable})" if stats.unreadable else ""),
    ]
    if stats.per_label:
        per_label = ", ".join(f"{label} {count}" for label, count in stats.per_label.most_common())
        lines.append(f"  per label: {per_label}")
    if stats.stages:
        stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in sorted(stats.stages.items()))
        lines.append(f"  time per stage: {stages}")
    return "\n".join(lines)
