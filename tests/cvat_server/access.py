"""Who may do what: personal access tokens (`read_only`) and organizations, as CVAT 2.73.

- `GET /api/auth/access_tokens/self` describes the token of the request; it authenticates
  with access tokens only (AccessTokensViewSet.self in cvat/apps/access_tokens/views.py).
- A read-only token may only read: every unsafe method is refused with DRF's plain 403
  (AccessTokenReadOnlyDefaultPermission; the reason is not in the body). See `App.dispatch`.
- The organization context of a request comes from the `X-Organization` header, or the
  `org` (slug) or `org_id` query parameter (get_organization in cvat/apps/iam/middleware.py).
- `GET /api/organizations[/{id}]` and `GET /api/memberships` follow organizations.rego and
  memberships.rego.
"""

from __future__ import annotations

from typing import Any

from .api import Api, Ctx, OrgContext, Reply
from .errors import ApiError, bad_request, forbidden, not_found, unauthorized
from .state import State


def request_org(state: State, query: dict[str, str], headers: Any) -> OrgContext:
    """The request's organization context; 400 for contradicting ones, 404 for an unknown one."""
    slug, org_id, header = query.get("org"), query.get("org_id"), headers.get("X-Organization")
    if org_id is not None and (slug is not None or header is not None):
        raise bad_request(
            [
                'You cannot specify "org_id" query parameter with "org" query parameter or '
                '"X-Organization" HTTP header at the same time.'
            ]
        )
    if slug is not None and header is not None and slug != header:
        raise bad_request(
            [
                'You cannot specify "org" query parameter and "X-Organization" HTTP header '
                "with different values."
            ]
        )
    slug = slug if slug is not None else header
    given = slug is not None or org_id is not None
    with state.lock:
        if slug:
            found = next((o for o in state.organizations.values() if o["slug"] == slug), None)
        elif org_id:
            found = state.organizations.get(int(org_id)) if org_id.isdigit() else None
        else:
            return OrgContext(given=given)
    if found is None:
        raise ApiError(404, {"detail": f"{slug or org_id} organization does not exist."})
    return OrgContext(given=True, org_id=found["id"])


class Access:
    """The access-token and organization endpoints, added to an `Api`."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.state = api.state
        api.add_routes(
            [
                ("GET", r"/api/auth/access_tokens/self", self.token_self, False),
                ("GET", r"/api/organizations", self.organizations_list, False),
                ("GET", r"/api/organizations/(?P<id>\d+)", self.organizations_retrieve, False),
                ("GET", r"/api/memberships", self.memberships_list, False),
            ]
        )

    def token_self(self, ctx: Ctx) -> Reply:
        """GET /api/auth/access_tokens/self: AccessTokenRead of the request's token."""
        if ctx.token is None:  # the view authenticates with access tokens only
            raise unauthorized("Authentication credentials were not provided.")
        record = ctx.token
        body = {key: value for key, value in record.items() if key != "owner_id"}
        body["owner"] = self.api.ser.basic_user(record["owner_id"])
        return Reply(body=body)

    def _organization(self, org: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": org["id"],
            "slug": org["slug"],
            "name": org["name"],
            "description": "",
            "created_date": org["created_date"],
            "updated_date": org["updated_date"],
            "contact": {},
            "owner": self.api.ser.basic_user(org["owner_id"]),
        }

    def organizations_list(self, ctx: Ctx) -> Reply:
        """GET /api/organizations: admins see all; others those they own or are active in."""
        user = ctx.user
        assert user is not None
        with self.state.lock:
            items = [
                org
                for org in self.state.organizations.values()
                if self.state.is_admin(user)
                or org["owner_id"] == user["id"]
                or self.state.member_role(user, org["id"]) is not None
            ]
            items = self.api._filter(
                items, ctx.query, {"slug": lambda o: o["slug"], "name": lambda o: o["name"]}
            )
            return self.api.paginate(ctx, self.api._sorted(items), self._organization)

    def organizations_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/organizations/{id}: admins, its owner and its members; others 403."""
        user = ctx.user
        assert user is not None
        with self.state.lock:
            org = self.state.organizations.get(id)
            if org is None:
                raise not_found("Organization")
            invited = any(
                m["user_id"] == user["id"] and m["organization_id"] == id
                for m in self.state.memberships.values()
            )
            if not (self.state.is_admin(user) or org["owner_id"] == user["id"] or invited):
                raise forbidden()
            return Reply(body=self._organization(org))

    def memberships_list(self, ctx: Ctx) -> Reply:
        """GET /api/memberships: in an organization, its members (to members and admins);
        without one, the user's own active memberships (all of them for an admin)."""
        user = ctx.user
        assert user is not None
        org = ctx.org or OrgContext()
        admin = self.state.is_admin(user)
        with self.state.lock:
            items = list(self.state.memberships.values())
            if org.org_id is not None:
                role = self.state.member_role(user, org.org_id)
                if role is None and not admin:
                    raise forbidden()
                items = [m for m in items if m["organization_id"] == org.org_id]
                if not admin and role not in ("owner", "maintainer"):
                    items = [m for m in items if m["is_active"]]
            elif not admin:
                items = [m for m in items if m["user_id"] == user["id"] and m["is_active"]]
            users = self.state.users
            items = self.api._filter(
                items,
                ctx.query,
                {"user": lambda m: users[m["user_id"]]["username"], "role": lambda m: m["role"]},
            )

            def render(m: dict[str, Any]) -> dict[str, Any]:
                return {
                    "id": m["id"],
                    "user": self.api.ser.basic_user(m["user_id"]),
                    "organization": m["organization_id"],
                    "is_active": m["is_active"],
                    "joined_date": m["joined_date"],
                    "role": m["role"],
                    "invitation": None,
                }

            return self.api.paginate(ctx, self.api._sorted(items), render)
