"""prelabel as a cvat-sdk auto-annotation function (a `DetectionFunction` that returns tags).

With it, CVAT's own tooling runs prelabel's model, prompts and routing::

    cvat-cli task auto-annotate TASK --function-module prelabel.cvat_function \\
        -p model=str:ViT-B-32 -p pretrained=str:laion2b_s34b_b79k -p labels=str:cat,dog \\
        --allow-unmatched-labels

and on CVAT Enterprise or Online it can be registered as an agent function. Each frame
gets the tag(s) the router accepts; a frame the router would send to review gets no tag.
The spec declares the labels given (or the config's); cvat-sdk matches them to the task's
labels by name, so only labels the task has are ever written (with
``allow_unmatched_labels``, the others are dropped; without it, a label the task lacks is
an error). Compared with `prelabel run`, this path works one frame at a time, raises no
review issues, and keeps no state: running it twice tags the frames twice.
"""

from __future__ import annotations

from pathlib import Path

import cvat_sdk.auto_annotation as cvataa
from cvat_sdk import models
from cvat_sdk.attributes import number_attribute_values
from PIL import Image

from connectors.cvat_xml import CONFIDENCE_ATTRIBUTE, MODEL_ATTRIBUTE, confidence_value
from prelabel.assemble import build_image_pipeline
from prelabel.config import load_config, model_overrides, split_labels
from prelabel.interface import Frame
from prelabel.pipeline.router import route
from prelabel.pipeline.runner import Pipeline
from prelabel.pipeline.worker import predict

_CONFIDENCE_ID, _MODEL_ID = 0, 1


class PrelabelFunction:
    """Tags each image with the label(s) prelabel's router accepts, and nothing else."""

    def __init__(self, pipeline: Pipeline, *, attributes: bool = False) -> None:
        self.pipeline = pipeline
        self._attributes = attributes
        names = pipeline.classifier.labels
        self._ids = {name: index for index, name in enumerate(names)}
        specs = (
            [
                cvataa.number_attribute_spec(
                    CONFIDENCE_ATTRIBUTE, _CONFIDENCE_ID, number_attribute_values(0, 100, 1)
                ),
                cvataa.text_attribute_spec(MODEL_ATTRIBUTE, _MODEL_ID),
            ]
            if attributes
            else []
        )
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, self._ids[name], type="tag", attributes=specs) for name in names]
        )

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: Image.Image
    ) -> list[cvataa.DetectionAnnotation]:
        """The accepted tags of one image; with `context.conf_threshold`, only those at or above it."""
        frame = Frame(ref=context.frame_name, name=context.frame_name, data=image)
        pipeline = self.pipeline
        prediction = next(predict([frame], pipeline.loaded, pipeline.classifier, pipeline.options))
        decision = route(prediction, pipeline.policy)
        floor = context.conf_threshold
        return [
            cvataa.tag(self._ids[label], attributes=self._values(probability))
            for label, probability in decision.tags
            if floor is None or probability >= floor
        ]

    def _values(self, probability: float) -> list:
        if not self._attributes:
            return []
        return [
            models.AttributeValRequest(spec_id=_CONFIDENCE_ID, value=str(confidence_value(probability))),
            models.AttributeValRequest(spec_id=_MODEL_ID, value=self.pipeline.loaded.identity[:1024]),
        ]


def create(
    model: str | None = None,
    pretrained: str | None = None,
    threshold: float | None = None,
    labels: str | None = None,
    config: str | None = None,
    device: str | None = None,
    margin: float | None = None,
    attributes: bool = False,
) -> PrelabelFunction:
    """Build the function (cvat-cli's ``-p name=type:value`` parameters).

    `model` and `pretrained` as in `prelabel run` (default: the config's, else ViT-B-32 on
    laion2b_s34b_b79k); `threshold` and `margin` are the router's accept threshold and
    minimum margin; `labels` is a comma-separated list (default: the config's labels);
    `config` a prelabel YAML config for prompts, descriptions and per-label thresholds;
    `attributes` adds the `confidence` and `model` attributes that `prelabel setup` creates.
    """
    overrides = model_overrides(
        model=model, pretrained=pretrained, device=device, accept_threshold=threshold, min_margin=margin
    )
    settings = load_config(
        Path(config) if config else None,
        {**overrides, "model.batch_size": 1, "decode.workers": 1, "decode.prefetch_batches": 0},
    )
    names = split_labels(labels) or [label.name for label in settings.labels]
    # One label set for the function's life: the text tower is not needed once its classifier exists.
    return PrelabelFunction(build_image_pipeline(settings, names), attributes=attributes)
