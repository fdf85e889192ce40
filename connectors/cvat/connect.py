"""Connecting to a CVAT server the way cvat-cli does, and naming server errors in one line.

Credentials are resolved by cvat-sdk's own helpers (`cvat_sdk.core.auth`), in cvat-cli's
order: a saved profile, `--auth USER[:PASS]` (with the `PASS` variable), a personal access
token in `CVAT_ACCESS_TOKEN`, and the default profile. For CI environments prelabel also
takes `CVAT_USERNAME` with `CVAT_PASSWORD`. A password never comes from a config file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from cvat_sdk import Client
from cvat_sdk.api_client import Configuration, rest
from cvat_sdk.api_client.exceptions import ApiException
from cvat_sdk.core.auth import (
    CVAT_ACCESS_TOKEN_ENV_VAR,
    DEFAULT_SERVER,
    AuthStore,
    default_auth_factory,
    get_auth_factory,
)
from cvat_sdk.core.client import AccessTokenCredentials, Config, PasswordCredentials
from cvat_sdk.core.exceptions import AuthStoreError

from connectors.cvat import retry
from connectors.cvat.errors import CvatError, credentials_error, server_error
from connectors.cvat.session import CvatSession
from prelabel.config import RetryConfig

log = logging.getLogger(__name__)


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


class TimeoutRESTClient(rest.RESTClientObject):
    """cvat-sdk's REST client with a default timeout for requests that set none.

    cvat-sdk sends ``timeout=None`` (wait forever) unless a call gives `_request_timeout`,
    and passes that None on to urllib3, so a pool-wide urllib3 timeout never applies. A
    hung server would hang the run; with a timeout it is a transient failure, retried.
    """

    def __init__(self, configuration: Configuration, seconds: float, *, pool_retries: bool = True) -> None:
        super().__init__(configuration)
        self.timeout = (min(seconds, 30.0), seconds)
        if not pool_retries:
            # cvat-sdk's urllib3 pool retries refused connections and 502-504 on its own, with
            # backoff and without a word; at login the caller decides what is retried.
            self.pool_manager.connection_pool_kw["retries"] = urllib3.util.Retry(
                total=None, connect=0, read=0, other=0, status=0, redirect=5
            )

    def request(self, *args, _request_timeout=None, **kwargs):
        return super().request(*args, _request_timeout=_request_timeout or self.timeout, **kwargs)


def connect(options: ServerOptions, policy: RetryConfig | None = None) -> CvatSession:
    """Log in to the server and return the session; a failure is one `CvatError` line.

    A transient failure (a dropped or reset connection, a read timeout, 429/502/503/504) is
    retried within `policy`; a refused connection, a DNS or TLS failure and any other status
    fail at once (`retry.is_transient_at_login`).

    The TLS settings (`insecure`, `ca_bundle`) and the request timeout (`policy.timeout`)
    belong to this client only: nothing process-wide is changed.
    """
    policy = policy or RetryConfig()
    host = options.host or os.environ.get("CVAT_HOST")
    auth = _auth_factory(options)
    if options.insecure:
        log.warning("TLS certificate verification is OFF (--insecure): use this only on a trusted network")
    if options.ca_bundle and not os.path.isfile(options.ca_bundle):
        raise CvatError(f"--ca-bundle: no such file: {options.ca_bundle}")
    if options.profile and (host is not None or options.auth):
        raise CvatError("--cvat-profile is mutually exclusive with --server-host (CVAT_HOST) and --auth")
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
        client = retry.retrying(f"logging in to {where}", policy, retry.is_transient_at_login)(
            _logged_in_client, options, host, auth, policy.timeout
        )
    except AuthStoreError as exc:
        raise CvatError(str(exc)) from None
    except ApiException as exc:
        if exc.status in (400, 401):  # POST /api/auth/login refuses a password with a 400
            raise credentials_error(f"logging in to {where}", exc) from None
        raise server_error(exc, f"logging in to {where}") from None
    except Exception as exc:
        raise server_error(exc, f"logging in to {where}") from None
    return CvatSession(client, policy)


def _logged_in_client(
    options: ServerOptions, host: str | None, auth: Callable | None, timeout: float
) -> Client:
    """One login attempt: a new client, logged in, with the credentials checked.

    Its requests are not retried by urllib3 (`connect` retries the whole attempt); the client
    returned has cvat-sdk's usual pool and the request timeout."""
    client, credentials = _open_client(options, host, auth, timeout)
    configuration = client.api_client.configuration
    try:
        client.api_client.rest_client = TimeoutRESTClient(configuration, timeout, pool_retries=False)
        client.check_server_version()
        client.login(credentials)
        if options.organization is not None:
            client.organization_slug = options.organization
        client.users.retrieve_current_user()  # a token is only checked on first use
    except BaseException:
        client.close()
        raise
    client.api_client.rest_client = TimeoutRESTClient(configuration, timeout)
    return client


def _open_client(
    options: ServerOptions, host: str | None, auth: Callable | None, timeout: float
) -> tuple[Client, Any]:
    """What cvat-sdk's `make_client_from_cli` does up to its first request: the client, with
    its TLS set through cvat-sdk's `Configuration`, and the credentials to log in with."""
    store = AuthStore()
    profile = None
    if options.profile is not None:
        profile = store.get_profile(options.profile)
        if profile is None:
            raise AuthStoreError(f"Unknown profile {options.profile!r}.")
    elif host is None and auth is None and os.environ.get(CVAT_ACCESS_TOKEN_ENV_VAR) is None:
        default = store.get_default_profile()
        profile = default[1] if default is not None else None
    url = profile.server if profile else (host or store.get_default_server() or DEFAULT_SERVER).rstrip("/")
    client = Client(
        url,
        config=Config(allow_unsupported_server=True, verify_ssl=not options.insecure),
        check_server_version=False,
    )
    configuration = client.api_client.configuration
    configuration.ssl_ca_cert = options.ca_bundle
    if profile is not None:
        return client, AccessTokenCredentials(profile.token)
    return client, (auth or default_auth_factory())(configuration.host)


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
