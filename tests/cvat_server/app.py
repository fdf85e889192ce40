"""HTTP layer: a threading HTTP/1.1 server that authenticates, routes, logs and injects faults."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .access import request_org
from .api import JSON_TYPE, Api, Ctx, Reply
from .auth import SAFE_METHODS, authenticate, require_user
from .errors import PERMISSION_DENIED, ApiError
from .faults import MUTATING, Fault, FaultInjector
from .latency import Latency
from .schema import answer_problem
from .state import State


@dataclass
class LoggedRequest:
    """One request as the server saw it; `status` is None for a dropped connection."""

    method: str
    path: str
    query: dict[str, str]
    status: int | None
    user: str | None = None
    fault: str | None = None
    started: float = 0.0
    """`time.perf_counter()` when the request arrived (its body read)."""
    finished: float = 0.0
    """`time.perf_counter()` when it was answered (just before the answer is sent)."""


class App:
    """Everything behind the socket: API, request log, write counter, faults and the
    check of every JSON answer against CVAT's schema (when `check_answers`)."""

    def __init__(
        self,
        state: State,
        faults: FaultInjector,
        latency: Latency | None = None,
        *,
        check_answers: bool = True,
    ) -> None:
        self.state = state
        self.faults = faults
        self.check_answers = check_answers
        self.api: Api | None = None
        self.latency = latency or Latency()
        self.log: list[LoggedRequest] = []
        self.write_count = 0
        self.answer_violations: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, entry: LoggedRequest, *, write: bool) -> None:
        """Append to the request log and count writes."""
        with self._lock:
            self.log.append(entry)
            if write:
                self.write_count += 1

    def reset_counters(self) -> None:
        """Forget the request log and zero the write counter."""
        with self._lock:
            self.log.clear()
            self.write_count = 0

    def check_answer(self, method: str, path: str, status: int, data: bytes, content_type: str) -> None:
        """Record (in `answer_violations` and the state's violations) a JSON answer that
        CVAT 2.73's schema does not allow; non-JSON answers are not checked."""
        if not self.check_answers or "json" not in content_type:
            return
        try:
            problem = answer_problem(method, path, status, json.loads(data) if data else None, content_type)
        except ValueError as exc:
            problem = f"a {content_type} answer that is not JSON: {exc}"
        if problem is None:
            return
        entry = {"method": method, "path": path, "status": status}
        self.state.violation("answer_schema", problem, **entry)
        with self._lock:
            self.answer_violations.append({"kind": "answer_schema", "message": problem, **entry})

    def dispatch(
        self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes
    ) -> tuple[Reply, str | None]:
        """Run the request through auth and the route; errors become CVAT error replies."""
        assert self.api is not None
        username = None
        try:
            route, params = self.api.resolve(method, path)
            identity = authenticate(self.state, method, headers)
            user = identity.user if route.public else require_user(identity)
            username = user["username"] if user else None
            org = request_org(self.state, query, headers)
            if identity.read_only and method not in SAFE_METHODS and not path.startswith("/api/auth/"):
                raise ApiError(403, {"detail": PERMISSION_DENIED})
            try:
                payload = json.loads(body) if body else None
            except ValueError as exc:
                raise ApiError(400, {"detail": f"JSON parse error - {exc}"}) from exc
            ctx = Ctx(method, path, query, payload, user, identity.sessionid, identity.token, org)
            return route.handler(ctx, **params), username
        except ApiError as err:
            return Reply(status=err.status, body=err.body, headers=err.headers), username


class Handler(BaseHTTPRequestHandler):
    """Parses one request, applies faults, answers through `App.dispatch`."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out without a delayed-ACK stall
    server: CvatHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        app = self.server.app
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        path, query = split.path, dict(parse_qsl(split.query, keep_blank_values=True))
        method = self.command
        started = time.perf_counter()
        time.sleep(app.faults.global_delay_for(method))

        fired = app.faults.draw(method, path)
        for fault in fired:
            if fault.kind == "delay":
                time.sleep(fault.delay)
        # Each request is logged before it is answered, so a client that sees the
        # answer (or the dropped connection) also sees it in the log.
        before = next((f for f in fired if f.kind in ("status", "drop")), None)
        if before is not None:
            app.record(
                LoggedRequest(
                    method,
                    path,
                    query,
                    before.answer_status,
                    fault=before.kind,
                    started=started,
                    finished=time.perf_counter(),
                ),
                write=False,
            )
            self._fail(before, path)
            return

        with app.latency.request(method, path, query, self.headers):  # off unless a profile is set
            reply, username = app.dispatch(method, path, query, self.headers, body)
        write = method in MUTATING and not path.startswith("/api/auth/")
        after = next((f for f in fired if f.kind.endswith("_after_write")), None)
        if after is not None and write:
            app.record(
                LoggedRequest(
                    method,
                    path,
                    query,
                    after.answer_status,
                    username,
                    after.kind,
                    started=started,
                    finished=time.perf_counter(),
                ),
                write=True,
            )
            self._fail(after, path)
            return
        app.record(
            LoggedRequest(
                method, path, query, reply.status, username, started=started, finished=time.perf_counter()
            ),
            write=write,
        )
        self._send(reply, path)

    def _fail(self, fault: Fault, path: str) -> None:
        """Answer with the fault's status, or drop the connection."""
        if fault.answer_status is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        reply = Reply(status=fault.status, body=fault.response_body(), headers=fault.response_headers())
        self._send(reply, path)

    def _send(self, reply: Reply, path: str) -> None:
        if isinstance(reply.body, bytes):
            data = reply.body
        elif reply.body is None and reply.status == 204:
            data = b""
        else:
            data = json.dumps(reply.body).encode()
        content_type = reply.content_type if data else JSON_TYPE
        self.server.app.check_answer(self.command, path, reply.status, data, content_type)
        self.send_response(reply.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", str(uuid.uuid4()))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        for cookie in reply.cookies:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        if data:
            self.wfile.write(data)


class CvatHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer bound to loopback, holding the `App`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        super().__init__((host, port), Handler)

    def handle_error(self, request, client_address) -> None:
        """Print the traceback of a handler's error, except when the client hung up mid-answer
        (its request timed out, or its process ended): a real CVAT notes that in its own log,
        while this server shares its stderr with the CLI runs and benchmarks that use it."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)
