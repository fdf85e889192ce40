"""Shared fixtures: a tiny random OpenCLIP model, real photographs, and the CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

    from prelabel.config import Config

# Under pytest-xdist each worker gets its share of the cores for torch's threads (and so do the
# CLI processes the tests start): two workers each running two OpenMP threads on two cores
# keep them waiting for each other at every parallel region. Set before any test imports torch.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "images"
TINY_MODEL = f"local-dir:{REPO / 'tests' / 'assets' / 'tiny-clip'}"
LABELS = ["cat", "coffee", "rocket", "astronaut", "galaxy"]


def tiny_model_config(overrides: Mapping[str, object] | None = None, path: Path | None = None) -> Config:
    """The config at `path` (the defaults without one) with the tiny random model, and
    `overrides` in `prelabel.config.load_config`'s dotted keys (``{"model.batch_size": 2}``)."""
    from prelabel.config import load_config

    return load_config(path, {"model.name": TINY_MODEL, "model.pretrained": "none", **(overrides or {})})


def tiny_open_clip_config() -> dict:
    """The tiny model's ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``)."""
    return json.loads((Path(TINY_MODEL.removeprefix("local-dir:")) / "open_clip_config.json").read_text())


def tiny_state(shift: float) -> dict[str, torch.Tensor]:
    """The tiny model's seeded random weights, each moved by `shift` (a checkpoint's, not the
    random init's, once `shift` is not 0)."""
    import torch

    from prelabel.config import ModelConfig
    from prelabel.pipeline.model import load_model

    model = load_model(ModelConfig(name=TINY_MODEL, pretrained="none")).model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(shift)
    return {key: tensor.clone() for key, tensor in model.state_dict().items()}


def resident_kib(selected: Callable[[int, str], bool]) -> int:
    """KiB resident in this process's mappings for which ``selected(start address, file path)``
    holds, read from /proc/self/smaps here rather than with prelabel's own reader (Linux)."""
    kib, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            fields = line.split(maxsplit=5)
            counting = selected(int(fields[0].split("-")[0], 16), fields[5] if len(fields) == 6 else "")
        elif counting and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return kib


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


def thread_nice(thread: threading.Thread | None = None) -> int:
    """The own nice value of `thread` (default: the calling one); Linux, where a thread has one."""
    native = threading.get_native_id() if thread is None else thread.native_id
    return os.getpriority(os.PRIO_PROCESS, native or 0)


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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `prelabel ARGS` as a user would, in this process; returns what a process would.

    It goes through `run_command_line`, the console entry point's own error handling, in a
    fresh temporary folder unless `cwd` is given (so that the default state file
    .prelabel/state.db never lands in the checkout), with `env` over the environment, and
    with logging and warnings as a new process has them; all of it is put back afterwards.
    An exception that escapes (--debug) prints its
    traceback and gives exit code 1, as the interpreter does. `run_cli_process` runs a
    real process, for what needs one.
    """
    from click.testing import CliRunner

    from prelabel.cli import run_command_line

    folder = cwd or tempfile.mkdtemp(prefix="prelabel-cli-")
    with _as_a_new_process(folder), CliRunner().isolation(env=env) as (stdout, stderr, _):
        try:
            code = run_command_line(list(args), prog_name="prelabel")
        except SystemExit as exc:  # as the interpreter ends on sys.exit(code)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    return subprocess.CompletedProcess(["prelabel", *args], code, out, err)


@contextmanager
def _as_a_new_process(cwd: str | Path) -> Iterator[None]:
    """Working directory, environment, logging and warnings as a fresh `prelabel` process would
    find them, restored on the way out."""
    root = logging.getLogger()
    for name in _LOGGERS_THE_CLI_SETS:  # exist from here on, so that their levels are restored
        logging.getLogger(name)
    loggers = [root, *(lg for lg in root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    saved_loggers = [(lg, lg.level, list(lg.handlers), lg.disabled, lg.propagate) for lg in loggers]
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    for handler in list(root.handlers):  # pytest's log capture: a new process has none
        root.removeHandler(handler)
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()  # Python's defaults, printed to (the captured) stderr
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _warning_to_stderr
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in list(root.handlers):  # basicConfig's handler on the captured stderr
            root.removeHandler(handler)
            handler.close()
        for lg, level, handlers, disabled, propagate in saved_loggers:
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.disabled, lg.propagate = disabled, propagate


_LOGGERS_THE_CLI_SETS = (
    "urllib3",
    "PIL",
    "huggingface_hub",
    "connectors.queue",
    "connectors.cvat.queued",
    "prelabel.serve",
)


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli_process(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m prelabel ARGS` as a real process; returns the CompletedProcess.

    Slower than `run_cli` (a new interpreter imports torch and open_clip): for the tests
    that are about the process itself. Its working directory is as `run_cli`'s.
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
