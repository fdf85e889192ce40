"""Login rides out a flaky network: drops, resets and 429/502/503/504 are retried within the
`retry:` budget; a refused connection, a DNS or TLS failure and 400/401/403 fail at once."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.cvat.connect import ServerOptions, connect
from connectors.cvat.errors import CvatError
from prelabel.config import RetryConfig
from tests.conftest import run_cli
from tests.cvat_fixtures import PASSWORD, build_project
from tests.cvat_server import CvatTestServer
from tests.test_bad_input import _self_signed

POLICY = RetryConfig(attempts=4, max_seconds=30, initial_wait=0.3, max_wait=0.3, timeout=2.0)
FAST = 0.25
"""A failure that is not retried ends well before the first backoff (`initial_wait`)."""


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[CvatTestServer]:
    monkeypatch.setenv("CVAT_USERNAME", "annotator")
    monkeypatch.setenv("CVAT_PASSWORD", PASSWORD)
    monkeypatch.delenv("CVAT_ACCESS_TOKEN", raising=False)
    monkeypatch.delenv("CVAT_HOST", raising=False)
    with CvatTestServer() as cvat:
        cvat.add_user("annotator", PASSWORD)
        yield cvat


def login(url: str, policy: RetryConfig = POLICY, **options) -> str:
    """Log in; returns the user name the server knows."""
    session = connect(ServerOptions(host=url, **options), policy)
    try:
        return session.client.users.retrieve_current_user().username
    finally:
        session.client.close()


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]


@pytest.mark.parametrize("status", [429, 502, 503, 504])
@pytest.mark.parametrize("path", ["^/api/auth/login", "^/api/users/self"])
def test_transient_statuses_are_retried(server, caplog, status: int, path: str):
    caplog.set_level(logging.WARNING)
    fault = server.fail(path, status, times=2, retry_after=0 if status == 429 else None)
    assert login(server.url) == "annotator"
    assert fault.fired == 2
    logged = retries_logged(caplog)
    assert len(logged) == 2 and all(f"logging in to {server.url}" in m for m in logged)
    assert all(str(status) in m for m in logged), logged
    assert not any(PASSWORD in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("path", ["^/api/server/about", "^/api/auth/login", "^/api/users/self"])
def test_a_dropped_connection_is_retried(server, caplog, path: str):
    caplog.set_level(logging.WARNING)
    fault = server.drop(path, times=3)
    assert login(server.url) == "annotator"
    assert fault.fired == 3
    assert len(retries_logged(caplog)) == 3
    assert "RemoteDisconnected" in retries_logged(caplog)[0]


def test_twenty_percent_dropped_or_failed_still_logs_in(server):
    fired = 0
    for seed in range(8):
        server.clear_faults(seed=seed)
        faults = [
            server.drop("^/api/(server|auth|users)", times=None, probability=0.1),
            server.fail("^/api/(server|auth|users)", 504, times=None, probability=0.1),
        ]
        assert login(server.url, RetryConfig(attempts=30, initial_wait=0.01, max_wait=0.05)) == "annotator"
        fired += sum(f.fired for f in faults)
    assert fired > 0


class ResettingServer:
    """Accepts connections on loopback and resets each one (RST), counting them."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            connection.recv(65536)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            connection.close()

    def close(self) -> None:
        self.socket.close()


def test_a_reset_connection_is_retried_until_the_budget_ends(server, caplog):
    caplog.set_level(logging.WARNING)
    resetting = ResettingServer()
    try:
        with pytest.raises(CvatError) as raised:
            login(resetting.url)
    finally:
        resetting.close()
    assert len(retries_logged(caplog)) == POLICY.attempts - 1
    assert resetting.accepted >= POLICY.attempts
    line = raised.value.one_line()
    assert "\n" not in line and f"logging in to {resetting.url}: cannot reach the server" in line


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (f"http://127.0.0.1:{_free_port()}", "cannot reach the server"),
        ("http://prelabel-no-such-host.invalid", "cannot reach the server"),
    ],
    ids=["connection-refused", "dns-failure"],
)
def test_unreachable_hosts_fail_at_once(server, caplog, url: str, fragment: str):
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    with pytest.raises(CvatError) as raised:
        login(url)
    assert time.monotonic() - started < FAST
    assert retries_logged(caplog) == []
    assert fragment in raised.value.one_line() and "\n" not in raised.value.one_line()


def test_a_tls_failure_fails_at_once(tmp_path: Path, server, caplog):
    caplog.set_level(logging.WARNING)
    cert, key = _self_signed(tmp_path)
    with CvatTestServer(tls=(cert, key)) as secure:
        secure.add_user("annotator", PASSWORD)
        started = time.monotonic()
        with pytest.raises(CvatError) as raised:
            login(secure.url)
        assert time.monotonic() - started < FAST
        assert login(secure.url, ca_bundle=cert) == "annotator"
    assert retries_logged(caplog) == []
    assert "TLS certificate verification failed" in raised.value.one_line()


@pytest.mark.parametrize(
    ("status", "path", "fragment"),
    [
        (400, "^/api/auth/login", "rejected the credentials"),
        (401, "^/api/users/self", "rejected the credentials"),
        (403, "^/api/users/self", "permission denied"),
    ],
)
def test_refusals_fail_at_once(server, caplog, status: int, path: str, fragment: str):
    caplog.set_level(logging.WARNING)
    fault = server.fail(path, status, times=None)
    with pytest.raises(CvatError) as raised:
        login(server.url)
    assert fault.fired == 1
    assert retries_logged(caplog) == []
    assert fragment in raised.value.one_line()


def test_setup_survives_a_flaky_login():
    with CvatTestServer() as server:
        project = build_project(server)
        server.drop("^/api/server/about", times=1)
        server.fail("^/api/auth/login", 503, times=1)
        server.fail("^/api/users/self", 504, times=1)
        result = run_cli("setup", "--project-id", str(project.project_id), env=project.env())
    assert result.returncode == 0, result.stderr
    assert "retrying" in result.stderr and "504" in result.stderr
