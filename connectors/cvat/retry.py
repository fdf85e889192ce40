"""Riding out a flaky server: retries with backoff for transient failures, and nothing else.

Transient: connection errors, timeouts, dropped connections, 502/503/504, and 429 (whose
``Retry-After`` is honoured). Everything else (400, 401, 403, 404, 409, validation errors)
fails at once. At login (`is_transient_at_login`) the set is narrower: a host that refuses
the connection, has no DNS name or fails the TLS check will not come back within a retry
budget, so those fail at once too. Retries use exponential backoff with jitter, bounded in
attempts and in total time (`RetryConfig`, which each `CvatSession` carries).

Only idempotent calls are retried as they are (reads, setting job fields, adding label
attributes by name, deletes). A create whose answer was lost may have been applied, so the
sink re-reads the server before creating again (see `connectors.cvat.sink`).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

import tenacity
import urllib3
from cvat_sdk.api_client.exceptions import ApiException

from connectors.cvat.errors import server_error
from prelabel.config import RetryConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES or exc.status == 0
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def is_transient_at_login(exc: BaseException) -> bool:
    """Whether a failure while logging in is worth retrying.

    Retried: a connection reset or dropped by the server or a proxy, a read timeout (the host
    answered the connection), and 429/502/503/504. Not retried: connection refused, a DNS
    failure, a connect timeout (an unreachable host), a TLS error, and every other status.
    """
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        exc = exc.reason or exc
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError | urllib3.exceptions.SSLError | ssl.SSLError):
        return False  # refused connections and DNS failures are ConnectTimeoutError's subclasses
    if isinstance(exc, ConnectionRefusedError | socket.gaierror):
        return False
    return isinstance(
        exc,
        urllib3.exceptions.ProtocolError
        | urllib3.exceptions.ReadTimeoutError
        | ConnectionResetError
        | ConnectionAbortedError
        | TimeoutError,
    )


def failure_kind(exc: BaseException) -> str:
    """A short name for a transient failure, for metrics: the status, dropped, timeout or connection."""
    if isinstance(exc, ApiException):
        return str(exc.status)
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        exc = exc.reason or exc
    if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, urllib3.exceptions.ProtocolError | ConnectionResetError | ConnectionAbortedError):
        return "dropped"
    return "connection"


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(exc, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _wait(policy: RetryConfig) -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_exponential_jitter(multiplier=policy.initial_wait, max=policy.max_wait)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = _retry_after(exc) if exc is not None else None
        return min(max(backoff(state), after or 0.0), policy.max_wait)

    return wait


def _log_retry(
    doing: str, policy: RetryConfig, on_retry: Callable[[str], None] | None
) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if on_retry is not None and exc is not None:
            on_retry(failure_kind(exc))
        log.warning(
            "%s: %s; retrying in %.1fs (attempt %d of %d)",
            doing,
            server_error(exc, "transient failure").one_line() if exc else "failed",
            state.next_action.sleep if state.next_action else 0.0,
            state.attempt_number,
            policy.attempts,
        )

    return before_sleep


def retrying(
    doing: str,
    policy: RetryConfig,
    transient: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[str], None] | None = None,
) -> tenacity.Retrying:
    """A tenacity loop for one operation under `policy` (re-raises the last error); `transient`
    says which failures are retried, `on_retry` hears each retry's `failure_kind`."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient),
        wait=_wait(policy),
        stop=tenacity.stop_after_attempt(policy.attempts) | tenacity.stop_after_delay(policy.max_seconds),
        before_sleep=_log_retry(doing, policy, on_retry),
        reraise=True,
    )


def call(
    doing: str, func: Callable[[], T], policy: RetryConfig, on_retry: Callable[[str], None] | None = None
) -> T:
    """Run an idempotent server call with retries; a failure becomes one line naming `doing`."""
    try:
        return retrying(doing, policy, on_retry=on_retry)(func)
    except Exception as exc:
        raise server_error(exc, doing) from None
