"""Speed on a slow server: writes overlap, the next job's chunks come before the job starts,
and the jobs of a run share its decode and upload threads.

Both are read from the test server's request log (when each request arrived and was
answered), with its latency model of a real CVAT 2.73 on, not from wall-clock times.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from connectors.cvat.connect import ServerOptions, connect
from connectors.cvat.driver import JobOutcome, LabelRequest, label_target
from prelabel.assemble import build_pipeline
from prelabel.pipeline import worker
from prelabel.pipeline.stream import ConcurrentWriter, RunPools
from tests.conftest import REPO, TINY_MODEL, run_cli, thread_nice, tiny_model_config, variants
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


def _set_up(server: CvatTestServer, project_id: int) -> dict[str, str]:
    """`prelabel setup` on the project; returns the environment the CLI logs in with."""
    env = {"CVAT_HOST": server.url, "CVAT_USERNAME": "annotator", "CVAT_PASSWORD": PASSWORD}
    assert run_cli("setup", "--project-id", str(project_id), env=env).returncode == 0
    return env


def _run(server: CvatTestServer, project_id: int, tmp_path: Path, name: str, **cvat: object) -> None:
    env = _set_up(server, project_id)
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


def test_a_jobs_first_tags_go_up_after_one_model_batch_not_after_a_full_upload_batch(tmp_path: Path) -> None:
    frames = 40
    with CvatTestServer() as server:
        project_id, (job,) = _project(server, frames, segment_size=frames)
        _run(server, project_id, tmp_path, "first", accept_threshold=0.0, upload_batch_size=100)
        tags = [r for r in server.requests if r.method == "PATCH" and r.query.get("action") == "create"]
        # 32 tags first (the sink's first_batch_size), the other 8 when the job closes.
        assert len(tags) == 2 and len(server.annotations(job)["tags"]) == frames


def test_the_next_jobs_first_chunk_is_requested_before_the_current_job_is_labeled(tmp_path: Path) -> None:
    for prefetch_jobs in (1, 0):
        with CvatTestServer(latency="cvat-2.73-2core*0.2") as server:
            project_id, (first, second) = _project(server, 16, segment_size=8)
            _run(
                server, project_id, tmp_path, f"prefetch{prefetch_jobs}", accept_threshold=0.0,
                prefetch_jobs=prefetch_jobs, upload_batch_size=2,
            )  # fmt: skip
            log = server.requests
            chunks = {
                job: [
                    r for r in log
                    if r.method == "GET" and r.path.rstrip("/") == f"/api/jobs/{job}/data"
                    and r.query.get("type") == "chunk"
                ]
                for job in (first, second)
            }  # fmt: skip
            tags_path = f"/api/jobs/{first}/annotations"
            writes = [r for r in log if r.method == "PATCH" and r.path.rstrip("/") == tags_path]
            assert chunks[first] and chunks[second] and writes
            asked = min(r.started for r in chunks[second])
            if prefetch_jobs:  # asked for before the model had tagged a frame of the first job
                assert asked < min(r.started for r in writes)
            else:  # asked for only once the first job's frames were all in
                assert asked > max(r.finished for r in chunks[first])


def test_the_next_job_starts_while_the_last_writes_of_the_current_one_run(tmp_path: Path) -> None:
    with CvatTestServer() as server:
        project_id, (first, second) = _project(server, 16, segment_size=8)
        server.delay(rf"/api/jobs/{first}/annotations", 1.0, method="PATCH", times=None)
        # prefetch_jobs 0: the second job's first chunk is asked for when the model starts on it.
        _run(server, project_id, tmp_path, "overlap", accept_threshold=0.0, prefetch_jobs=0)
        log = server.requests
        patches = {r.path.rstrip("/"): [] for r in log}
        for r in log:
            if r.method == "PATCH":
                patches[r.path.rstrip("/")].append(r)
        writes, routed = patches[f"/api/jobs/{first}/annotations"], patches[f"/api/jobs/{first}"]
        second_chunks = [
            r for r in log
            if r.path.rstrip("/") == f"/api/jobs/{second}/data" and r.query.get("type") == "chunk"
        ]  # fmt: skip
        # The first job's 8 tags go up in one write when the model is done with it (the first
        # upload batch is 32 tags); the model goes on meanwhile, and the job is routed after it.
        assert len(writes) == 1 and second_chunks and routed
        assert min(r.started for r in second_chunks) < writes[0].finished
        assert min(r.started for r in routed) >= writes[0].finished
        assert len(server.annotations(first)["tags"]) == 8 and len(server.annotations(second)["tags"]) == 8
        assert server.violations == []


_IMPORT_WATCH = """
import importlib.abc, json, sys, threading, time

seen = {}


class Watch(importlib.abc.MetaPathFinder):
    # Notes on which thread, and when, torch is first looked for; finds nothing itself.
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update(thread=threading.current_thread().name, at=time.perf_counter())
        return None


sys.meta_path.insert(0, Watch())
from prelabel.cli import main

try:
    main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as out:
        json.dump(seen, out)
"""


def test_a_run_imports_torch_on_a_thread_of_its_own_while_it_logs_in(tmp_path: Path) -> None:
    """torch and open_clip take seconds to import: `prelabel run` starts that import on a thread
    of its own before it logs in, and logs in and reads its target meanwhile. torch is first
    looked for on that thread (on the main thread if something imports it there first, on
    the model's thread without the early import), before the target's jobs are listed, which
    comes after the login's requests (about 50 ms each with the latency model). The server's
    log and the child's `time.perf_counter` read the system's monotonic clock."""
    with CvatTestServer(latency="cvat-2.73-2core") as server:
        project_id, (job,) = _project(server, 4, segment_size=4)
        env = _set_up(server, project_id)
        server.reset_counters()
        watched, script = tmp_path / "torch.json", tmp_path / "watch.py"
        script.write_text(_IMPORT_WATCH)
        done = subprocess.run(
            [
                sys.executable, str(script), str(watched), "run", "--project-id", str(project_id),
                "--model", TINY_MODEL, "--pretrained", "none", "--accept-threshold", "0",
                "--min-margin", "0", "--state", str(tmp_path / "state.db"), "--no-progress",
            ],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
            env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen = json.loads(watched.read_text())
        log = server.requests
        listed = [r.started for r in log if r.method == "GET" and r.path.rstrip("/") == "/api/jobs"]
        assert seen["thread"] == "prelabel-import"
        assert listed and seen["at"] < min(listed)
        assert len(server.annotations(job)["tags"]) == 4


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


def test_writers_sharing_one_pool_each_wait_for_and_fail_on_their_own_calls() -> None:
    release, done = threading.Event(), []

    def write(name: str, fail: bool = False, gate: threading.Event | None = None) -> Callable[[], None]:
        def call() -> None:
            if gate is not None:
                assert gate.wait(10)
            done.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")

        return call

    with RunPools(decode_workers=1, upload_workers=3) as pools:
        slow, quick = (ConcurrentWriter(workers=2, depth=1, pool=pools.upload) for _ in range(2))
        slow.submit(write("slow", gate=release), keys=[1])
        quick.submit(write("q1"), keys=[1])  # the same key in another writer: no order between them
        quick.submit(write("q2", fail=True), keys=[2])
        quick.submit(write("q3"), keys=[2])  # after the failure of its key: dropped
        with pytest.raises(RuntimeError, match="q2 failed"):
            quick.close()  # returns while the other writer's call still runs
        assert "slow" not in done and {"q1", "q2"} <= set(done) and "q3" not in done
        release.set()
        slow.close()  # the other writer's failure is not its own
        assert done[-1] == "slow"
        threads = [t for t in threading.enumerate() if t.name.startswith("upload")]
        assert threads  # the pool outlives the writers
    assert not any(t.is_alive() for t in threads)


def test_the_jobs_of_a_run_share_its_threads_which_stop_with_the_run(tmp_path: Path) -> None:
    with CvatTestServer(latency="cvat-2.73-2core*0.2") as server:
        project_id, jobs = _project(server, 24, segment_size=8)
        _set_up(server, project_id)
        nice = 5 if sys.platform == "linux" else 0  # decode.nice: the decode threads' own priority
        config = tiny_model_config(
            {
                "model.batch_size": 2, "model.cache_dir": str(tmp_path / "cache"), "decode.workers": 2,
                "decode.nice": nice, "routing.accept_threshold": 0.0, "routing.min_margin": 0.0,
                "cvat.upload_batch_size": 2,
            }
        )  # fmt: skip
        session = connect(ServerOptions(host=server.url, auth=f"annotator:{PASSWORD}"), config.retry)
        pipeline = build_pipeline(config, ["cat", "coffee", "rocket"])
        before = set(threading.enumerate())
        base = thread_nice() if nice else 0
        seen: dict[int, dict[str, set[threading.Thread]]] = {}

        def threads(outcome: JobOutcome) -> None:
            alive = [t for t in threading.enumerate() if t not in before]
            kinds = ("decode", "upload", "download")
            seen[outcome.plan.job_id] = {k: {t for t in alive if t.name.startswith(k)} for k in kinds}
            if nice:
                priority = {k: {thread_nice(t) for t in seen[outcome.plan.job_id][k]} for k in kinds}
                assert priority == {"decode": {min(19, base + nice)}, "upload": {base}, "download": {base}}
            assert len(outcome.result.tags_created) == 8  # every frame accepted: each job wrote

        outcome = label_target(
            session, {"project_id": project_id}, config, lambda names: pipeline,
            request=LabelRequest(progress=False), on_job=threads,
        )  # fmt: skip
        assert [job.plan.job_id for job in outcome.jobs] == jobs and list(seen) == jobs
        for kind in ("decode", "upload", "download"):
            first = seen[jobs[0]][kind]
            assert first, f"no {kind} thread was running after the first job"
            for later in jobs[1:]:  # the same thread objects, not new ones of the same name
                assert first <= seen[later][kind], kind
        ours = set().union(*(threads for job in seen.values() for threads in job.values()))
        assert not [t.name for t in ours if t.is_alive()], "threads of the run left running after it"
        names = ("decode", "upload", "download", "prime")
        left = [t.name for t in threading.enumerate() if t.name.startswith(names)]
        assert left == [], left
        assert server.violations == []


def test_the_next_jobs_first_batch_is_decoded_before_the_model_is_done_with_the_current_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `cvat.prefetch_jobs`, the next job's first batch is decoded (`runner.prime`) while
    the model scores the current job's last one, so the model does not wait at the boundary.
    The model's call for the first job's last batch waits for a decode of the second job to
    begin: that happens during the call only if the second job was primed (without
    lookahead, it begins only once the call is over)."""
    real_decode = worker.decode
    for prefetch_jobs, patience in ((1, 30.0), (0, 1.0)):
        with CvatTestServer() as server:
            project_id, (first, second) = _project(server, 16, segment_size=8)
            _set_up(server, project_id)
            config = tiny_model_config(
                {
                    "model.batch_size": 4, "model.cache_dir": str(tmp_path / "cache"),
                    "routing.accept_threshold": 0.0, "routing.min_margin": 0.0,
                    "cvat.prefetch_jobs": prefetch_jobs,
                }
            )  # fmt: skip
            session = connect(ServerOptions(host=server.url, auth=f"annotator:{PASSWORD}"), config.retry)
            pipeline = build_pipeline(config, ["cat", "coffee", "rocket"])
            second_decoding = threading.Event()
            calls: list[bool] = []  # per model call: did a decode of the second job begin by its end?

            def observed_decode(frame, *args, second=second, seen=second_decoding, **kwargs):
                if frame.ref.job_id == second:
                    seen.set()
                return real_decode(frame, *args, **kwargs)

            def encode_image(
                pixels, *args, encode=pipeline.loaded.model.encode_image, seen=second_decoding,
                calls=calls, patience=patience, **kwargs,
            ):  # fmt: skip
                # The first job's second (last) batch waits for the second job's decoding.
                calls.append(seen.wait(patience) if len(calls) == 1 else seen.is_set())
                return encode(pixels, *args, **kwargs)

            monkeypatch.setattr(worker, "decode", observed_decode)
            monkeypatch.setattr(pipeline.loaded.model, "encode_image", encode_image)
            label_target(
                session, {"project_id": project_id}, config, lambda names, pipeline=pipeline: pipeline,
                request=LabelRequest(progress=False),
            )  # fmt: skip
            assert len(calls) == 4, calls  # two batches of 4 frames per job
            assert calls[1] is bool(prefetch_jobs), calls
            assert [len(server.annotations(job)["tags"]) for job in (first, second)] == [8, 8]
            assert server.violations == []
