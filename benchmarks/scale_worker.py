"""A benchmark-only worker: ``prelabel worker`` with a stand-in model stage.

``python -m benchmarks.scale_worker SECONDS [worker options]`` runs the real worker (real
queue, real CVAT downloads and uploads, the real tiny model) but makes each model batch
take at least SECONDS, as a GPU batch would. Only this entry point does it; `prelabel
worker` never does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from prelabel import cli
from prelabel.cli import queue as cli_queue
from prelabel.config import Config
from prelabel.pipeline.runner import Pipeline, build_pipeline


def standin_builder(seconds: float):
    """A pipeline builder whose image encoder sleeps `seconds` per batch before encoding."""

    def build(config: Config, labels: Sequence[str], calibration=None) -> Pipeline:
        pipeline = build_pipeline(config, labels, calibration=calibration)
        model = pipeline.loaded.model
        encode = model.encode_image

        def encode_image(*args, **kwargs):
            time.sleep(seconds)
            return encode(*args, **kwargs)

        model.encode_image = encode_image
        return pipeline

    return build


def main() -> None:
    seconds = float(sys.argv[1])
    cli_queue._pipeline_builder = lambda: standin_builder(seconds)
    sys.argv = ["prelabel", "worker", *sys.argv[2:]]
    cli.main()


if __name__ == "__main__":
    main()
