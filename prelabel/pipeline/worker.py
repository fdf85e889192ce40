"""The model worker: frames in, predictions out, in the same order.

Decoding and preprocessing run in a thread pool a few batches ahead of the model (Pillow
releases the GIL while it decodes), so the model rarely waits for images; `prime` starts
on the next source's first batch before its turn. With `draft` (the default) a large JPEG
is decoded at reduced scale and only the centre crop is resized
(`prelabel.pipeline.preprocess`); without it, frames get exactly open_clip's pixels. The
threads keep each frame's 8-bit pixels; the model's thread scales and normalises a whole
batch at once (`preprocess.split`). Frames that cannot be decoded come out as predictions
with an `error` instead of scores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple, TypeVar

import torch

from prelabel.interface import Frame, Prediction
from prelabel.pipeline.classifier import TextClassifier
from prelabel.pipeline.decode import DecodeError, decode
from prelabel.pipeline.model import LoadedModel, inference
from prelabel.pipeline.preprocess import SplitTransform, Transform, split
from prelabel.pipeline.stream import lowered_priority, ordered_map
from prelabel.pipeline.timing import StageTimer

_Row = TypeVar("_Row")


@dataclass(frozen=True)
class WorkerOptions:
    """How the worker batches and decodes."""

    batch_size: int
    top_k: int
    draft: bool = True
    """Decode large JPEGs at reduced scale and resize only the centre crop (`crop_first`)."""
    decode_workers: int | None = None
    """Decode threads; None means one per CPU core."""
    prefetch_batches: int = 2
    """How many batches are decoded ahead of the model (bounds memory)."""
    decode_nice: int = 0
    """How much lower the decode threads' CPU priority is (`lowered_priority`)."""


@dataclass(frozen=True)
class _Decoded:
    frame: Frame
    tensor: torch.Tensor | None
    """The frame's pixels as `SplitTransform.frame` gives them."""
    size: tuple[int, int] | None
    error: str | None


def predict(
    frames: Iterable[Frame] | Primed,
    loaded: LoadedModel,
    classifier: TextClassifier,
    options: WorkerOptions,
    timer: StageTimer | None = None,
    *,
    decode_pool: Executor | None = None,
) -> Iterator[Prediction]:
    """Yield one `Prediction` per frame, in input order, scoring frames in batches.

    At most ``batch_size * (prefetch_batches + 1)`` frames are decoded ahead of the model,
    on `decode_pool` (the run's, shared by its jobs) or else on decode threads of its own.
    `frames` may be `Primed` (`prime`, on the same `decode_pool`): its first frames are being
    decoded already.
    """
    timer = timer or StageTimer()
    k = min(options.top_k, len(classifier.labels))
    finish = _finishing(loaded, options)
    for batch in _batches(frames, loaded, options, timer, decode_pool):
        rows = _through_model(
            batch, finish, lambda pixels: score_and_fit_batch(pixels, loaded, classifier).rows(), timer
        )
        for item, row in zip(batch, rows, strict=True):
            scores: tuple[tuple[str, float], ...] = ()
            fit: float | None = None
            background: float | None = None
            if row is not None:
                probabilities, fit, background = row
                values, indices = probabilities.topk(k)
                scores = tuple(
                    (classifier.labels[index], value)
                    for value, index in zip(values.tolist(), indices.tolist(), strict=True)
                )
            yield Prediction(
                ref=item.frame.ref,
                name=item.frame.name,
                scores=scores,
                error=item.error,
                size=item.size,
                fit=fit,
                background=background,
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
    finish = _finishing(loaded, options)
    for batch in _batches(frames, loaded, options, timer):
        features = _through_model(batch, finish, lambda pixels: encode_batch(pixels, loaded), timer)
        for item, row in zip(batch, features, strict=True):
            yield Embedded(item.frame, row, item.error)


@dataclass(frozen=True)
class Primed:
    """A source whose first batch is being decoded before its turn (`prime`)."""

    decoding: Future[list[Future[_Decoded]]]
    """The decodes of its first frames, on the decode pool, once those frames were taken."""
    rest: Iterator[Frame]
    """Its other frames, taken by `predict` once `decoding` is done."""

    def close(self) -> None:
        """Drop it unused: wait until its first frames were taken (or that was cancelled),
        then close the source's frame stream (a generator), which ends its downloads."""
        wait([self.decoding])
        close = getattr(self.rest, "close", None)
        if close is not None:
            close()


def prime(
    frames: Iterable[Frame],
    loaded: LoadedModel,
    options: WorkerOptions,
    timer: StageTimer,
    *,
    prime_pool: Executor,
    decode_pool: Executor,
) -> Primed:
    """Start on a source's first batch now, before `predict` gets to it.

    On `prime_pool` (one thread: taking a frame may mean waiting for its download) the first
    ``batch_size`` frames are taken and their decodes submitted to `decode_pool`, where they
    queue behind the decodes submitted before. `predict` on the result then starts with a
    decoded batch: the model does not wait for decoding when it moves to the next source.
    """
    frames = iter(frames)
    decode = _decoder(loaded, options, timer)

    def take_first() -> list[Future[_Decoded]]:
        return [decode_pool.submit(decode, frame) for frame in islice(frames, options.batch_size)]

    return Primed(prime_pool.submit(take_first), frames)


def _batches(
    frames: Iterable[Frame] | Primed,
    loaded: LoadedModel,
    options: WorkerOptions,
    timer: StageTimer,
    pool: Executor | None = None,
) -> Iterator[list[_Decoded]]:
    """The decoded frames in batches of `options.batch_size` (the last one may be smaller)."""
    decoded = _decode_ahead(frames, loaded, options, timer, pool)
    batch: list[_Decoded] = []
    while True:
        with timer.stage("wait_decode"):
            item = next(decoded, None)
        if item is None:
            break
        batch.append(item)
        if len(batch) >= options.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _through_model(
    batch: list[_Decoded],
    finish: Callable[[torch.Tensor], torch.Tensor],
    model: Callable[[torch.Tensor], Sequence[_Row]],
    timer: StageTimer,
) -> list[_Row | None]:
    """`model` applied to the batch's decoded frames at once (stacked, then `finish`ed into
    the model's input): one row per frame, None where the frame could not be decoded."""
    good = [item.tensor for item in batch if item.tensor is not None]
    if not good:
        return [None] * len(batch)
    with timer.stage("model"):
        rows = iter(model(finish(torch.stack(good))))
    return [next(rows) if item.tensor is not None else None for item in batch]


def _encode(pixels: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    """Unit image embeddings on the model's device; call inside `inference(loaded)`."""
    return loaded.model.encode_image(_to_device(pixels, loaded.device), normalize=True)


def _to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`pixels` on `device`. A CPU tensor bound for a GPU goes through pinned memory, which
    lets the copy run asynchronously; a tensor already there is returned as it is."""
    if device.type == "cuda" and pixels.device.type == "cpu":
        pixels = pixels.pin_memory()
    return pixels.to(device, non_blocking=True)


def encode_batch(pixels: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    """[N, 3, H, W] preprocessed images -> [N, embed_dim] unit embeddings on the CPU, fp32."""
    with inference(loaded):
        return _encode(pixels, loaded).float().cpu()


class ScoredBatch(NamedTuple):
    """What the model says about a batch of frames, on the CPU, fp32."""

    probabilities: torch.Tensor
    """[N, n_labels]"""
    fit: torch.Tensor
    """[N] best raw cosine with any label (`TextClassifier.fit_scores`)."""
    background: torch.Tensor | None
    """[N] lead of the best background prompt over the best label; None without background prompts."""

    def rows(self) -> list[tuple[torch.Tensor, float, float | None]]:
        """One (probabilities, fit, background) per frame."""
        fits = self.fit.tolist()
        backgrounds = self.background.tolist() if self.background is not None else [None] * len(fits)
        return list(zip(self.probabilities, fits, backgrounds, strict=True))


def score_and_fit_batch(pixels: torch.Tensor, loaded: LoadedModel, classifier: TextClassifier) -> ScoredBatch:
    """[N, 3, H, W] preprocessed images -> probabilities and open-set scores, from one encode."""
    with inference(loaded):
        features = _encode(pixels, loaded)
        probabilities = classifier.probabilities(features).float().cpu()
        fit, background = classifier.fit_scores(features)
    background = None if background is None else background.float().cpu()
    return ScoredBatch(probabilities, fit.float().cpu(), background)


def score_batch(pixels: torch.Tensor, loaded: LoadedModel, classifier: TextClassifier) -> torch.Tensor:
    """[N, 3, H, W] preprocessed images -> [N, n_labels] probabilities on the CPU, fp32."""
    return score_and_fit_batch(pixels, loaded, classifier).probabilities


def decode_threads(options: WorkerOptions) -> int:
    """How many decode threads the options ask for."""
    return options.decode_workers or os.cpu_count() or 1


def _decode_ahead(
    frames: Iterable[Frame] | Primed,
    loaded: LoadedModel,
    options: WorkerOptions,
    timer: StageTimer,
    pool: Executor | None = None,
) -> Iterator[_Decoded]:
    """Decode and preprocess in a thread pool (`pool`, else one of its own), in order, a
    bounded number of frames ahead; `Primed` frames start with the decodes already under way."""
    started: list[Future[_Decoded]] = []
    if isinstance(frames, Primed):
        started, frames = frames.decoding.result(), frames.rest
    yield from ordered_map(
        _decoder(loaded, options, timer),
        frames,
        workers=decode_threads(options),
        ahead=options.batch_size * (options.prefetch_batches + 1),
        initializer=lowered_priority(options.decode_nice),
        name="decode",
        pool=pool,
        started=started,
    )


def _finishing(loaded: LoadedModel, options: WorkerOptions) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-batch part of `loaded`'s transform, on the model's device: a stack of 8-bit
    pixels is copied to a GPU as it is (a quarter of the bytes of the floats) and scaled and
    normalised there, so the model's thread does not do that work on the CPU."""
    batch = _preprocessing(loaded, options).batch
    return lambda pixels: batch(_to_device(pixels, loaded.device))


def _preprocessing(loaded: LoadedModel, options: WorkerOptions) -> SplitTransform:
    """`loaded`'s transform split into its per-frame and per-batch parts, as the options say."""
    return split(loaded.preprocess, crop=options.draft)


def _decoder(loaded: LoadedModel, options: WorkerOptions, timer: StageTimer) -> Callable[[Frame], _Decoded]:
    """Decodes and preprocesses one frame for `loaded`, as the options say."""
    transform = _preprocessing(loaded, options).frame
    return lambda frame: _prepare(frame, loaded.image_size, transform, options.draft, timer)


def _prepare(
    frame: Frame, image_size: tuple[int, int], transform: Transform, draft: bool, timer: StageTimer
) -> _Decoded:
    with timer.stage("decode"):
        try:
            image, size = decode(frame, image_size, draft=draft)
            tensor = transform(image)
        except DecodeError as exc:
            return _Decoded(frame, None, None, str(exc))
        except Exception as exc:  # a frame the transform chokes on is a review item, not a crash
            return _Decoded(frame, None, None, f"cannot preprocess image: {exc}")
    return _Decoded(frame, tensor, size, None)
