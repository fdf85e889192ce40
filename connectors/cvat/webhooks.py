"""CVAT webhooks: what a delivery asks prelabel to do, and the project webhook that sends them.

Two events matter (see tests/assets/cvat-2.73/webhooks/ for real deliveries):

- ``completed:request[create:task]``: a task's data is in place, so its jobs can be
  pre-labeled. (``create:task`` arrives earlier, before the task has data; it is ignored.)
- ``update:job`` moving a job to stage ``acceptance`` or state ``completed``: the reviewers
  are done, so `review sync` reads the job's outcomes back for calibration.

Each delivery that needs work yields a `WorkItem` and a key naming the event it reports,
so that a redelivery of the same event (a retry, or "redeliver" in CVAT's UI) is known.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from cvat_sdk import models

from connectors.cvat.session import CvatSession

EVENTS = ("completed:request[create:task]", "update:job")
"""Exactly the events `prelabel serve` acts on; `install_webhook` subscribes to these."""
DESCRIPTION = "prelabel: pre-label new tasks, sync reviewed jobs"
"""Marks the webhook `install_webhook` manages (one per project)."""


@dataclass(frozen=True)
class WorkItem:
    """One unit of work a delivery asks for: label a task's jobs, or sync one job."""

    kind: Literal["label_task", "sync_job"]
    project_id: int | None
    task_id: int | None
    job_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkItem:
        return cls(data["kind"], data.get("project_id"), data.get("task_id"), data.get("job_id"))


@dataclass(frozen=True)
class Event:
    """What a delivery reports: its event name and the objects it names, for the logs.

    `item` is the work it asks for, with the `key` that names this very event (the same
    for every redelivery of it); None with the `reason` when it asks for nothing.
    """

    name: str
    project_id: int | None = None
    task_id: int | None = None
    job_id: int | None = None
    item: WorkItem | None = None
    key: str | None = None
    reason: str = ""

    def fields(self) -> dict[str, Any]:
        """The event and the objects it names, as log fields."""
        found = {"project": self.project_id, "task": self.task_id, "job": self.job_id}
        return {"event": self.name, **{k: v for k, v in found.items() if v is not None}}


def read_event(body: Any) -> Event:
    """Interpret a delivery's parsed JSON body (never raises on odd shapes: it ignores them)."""
    if not isinstance(body, dict) or not isinstance(body.get("event"), str):
        return Event(name="?", reason="not a CVAT webhook delivery (no 'event')")
    name = body["event"]
    if name == "completed:request[create:task]":
        return _task_created(name, body.get("request"))
    if name == "update:job":
        return _job_updated(name, body.get("job"), body.get("changes"))
    return Event(name=name, reason="an event prelabel does not act on")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _task_created(name: str, request: Any) -> Event:
    request = request if isinstance(request, dict) else {}
    operation = request.get("operation") if isinstance(request.get("operation"), dict) else {}
    project_id, task_id = _int(operation.get("project_id")), _int(operation.get("task_id"))
    event = Event(name=name, project_id=project_id, task_id=task_id)
    if task_id is None:
        return _ignored(event, "the request names no task")
    if request.get("status") != "finished":
        return _ignored(event, f"the task's creation {request.get('status') or 'did not finish'}")
    item = WorkItem("label_task", project_id, task_id)
    return _work(event, item, f"{name}:task={task_id}")


def _job_updated(name: str, job: Any, changes: Any) -> Event:
    job = job if isinstance(job, dict) else {}
    changes = changes if isinstance(changes, dict) else {}
    event = Event(
        name=name,
        project_id=_int(job.get("project_id")),
        task_id=_int(job.get("task_id")),
        job_id=_int(job.get("id")),
    )
    if event.job_id is None:
        return _ignored(event, "the delivery names no job")
    moved = [
        f"{field}={change.get('to')}"
        for field, wanted in (("stage", "acceptance"), ("state", "completed"))
        if isinstance(change := changes.get(field), dict) and change.get("to") == wanted
    ]
    if not moved:
        return _ignored(event, "the job did not move to stage acceptance or state completed")
    item = WorkItem("sync_job", event.project_id, event.task_id, event.job_id)
    return _work(event, item, f"{name}:job={event.job_id}:{','.join(moved)}@{job.get('updated_date')}")


def _ignored(event: Event, reason: str) -> Event:
    return Event(event.name, event.project_id, event.task_id, event.job_id, reason=reason)


def _work(event: Event, item: WorkItem, key: str) -> Event:
    return Event(event.name, event.project_id, event.task_id, event.job_id, item=item, key=key)


# ------------------------------------------------------------------ the webhook in CVAT
@dataclass(frozen=True)
class Installed:
    webhook_id: int
    created: bool
    """False: an existing prelabel webhook of the project was updated in place."""


def install_webhook(session: CvatSession, project_id: int, url: str, secret: str) -> Installed:
    """Create the project's prelabel webhook, or update it in place: `EVENTS`, `url` and `secret`.

    The webhook is found by its description (`DESCRIPTION`) or its target URL, so running
    this again, even with another URL, leaves the project with one prelabel webhook.
    """
    where = f"project {project_id}"
    session.call(f"reading {where}", lambda: session.client.projects.retrieve(project_id))
    fields = {
        "target_url": url,
        "description": DESCRIPTION,
        "content_type": models.WebhookContentType("application/json"),
        "secret": secret,
        "is_active": True,
        "enable_ssl": True,
        "events": [models.EventsEnum(event) for event in EVENTS],
    }
    api = session.client.api_client.webhooks_api
    ours = _ours(session, project_id, url)
    if ours:
        webhook_id = ours[0].id
        session.call(
            f"updating webhook {webhook_id} of {where}",
            lambda: api.partial_update(
                webhook_id, patched_webhook_write_request=models.PatchedWebhookWriteRequest(**fields)
            ),
        )
        return Installed(webhook_id, created=False)
    # A create is not retried as it is: a lost answer could leave two webhooks.
    webhook_id = session.call(
        f"creating the webhook of {where}",
        lambda: _create_once(session, project_id, url, fields),
    )
    return Installed(webhook_id, created=True)


def _create_once(session: CvatSession, project_id: int, url: str, fields: dict) -> int:
    found = _ours(session, project_id, url)
    if found:  # an earlier attempt went through
        return found[0].id
    request = models.WebhookWriteRequest(type=models.WebhookType("project"), project_id=project_id, **fields)
    created, _ = session.client.api_client.webhooks_api.create(request)
    return created.id


def remove_webhook(session: CvatSession, project_id: int) -> list[int]:
    """Delete the project's prelabel webhooks (found as `install_webhook` finds them); their ids."""
    removed = []
    for webhook in _ours(session, project_id, None):
        session.call(
            f"deleting webhook {webhook.id} of project {project_id}",
            lambda webhook=webhook: session.client.api_client.webhooks_api.destroy(webhook.id),
        )
        removed.append(webhook.id)
    return removed


def _ours(session: CvatSession, project_id: int, url: str | None) -> list:
    webhooks = session.list_all(
        f"listing the webhooks of project {project_id}",
        session.client.api_client.webhooks_api.list_endpoint,
        project_id=project_id,
        type="project",
    )
    return sorted(
        (w for w in webhooks if w.description == DESCRIPTION or (url is not None and w.target_url == url)),
        key=lambda w: w.id,
    )
