"""The queue's address: a Redis URL, checked at the boundary, and a connection that answers.

Accepted forms are ``redis://HOST:PORT/DB``, ``rediss://...`` (TLS) and
``unix:///path/to/redis.sock?db=N``, with an optional ``user:password@`` that is never
printed. Anything else, or a server that does not answer, is one `QueueError` line.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from redis import Redis
from redis.exceptions import AuthenticationError, RedisError

from prelabel.errors import PrelabelError

QUEUE_ENV = "PRELABEL_QUEUE"
_HINT = "give --queue redis://HOST:PORT/DB (or set PRELABEL_QUEUE), e.g. redis://localhost:6379/0"


class QueueError(PrelabelError):
    """The queue URL is malformed, or its Redis server cannot be reached."""


def resolve_url(url: str | None) -> str:
    """The URL given, else `PRELABEL_QUEUE`; an error when neither is set."""
    url = url or os.environ.get(QUEUE_ENV)
    if not url:
        raise QueueError("no queue given", hint=_HINT)
    return url


def redacted(url: str) -> str:
    """The URL without its password, for messages and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=user + host).geturl()


def check_url(url: str) -> None:
    """Raise `QueueError` unless `url` is a well-formed Redis URL with a numeric DB."""
    shown = redacted(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise QueueError(f"malformed queue URL {shown!r}: {exc}", hint=_HINT) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise QueueError(
            f"malformed queue URL {shown!r}: the scheme must be redis://, rediss:// or unix://",
            hint=_HINT,
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise QueueError(f"malformed queue URL {shown!r}: no socket path", hint=_HINT)
        return
    if not parts.hostname:
        raise QueueError(f"malformed queue URL {shown!r}: no host", hint=_HINT)
    if port is not None and port == 0:
        raise QueueError(f"malformed queue URL {shown!r}: port 0", hint=_HINT)
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise QueueError(f"malformed queue URL {shown!r}: the database {db!r} is not a number", hint=_HINT)


def connect_queue(url: str | None, *, timeout: float = 5.0) -> Redis:
    """A checked connection to the queue's Redis (from `url` or `PRELABEL_QUEUE`)."""
    url = resolve_url(url)
    check_url(url)
    shown = redacted(url)
    try:
        connection = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        connection.ping()
    except AuthenticationError as exc:
        raise QueueError(f"queue {shown}: the Redis server rejected the credentials ({exc})") from None
    except (RedisError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise QueueError(f"cannot reach the queue at {shown} ({detail})", hint=_HINT) from None
    return connection
