"""(c) The baseline: cvat-sdk's own auto-annotation driver with the same OpenCLIP classifier.

`annotate_task` downloads the task's chunks, calls the function's ``detect`` once per frame
(one image at a time: that is the interface) and uploads all tags in one request at the end.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cvat_sdk.auto_annotation as cvataa
from PIL import Image

from benchmarks.dataset import BenchProject
from prelabel.pipeline.classifier import TextClassifier
from prelabel.pipeline.model import LoadedModel
from prelabel.pipeline.worker import score_batch


class OpenClipTagger:
    """A cvat-sdk DetectionFunction: one tag per frame, the top-1 label of the classifier."""

    def __init__(self, loaded: LoadedModel, classifier: TextClassifier) -> None:
        self._loaded = loaded
        self._classifier = classifier
        labels = [cvataa.label_spec(name, index, type="tag") for index, name in enumerate(classifier.labels)]
        self.spec = cvataa.DetectionFunctionSpec(labels=labels)

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: Image.Image
    ) -> list[cvataa.DetectionAnnotation]:
        pixels = self._loaded.preprocess(image).unsqueeze(0)
        probabilities = score_batch(pixels, self._loaded, self._classifier)
        return [cvataa.tag(int(probabilities[0].argmax()))]


@dataclass(frozen=True)
class BaselineRun:
    task_id: int
    frames: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.frames / self.seconds


def run_baseline(project: BenchProject, task_id: int, tagger: OpenClipTagger) -> BaselineRun:
    """Time ``annotate_task`` from the call to its return, then check every frame got its tag.

    The client's dataset cache lives in a fresh temporary folder, so nothing is reused.
    """
    frames = len(project.server.state.tasks[task_id]["frames"])
    with tempfile.TemporaryDirectory(prefix="bench-sdk-") as cache:
        client = project.client(Path(cache))
        try:
            start = time.perf_counter()
            cvataa.annotate_task(client, task_id, tagger)
            seconds = time.perf_counter() - start
        finally:
            client.close()
    project.check_one_tag_per_frame(task_id, "cvat-sdk annotate_task")
    return BaselineRun(task_id, frames, seconds)
