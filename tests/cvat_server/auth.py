"""Request authentication as CVAT's DRF stack does it.

Order and messages follow REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"] in
cvat/settings/base.py: legacy `Token <key>`, `Bearer <PAT>`
(cvat/apps/access_tokens/authentication.py), session cookie (with DRF's CSRF check
on unsafe methods), then `Basic`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from .errors import ApiError, unauthorized
from .state import State

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Identity:
    """Who made a request and how (`via`: token, bearer, session, basic or None)."""

    user: dict[str, Any] | None
    via: str | None = None
    sessionid: str | None = None
    token: dict[str, Any] | None = None
    """The personal access token's record when `via` is bearer (its `read_only` flag)."""

    @property
    def read_only(self) -> bool:
        """A read-only access token: CVAT refuses its unsafe methods with a plain 403
        (AccessTokenReadOnlyDefaultPermission in cvat/apps/access_tokens/permissions.py)."""
        return bool(self.token and self.token["read_only"])


def authenticate(state: State, method: str, headers: Any) -> Identity:
    """Resolve the request's user; raises 401/403 ApiError for bad credentials."""
    header = headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "token":
            return Identity(_by_key(state.keys, value, state), "token")
        if scheme == "bearer":
            user = _by_key(state.tokens, value, state)
            with state.lock:
                return Identity(user, "bearer", token=state.token_records.get(value))
        if scheme == "basic":
            return Identity(_basic(state, value), "basic")
    cookies = SimpleCookie(headers.get("Cookie") or "")
    if "sessionid" in cookies:
        sessionid = cookies["sessionid"].value
        with state.lock:
            session = state.sessions.get(sessionid)
        if session is not None:
            user_id, csrftoken = session
            if method not in SAFE_METHODS and headers.get("X-CSRFToken") != csrftoken:
                reason = (
                    "CSRF token missing." if not headers.get("X-CSRFToken") else ("CSRF token incorrect.")
                )
                raise ApiError(403, {"detail": f"CSRF Failed: {reason}"})
            return Identity(state.users[user_id], "session", sessionid)
    return Identity(None)


def _by_key(table: dict[str, int], key: str, state: State) -> dict[str, Any]:
    with state.lock:
        user_id = table.get(key)
        if user_id is None:
            raise unauthorized("Invalid token.")
        user = state.users[user_id]
    if not user["is_active"]:
        raise unauthorized("User inactive or deleted.")
    return user


def _basic(state: State, value: str) -> dict[str, Any]:
    try:
        username, _, password = base64.b64decode(value).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        msg = "Invalid basic header. Credentials not correctly base64 encoded."
        raise unauthorized(msg) from exc
    user = state.check_password(username, password)
    if user is None:
        raise unauthorized("Invalid username/password.")
    return user


def require_user(identity: Identity) -> dict[str, Any]:
    """The authenticated user, or DRF's NotAuthenticated 401."""
    if identity.user is None:
        raise unauthorized("Authentication credentials were not provided.")
    return identity.user
