"""The overlapped pipeline: same results as a sequential run, and bounded memory under backpressure."""

from __future__ import annotations

import io
from pathlib import Path

from tests.conftest import TINY_MODEL, run_cli, variants
from tests.cvat_fixtures import PASSWORD, Project, server_state
from tests.cvat_server import CvatTestServer

FRAMES = 96
CHUNK = 4


def one_job_project(server: CvatTestServer) -> Project:
    server.add_user("annotator", PASSWORD)
    project_id = server.add_project(
        "throughput",
        owner="annotator",
        labels=[{"name": name, "type": "tag", "attributes": []} for name in ("cat", "coffee", "rocket")],
    )
    task = server.add_image_task(project_id, _jpegs(), name="many", segment_size=FRAMES, chunk_size=CHUNK)
    # The video task slot of Project is unused here: point it at the same task.
    return Project(server, project_id, [task], task, set())


def config(tmp_path: Path, name: str, **sections: dict) -> Path:
    lines = [f'model:\n  name: "{TINY_MODEL}"\n  pretrained: none\n  batch_size: {sections.pop("batch", 4)}']
    lines.append("routing:\n  accept_threshold: 0.5\n  min_margin: 0.0")
    for section, values in sections.items():
        lines.append(f"{section}:\n" + "\n".join(f"  {key}: {value}" for key, value in values.items()))
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(project: Project, config_path: Path, tmp_path: Path) -> None:
    assert run_cli("setup", "--project-id", str(project.project_id), env=project.env()).returncode == 0
    result = run_cli(
        "run", "--project-id", str(project.project_id), "--config", str(config_path),
        "--state", str(tmp_path / f"{config_path.stem}.db"), "--no-progress",
        env=project.env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_overlapped_run_equals_a_sequential_run(tmp_path: Path):
    fast = config(
        tmp_path, "fast", batch=8,
        cvat={"download_threads": 3, "prefetch_chunks": 4, "upload_queue": 3, "upload_batch_size": 5},
        decode={"workers": 4, "prefetch_batches": 3},
    )  # fmt: skip
    slow = config(
        tmp_path, "sequential", batch=1,
        cvat={"download_threads": 1, "prefetch_chunks": 1, "upload_queue": 1, "upload_batch_size": 1,
              "write_concurrency": 1, "prefetch_jobs": 0},
        decode={"workers": 1, "prefetch_batches": 0, "draft": "true"},
    )  # fmt: skip
    states = []
    for path in (fast, slow):
        with CvatTestServer() as server:
            project = one_job_project(server)
            run(project, path, tmp_path)
            states.append(server_state(project))
            assert server.violations == []
    assert states[0]["tags"] and states[0]["issues"], "the threshold should give both outcomes"
    assert states[0] == states[1]


def test_in_flight_frames_stay_within_the_queue_bounds_when_uploads_are_slow(tmp_path: Path):
    batch, prefetch_batches, prefetch_chunks, upload_batch, upload_queue, writers = 4, 1, 1, 4, 1, 2
    path = config(
        tmp_path, "bounded", batch=batch,
        cvat={"download_threads": 1, "prefetch_chunks": prefetch_chunks, "upload_queue": upload_queue,
              "upload_batch_size": upload_batch, "write_concurrency": writers},
        decode={"workers": 2, "prefetch_batches": prefetch_batches},
        review={"upload_suggestion": "false"},
        routing={"accept_threshold": 0.0, "min_margin": 0.0},
    )  # fmt: skip
    bound = (
        CHUNK * (prefetch_chunks + 1)  # chunks fetched ahead, and the one being handed out
        + batch * (prefetch_batches + 1)  # frames decoded ahead of the model
        + batch  # the batch in the model
        + upload_batch * (upload_queue + writers + 1)  # queued uploads, those in progress, the one filling
    )
    assert bound < FRAMES / 2, "the bound must be a real constraint"
    with CvatTestServer() as server:
        project = one_job_project(server)
        server.delay(r"/annotations", 0.15, method="PATCH", times=None)  # a slow upload stage
        run(project, path, tmp_path)
        downloaded = stored = worst = 0
        for request in server.requests:
            if request.method == "GET" and request.query.get("type") == "chunk":
                downloaded += CHUNK
            elif (
                request.method == "PATCH"
                and request.query.get("action") == "create"
                and request.status == 200
            ):
                stored += upload_batch
            worst = max(worst, downloaded - stored)
        assert stored >= FRAMES
        assert worst <= bound, f"{worst} frames in flight, bound {bound}"


def _jpegs() -> list[tuple[str, bytes]]:
    frames = []
    for name, image in variants(FRAMES, (96, 72)):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        frames.append((f"{name}.jpg", buffer.getvalue()))
    return frames
