"""Speed on a slow server: writes overlap, and the next job's chunks come before the job starts.

Both are read from the test server's request log (when each request arrived and was
answered), with its latency model of a real CVAT 2.73 on, not from wall-clock times.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prelabel.pipeline.stream import ConcurrentWriter
from tests.conftest import TINY_MODEL, run_cli, variants
from tests.cvat_fixtures import PASSWORD
from tests.cvat_server import CvatTestServer, LoggedRequest

CHUNK = 4


def _project(server: CvatTestServer, frames: int, segment_size: int) -> tuple[int, list[int]]:
    """A project with one image task of `frames` frames in jobs of `segment_size`: (project, job ids)."""
    server.add_user("annotator", PASSWORD)
    project_id = server.add_project(
        "speed",
        owner="annotator",
        labels=[{"name": name, "type": "tag", "attributes": []} for name in ("cat", "coffee", "rocket")],
    )
    images = []
    for name, image in variants(frames, (64, 48)):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append((f"{name}.jpg", buffer.getvalue()))
    task = server.add_image_task(
        project_id, images, name="speed", segment_size=segment_size, chunk_size=CHUNK
    )
    return project_id, [job["id"] for job in server.jobs(task)]


def _run(server: CvatTestServer, project_id: int, tmp_path: Path, name: str, **cvat: object) -> None:
    env = {"CVAT_HOST": server.url, "CVAT_USERNAME": "annotator", "CVAT_PASSWORD": PASSWORD}
    assert run_cli("setup", "--project-id", str(project_id), env=env).returncode == 0
    accept = cvat.pop("accept_threshold")
    lines = [
        f'model:\n  name: "{TINY_MODEL}"\n  pretrained: none\n  batch_size: 4',
        f"routing:\n  accept_threshold: {accept}\n  min_margin: 0.0",
        "cvat:\n" + "\n".join(f"  {key}: {value}" for key, value in cvat.items()),
    ]
    config = tmp_path / f"{name}.yaml"
    config.write_text("\n".join(lines) + "\n")
    server.reset_counters()
    result = run_cli(
        "run", "--project-id", str(project_id), "--config", str(config),
        "--state", str(tmp_path / f"{name}.db"), "--no-progress", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def _most_at_once(requests: list[LoggedRequest]) -> int:
    """The largest number of these requests the server was answering at the same moment."""
    events = sorted([(r.started, 1) for r in requests] + [(r.finished, -1) for r in requests])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_review_issues_are_created_concurrently_and_before_their_suggestion_tags(tmp_path: Path) -> None:
    frames, writers = 12, 4
    with CvatTestServer(latency="cvat-2.73-2core") as server:
        project_id, _ = _project(server, frames, segment_size=frames)
        _run(server, project_id, tmp_path, "review", accept_threshold=1.0, write_concurrency=writers)
        issues = [r for r in server.requests if r.method == "POST" and r.path.rstrip("/") == "/api/issues"]
        tags = [r for r in server.requests if r.method == "PATCH" and r.query.get("action") == "create"]
        assert len(issues) == frames and len(server.issues()) == frames
        assert 2 <= _most_at_once(issues) <= writers
        # One batch holds every suggestion tag: it waits for the issues of its frames.
        assert len(tags) == 1 and tags[0].started >= max(r.finished for r in issues)
        # Overlapping writes: the issues took well under the time of one after another.
        busy = sum(r.finished - r.started for r in issues)
        assert max(r.finished for r in issues) - min(r.started for r in issues) < 0.6 * busy
        assert server.violations == []


def test_the_next_jobs_first_chunk_is_requested_before_the_current_job_is_written(tmp_path: Path) -> None:
    order = {}
    for prefetch_jobs in (1, 0):
        with CvatTestServer(latency="cvat-2.73-2core*0.2") as server:
            project_id, (first, second) = _project(server, 16, segment_size=8)
            _run(
                server, project_id, tmp_path, f"prefetch{prefetch_jobs}", accept_threshold=0.0,
                prefetch_jobs=prefetch_jobs, upload_batch_size=2,
            )  # fmt: skip
            log = server.requests
            at = {(r.method, r.path.rstrip("/")): [] for r in log}
            for r in log:
                at[r.method, r.path.rstrip("/")].append(r)
            writes = at.get(("PATCH", f"/api/jobs/{first}/annotations"), [])
            routed = at.get(("PATCH", f"/api/jobs/{first}"), [])
            data = at.get(("GET", f"/api/jobs/{second}/data"), [])
            chunks = [r for r in data if r.query.get("type") == "chunk"]
            assert writes and routed and chunks
            assert min(r.started for r in routed) >= max(r.finished for r in writes), "routing after writes"
            order[prefetch_jobs] = min(r.started for r in chunks) < max(r.finished for r in writes)
    assert order == {1: True, 0: False}


def test_concurrent_writer_keeps_each_keys_order_and_drops_what_follows_a_failure() -> None:
    lock, running, most, done = threading.Lock(), [0], [0], []

    def write(name: str, seconds: float = 0.1, fail: bool = False) -> Callable[[], None]:
        def call() -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(seconds)
            with lock:
                running[0] -= 1
                done.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")

        return call

    writer = ConcurrentWriter(workers=3, depth=1)
    writer.submit(write("a1", 0.3), keys=[1])
    for frame in (2, 3, 4, 5):
        writer.submit(write(f"b{frame}"), keys=[frame])
    writer.submit(write("a2"), keys=[1, 6])  # after a1, however long a1 takes
    writer.close()
    assert done.index("a1") < done.index("a2") and len(done) == 6
    assert most[0] == 3

    done.clear()
    writer = ConcurrentWriter(workers=1, depth=4)
    writer.submit(write("bad", fail=True), keys=[1])
    writer.submit(write("after"), keys=[2])
    with pytest.raises(RuntimeError, match="bad failed"):
        writer.close()
    assert done == ["bad"]
