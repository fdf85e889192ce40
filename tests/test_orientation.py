"""Frames whose EXIF orientation turns them (phone photos) are scored upright, as CVAT shows them.

CVAT serves such uploads upright in both chunk qualities; the test server does the same
(checked here through cvat-sdk), and a local folder of them gives the same scores as CVAT.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cvat_sdk import make_client
from PIL import Image

from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import find_work
from connectors.cvat.session import CvatSession
from connectors.folder import FolderSource
from prelabel.assemble import build_pipeline
from prelabel.interface import Frame, Prediction
from prelabel.pipeline.decode import decode
from prelabel.pipeline.runner import run
from prelabel.pipeline.worker import predict
from tests.conftest import LABELS, SAMPLES
from tests.cvat_fixtures import PASSWORD, tag_project
from tests.cvat_server import CvatTestServer
from tests.test_scoring import ListSink, _tiny_config

ORIENTATION = 0x0112
# Orientation 6: the stored pixels are the upright picture turned a quarter anticlockwise;
# a viewer turns them back a quarter clockwise.
TURNED = 6
# A JPEG's EXIF block that Pillow 13 turns the image by and then fails to write back
# (`struct.error` in `exif_transpose`): a broken block on a good picture.
BROKEN_EXIF = (
    b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x03\x01\x07\x00\x02\x00\x00\x00\x06\x00\x00\x002"
    b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x87i\x00\x04\x00\x00\x00\x01\x00\x00\x008"
    b"\x00\x00\x00\x00Canon\x00\x00\x01\x90\x03\x00\x02\x00\x00\x00\x14\x00\x00\x00J\x00\x00\x00"
    b"\x002020\x0001:01 00:00\xcc00\x00"
)


def _upright(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A wide photo that looks different turned: the sample cat, with a red top-left corner."""
    image = Image.open(SAMPLES / "cat.jpg").convert("RGB").resize(size)
    image.paste((255, 0, 0), (0, 0, size[0] // 4, size[1] // 4))
    return image


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _turned(upright: Image.Image, fmt: str, exif: bytes | None = None) -> bytes:
    """`upright` stored turned, with the EXIF orientation that turns it back (or `exif`)."""
    tags = Image.Exif()
    tags[ORIENTATION] = TURNED
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    return _encode(stored, fmt, exif=exif or tags.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _red_corner(image: Image.Image) -> str:
    """Which corner is red: where the upright picture has it, 'top-left'."""
    pixels = _pixels(image)
    height, width = pixels.shape[:2]
    corners = {
        "top-left": pixels[: height // 8, : width // 8],
        "top-right": pixels[: height // 8, -width // 8 :],
        "bottom-left": pixels[-height // 8 :, : width // 8],
        "bottom-right": pixels[-height // 8 :, -width // 8 :],
    }
    return max(corners, key=lambda corner: corners[corner][..., 0].mean() - corners[corner][..., 1].mean())


def test_a_turned_frame_is_decoded_upright_with_its_shown_size():
    upright = _upright()
    image, size = decode(Frame(ref=0, name="a.png", data=_turned(upright, "PNG")), (32, 32), draft=True)
    assert size == (96, 64)
    assert np.array_equal(_pixels(image), _pixels(upright))  # PNG: the very pixels

    big = _upright((1280, 720))  # large enough for the 1/2 draft scale
    for exif in (None, BROKEN_EXIF):
        image, size = decode(
            Frame(ref=0, name="a.jpg", data=_turned(big, "JPEG", exif)), (224, 224), draft=True
        )
        assert size == (1280, 720)
        assert image.size == (640, 360)  # decoded at half scale, then turned
        assert _red_corner(image) == "top-left"

    # Without an orientation a frame stays as stored.
    image, size = decode(Frame(ref=0, name="a.png", data=_encode(upright, "PNG")), (32, 32), draft=True)
    assert size == (96, 64) and np.array_equal(_pixels(image), _pixels(upright))


def _scores(predictions: list[Prediction]) -> dict[str, dict[str, float]]:
    return {prediction.name: dict(prediction.scores) for prediction in predictions}


@pytest.fixture
def turned_task():
    """A task of three uploads of one picture: upright PNG, turned PNG, turned JPEG (as a phone
    names it: upper-case extension)."""
    upright = _upright()
    uploads = [
        ("upright.png", _encode(upright, "PNG")),
        ("turned.png", _turned(upright, "PNG")),
        ("turned.JPG", _turned(upright, "JPEG")),
    ]
    with CvatTestServer() as server:
        project_id = tag_project(server, "phone photos", LABELS)
        task_id = server.add_image_task(project_id, uploads, name="photos", segment_size=3, chunk_size=3)
        yield server, project_id, task_id, upright, uploads


def test_the_test_server_serves_turned_uploads_upright_as_cvat_does(turned_task):
    server, _, task_id, upright, _ = turned_task
    client = make_client(server.url, credentials=("annotator", PASSWORD))
    meta = client.api_client.tasks_api.retrieve_data_meta(task_id)[0]
    assert [(frame.name, frame.width, frame.height) for frame in meta.frames] == [
        ("upright.png", 96, 64),
        ("turned.png", 96, 64),
        ("turned.JPG", 96, 64),
    ]  # each frame's size as shown, not as stored (64x96)
    job_id = server.jobs(task_id)[0]["id"]
    for quality in ("original", "compressed"):
        _, response = client.api_client.jobs_api.retrieve_data(
            job_id, type="chunk", index=0, quality=quality, _parse_response=False
        )
        with zipfile.ZipFile(io.BytesIO(response.data)) as archive:
            names = archive.namelist()
            images = [Image.open(io.BytesIO(archive.read(name))) for name in names]
        if quality == "original":  # each file as kept, named with its extension as uploaded
            assert names == ["000000.png", "000001.png", "000002.JPG"]
            assert [image.format for image in images] == ["PNG", "PNG", "JPEG"]
            assert np.array_equal(_pixels(images[1]), _pixels(upright))  # turned back, losslessly
        else:
            assert names == ["000000.jpeg", "000001.jpeg", "000002.jpeg"]
        for image in images:
            assert image.size == (96, 64)
            assert ORIENTATION not in image.getexif()  # a client must not turn it again
            assert _red_corner(image) == "top-left"


def test_a_folder_of_turned_photos_scores_as_the_same_photos_in_cvat(turned_task, tmp_path: Path):
    server, project_id, _, _, uploads = turned_task
    config = _tiny_config(tmp_path)
    pipeline = build_pipeline(config, LABELS)

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in uploads:
        (folder / name).write_bytes(data)
    sink = ListSink()
    run(FolderSource(folder), sink, pipeline, progress=False)
    predictions = [decision.prediction for decision in sink.decisions]
    assert {prediction.name: prediction.size for prediction in predictions} == dict.fromkeys(
        ["upright.png", "turned.png", "turned.JPG"], (96, 64)
    )
    local = _scores(predictions)
    assert local["turned.png"] == pytest.approx(local["upright.png"], abs=1e-6)
    # JPEG's loss moves scores by about 0.002; the picture left turned moves them by 0.03.
    assert local["turned.JPG"] == pytest.approx(local["upright.png"], abs=0.005)

    session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))
    (plan,) = find_work(session, project_id=project_id).jobs
    frames = JobFrameSource(session, plan).frames()
    from_cvat = _scores(list(predict(frames, pipeline.loaded, pipeline.classifier, pipeline.options)))
    assert from_cvat.keys() == local.keys()
    for name in ("upright.png", "turned.png"):  # original chunks hold PNGs losslessly
        assert from_cvat[name] == pytest.approx(local[name], abs=1e-6)
    assert from_cvat["turned.JPG"] == pytest.approx(local["turned.JPG"], abs=0.005)  # re-saved by CVAT
