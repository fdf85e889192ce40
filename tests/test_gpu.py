"""The pipeline on a CUDA GPU, against the same pipeline on the CPU.

Skipped where there is no GPU (CI has none); `make gpu-check` runs these on a machine that has
one, together with the GPU rows of `make bench`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from connectors.folder import FolderSource
from prelabel.assemble import build_pipeline
from prelabel.pipeline.preprocess import split
from prelabel.pipeline.worker import predict
from tests.conftest import LABELS, run_cli, tiny_model_config, variants, write_jpegs
from tests.cvat_fixtures import Project, tiny_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_batch_step_on_the_gpu_gives_the_cpu_values():
    pipeline = build_pipeline(tiny_model_config({"model.device": "cpu"}), LABELS)
    parts = split(pipeline.loaded.preprocess)
    pixels = torch.stack([parts.frame(image) for _, image in variants(6, (1280, 720))])
    assert pixels.dtype == torch.uint8

    on_gpu = parts.batch(pixels.cuda())

    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), parts.batch(pixels))


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_predictions_on_the_gpu_match_the_cpu(tmp_path: Path, precision: str):
    write_jpegs(tmp_path, variants(40, (1280, 720)))
    frames = list(FolderSource(tmp_path).frames())
    every_label = {"routing.top_k": len(LABELS)}
    on_cpu = build_pipeline(tiny_model_config({"model.device": "cpu", **every_label}), LABELS)
    on_gpu = build_pipeline(
        tiny_model_config({"model.device": "cuda", "model.precision": precision, **every_label}), LABELS
    )
    assert on_gpu.loaded.device.type == "cuda" and on_gpu.options.batch_size == 128

    expected = list(predict(frames, on_cpu.loaded, on_cpu.classifier, on_cpu.options))
    got = list(predict(frames, on_gpu.loaded, on_gpu.classifier, on_gpu.options))

    # fp32 differs from the CPU only by summation order (and TF32 convolutions); fp16/bf16
    # autocast by its rounding.
    tolerance = 2e-3 if precision == "fp32" else 5e-2
    assert [p.name for p in got] == [p.name for p in expected]
    for cpu, gpu in zip(expected, got, strict=True):
        assert cpu.error is None and gpu.error is None
        cpu_scores, gpu_scores = dict(cpu.scores), dict(gpu.scores)
        assert gpu_scores.keys() == cpu_scores.keys()
        for label, score in cpu_scores.items():
            assert gpu_scores[label] == pytest.approx(score, abs=tolerance)
        first, second = cpu.scores[0][1], cpu.scores[1][1]
        if first - second > 2 * tolerance:  # a clear winner on the CPU wins on the GPU too
            assert gpu.top_label == cpu.top_label


def test_a_cvat_run_on_the_gpu_tags_every_frame(project: Project, tmp_path: Path):
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    allocations = _gpu_allocations()
    result = run_cli(  # in this process (see run_cli), so its GPU allocations show here
        "run",
        "--project-id",
        str(project.project_id),
        *tiny_args("--device", "cuda", "--accept-threshold", "0", "--min-margin", "0"),
        env=project.env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert _gpu_allocations() > allocations
    for task_id in [*project.image_tasks, project.video_task]:
        jobs = project.server.jobs(task_id)
        tagged = {tag["frame"] for job in jobs for tag in project.server.annotations(job["id"])["tags"]}
        frames = {frame for job in jobs for frame in range(job["start_frame"], job["stop_frame"] + 1)}
        assert tagged == {frame for frame in frames if (task_id, frame) not in project.deleted}
    assert project.server.violations == []


def _gpu_allocations() -> int:
    """How many allocations torch's CUDA allocator has made in this process."""
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0)
