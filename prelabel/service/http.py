"""`prelabel serve`: a small HTTP service that takes signed webhook deliveries and queues work.

It is a Starlette app under uvicorn (one event loop; `Limits` bounds the connections, the
time a client may take to send its headers and body, and the header size). One process is
the supported shape, not uvicorn's ``--workers``: the work runs in this process's
`InProcessWorker` (one model, one item at a time), and the delivery log is what makes a
redelivery start nothing; several processes would each load a model and race on the log.
To scale the labeling, give `serve` a queue and run `prelabel worker` processes.

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

import asyncio
import json
import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

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


# ---------------------------------------------------------------------------- the HTTP stack
@dataclass(frozen=True)
class Limits:
    """How much a client may take of the server: time, connections and header bytes."""

    head_timeout: float = 10.0
    """Seconds a connection may take to send a request's line and headers (slow clients)."""
    body_timeout: float = 10.0
    """Seconds a request may take to send its body once the headers are in (408 after)."""
    keep_alive: int = 5
    """Seconds an idle kept-alive connection stays open (uvicorn's ``timeout_keep_alive``)."""
    max_connections: int = 1000
    """Open connections and requests in progress; beyond it new requests get 503 with
    Retry-After (the bound of uvicorn's ``limit_concurrency``)."""
    max_header_bytes: int = 16 * 1024
    """The request line and headers (h11's ``max_incomplete_event_size``)."""
    graceful_seconds: int = 10
    """On shutdown, how long requests in progress may take to finish."""


class _HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head.

    uvicorn closes a kept-alive connection that stays idle, but not a new connection that
    sends nothing or sends its headers a byte at a time; this closes such a connection
    once `head_timeout` passes without a complete request head.
    """

    head_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _awaited: object = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn answers past its `limit_concurrency` with a bare 503; the same bound is
        # checked here instead, so that the 503 says when to come back (Retry-After).
        bound, self.limit_concurrency = self.limit_concurrency, None
        if bound is not None:
            self.app = _bounded(self.app, bound, self.connections, self.tasks)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._awaited:
            self._cancel_head_timer()  # a request head arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._awaited = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.cycle is self._awaited and not self.transport.is_closing():
            self.transport.close()


BUSY_RETRY_AFTER = "5"
"""Seconds a client refused past `Limits.max_connections` is asked to wait."""


def _bounded(app: Any, bound: int, connections: set, tasks: set) -> Any:
    """`app` behind uvicorn's concurrency bound, answering 503 with Retry-After past it."""

    async def bounded(scope: dict, receive: Any, send: Any) -> None:
        # Like uvicorn's own check, except that this request's task is already in `tasks`.
        if len(connections) >= bound or len(tasks) - 1 >= bound:
            log.warning("over %d connections or requests: answered 503", bound)
            body = b"Service Unavailable"
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", BUSY_RETRY_AFTER.encode()),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await app(scope, receive, send)

    return bounded


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


async def _probe(probes: Probes, request: Request) -> Response:
    answer = await run_in_threadpool(probes.answer, request.url.path)
    if answer is None:
        return _json(404, {"detail": "not found"})
    status, content_type, data = answer
    return Response(data, status_code=status, media_type=content_type)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes | Response:
    """The body, or the answer that refuses it (411, 413, 408) and closes the connection."""
    close = {"Connection": "close"}
    try:
        length = int(request.headers.get("content-length", ""))
    except ValueError:
        return _json(411, {"detail": "Content-Length is required"}, close)
    if length < 0 or length > limit:
        return _json(413, {"detail": f"the body is limited to {limit} bytes"}, close)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return _json(413, {"detail": f"the body is limited to {limit} bytes"}, close)
                chunks.append(chunk)
    except TimeoutError:
        return _json(408, {"detail": f"the body did not arrive within {timeout:g} s"}, close)
    return b"".join(chunks)


def webhook_app(service: Service, limits: Limits = Limits()) -> Starlette:
    """The ASGI app of `prelabel serve`: deliveries by POST to any path, and the probes."""

    async def endpoint(request: Request) -> Response:
        if request.method == "GET":
            return await _probe(service.probes, request)
        body = await _read_body(request, service.max_body, limits.body_timeout)
        if isinstance(body, Response):
            return body
        status, reply = await run_in_threadpool(
            service.accept,
            body,
            request.headers.get("x-signature-256"),
            request.headers.get("content-type"),
        )
        return _json(status, reply, {"Retry-After": "30"} if status == 503 else None)

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])])


def probe_app(probes: Probes) -> Starlette:
    """An ASGI app of ``/metrics``, ``/healthz`` and ``/readyz`` alone (a worker's metrics port)."""

    async def endpoint(request: Request) -> Response:
        return await _probe(probes, request)

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET"])])


class HttpServer:
    """An ASGI app under uvicorn, in a background thread, on a socket bound at construction.

    One process, one event loop: connections cost a little memory each, not a thread, and
    `Limits` bounds them. The socket is bound here so that a taken port is one line at once
    and port 0 gives a known free port.
    """

    def __init__(
        self, app: Starlette, address: tuple[str, int], limits: Limits = Limits(), what: str = ""
    ) -> None:
        try:
            self._socket = socket.create_server(address, backlog=2048, reuse_port=False)
        except OSError as exc:
            where = f"{address[0]}:{address[1]}"
            raise PrelabelError(f"cannot listen on {where}{what}: {exc.strerror or exc}") from None
        protocol = type("HeadTimeoutH11", (_HeadTimeoutH11,), {"head_timeout": limits.head_timeout})
        config = uvicorn.Config(
            app,
            http=protocol,
            loop="asyncio",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_keep_alive=limits.keep_alive,
            limit_concurrency=limits.max_connections,
            h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_graceful_shutdown=limits.graceful_seconds,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._socket.getsockname()[:2]

    def start(self) -> tuple[str, int]:
        """Serve in a background thread; returns the bound address once it accepts."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="prelabel-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PrelabelError(f"the HTTP server on {self.address[0]}:{self.address[1]} did not start")
            time.sleep(0.01)
        return self.address

    def stop(self) -> None:
        """Stop accepting, let requests in progress finish (`Limits.graceful_seconds`), close."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._socket.close()


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` for every interface) as a socket address."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PrelabelError(f"--listen {listen!r} is not HOST:PORT", hint="e.g. --listen 127.0.0.1:8765")
    return host.strip("[]") or "0.0.0.0", int(port)


def listen(service: Service, address: tuple[str, int], limits: Limits = Limits()) -> HttpServer:
    """Bind the service's HTTP server (port 0: any free port); `start` it to serve."""
    return HttpServer(webhook_app(service, limits), address, limits)


def serve(
    service: Service,
    address: tuple[str, int],
    *,
    limits: Limits = Limits(),
    on_ready: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain: stop taking deliveries, finish the work in
    progress, and leave queued work in the delivery log for the next start."""
    server = listen(service, address, limits)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        bound = server.start()
        emit(logging.INFO, "listening", host=bound[0], port=bound[1])
        if on_ready:
            on_ready(bound)
        while not stop.wait(0.5):
            pass
    finally:
        service.probes.draining.set()
        emit(logging.INFO, "draining", pending=service.dispatcher.pending())
        server.stop()
        service.dispatcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        emit(logging.INFO, "stopped", **{f"deliveries_{k}": v for k, v in service.counts.items()})


@dataclass
class ProbeServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on their own port, served in a background thread
    (a `prelabel worker`'s ``--metrics-port``)."""

    probes: Probes
    address: tuple[str, int]
    _server: HttpServer | None = field(default=None, init=False, repr=False)

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound address."""
        self._server = HttpServer(probe_app(self.probes), self.address, what=" for metrics")
        return self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


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
