"""Streaming planning and the rerun of a finished project, read from the test server's request log.

`prelabel run` plans jobs a bounded number ahead of the labeling (the first tag is written
before the last jobs are read), `--dry-run` still plans every job, and a rerun skips reading
the jobs the state file saw finished at the `updated_date` the job listing still shows:
any change to a job (an annotation write bumps its date, as in CVAT), a deleted state file
or `--relabel` makes it read again, and nothing is written twice.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cvat_sdk import make_client, models

from connectors.cvat.meta import TaskMetas, read_job_meta
from connectors.cvat.session import CvatSession
from tests.conftest import run_cli
from tests.cvat_fixtures import PASSWORD, tag_project, tiny_args
from tests.cvat_server import CvatTestServer, sample_frames, sample_jpegs

JOBS = 12
"""Jobs of 2 frames in one image task."""

JOB_PATH = re.compile(r"^/api/jobs/(\d+)(/|$)")


@pytest.fixture
def many_jobs(tmp_path: Path):
    """A project of `JOBS` 2-frame jobs, set up; yields (server, project id, env, job ids, config)."""
    with CvatTestServer() as server:
        project_id = tag_project(server, "many jobs")
        task = server.add_image_task(
            project_id, sample_jpegs(2 * JOBS, prefix="m_"), name="m", segment_size=2, chunk_size=2
        )
        env = {"CVAT_HOST": server.url, "CVAT_USERNAME": "annotator", "CVAT_PASSWORD": PASSWORD}
        assert run_cli("setup", "--project-id", str(project_id), env=env).returncode == 0
        config = tmp_path / "config.yaml"
        config.write_text("cvat:\n  write_concurrency: 2\n  plan_ahead: 2\n  prefetch_jobs: 1\n")
        jobs = [job["id"] for job in server.jobs(task)]
        assert len(jobs) == JOBS
        yield server, project_id, env, jobs, config


def _run(server, project_id: int, env: dict, config: Path, state: Path, *extra: str):
    args = ["run", "--project-id", str(project_id), "--config", str(config), "--state", str(state)]
    result = run_cli(*args, *tiny_args("--accept-threshold", "0", "--min-margin", "0", *extra), env=env)
    assert result.returncode == 0, result.stderr
    return result


def _job_of(request) -> int | None:
    """The job a request is about: /api/jobs/N/... or a job_id filter."""
    match = JOB_PATH.match(request.path)
    if match:
        return int(match.group(1))
    value = request.query.get("job_id")
    return int(value) if value is not None else None


def _per_job(server) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for request in server.requests:
        job = _job_of(request)
        if job is not None:
            found.setdefault(job, []).append(f"{request.method} {request.path.rstrip('/')}")
    return found


def test_the_first_tag_is_written_before_the_last_jobs_are_read(many_jobs, tmp_path: Path):
    server, project_id, env, jobs, config = many_jobs
    server.reset_counters()
    result = _run(server, project_id, env, config, tmp_path / "state.db")
    assert f"{2 * JOBS} frames in {JOBS} jobs" in result.stdout
    log = server.requests

    def first(method: str, path: str, **query: str) -> float:
        times = [
            r.started
            for r in log
            if r.method == method
            and r.path.rstrip("/") == path
            and all(r.query.get(k) == v for k, v in query.items())
        ]
        assert times, f"no {method} {path} {query}"
        return min(times)

    first_chunk = first("GET", f"/api/jobs/{jobs[0]}/data", type="chunk")
    first_tag = min(
        r.finished
        for r in log
        if r.method == "PATCH"
        and r.path.rstrip("/") == f"/api/jobs/{jobs[0]}/annotations"
        and r.status == 200
    )
    last_read = first("GET", f"/api/jobs/{jobs[-1]}/annotations")
    assert first_chunk < first_tag < last_read
    # at most plan_ahead (2) jobs are read beyond the ones being labeled: when job 1's tags
    # were written, jobs 5 and later were not read yet
    read_before = {_job_of(r) for r in log if r.started < first_tag and r.path.endswith("/annotations")}
    read_before.discard(None)
    assert read_before <= set(jobs[:4]), read_before
    for job in jobs:  # every frame got its tag
        assert len(server.annotations(job)["tags"]) == 2


def test_a_job_is_routed_while_the_next_one_is_labeled(many_jobs, tmp_path: Path):
    server, project_id, env, jobs, config = many_jobs
    first, second = jobs[0], jobs[1]
    server.delay(rf"^/api/jobs/{first}/?$", 2.0, method="PATCH")  # the first job's routing is slow
    server.reset_counters()
    _run(server, project_id, env, config, tmp_path / "state.db")
    log = server.requests
    routed = next(r for r in log if r.method == "PATCH" and r.path.rstrip("/") == f"/api/jobs/{first}")
    tagged = next(
        r for r in log if r.method == "PATCH" and r.path.rstrip("/") == f"/api/jobs/{second}/annotations"
    )
    assert tagged.started < routed.finished  # the second job's tags went out during the first's routing
    assert server.job(first)["stage"] == "validation"  # and the routing was done all the same
    for job in jobs:
        assert len(server.annotations(job)["tags"]) == 2


def test_dry_run_plans_every_job(many_jobs):
    server, project_id, env, jobs, config = many_jobs
    server.reset_counters()
    result = run_cli("run", "--project-id", str(project_id), "--dry-run", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    for job in jobs:
        assert f"job {job} (task " in result.stdout
    assert f"{2 * JOBS} frames in {JOBS} jobs" in result.stdout
    assert server.write_count == 0
    # one page for the job listing, one data meta and one issues read for the task (not one
    # per job), and each job's annotations
    assert sum(r.path == "/api/jobs" for r in server.requests) == 1
    assert sum(r.path == "/api/issues" for r in server.requests) == 1
    assert sum(r.path.rstrip("/").endswith("/data/meta") for r in server.requests) == 1
    assert all(_per_job(server)[job] == [f"GET /api/jobs/{job}/annotations"] for job in jobs)


def test_a_rerun_reads_only_what_changed(many_jobs, tmp_path: Path):
    server, project_id, env, jobs, config = many_jobs
    state = tmp_path / "state.db"
    _run(server, project_id, env, config, state)
    before = {job: server.annotations(job) for job in jobs}

    server.reset_counters()  # a rerun of the finished project: no job is read again
    again = _run(server, project_id, env, config, state)
    assert server.write_count == 0
    assert _per_job(server) == {}, _per_job(server)
    assert f"job {jobs[0]}: skipped, nothing to label (unchanged since prelabel finished it)" in again.stdout
    assert len(server.requests) <= 10  # the login, the target, its labels and job listing

    changed = jobs[5]  # a person changes prelabel's tag on one frame of one job
    tag = before[changed]["tags"][0]
    other = next(label for label in server.labels(project_id) if label["name"] != _label_name(server, tag))
    with make_client(server.url, credentials=("annotator", PASSWORD)) as client:
        client.api_client.jobs_api.partial_update_annotations(
            "update",
            changed,
            patched_labeled_data_request=models.PatchedLabeledDataRequest(
                tags=[
                    models.LabeledImageRequest(
                        id=tag["id"], frame=tag["frame"], label_id=other["id"], source="manual", attributes=[]
                    )
                ]
            ),
        )
    server.reset_counters()
    _run(server, project_id, env, config, state)
    assert server.write_count == 0  # the person's tag is theirs: nothing to do
    assert set(_per_job(server)) == {changed}
    assert {job: server.annotations(job) for job in jobs if job != changed} == {
        job: annotations for job, annotations in before.items() if job != changed
    }

    server.reset_counters()  # and once read, it is skipped again
    _run(server, project_id, env, config, state)
    assert _per_job(server) == {} and server.write_count == 0


def test_without_the_state_file_every_job_is_read_and_nothing_is_written_twice(many_jobs, tmp_path: Path):
    server, project_id, env, jobs, config = many_jobs
    state = tmp_path / "state.db"
    _run(server, project_id, env, config, state)
    before = {job: server.annotations(job) for job in jobs}
    issues = server.issues()
    for path in tmp_path.glob("state.db*"):
        path.unlink()

    server.reset_counters()
    _run(server, project_id, env, config, state)
    per_job = _per_job(server)
    assert set(per_job) == set(jobs)
    assert all(f"GET /api/jobs/{job}/annotations" in per_job[job] for job in jobs)
    assert server.write_count == 0
    assert {job: server.annotations(job) for job in jobs} == before and server.issues() == issues


def test_relabel_never_skips(many_jobs, tmp_path: Path):
    server, project_id, env, jobs, config = many_jobs
    state = tmp_path / "state.db"
    _run(server, project_id, env, config, state)
    server.reset_counters()
    _run(server, project_id, env, config, state, "--relabel")
    per_job = _per_job(server)
    assert all(f"GET /api/jobs/{job}/annotations" in per_job.get(job, []) for job in jobs)
    for job in jobs:  # relabeled: still one tag per frame
        assert sorted(tag["frame"] for tag in server.annotations(job)["tags"]) == sorted(
            {tag["frame"] for tag in server.annotations(job)["tags"]}
        )
        assert len(server.annotations(job)["tags"]) == 2

    server.reset_counters()  # a relabel records nothing finished, so the next run reads every job
    _run(server, project_id, env, config, state)
    assert set(_per_job(server)) == set(jobs) and server.write_count == 0


def test_page_size_as_cvat_reads_it(many_jobs):
    """CVAT's CustomPagination: any positive page_size is honoured (no maximum), `all` too;
    anything else gives the default page of 10."""
    server, project_id = many_jobs[:2]
    with make_client(server.url, credentials=("annotator", PASSWORD)) as client:
        api = client.api_client.jobs_api
        assert len(api.list(project_id=project_id, page_size=100000)[0].results) == JOBS
        assert len(api.list(project_id=project_id, page_size=5)[0].results) == 5
        assert len(api.list(project_id=project_id)[0].results) == 10
    token = base64.b64encode(f"annotator:{PASSWORD}".encode()).decode()
    for size, expected in (("all", JOBS), ("0", 10), ("-3", 10), ("x", 10)):
        query = urllib.parse.urlencode({"project_id": project_id, "page_size": size})
        request = urllib.request.Request(
            f"{server.url}/api/jobs?{query}", headers={"Authorization": f"Basic {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert len(json.loads(reply.read())["results"]) == expected, size


def _label_name(server, tag: dict) -> str:
    with server.state.lock:
        return server.state.labels[tag["label_id"]]["name"]


def test_a_job_s_meta_cut_from_its_task_s_is_the_job_s_own_meta():
    """One task meta read serves every job of an image or video task (deleted frames, overlap,
    a step and a start frame included); an image task with a frame filter reads each job's."""
    with CvatTestServer() as server:
        project_id = tag_project(server, "metas", ["cat"])
        tasks = {
            "images": server.add_image_task(
                project_id, sample_jpegs(10, prefix="a_"), name="a", segment_size=4, chunk_size=3,
                deleted_frames=[1, 5, 9],
            ),
            "overlapping images": server.add_image_task(
                project_id, sample_jpegs(9, prefix="b_"), name="b", segment_size=4, overlap=1
            ),
            "stepped images": server.add_image_task(
                project_id, sample_jpegs(12, prefix="c_"), name="c", segment_size=3, frame_step=2,
                start_frame=1,
            ),
            "video": server.add_video_task(
                project_id, sample_frames(15, (64, 48)), name="v", segment_size=5, frame_step=2,
                start_frame=1, deleted_frames=[2],
            ),
        }  # fmt: skip
        session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))
        with session.client:
            metas = TaskMetas(session)
            for kind, task_id in tasks.items():
                jobs = session.client.api_client.jobs_api.list(task_id=task_id)[0].results
                assert len(jobs) >= 2, kind
                server.reset_counters()
                for job in jobs:
                    assert metas.of_job(job) == read_job_meta(session, job.id), (kind, job.id)
                reads = [r.path.rstrip("/") for r in server.requests if r.path.endswith("/data/meta")]
                task_reads = reads.count(f"/api/tasks/{task_id}/data/meta")
                # the task's meta once; per job, read_job_meta's for the comparison, and for the
                # stepped images (a frame filter: the task's frames are not cut) of_job's own
                assert task_reads == 1, (kind, reads)
                assert len(reads) - task_reads == len(jobs) * (2 if kind == "stepped images" else 1), kind


def test_a_single_job_reads_its_own_meta_and_issues_not_its_task_s(many_jobs):
    server, _project_id, env, jobs, config = many_jobs
    job = jobs[3]
    server.reset_counters()
    result = run_cli("run", "--job-id", str(job), "--dry-run", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert f"job {job} (task " in result.stdout
    reads = [(r.path.rstrip("/"), dict(r.query)) for r in server.requests if r.method == "GET"]
    assert (f"/api/jobs/{job}/data/meta", {}) in reads
    assert not any(path.startswith("/api/tasks/") and path.endswith("/data/meta") for path, _ in reads)
    issue_reads = [query for path, query in reads if path == "/api/issues"]
    assert issue_reads and all(query.get("job_id") == str(job) for query in issue_reads), issue_reads
