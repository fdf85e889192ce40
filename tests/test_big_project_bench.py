"""The big-project benchmark's helpers: its seeding, its request counting on a real test
server's log, and its measured child processes."""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.big_project import (
    _FIRST_TAG,
    _MODEL_LOADED,
    count_requests,
    first_tag_write,
    planning_requests,
    reported_seconds,
    seed,
)
from benchmarks.dataset import PASSWORD, USERNAME
from benchmarks.prelabel_cli import run_measured
from tests.cvat_server import CvatTestServer


def _call(server: CvatTestServer, method: str, path: str, body: dict | None = None) -> dict:
    token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        server.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        data = answer.read()
    return json.loads(data) if answer.headers.get("Content-Type", "").startswith("application/json") else {}


def test_seed_spreads_the_jobs_over_tasks_and_the_log_is_counted_by_kind():
    with CvatTestServer(check_answers=False) as server:
        project, tasks = seed(server, jobs=5, frames_per_job=2, jobs_per_task=2)
        assert tasks == 3
        jobs = [job for task_id in sorted(server.state.tasks) for job in server.jobs(task_id)]
        assert len(jobs) == 5
        assert all(job["stop_frame"] - job["start_frame"] + 1 == 2 for job in jobs)
        job_id = jobs[0]["id"]

        seen = len(server.requests)
        started = time.perf_counter()
        _call(server, "GET", f"/api/jobs?project_id={project.project_id}&page_size=100")
        _call(server, "GET", f"/api/jobs/{job_id}")
        _call(server, "GET", f"/api/jobs/{job_id}/data/meta")
        annotations = _call(server, "GET", f"/api/jobs/{job_id}/annotations")
        _call(server, "GET", f"/api/issues?job_id={job_id}")
        _call(server, "GET", f"/api/jobs/{job_id}/data?type=chunk&index=0&quality=compressed")
        label = server.labels(project.project_id)[0]["id"]
        tag = {
            "frame": jobs[0]["start_frame"],
            "label_id": label,
            "group": 0,
            "source": "auto",
            "attributes": [],
        }
        _call(
            server, "PATCH", f"/api/jobs/{job_id}/annotations?action=create", {**annotations, "tags": [tag]}
        )
        log = server.requests[seen:]

    counts = count_requests(log)
    assert (counts["jobs"], counts["meta"], counts["annotations"], counts["issues"]) == (2, 1, 1, 1)
    assert (counts["chunk"], counts["write"], counts["all"]) == (1, 1, 7)
    assert planning_requests(counts) == 5
    first = first_tag_write(log, started)
    assert first is not None and 0 < first < time.perf_counter() - started
    assert first_tag_write(log[:-1], started) is None


def test_figures_the_cli_reports_are_read_when_present_only():
    assert reported_seconds(_FIRST_TAG, "  time per stage: decode 0.1s, first_tag 2.35s") == 2.35
    assert reported_seconds(_MODEL_LOADED, "  model loaded 4.0s, time to first tag 5.2s") == 4.0
    assert reported_seconds(_FIRST_TAG, "  time per stage: decode 0.1s, model 1.0s") is None
    assert reported_seconds(_MODEL_LOADED, "  time per stage: decode 0.1s, model 1.0s") is None


def test_run_measured_reports_exit_code_output_memory_and_timeout(tmp_path: Path):
    done = run_measured(
        [sys.executable, "-c", "import sys; print('out'); sys.exit(3)"],
        cwd=tmp_path,
        env={},
        timeout=60,
        output=tmp_path,
    )
    assert (done.returncode, done.timed_out, done.stdout.strip()) == (3, False, "out")
    assert done.peak_rss_bytes > 1_000_000
    slow = run_measured(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        cwd=tmp_path,
        env={},
        timeout=0.5,
        output=tmp_path,
    )
    assert slow.timed_out and slow.returncode < 0 and slow.seconds < 20
