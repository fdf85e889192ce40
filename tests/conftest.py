"""Shared fixtures: a tiny random OpenCLIP model, real photographs, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "images"
TINY_MODEL = f"local-dir:{REPO / 'tests' / 'assets' / 'tiny-clip'}"
LABELS = ["cat", "coffee", "rocket", "astronaut", "galaxy"]


def variants(count: int, size: tuple[int, int] | None = None) -> list[tuple[str, Image.Image]]:
    """`count` distinct real photographs: the samples, then crops, flips and rotations of them."""
    originals = [(path.stem, Image.open(path).convert("RGB")) for path in sorted(SAMPLES.glob("*.jpg"))]
    images = []
    for i in range(count):
        stem, image = originals[i % len(originals)]
        round_ = i // len(originals)
        if round_:
            w, h = image.size
            inset = 0.05 * (round_ % 5)
            image = image.crop(
                (int(w * inset), int(h * inset), int(w * (1 - inset / 2)), int(h * (1 - inset / 3)))
            )
            if round_ % 2:
                image = ImageOps.mirror(image)
            image = image.rotate(7 * round_, expand=False)
        if size:
            image = ImageOps.fit(image, size)
        images.append((f"{stem}-{i:04d}", image))
    return images


def write_jpegs(folder: Path, images: list[tuple[str, Image.Image]], quality: int = 90) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images:
        path = folder / f"{name}.jpg"
        image.save(path, quality=quality)
        paths.append(path)
    return paths


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A config file for the tiny random model, with a private classifier cache."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
model:
  name: "{TINY_MODEL}"
  pretrained: none
  batch_size: 4
  cache_dir: "{tmp_path / "cache"}"
labels:
  - name: cat
  - name: coffee
    descriptions: ["a cup of coffee", "a photo of an espresso"]
  - name: rocket
  - name: astronaut
  - name: galaxy
routing:
  accept_threshold: 0.2
  min_margin: 0.0
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """A folder of 12 real photographs."""
    folder = tmp_path / "photos"
    write_jpegs(folder, variants(12))
    return folder


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m prelabel ARGS` as a user would; returns the CompletedProcess.

    It runs in a fresh temporary folder unless `cwd` is given, so that the default state
    file (.prelabel/state.db) never lands in the checkout.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "prelabel", *args],
        capture_output=True,
        text=True,
        cwd=cwd or tempfile.mkdtemp(prefix="prelabel-cli-"),
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture
def project():
    """A CVAT project on a fresh test server (see tests/cvat_fixtures.py)."""
    from tests.cvat_fixtures import build_project
    from tests.cvat_server import CvatTestServer

    with CvatTestServer() as server:
        yield build_project(server)
