"""`prelabel serve`: a small HTTP service that takes signed webhook deliveries and queues work.

The request handler stays tiny so that every delivery is answered within a second: it
reads at most `max_body` bytes, checks the signature over the raw body, accepts only
JSON, asks `interpret` what the delivery means, records it in the `DeliveryLog` (a
redelivery of the same event is answered 200 and starts nothing) and hands the work to
a `Dispatcher`. The work itself happens elsewhere: `InProcessWorker` does it in a
background thread, one item at a time; a queue-backed dispatcher can take its place.

``GET /metrics`` answers in Prometheus' format (`prelabel.service.metrics`), ``/healthz``
while the process serves, ``/readyz`` while CVAT (and Redis, with a queue) answer.

Logs are JSON lines naming the event and the objects it concerns; the secret is never
logged, and neither is a request body.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prelabel.errors import PrelabelError
from prelabel.service.deliveries import DeliveryLog
from prelabel.service.metrics import Check, Metrics, Probes
from prelabel.service.signature import verify

log = logging.getLogger("prelabel.serve")

MAX_BODY = 1024 * 1024
"""CVAT's deliveries are a few kB; anything near a megabyte is not one."""


@dataclass(frozen=True)
class Intent:
    """What one delivery means: log fields, and the work it asks for (None: nothing)."""

    fields: dict[str, Any]
    key: str | None = None
    """Names the event itself, the same for each redelivery of it."""
    item: dict[str, Any] | None = None
    reason: str = ""


class Dispatcher(Protocol):
    """Where work goes once a delivery is accepted."""

    def submit(self, key: str, item: dict[str, Any]) -> None:
        """Queue `item` (recorded in the delivery log under `key`); raise `queue.Full` when full."""

    def pending(self) -> int:
        """Items queued and not yet started."""

    def stop(self) -> None:
        """Take nothing more; finish the item in progress. Queued items stay recorded as queued."""


class InProcessWorker:
    """One background thread doing the queued work in turn with `perform(item) -> summary`.

    Each item's outcome goes to the delivery log: running, then done (with the summary) or
    failed (with a one-line reason; a redelivery of the event may then try again).
    """

    def __init__(
        self,
        perform: Callable[[dict[str, Any]], str],
        deliveries: DeliveryLog,
        capacity: int = 100,
        metrics: Metrics | None = None,
    ) -> None:
        self._perform = perform
        self._metrics = metrics
        self._deliveries = deliveries
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=capacity)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prelabel-worker", daemon=True)
        self._thread.start()

    def submit(self, key: str, item: dict[str, Any]) -> None:
        if self._stopping.is_set():
            raise queue.Full
        self._queue.put_nowait((key, item))

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                key, item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._run(key, item)

    def _run(self, key: str, item: dict[str, Any]) -> None:
        fields = {k.removesuffix("_id"): v for k, v in item.items() if v is not None}
        self._deliveries.mark(key, "running")
        emit(logging.INFO, "work started", delivery=key, **fields)
        start = time.perf_counter()
        kind = str(item.get("kind", "work"))
        try:
            summary = self._perform(item)
        except PrelabelError as exc:
            self._worked(kind, "failed")
            self._deliveries.mark(key, "failed", exc.one_line())
            emit(logging.ERROR, "work failed", delivery=key, error=exc.one_line(), **fields)
            return
        except Exception as exc:  # a bug must not kill the worker: record it and go on
            detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            self._worked(kind, "failed")
            self._deliveries.mark(key, "failed", detail)
            log.debug("work failed", exc_info=True)
            emit(logging.ERROR, "work failed", delivery=key, error=detail, **fields)
            return
        self._worked(kind, "done")
        self._deliveries.mark(key, "done", summary)
        emit(
            logging.INFO,
            "work done",
            delivery=key,
            summary=summary,
            seconds=round(time.perf_counter() - start, 2),
            **fields,
        )


    def _worked(self, kind: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.worked(kind, outcome)


@dataclass
class Service:
    """The HTTP side: verification, deduplication and hand-off (see the module docstring)."""

    secret: str
    interpret: Callable[[Any], Intent]
    deliveries: DeliveryLog
    dispatcher: Dispatcher
    max_body: int = MAX_BODY
    metrics: Metrics = field(default_factory=Metrics)
    checks: dict[str, Check] = field(default_factory=dict)
    """Readiness checks (CVAT, Redis) for ``/readyz``."""
    counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    probes: Probes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics.watch_queue(self.dispatcher.pending)
        self.probes = Probes(self.metrics, self.checks, health=self.health)

    def count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.metrics.delivered(outcome)

    def accept(self, body: bytes, signature: str | None, content_type: str | None) -> tuple[int, dict]:
        """Answer one delivery: (HTTP status, JSON reply). Never raises on bad input."""
        if not verify(self.secret, body, signature):
            self.count("unauthorized")
            emit(
                logging.WARNING,
                "delivery rejected",
                reason="missing signature" if not signature else "bad signature",
                bytes=len(body),
            )
            return 401, {"detail": "the X-Signature-256 header does not match the body"}
        if (content_type or "").split(";")[0].strip().lower() != "application/json":
            self.count("unsupported")
            return 415, {"detail": "only application/json deliveries are accepted"}
        try:
            payload = json.loads(body)
        except ValueError:
            self.count("malformed")
            return 400, {"detail": "the body is not JSON"}
        intent = self.interpret(payload)
        if intent.item is None or intent.key is None:
            self.count("ignored")
            emit(logging.INFO, "delivery ignored", reason=intent.reason, **intent.fields)
            return 200, {"status": "ignored", "reason": intent.reason}
        if not self.deliveries.claim(intent.key, intent.item):
            self.count("duplicate")
            emit(logging.INFO, "delivery is a duplicate", delivery=intent.key, **intent.fields)
            return 200, {"status": "duplicate"}
        try:
            self.dispatcher.submit(intent.key, intent.item)
        except queue.Full:
            self.deliveries.release(intent.key)
            self.count("busy")
            emit(logging.WARNING, "queue full, delivery refused", delivery=intent.key, **intent.fields)
            return 503, {"detail": "the work queue is full; deliver again later"}
        self.count("queued")
        emit(logging.INFO, "delivery queued", delivery=intent.key, **intent.fields)
        return 202, {"status": "queued"}

    def health(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self.counts)
        return {"status": "ok", "pending": self.dispatcher.pending(), "deliveries": counts}


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 5  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are logged by the service, as JSON lines."""

    def do_GET(self) -> None:
        answer = self.server.service.probes.answer(self.path)
        if answer is None:
            self._reply(404, {"detail": "not found"})
            return
        status, content_type, data = answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        service = self.server.service
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(411, {"detail": "Content-Length is required"}, close=True)
            return
        if length < 0 or length > service.max_body:
            self._reply(413, {"detail": f"the body is limited to {service.max_body} bytes"}, close=True)
            return
        body = self.rfile.read(length)
        status, reply = service.accept(
            body, self.headers.get("X-Signature-256"), self.headers.get("Content-Type")
        )
        self._reply(status, reply)

    def _reply(self, status: int, body: dict, *, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "30")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: Service) -> None:
        self.service = service
        super().__init__(address, _Handler)


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` for every interface) as a socket address."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PrelabelError(f"--listen {listen!r} is not HOST:PORT", hint="e.g. --listen 127.0.0.1:8765")
    return host.strip("[]") or "0.0.0.0", int(port)


def listen(service: Service, address: tuple[str, int]) -> ThreadingHTTPServer:
    """Bind the service's HTTP server (port 0: any free port); call its `serve_forever`."""
    try:
        return _HTTPServer(address, service)
    except OSError as exc:
        raise PrelabelError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None


def serve(
    service: Service, address: tuple[str, int], *, on_ready: Callable[[tuple[str, int]], None] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain: stop taking deliveries, finish the work in
    progress, and leave queued work in the delivery log for the next start."""
    httpd = listen(service, address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    bound = httpd.server_address[:2]
    emit(logging.INFO, "listening", host=bound[0], port=bound[1])
    if on_ready:
        on_ready(bound)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.probes.draining.set()
        emit(logging.INFO, "draining", pending=service.dispatcher.pending())
        httpd.shutdown()
        httpd.server_close()
        service.dispatcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        emit(logging.INFO, "stopped", **{f"deliveries_{k}": v for k, v in service.counts.items()})


class _ProbeHandler(BaseHTTPRequestHandler):
    server: _ProbeServer
    protocol_version = "HTTP/1.1"
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        """Probes are not logged."""

    def do_GET(self) -> None:
        answer = self.server.probes.answer(self.path)
        status, content_type, data = answer or (404, "application/json", b'{"detail": "not found"}')
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _ProbeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], probes: Probes) -> None:
        self.probes = probes
        super().__init__(address, _ProbeHandler)


@dataclass
class ProbeServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on their own port, served in a background thread
    (a `prelabel worker`'s ``--metrics-port``)."""

    probes: Probes
    address: tuple[str, int]
    _httpd: _ProbeServer | None = field(default=None, init=False, repr=False)

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound address."""
        try:
            self._httpd = _ProbeServer(self.address, self.probes)
        except OSError as exc:
            where = f"{self.address[0]}:{self.address[1]}"
            raise PrelabelError(f"cannot listen on {where} for metrics: {exc.strerror or exc}") from None
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        ).start()
        return self._httpd.server_address[:2]

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


# ------------------------------------------------------------------------------ logs
def emit(level: int, message: str, **fields: Any) -> None:
    """Log `message` with structured fields (rendered by `JsonFormatter`)."""
    log.log(level, message, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def use_json_logs(level: int = logging.INFO) -> None:
    """Render every log record of this process as a JSON line; the service logs at `level`."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
    log.setLevel(level)
