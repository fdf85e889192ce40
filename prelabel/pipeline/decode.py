"""Decoding one frame into an RGB image the model's transform accepts.

Every way a frame can be unreadable raises `DecodeError` with a short reason that ends
up in the review queue; nothing here stops a run.
"""

from __future__ import annotations

import contextlib
import io
import warnings

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from prelabel.interface import Frame

# Our own `max_pixels` check below guards memory; Pillow's warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


MAX_PIXELS = 64_000_000
"""The largest image decoded at full size (about 200 MB as RGB); larger JPEGs are decoded
at a reduced scale, other formats go to review."""


_TURNED = frozenset({5, 6, 7, 8})
"""EXIF orientations that turn the image by a quarter: its shown width is its stored height."""


class DecodeError(Exception):
    """The frame cannot be turned into an image; the message is the review reason."""


def decode(
    frame: Frame, size: tuple[int, int], *, draft: bool, max_pixels: int = MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode `frame` to RGB, upright; returns the image and the frame's original (width, height).

    A frame is turned as its EXIF orientation says, and its size is the turned one: what a
    viewer shows, and what CVAT shows and stores (its chunks hold such frames turned already).
    With `draft`, a JPEG much larger than `size` is decoded at a reduced scale (Pillow's
    draft mode picks the largest 1/2, 1/4 or 1/8 scale that still covers `size`, either way
    round). A JPEG over `max_pixels` is always decoded at reduced scale; any other image over
    it is an error, so that one huge frame cannot exhaust memory.
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
        huge = original[0] * original[1] > max_pixels
        if image.format == "JPEG" and (draft or huge):
            side = max(size)  # covers `size` whichever way the orientation turns the frame
            image.draft("RGB", (side, side))
        if image.size[0] * image.size[1] > max_pixels:
            raise DecodeError(
                f"image too large: {original[0]}x{original[1]} pixels (at most {max_pixels} are decoded)"
            )
        image.load()
        if _turn_upright(image):
            original = (original[1], original[0])
        return _to_rgb(image), original
    except UnidentifiedImageError:
        raise DecodeError("not an image (unknown or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None


def _turn_upright(image: Image.Image) -> bool:
    """Turn `image` in place as its EXIF orientation says; True if that swapped its sides.

    Pillow raises on some broken EXIF blocks, before turning the image or after; either way
    the pixels are good, so the frame is still decoded, as far as it was turned.
    """
    orientation = 1
    with contextlib.suppress(Exception):  # a failure here is in the metadata, not in the pixels
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        ImageOps.exif_transpose(image, in_place=True)
    return orientation in _TURNED


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clip everything to white.
        image = image.point(lambda value: value / 256).convert("L")
    return image.convert("RGB")
