"""Connecting to a CVAT server the way cvat-cli does, and naming server errors in one line.

Credentials are resolved by cvat-sdk's own helpers (`cvat_sdk.core.auth`), in cvat-cli's
order: a saved profile, `--auth USER[:PASS]` (with the `PASS` variable), a personal access
token in `CVAT_ACCESS_TOKEN`, and the default profile. For CI environments prelabel also
takes `CVAT_USERNAME` with `CVAT_PASSWORD`. A password never comes from a config file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import urllib3
from cvat_sdk import Client
from cvat_sdk.api_client.exceptions import ApiException
from cvat_sdk.core.auth import (
    CVAT_ACCESS_TOKEN_ENV_VAR,
    AuthStore,
    ClientAuthParameters,
    get_auth_factory,
    make_client_from_cli,
)
from cvat_sdk.core.client import Config, PasswordCredentials
from cvat_sdk.core.exceptions import AuthStoreError

from prelabel.errors import PrelabelError

log = logging.getLogger(__name__)


class CvatError(PrelabelError):
    """The CVAT server refused or failed a request, or cannot be reached."""


@dataclass(frozen=True)
class ServerOptions:
    """Where and as whom to connect; None means "not given"."""

    host: str | None = None
    auth: str | None = None
    """``USER[:PASS]``, as cvat-cli's --auth."""
    profile: str | None = None
    organization: str | None = None
    insecure: bool = False
    ca_bundle: str | None = None
    """A PEM file of certificate authorities to trust (a private CA)."""
    timeout: float = 60.0
    """Seconds one request may take (connect and read)."""


def connect(options: ServerOptions) -> Client:
    """Log in to the server and return the client; a failure is one `CvatError` line."""
    host = options.host or os.environ.get("CVAT_HOST")
    auth = _auth_factory(options)
    if options.insecure:
        log.warning("TLS certificate verification is OFF (--insecure): use this only on a trusted network")
    if options.ca_bundle:
        if not os.path.isfile(options.ca_bundle):
            raise CvatError(f"--ca-bundle: no such file: {options.ca_bundle}")
        # urllib3 builds its TLS context from OpenSSL's defaults, which read this variable.
        os.environ["SSL_CERT_FILE"] = options.ca_bundle
    params = ClientAuthParameters(
        profile=options.profile,
        auth=auth,
        server_host=host,
        insecure=options.insecure,
        organization=options.organization,
    )
    # cvat-cli would fall back to a password prompt; a pipeline must not hang on one.
    no_credentials = (
        auth is None and os.environ.get(CVAT_ACCESS_TOKEN_ENV_VAR) is None and not options.profile
    )
    if no_credentials and (host is not None or not _has_default_profile()):
        raise CvatError(
            "no CVAT credentials given",
            hint="set CVAT_ACCESS_TOKEN to a personal access token, or CVAT_USERNAME and "
            "CVAT_PASSWORD, or pass --auth USER with the PASS variable, or save a cvat-cli profile",
        )
    where = host or "the profile's server"
    try:
        client = make_client_from_cli(
            params, config=Config(allow_unsupported_server=True), check_server_version=True
        )
        _default_timeout(client, options.timeout)
        client.users.retrieve_current_user()  # a token is only checked on first use
    except AuthStoreError as exc:
        raise CvatError(str(exc)) from None
    except ApiException as exc:
        if exc.status in (400, 401):  # POST /api/auth/login refuses a password with a 400
            raise _credentials_error(f"logging in to {where}", exc) from None
        raise server_error(exc, f"logging in to {where}") from None
    except Exception as exc:
        raise server_error(exc, f"logging in to {where}") from None
    return client


def _default_timeout(client: Client, seconds: float) -> None:
    """Give every request of `client` a timeout unless the call sets its own.

    cvat-sdk sends ``timeout=None`` (wait forever) by default, so a hung server would hang
    the run; with a timeout it becomes a transient failure that is retried.
    """
    rest = client.api_client.rest_client
    request = rest.request

    def with_timeout(*args, _request_timeout=None, **kwargs):
        return request(*args, _request_timeout=_request_timeout or (min(seconds, 30.0), seconds), **kwargs)

    rest.request = with_timeout


def _has_default_profile() -> bool:
    try:
        return AuthStore().get_default_profile() is not None
    except AuthStoreError as exc:
        raise CvatError(str(exc)) from None


def _auth_factory(options: ServerOptions) -> Callable | None:
    if options.auth:
        return get_auth_factory(options.auth)
    user, password = os.environ.get("CVAT_USERNAME"), os.environ.get("CVAT_PASSWORD")
    if user and password and os.environ.get(CVAT_ACCESS_TOKEN_ENV_VAR) is None:
        return lambda _url: PasswordCredentials(user, password)
    return None


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
            return _credentials_error(doing, exc)
        if status == 403:
            return CvatError(
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


def _credentials_error(doing: str, exc: ApiException) -> CvatError:
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
