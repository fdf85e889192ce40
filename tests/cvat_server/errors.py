"""Errors raised by the fake CVAT API, carrying the exact body real CVAT answers with."""

from __future__ import annotations

from typing import Any

PERMISSION_DENIED = "You do not have permission to perform this action."


class ApiError(Exception):
    """An HTTP error answer: status, JSON body and optional extra headers."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {body!r}")
        self.status = status
        self.body = body
        self.headers = headers or {}


def not_found(model: str) -> ApiError:
    """404 as Django REST framework words it (see error_not_found_project.json)."""
    return ApiError(404, {"detail": f"No {model} matches the given query."})


def forbidden() -> ApiError:
    """403 for an object the user may not see (see error_forbidden_project_other_user.json)."""
    return ApiError(403, {"detail": PERMISSION_DENIED})


def bad_request(body: Any) -> ApiError:
    """400 with a serializer-style body (a list, a dict or a bare string)."""
    return ApiError(400, body)


def unauthorized(detail: str) -> ApiError:
    """401 from one of DRF's authentication classes."""
    return ApiError(401, {"detail": detail}, {"WWW-Authenticate": 'Token realm="api"'})
