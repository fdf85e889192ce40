"""Project webhooks as CVAT 2.73 has them: the /api/webhooks endpoints, and signed deliveries.

Deliveries are shaped as the real ones in tests/assets/cvat-2.73/webhooks/: the body is
``json.dumps(payload)`` (Python's default separators), signed in ``X-Signature-256`` as
``sha256=`` plus the hex HMAC-SHA256 of those bytes under the webhook's secret, and sent
with CVAT's User-Agent and no event header (the event is in the body). They go out from
one background thread, in the order the events happened, so the API answer is not
delayed; every attempt is recorded as a delivery that can be listed and redelivered.

Events sent: ``create:task`` (the task without data), ``completed:request[create:task]``
(once its data is in place) and ``update:job`` (a change of stage, state or status).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from .api import Api, Reply
from .errors import ApiError, bad_request, forbidden, not_found
from .state import State, now

USER_AGENT = "CVAT/2.73.0 python-requests/2.33.1"
PROJECT_EVENTS = (
    "completed:request[calculate:quality]",
    "completed:request[create:task]",
    "completed:request[export:annotations]",
    "completed:request[export:backup]",
    "completed:request[export:dataset]",
    "completed:request[merge:job]",
    "completed:request[merge:task]",
    "create:comment",
    "create:issue",
    "create:job",
    "create:task",
    "delete:comment",
    "delete:issue",
    "delete:job",
    "delete:project",
    "delete:task",
    "update:comment",
    "update:issue",
    "update:job",
    "update:project",
    "update:task",
)
"""Events a project webhook may subscribe to (organization events are not offered)."""
_TASK_DATA_FIELDS = (
    "data_chunk_size",
    "data_original_chunk_type",
    "data_compressed_chunk_type",
    "data_cloud_storage_id",
    "size",
    "image_quality",
)


class Webhooks:
    """Webhook records and their deliveries, over the server's `State`."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.state: State = api.state
        self.ser = api.ser
        self.base = api.base
        self.webhooks: dict[int, dict[str, Any]] = {}
        self.deliveries: dict[int, dict[str, Any]] = {}
        self._outbox: queue.Queue[int] = queue.Queue()
        self._idle = threading.Condition()
        self._busy = 0
        self._sender = threading.Thread(target=self._send_loop, name="webhook-sender", daemon=True)
        self._sender.start()
        self.state.listeners.append(self.on_event)
        api.add_routes(self.routes())

    # ------------------------------------------------------------------ REST
    def routes(self) -> list[tuple[str, str, Any, bool]]:
        return [
            ("GET", r"/api/webhooks", self.list, False),
            ("POST", r"/api/webhooks", self.create, False),
            ("GET", r"/api/webhooks/(?P<id>\d+)", self.retrieve, False),
            ("PATCH", r"/api/webhooks/(?P<id>\d+)", self.partial_update, False),
            ("DELETE", r"/api/webhooks/(?P<id>\d+)", self.destroy, False),
            ("GET", r"/api/webhooks/(?P<id>\d+)/deliveries", self.list_deliveries, False),
            (
                "GET",
                r"/api/webhooks/(?P<id>\d+)/deliveries/(?P<delivery_id>\d+)",
                self.retrieve_delivery,
                False,
            ),
            (
                "POST",
                r"/api/webhooks/(?P<id>\d+)/deliveries/(?P<delivery_id>\d+)/redelivery",
                self.redeliver,
                False,
            ),
        ]

    def render(self, webhook: dict[str, Any]) -> dict[str, Any]:
        """WebhookRead; the secret is never shown. last_status and last_delivery_date are
        absent until the first delivery (DRF skips a read-only field whose source is None)."""
        body = {
            "id": webhook["id"],
            "url": f"{self.base}/api/webhooks/{webhook['id']}",
            "target_url": webhook["target_url"],
            "description": webhook["description"],
            "type": webhook["type"],
            "content_type": webhook["content_type"],
            "is_active": webhook["is_active"],
            "enable_ssl": webhook["enable_ssl"],
            "created_date": webhook["created_date"],
            "updated_date": webhook["updated_date"],
            "owner": self.ser.basic_user(webhook["owner_id"]),
            "project_id": webhook["project_id"],
            "organization": None,
            "events": sorted(webhook["events"]),
        }
        last = self._last_delivery(webhook["id"])
        if last is not None:
            if last["status_code"] is not None:
                body["last_status"] = last["status_code"]
            body["last_delivery_date"] = last["updated_date"]
        return body

    def _last_delivery(self, webhook_id: int) -> dict[str, Any] | None:
        mine = [d for d in self.deliveries.values() if d["webhook_id"] == webhook_id]
        return max(mine, key=lambda d: d["id"]) if mine else None

    def render_delivery(self, delivery: dict[str, Any]) -> dict[str, Any]:
        """WebhookDeliveryRead."""
        return {
            key: copy.deepcopy(delivery[key])
            for key in (
                "id",
                "webhook_id",
                "event",
                "status_code",
                "redelivery",
                "created_date",
                "updated_date",
                "changed_fields",
                "request",
                "response",
            )
        }

    def _may_manage(self, user: dict[str, Any], project_id: int) -> dict[str, Any]:
        """Project webhooks are for the project's owner (and admins)."""
        project = self.state.get_visible(user, "project", project_id)
        if not (self.state.is_admin(user) or user["id"] == project["owner_id"]):
            raise forbidden()
        return project

    def _get(self, ctx: Any, webhook_id: int) -> dict[str, Any]:
        webhook = self.webhooks.get(webhook_id)
        if webhook is None:
            raise not_found("Webhook")
        self._may_manage(ctx.user, webhook["project_id"])
        return webhook

    def list(self, ctx: Any) -> Reply:
        """GET /api/webhooks (filters: project_id, type, target_url, owner)."""
        with self.state.lock:
            items = []
            for webhook in self.webhooks.values():
                try:
                    self._may_manage(ctx.user, webhook["project_id"])
                except ApiError:
                    continue
                items.append(webhook)
            filters = {
                "project_id": lambda w: w["project_id"],
                "type": lambda w: w["type"],
                "target_url": lambda w: w["target_url"],
                "owner": lambda w: self.state.users[w["owner_id"]]["username"],
            }
            for name, getter in filters.items():
                if name in ctx.query:
                    items = [w for w in items if str(getter(w)) == ctx.query[name]]
            items = sorted(items, key=lambda w: w["id"], reverse=True)
            return self.api.paginate(ctx, items, self.render)

    def create(self, ctx: Any) -> Any:
        """POST /api/webhooks: 201 WebhookRead."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        missing = {k: ["This field is required."] for k in ("target_url", "type", "events") if k not in body}
        if missing:
            raise bad_request(missing)
        if body["type"] != "project":
            raise bad_request({"type": [f'"{body["type"]}" is not a valid choice.']})
        project_id = body.get("project_id")
        if not isinstance(project_id, int):
            raise bad_request({"project_id": ["This field is required for a project webhook."]})
        fields = self._validated(body)
        with self.state.lock:
            self._may_manage(ctx.user, project_id)
            webhook_id = self.state.next_id("webhook")
            ts = now()
            webhook = {
                "id": webhook_id,
                "type": "project",
                "project_id": project_id,
                "owner_id": ctx.user["id"],
                "description": "",
                "content_type": "application/json",
                "secret": "",
                "is_active": True,
                "enable_ssl": True,
                "created_date": ts,
                "updated_date": ts,
                **fields,
            }
            self.webhooks[webhook_id] = webhook
            return Reply(status=201, body=self.render(webhook))

    def _validated(self, body: dict[str, Any]) -> dict[str, Any]:
        """The writable fields of a (Patched)WebhookWriteRequest, checked as CVAT checks them."""
        fields: dict[str, Any] = {}
        errors: dict[str, list[str]] = {}
        if "target_url" in body:
            url = body["target_url"]
            parts = urlsplit(url) if isinstance(url, str) else None
            if not parts or parts.scheme not in ("http", "https") or not parts.netloc:
                errors["target_url"] = ["Enter a valid URL."]
            fields["target_url"] = url
        if "events" in body:
            events = body["events"]
            bad = [e for e in events if e not in PROJECT_EVENTS] if isinstance(events, list) else [events]
            if bad:
                errors["events"] = [f"Events {bad} are not available for the project webhook"]
            fields["events"] = sorted(set(events)) if not bad else []
        if "secret" in body:
            if not isinstance(body["secret"], str) or len(body["secret"]) > 64:
                errors["secret"] = ["Ensure this field has no more than 64 characters."]
            fields["secret"] = body["secret"]
        if "content_type" in body and body["content_type"] != "application/json":
            errors["content_type"] = [f'"{body["content_type"]}" is not a valid choice.']
        for key in ("description", "is_active", "enable_ssl", "content_type"):
            if key in body:
                fields[key] = body[key]
        if errors:
            raise bad_request(errors)
        return fields

    def retrieve(self, ctx: Any, id: int) -> Reply:
        """GET /api/webhooks/{id}."""
        with self.state.lock:
            return Reply(body=self.render(self._get(ctx, id)))

    def partial_update(self, ctx: Any, id: int) -> Any:
        """PATCH /api/webhooks/{id}."""
        body = ctx.body if isinstance(ctx.body, dict) else {}
        fields = self._validated(body)
        with self.state.lock:
            webhook = self._get(ctx, id)
            webhook.update(fields)
            webhook["updated_date"] = now()
            return Reply(body=self.render(webhook))

    def destroy(self, ctx: Any, id: int) -> Any:
        """DELETE /api/webhooks/{id}: 204; its deliveries go too."""
        with self.state.lock:
            self._get(ctx, id)
            del self.webhooks[id]
            for delivery_id in [d for d, v in self.deliveries.items() if v["webhook_id"] == id]:
                del self.deliveries[delivery_id]
            return Reply(status=204)

    def list_deliveries(self, ctx: Any, id: int) -> Reply:
        """GET /api/webhooks/{id}/deliveries, newest first."""
        with self.state.lock:
            self._get(ctx, id)
            items = sorted(
                (d for d in self.deliveries.values() if d["webhook_id"] == id),
                key=lambda d: d["id"],
                reverse=True,
            )
            return self.api.paginate(ctx, items, self.render_delivery)

    def retrieve_delivery(self, ctx: Any, id: int, delivery_id: int) -> Reply:
        """GET /api/webhooks/{id}/deliveries/{delivery_id}."""
        with self.state.lock:
            self._get(ctx, id)
            delivery = self.deliveries.get(delivery_id)
            if delivery is None or delivery["webhook_id"] != id:
                raise not_found("WebhookDelivery")
            return Reply(body=self.render_delivery(delivery))

    def redeliver(self, ctx: Any, id: int, delivery_id: int) -> Any:
        """POST .../deliveries/{delivery_id}/redelivery: 200, no body; the same payload again."""
        with self.state.lock:
            webhook = self._get(ctx, id)
            delivery = self.deliveries.get(delivery_id)
            if delivery is None or delivery["webhook_id"] != id:
                raise not_found("WebhookDelivery")
            self._queue(webhook, delivery["event"], delivery["request"]["data"], redelivery=True)
            return Reply(body=b"")

    # ---------------------------------------------------------------- events
    def on_event(self, event: str, **details: Any) -> None:
        """Queue a delivery of `event` to each active project webhook subscribed to it.

        Called by `State.notify` under the state lock, so that the payload shows the
        objects as they are at the moment of the event.
        """
        with self.state.lock:
            project_id = details["project_id"]
            targets = [
                w
                for w in sorted(self.webhooks.values(), key=lambda w: w["id"])
                if w["project_id"] == project_id and w["is_active"] and event in w["events"]
            ]
            for webhook in targets:
                payload = self._payload(event, webhook["id"], details)
                self._queue(webhook, event, payload, redelivery=False, changed=details.get("changed", ()))

    def _payload(self, event: str, webhook_id: int, details: dict[str, Any]) -> dict[str, Any]:
        sender = self.ser.basic_user(details["sender_id"])
        if event == "create:task":
            return {
                "event": event,
                "webhook_id": webhook_id,
                "task": self._task_without_data(details["task_id"]),
                "sender": sender,
            }
        if event == "completed:request[create:task]":
            return {
                "event": event,
                "request": self._finished_request(details["task_id"], details["sender_id"]),
                "webhook_id": webhook_id,
            }
        if event == "update:job":
            job = self.state.jobs[details["job_id"]]
            before = details["before"]
            after = {
                "updated_date": job["updated_date"],
                **{k: details["after"][k] for k in details["changed"]},
            }
            return {
                "event": event,
                "webhook_id": webhook_id,
                "job": self.ser.job(job),
                "sender": sender,
                "before_update": {
                    "updated_date": before["updated_date"],
                    **{k: before[k] for k in details["changed"]},
                },
                "changes": {key: {"from": before[key], "to": value} for key, value in after.items()},
            }
        raise ValueError(f"no payload for {event}")

    def _task_without_data(self, task_id: int) -> dict[str, Any]:
        """The task as `create:task` shows it: created, before any data was attached."""
        task = {
            k: v for k, v in self.ser.task(self.state.tasks[task_id]).items() if k not in _TASK_DATA_FIELDS
        }
        created = self.state.tasks[task_id]["created_date"]
        task.update(
            updated_date=created,
            overlap=None,
            segment_size=0,
            status="annotation",
            data=None,
            dimension="",
            mode="",
            media_type="",
            jobs={"count": 0, "completed": 0, "validation": 0, "url": task["jobs"]["url"]},
            validation_mode=None,
            consensus_enabled=False,
        )
        return task

    def _finished_request(self, task_id: int, owner_id: int) -> dict[str, Any]:
        task = self.state.tasks[task_id]
        owner = self.state.users[owner_id]
        finished = datetime.now(UTC)
        stamp = "%Y-%m-%dT%H:%M:%S.%fZ"
        return {
            "status": "finished",
            "message": "",
            "id": f"action=create&target=task&target_id={task_id}",
            "operation": {
                "type": "create:task",
                "target": "task",
                "project_id": task["project_id"],
                "task_id": task_id,
                "job_id": None,
                "org_id": None,
                "format": None,
                "lightweight": None,
            },
            "progress": 0.0,
            "created_date": task["created_date"],
            "started_date": task["created_date"],
            "finished_date": finished.strftime(stamp),
            "expiry_date": (finished + timedelta(seconds=500)).strftime(stamp),
            "owner": {"id": owner["id"], "username": owner["username"]},
            "result_url": None,
            "result_id": None,
        }

    # -------------------------------------------------------------- delivery
    def _queue(
        self,
        webhook: dict[str, Any],
        event: str,
        payload: dict[str, Any],
        *,
        redelivery: bool,
        changed: Any = (),
    ) -> None:
        delivery_id = self.state.next_id("webhook_delivery")
        ts = now()
        self.deliveries[delivery_id] = {
            "id": delivery_id,
            "webhook_id": webhook["id"],
            "event": event,
            "status_code": None,
            "redelivery": redelivery,
            "created_date": ts,
            "updated_date": ts,
            "changed_fields": ",".join(changed),
            "request": {"data": copy.deepcopy(payload)},
            "response": None,
            "sent": False,
        }
        with self._idle:
            self._busy += 1
        self._outbox.put(delivery_id)

    def _send_loop(self) -> None:
        while True:
            delivery_id = self._outbox.get()
            try:
                self._send(delivery_id)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _send(self, delivery_id: int) -> None:
        with self.state.lock:
            delivery = self.deliveries.get(delivery_id)
            webhook = self.webhooks.get(delivery["webhook_id"]) if delivery else None
            if delivery is None or webhook is None:
                return
            body = json.dumps(delivery["request"]["data"]).encode()
            headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
            if webhook["secret"]:
                digest = hmac.new(webhook["secret"].encode(), body, hashlib.sha256).hexdigest()
                headers["X-Signature-256"] = f"sha256={digest}"
            url = webhook["target_url"]
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        status: int | None
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, text = answer.status, answer.read(4096).decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read(4096).decode(errors="replace")
        except (OSError, ValueError) as exc:
            status, text = None, str(exc)
        with self.state.lock:
            delivery.update(status_code=status, response=text, updated_date=now(), sent=True)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued delivery was attempted; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True
