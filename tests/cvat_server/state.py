"""In-memory model of the CVAT objects the fake server serves, guarded by one lock.

Records are plain dicts (so tests can inspect them); media frames are `media.Frame`.
Domain rules follow CVAT 2.73 where known; the source file followed is named next to
each rule. Client mistakes that real CVAT silently accepts are stored as CVAT would and
also appended to `violations`.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from .errors import bad_request, forbidden, not_found
from .media import Frame

LABEL_COLORS = ("#6080c0", "#406040", "#2080c0", "#c06060", "#c0a020", "#8040c0", "#20a0a0")
JOB_STAGES = ("annotation", "validation", "acceptance")
JOB_STATES = ("new", "in progress", "rejected", "completed")
ANNOTATION_KINDS = ("tags", "shapes", "tracks")
ORG_ROLES = ("owner", "maintainer", "supervisor", "worker")


def now() -> str:
    """A timestamp as CVAT prints it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class State:
    """All server data; every public method takes the lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users: dict[int, dict[str, Any]] = {}
        self.tokens: dict[str, int] = {}  # personal access tokens (Bearer)
        self.token_records: dict[str, dict[str, Any]] = {}  # token -> AccessToken (read_only, ...)
        self.organizations: dict[int, dict[str, Any]] = {}
        self.memberships: dict[int, dict[str, Any]] = {}
        self.keys: dict[str, int] = {}  # legacy login keys ("Token <key>")
        self.sessions: dict[str, tuple[int, str]] = {}  # sessionid -> (user id, csrftoken)
        self.projects: dict[int, dict[str, Any]] = {}
        self.labels: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.jobs: dict[int, dict[str, Any]] = {}
        self.annotations: dict[int, dict[str, list[dict[str, Any]]]] = {}
        self.issues: dict[int, dict[str, Any]] = {}
        self.comments: dict[int, dict[str, Any]] = {}
        self.violations: list[dict[str, Any]] = []
        self.listeners: list[Callable[..., None]] = []  # webhooks: called with (event, **details)
        self._ids: dict[str, int] = {}

    # ----------------------------------------------------------------- helpers
    def next_id(self, kind: str) -> int:
        """A fresh id for a kind of object (each kind has its own sequence)."""
        with self.lock:
            self._ids[kind] = self._ids.get(kind, 0) + 1
            return self._ids[kind]

    def notify(self, event: str, **details: Any) -> None:
        """Tell the listeners (webhooks) that `event` happened; called under the lock."""
        with self.lock:
            for listener in self.listeners:
                listener(event, **details)

    def violation(self, kind: str, message: str, **context: Any) -> None:
        """Record a client mistake that real CVAT accepts silently."""
        with self.lock:
            self.violations.append({"kind": kind, "message": message, **context})

    def user_by_name(self, username: str) -> dict[str, Any]:
        """The user with this username (KeyError if none)."""
        with self.lock:
            for user in self.users.values():
                if user["username"] == username:
                    return user
        raise KeyError(username)

    # ------------------------------------------------------------------- users
    def add_user(self, username: str, password: str, *, is_superuser: bool = False) -> int:
        """Create a user; superusers are in the `admin` group, others in `user`."""
        with self.lock:
            if any(u["username"] == username for u in self.users.values()):
                raise ValueError(f"user {username!r} exists")
            uid = self.next_id("user")
            self.users[uid] = {
                "id": uid,
                "username": username,
                "password": password,
                "first_name": "",
                "last_name": "",
                "email": f"{username}@example.com",
                "is_superuser": is_superuser,
                "is_staff": is_superuser,
                "is_active": True,
                "date_joined": now(),
                "last_login": None,
            }
            return uid

    def add_token(self, username: str, token: str, *, read_only: bool = False, name: str = "") -> None:
        """Register a personal access token for a user; a `read_only` one may only read.

        CVAT's API creates tokens read-only by default (AccessToken.read_only); writes with
        one are refused by AccessTokenReadOnlyDefaultPermission (see auth.py).
        """
        with self.lock:
            uid = self.user_by_name(username)["id"]
            self.tokens[token] = uid
            ts = now()
            self.token_records[token] = {
                "id": self.next_id("access_token"),
                "name": name or f"token of {username}",
                "created_date": ts,
                "updated_date": ts,
                "expiry_date": None,
                "last_used_date": None,
                "read_only": read_only,
                "owner_id": uid,
            }

    def revoke_token(self, token: str) -> None:
        """Revoke a personal access token (or a legacy login key)."""
        with self.lock:
            self.tokens.pop(token, None)
            self.token_records.pop(token, None)
            self.keys.pop(token, None)

    def check_password(self, username: str, password: str) -> dict[str, Any] | None:
        """The active user with these credentials, or None."""
        with self.lock:
            for user in self.users.values():
                if user["username"] == username and user["password"] == password:
                    return user if user["is_active"] else None
        return None

    def login(self, user: dict[str, Any]) -> tuple[str, str, str]:
        """Open a session: returns (legacy key, sessionid, csrftoken)."""
        with self.lock:
            key = next((k for k, uid in self.keys.items() if uid == user["id"]), None)
            if key is None:
                key = secrets.token_hex(20)
                self.keys[key] = user["id"]
            sessionid, csrftoken = secrets.token_hex(16), secrets.token_hex(16)
            self.sessions[sessionid] = (user["id"], csrftoken)
            user["last_login"] = now()
            return key, sessionid, csrftoken

    def logout(self, user: dict[str, Any], sessionid: str | None) -> None:
        """Close the session and delete the user's legacy key (dj-rest-auth LogoutView)."""
        with self.lock:
            if sessionid:
                self.sessions.pop(sessionid, None)
            for key in [k for k, uid in self.keys.items() if uid == user["id"]]:
                del self.keys[key]

    # -------------------------------------------------------------- projects
    def add_project(
        self,
        name: str,
        *,
        owner: str,
        labels: Sequence[dict[str, Any]] = (),
        organization: str | None = None,
    ) -> int:
        """Create a project with labels ({name, type, color?, attributes?}), in an
        organization (by slug; its tasks and jobs belong to it too) or the personal workspace."""
        with self.lock:
            pid = self.next_id("project")
            ts = now()
            self.projects[pid] = {
                "id": pid,
                "name": name,
                "organization_id": self.organization_by_slug(organization)["id"] if organization else None,
                "owner_id": self.user_by_name(owner)["id"],
                "assignee_id": None,
                "assignee_updated_date": None,
                "bug_tracker": "",
                "created_date": ts,
                "updated_date": ts,
            }
            for spec in labels:
                self.upsert_label(pid, dict(spec))
            return pid

    def upsert_label(self, project_id: int, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a label, or update the one whose `id` is given.

        Follows LabelSerializer.update_label in cvat/apps/engine/serializers.py: an
        attribute with an id updates that attribute; one without an id is matched by
        name (updated in place) or created; existing attributes not mentioned are kept;
        `deleted: true` removes a label or an attribute.
        """
        with self.lock:
            if spec.get("id") is not None:
                label = self.labels.get(spec["id"])
                if label is None or label["project_id"] != project_id:
                    raise bad_request({"labels": [f"Label with id #{spec['id']} does not exist"]})
                if spec.get("deleted"):
                    del self.labels[label["id"]]
                    return label
            else:
                lid = self.next_id("label")
                label = {
                    "id": lid,
                    "name": spec["name"],
                    "color": LABEL_COLORS[(lid - 1) % len(LABEL_COLORS)],
                    "type": spec.get("type") or "any",
                    "project_id": project_id,
                    "attributes": [],
                }
                self.labels[lid] = label
            for key in ("name", "color", "type"):
                if spec.get(key):
                    label[key] = spec[key]
            for attr in spec.get("attributes") or []:
                self._upsert_attribute(label, dict(attr))
            self.touch_project(project_id)
            return label

    def _upsert_attribute(self, label: dict[str, Any], attr: dict[str, Any]) -> None:
        existing = None
        if attr.get("id") is not None:
            existing = next((a for a in label["attributes"] if a["id"] == attr["id"]), None)
            if existing is None:
                raise bad_request({"attributes": [f"Attribute with id #{attr['id']} not found"]})
        else:
            existing = next((a for a in label["attributes"] if a["name"] == attr["name"]), None)
        if attr.get("deleted"):
            if existing is not None:
                label["attributes"].remove(existing)
            return
        if existing is None:
            existing = {"id": self.next_id("attribute"), "name": attr["name"]}
            label["attributes"].append(existing)
        input_type = attr.get("input_type", existing.get("input_type", "text"))
        values = [str(v) for v in attr.get("values", existing.get("values", [""]))]
        default = attr.get("default_value", existing.get("default_value"))
        if default is None:
            default = values[0] if values else ""
        existing.update(
            name=attr.get("name", existing["name"]),
            mutable=bool(attr.get("mutable", existing.get("mutable", False))),
            input_type=input_type,
            default_value=str(default),
            values=values,
        )

    def touch_project(self, project_id: int) -> None:
        """Bump a project's updated_date."""
        with self.lock:
            if project_id in self.projects:
                self.projects[project_id]["updated_date"] = now()

    def task_labels(self, task_id: int) -> list[dict[str, Any]]:
        """Labels of a task (those of its project), ordered by id."""
        with self.lock:
            pid = self.tasks[task_id]["project_id"]
            return sorted(
                (lb for lb in self.labels.values() if lb["project_id"] == pid),
                key=lambda lb: lb["id"],
            )

    # --------------------------------------------------------- organizations
    def add_organization(self, slug: str, *, owner: str, name: str = "") -> int:
        """Create an organization; its owner becomes an active member with role `owner`."""
        with self.lock:
            if any(org["slug"] == slug for org in self.organizations.values()):
                raise ValueError(f"organization {slug!r} exists")
            oid = self.next_id("organization")
            ts = now()
            self.organizations[oid] = {
                "id": oid,
                "slug": slug,
                "name": name or slug,
                "owner_id": self.user_by_name(owner)["id"],
                "created_date": ts,
                "updated_date": ts,
            }
            self.add_member(slug, owner, "owner")
            return oid

    def add_member(self, slug: str, username: str, role: str, *, is_active: bool = True) -> int:
        """A membership: role owner, maintainer, supervisor or worker; inactive = invited only."""
        if role not in ORG_ROLES:
            raise ValueError(f"role {role!r}")
        with self.lock:
            mid = self.next_id("membership")
            self.memberships[mid] = {
                "id": mid,
                "user_id": self.user_by_name(username)["id"],
                "organization_id": self.organization_by_slug(slug)["id"],
                "role": role,
                "is_active": is_active,
                "joined_date": now() if is_active else None,
            }
            return mid

    def organization_by_slug(self, slug: str) -> dict[str, Any]:
        """The organization with this slug (KeyError if none)."""
        with self.lock:
            for org in self.organizations.values():
                if org["slug"] == slug:
                    return org
        raise KeyError(slug)

    def member_role(self, user: dict[str, Any], org_id: int) -> str | None:
        """The user's role in the organization if an active member, else None."""
        with self.lock:
            for membership in self.memberships.values():
                if (
                    membership["user_id"] == user["id"]
                    and membership["organization_id"] == org_id
                    and membership["is_active"]
                ):
                    return membership["role"]
        return None

    def object_org(self, kind: str, obj: dict[str, Any]) -> int | None:
        """The organization id a project, task, job, label, issue or comment belongs to."""
        with self.lock:
            if kind == "project":
                return obj.get("organization_id")
            if kind in ("task", "label"):
                project = self.projects.get(obj["project_id"])
                return project.get("organization_id") if project else None
            if kind == "job":
                return self.object_org("task", self.tasks[obj["task_id"]])
            if kind == "issue":
                return self.object_org("job", self.jobs[obj["job_id"]])
            if kind == "comment":
                return self.object_org("issue", self.issues[obj["issue_id"]])
        raise ValueError(kind)

    # ----------------------------------------------------------------- tasks
    def add_task(
        self,
        project_id: int,
        frames: Sequence[Frame],
        *,
        name: str,
        owner: str | None,
        segment_size: int,
        chunk_size: int,
        media_type: str,
        image_quality: int,
        deleted_frames: Iterable[int] = (),
        fps: int = 25,
        data_start: int = 0,
        frame_step: int = 1,
        overlap: int | None = None,
        use_zip_chunks: bool = False,
        dimension: str = "2d",
    ) -> int:
        """Create a task with data and its annotation jobs split by segment_size.

        `frames` are the frames kept by the upload's filter, in order: relative frame r
        shows media frame ``data_start + r * frame_step``. Jobs follow
        _generate_segment_params in cvat/apps/engine/task.py: `overlap` defaults to 5
        for video tasks and 0 for image tasks, and is at most half the segment size.
        """
        with self.lock:
            project = self.projects[project_id]
            owner_id = self.user_by_name(owner)["id"] if owner else project["owner_id"]
            tid = self.next_id("task")
            ts = now()
            size = len(frames)
            if segment_size == 0 or segment_size > size:
                segment_size = size
            default_overlap = 5 if media_type == "video" else 0
            overlap = min(default_overlap if overlap is None else overlap, segment_size // 2)
            self.tasks[tid] = {
                "id": tid,
                "name": name,
                "project_id": project_id,
                "owner_id": owner_id,
                "assignee_id": None,
                "assignee_updated_date": None,
                "segment_size": segment_size,
                "chunk_size": chunk_size,
                "image_quality": image_quality,
                "media_type": media_type,
                "dimension": dimension,
                "use_zip_chunks": use_zip_chunks,
                "frames": list(frames),
                "deleted_frames": sorted(set(deleted_frames)),
                "fps": fps,
                "data_start_frame": data_start,
                "data_stop_frame": data_start + (size - 1) * frame_step,
                "frame_step": frame_step,
                "overlap": overlap,
                "subset": "",
                "created_date": ts,
                "updated_date": ts,
                "chunks_updated_date": ts,
            }
            for start in range(0, size - overlap, segment_size - overlap):
                self.add_job(tid, start, min(start + segment_size, size) - 1)
            self.touch_project(project_id)
            # As CVAT: create:task when the task is made, then the data request completes.
            for event in ("create:task", "completed:request[create:task]"):
                self.notify(event, project_id=project_id, task_id=tid, sender_id=owner_id)
            return tid

    def add_job(
        self,
        task_id: int,
        start: int,
        stop: int,
        *,
        job_type: str = "annotation",
        frames: Sequence[int] | None = None,
        parent_job_id: int | None = None,
    ) -> int:
        """Create a job over task frames [start, stop] (or a frame set, for ground truth)."""
        with self.lock:
            jid = self.next_id("job")
            ts = now()
            self.jobs[jid] = {
                "id": jid,
                "task_id": task_id,
                "type": job_type,
                "start_frame": start,
                "stop_frame": stop,
                "frames": sorted(frames) if frames is not None else None,
                "stage": "annotation",
                "state": "new",
                "assignee_id": None,
                "assignee_updated_date": None,
                "parent_job_id": parent_job_id,
                "created_date": ts,
                "updated_date": ts,
            }
            self.annotations[jid] = {kind: [] for kind in ANNOTATION_KINDS}
            return jid

    def add_ground_truth_job(self, task_id: int, frames: Sequence[int]) -> int:
        """A `ground_truth` job over specific task frames (a SPECIFIC_FRAMES segment)."""
        frames = sorted(set(frames))
        return self.add_job(task_id, frames[0], frames[-1], job_type="ground_truth", frames=frames)

    def add_consensus_replicas(self, job_id: int, count: int) -> list[int]:
        """`consensus_replica` jobs over the same frames as an annotation job."""
        with self.lock:
            parent = self.jobs[job_id]
            return [
                self.add_job(
                    parent["task_id"],
                    parent["start_frame"],
                    parent["stop_frame"],
                    job_type="consensus_replica",
                    parent_job_id=job_id,
                )
                for _ in range(count)
            ]

    def job_frames(self, job: dict[str, Any]) -> list[int]:
        """Task frame numbers a job covers, in order."""
        if job["frames"] is not None:
            return list(job["frames"])
        return list(range(job["start_frame"], job["stop_frame"] + 1))

    # ------------------------------------------------------------ visibility
    def is_admin(self, user: dict[str, Any]) -> bool:
        """Superusers see and may change everything."""
        return bool(user["is_superuser"])

    def _task_staff(self, user: dict[str, Any], task: dict[str, Any]) -> bool:
        """Task owner/assignee or project owner/assignee (or an admin)."""
        if self.is_admin(user) or user["id"] in (task["owner_id"], task["assignee_id"]):
            return True
        project = self.projects.get(task["project_id"])
        return bool(project) and user["id"] in (project["owner_id"], project["assignee_id"])

    def may_route_job(self, user: dict[str, Any], job: dict[str, Any]) -> bool:
        """Whether `user` may change the job's stage or assignee (jobs.rego ``update:stage``,
        ``update:assignee``): staff of its task (not its own assignee alone), or an owner or
        maintainer of the job's organization."""
        return self._manages(user, "job", job) or self._task_staff(user, self.tasks[job["task_id"]])

    def may_delete_issue(self, user: dict[str, Any], issue: dict[str, Any]) -> bool:
        """Whether `user` may delete the issue (issues.rego ``delete``): its owner, staff of its
        job's task (not the job's assignee alone), or an owner or maintainer of its organization."""
        job = self.jobs[issue["job_id"]]
        return issue["owner_id"] == user["id"] or self.may_route_job(user, job)

    def _manages(self, user: dict[str, Any], kind: str, obj: dict[str, Any]) -> bool:
        """An owner or maintainer of the organization the object belongs to."""
        org_id = self.object_org(kind, obj)
        return org_id is not None and self.member_role(user, org_id) in ("owner", "maintainer")

    def can_see_task(self, user: dict[str, Any], task: dict[str, Any]) -> bool:
        """Task staff, or the assignee of one of its jobs."""
        return self._task_staff(user, task) or any(
            j["task_id"] == task["id"] and j["assignee_id"] == user["id"] for j in self.jobs.values()
        )

    def can_see_project(self, user: dict[str, Any], project: dict[str, Any]) -> bool:
        """Project owner/assignee, or someone who can see one of its tasks."""
        if self.is_admin(user) or user["id"] in (project["owner_id"], project["assignee_id"]):
            return True
        return any(
            t["project_id"] == project["id"] and self.can_see_task(user, t) for t in self.tasks.values()
        )

    def can_see_job(self, user: dict[str, Any], job: dict[str, Any]) -> bool:
        """Job assignee, or staff of the job's task (a job assignee sees only that job)."""
        return job["assignee_id"] == user["id"] or self._task_staff(user, self.tasks[job["task_id"]])

    def get_visible(self, user: dict[str, Any], kind: str, obj_id: int) -> dict[str, Any]:
        """Fetch a project/task/job/label/issue/comment; 404 if unknown, 403 if hidden."""
        with self.lock:
            table, model = {
                "project": (self.projects, "Project"),
                "task": (self.tasks, "Task"),
                "job": (self.jobs, "Job"),
                "label": (self.labels, "Label"),
                "issue": (self.issues, "Issue"),
                "comment": (self.comments, "Comment"),
            }[kind]
            obj = table.get(obj_id)
            if obj is None:
                raise not_found(model)
            if not self.visible(user, kind, obj):
                raise forbidden()
            return obj

    def visible(self, user: dict[str, Any], kind: str, obj: dict[str, Any]) -> bool:
        """Whether `user` may see this object.

        An organization's object: admins, and the organization's owners and maintainers,
        see it; its supervisors and workers as in the personal workspace (owner or
        assignee); anyone else does not (jobs.rego, projects.rego: organizations.has_perm).
        """
        org_id = self.object_org(kind, obj)
        if org_id is not None and not self.is_admin(user):
            role = self.member_role(user, org_id)
            if role is None:
                return False
            if role in ("owner", "maintainer"):
                return True
        if kind == "project":
            return self.can_see_project(user, obj)
        if kind == "task":
            return self.can_see_task(user, obj)
        if kind == "job":
            return self.can_see_job(user, obj)
        if kind == "label":
            return self.can_see_project(user, self.projects[obj["project_id"]])
        if kind == "issue":
            return user["id"] in (obj["owner_id"], obj["assignee_id"]) or self.can_see_job(
                user, self.jobs[obj["job_id"]]
            )
        if kind == "comment":
            return self.visible(user, "issue", self.issues[obj["issue_id"]])
        raise ValueError(kind)

    # ----------------------------------------------------------- annotations
    def _normalize(self, kind: str, item: dict[str, Any], *, keep_id: bool) -> dict[str, Any]:
        obj = copy.deepcopy(item)
        if not keep_id or obj.get("id") is None:
            obj["id"] = self.next_id(kind)
        obj.setdefault("group", 0)
        obj.setdefault("source", "manual")
        obj["attributes"] = [
            {"spec_id": int(a["spec_id"]), "value": str(a["value"])} for a in obj.get("attributes") or []
        ]
        return obj

    def _validate(self, task_id: int, data: dict[str, Any], jobs: Sequence[dict[str, Any]]) -> None:
        """Reject unknown label/attribute ids as CVAT does; record silent mistakes.

        Messages follow cvat/apps/engine/annotation.py (_validate_label_for_existence,
        _validate_attribute_for_existence).
        """
        labels = {lb["id"]: lb for lb in self.task_labels(task_id)}
        task = self.tasks[task_id]
        for kind in ANNOTATION_KINDS:
            for obj in data.get(kind) or []:
                label = labels.get(obj.get("label_id"))
                if label is None:
                    raise bad_request([f"label_id `{obj.get('label_id')}` is invalid"])
                specs = {a["id"]: a for a in label["attributes"]}
                for attr in obj.get("attributes") or []:
                    if attr.get("spec_id") not in specs:
                        raise bad_request([f"spec_id `{attr.get('spec_id')}` is invalid"])
                    self._check_attribute_value(specs[attr["spec_id"]], attr.get("value"), obj)
                self._check_frame(task, jobs, kind, obj, label)

    def _check_frame(
        self,
        task: dict[str, Any],
        jobs: Sequence[dict[str, Any]],
        kind: str,
        obj: dict[str, Any],
        label: dict[str, Any],
    ) -> None:
        frame = obj.get("frame")
        if len(jobs) == 1 and frame not in self.job_frames(jobs[0]):
            self.violation(
                "frame_out_of_job",
                f"{kind[:-1]} on frame {frame} outside job {jobs[0]['id']} frames {self.job_frames(jobs[0])}",
                job_id=jobs[0]["id"],
                frame=frame,
            )
        if frame in task["deleted_frames"]:
            self.violation("deleted_frame", f"{kind[:-1]} on deleted frame {frame}", frame=frame)
        expected = "tag" if kind == "tags" else obj.get("type")
        if label["type"] not in ("any", expected):
            self.violation(
                "label_type_mismatch",
                f"{kind[:-1]} uses label {label['name']!r} of type {label['type']!r}",
                label_id=label["id"],
            )

    def _check_attribute_value(self, spec: dict[str, Any], value: Any, obj: dict[str, Any]) -> None:
        value = str(value)
        ok = True
        if spec["input_type"] == "number":
            lo, hi, step = (int(v) for v in spec["values"])
            try:
                num = int(value)
            except ValueError:
                ok = False
            else:
                ok = lo <= num <= hi and (num - lo) % step == 0
        elif spec["input_type"] == "checkbox":
            ok = value in ("true", "false")
        elif spec["input_type"] in ("select", "radio"):
            ok = value in spec["values"]
        if not ok:
            self.violation(
                "bad_attribute_value",
                f"value {value!r} for {spec['input_type']} attribute {spec['name']!r} "
                f"(values {spec['values']})",
                spec_id=spec["id"],
                frame=obj.get("frame"),
            )

    def _check_duplicates(self, job_id: int, tags: Sequence[dict[str, Any]]) -> None:
        stored = self.annotations[job_id]["tags"]
        seen = {(t["frame"], t["label_id"], t["source"]) for t in stored}
        for tag in tags:
            key = (tag["frame"], tag["label_id"], tag["source"])
            if key in seen:
                self.violation(
                    "duplicate_tag",
                    f"second {tag['source']} tag with label {tag['label_id']} on frame {tag['frame']}",
                    job_id=job_id,
                    frame=tag["frame"],
                )
            seen.add(key)

    def job_patch(
        self, job_id: int, action: str, data: dict[str, Any], *, validate: bool = True
    ) -> dict[str, Any]:
        """PATCH /api/jobs/{id}/annotations?action=create|update|delete."""
        with self.lock:
            job = self.jobs[job_id]
            if action not in ("create", "update", "delete"):
                raise bad_request(["Please specify a correct 'action' for the request"])
            if validate and action != "delete":
                self._validate(job["task_id"], data, [job])
            store = self.annotations[job_id]
            result: dict[str, Any] = {"version": 0, "tags": [], "shapes": [], "tracks": []}
            for kind in ANNOTATION_KINDS:
                items = data.get(kind) or []
                if action == "create":
                    new = [self._normalize(kind, i, keep_id=False) for i in items]
                    if kind == "tags":
                        self._check_duplicates(job_id, new)
                    store[kind].extend(new)
                elif action == "update":
                    new = [self._normalize(kind, i, keep_id=True) for i in items]
                    by_id = {o["id"]: n for n, o in enumerate(store[kind])}
                    for obj in new:
                        if obj["id"] in by_id:
                            store[kind][by_id[obj["id"]]] = obj
                        else:
                            store[kind].append(obj)
                else:
                    ids = {i.get("id") for i in items}
                    new = [o for o in store[kind] if o["id"] in ids]
                    store[kind] = [o for o in store[kind] if o["id"] not in ids]
                result[kind] = copy.deepcopy(new)
            if any(result[kind] for kind in ANNOTATION_KINDS):
                self.touch_job(job_id)
            return result

    def job_put(self, job_id: int, data: dict[str, Any]) -> dict[str, Any]:
        """PUT /api/jobs/{id}/annotations: replace everything in the job."""
        with self.lock:
            job = self.jobs[job_id]
            self._validate(job["task_id"], data, [job])
            self.job_clear(job_id)
            return self.job_patch(job_id, "create", data, validate=False)

    def job_clear(self, job_id: int) -> None:
        """DELETE /api/jobs/{id}/annotations."""
        with self.lock:
            if any(self.annotations[job_id][kind] for kind in ANNOTATION_KINDS):
                self.touch_job(job_id)
            self.annotations[job_id] = {kind: [] for kind in ANNOTATION_KINDS}

    def touch_job(self, job_id: int) -> None:
        """Bump the `updated_date` of a job, its task and its project, as CVAT does on every
        annotation write that creates, changes or deletes something (`JobAnnotation.
        _set_updated_date` in cvat/apps/engine/annotation.py); an empty write touches nothing."""
        with self.lock:
            job = self.jobs[job_id]
            ts = now()
            job["updated_date"] = ts
            task = self.tasks[job["task_id"]]
            task["updated_date"] = ts
            if task.get("project_id") is not None and task["project_id"] in self.projects:
                self.projects[task["project_id"]]["updated_date"] = ts

    def job_annotations(self, job_id: int) -> dict[str, Any]:
        """A copy of a job's annotations, as CVAT reads them back: a tag or shape lacking an
        attribute of its label gets it at its default value (`_extend_attributes` in
        cvat/apps/dataset_manager/task.py)."""
        with self.lock:
            data = {"version": 0, **copy.deepcopy(self.annotations[job_id])}
            for obj in data["tags"] + data["shapes"]:
                label = self.labels.get(obj["label_id"])
                present = {attribute["spec_id"] for attribute in obj["attributes"]}
                obj["attributes"] += [
                    {"spec_id": spec["id"], "value": spec["default_value"]}
                    for spec in (label["attributes"] if label else [])
                    if spec["id"] not in present
                ]
            return data

    def task_jobs(self, task_id: int, job_type: str | None = "annotation") -> list[dict[str, Any]]:
        """A task's jobs (of one type, or all), by start frame."""
        with self.lock:
            return sorted(
                (j for j in self.jobs.values() if j["task_id"] == task_id and job_type in (None, j["type"])),
                key=lambda j: (j["start_frame"], j["id"]),
            )

    def task_annotations(self, task_id: int) -> dict[str, Any]:
        """Task annotations: those of its `annotation` jobs (GT and replicas excluded).

        In the overlap of two jobs, a tag of the later job with the label of an earlier
        job's tag on the same frame is merged into it (TagManager in
        cvat/apps/engine/annotation.py matches tags by label, frame by frame, over the
        first `overlap` frames of each job), as the capture `video_step_overlap.json` shows.
        """
        with self.lock:
            overlap = self.tasks[task_id]["overlap"]
            merged: dict[str, Any] = {"version": 0, "tags": [], "shapes": [], "tracks": []}
            for job in self.task_jobs(task_id):
                for kind in ("shapes", "tracks"):
                    merged[kind].extend(copy.deepcopy(self.annotations[job["id"]][kind]))
                shared = range(job["start_frame"], job["start_frame"] + overlap)
                unmatched = [t for t in merged["tags"] if t["frame"] in shared]
                for tag in self.annotations[job["id"]]["tags"]:
                    key = (tag["frame"], tag["label_id"])
                    match = next((t for t in unmatched if (t["frame"], t["label_id"]) == key), None)
                    if tag["frame"] in shared and match is not None:
                        unmatched.remove(match)
                        continue
                    merged["tags"].append(copy.deepcopy(tag))
            return merged

    def task_patch(self, task_id: int, action: str, data: dict[str, Any]) -> dict[str, Any]:
        """PATCH /api/tasks/{id}/annotations: split by frame into the annotation jobs."""
        with self.lock:
            if action not in ("create", "update", "delete"):
                raise bad_request(["Please specify a correct 'action' for the request"])
            jobs = self.task_jobs(task_id)
            if action != "delete":
                self._validate(task_id, data, jobs)
            return self._task_split(task_id, action, data, jobs)

    def _task_split(
        self, task_id: int, action: str, data: dict[str, Any], jobs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Apply a task-level change job by job.

        Like TaskAnnotation in cvat/apps/engine/annotation.py, objects on frames that
        no annotation job covers are dropped without an error (recorded as violation).
        """
        result: dict[str, Any] = {"version": 0, "tags": [], "shapes": [], "tracks": []}
        if action != "delete":
            for kind in ANNOTATION_KINDS:
                for obj in data.get(kind) or []:
                    if not any(obj.get("frame") in self.job_frames(j) for j in jobs):
                        self.violation(
                            "frame_out_of_task",
                            f"{kind[:-1]} on frame {obj.get('frame')} is outside task "
                            f"{task_id} and was dropped",
                            task_id=task_id,
                        )
        for job in jobs:
            frames = set(self.job_frames(job))
            if action == "delete":
                part = {kind: list(data.get(kind) or []) for kind in ANNOTATION_KINDS}
            else:
                part = {
                    kind: [o for o in data.get(kind) or [] if o.get("frame") in frames]
                    for kind in ANNOTATION_KINDS
                }
            done = self.job_patch(job["id"], action, part, validate=False)
            for kind in ANNOTATION_KINDS:
                result[kind].extend(done[kind])
        return result

    def task_put(self, task_id: int, data: dict[str, Any]) -> dict[str, Any]:
        """PUT /api/tasks/{id}/annotations: clear the annotation jobs, then create."""
        with self.lock:
            jobs = self.task_jobs(task_id)
            self._validate(task_id, data, jobs)
            for job in jobs:
                self.job_clear(job["id"])
            return self._task_split(task_id, "create", data, jobs)

    def task_clear(self, task_id: int) -> None:
        """DELETE /api/tasks/{id}/annotations."""
        with self.lock:
            for job in self.task_jobs(task_id):
                self.job_clear(job["id"])

    # ---------------------------------------------------------------- issues
    def add_issue(
        self,
        job_id: int,
        frame: int,
        position: Sequence[float],
        message: str,
        owner_id: int,
        *,
        assignee_id: int | None = None,
        resolved: bool = False,
    ) -> dict[str, Any]:
        """Create an issue; its message becomes the first comment."""
        with self.lock:
            job = self.jobs[job_id]
            if frame not in self.job_frames(job):
                self.violation(
                    "issue_frame_out_of_job",
                    f"issue on frame {frame} outside job {job_id}",
                    job_id=job_id,
                    frame=frame,
                )
            iid = self.next_id("issue")
            ts = now()
            self.issues[iid] = {
                "id": iid,
                "job_id": job_id,
                "frame": frame,
                "position": [float(p) for p in position],
                "owner_id": owner_id,
                "assignee_id": assignee_id,
                "resolved": resolved,
                "created_date": ts,
                "updated_date": ts,
            }
            self.add_comment(iid, message, owner_id)
            return self.issues[iid]

    def add_comment(self, issue_id: int, message: str, owner_id: int) -> dict[str, Any]:
        """Add a comment to an issue."""
        with self.lock:
            cid = self.next_id("comment")
            ts = now()
            self.comments[cid] = {
                "id": cid,
                "issue_id": issue_id,
                "owner_id": owner_id,
                "message": message,
                "created_date": ts,
                "updated_date": ts,
            }
            return self.comments[cid]

    def delete_issue(self, issue_id: int) -> None:
        """Delete an issue and its comments."""
        with self.lock:
            del self.issues[issue_id]
            for cid in [c for c, v in self.comments.items() if v["issue_id"] == issue_id]:
                del self.comments[cid]

    def delete_task(self, task_id: int) -> None:
        """Delete a task with its jobs, their annotations, issues and comments (as CVAT does)."""
        with self.lock:
            del self.tasks[task_id]
            for job_id in [j for j, job in self.jobs.items() if job["task_id"] == task_id]:
                del self.jobs[job_id]
                self.annotations.pop(job_id, None)
                for issue_id in [i for i, issue in self.issues.items() if issue["job_id"] == job_id]:
                    self.delete_issue(issue_id)
