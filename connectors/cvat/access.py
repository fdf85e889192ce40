"""What the credentials may do, known right after connecting and before any model is loaded.

Two traps on a real CVAT end here in one line instead of a failure half-way through a run:

- A read-only personal access token (CVAT's API creates tokens read-only unless asked
  otherwise): every write would be refused with a bare 403. `require_write_access` reads
  `GET /api/auth/access_tokens/self` (CVAT 2.73; older servers answer 404 and are trusted).
- An object that lives in an organization, reached without `--org`: CVAT then lists none of
  its jobs, and a run would report "0 frames". `resolve_organization` reads the object's
  `organization` and works in it, or stops when the user cannot act in it or when `--org`
  names another workspace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cvat_sdk.api_client.exceptions import ApiException

from connectors.cvat.errors import CvatError, server_error
from connectors.cvat.session import CvatSession

TOKEN_HINT = (
    "create a personal access token with write access in CVAT (Settings > Security > Personal "
    "access tokens; leave 'Read-only' unticked) and set CVAT_ACCESS_TOKEN to it"
)


@dataclass(frozen=True)
class TokenAccess:
    """How the client authenticates and, for an access token, whether it may write."""

    via_token: bool
    read_only: bool | None = None
    """None: not known (password login, or a server without ``access_tokens/self``)."""
    name: str | None = None


@dataclass(frozen=True)
class Workspace:
    """Where the target lives and the context the client now works in."""

    where: str
    """``project 3``, ``task 7`` or ``job 12``."""
    org_id: int | None
    slug: str | None
    """The organization's slug; None for the personal workspace."""
    followed: bool = False
    """True when no --org was given and the client now works in the object's organization."""

    def notice(self) -> str | None:
        """One line to tell the user that prelabel followed the object's organization."""
        if not self.followed:
            return None
        return f"{self.where} belongs to organization {self.slug!r}: working in it (--org {self.slug})"


def token_access(session: CvatSession) -> TokenAccess:
    """Whether the client uses an access token, and whether that token is read-only."""
    if not session.client.api_client.configuration.access_token:
        return TokenAccess(via_token=False)
    doing = "reading the access token's permissions"
    try:
        body = _json(
            session,
            doing,
            lambda: session.client.api_client.auth_api.retrieve_access_tokens_self(_parse_response=False),
        )
    except ApiException as exc:
        if exc.status in (404, 405):  # before CVAT 2.73: no such endpoint, nothing to learn
            return TokenAccess(via_token=True)
        raise server_error(exc, doing) from None
    return TokenAccess(via_token=True, read_only=bool(body.get("read_only")), name=body.get("name"))


def require_write_access(session: CvatSession, command: str) -> TokenAccess:
    """Stop at once, in one line, when `command` would write with a read-only token."""
    access = token_access(session)
    if access.read_only:
        name = f" {access.name!r}" if access.name else ""
        raise CvatError(
            f"`prelabel {command}` writes to CVAT, but the access token{name} is read-only", hint=TOKEN_HINT
        )
    return access


def resolve_organization(session: CvatSession, target: Mapping[str, int]) -> Workspace:
    """Make the client work in the organization of the target object.

    `target` is ``{"project_id": N}``, ``{"task_id": N}`` or ``{"job_id": N}``. The organization
    asked for is the client's (``--org`` or ``cvat.organization``; an empty slug is the
    personal workspace). Without one, an organization's object is worked on in that
    organization, if the user can act in it; with one, it must be the object's own.
    """
    ((key, value),) = target.items()
    kind = key.removesuffix("_id")
    where = f"{kind} {value}"
    api = session.client.api_client
    retrieve = {"project": api.projects_api, "task": api.tasks_api, "job": api.jobs_api}[kind].retrieve
    try:
        obj = _json(session, f"reading {where}", lambda: retrieve(value, _parse_response=False))
    except ApiException as exc:
        if exc.status == 403:
            raise CvatError(
                f"{where}: permission denied: {_user(session)['username']!r} may not see it",
                hint="the user must own or be assigned to it; if it belongs to an organization, the user "
                "must be a member (ask its owner for an invitation), then pass --org SLUG",
            ) from None
        raise server_error(exc, f"reading {where}") from None
    org_id = obj.get("organization")
    asked = session.client.organization_slug
    if org_id is None:
        if asked:
            raise CvatError(
                f"{where} is in the personal workspace, not in organization {asked!r} (--org)",
                hint="leave out --org (and cvat.organization) for it",
            )
        return Workspace(where, None, None)
    slug = _organization_slug(session, where, org_id)
    if asked is not None and asked != slug:
        named = f"organization {asked!r}" if asked else "the personal workspace"
        raise CvatError(
            f"{where} belongs to organization {slug!r}, not to {named} (--org)", hint=f"pass --org {slug}"
        )
    _require_membership(session, where, slug)
    session.client.organization_slug = slug
    return Workspace(where, org_id, slug, followed=asked is None)


def _organization_slug(session: CvatSession, where: str, org_id: int) -> str:
    doing = f"reading the organization of {where}"
    try:
        org = _json(
            session,
            doing,
            lambda: session.client.api_client.organizations_api.retrieve(org_id, _parse_response=False),
        )
    except ApiException as exc:
        if exc.status in (403, 404):
            raise CvatError(
                f"{where} belongs to organization #{org_id}, which {_user(session)['username']!r} "
                "is not a member of",
                hint="ask the organization's owner for an invitation, then pass --org SLUG",
            ) from None
        raise server_error(exc, doing) from None
    return org["slug"]


def _require_membership(session: CvatSession, where: str, slug: str) -> None:
    """An admin acts in any organization; anyone else needs an active membership."""
    user = _user(session)
    if user.get("is_superuser"):
        return
    doing = f"reading {user['username']!r}'s membership of organization {slug!r}"
    try:
        page = _json(
            session,
            doing,
            lambda: session.client.api_client.memberships_api.list(
                org=slug, user=user["username"], _parse_response=False
            ),
        )
    except ApiException as exc:
        if exc.status != 403:
            raise server_error(exc, doing) from None
        page = {"results": []}
    if not any(m.get("is_active") for m in page.get("results", [])):
        raise CvatError(
            f"{where} belongs to organization {slug!r}, which {user['username']!r} "
            "is not an active member of",
            hint=f"ask the organization's owner for an invitation (and accept it), then pass --org {slug}",
        )


def _user(session: CvatSession) -> dict[str, Any]:
    return _json(
        session,
        "reading the current user",
        lambda: session.client.api_client.users_api.retrieve_self(_parse_response=False),
    )


def _json(session: CvatSession, doing: str, call: Callable[[], tuple[Any, Any]]) -> dict[str, Any]:
    """Call with retries of transient failures; the response body as JSON. ApiExceptions
    other than transient ones are raised as they are, for the caller to name."""
    _, response = session.retrying(doing)(call)
    return json.loads(response.data)


def check_access(
    session: CvatSession, target: Mapping[str, int] | None = None, *, writes: str | None = None
) -> list[str]:
    """Right after connecting: `writes` (the command's name) needs a token that may write;
    `target` is worked on in its organization. Returns the notices to show the user."""
    if writes is not None:
        require_write_access(session, writes)
    if target is None:
        return []
    notice = resolve_organization(session, target).notice()
    return [notice] if notice else []
