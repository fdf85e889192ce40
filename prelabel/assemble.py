"""Assembling a pipeline: the model, the text classifier, and what calibration learned.

`build_pipeline` loads the configured model (unless given one), builds the classifier for
the label names, blends in the few-shot cache and applies the calibration file (or the
calibration a queue entry carries). `PipelineCache` keeps the pipelines a long-lived
process has built. It sits above `prelabel.pipeline` and `prelabel.calibration`, which do
not import each other's way up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from prelabel.calibration.fewshot import load_cache
from prelabel.calibration.fitting import Calibration, apply_calibration, read_calibration
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.pipeline.classifier import TextClassifier, build_classifier, label_prompts
from prelabel.pipeline.memory import release_free_memory
from prelabel.pipeline.model import LoadedModel, load_model
from prelabel.pipeline.router import RoutingPolicy
from prelabel.pipeline.runner import Pipeline
from prelabel.pipeline.worker import WorkerOptions

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "prelabel"

log = logging.getLogger(__name__)


def build_pipeline(
    config: Config,
    labels: Sequence[str],
    loaded: LoadedModel | None = None,
    calibration: Calibration | None = None,
) -> Pipeline:
    """Load the configured model (unless `loaded` is given) and build the classifier for `labels`.

    The learned temperature and thresholds are applied: `calibration` when given (a queue
    entry carries its own), else the calibration file when it exists and is in use.
    """
    if not labels:
        raise ConfigError("no labels: give --labels a,b,c or list them under 'labels' in the config")
    loaded = loaded or load_model(config.model)
    cache_dir = Path(config.model.cache_dir) if config.model.cache_dir else DEFAULT_CACHE_DIR
    classifier = build_classifier(loaded, label_prompts(labels, config), cache_dir)
    if config.prompts.background:  # one column per prompt, built (and cached) like a classifier
        background = build_classifier(loaded, {text: [text] for text in config.prompts.background}, cache_dir)
        classifier = replace(classifier, background=background.weights)
    default_batch = 128 if loaded.device.type == "cuda" else 32
    options = WorkerOptions(
        batch_size=config.model.batch_size or default_batch,
        top_k=len(labels) if config.routing.multi_label else config.routing.top_k,
        draft=config.decode.draft,
        decode_workers=config.decode.workers,
        prefetch_batches=config.decode.prefetch_batches,
        decode_nice=config.decode.nice,
    )
    policy = RoutingPolicy.from_config(config)
    classifier = _with_fewshot(config, classifier, loaded.identity)
    path = Path(config.calibration.path)
    origin = "the queue entry's calibration"
    if calibration is None and config.calibration.use and path.is_file():
        calibration, origin = read_calibration(path), str(path)
    if calibration is None:
        return Pipeline(loaded, classifier, policy, options)
    if calibration.prior_correction != config.routing.prior_correction:
        raise ConfigError(
            f"{origin} was made {'with' if calibration.prior_correction else 'without'} the prior"
            " correction, and routing.prior_correction says otherwise",
            hint="run `prelabel calibrate` again with the current config",
        )
    if calibration.fewshot != (classifier.cache is not None):
        raise ConfigError(
            f"{origin} was made {'with' if calibration.fewshot else 'without'} the few-shot cache,"
            " and fewshot.enabled (or the cache file) says otherwise",
            hint="run `prelabel calibrate` again with the current config",
        )
    classifier, policy = apply_calibration(
        calibration, classifier, policy, model_identity=loaded.identity, path=origin
    )
    return Pipeline(loaded, classifier, policy, options, origin, calibration.label_shares or None)


def build_image_pipeline(config: Config, labels: Sequence[str]) -> Pipeline:
    """`build_pipeline` for one label set, on its model without the text tower.

    For a process that builds no other classifier (one run, one calibration): the text
    tower is dropped (`Pipeline.images_only`) and the memory that loading left free is
    handed back to the OS (`release_free_memory`) before the first frame is scored.
    """
    pipeline = build_pipeline(config, labels).images_only()
    release_free_memory(collect_garbage=True)  # the full pipeline and its text tower are gone by now
    return pipeline


PipelineBuilder = Callable[..., Pipeline]
"""Called as ``builder(config, labels, loaded=..., calibration=...)``, like `build_pipeline`."""


class PipelineCache:
    """Pipelines built once per config, label set and calibration, all sharing one loaded model
    per model configuration: a long-lived process (the webhook service, a queue worker) pays
    for model loading once."""

    def __init__(self, builder: PipelineBuilder = build_pipeline) -> None:
        self._builder = builder
        self._pipelines: dict[str, Pipeline] = {}
        self._models: dict[str, LoadedModel] = {}

    def get(self, config: Config, labels: Sequence[str], calibration: Calibration | None = None) -> Pipeline:
        """The pipeline for `labels` under `config` (and `calibration`, when given)."""
        model_key = _key(config.model.model_dump(mode="json"))
        learned = asdict(calibration) if calibration else None
        key = _key([config.model_dump(mode="json"), list(labels), learned])
        if key not in self._pipelines:
            began = time.perf_counter()
            loaded = self._models.get(model_key)
            pipeline = self._builder(config, labels, loaded=loaded, calibration=calibration)
            if model_key not in self._models:
                self._models[model_key] = pipeline.loaded
                log.info(
                    "built the pipeline (model %s on %s) in %.1fs",
                    pipeline.loaded.identity, pipeline.loaded.device, time.perf_counter() - began,
                )  # fmt: skip
            self._pipelines[key] = pipeline
        return self._pipelines[key]


def _key(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _with_fewshot(config: Config, classifier: TextClassifier, identity: str) -> TextClassifier:
    """The classifier with the few-shot cache blended in, when enabled and built."""
    settings = config.fewshot
    if not settings.enabled:
        return classifier
    path = Path(settings.path)
    if not path.is_file():
        log.warning("few-shot cache %s not built yet (run `prelabel calibrate`): zero-shot only", path)
        return classifier
    cache = load_cache(path, alpha=settings.alpha, beta=settings.beta)
    if cache.model_identity != identity:
        raise ConfigError(
            f"few-shot cache {path} holds embeddings of model {cache.model_identity!r}, not {identity!r}",
            hint="run `prelabel calibrate` to rebuild it",
        )
    return replace(classifier, cache=cache.for_labels(classifier.labels))
