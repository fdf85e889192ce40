"""The model worker: frames in, predictions out, in the same order.

Decoding and preprocessing run in a thread pool a few batches ahead of the model (Pillow
releases the GIL while it decodes), so the model rarely waits for images. Frames that
cannot be decoded come out as predictions with an `error` instead of scores.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from prelabel.classifier import TextClassifier
from prelabel.decode import DecodeError, decode
from prelabel.interface import Frame, Prediction
from prelabel.model import LoadedModel, inference
from prelabel.stream import ordered_map
from prelabel.timing import StageTimer


@dataclass(frozen=True)
class WorkerOptions:
    """How the worker batches and decodes."""

    batch_size: int
    top_k: int
    draft: bool = True
    decode_workers: int | None = None
    """Decode threads; None means one per CPU core."""
    prefetch_batches: int = 2
    """How many batches are decoded ahead of the model (bounds memory)."""


@dataclass(frozen=True)
class _Decoded:
    frame: Frame
    tensor: torch.Tensor | None
    size: tuple[int, int] | None
    error: str | None


def predict(
    frames: Iterable[Frame],
    loaded: LoadedModel,
    classifier: TextClassifier,
    options: WorkerOptions,
    timer: StageTimer | None = None,
) -> Iterator[Prediction]:
    """Yield one `Prediction` per frame, in input order, scoring frames in batches.

    At most ``batch_size * (prefetch_batches + 1)`` frames are decoded ahead of the model.
    """
    timer = timer or StageTimer()
    decoded = _decode_ahead(frames, loaded, options, timer)
    batch: list[_Decoded] = []
    while True:
        with timer.stage("wait_decode"):
            item = next(decoded, None)
        if item is None:
            break
        batch.append(item)
        if len(batch) >= options.batch_size:
            yield from _flush(batch, loaded, classifier, options, timer)
    yield from _flush(batch, loaded, classifier, options, timer)


def _flush(
    batch: list[_Decoded],
    loaded: LoadedModel,
    classifier: TextClassifier,
    options: WorkerOptions,
    timer: StageTimer,
) -> Iterator[Prediction]:
    if not batch:
        return
    items = list(batch)
    batch.clear()
    good = [item for item in items if item.tensor is not None]
    scores: dict[int, tuple[tuple[str, float], ...]] = {}
    fits: dict[int, tuple[float, float | None]] = {}
    if good:
        with timer.stage("model"):
            probabilities, fit, background = score_and_fit_batch(
                torch.stack([item.tensor for item in good]), loaded, classifier
            )
        k = min(options.top_k, len(classifier.labels))
        values, indices = probabilities.topk(k, dim=-1)
        backgrounds = background.tolist() if background is not None else [None] * len(good)
        for item, row_values, row_indices, row_fit, row_background in zip(
            good, values.tolist(), indices.tolist(), fit.tolist(), backgrounds, strict=True
        ):
            scores[id(item)] = tuple(
                (classifier.labels[index], value)
                for value, index in zip(row_values, row_indices, strict=True)
            )
            fits[id(item)] = (row_fit, row_background)
    for item in items:
        fit_value, background_value = fits.get(id(item), (None, None))
        yield Prediction(
            ref=item.frame.ref,
            name=item.frame.name,
            scores=scores.get(id(item), ()),
            error=item.error,
            size=item.size,
            fit=fit_value,
            background=background_value,
        )


@dataclass(frozen=True)
class Embedded:
    """One frame's unit image embedding (on the CPU, fp32), or why it has none."""

    frame: Frame
    features: torch.Tensor | None
    error: str | None = None


def embed(
    frames: Iterable[Frame], loaded: LoadedModel, options: WorkerOptions, timer: StageTimer | None = None
) -> Iterator[Embedded]:
    """Yield each frame's image embedding, in input order, encoding frames in batches."""
    timer = timer or StageTimer()
    decoded = _decode_ahead(frames, loaded, options, timer)
    batch: list[_Decoded] = []
    for item in itertools.chain(decoded, [None]):
        if item is not None:
            batch.append(item)
            if len(batch) < options.batch_size:
                continue
        good = [entry for entry in batch if entry.tensor is not None]
        features: dict[int, torch.Tensor] = {}
        if good:
            with timer.stage("model"):
                encoded = encode_batch(torch.stack([entry.tensor for entry in good]), loaded)
            features = {id(entry): row for entry, row in zip(good, encoded, strict=True)}
        for entry in batch:
            yield Embedded(entry.frame, features.get(id(entry)), entry.error)
        batch = []


def encode_batch(pixels: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    """[N, 3, H, W] preprocessed images -> [N, embed_dim] unit embeddings on the CPU, fp32."""
    if loaded.device.type == "cuda":
        pixels = pixels.pin_memory()
    with inference(loaded):
        features = loaded.model.encode_image(pixels.to(loaded.device, non_blocking=True), normalize=True)
        return features.float().cpu()


def score_batch(pixels: torch.Tensor, loaded: LoadedModel, classifier: TextClassifier) -> torch.Tensor:
    """[N, 3, H, W] preprocessed images -> [N, n_labels] probabilities on the CPU, fp32."""
    if loaded.device.type == "cuda":
        pixels = pixels.pin_memory()  # lets the copy to the GPU run asynchronously
    with inference(loaded):
        features = loaded.model.encode_image(pixels.to(loaded.device, non_blocking=True), normalize=True)
        return classifier.probabilities(features).float().cpu()


def score_and_fit_batch(
    pixels: torch.Tensor, loaded: LoadedModel, classifier: TextClassifier
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Like `score_batch`, plus each frame's fit and background scores (`TextClassifier.fit_scores`)."""
    if loaded.device.type == "cuda":
        pixels = pixels.pin_memory()
    with inference(loaded):
        features = loaded.model.encode_image(pixels.to(loaded.device, non_blocking=True), normalize=True)
        probabilities = classifier.probabilities(features).float().cpu()
        fit, background = classifier.fit_scores(features)
    return probabilities, fit.float().cpu(), None if background is None else background.float().cpu()


def _decode_ahead(
    frames: Iterable[Frame], loaded: LoadedModel, options: WorkerOptions, timer: StageTimer
) -> Iterator[_Decoded]:
    """Decode and preprocess in a thread pool, in order, a bounded number of frames ahead."""
    return ordered_map(
        lambda frame: _prepare(frame, loaded, options.draft, timer),
        frames,
        workers=options.decode_workers or os.cpu_count() or 1,
        ahead=options.batch_size * (options.prefetch_batches + 1),
        name="decode",
    )


def _prepare(frame: Frame, loaded: LoadedModel, draft: bool, timer: StageTimer) -> _Decoded:
    with timer.stage("decode"):
        try:
            image, size = decode(frame, loaded.image_size, draft=draft)
            tensor = loaded.preprocess(image)
        except DecodeError as exc:
            return _Decoded(frame, None, None, str(exc))
        except Exception as exc:  # a frame the transform chokes on is a review item, not a crash
            return _Decoded(frame, None, None, f"cannot preprocess image: {exc}")
    return _Decoded(frame, tensor, size, None)
