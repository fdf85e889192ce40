"""End to end, hands-free: CVAT's webhooks drive `prelabel serve`, and prelabel as a cvat-sdk function.

`prelabel serve` runs as a subprocess, as a user runs it, against the CVAT test server,
which delivers signed webhooks as CVAT 2.73 does. Nobody runs `prelabel run`: creating
the task is enough for its jobs to end up pre-labeled, with review issues.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cvat_sdk.auto_annotation as cvataa
import pytest
from cvat_sdk import Client, make_client

from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import find_labels, find_work
from connectors.cvat.labels import add_missing_attributes
from connectors.cvat.session import CvatSession
from prelabel.assemble import build_pipeline
from prelabel.pipeline.router import route
from prelabel.pipeline.worker import predict
from prelabel.service.deliveries import DeliveryLog
from prelabel.state import RunState
from tests.conftest import TINY_MODEL, run_cli, tiny_model_config, variants
from tests.cvat_fixtures import PASSWORD, tag_project
from tests.cvat_server import CvatTestServer
from tests.test_webhooks import scrape

LABELS = ["cat", "coffee", "rocket"]
SECRET = "hands-free-secret-3c1f7e0a9b"


def _jpegs(count: int, prefix: str) -> list[tuple[str, bytes]]:
    images = []
    for name, image in variants(count, (160, 120)):
        data = io.BytesIO()
        image.save(data, format="JPEG", quality=90)
        images.append((f"{prefix}{name}.jpg", data.getvalue()))
    return images


def _wait(what: str, check: Callable[[], object], timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _top1(client: Client, task_id: int, config) -> dict[tuple[int, int], tuple[str, float]]:
    """(job, frame) -> top-1 (label, probability), computed in-process over the task's chunks."""
    session = CvatSession(client)
    work = find_work(session, task_id=task_id, include_tagged=True)
    pipeline = build_pipeline(config, LABELS)
    top1 = {}
    for plan in work.jobs:
        source = JobFrameSource(session, plan).frames()
        for prediction in predict(source, pipeline.loaded, pipeline.classifier, pipeline.options):
            top1[(plan.job_id, prediction.ref.frame)] = (prediction.top_label, prediction.confidence)
    return top1


@dataclass
class HandsFree:
    server: CvatTestServer
    client: Client
    project_id: int
    port: int
    process: subprocess.Popen
    log_path: Path
    state_path: Path
    deliveries_path: Path
    threshold: float
    images: list[tuple[str, bytes]]
    expected: dict[int, tuple[str, float]]
    """Task frame -> top-1 of the probe task, whose frames are the same images."""

    def env(self) -> dict[str, str]:
        return {
            "CVAT_HOST": self.server.url,
            "CVAT_USERNAME": "annotator",
            "CVAT_PASSWORD": PASSWORD,
            "PRELABEL_WEBHOOK_SECRET": SECRET,
        }

    def records(self) -> list[dict]:
        with DeliveryLog(self.deliveries_path) as log:
            return log.records()

    def record(self, prefix: str, status: str = "done") -> dict | None:
        found = [r for r in self.records() if r["key"].startswith(prefix)]
        if found and found[0]["status"] == "failed":
            raise AssertionError(f"work failed: {found[0]['detail']}\n{self.log_path.read_text()[-3000:]}")
        return found[0] if found and found[0]["status"] == status else None

    def logs(self) -> list[dict]:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def hands_free(tmp_path_factory) -> Iterator[HandsFree]:
    """A project set up for prelabel, `prelabel serve` listening, and the webhook installed by the CLI."""
    tmp = tmp_path_factory.mktemp("hands-free")
    with CvatTestServer() as server:
        project_id = tag_project(server, "hands-free", LABELS)
        client = make_client(server.url, credentials=("annotator", PASSWORD))
        session = CvatSession(client)
        add_missing_attributes(session, find_labels(session, project_id=project_id)[1])

        # A probe task with the same images gives the confidences, to set a threshold that
        # sends about half of the frames to review.
        images = _jpegs(6, "f_")
        probe = server.add_image_task(project_id, images, name="probe", segment_size=3)
        model_config = tiny_model_config()
        probe_top1 = _top1(client, probe, model_config)
        confidences = sorted(confidence for _, confidence in probe_top1.values())
        threshold = (confidences[2] + confidences[3]) / 2
        expected = {frame: top for (_, frame), top in probe_top1.items()}

        config = tmp / "config.yaml"
        config.write_text(
            f"""
model: {{name: "{TINY_MODEL}", pretrained: none, batch_size: 4, cache_dir: "{tmp / "cache"}"}}
routing: {{accept_threshold: {threshold!r}, min_margin: 0.0}}
webhook: {{projects: [{project_id}]}}
""",
            encoding="utf-8",
        )
        port = _free_port()
        state_path = tmp / "state" / "state.db"
        log_path = tmp / "serve.log"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "CVAT_HOST": server.url,
            "CVAT_USERNAME": "annotator",
            "CVAT_PASSWORD": PASSWORD,
            "PRELABEL_WEBHOOK_SECRET": SECRET,
        }
        with open(log_path, "w", encoding="utf-8") as log_file:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "prelabel", "serve", "--listen", f"127.0.0.1:{port}"),
                    *("--config", str(config), "--state", str(state_path)),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env=env,
            )
        setup = HandsFree(
            server,
            client,
            project_id,
            port,
            process,
            log_path,
            state_path,
            state_path.with_name("deliveries.db"),
            threshold,
            images,
            expected,
        )
        try:
            _wait("prelabel serve to answer /healthz", lambda: _healthy(port, process), timeout=60)
            installed = run_cli(
                "webhook",
                "install",
                "--project-id",
                str(project_id),
                "--url",
                f"http://127.0.0.1:{port}/cvat",
                env=setup.env(),
            )
            assert installed.returncode == 0, installed.stderr
            assert "created" in installed.stdout
            assert SECRET not in installed.stdout + installed.stderr
            yield setup
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _healthy(port: int, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"prelabel serve exited with {process.returncode}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def _snapshot(server: CvatTestServer, task_id: int) -> dict:
    jobs = server.jobs(task_id)
    return {
        "annotations": {job["id"]: server.annotations(job["id"]) for job in jobs},
        "issues": [issue for job in jobs for issue in server.issues(job["id"])],
        "jobs": [server.job(job["id"]) for job in jobs],
    }


def test_a_new_task_is_prelabeled_and_a_redelivery_changes_nothing(hands_free: HandsFree):
    server = hands_free.server
    task_id = server.add_image_task(hands_free.project_id, hands_free.images, name="new", segment_size=3)
    key = f"completed:request[create:task]:task={task_id}"
    record = _wait("the new task's work", lambda: hands_free.record(key))
    assert record["item"] == {
        "kind": "label_task",
        "project_id": hands_free.project_id,
        "task_id": task_id,
        "job_id": None,
    }

    labels = {label["id"]: label["name"] for label in server.labels(hands_free.project_id)}
    accepted, reviewed = {}, set()
    for job in server.jobs(task_id):
        for tag in server.annotations(job["id"])["tags"]:
            assert tag["source"] == "auto"
            accepted.setdefault(tag["frame"], []).append(labels[tag["label_id"]])
        reviewed |= {issue["frame"] for issue in server.issues(job["id"])}
    # Every frame is tagged (accepted, or a suggestion beside its issue) and the review
    # frames are exactly those below the threshold, as `prelabel run` would route them.
    assert sorted(accepted) == list(range(len(hands_free.images)))
    below = {frame for frame, (_, p) in hands_free.expected.items() if p < hands_free.threshold}
    assert reviewed == below and 0 < len(below) < len(hands_free.images)
    assert {frame: names[0] for frame, names in accepted.items()} == {
        frame: label for frame, (label, _) in hands_free.expected.items()
    }

    # Redeliver the event from CVAT: it is answered, and nothing is written.
    deliveries = server.webhook_deliveries()
    original = next(
        d
        for d in deliveries
        if d["event"] == "completed:request[create:task]"
        and d["request"]["data"]["request"]["operation"]["task_id"] == task_id
    )
    assert original["status_code"] == 202
    before = _snapshot(server, task_id)
    server.reset_counters()
    hands_free.client.api_client.webhooks_api.create_deliveries_redelivery(
        str(original["id"]), original["webhook_id"]
    )
    again = [d for d in server.webhook_deliveries() if d["redelivery"]]
    assert len(again) == 1 and again[0]["status_code"] == 200 and "duplicate" in again[0]["response"]
    assert again[0]["request"] == original["request"]
    time.sleep(1.0)
    writes = [r for r in server.requests if r.method != "GET" and "/redelivery" not in r.path]
    assert writes == []
    assert _snapshot(server, task_id) == before
    assert hands_free.record(key)["duplicates"] == 1

    logged = [entry for entry in hands_free.logs() if entry.get("event") == "completed:request[create:task]"]
    assert any(
        e["message"] == "delivery queued" and e["task"] == task_id and e["project"] == hands_free.project_id
        for e in logged
    )
    assert any(e["message"] == "delivery is a duplicate" for e in logged)


def test_a_job_moved_to_acceptance_is_synced_alone(hands_free: HandsFree):
    server = hands_free.server
    named = [task["id"] for task in server.state.tasks.values() if task["name"] == "new"]
    task_id = (
        named[0]
        if named
        else server.add_image_task(hands_free.project_id, hands_free.images, name="new", segment_size=3)
    )
    first, second = (job["id"] for job in server.jobs(task_id))
    _wait("the task's work", lambda: hands_free.record(f"completed:request[create:task]:task={task_id}"))
    hands_free.client.jobs.retrieve(first).update({"stage": "acceptance"})
    record = _wait("the job's sync", lambda: hands_free.record(f"update:job:job={first}:"))
    assert record["item"]["kind"] == "sync_job" and record["item"]["job_id"] == first

    with RunState(hands_free.state_path, lock=False) as state:
        outcomes = state.outcomes()
        decided = state.frames(job_id=first)
    assert {outcome.job_id for outcome in outcomes} == {first}
    assert sorted(o.frame for o in outcomes) == sorted(r.frame for r in decided) == [0, 1, 2]
    # Untouched by reviewers: accepted frames are kept, review frames still pending.
    for outcome in outcomes:
        assert outcome.outcome == ("kept" if outcome.decision == "accept" else "pending")
    assert not [r for r in hands_free.records() if r["key"].startswith(f"update:job:job={second}:")]


SUMMARY = re.compile(
    r"(\d+) jobs labeled, (\d+) frames, (\d+) accepted, (\d+) for review; wrote (\d+) tags, (\d+) issues"
)


def _ready(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_metrics_match_the_work_done_and_readyz_follows_cvat(hands_free: HandsFree):
    server, port = hands_free.server, hands_free.port
    server.fail(r"^/api/jobs/\d+/annotations", 503, method="PATCH", times=2)  # two retried uploads
    task_id = server.add_image_task(hands_free.project_id, hands_free.images, name="metrics", segment_size=3)
    _wait("the task's work", lambda: hands_free.record(f"completed:request[create:task]:task={task_id}"))
    samples = scrape(f"http://127.0.0.1:{port}/metrics")

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    records = hands_free.records()
    labeled = [r for r in records if r["item"]["kind"] == "label_task" and r["status"] == "done"]
    totals = [0] * 6  # jobs, frames, accepted, review, tags, issues: the service's own summaries
    for record in labeled:
        totals = [a + int(b) for a, b in zip(totals, SUMMARY.search(record["detail"]).groups(), strict=True)]
    jobs, frames, accepted, review, tags, issues = totals
    assert frames >= len(hands_free.images) and accepted and review
    assert value("prelabel_frames_labeled_total", decision="accepted") == accepted
    assert value("prelabel_frames_labeled_total", decision="review") == review
    assert value("prelabel_frames_labeled_total", decision="unreadable") == frames - accepted - review == 0
    assert value("prelabel_cvat_writes_total", kind="tags") == tags
    assert value("prelabel_cvat_writes_total", kind="issues") == issues
    assert value("prelabel_cvat_retries_total", kind="503") == 2
    assert value("prelabel_work_items_total", kind="label_task", outcome="done") == len(labeled)
    assert value("prelabel_webhook_deliveries_total", outcome="queued") == len(records)
    assert value("prelabel_webhook_deliveries_total", outcome="duplicate") == sum(
        r["duplicates"] for r in records
    )
    assert value("prelabel_task_created_to_labeled_seconds_count") == len(labeled)
    assert 0 < value("prelabel_task_created_to_labeled_seconds_sum") < 600 * len(labeled)
    assert value("prelabel_work_queue_depth") == 0
    assert value("prelabel_images_per_second") > 0
    stages = {dict(k[1])["stage"]: v for k, v in samples.items() if k[0] == "prelabel_stage_seconds_total"}
    assert stages and all(v >= 0 for v in stages.values()) and sum(stages.values()) > 0
    assert jobs >= 2

    assert _ready(port) == (200, {"status": "ready", "checks": {"cvat": "ok"}})
    server.fail("^/api/server/about", 503, times=None)
    time.sleep(1.1)  # past the probe's cache
    status, body = _ready(port)
    assert status == 503 and "503" in body["checks"]["cvat"], body
    server.clear_faults()
    time.sleep(1.1)
    assert _ready(port)[0] == 200


def test_sigterm_drains_and_logs_never_hold_the_secret(hands_free: HandsFree):
    hands_free.process.send_signal(signal.SIGTERM)
    assert hands_free.process.wait(timeout=30) == 0
    text = hands_free.log_path.read_text(encoding="utf-8")
    assert SECRET not in text and PASSWORD not in text
    messages = [entry["message"] for entry in hands_free.logs()]
    assert messages[-2:] == ["draining", "stopped"]

    removed = run_cli("webhook", "remove", "--project-id", str(hands_free.project_id), env=hands_free.env())
    assert removed.returncode == 0, removed.stderr
    assert not [w for w in hands_free.server.webhooks.webhooks.values()]


# ------------------------------------------------------------------- the cvat-sdk function
def test_the_function_module_tags_through_annotate_task():
    from prelabel import cvat_function

    with CvatTestServer() as server:
        project_id = tag_project(server, "function", LABELS)
        task_id = server.add_image_task(project_id, _jpegs(5, "g_"), name="fn", segment_size=3)
        client = make_client(server.url, credentials=("annotator", PASSWORD))
        # The function knows one label the task lacks ("galaxy"); accept everything.
        function = cvat_function.create(
            model=TINY_MODEL, pretrained="none", threshold=0.0, margin=0.0, labels="cat,coffee,rocket,galaxy"
        )
        assert [label.name for label in function.spec.labels] == [*LABELS, "galaxy"]
        with pytest.raises(cvataa.BadFunctionError, match="galaxy"):
            cvataa.annotate_task(client, task_id, function)
        cvataa.annotate_task(client, task_id, function, allow_unmatched_labels=True)

        # The same frames, scored and routed in-process by the function's own pipeline.
        session = CvatSession(client)
        work = find_work(session, task_id=task_id, include_tagged=True)
        pipeline = function.pipeline
        expected = {}
        for plan in work.jobs:
            source = JobFrameSource(session, plan).frames()
            for prediction in predict(source, pipeline.loaded, pipeline.classifier, pipeline.options):
                decision = route(prediction, pipeline.policy)
                expected[prediction.ref.frame] = [label for label, _ in decision.tags if label in LABELS]
        labels = {label["id"]: label["name"] for label in server.labels(project_id)}
        tags = server.task_annotations(task_id)["tags"]
        got: dict[int, list[str]] = {}
        for tag in tags:
            assert tag["source"] == "auto" and tag["attributes"] == []
            got.setdefault(tag["frame"], []).append(labels[tag["label_id"]])
        assert got == {frame: names for frame, names in expected.items() if names}
        assert set(labels[tag["label_id"]] for tag in tags) <= set(LABELS)
