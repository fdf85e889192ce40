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

from prelabel.assemble import build_pipeline
from prelabel.cli import main as prelabel_main
from prelabel.config import Config
from prelabel.pipeline.runner import Pipeline


def standin_builder(seconds: float):
    """A pipeline builder whose image encoder sleeps `seconds` per batch before encoding."""

    def build(config: Config, labels: Sequence[str], loaded=None, calibration=None) -> Pipeline:
        pipeline = build_pipeline(config, labels, loaded, calibration=calibration)
        if loaded is not None:  # a model this builder loaded (and slowed down) before
            return pipeline
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
    prelabel_main(["worker", *sys.argv[2:]], obj={"pipeline_builder": standin_builder(seconds)})


if __name__ == "__main__":
    main()
