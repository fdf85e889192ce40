"""Small real JPEG frames cut from the photographs in samples/images."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

from PIL import Image

from .media import encode_jpeg

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "samples" / "images"


@cache
def _photos() -> tuple[Image.Image, ...]:
    paths = sorted(SAMPLES_DIR.glob("*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no sample photographs in {SAMPLES_DIR}")
    return tuple(Image.open(p).convert("RGB") for p in paths)


def sample_frames(count: int, size: tuple[int, int] = (320, 240)) -> list[Image.Image]:
    """`count` distinct RGB frames of `size`: shifted crops of the sample photographs."""
    photos = _photos()
    frames = []
    for n in range(count):
        photo = photos[n % len(photos)]
        shift = (n // len(photos)) * 17
        side = min(photo.size) - shift * 2
        box = (shift, shift, shift + side, shift + side)
        frames.append(photo.crop(box).resize(size))
    return frames


def sample_jpegs(
    count: int,
    size: tuple[int, int] = (320, 240),
    *,
    prefix: str = "img_",
    widths: Sequence[int] | None = None,
) -> list[tuple[str, bytes]]:
    """(filename, JPEG bytes) pairs ready for `CvatTestServer.add_image_task`.

    `widths` gives each frame its own width (height stays `size[1]`), so frames can be
    told apart by size, as in the captures (320, 336, 352, ...).
    """
    frames = sample_frames(count, size)
    if widths is not None:
        frames = [f.resize((w, size[1])) for f, w in zip(frames, widths, strict=True)]
    return [(f"{prefix}{n}.jpg", encode_jpeg(frame, 90)) for n, frame in enumerate(frames)]
