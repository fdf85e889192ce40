"""How far int8 dynamic quantization moves the answers: top-1 agreement with fp32 on real frames."""

from __future__ import annotations

from dataclasses import dataclass

from cvat_sdk import Client

from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import find_work
from connectors.cvat.session import CvatSession
from prelabel.assemble import build_pipeline
from prelabel.config import Config
from prelabel.pipeline.worker import WorkerOptions, predict


@dataclass(frozen=True)
class Agreement:
    frames: int
    top1_agreement: float
    """Share of frames whose top-1 label is the same under int8 and fp32."""
    max_probability_difference: float
    """Largest |p_int8 - p_fp32| over every frame and label."""


def int8_agreement(client: Client, task_id: int, config: Config, labels: tuple[str, ...]) -> Agreement:
    """Score the task's frames (as prelabel downloads them) with fp32 and int8 models and compare."""
    session = CvatSession(client)
    work = find_work(session, task_id=task_id, include_tagged=True)
    frames = [frame for plan in work.jobs for frame in JobFrameSource(session, plan).frames()]
    scores = []
    for quantize in ("none", "int8"):
        model = config.model.model_copy(update={"quantize": quantize})
        pipeline = build_pipeline(config.model_copy(update={"model": model}), list(labels))
        options = WorkerOptions(batch_size=pipeline.options.batch_size, top_k=len(labels))
        scores.append(
            [dict(p.scores) for p in predict(frames, pipeline.loaded, pipeline.classifier, options)]
        )
    fp32, int8 = scores
    same = sum(max(a, key=a.get) == max(b, key=b.get) for a, b in zip(fp32, int8, strict=True))
    worst = max(abs(a[label] - b[label]) for a, b in zip(fp32, int8, strict=True) for label in a)
    return Agreement(len(frames), same / len(frames), worst)
