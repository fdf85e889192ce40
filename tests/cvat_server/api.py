"""Endpoint handlers of the fake CVAT REST API and the route table that reaches them."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from . import media
from .errors import ApiError, bad_request, forbidden, not_found
from .latency import Latency
from .serializers import Serializer
from .state import JOB_STAGES, JOB_STATES, State, now

JSON_TYPE = "application/vnd.cvat+json"
DEFAULT_PAGE_SIZE = 10  # REST_FRAMEWORK["PAGE_SIZE"] in cvat/settings/base.py
ABOUT_DESCRIPTION = (
    "CVAT is completely re-designed and re-implemented version of Video Annotation Tool from "
    "Irvine, California tool. It is free, online, interactive video and image annotation tool "
    "for computer vision. It is being used by our team to annotate million of objects with "
    "different properties. Many UI and UX decisions are based on feedbacks from professional "
    "data annotation team."
)


@dataclass
class Ctx:
    """One parsed request, as handlers see it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    user: dict[str, Any] | None = None
    sessionid: str | None = None
    token: dict[str, Any] | None = None
    """The access token's record when the request came with `Authorization: Bearer`."""
    org: OrgContext | None = None
    """The organization context (X-Organization header, `org` or `org_id` query)."""


@dataclass(frozen=True)
class OrgContext:
    """`given`: the request named a context; `org_id`: its organization (None: personal)."""

    given: bool = False
    org_id: int | None = None


@dataclass
class Reply:
    """A handler's answer: JSON body (or raw bytes with their content type)."""

    status: int = 200
    body: Any = None
    content_type: str = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)


Handler = Callable[..., Reply]


@dataclass
class Route:
    """A method + path pattern; `public` routes need no authentication."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    public: bool = False


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _page_size(value: str | None) -> int:
    """CVAT's `CustomPagination.get_page_size` (cvat/apps/engine/pagination.py): ``all`` or any
    positive number is honoured as is (no maximum); anything else gives the default."""
    if value == "all":
        return sys.maxsize
    size = _int(value)
    return size if size is not None and size > 0 else DEFAULT_PAGE_SIZE


class Api:
    """The CVAT 2.73 endpoints used by prelabel and cvat-sdk, over a `State`."""

    def __init__(self, state: State, base: str, latency: Latency | None = None) -> None:
        self.state = state
        self.ser = Serializer(state, base)
        self.base = base
        self.latency = latency or Latency()
        self.routes = self._build_routes()

    # ------------------------------------------------------------- routing
    def _build_routes(self) -> list[Route]:
        table: list[tuple[str, str, Handler, bool]] = [
            ("POST", r"/api/auth/login", self.login, True),
            ("POST", r"/api/auth/logout", self.logout, True),
            ("GET", r"/api/server/about", self.about, True),
            ("GET", r"/api/users/self", self.users_self, False),
            ("GET", r"/api/users", self.users_list, False),
            ("GET", r"/api/users/(?P<id>\d+)", self.users_retrieve, False),
            ("GET", r"/api/projects", self.projects_list, False),
            ("GET", r"/api/projects/(?P<id>\d+)", self.projects_retrieve, False),
            ("PATCH", r"/api/projects/(?P<id>\d+)", self.projects_update, False),
            ("GET", r"/api/tasks", self.tasks_list, False),
            ("GET", r"/api/tasks/(?P<id>\d+)", self.tasks_retrieve, False),
            ("DELETE", r"/api/tasks/(?P<id>\d+)", self.tasks_delete, False),
            ("GET", r"/api/tasks/(?P<id>\d+)/data/meta", self.tasks_meta, False),
            ("GET", r"/api/tasks/(?P<id>\d+)/data", self.tasks_data, False),
            ("GET", r"/api/tasks/(?P<id>\d+)/annotations", self.tasks_annotations, False),
            ("PUT", r"/api/tasks/(?P<id>\d+)/annotations", self.tasks_annotations_put, False),
            ("PATCH", r"/api/tasks/(?P<id>\d+)/annotations", self.tasks_annotations_patch, False),
            ("DELETE", r"/api/tasks/(?P<id>\d+)/annotations", self.tasks_annotations_del, False),
            ("GET", r"/api/jobs", self.jobs_list, False),
            ("GET", r"/api/jobs/(?P<id>\d+)", self.jobs_retrieve, False),
            ("PATCH", r"/api/jobs/(?P<id>\d+)", self.jobs_update, False),
            ("GET", r"/api/jobs/(?P<id>\d+)/data/meta", self.jobs_meta, False),
            ("GET", r"/api/jobs/(?P<id>\d+)/data", self.jobs_data, False),
            ("GET", r"/api/jobs/(?P<id>\d+)/annotations", self.jobs_annotations, False),
            ("PUT", r"/api/jobs/(?P<id>\d+)/annotations", self.jobs_annotations_put, False),
            ("PATCH", r"/api/jobs/(?P<id>\d+)/annotations", self.jobs_annotations_patch, False),
            ("DELETE", r"/api/jobs/(?P<id>\d+)/annotations", self.jobs_annotations_del, False),
            ("GET", r"/api/labels", self.labels_list, False),
            ("GET", r"/api/labels/(?P<id>\d+)", self.labels_retrieve, False),
            ("PATCH", r"/api/labels/(?P<id>\d+)", self.labels_update, False),
            ("GET", r"/api/issues", self.issues_list, False),
            ("POST", r"/api/issues", self.issues_create, False),
            ("GET", r"/api/issues/(?P<id>\d+)", self.issues_retrieve, False),
            ("PATCH", r"/api/issues/(?P<id>\d+)", self.issues_update, False),
            ("DELETE", r"/api/issues/(?P<id>\d+)", self.issues_delete, False),
            ("GET", r"/api/comments", self.comments_list, False),
            ("POST", r"/api/comments", self.comments_create, False),
            ("GET", r"/api/comments/(?P<id>\d+)", self.comments_retrieve, False),
        ]
        return [Route(m, re.compile(p + "/?$"), h, pub) for m, p, h, pub in table]

    def add_routes(self, table: list[tuple[str, str, Handler, bool]]) -> None:
        """Serve more endpoints (method, path pattern, handler, public)."""
        self.routes += [Route(m, re.compile(p + "/?$"), h, pub) for m, p, h, pub in table]

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, int]]:
        """The route for a request; 404 for an unknown path, 405 for a wrong method."""
        matched = False
        for route in self.routes:
            match = route.pattern.match(path)
            if match:
                matched = True
                if route.method == method:
                    return route, {k: int(v) for k, v in match.groupdict().items()}
        if matched:
            raise ApiError(405, {"detail": f'Method "{method}" not allowed.'})
        raise ApiError(404, {"detail": "Not found."})

    # ------------------------------------------------------------- helpers
    def paginate(self, ctx: Ctx, items: list[Any], render: Callable[[Any], Any]) -> Reply:
        """DRF PageNumberPagination: count/next/previous/results (404 on a bad page)."""
        page = _int(ctx.query.get("page")) or 1
        size = _page_size(ctx.query.get("page_size"))
        pages = max(1, -(-len(items) // size))
        if page < 1 or page > pages:
            raise ApiError(404, {"detail": "Invalid page."})

        def link(number: int) -> str:
            params = {k: v for k, v in ctx.query.items() if k != "page"}
            if number > 1:
                params["page"] = str(number)
            query = urlencode(sorted(params.items()))
            return f"{self.base}{ctx.path}" + (f"?{query}" if query else "")

        chunk = items[(page - 1) * size : page * size]
        return Reply(
            body={
                "count": len(items),
                "next": link(page + 1) if page < pages else None,
                "previous": link(page - 1) if page > 1 else None,
                "results": [render(i) for i in chunk],
            }
        )

    def _visible(self, ctx: Ctx, kind: str, table: dict[int, dict[str, Any]]) -> list[Any]:
        user = ctx.user
        assert user is not None
        items = [o for o in table.values() if self.state.visible(user, kind, o)]
        return self._in_context(ctx, kind, items)

    def _in_context(self, ctx: Ctx, kind: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A list keeps the objects of the request's organization context.

        In an organization: its objects only, and only for its active members and admins
        (others get 403, as jobs.rego allows `list` to members). In the personal workspace
        (an empty X-Organization): objects outside any organization. With no context at all,
        projects, tasks and jobs of organizations are left out too: on a real CVAT 2.73, an
        admin's `GET /api/jobs?project_id=N` for an organization's project answered no jobs
        until the organization was named (issue 20); labels, issues and comments are listed.
        """
        org = ctx.org or OrgContext()
        assert ctx.user is not None
        if org.org_id is not None:
            if not self.state.is_admin(ctx.user) and self.state.member_role(ctx.user, org.org_id) is None:
                raise forbidden()
            return [o for o in items if self.state.object_org(kind, o) == org.org_id]
        if org.given or kind in ("project", "task", "job"):
            return [o for o in items if self.state.object_org(kind, o) is None]
        return items

    def _get(self, ctx: Ctx, kind: str, obj_id: int) -> dict[str, Any]:
        assert ctx.user is not None
        return self.state.get_visible(ctx.user, kind, obj_id)

    @staticmethod
    def _filter(
        items: Iterable[dict[str, Any]], query: dict[str, str], fields: dict[str, Callable]
    ) -> list[dict[str, Any]]:
        """Keep items whose field getter equals each given filter value (as strings)."""
        out = list(items)
        for name, getter in fields.items():
            if name in query:
                want = query[name]
                out = [o for o in out if str(getter(o)) == want]
        return out

    def _username(self, user_id: int | None) -> str | None:
        return self.state.users[user_id]["username"] if user_id is not None else None

    def _search(self, items: list[Any], ctx: Ctx, *getters: Callable) -> list[Any]:
        term = ctx.query.get("search")
        if not term:
            return items
        term = term.lower()
        return [o for o in items if any(term in str(g(o) or "").lower() for g in getters)]

    @staticmethod
    def _sorted(items: list[dict[str, Any]], descending: bool = True) -> list[dict[str, Any]]:
        return sorted(items, key=lambda o: o["id"], reverse=descending)

    def _user_id_field(self, value: Any, field_name: str) -> int | None:
        if value is None:
            return None
        if not isinstance(value, int) or value not in self.state.users:
            raise bad_request({field_name: [f'Invalid pk "{value}" - object does not exist.']})
        return value

    # ---------------------------------------------------------------- auth
    def login(self, ctx: Ctx) -> Reply:
        """POST /api/auth/login; wrong credentials give dj-rest-auth's 400."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        missing = {k: ["This field is required."] for k in ("password",) if not body.get(k)}
        if missing:
            raise bad_request(missing)
        user = self.state.check_password(body.get("username") or "", body["password"])
        if user is None:
            raise bad_request({"non_field_errors": ["Unable to log in with provided credentials."]})
        key, sessionid, csrftoken = self.state.login(user)
        return Reply(
            body={"key": key},
            cookies=[
                f"csrftoken={csrftoken}; Max-Age=31449600; Path=/; SameSite=Lax",
                f"sessionid={sessionid}; HttpOnly; Max-Age=1209600; Path=/; SameSite=Lax",
            ],
        )

    def logout(self, ctx: Ctx) -> Reply:
        """POST /api/auth/logout."""
        if ctx.user is not None:
            self.state.logout(ctx.user, ctx.sessionid)
        return Reply(
            body={"detail": "Successfully logged out."},
            cookies=[
                'sessionid=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/',
                'csrftoken=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/',
            ],
        )

    def about(self, ctx: Ctx) -> Reply:
        """GET /api/server/about."""
        return Reply(
            body={
                "name": "Computer Vision Annotation Tool",
                "description": ABOUT_DESCRIPTION,
                "version": "2.73.0",
                "logo_url": f"{self.base}/static/logo.svg",
                "subtitle": "Open Data Annotation Platform",
            }
        )

    # --------------------------------------------------------------- users
    def users_self(self, ctx: Ctx) -> Reply:
        """GET /api/users/self."""
        assert ctx.user is not None
        return Reply(body=self.ser.user(ctx.user))

    def users_list(self, ctx: Ctx) -> Reply:
        """GET /api/users, as users.rego filters it: in an organization, its members (to an
        admin too; anyone else who is not a member gets 403); outside one, every user to an
        admin and only themselves to anyone else (as BasicUser)."""
        user = ctx.user
        assert user is not None
        admin = self.state.is_admin(user)
        org_id = (ctx.org or OrgContext()).org_id
        with self.state.lock:
            if org_id is not None:
                if not admin and self.state.member_role(user, org_id) is None:
                    raise forbidden()
                memberships = self.state.memberships.values()
                members = {m["user_id"] for m in memberships if m["organization_id"] == org_id}
                users = [u for u in self.state.users.values() if u["id"] in members]
            else:
                users = [u for u in self.state.users.values() if admin or u["id"] == user["id"]]
            users = self._filter(
                users,
                ctx.query,
                {
                    "username": lambda u: u["username"],
                    "first_name": lambda u: u["first_name"],
                    "last_name": lambda u: u["last_name"],
                    "is_active": lambda u: str(u["is_active"]).lower(),
                },
            )
            users = self._search(
                users,
                ctx,
                lambda u: u["username"],
                lambda u: u["first_name"],
                lambda u: u["last_name"],
            )
            render = self.ser.user if admin else lambda u: self.ser.basic_user(u["id"])
            return self.paginate(ctx, self._sorted(users), render)

    def users_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/users/{id}."""
        user = ctx.user
        assert user is not None
        with self.state.lock:
            if id not in self.state.users:
                raise not_found("User")
            if not self.state.is_admin(user) and id != user["id"]:
                raise forbidden()
            return Reply(body=self.ser.user(self.state.users[id]))

    # ------------------------------------------------------------ projects
    def projects_list(self, ctx: Ctx) -> Reply:
        """GET /api/projects."""
        with self.state.lock:
            items = self._filter(
                self._visible(ctx, "project", self.state.projects),
                ctx.query,
                {
                    "name": lambda p: p["name"],
                    "owner": lambda p: self._username(p["owner_id"]),
                    "assignee": lambda p: self._username(p["assignee_id"]),
                    "status": lambda p: self.ser.project(p)["status"],
                },
            )
            items = self._search(
                items,
                ctx,
                lambda p: p["name"],
                lambda p: self._username(p["owner_id"]),
                lambda p: self._username(p["assignee_id"]),
            )
            return self.paginate(ctx, self._sorted(items), self.ser.project)

    def projects_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/projects/{id}."""
        with self.state.lock:
            return Reply(body=self.ser.project(self._get(ctx, "project", id)))

    def projects_update(self, ctx: Ctx, id: int) -> Reply:
        """PATCH /api/projects/{id}: name, bug_tracker, owner/assignee, labels."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        with self.state.lock:
            project = self._get(ctx, "project", id)
            if "name" in body:
                project["name"] = body["name"]
            if "bug_tracker" in body:
                project["bug_tracker"] = body["bug_tracker"]
            if "owner_id" in body:
                project["owner_id"] = self._user_id_field(body["owner_id"], "owner_id")
            if "assignee_id" in body:
                project["assignee_id"] = self._user_id_field(body["assignee_id"], "assignee_id")
                project["assignee_updated_date"] = now()
            for spec in body.get("labels") or []:
                self.state.upsert_label(id, dict(spec))
            project["updated_date"] = now()
            return Reply(body=self.ser.project(project))

    # --------------------------------------------------------------- tasks
    def tasks_list(self, ctx: Ctx) -> Reply:
        """GET /api/tasks."""
        with self.state.lock:
            items = self._filter(
                self._visible(ctx, "task", self.state.tasks),
                ctx.query,
                {
                    "project_id": lambda t: t["project_id"],
                    "name": lambda t: t["name"],
                    "owner": lambda t: self._username(t["owner_id"]),
                    "assignee": lambda t: self._username(t["assignee_id"]),
                    "status": lambda t: self.ser.task_status(t["id"]),
                    "media_type": lambda t: t["media_type"],
                    "subset": lambda t: t["subset"],
                    "project_name": lambda t: self.state.projects[t["project_id"]]["name"],
                },
            )
            items = self._search(items, ctx, lambda t: t["name"])
            return self.paginate(ctx, self._sorted(items), self.ser.task)

    def tasks_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/tasks/{id}."""
        with self.state.lock:
            return Reply(body=self.ser.task(self._get(ctx, "task", id)))

    def tasks_delete(self, ctx: Ctx, id: int) -> Reply:
        """DELETE /api/tasks/{id}: 204; its jobs answer 404 from then on."""
        with self.state.lock:
            self._get(ctx, "task", id)
            self.state.delete_task(id)
            return Reply(status=204)

    def tasks_meta(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/tasks/{id}/data/meta."""
        with self.state.lock:
            return Reply(body=self.ser.task_meta(self._get(ctx, "task", id)))

    def tasks_data(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/tasks/{id}/data?type=chunk|frame&number=N&quality=..."""
        with self.state.lock:
            task = self._get(ctx, "task", id)
            number = _int(ctx.query.get("number")) or 0
            if ctx.query.get("type") == "frame":
                return self._frame(task, number, range(len(task["frames"])), ctx)
            size = task["chunk_size"]
            count = max(1, -(-len(task["frames"]) // size))
            frames = list(range(number * size, min((number + 1) * size, len(task["frames"]))))
        return self._chunk(task, frames, number, count, ctx)  # encoded outside the state lock

    def _data_type(self, ctx: Ctx) -> str:
        kind = ctx.query.get("type")
        if kind not in ("chunk", "frame", "context_image"):
            raise bad_request(
                {"type": ["This field is required."]}
                if kind is None
                else {"type": [f'"{kind}" is not a valid choice.']}
            )
        return kind

    def _quality(self, ctx: Ctx) -> bool:
        quality = ctx.query.get("quality", "compressed")
        if quality not in ("compressed", "original"):
            raise bad_request({"quality": [f'"{quality}" is not a valid choice.']})
        return quality == "compressed"

    def _chunk(self, task: dict[str, Any], frames: list[int], index: int, count: int, ctx: Ctx) -> Reply:
        """A chunk of task frames; out-of-range index gives CVAT's bare-string 400."""
        self._data_type(ctx)
        compressed = self._quality(ctx)
        if not 0 <= index < count or not frames:
            raise bad_request(
                f"Invalid chunk number '{index}'. The chunk number should be in the [0, {count - 1}] range"
            )
        video = self.ser.chunk_type(task, "compressed" if compressed else "original") == "video"
        key = (task["id"], tuple(frames), compressed and not video, task["chunks_updated_date"])

        def build() -> bytes:
            items = [task["frames"][n] for n in frames]
            if video:
                return media.video_chunk(items, fps=task["fps"])
            return media.image_chunk(items, compressed=compressed, quality=task["image_quality"])

        # Built on its first request and kept, taking the latency model's time (if any).
        data = self.latency.chunk(key, len(frames), compressed and not video, build)
        return Reply(body=data, content_type="video/mp4" if video else "application/zip")

    def _frame(self, task: dict[str, Any], number: int, allowed: Iterable[int], ctx: Ctx) -> Reply:
        """One frame as an image (JPEG re-encoded for `compressed`); a point cloud as its file."""
        compressed = self._quality(ctx)
        if number not in allowed:
            raise bad_request(f"Incorrect requested frame number: {number}")
        frame = task["frames"][number]
        if frame.image is None:
            return Reply(body=frame.data, content_type="application/octet-stream")
        if compressed or task["media_type"] == "video":
            return Reply(
                body=media.encode_jpeg(frame.image, task["image_quality"]),
                content_type="image/jpeg",
            )
        return Reply(body=frame.data, content_type="image/jpeg")

    def tasks_annotations(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/tasks/{id}/annotations."""
        with self.state.lock:
            self._get(ctx, "task", id)
            return Reply(body=self.ser.labeled_data(self.state.task_annotations(id)))

    def tasks_annotations_put(self, ctx: Ctx, id: int) -> Reply:
        """PUT /api/tasks/{id}/annotations."""
        with self.state.lock:
            self._get(ctx, "task", id)
            done = self.state.task_put(id, self._labeled(ctx))
            return Reply(body=self.ser.labeled_data(done))

    def tasks_annotations_patch(self, ctx: Ctx, id: int) -> Reply:
        """PATCH /api/tasks/{id}/annotations?action=..."""
        with self.state.lock:
            self._get(ctx, "task", id)
            done = self.state.task_patch(id, ctx.query.get("action", ""), self._labeled(ctx))
            return Reply(body=self.ser.labeled_data(done))

    def tasks_annotations_del(self, ctx: Ctx, id: int) -> Reply:
        """DELETE /api/tasks/{id}/annotations."""
        with self.state.lock:
            self._get(ctx, "task", id)
            self.state.task_clear(id)
            return Reply(status=204)

    @staticmethod
    def _labeled(ctx: Ctx) -> dict[str, Any]:
        body = ctx.body
        if not isinstance(body, dict):
            raise bad_request({"non_field_errors": ["Invalid data. Expected a dictionary."]})
        for kind in ("tags", "shapes", "tracks"):
            for obj in body.get(kind) or []:
                missing = [k for k in ("frame", "label_id") if obj.get(k) is None]
                if missing:
                    raise bad_request({kind: [{k: ["This field is required."] for k in missing}]})
        return body

    # ---------------------------------------------------------------- jobs
    def jobs_list(self, ctx: Ctx) -> Reply:
        """GET /api/jobs."""
        with self.state.lock:
            tasks, projects = self.state.tasks, self.state.projects
            items = self._filter(
                self._visible(ctx, "job", self.state.jobs),
                ctx.query,
                {
                    "task_id": lambda j: j["task_id"],
                    "project_id": lambda j: tasks[j["task_id"]]["project_id"],
                    "type": lambda j: j["type"],
                    "stage": lambda j: j["stage"],
                    "state": lambda j: j["state"],
                    "assignee": lambda j: self._username(j["assignee_id"]),
                    "parent_job_id": lambda j: j["parent_job_id"],
                    "task_name": lambda j: tasks[j["task_id"]]["name"],
                    "project_name": lambda j: projects[tasks[j["task_id"]]["project_id"]]["name"],
                    "media_type": lambda j: tasks[j["task_id"]]["media_type"],
                    "dimension": lambda j: tasks[j["task_id"]]["dimension"],
                },
            )
            return self.paginate(ctx, self._sorted(items), self.ser.job)

    def jobs_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/jobs/{id}."""
        with self.state.lock:
            return Reply(body=self.ser.job(self._get(ctx, "job", id)))

    def jobs_update(self, ctx: Ctx, id: int) -> Reply:
        """PATCH /api/jobs/{id}: stage, state, assignee (a user id)."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        with self.state.lock:
            job = self._get(ctx, "job", id)
            if "stage" in body and body["stage"] not in JOB_STAGES:
                raise bad_request({"stage": [f'"{body["stage"]}" is not a valid choice.']})
            if "state" in body and body["state"] not in JOB_STATES:
                raise bad_request({"state": [f'"{body["state"]}" is not a valid choice.']})
            assignee = self._user_id_field(body.get("assignee"), "assignee")
            if ("stage" in body or "assignee" in body) and not self.state.may_route_job(ctx.user, job):
                raise forbidden()
            watched = ("status", "stage", "state")
            before = {"updated_date": job["updated_date"], "status": self.ser.job_status(job)}
            before.update({key: job[key] for key in ("stage", "state")})
            stage = body.get("stage", job["stage"])
            # JobWriteSerializer.update: a stage change without a state sets the state to new
            job["state"] = body.get("state", "new" if stage != job["stage"] else job["state"])
            job["stage"] = stage
            if "assignee" in body and assignee != job["assignee_id"]:
                job["assignee_id"] = assignee
                job["assignee_updated_date"] = now()
            job["updated_date"] = now()
            after = {"status": self.ser.job_status(job), "stage": job["stage"], "state": job["state"]}
            changed = [key for key in watched if after[key] != before[key]]
            if changed:
                self.state.notify(
                    "update:job",
                    project_id=self.state.tasks[job["task_id"]]["project_id"],
                    job_id=id,
                    sender_id=ctx.user["id"] if ctx.user else None,
                    before=before,
                    after=after,
                    changed=changed,
                )
            return Reply(body=self.ser.job(job))

    def jobs_meta(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/jobs/{id}/data/meta."""
        with self.state.lock:
            return Reply(body=self.ser.job_meta(self._get(ctx, "job", id)))

    def jobs_data(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/jobs/{id}/data?type=chunk&index=N (or legacy task chunk `number`)."""
        with self.state.lock:
            job = self._get(ctx, "job", id)
            task = self.state.tasks[job["task_id"]]
            frames = self.state.job_frames(job)
            if self._data_type(ctx) == "frame":
                number = _int(ctx.query.get("number"))
                return self._frame(task, -1 if number is None else number, frames, ctx)
            size = task["chunk_size"]
            if "index" in ctx.query or "number" not in ctx.query:
                index = _int(ctx.query.get("index")) or 0
                part = frames[index * size : (index + 1) * size]
                count = self.ser.job_chunk_count(job)
            else:
                number = _int(ctx.query.get("number")) or 0
                part = [f for f in frames if f // size == number]
                first = frames[0] // size
                index, count = number - first, frames[-1] // size - first + 1
        return self._chunk(task, part, index, count, ctx)  # encoded outside the state lock

    def jobs_annotations(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/jobs/{id}/annotations."""
        with self.state.lock:
            self._get(ctx, "job", id)
            return Reply(body=self.ser.labeled_data(self.state.job_annotations(id)))

    def jobs_annotations_put(self, ctx: Ctx, id: int) -> Reply:
        """PUT /api/jobs/{id}/annotations."""
        with self.state.lock:
            self._get(ctx, "job", id)
            return Reply(body=self.ser.labeled_data(self.state.job_put(id, self._labeled(ctx))))

    def jobs_annotations_patch(self, ctx: Ctx, id: int) -> Reply:
        """PATCH /api/jobs/{id}/annotations?action=create|update|delete."""
        with self.state.lock:
            self._get(ctx, "job", id)
            done = self.state.job_patch(id, ctx.query.get("action", ""), self._labeled(ctx))
            return Reply(body=self.ser.labeled_data(done))

    def jobs_annotations_del(self, ctx: Ctx, id: int) -> Reply:
        """DELETE /api/jobs/{id}/annotations."""
        with self.state.lock:
            self._get(ctx, "job", id)
            self.state.job_clear(id)
            return Reply(status=204)

    # -------------------------------------------------------------- labels
    def labels_list(self, ctx: Ctx) -> Reply:
        """GET /api/labels (project_id, task_id and job_id are mutually exclusive)."""
        parents = [k for k in ("project_id", "task_id", "job_id") if k in ctx.query]
        if len(parents) > 1:
            raise bad_request(["job_id, task_id and project_id parameters cannot be used together"])
        with self.state.lock:
            items = self._visible(ctx, "label", self.state.labels)
            if parents:
                kind = parents[0][: -len("_id")]
                parent = self._get(ctx, kind, _int(ctx.query[parents[0]]) or 0)
                if kind == "job":
                    parent = self.state.tasks[parent["task_id"]]
                pid = parent["project_id"] if kind != "project" else parent["id"]
                items = [lb for lb in self.state.labels.values() if lb["project_id"] == pid]
            items = self._filter(
                items,
                ctx.query,
                {
                    "name": lambda lb: lb["name"],
                    "type": lambda lb: lb["type"],
                    "color": lambda lb: lb["color"],
                },
            )
            return self.paginate(ctx, self._sorted(items, descending=False), self.ser.label)

    def labels_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/labels/{id}."""
        with self.state.lock:
            return Reply(body=self.ser.label(self._get(ctx, "label", id)))

    def labels_update(self, ctx: Ctx, id: int) -> Reply:
        """PATCH /api/labels/{id}: name, color, attributes (added or updated, others kept)."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        with self.state.lock:
            label = self._get(ctx, "label", id)
            spec = {k: v for k, v in body.items() if k in ("name", "color", "attributes")}
            label = self.state.upsert_label(label["project_id"], {**spec, "id": id})
            return Reply(body=self.ser.label(label))

    # -------------------------------------------------------------- issues
    def issues_list(self, ctx: Ctx) -> Reply:
        """GET /api/issues."""
        with self.state.lock:
            jobs = self.state.jobs
            items = self._filter(
                self._visible(ctx, "issue", self.state.issues),
                ctx.query,
                {
                    "job_id": lambda i: i["job_id"],
                    "task_id": lambda i: jobs[i["job_id"]]["task_id"],
                    "frame_id": lambda i: i["frame"],
                    "resolved": lambda i: str(i["resolved"]).lower(),
                    "owner": lambda i: self._username(i["owner_id"]),
                    "assignee": lambda i: self._username(i["assignee_id"]),
                },
            )
            return self.paginate(ctx, self._sorted(items), self.ser.issue)

    def issues_create(self, ctx: Ctx) -> Reply:
        """POST /api/issues: 201; the message becomes the first comment."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        missing = {
            k: ["This field is required."]
            for k in ("frame", "position", "job", "message")
            if body.get(k) in (None, "")
        }
        if missing:
            raise bad_request(missing)
        assert ctx.user is not None
        with self.state.lock:
            job_id = body["job"]
            if job_id not in self.state.jobs:
                raise bad_request({"job": [f'Invalid pk "{job_id}" - object does not exist.']})
            self._get(ctx, "job", job_id)
            issue = self.state.add_issue(
                job_id,
                int(body["frame"]),
                body["position"],
                str(body["message"]),
                ctx.user["id"],
                assignee_id=self._user_id_field(body.get("assignee"), "assignee"),
                resolved=bool(body.get("resolved", False)),
            )
            return Reply(status=201, body=self.ser.issue(issue))

    def issues_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/issues/{id}."""
        with self.state.lock:
            return Reply(body=self.ser.issue(self._get(ctx, "issue", id)))

    def issues_update(self, ctx: Ctx, id: int) -> Reply:
        """PATCH /api/issues/{id}: resolved, position, assignee."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        with self.state.lock:
            issue = self._get(ctx, "issue", id)
            if "resolved" in body:
                issue["resolved"] = bool(body["resolved"])
            if "position" in body:
                issue["position"] = [float(p) for p in body["position"]]
            if "assignee" in body:
                issue["assignee_id"] = self._user_id_field(body["assignee"], "assignee")
            issue["updated_date"] = now()
            return Reply(body=self.ser.issue(issue))

    def issues_delete(self, ctx: Ctx, id: int) -> Reply:
        """DELETE /api/issues/{id}: 204, its comments go too; 403 for whom issues.rego refuses."""
        with self.state.lock:
            issue = self._get(ctx, "issue", id)
            if not self.state.may_delete_issue(ctx.user, issue):
                raise forbidden()
            self.state.delete_issue(id)
            return Reply(status=204)

    # ------------------------------------------------------------ comments
    def comments_list(self, ctx: Ctx) -> Reply:
        """GET /api/comments."""
        with self.state.lock:
            issues, jobs = self.state.issues, self.state.jobs
            items = self._filter(
                self._visible(ctx, "comment", self.state.comments),
                ctx.query,
                {
                    "issue_id": lambda c: c["issue_id"],
                    "job_id": lambda c: issues[c["issue_id"]]["job_id"],
                    "frame_id": lambda c: issues[c["issue_id"]]["frame"],
                    "owner": lambda c: self._username(c["owner_id"]),
                    "task_id": lambda c: jobs[issues[c["issue_id"]]["job_id"]]["task_id"],
                },
            )
            return self.paginate(ctx, self._sorted(items), self.ser.comment)

    def comments_create(self, ctx: Ctx) -> Reply:
        """POST /api/comments {issue, message}."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        assert ctx.user is not None
        with self.state.lock:
            issue_id = body.get("issue")
            if issue_id not in self.state.issues:
                raise bad_request({"issue": [f'Invalid pk "{issue_id}" - object does not exist.']})
            self._get(ctx, "issue", issue_id)
            comment = self.state.add_comment(issue_id, str(body.get("message", "")), ctx.user["id"])
            return Reply(status=201, body=self.ser.comment(comment))

    def comments_retrieve(self, ctx: Ctx, id: int) -> Reply:
        """GET /api/comments/{id}."""
        with self.state.lock:
            return Reply(body=self.ser.comment(self._get(ctx, "comment", id)))
