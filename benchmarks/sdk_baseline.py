"""(c) The baseline: cvat-sdk's own auto-annotation driver with the same OpenCLIP classifier.

`annotate_task` downloads the task's chunks, calls the function's ``detect`` once per frame
(one image at a time: that is the interface) and uploads all tags in one request at the end.

Measured two ways: in the benchmark's process with the model already loaded (`run_baseline`),
and as a whole process, start-up included (`run_baseline_process`): ``python -m
benchmarks.sdk_baseline --task-id T ...`` imports cvat-sdk and open_clip, logs in with the
same environment variables as the prelabel CLI, loads the model, builds the classifier with
prelabel's own functions, then runs ``annotate_task``: what a user's cvat-sdk script does.
This module imports nothing of the benchmark's (no test server, no frames), so the process
pays only for what such a script needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cvat_sdk.auto_annotation as cvataa
from PIL import Image

from prelabel.pipeline.classifier import TextClassifier
from prelabel.pipeline.model import LoadedModel
from prelabel.pipeline.worker import score_batch

if TYPE_CHECKING:
    from benchmarks.dataset import BenchProject


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
    peak_rss_bytes: int | None = None
    """The process's own peak RSS (whole-process runs only)."""

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


def run_baseline_process(
    project: BenchProject,
    task_id: int,
    *,
    model: str,
    device: str,
    quantize: str = "none",
    timeout: float = 3600,
) -> BaselineRun:
    """Time ``python -m benchmarks.sdk_baseline`` on the task from its start to its exit (with its
    own peak RSS, `benchmarks.peak_rss`), then check every frame got its tag."""
    from benchmarks.prelabel_cli import cli_env, run_measured

    frames = len(project.server.state.tasks[task_id]["frames"])
    with tempfile.TemporaryDirectory(prefix="bench-sdk-process-") as tmp:
        command = [
            sys.executable, "-m", "benchmarks.sdk_baseline", "--task-id", str(task_id),
            "--labels", ",".join(project.labels), "--model", model, "--device", device,
            "--quantize", quantize,
        ]  # fmt: skip
        workdir = Path(tmp) / "cwd"
        workdir.mkdir()
        process = run_measured(command, cwd=workdir, env=cli_env(project), timeout=timeout, output=Path(tmp))
    if process.returncode != 0:
        tail = "\n".join(process.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"cvat-sdk process on task {task_id} exited with {process.returncode}:\n{tail}")
    project.check_one_tag_per_frame(task_id, "cvat-sdk annotate_task (process)")
    return BaselineRun(task_id, frames, process.seconds, process.peak_rss_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    """Annotate one task with cvat-sdk's ``annotate_task``, logged in from CVAT_HOST,
    CVAT_USERNAME and CVAT_PASSWORD, as the prelabel CLI is."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sdk_baseline", description=main.__doc__)
    parser.add_argument("--task-id", type=int, required=True)
    parser.add_argument("--labels", required=True, help="tag labels, comma-separated, in the project's order")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"))
    args = parser.parse_args(argv)
    logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # not its server-version warning

    from cvat_sdk import Client
    from cvat_sdk.core.client import Config as ClientConfig

    from prelabel.assemble import build_pipeline  # imports open_clip and torch
    from prelabel.config import load_config

    config = load_config(
        None,
        {
            "model.name": args.model,
            "model.pretrained": args.pretrained,
            "model.device": args.device,
            "model.quantize": args.quantize,
        },
    )
    pipeline = build_pipeline(config, [name for name in args.labels.split(",") if name])
    tagger = OpenClipTagger(pipeline.loaded, pipeline.classifier)
    with (
        tempfile.TemporaryDirectory(prefix="sdk-cache-") as cache,
        Client(os.environ["CVAT_HOST"], config=ClientConfig(cache_dir=Path(cache))) as client,
    ):
        client.login((os.environ["CVAT_USERNAME"], os.environ["CVAT_PASSWORD"]))
        cvataa.annotate_task(client, args.task_id, tagger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
