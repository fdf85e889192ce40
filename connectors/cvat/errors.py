"""CVAT failures as one line that says what was being done (`CvatError`)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import urllib3
from cvat_sdk.api_client.exceptions import ApiException

from prelabel.errors import PrelabelError


class CvatError(PrelabelError):
    """The CVAT server refused or failed a request, or cannot be reached."""


class CvatPermissionError(CvatError):
    """The CVAT server answered 403: the user may not do this."""


@contextlib.contextmanager
def failing_as(doing: str) -> Iterator[None]:
    """Turn a failure inside the block into one `CvatError` line that says what was being done."""
    try:
        yield
    except PrelabelError:
        raise
    except Exception as exc:
        raise server_error(exc, doing) from None


def server_error(exc: BaseException, doing: str) -> PrelabelError:
    """Translate an exception from cvat-sdk or urllib3 into one line that says what failed."""
    if isinstance(exc, PrelabelError):
        return exc
    if isinstance(exc, ApiException):
        status = exc.status
        detail = _detail(exc)
        if status == 401:
            return credentials_error(doing, exc)
        if status == 403:
            return CvatPermissionError(
                f"{doing}: permission denied ({detail})",
                hint="the user must own or be assigned to the project, task or job (in an organization: "
                "be a member whose role allows it), and an access token must not be read-only",
            )
        if status == 404:
            return CvatError(f"{doing}: not found ({detail})")
        return CvatError(f"{doing}: the server answered {status} ({detail})")
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        exc = exc.reason or exc
    if isinstance(exc, urllib3.exceptions.SSLError | ssl.SSLError):
        return CvatError(
            f"{doing}: TLS certificate verification failed ({_short(exc)})",
            hint="pass the server's CA with --ca-bundle FILE; --insecure skips the check (trusted "
            "networks only)",
        )
    if isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | OSError):
        return CvatError(
            f"{doing}: cannot reach the server ({_short(exc)})",
            hint="check --server-host (or CVAT_HOST), e.g. https://app.cvat.ai or http://localhost:8080",
        )
    return CvatError(f"{doing}: {type(exc).__name__}: {_short(exc)}")


def credentials_error(doing: str, exc: ApiException) -> CvatError:
    return CvatError(
        f"{doing}: the server rejected the credentials ({_detail(exc)})",
        hint="check the user name and password, or that the access token is valid and not revoked",
    )


def _detail(exc: ApiException) -> str:
    body = exc.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = " ".join(str(body or exc.reason or "").split())
    return text[:300]


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
