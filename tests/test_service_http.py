"""The service's HTTP stack (Starlette under uvicorn): slow and idle clients, the limits, the
answers that refuse a request. Real sockets on loopback, the real service and delivery log."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from email.message import Message
from pathlib import Path

import pytest

from prelabel.service.deliveries import DeliveryLog
from prelabel.service.http import BUSY_RETRY_AFTER, Limits, Service, listen
from tests.test_webhooks import REAL_SECRET, Recorder, _captured, _cvat_intent


class Full(Recorder):
    """A dispatcher whose queue is full."""

    def submit(self, key: str, item: dict) -> None:
        raise queue.Full


@contextmanager
def running(
    tmp_path: Path, limits: Limits, dispatcher: Recorder | None = None
) -> Iterator[tuple[int, Service]]:
    with DeliveryLog(tmp_path / "deliveries.db") as deliveries:
        service = Service(
            secret=REAL_SECRET,
            interpret=_cvat_intent,
            deliveries=deliveries,
            dispatcher=dispatcher or Recorder(),
            max_body=64 * 1024,
        )
        server = listen(service, ("127.0.0.1", 0), limits)
        _, port = server.start()
        try:
            yield port, service
        finally:
            server.stop()


def deliver(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, object, Message, float]:
    """POST a delivery on a new connection: (status, JSON reply or text, headers, seconds)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/cvat", body=body, headers=headers)
        answer = connection.getresponse()
        data = answer.read()
        json_reply = answer.headers.get("Content-Type", "").startswith("application/json")
        reply = json.loads(data or b"{}") if json_reply else data.decode()
        return answer.status, reply, answer.headers, time.perf_counter() - started
    finally:
        connection.close()


def idle_connections(stack: ExitStack, port: int, count: int) -> list[socket.socket]:
    """`count` clients that connect and then stall: half send nothing, half half a request head."""
    sockets = []
    for index in range(count):
        client = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        if index % 2:
            client.sendall(b"POST /cvat HTTP/1.1\r\nHost: prelabel\r\nContent-Type: appl")
        sockets.append(client)
    return sockets


def closed_by_server(client: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (what it sends first is read)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        client.settimeout(left)
        try:
            if client.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_two_hundred_idle_clients_do_not_delay_a_real_delivery(tmp_path: Path):
    headers, body = _captured("completed_request_create_task")
    with running(tmp_path, Limits()) as (port, service), ExitStack() as stack:
        idle = idle_connections(stack, port, 200)
        time.sleep(0.2)
        status, reply, _, seconds = deliver(port, body, headers)
        assert (status, reply) == (202, {"status": "queued"})
        assert seconds < 1.0, seconds
        # and again, for a delivery that finds the same crowd
        assert deliver(port, body, headers)[:2] == (200, {"status": "duplicate"})
        assert all(not closed_by_server(client, 0.01) for client in idle[:4])  # still held open
    assert service.counts == {"queued": 1, "duplicate": 1}


def test_a_client_that_never_finishes_its_headers_is_closed(tmp_path: Path):
    limits = Limits(head_timeout=0.5, keep_alive=1)
    with running(tmp_path, limits) as (port, _), ExitStack() as stack:
        silent, partial = idle_connections(stack, port, 2)
        started = time.monotonic()
        assert closed_by_server(silent, 5) and closed_by_server(partial, 5)
        assert time.monotonic() - started < 3
        # a kept-alive connection that starts a second request and stalls is closed too
        kept = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: prelabel\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert closed_by_server(kept, 5)


def test_a_body_that_does_not_arrive_gets_408(tmp_path: Path):
    with running(tmp_path, Limits(body_timeout=0.5)) as (port, service), ExitStack() as stack:
        client = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        client.sendall(
            b"POST /cvat HTTP/1.1\r\nHost: prelabel\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"event": '
        )
        answer = client.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower()
    assert service.counts == {}


def test_refusals_411_413_and_a_full_queue_503_with_retry_after(tmp_path: Path):
    headers, body = _captured("completed_request_create_task")
    with running(tmp_path, Limits(), Full()) as (port, service), ExitStack() as stack:
        status, reply, answer_headers, seconds = deliver(port, body, headers)
        assert status == 503 and "queue is full" in reply["detail"]
        assert answer_headers["Retry-After"] == "30" and seconds < 1.0
        assert service.deliveries.records() == []  # released: a redelivery is taken on

        client = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        client.sendall(
            b"POST /cvat HTTP/1.1\r\nHost: prelabel\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
        assert client.recv(4096).startswith(b"HTTP/1.1 411")

        big = b"{" + b" " * (64 * 1024) + b"}"
        status, _, answer_headers, _ = deliver(port, big, headers)
        assert status == 413 and answer_headers["connection"] == "close"

        status, reply, _, _ = deliver(port, body, {**headers, "Content-Type": "text/plain"})
        assert status == 415
    assert service.counts == {"busy": 1, "unsupported": 1}


def test_connections_beyond_the_bound_are_refused_with_503(tmp_path: Path):
    headers, body = _captured("completed_request_create_task")
    with running(tmp_path, Limits(max_connections=20)) as (port, _), ExitStack() as stack:
        idle_connections(stack, port, 20)
        time.sleep(0.2)
        status, reply, answer_headers, _ = deliver(port, body, headers)
        assert (status, reply) == (503, "Service Unavailable")
        assert answer_headers["Retry-After"] == BUSY_RETRY_AFTER
    with running(tmp_path / "again", Limits(max_connections=20)) as (port, _):
        assert deliver(port, body, headers)[0] == 202


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_probes_answer_on_the_service_port(tmp_path: Path, path: str):
    with running(tmp_path, Limits()) as (port, _):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", path)
        answer = connection.getresponse()
        assert answer.status == 200 and answer.read()
        connection.close()
