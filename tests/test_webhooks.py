"""Hands-free pre-labeling: `prelabel serve` takes CVAT's signed webhook deliveries.

The signature tests replay the real deliveries of tests/assets/cvat-2.73/webhooks/ (a CVAT 2.73.0
server, secret ``s3cret``) against the service over real HTTP. The end-to-end test runs
`prelabel serve` as a subprocess against the CVAT test server, which delivers webhooks as
CVAT does: a task created there ends up pre-labeled, and a redelivery changes nothing.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cvat_sdk import make_client

from connectors.cvat.session import CvatSession
from connectors.cvat.webhooks import DESCRIPTION, EVENTS, install_webhook, read_event, remove_webhook
from prelabel.errors import PrelabelError
from prelabel.service.deliveries import DeliveryLog
from prelabel.service.http import Intent, Service, listen
from tests.cvat_fixtures import PASSWORD
from tests.cvat_server import CvatTestServer, sample_jpegs

REPO = Path(__file__).resolve().parents[1]
CAPTURED = REPO / "tests" / "assets" / "cvat-2.73" / "webhooks"
REAL_SECRET = "s3cret"
SECRET = "a-webhook-secret-for-tests-0123456789"


def _captured(name: str) -> tuple[dict[str, str], bytes]:
    """Headers and the exact body bytes CVAT sent (json.dumps of the body; create_issue keeps them)."""
    record = json.loads((CAPTURED / f"{name}.json").read_text())
    raw = record["raw_body"].encode() if "raw_body" in record else json.dumps(record["body"]).encode()
    return record["headers"], raw


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# ------------------------------------------------------------ the service, in-process
@dataclass
class Recorder:
    """A dispatcher that keeps what it is given (the service's neighbour, not the service)."""

    items: list[tuple[str, dict]] = field(default_factory=list)

    def submit(self, key: str, item: dict[str, Any]) -> None:
        self.items.append((key, item))

    def pending(self) -> int:
        return len(self.items)

    def stop(self) -> None:
        pass


def _cvat_intent(body: Any) -> Intent:
    event = read_event(body)
    return Intent(event.fields(), event.key, event.item.to_dict() if event.item else None, event.reason)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, Service, Recorder]]:
    """The real service (real HTTP, real delivery log) with the real secret of the captures."""
    recorder = Recorder()
    with DeliveryLog(tmp_path / "deliveries.db") as deliveries:
        svc = Service(
            secret=REAL_SECRET,
            interpret=_cvat_intent,
            deliveries=deliveries,
            dispatcher=recorder,
            max_body=64 * 1024,
        )
        server = listen(svc, ("127.0.0.1", 0))
        _, port = server.start()
        try:
            yield f"http://127.0.0.1:{port}/", svc, recorder
        finally:
            server.stop()


def test_real_deliveries_with_their_signature_are_accepted(service):
    url, svc, recorder = service
    answers = {}
    for name in ("create_task", "update_task", "completed_request_create_task", "update_job", "create_issue"):
        headers, body = _captured(name)
        started = time.perf_counter()
        answers[name] = _post(url, body, headers)
        assert time.perf_counter() - started < 1.0
    assert answers["completed_request_create_task"] == (202, {"status": "queued"})
    # create:task comes before the task has data; the captured update:job moves to validation.
    for name in ("create_task", "update_task", "update_job", "create_issue"):
        assert answers[name][0] == 200 and answers[name][1]["status"] == "ignored", name
    assert recorder.items == [
        (
            "completed:request[create:task]:task=28",
            {"kind": "label_task", "project_id": 16, "task_id": 28, "job_id": None},
        )
    ]
    assert svc.deliveries.records()[0]["status"] == "queued"


@pytest.mark.parametrize("case", ["missing", "tampered_signature", "wrong_secret", "tampered_body"])
def test_unsigned_or_badly_signed_deliveries_get_401_and_queue_nothing(service, case):
    import hashlib
    import hmac

    url, svc, recorder = service
    headers, body = _captured("completed_request_create_task")
    headers = dict(headers)
    if case == "missing":
        del headers["X-Signature-256"]
    elif case == "tampered_signature":
        good = headers["X-Signature-256"]
        headers["X-Signature-256"] = good[:-1] + ("0" if good[-1] != "0" else "1")
    elif case == "wrong_secret":
        headers["X-Signature-256"] = "sha256=" + hmac.new(b"not-the-secret", body, hashlib.sha256).hexdigest()
    else:
        body = body.replace(b'"task_id": 28', b'"task_id": 29')
    status, reply = _post(url, body, headers)
    assert status == 401
    assert "s3cret" not in json.dumps(reply)
    assert recorder.items == []
    assert svc.deliveries.records() == []
    assert svc.counts == {"unauthorized": 1}


def test_redelivery_is_answered_but_starts_nothing_and_limits_hold(service):
    url, svc, recorder = service
    headers, body = _captured("completed_request_create_task")
    assert _post(url, body, headers)[0] == 202
    assert _post(url, body, headers) == (200, {"status": "duplicate"})
    assert len(recorder.items) == 1
    assert svc.deliveries.records()[0]["duplicates"] == 1

    # Signed, but not JSON: refused.
    import hashlib
    import hmac

    text = b"event=completed"
    signed = "sha256=" + hmac.new(REAL_SECRET.encode(), text, hashlib.sha256).hexdigest()
    assert _post(url, text, {"Content-Type": "text/plain", "X-Signature-256": signed})[0] == 415
    # Too large: refused before the body is read.
    big = b"{" + b" " * (64 * 1024) + b"}"
    assert _post(url, big, {**headers})[0] == 413
    with urllib.request.urlopen(url + "healthz", timeout=5) as answer:
        health = json.loads(answer.read())
    assert answer.status == 200 and health["status"] == "ok"
    assert len(recorder.items) == 1


# -------------------------------------------------------------------- the test server
def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(item) for item in value[:1]]
    return type(value).__name__


def test_test_server_delivers_like_real_cvat(tmp_path: Path):
    """Same keys in the same order, value types, headers and signature rule as the captures."""
    received: list[tuple[dict, bytes]] = []

    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with CvatTestServer() as server:
            project_id = _seed(server)
            session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))
            url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
            installed = install_webhook(session, project_id, url, REAL_SECRET)
            server.webhooks.webhooks[installed.webhook_id]["events"].append("create:task")
            task_id = server.add_image_task(project_id, sample_jpegs(4), name="t", segment_size=3)
            job = session.client.jobs.retrieve(server.jobs(task_id)[0]["id"])
            job.update({"stage": "validation"})
            deliveries = server.webhook_deliveries()
    finally:
        receiver.shutdown()
        receiver.server_close()
    import hashlib
    import hmac

    files = {
        "create:task": "create_task",
        "completed:request[create:task]": "completed_request_create_task",
        "update:job": "update_job",
    }
    assert [json.loads(body)["event"] for _, body in received] == list(files)
    assert [d["status_code"] for d in deliveries] == [200, 200, 200]
    for headers, body in received:
        payload = json.loads(body)
        real = json.loads((CAPTURED / f"{files[payload['event']]}.json").read_text())
        assert body == json.dumps(payload).encode()
        assert (
            headers["X-Signature-256"]
            == "sha256=" + hmac.new(REAL_SECRET.encode(), body, hashlib.sha256).hexdigest()
        )
        for name, value in real["headers"].items():
            if name != "X-Signature-256":
                assert headers[name] == value
        assert _shape(payload) == _shape(real["body"]), payload["event"]
    update = json.loads(received[2][1])
    assert update["changes"]["stage"] == {"from": "annotation", "to": "validation"}
    assert update["job"]["id"] == job.id


def _seed(server: CvatTestServer) -> int:
    server.add_user("annotator", PASSWORD)
    return server.add_project(
        "hands-free",
        owner="annotator",
        labels=[{"name": name, "type": "tag", "attributes": []} for name in ("cat", "coffee", "rocket")],
    )


def test_webhook_install_is_idempotent_and_remove_removes_it():
    with CvatTestServer() as server:
        project_id = _seed(server)
        other = server.add_project("other", owner="annotator", labels=[{"name": "cat", "type": "tag"}])
        session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))
        first = install_webhook(session, project_id, "http://10.0.0.5:8765/", SECRET)
        second = install_webhook(session, project_id, "http://10.0.0.5:8765/", SECRET)
        assert first.created and not second.created and second.webhook_id == first.webhook_id
        moved = install_webhook(session, project_id, "http://10.0.0.6:9000/hook", SECRET)
        assert moved.webhook_id == first.webhook_id and not moved.created
        install_webhook(session, other, "http://10.0.0.5:8765/", SECRET)

        hooks = [w for w in server.webhooks.webhooks.values() if w["project_id"] == project_id]
        assert len(hooks) == 1
        hook = hooks[0]
        assert hook["target_url"] == "http://10.0.0.6:9000/hook"
        assert sorted(hook["events"]) == sorted(EVENTS)
        assert hook["secret"] == SECRET and hook["description"] == DESCRIPTION
        assert hook["content_type"] == "application/json" and hook["is_active"]
        read = session.client.api_client.webhooks_api.retrieve(hook["id"])[0]
        assert "secret" not in read.to_dict()

        with pytest.raises(PrelabelError, match="project 999"):
            install_webhook(session, 999, "http://10.0.0.5:8765/", SECRET)

        assert remove_webhook(session, project_id) == [first.webhook_id]
        assert remove_webhook(session, project_id) == []
        assert [w["project_id"] for w in server.webhooks.webhooks.values()] == [other]


def test_worker_records_outcomes_failed_work_may_be_redelivered_and_unfinished_work_survives(tmp_path: Path):
    """The in-process worker with a stand-in for the CVAT work (its neighbour), and the real log."""
    from prelabel.service.http import InProcessWorker

    release = threading.Event()
    done: list[dict] = []

    def perform(item: dict) -> str:
        release.wait(10)
        if item["task_id"] == 1 and not any(d["task_id"] == 1 for d in done):
            done.append(item)
            raise PrelabelError("CVAT is away")
        done.append(item)
        return f"task {item['task_id']} labeled"

    headers, _ = _captured("completed_request_create_task")
    record = json.loads((CAPTURED / "completed_request_create_task.json").read_text())["body"]

    def delivery(task_id: int) -> bytes:
        body = json.loads(json.dumps(record))
        body["request"]["operation"]["task_id"] = task_id
        return json.dumps(body).encode()

    import hashlib
    import hmac

    def signed(body: bytes) -> dict:
        return {
            **headers,
            "X-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        }

    def by_key(log: DeliveryLog, task_id: int) -> dict:
        key = f"completed:request[create:task]:task={task_id}"
        return next(r for r in log.records() if r["key"] == key)

    path = tmp_path / "deliveries.db"
    with DeliveryLog(path) as deliveries:
        worker = InProcessWorker(perform, deliveries, capacity=1)
        svc = Service(secret=SECRET, interpret=_cvat_intent, deliveries=deliveries, dispatcher=worker)
        server = listen(svc, ("127.0.0.1", 0))
        url = f"http://127.0.0.1:{server.start()[1]}/"
        try:
            assert _post(url, delivery(1), signed(delivery(1)))[0] == 202  # taken by the worker
            deadline = time.monotonic() + 5
            while deliveries.records()[0]["status"] != "running" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _post(url, delivery(2), signed(delivery(2)))[0] == 202  # waits in the queue
            status, _ = _post(url, delivery(3), signed(delivery(3)))  # no room: refused, not recorded
            assert status == 503
            assert [r["key"] for r in deliveries.records()] == [
                "completed:request[create:task]:task=1",
                "completed:request[create:task]:task=2",
            ]
            release.set()
            deadline = time.monotonic() + 10
            while {r["status"] for r in deliveries.records()} != {"failed", "done"}:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            first = by_key(deliveries, 1)
            assert first["status"] == "failed" and first["detail"] == "CVAT is away"
            # A redelivery of failed work is taken on again, and now succeeds.
            assert _post(url, delivery(1), signed(delivery(1)))[0] == 202
            deadline = time.monotonic() + 10
            while by_key(deliveries, 1)["status"] != "done":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert by_key(deliveries, 1)["detail"] == "task 1 labeled"
            # Work still queued when the service stops stays recorded for the next start.
            release.clear()
            assert _post(url, delivery(4), signed(delivery(4)))[0] == 202
            assert _post(url, delivery(5), signed(delivery(5)))[0] == 202
        finally:
            server.stop()
            stopping = threading.Thread(target=worker.stop)  # asks first, so task 5 is never taken
            stopping.start()
            time.sleep(0.3)
            release.set()
            stopping.join(10)
    with DeliveryLog(path) as reopened:
        left = [key for key, _ in reopened.unfinished()]
    assert left == ["completed:request[create:task]:task=5"]


# ------------------------------------------------------------------- metrics and probes
def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics answer: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_each_delivery_by_outcome_and_readyz_follows_its_checks(service):
    url, svc, recorder = service
    headers, body = _captured("completed_request_create_task")
    assert _post(url, body, headers)[0] == 202
    assert _post(url, body, headers)[0] == 200  # duplicate
    assert _post(url, body, {**headers, "X-Signature-256": "sha256=00"})[0] == 401
    assert _post(url, *reversed(_captured("create_task")))[0] == 200  # ignored
    samples = scrape(url + "metrics")
    delivered = {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "prelabel_webhook_deliveries_total"
    }
    assert {k: v for k, v in delivered.items() if v} == {k: float(v) for k, v in svc.counts.items()}
    assert delivered == {**dict.fromkeys(delivered, 0.0), "queued": 1, "duplicate": 1, "unauthorized": 1,
                         "ignored": 1}  # fmt: skip
    assert samples[("prelabel_work_queue_depth", ())] == len(recorder.items) == 1
    assert samples[("prelabel_frames_labeled_total", (("decision", "review"),))] == 0

    with urllib.request.urlopen(url + "readyz", timeout=5) as answer:
        assert answer.status == 200 and json.loads(answer.read())["status"] == "ready"
    failing = {"down": False}

    def cvat() -> None:
        if failing["down"]:
            raise PrelabelError("checking the CVAT server: cannot reach the server (refused)")

    svc.probes.checks = {"cvat": cvat}
    svc.probes.cache_seconds = 0.0
    failing["down"] = True
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "readyz", timeout=5)
    assert refused.value.code == 503
    assert json.loads(refused.value.read())["checks"] == {
        "cvat": "checking the CVAT server: cannot reach the server (refused)"
    }
    with urllib.request.urlopen(url + "healthz", timeout=5) as answer:  # alive all the same
        assert answer.status == 200
