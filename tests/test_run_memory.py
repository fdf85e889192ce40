"""A labeling run's memory: the text tower is released once the classifiers exist (scores do not
change), and calibration-only libraries are never loaded."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from connectors.folder import FolderSource
from prelabel.assemble import PipelineCache, build_pipeline
from prelabel.config import Config
from prelabel.errors import ModelError
from prelabel.interface import Decision
from prelabel.pipeline.runner import Pipeline, run
from tests.conftest import LABELS, TINY_MODEL, tiny_model_config

ROOT = Path(__file__).resolve().parent.parent


class ListSink:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def write(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def close(self) -> None:
        pass


def _config(tmp_path: Path, **overrides: object) -> Config:
    return tiny_model_config(
        {
            "model.batch_size": 5,
            "model.cache_dir": str(tmp_path / "cache"),
            "routing.multi_label": True,  # every label's probability in each prediction
            **overrides,
        }
    )


def _scores(pipeline: Pipeline, photos: Path) -> dict[str, dict[str, float]]:
    sink = ListSink()
    run(FolderSource(photos), sink, pipeline, progress=False)
    return {d.prediction.name: dict(d.prediction.scores) for d in sink.decisions}


def test_images_only_pipeline_scores_real_photos_as_the_full_one_without_text_weights(
    tmp_path: Path, photo_dir: Path
):
    full = build_pipeline(_config(tmp_path, **{"prompts.background": ["a blurry photo"]}), LABELS)
    expected = _scores(full, photo_dir)
    text_module = weakref.ref(full.loaded.model.transformer)
    text_size = sum(p.numel() for n, p in full.loaded.model.named_parameters() if not n.startswith("visual."))

    slim = full.images_only()
    assert full.loaded.has_text_tower and not slim.loaded.has_text_tower
    assert slim.loaded.identity == full.loaded.identity and slim.fingerprint == full.fingerprint
    names = list(slim.loaded.model.state_dict())
    assert names and all(n.startswith("visual.") or n.startswith("logit_") for n in names), names
    kept = {id(p) for p in slim.loaded.model.parameters()}
    shared = {id(p) for p in full.loaded.model.visual.parameters()} | {id(full.loaded.model.logit_scale)}
    assert kept <= shared
    assert text_size > 0.1 * sum(p.numel() for p in full.loaded.model.parameters())

    del full
    gc.collect()
    assert text_module() is None, "something still holds the text tower"
    got = _scores(slim, photo_dir)
    assert got.keys() == expected.keys() and len(got) == 12
    for name, scores in expected.items():
        assert set(got[name]) == set(LABELS)
        for label, value in scores.items():
            assert got[name][label] == pytest.approx(value, abs=1e-6), (name, label)
    assert slim.loaded.images_only() is slim.loaded


def test_encoding_text_after_the_release_is_a_model_error_but_cached_classifiers_still_load(
    tmp_path: Path,
):
    config = _config(tmp_path)
    full = build_pipeline(config, LABELS)
    slim = full.images_only().loaded
    with pytest.raises(ModelError, match="text tower was released"):
        slim.model.encode_text(torch.zeros((1, 77), dtype=torch.long))
    with pytest.raises(ModelError, match="text tower was released"):
        build_pipeline(config, ["a label never built before"], loaded=slim)
    again = build_pipeline(config, LABELS, loaded=slim)  # read from the classifier cache on disk
    assert torch.equal(again.classifier.weights, full.classifier.weights)
    assert again.classifier.logit_scale == full.classifier.logit_scale


def test_a_long_lived_process_keeps_the_text_tower_for_later_label_sets(tmp_path: Path):
    cache = PipelineCache()
    config = _config(tmp_path)
    first = cache.get(config, LABELS)
    second = cache.get(config, ["cat", "a label never built before"])
    assert second.loaded is first.loaded and first.loaded.has_text_tower
    assert second.classifier.labels == ("cat", "a label never built before")


def _folder_run_in_a_new_process(probe: str, tmp_path: Path, photos: Path) -> str:
    """The last line that `probe` prints, run as a new Python process with `prelabel folder`'s
    arguments (the tiny model on the CPU, over `photos`) in its argv; the run must write its tags."""
    args = [photos, "--labels", ",".join(LABELS), "--out", tmp_path / "out", "--model", TINY_MODEL]
    args += ["--pretrained", "none", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", probe, "folder", *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (tmp_path / "out" / "annotations.xml").is_file(), done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_labeling_run_never_imports_scipy(tmp_path: Path, photo_dir: Path):
    """scipy (about 50 MB of RSS) is for calibration only; `prelabel folder` does without it."""
    probe = (
        "import sys\n"
        "from prelabel.cli.group import run_command_line\n"
        "code = run_command_line(sys.argv[1:])\n"
        "print('exit', code, 'scipy', 'scipy' in sys.modules)\n"
    )
    assert _folder_run_in_a_new_process(probe, tmp_path, photo_dir) == "exit 0 scipy False"


_GPU_PAGES_PROBE = """
import sys
import torch
from prelabel.cli.group import run_command_line
from tests.conftest import resident_kib

def gpu_library_kib():  # resident pages of the CUDA libraries that torch's CUDA build maps
    return resident_kib(lambda _start, file: "/site-packages/nvidia/" in file or "libtorch_cuda" in file)

before = gpu_library_kib()
code = run_command_line(sys.argv[1:])
print("exit", code, "before", before, "after", gpu_library_kib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps, madvise")
def test_a_cpu_run_hands_back_the_pages_of_the_cuda_libraries(tmp_path: Path, photo_dir: Path):
    """torch's CUDA build maps its CUDA libraries at import even for a CPU model; before the
    model is loaded for the CPU their pages leave the process, and the run does not read them back."""
    words = _folder_run_in_a_new_process(_GPU_PAGES_PROBE, tmp_path, photo_dir).split()
    assert words[:2] == ["exit", "0"], words
    before, after = int(words[3]), int(words[5])
    if before < 8 * 1024:
        pytest.skip(f"this torch maps only {before} KiB of CUDA libraries (a CPU build)")
    assert after < before / 5, (before, after)
