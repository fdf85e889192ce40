"""Decoding one frame into an RGB image the model's transform accepts.

Every way a frame can be unreadable raises `DecodeError` with a short reason that ends
up in the review queue; nothing here stops a run.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from prelabel.interface import Frame


class DecodeError(Exception):
    """The frame cannot be turned into an image; the message is the review reason."""


def decode(frame: Frame, size: tuple[int, int], *, draft: bool) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `frame` to RGB; returns the image and the frame's original (width, height).

    With `draft`, a JPEG much larger than `size` is decoded at a reduced scale (Pillow's
    draft mode picks the largest 1/2, 1/4 or 1/8 scale that still covers `size`).
    """
    if frame.error is not None:
        raise DecodeError(frame.error)
    data = frame.data
    if isinstance(data, Image.Image):
        return _to_rgb(data), data.size
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        original = image.size
        if draft and image.format == "JPEG":
            image.draft("RGB", size)
        image.load()
        return _to_rgb(image), original
    except UnidentifiedImageError:
        raise DecodeError("not an image (unknown or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clip everything to white.
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")
