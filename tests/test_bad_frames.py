"""One bad frame never stops a run: odd images are handled, broken ones go to review with a reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from connectors.folder import FolderSource
from prelabel.assemble import build_pipeline
from prelabel.pipeline.runner import run
from tests.conftest import LABELS, SAMPLES, run_cli
from tests.cvat_fixtures import tiny_args
from tests.test_scoring import ListSink, _tiny_config


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_odd_and_broken_frames(tmp_path: Path):
    photo = Image.open(SAMPLES / "cat.jpg").convert("RGB")
    folder = tmp_path / "frames"
    folder.mkdir()
    good = {
        "cmyk.jpg": _save(photo.convert("CMYK"), "JPEG"),
        "sixteen_bit.png": _save(
            Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257), "PNG"
        ),
        "palette.png": _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "alpha.png": _save(photo.convert("RGBA"), "PNG"),
        "huge.jpg": _save(photo.resize((10000, 10000)), "JPEG", quality=60),
        "plain.jpg": _save(photo, "JPEG"),
    }
    jpeg = good["plain.jpg"]
    bad = {
        "zero.jpg": (b"", "unreadable: empty file (0 bytes)"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "unreadable: corrupt or truncated image"),
        "garbage.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "unreadable: not an image"),
        "text.jpg": (b"not an image at all", "unreadable: not an image"),
        "huge.png": (_save(Image.new("L", (9000, 9000)), "PNG"), "unreadable: image too large"),
    }
    for name, data in good.items():
        (folder / name).write_bytes(data)
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)

    config = _tiny_config(tmp_path, multi_label=False, min_margin=0.0)
    sink = ListSink()
    stats = run(FolderSource(folder), sink, build_pipeline(config, LABELS), progress=False)
    assert stats.frames == len(good) + len(bad)
    by_name = {decision.prediction.name: decision for decision in sink.decisions}
    for name in good:
        decision = by_name[name]
        assert decision.prediction.error is None, (name, decision.prediction.error)
        assert decision.accepted, (name, decision.reason)  # threshold 0: every readable frame
        assert len(decision.prediction.scores) == 5
    assert by_name["huge.jpg"].prediction.size == (10000, 10000)
    for name, (_, reason) in bad.items():
        decision = by_name[name]
        assert not decision.accepted
        assert decision.reason.startswith(reason), (name, decision.reason)


def test_a_video_chunk_that_fails_to_decode_sends_only_its_frames_to_review(project, tmp_path: Path):
    server = project.server
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    video_job = server.jobs(project.video_task)[0]["id"]
    # The first chunk of the video job arrives as garbage (a 200 with a body that is no mp4).
    server.fail(rf"^/api/jobs/{video_job}/data/?$", 200, times=1, body="this is not an mp4")
    result = run_cli(
        "run", "--job-id", str(video_job),
        *tiny_args("--accept-threshold", "0", "--min-margin", "0"), env=project.env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    chunk = 4  # the fixture's video chunk size
    issues = {issue["frame"]: issue for issue in server.issues(video_job)}
    assert set(issues) == set(range(chunk))
    for issue in issues.values():
        (comment,) = server.comments(issue["id"])
        assert "chunk 0 cannot be decoded" in comment["message"]
    tagged = {tag["frame"] for tag in server.annotations(video_job)["tags"]}
    assert tagged == set(range(chunk, 10))
