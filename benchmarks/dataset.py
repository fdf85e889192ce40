"""The benchmark's data: realistic 1280x720 photo frames and a CVAT test project to hold them.

Frames are cut from the real photographs in ``samples/images``: a random 16:9 crop, resized
to the frame size, sometimes mirrored, colour-jittered and given a little sensor grain, then
saved as JPEG. Every frame differs, and the same index always gives the same frame.

Each measured run gets a fresh task (new jobs, no annotations, cold chunk cache) over the
same frames. The copies share the decoded frames in the server's memory, so many copies of
a large task cost next to nothing.
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cvat_sdk import Client
from PIL import Image, ImageEnhance, ImageOps

from tests.cvat_server import CvatTestServer
from tests.cvat_server.media import Frame, image_frame

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "images"
LABELS = ("cat", "coffee", "rocket", "astronaut", "galaxy")
"""Tag labels that fit the sample photographs."""
USERNAME = "bench"
PASSWORD = "benchmark password"


@dataclass(frozen=True)
class FrameSpec:
    """What the frames look like, and how the task stores and splits them."""

    count: int
    size: tuple[int, int] = (1280, 720)
    quality: int = 90
    """JPEG quality of the uploaded images."""
    segment_size: int = 128
    """Frames per job."""
    chunk_size: int = 72
    """Frames per data chunk."""
    image_quality: int = 70
    """Quality of the server's re-encoded ("compressed") chunks; CVAT's default."""
    seed: int = 0


def make_jpegs(spec: FrameSpec) -> list[tuple[str, bytes]]:
    """(file name, JPEG bytes) for `spec.count` distinct frames."""
    photos = [(path.stem, Image.open(path).convert("RGB")) for path in sorted(SAMPLES.glob("*.jpg"))]
    if not photos:
        raise FileNotFoundError(f"no sample photographs in {SAMPLES}")
    grain = _grain_fields(spec.size, spec.seed)
    jpegs = []
    for index in range(spec.count):
        stem, photo = photos[index % len(photos)]
        rng = random.Random(spec.seed * 1_000_003 + index)
        frame = _vary(photo, spec.size, rng, grain[index % len(grain)])
        buffer = io.BytesIO()
        frame.save(buffer, format="JPEG", quality=spec.quality)
        jpegs.append((f"{stem}-{index:05d}.jpg", buffer.getvalue()))
    return jpegs


def _grain_fields(size: tuple[int, int], seed: int, count: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    width, height = size
    return [rng.normal(0.0, 3.0, (height, width, 1)).round().astype(np.int16) for _ in range(count)]


def _vary(photo: Image.Image, size: tuple[int, int], rng: random.Random, grain: np.ndarray) -> Image.Image:
    """A random crop of `photo` at the frame's aspect ratio, resized, flipped and jittered."""
    width, height = size
    aspect = width / height
    box_w = min(photo.width, photo.height * aspect)
    scale = rng.uniform(0.6, 1.0)
    crop_w, crop_h = box_w * scale, box_w * scale / aspect
    left = rng.uniform(0, photo.width - crop_w)
    top = rng.uniform(0, photo.height - crop_h)
    image = photo.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    pixels = np.asarray(image, dtype=np.int16) + grain
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


@dataclass
class BenchProject:
    """A project with the benchmark's tag labels on a running test server."""

    server: CvatTestServer
    project_id: int
    spec: FrameSpec
    frames: list[Frame]
    """The server-side frames every task copy shares."""
    labels: tuple[str, ...] = LABELS
    _copies: int = 0

    @classmethod
    def create(cls, server: CvatTestServer, spec: FrameSpec, labels: Sequence[str] = LABELS) -> BenchProject:
        """Add the user and the project, and decode the frames once for the server."""
        server.add_user(USERNAME, PASSWORD)
        project_id = server.add_project(
            "throughput benchmark",
            owner=USERNAME,
            labels=[{"name": name, "type": "tag", "attributes": []} for name in labels],
        )
        frames = [image_frame(name, data) for name, data in make_jpegs(spec)]
        return cls(server, project_id, spec, frames, tuple(labels))

    def env(self) -> dict[str, str]:
        """The environment variables the prelabel CLI logs in with."""
        return {"CVAT_HOST": self.server.url, "CVAT_USERNAME": USERNAME, "CVAT_PASSWORD": PASSWORD}

    def client(self, cache_dir: Path | None = None) -> Client:
        """A logged-in cvat-sdk client (with its dataset cache in `cache_dir`, if given)."""
        from cvat_sdk.core.client import Config

        config = Config(cache_dir=cache_dir) if cache_dir is not None else Config()
        client = Client(self.server.url, config=config)
        client.login((USERNAME, PASSWORD))
        return client

    def new_task(self, times: int = 1) -> int:
        """A fresh image task over the frames (repeated `times` times, renamed); returns its id.

        Built like `CvatTestServer.add_image_task`, but on the already-decoded frames.
        """
        self._copies += 1
        frames = [
            dataclasses.replace(frame, name=f"r{round_}-{frame.name}") if round_ else frame
            for round_ in range(times)
            for frame in self.frames
        ]
        return self.server.state.add_task(
            self.project_id,
            frames,
            name=f"bench-{self._copies}-{len(frames)}",
            owner=None,
            segment_size=self.spec.segment_size,
            chunk_size=self.spec.chunk_size,
            media_type="image",
            image_quality=self.spec.image_quality,
        )

    def job_ids(self, task_id: int) -> list[int]:
        """The task's annotation jobs, in frame order."""
        return [job["id"] for job in self.server.jobs(task_id)]

    def tags_per_frame(self, task_id: int) -> dict[int, int]:
        """How many tags each task frame holds on the server (frames without tags: 0)."""
        counts = dict.fromkeys(range(len(self.server.state.tasks[task_id]["frames"])), 0)
        for job_id in self.job_ids(task_id):
            for tag in self.server.annotations(job_id)["tags"]:
                counts[tag["frame"]] = counts.get(tag["frame"], 0) + 1
        return counts

    def check_one_tag_per_frame(self, task_id: int, who: str) -> None:
        """Raise unless every frame of the task got exactly one tag (a failed run must not count)."""
        counts = self.tags_per_frame(task_id)
        wrong = {frame: n for frame, n in counts.items() if n != 1}
        if wrong:
            sample = ", ".join(f"frame {frame}: {n}" for frame, n in list(wrong.items())[:5])
            raise RuntimeError(
                f"{who}: {len(wrong)} of {len(counts)} frames of task {task_id} do not hold exactly "
                f"one tag ({sample}); the run failed and is not measured"
            )
