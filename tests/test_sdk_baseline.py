"""The whole-process cvat-sdk baseline of the throughput benchmark: it tags a task on its own."""

from __future__ import annotations

from benchmarks.dataset import BenchProject, FrameSpec
from benchmarks.sdk_baseline import run_baseline_process
from tests.conftest import TINY_MODEL
from tests.cvat_server import CvatTestServer


def test_the_cvat_sdk_process_tags_every_frame_of_a_fresh_task():
    spec = FrameSpec(count=6, size=(160, 90), segment_size=4, chunk_size=2)
    with CvatTestServer() as server:
        project = BenchProject.create(server, spec)
        task_id = project.new_task()
        assert set(project.tags_per_frame(task_id).values()) == {0}
        run = run_baseline_process(project, task_id, model=TINY_MODEL, device="cpu", timeout=300)
        # run_baseline_process checks one tag per frame itself; check it from here too.
        assert set(project.tags_per_frame(task_id).values()) == {1}
        names = {label_id: label["name"] for label_id, label in server.state.labels.items()}
        jobs = project.job_ids(task_id)
        tagged = {names[tag["label_id"]] for job in jobs for tag in server.annotations(job)["tags"]}
    assert tagged <= set(project.labels)
    assert run.frames == 6 and run.seconds > 0
    assert run.peak_rss_bytes is not None and run.peak_rss_bytes > 50 * 2**20  # torch and a model
