"""The model's preprocessing transform, resizing only the part of a frame the model sees.

open_clip's inference transform (``resize_mode: shortest``, the default) resizes the whole
image so that its shorter side fits the model, then crops the centre square. For a 16:9
frame that resizes almost twice the pixels the model gets. `crop_first` returns the same
transform with the crop moved into the resize (Pillow's ``box``): the same filter over the
same source pixels, evaluated only where the crop keeps them. Any other transform is
returned as it is.

Only landscape frames (wider than tall) that are scaled down take the short way. For them
Pillow runs the horizontal pass first with or without the box, as it does for the full
resize. For a portrait frame it may order the passes differently once the box is given,
and an enlarged frame is more sensitive to the box's rounding; both moved values by 2-3
grey levels, so those frames (and square ones, which have nothing to crop) go through
`transform` itself.

`split` cuts a transform where its image becomes a tensor: the image steps run per frame
and keep the 8-bit pixels, and ``ToTensor`` and ``Normalize`` run once per batch, with the
same values (`SplitTransform`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms.functional import InterpolationMode

Transform = Callable[[Image.Image], torch.Tensor]
_Out = TypeVar("_Out")

_FILTERS = {
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
}


@dataclass(frozen=True)
class SplitTransform:
    """A model transform in two parts: `frame` runs on each frame (on the decode threads),
    `batch` once on the stacked results (on the model's thread).

    ``batch(torch.stack([frame(image) for image in images]))`` equals
    ``torch.stack([transform(image) for image in images])`` value for value. For open_clip's
    transforms `frame` ends with the image's 8-bit pixels, [H, W, 3] uint8: a quarter of the
    memory of the float pixels for every frame decoded ahead of the model, and ``ToTensor``
    and ``Normalize`` run as a few batched operations on the model's thread instead of a
    handful of small torch operations per frame on the decode threads (in a run, the decode
    threads' CPU time fell by about half).
    """

    frame: Transform
    batch: Callable[[torch.Tensor], torch.Tensor]


def split(transform: Transform, *, crop: bool = True) -> SplitTransform:
    """`transform` cut before its ``ToTensor`` (open_clip's ``MaybeToTensor`` is one), when
    only ``Normalize`` steps follow it; with `crop`, the image steps go through `crop_first`.

    Any other transform runs whole on each frame, and `batch` passes the stack through.
    """
    steps = transform.transforms if isinstance(transform, T.Compose) else []
    at = next((index for index, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if at is None or not all(isinstance(step, T.Normalize) for step in steps[at + 1 :]):
        return SplitTransform(crop_first(transform) if crop else transform, _unchanged)
    image_steps: Callable[[Image.Image], Image.Image] = T.Compose(steps[:at])
    if crop:
        image_steps = crop_first(image_steps)
    normalize: list[T.Normalize] = steps[at + 1 :]
    return SplitTransform(
        frame=lambda image: _pixels(image_steps(image)),
        batch=lambda pixels: _normalized(_to_float(pixels), normalize),
    )


def _pixels(image: Image.Image) -> torch.Tensor:
    """[H, W, 3] uint8: what ``ToTensor`` reads of an RGB image (the image steps of open_clip's
    transforms end in RGB; any other mode is converted, as they would)."""
    return torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB"), np.uint8))


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] in [0, 1], as ``ToTensor`` does to each image (in
    one new tensor, on `pixels`' device: a third of the time of ``ToTensor``'s steps on the
    batch)."""
    count, height, width, channels = pixels.shape
    shape = (count, channels, height, width)
    scaled = torch.empty(shape, dtype=torch.get_default_dtype(), device=pixels.device)
    return scaled.copy_(pixels.permute(0, 3, 1, 2)).div_(255)


def _normalized(pixels: torch.Tensor, steps: list[T.Normalize]) -> torch.Tensor:
    """The ``Normalize`` steps applied to `pixels` (a tensor of our own) in place."""
    for step in steps:
        pixels = F.normalize(pixels, step.mean, step.std, inplace=True)
    return pixels


def _unchanged(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


def crop_first(transform: Callable[[Image.Image], _Out]) -> Callable[[Image.Image], _Out]:
    """`transform` with its resize-then-centre-crop done as one resize of the crop's box.

    Applies when `transform` is a ``Compose`` that starts with ``Resize(size)`` (an int: the
    shorter side) and ``CenterCrop(size)`` of the same size, as open_clip builds for inference;
    the steps after the crop run unchanged. For a landscape image that is scaled down (the
    others go through `transform`), the result differs from `transform`'s in about 1 value in
    5,000, by one grey level (two at most, where the second pass's filter adds up neighbouring
    differences): Pillow takes the box in single precision, which moves its fixed-point filter
    weights a little. Any other transform is returned as it is.
    """
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return transform
    resize, crop = steps[0], steps[1]
    if not (isinstance(resize, T.Resize) and type(crop) is T.CenterCrop):
        return transform
    size = resize.size if isinstance(resize.size, int) else None
    if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
        size = resize.size[0]
    resample = _FILTERS.get(resize.interpolation)
    if size is None or resize.max_size is not None or resample is None or tuple(crop.size) != (size, size):
        return transform
    rest = T.Compose(steps[2:])

    def apply(image: Image.Image) -> _Out:
        if not isinstance(image, Image.Image) or not image.width > image.height > size:
            return transform(image)
        return rest(image.resize((size, size), resample, box=_crop_box(image.size, size)))

    return apply


def _crop_box(image_size: tuple[int, int], size: int) -> tuple[float, float, float, float]:
    """The source region (left, top, right, bottom) that becomes the centre `size` square.

    As torchvision: the shorter side is resized to `size`, the longer to
    ``int(size * long / short)``, and the crop starts at ``int(round((resized - size) / 2))``.
    """
    width, height = image_size
    short, long = sorted((width, height))
    resized = (size, int(size * long / short)) if width <= height else (int(size * long / short), size)
    left = round((resized[0] - size) / 2.0)
    top = round((resized[1] - size) / 2.0)
    scale_x, scale_y = width / resized[0], height / resized[1]
    return (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
