"""The throughput benchmark's (b) measurement: the real CLI against the test server, its clocks."""

from __future__ import annotations

import re

from benchmarks.dataset import BenchProject, FrameSpec
from benchmarks.prelabel_cli import run_prelabel, setup_project
from tests.conftest import TINY_MODEL
from tests.cvat_server import CvatTestServer


def test_the_in_run_window_starts_once_the_model_is_ready_and_the_first_chunk_is_asked_for():
    spec = FrameSpec(count=6, size=(160, 90), segment_size=4, chunk_size=2)
    with CvatTestServer() as server:
        project = BenchProject.create(server, spec)
        setup_project(project)
        task_id = project.new_task()
        run = run_prelabel(project, task_id, model=TINY_MODEL, device="cpu", batch_size=4, timeout=300)
        assert set(project.tags_per_frame(task_id).values()) == {1}
    assert run.frames == 6
    # The model's readiness, from the CLI's --profile, lands on the benchmark's clock inside the
    # process's life and before its first write: no tag can be written without the model.
    assert run.model_ready_seconds is not None and run.first_write_seconds is not None
    assert 0 < run.model_ready_seconds < run.first_write_seconds < run.process_seconds
    # The CLI counts model_ready_at from its run's start, which comes after the interpreter
    # started and the CLI was imported: from the process start it can only be later.
    ready_at = float(re.search(r"model_ready_at ([\d.]+)s", run.cli_stages)[1])  # rounded to 0.1 s
    assert run.model_ready_seconds >= ready_at - 0.06
    # The window is the later start of the two, so never longer than from the first chunk.
    assert run.from_first_chunk_seconds is not None
    assert 0 < run.in_run_seconds <= run.from_first_chunk_seconds
    assert run.process_seconds - run.model_ready_seconds >= run.in_run_seconds
