"""Media for the fake server: frame records and chunk building (zip of JPEGs, mp4 segments)."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import av
from PIL import Image, ImageOps

ORIENTATION = 0x0112
"""The EXIF orientation tag (274)."""


@dataclass
class Frame:
    """One task frame: its upload name, its size as shown, the bytes its original-quality
    chunk holds, and its decoded image, upright (None for a point cloud)."""

    name: str
    width: int
    height: int
    data: bytes
    image: Image.Image | None = field(repr=False)


def image_frame(name: str, data: bytes) -> Frame:
    """A frame from an uploaded image file (JPEG/PNG bytes), as CVAT keeps it.

    Follows cvat/apps/engine/media_extractors.py: an image whose EXIF orientation is not 1
    is served upright in both chunk qualities (ZipChunkWriter re-saves it turned, in its own
    format at quality 100 and without EXIF; ZipCompressedChunkWriter turns it before
    re-encoding), and its size is the turned one (`image_size_within_orientation`).
    Any other upload is stored as it came.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.getexif().get(ORIENTATION, 1) != 1:
        upright = ImageOps.exif_transpose(image)
        buffer = io.BytesIO()
        upright.save(buffer, format=image.format, quality=100, subsampling=0)
        image, data = upright, buffer.getvalue()
    return Frame(name, image.width, image.height, data, image.convert("RGB"))


def point_cloud_frame(name: str, data: bytes) -> Frame:
    """A frame of a 3D task from a ``.pcd`` file; its size is the header's WIDTH and HEIGHT, as
    CVAT's `ValidateDimension.get_pcd_properties` reads them."""
    header: dict[str, str] = {}
    for line in data.decode("ascii", "replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "DATA":  # the points follow, in ascii or binary
            break
        if key and not key.startswith("#"):
            header[key] = value
    return Frame(name, int(header["WIDTH"]), int(header["HEIGHT"]), data, None)


def pil_frame(name: str, image: Image.Image, quality: int = 95) -> Frame:
    """A frame from a PIL image (stored as JPEG)."""
    return image_frame(name, encode_jpeg(image.convert("RGB"), quality))


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG-encode an image."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_chunk(frames: Sequence[Frame], *, compressed: bool, quality: int) -> bytes:
    """A zip of frames numbered from the chunk's start.

    Follows cvat/apps/engine/media_extractors.py: ZipCompressedChunkWriter re-encodes
    each image as `{idx:06d}.jpeg`; ZipChunkWriter (original quality) stores the file as
    `image_frame` keeps it, named `{idx:06d}{original extension}` (its case kept). Both store
    a point cloud's file as it is, as `{idx:06d}.pcd`.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for idx, frame in enumerate(frames):
            if frame.image is None:
                zf.writestr(f"{idx:06d}.pcd", frame.data)
            elif compressed:
                zf.writestr(f"{idx:06d}.jpeg", encode_jpeg(frame.image, quality))
            else:
                ext = os.path.splitext(frame.name)[1] or ".jpeg"
                zf.writestr(f"{idx:06d}{ext}", frame.data)
    return buf.getvalue()


def video_chunk(frames: Sequence[Frame], *, fps: int = 25) -> bytes:
    """An H.264 mp4 segment holding the frames in order (PyAV decodes it back)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = frames[0].width
        stream.height = frames[0].height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "tune": "zerolatency"}
        for frame in frames:
            vf = av.VideoFrame.from_image(frame.image)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_video(data: bytes) -> list[Image.Image]:
    """Decode every frame of a video file into RGB images."""
    with av.open(io.BytesIO(data)) as container:
        return [f.to_image() for f in container.decode(video=0)]
