"""Scale-out through the Redis queue: real redis-server, real worker processes, real CVAT test server.

Workers run as `python -m prelabel worker --burst`, as on a worker machine, with a short
lease (3 s) so that a dead worker's entry comes back within seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from cvat_sdk import make_client
from redis import Redis
from rq.job import Job, JobStatus

from connectors.cvat.queued import plan_entries
from connectors.cvat.session import CvatSession
from connectors.queue.enqueue import QueueOptions, enqueue_entries
from connectors.queue.entries import SERIALIZER, Entry, entry_id
from connectors.queue.status import STATES, read_status
from connectors.queue.worker import run_worker
from prelabel.config import load_config
from tests.conftest import TINY_MODEL, run_cli
from tests.cvat_fixtures import PASSWORD, Project, server_state
from tests.cvat_server import CvatTestServer, sample_frames, sample_jpegs
from tests.cvat_server.pytest_fixtures import CAPTURE_LABELS
from tests.redis_fixture import redis_server

ATTRIBUTES = CAPTURE_LABELS[0]["attributes"]  # confidence, model, needs_review: as `setup` adds them
LEASE = "3"


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture
def queue(redis_url: str) -> str:
    """The module's Redis, emptied for each test."""
    Redis.from_url(redis_url).flushall()
    return redis_url


def many_jobs_project(
    server: CvatTestServer, image_frames: int = 28, video_frames: int = 4, segment: int = 2
) -> Project:
    """Tiny frames in 2-frame jobs: an image task (`image_frames` / `segment` jobs) and a video task."""
    server.add_user("annotator", PASSWORD)
    project_id = server.add_project(
        "many jobs",
        owner="annotator",
        labels=[
            {"name": name, "type": "tag", "attributes": ATTRIBUTES} for name in ("cat", "coffee", "rocket")
        ],
    )
    images = server.add_image_task(
        project_id, sample_jpegs(image_frames, (64, 48)), name="images", segment_size=segment, chunk_size=1
    )
    video = server.add_video_task(
        project_id,
        sample_frames(video_frames, (64, 48)),
        name="clip",
        segment_size=2,
        chunk_size=2,
        overlap=0,
    )
    return Project(server, project_id, [images], video, set())


def write_config(folder: Path, **cvat: int) -> Path:
    path = folder / "config.yaml"
    extra = "".join(f"\n  {key}: {value}" for key, value in cvat.items())
    path.write_text(
        f"""
model: {{name: "{TINY_MODEL}", pretrained: none, batch_size: 4, cache_dir: "{folder / "cache"}"}}
routing: {{accept_threshold: 0.4, min_margin: 0.0}}
cvat:
  download_threads: 1{extra}
""",
        encoding="utf-8",
    )
    return path


def start_workers(queue: str, project: Project, folder: Path, count: int) -> list[subprocess.Popen]:
    """`count` burst workers, each with its own state file and log file."""
    env = {**os.environ, **project.env(), "PYTHONUNBUFFERED": "1"}
    workers = []
    for index in range(count):
        argv = [
            "worker",
            "--queue",
            queue,
            "--burst",
            "--lease",
            LEASE,
            "--state",
            str(folder / f"w{index}.db"),
        ]
        with open(folder / f"worker-{index}.log", "w") as log:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "prelabel", *argv],
                    cwd=folder,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return workers


def wait_all(workers: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for process in workers:
        process.wait(timeout=max(1, deadline - time.monotonic()))


def completions(queue: str) -> list[dict]:
    return [json.loads(item) for item in Redis.from_url(queue).lrange("prelabel:prelabel:completions", 0, -1)]


def status(queue: str, cli: bool = False, lists: bool = True) -> dict:
    """What `prelabel status --format json --list all --limit 0` shows (in-process unless `cli`);
    without `lists`, the counts and workers alone."""
    if not cli:
        return read_status(Redis.from_url(queue), STATES if lists else ()).as_dict()
    listing = ("--list", "all", "--limit", "0") if lists else ()
    result = run_cli("status", "--queue", queue, "--format", "json", *listing)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def enqueue_here(queue: str, project: Project, config: Path, **overrides) -> None:
    """`prelabel enqueue --project-id`, in-process (where the CLI is not what a test is about)."""
    client = make_client(project.server.url, credentials=("annotator", PASSWORD))
    loaded = load_config(config, overrides)
    _, entries = plan_entries(CvatSession(client), {"project_id": project.project_id}, loaded)
    enqueue_entries(Redis.from_url(queue), entries, QueueOptions())


def enqueue(queue: str, project: Project, config: Path, *extra: str):
    return run_cli(
        "enqueue", "--project-id", str(project.project_id), "--queue", queue, "--config", str(config), *extra,
        env=project.env(),
    )  # fmt: skip


def test_four_workers_process_every_job_exactly_once_like_a_single_run(queue: str, tmp_path: Path):
    config = write_config(tmp_path)
    with CvatTestServer() as single_server, CvatTestServer() as server:
        single = many_jobs_project(single_server)
        project = many_jobs_project(server)
        job_ids = {job["id"] for job in project.annotation_jobs()}
        assert len(job_ids) >= 16
        # The reference: one process, no queue, on an identically seeded server (in parallel).
        reference = subprocess.Popen(
            [sys.executable, "-m", "prelabel", "run", "--project-id", str(single.project_id), "--config",
             str(config), "--no-progress", "--state", str(tmp_path / "single.db")],
            cwd=tmp_path, env={**os.environ, **single.env()}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        server.set_global_delay(0.02, methods={"GET"})  # jobs take long enough to overlap
        queued = enqueue(queue, project, config)
        assert queued.returncode == 0, queued.stderr
        assert f"{len(job_ids)} jobs need work" in queued.stdout
        workers = start_workers(queue, project, tmp_path, 4)
        wait_all(workers)
        assert [w.returncode for w in workers] == [0, 0, 0, 0], _logs(tmp_path)
        output, _ = reference.communicate(timeout=120)
        assert reference.returncode == 0, output

        done = completions(queue)
        assert Counter(item["cvat_job"] for item in done) == Counter(job_ids)  # each exactly once
        by_worker = Counter(item["worker"] for item in done)
        assert len(by_worker) >= 2, by_worker
        for index in range(4):  # model and classifier built once per process, not once per entry
            assert (tmp_path / f"worker-{index}.log").read_text().count("built the pipeline") <= 1
        assert server_state(project) == server_state(single)
        assert server.violations == []

        now = status(queue, cli=True)
        assert {e["cvat_job"] for e in now["finished"]} == job_ids
        assert not now["pending"] and not now["running"] and not now["failed"]
        counted = {w["name"]: w for w in now["workers"]}
        assert {name: counted[name]["jobs"] for name in by_worker} == dict(by_worker)
        assert all(counted[name]["images_per_second"] > 0 for name in by_worker)


def test_a_worker_keeps_one_state_file_per_server(queue: str, tmp_path: Path):
    # Two servers built by the same calls number their jobs alike. In one state file, the
    # second server's frames would look like frames whose tags a person removed: left unlabeled.
    from prelabel.state import RunState

    config = write_config(tmp_path)
    with CvatTestServer() as first_server, CvatTestServer() as second_server:
        first = many_jobs_project(first_server, image_frames=4, video_frames=2)
        second = many_jobs_project(second_server, image_frames=4, video_frames=2)
        job_ids = {job["id"] for job in first.annotation_jobs()}
        assert job_ids == {job["id"] for job in second.annotation_jobs()}
        for project in (first, second):  # the first server's jobs go first
            enqueue_here(queue, project, config)
        (worker,) = start_workers(queue, first, tmp_path, 1)
        wait_all([worker])
        assert worker.returncode == 0, _logs(tmp_path)
        assert len(completions(queue)) == 2 * len(job_ids)
        assert server_state(second) == server_state(first)  # every frame labeled on both
        assert all(first_server.annotations(job["id"])["tags"] for job in first.annotation_jobs())
        port = second_server.url.rsplit(":", 1)[1]
        files = {
            tmp_path / "w0.db": first_server.url,
            tmp_path / f"w0@127.0.0.1_{port}.db": second_server.url,  # the second server's, beside it
        }

    for path, host in files.items():
        with RunState(path, lock=False) as state:
            assert state.meta("host") == host
            assert {record.job_id for record in state.frames()} == job_ids


def test_a_killed_worker_s_job_completes_on_another_without_duplicates(queue: str, tmp_path: Path):
    config = write_config(tmp_path, upload_batch_size=1)  # writes reach CVAT frame by frame
    with CvatTestServer() as server:
        project = many_jobs_project(server, image_frames=12, video_frames=2, segment=6)
        slow = server.jobs(project.image_tasks[0])[0]["id"]
        enqueue_here(queue, project, config, **{"model.batch_size": 1})
        server.delay(rf"^/api/jobs/{slow}/data$", 1.5, method="GET", times=None)  # 6 chunks: 9 s
        workers = start_workers(queue, project, tmp_path, 2)
        redis = Redis.from_url(queue)
        entry = next(e for e in status(queue)["pending"] if e["cvat_job"] == slow)["entry_id"]

        victim = None
        deadline = time.monotonic() + 90
        while victim is None and time.monotonic() < deadline:  # running, and part of it written
            holder = redis.hget(f"rq:job:{entry}", "worker_name")
            if (
                holder
                and redis.hget(f"rq:job:{entry}", "status") == b"started"
                and server.annotations(slow)["tags"]
            ):
                victim = next(w for w in workers if holder.decode().endswith(f"-{w.pid}"))
            time.sleep(0.05)
        assert victim is not None, _logs(tmp_path)
        os.kill(victim.pid, signal.SIGKILL)
        assert len(server.annotations(slow)["tags"]) < 6  # mid-job: part of it written
        killed_at = time.monotonic()
        server.clear_faults()
        survivor = next(w for w in workers if w is not victim)
        survivor.wait(timeout=90)
        assert survivor.returncode == 0, _logs(tmp_path)
        victim.wait()

        done = [item for item in completions(queue) if item["cvat_job"] == slow]
        assert [item["worker"] for item in done] == [redis.hget(f"rq:job:{entry}", "worker_name").decode()]
        assert not done[0]["worker"].endswith(f"-{victim.pid}")
        assert time.monotonic() - killed_at < 60
        for job in project.annotation_jobs():  # every frame: one tag, at most one issue
            tags = Counter(tag["frame"] for tag in server.annotations(job["id"])["tags"])
            issues = Counter(issue["frame"] for issue in server.issues(job["id"]))
            frames = range(job["start_frame"], job["stop_frame"] + 1)
            assert tags == Counter(frames), (job["id"], tags)
            assert all(count == 1 for count in issues.values()), (job["id"], issues)
        assert server.violations == []
        assert {e["cvat_job"] for e in status(queue)["finished"]} == {
            j["id"] for j in project.annotation_jobs()
        }


def test_sigterm_finishes_the_current_job_then_exits(queue: str, tmp_path: Path):
    config = write_config(tmp_path)
    with CvatTestServer() as server:
        project = many_jobs_project(server, image_frames=12, video_frames=2, segment=6)
        first = server.jobs(project.image_tasks[0])[0]["id"]
        enqueue_here(queue, project, config)
        server.delay(rf"^/api/jobs/{first}/data$", 1.0, method="GET", times=None)  # about 6 s
        (worker,) = start_workers(queue, project, tmp_path, 1)
        redis = Redis.from_url(queue)
        entry = next(e for e in status(queue)["pending"] if e["cvat_job"] == first)["entry_id"]
        deadline = time.monotonic() + 60
        while redis.hget(f"rq:job:{entry}", "status") != b"started" and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, _logs(tmp_path)

        assert [item["cvat_job"] for item in completions(queue)] == [first]  # finished, nothing more
        tags = Counter(tag["frame"] for tag in server.annotations(first)["tags"])
        assert tags == Counter(range(6))
        assert len(status(queue)["pending"]) == 2


def test_enqueueing_twice_at_once_adds_each_job_once(queue: str, tmp_path: Path):
    config = write_config(tmp_path)
    with CvatTestServer() as server:
        project = many_jobs_project(server, image_frames=8, video_frames=2)
        command = [sys.executable, "-m", "prelabel", "enqueue", "--project-id", str(project.project_id),
                   "--queue", queue, "--config", str(config)]  # fmt: skip
        env = {**os.environ, **project.env()}
        both = [
            subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True) for _ in "ab"
        ]
        outputs = [process.communicate(timeout=120)[0] for process in both]
        assert [process.returncode for process in both] == [0, 0], outputs
        counts = sorted(
            re.search(r"queued (\d+), already pending or running (\d+)", out).groups() for out in outputs
        )
        assert counts == [("0", "5"), ("5", "0")], outputs  # under the lock one adds all five, the other none

        redis = Redis.from_url(queue)
        queued = [item.decode() for item in redis.lrange("rq:queue:prelabel", 0, -1)]
        assert len(queued) == len(set(queued)) == 5


def test_a_job_that_keeps_failing_lands_in_the_failed_list_and_the_others_finish(queue: str, tmp_path: Path):
    config = write_config(tmp_path)
    with CvatTestServer() as server:
        project = many_jobs_project(server, image_frames=6, video_frames=2)
        gone = {job["id"] for job in server.jobs(project.video_task)}
        run = subprocess.Popen(  # `run --queue`: enqueue, then wait for the workers
            [sys.executable, "-m", "prelabel", "run", "--project-id", str(project.project_id),
             "--queue", queue, "--config", str(config)],
            cwd=tmp_path, env={**os.environ, **project.env()}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        redis = Redis.from_url(queue)
        deadline = time.monotonic() + 60
        while redis.llen("rq:queue:prelabel") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        client = make_client(server.url, credentials=("annotator", PASSWORD))
        client.tasks.remove_by_ids([project.video_task])  # DELETE /api/tasks/{id}: its jobs are gone
        (worker,) = start_workers(queue, project, tmp_path, 1)
        wait_all([worker])
        assert worker.returncode == 0, _logs(tmp_path)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 2, (out, err)
        assert "3 jobs finished, 1 failed" in out and "not found" in out
        assert err.strip().splitlines()[-1].startswith("error: 1 of 4 jobs failed")

        now = status(queue)
        assert {e["cvat_job"] for e in now["failed"]} == gone
        for entry in now["failed"]:
            assert "CvatError" in entry["error"] and "not found" in entry["error"], entry
        assert {e["cvat_job"] for e in now["finished"]} == {
            j["id"] for j in server.jobs(project.image_tasks[0])
        }
        for entry in now["failed"]:  # tried 3 times (the default --attempts)
            assert _logs(tmp_path).count(f"prelabel: CVAT job {entry['cvat_job']} (project") == 3
        text = run_cli("status", "--queue", queue).stdout
        assert "failed 1" in text and "not found" not in text  # counts first; the entries when asked
        text = run_cli("status", "--queue", queue, "--list", "failed").stdout
        assert "failed 1" in text and "not found" in text

        requeued = run_cli("requeue-failed", "--queue", queue)
        assert requeued.returncode == 0, requeued.stderr
        assert "requeued 1 failed entries" in requeued.stdout
        after = status(queue)
        assert {e["cvat_job"] for e in after["pending"]} == gone and not after["failed"]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["status", "--queue", "http://localhost:6379/0"], {}, "malformed queue URL"),
        (["status", "--queue", "redis://localhost:6379/zero"], {}, "is not a number"),
        (["requeue-failed", "--queue", "redis://localhost:99999/0"], {}, "malformed queue URL"),
        (["worker", "--queue", "redis://127.0.0.1:1/0", "--burst"], {}, "cannot reach the queue"),
        (["enqueue", "--job-id", "1"], {"PRELABEL_QUEUE": "redis://127.0.0.1:1/0"}, "cannot reach the queue"),
        (["status"], {"PRELABEL_QUEUE": ""}, "no queue given"),
    ],
)
def test_a_bad_queue_url_is_one_line(args: list[str], env: dict, expected: str):
    result = run_cli(*args, env={"CVAT_HOST": "http://127.0.0.1:1", **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def _logs(folder: Path) -> str:
    return "\n".join(path.read_text() for path in sorted(folder.glob("worker-*.log")))


def test_a_webhook_s_new_task_goes_on_the_queue_once(queue: str, tmp_path: Path):
    """`prelabel serve --queue`: the work a create-task delivery asks for enqueues the task's jobs."""
    from connectors.cvat.perform import CvatWork

    config = load_config(write_config(tmp_path))
    with CvatTestServer() as server:
        project = many_jobs_project(server, image_frames=6, video_frames=2)
        client = make_client(server.url, credentials=("annotator", PASSWORD))
        redis = Redis.from_url(queue)
        work = CvatWork(CvatSession(client), config, tmp_path / "state.db", redis)
        item = {"kind": "label_task", "project_id": project.project_id, "task_id": project.image_tasks[0]}
        first, second = work(item), work(item)
        assert first.startswith(f"task {item['task_id']}: queued 3 jobs for the workers (0 already pending")
        assert second.endswith(
            "queued 0 jobs for the workers (3 already pending or running, 0 in the failed list)"
        )
        status = read_status(redis, ["pending"])
        jobs = {job["id"] for job in server.jobs(project.image_tasks[0])}
        assert {entry.cvat_job for entry in status.pending} == jobs
        assert not any(server.annotations(job_id)["tags"] for job_id in jobs), (
            "nothing labeled in the service"
        )


def test_entries_carry_the_calibration_in_use_and_workers_apply_only_it(queue: str, tmp_path: Path):
    """Every worker routes with the calibration of the machine that enqueued, not its own file."""
    from dataclasses import asdict

    from prelabel.assemble import build_pipeline
    from prelabel.calibration.fitting import Calibration, write_calibration

    labels = ["cat", "coffee", "rocket"]
    learned = Calibration(
        model=f"{TINY_MODEL}/random-seed0", labels=labels, temperature=1.7, accept_threshold=0.52,
        label_thresholds={"cat": 0.61}, min_margin=0.0, target_precision=0.9, confidence=0.95,
        examples=400, expected_coverage=0.4, precision_on_examples=0.95, precision_lower_bound=0.91,
    )  # fmt: skip
    write_calibration(learned, tmp_path / "calibration.yaml")
    config_path = write_config(tmp_path)
    config_path.write_text(
        config_path.read_text() + f"calibration: {{path: {tmp_path / 'calibration.yaml'}}}\n"
    )
    config = load_config(config_path)
    with CvatTestServer() as server:
        project = many_jobs_project(server, image_frames=4, video_frames=2)
        client = make_client(server.url, credentials=("annotator", PASSWORD))
        _, entries = plan_entries(CvatSession(client), {"project_id": project.project_id}, config)
    assert entries and all(entry.calibration == asdict(learned) for entry in entries)

    from connectors.cvat.queued import EntryWorker, WorkerSettings

    # a worker machine with another calibration file at the same path: the entry's wins
    write_calibration(Calibration(**{**asdict(learned), "temperature": 9.0}), tmp_path / "calibration.yaml")
    worker = EntryWorker(WorkerSettings(name="w", states=None), Redis.from_url(queue), build_pipeline)
    pipeline = worker.pipeline(entries[0], worker.config(entries[0]), labels)
    assert pipeline.classifier.temperature == 1.7
    assert pipeline.policy.accept_threshold == 0.52 and pipeline.policy.threshold("cat") == 0.61


class _Recorder:
    """A worker context that records the payloads it is given (the queue's side of the contract)."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []

    def label(self, payload: dict) -> dict:
        self.payloads.append(payload)
        return {"cvat_job": payload["job_id"]}


def test_entries_under_the_current_and_the_old_function_path_run_with_the_worker_s_context(queue: str):
    """RQ calls the function by its dotted path with the worker's context; entries queued by
    prelabel 0.1 (``connectors.queue.tasks.label_entry``) still run."""
    from connectors.queue.entries import FUNCTION, OLD_FUNCTION, open_queue

    redis = Redis.from_url(queue)
    rq_queue = open_queue(redis)
    jobs = [rq_queue.enqueue(name, {"job_id": job_id}) for name, job_id in ((FUNCTION, 1), (OLD_FUNCTION, 2))]
    context = _Recorder()
    assert run_worker(redis, "context-test", context, burst=True, lease=2)
    assert sorted(p["job_id"] for p in context.payloads) == [1, 2]
    results = [Job.fetch(job.id, connection=redis, serializer=SERIALIZER).return_value() for job in jobs]
    assert results == [{"cvat_job": 1}, {"cvat_job": 2}]


def test_a_worker_s_metrics_match_its_completions_and_readyz_follows_cvat(queue: str, tmp_path: Path):
    from tests.test_hands_free import _free_port, _ready
    from tests.test_webhooks import scrape

    config = write_config(tmp_path)
    port = _free_port()
    with CvatTestServer() as server:
        project = many_jobs_project(server, image_frames=8, video_frames=2, segment=4)
        enqueue_here(queue, project, config)
        expected = len(status(queue)["pending"])
        server.fail(r"^/api/jobs/\d+/annotations", 502, method="PATCH", times=1)
        env = {**os.environ, **project.env(), "PYTHONUNBUFFERED": "1"}
        argv = ["worker", "--queue", queue, "--lease", LEASE, "--state", str(tmp_path / "w.db"),
                "--metrics-port", str(port)]  # fmt: skip
        with open(tmp_path / "worker-0.log", "w") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prelabel", *argv], cwd=tmp_path, env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while len(completions(queue)) < expected and time.monotonic() < deadline:
                assert worker.poll() is None, _logs(tmp_path)
                time.sleep(0.2)
            done = completions(queue)
            assert len(done) == expected, _logs(tmp_path)
            samples = scrape(f"http://127.0.0.1:{port}/metrics")

            def value(name: str, **labels: str) -> float:
                return samples[(name, tuple(sorted(labels.items())))]

            accepted, review = (sum(d[key] for d in done) for key in ("accepted", "review"))
            assert value("prelabel_frames_labeled_total", decision="accepted") == accepted
            assert value("prelabel_frames_labeled_total", decision="review") == review
            assert value("prelabel_cvat_writes_total", kind="tags") == sum(d["tags"] for d in done)
            assert value("prelabel_cvat_writes_total", kind="issues") == sum(d["issues"] for d in done)
            assert value("prelabel_work_items_total", kind="label_job", outcome="done") == expected
            assert value("prelabel_cvat_retries_total", kind="502") == 1
            assert value("prelabel_task_created_to_labeled_seconds_count") == expected
            assert value("prelabel_work_queue_depth") == 0
            assert sum(d["frames"] for d in done) == 10

            ready = _ready(port)
            assert ready == (200, {"status": "ready", "checks": {"redis": "ok", "cvat": "ok"}}), ready
            server.fail("^/api/server/about", 503, times=None)
            time.sleep(1.1)
            code, body = _ready(port)
            assert code == 503 and body["checks"]["redis"] == "ok" and "503" in body["checks"]["cvat"]
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0, _logs(tmp_path)


def entries_for(jobs: range, host: str = "http://cvat.example:8080") -> list[Entry]:
    """Entries as `plan_entries` makes them, one config shared by all, without a CVAT server."""
    config = load_config(None).model_dump(mode="json")
    return [
        Entry(host=host, job_id=job, organization=None, config=config, target="project 1") for job in jobs
    ]


def test_enqueueing_hundreds_of_jobs_adds_one_entry_each_and_again_none(queue: str):
    """The pipelined enqueue keeps the guarantees: one entry per job (a job listed twice
    included), nothing added the second time, failed entries left alone, finished ones replaced."""
    redis = Redis.from_url(queue)
    work = entries_for(range(1, 301))
    first = enqueue_entries(redis, [*work, work[7]], QueueOptions(attempts=1))
    assert sorted(first.added) == list(range(1, 301)) and not first.pending and not first.failed
    queued = [item.decode() for item in redis.lrange("rq:queue:prelabel", 0, -1)]
    assert len(queued) == len(set(queued)) == 300
    assert set(queued) == {entry_id(entry.host, entry.job_id) for entry in work} == set(first.ids.values())
    stored = Job.fetch(first.ids[42], connection=redis, serializer=SERIALIZER)
    assert list(stored.args) == [work[41].as_payload()] and stored.meta["cvat_job"] == 42
    assert stored.timeout == QueueOptions().job_timeout and stored.get_status() == JobStatus.QUEUED

    again = enqueue_entries(redis, work, QueueOptions(attempts=1))
    assert not again.added and sorted(again.pending) == list(range(1, 301))
    assert redis.llen("rq:queue:prelabel") == 300

    context = _Failing(fail={3, 5})  # a real worker runs everything: two fail, the rest finish
    assert run_worker(redis, "scale-test", context, burst=True, lease=2)
    third = enqueue_entries(redis, work, QueueOptions(attempts=1))
    assert sorted(third.failed) == [3, 5] and not third.pending
    assert sorted(third.added) == sorted(set(range(1, 301)) - {3, 5})  # finished: needed again
    counts = read_status(redis).counts
    assert (counts["pending"], counts["failed"], counts["finished"]) == (298, 2, 0)


def test_status_counts_by_state_and_lists_entries_only_when_asked(queue: str):
    redis = Redis.from_url(queue)
    enqueue_entries(redis, entries_for(range(1, 9)), QueueOptions(attempts=1))
    assert run_worker(redis, "status-test", _Failing(fail={2, 4, 6}), burst=True, lease=2)
    enqueue_entries(redis, entries_for(range(100, 120)), QueueOptions(attempts=1))

    plain = status(queue, cli=True, lists=False)  # the CLI's default: counts and workers, no entries
    assert plain["counts"] == {
        "pending": 20, "running": 0, "finished": 5, "failed": 3, "scheduled": 0, "deferred": 0
    }  # fmt: skip
    assert set(plain) == {"counts", "workers"}

    text = run_cli("status", "--queue", queue)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "pending 20, running 0, finished 5, failed 3"
    assert "--list failed" in text.stdout and "CVAT job" not in text.stdout

    failed = run_cli("status", "--queue", queue, "--list", "failed", "--limit", "2").stdout
    shown = re.findall(r"CVAT job (\d+) on status-test: RuntimeError: CVAT job (\d+) broke", failed)
    assert len(shown) == 2 and all(a == b and int(a) in {2, 4, 6} for a, b in shown), failed
    assert "... and 1 more (--limit)" in failed

    listed = run_cli(
        "status", "--queue", queue, "--list", "pending", "--list", "finished", "--format", "json"
    )  # fmt: skip
    data = json.loads(listed.stdout)
    assert set(data) == {"counts", "pending", "finished", "workers"}
    assert {e["cvat_job"] for e in data["pending"]} == set(range(100, 120))
    assert {e["cvat_job"]: e["result"] for e in data["finished"]} == {
        job: {"cvat_job": job} for job in (1, 3, 5, 7, 8)
    }
    everything = status(queue, cli=True)
    assert {e["cvat_job"] for e in everything["failed"]} == {2, 4, 6} and not everything["running"]


class _Failing(_Recorder):
    """A worker context whose label call fails for some CVAT jobs."""

    def __init__(self, fail: set[int]) -> None:
        super().__init__()
        self.fail = fail

    def label(self, payload: dict) -> dict:
        if payload["job_id"] in self.fail:
            raise RuntimeError(f"CVAT job {payload['job_id']} broke")
        return super().label(payload)
