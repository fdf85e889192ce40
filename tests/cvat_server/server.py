"""`CvatTestServer`: start/stop, seeding, inspection and fault hooks in one facade."""

from __future__ import annotations

import copy
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from PIL import Image

from . import media
from .access import Access
from .api import Api
from .app import App, CvatHTTPServer, LoggedRequest
from .faults import Fault, FaultInjector, FaultKind
from .latency import Latency, LatencyProfile
from .schema import SchemaViolation
from .state import State
from .webhooks import Webhooks

ImageInput = tuple[str, bytes]
VideoInput = bytes | Sequence[Image.Image] | Sequence[bytes]


class CvatTestServer:
    """A CVAT 2.73-compatible REST server on a free loopback port, for tests.

    Use as a context manager (or call start()/stop()). Seed it with add_* methods,
    point cvat-sdk at `url`, then inspect stored objects, the request log,
    `write_count` and `violations`.

    With `check_answers` (the default) every JSON answer is validated against CVAT 2.73's
    OpenAPI schema; a mismatch is recorded in `answer_violations` (and `violations`), and
    leaving the `with` block raises `SchemaViolation` if any was recorded.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        tls: tuple[str, str] | None = None,
        check_answers: bool = True,
        latency: LatencyProfile | str = "none",
        chunk_builders: int = 2,
        builds_use_cpu: bool = False,
        calls_use_cpu: bool = False,
    ) -> None:
        """`tls` is (certificate file, key file): serve HTTPS with that certificate.

        `check_answers=False` skips the schema check of every JSON answer (benchmarks).
        `latency` makes the server as slow as a real CVAT: a profile, or its name, optionally
        scaled (``"cvat-2.73-2core*0.1"``); see `latency.py`. At most `chunk_builders`
        chunks are built at once, and with `builds_use_cpu` a build spends its modelled time
        on the CPU, as a real server's does; `calls_use_cpu` does the same for every other
        call (an upper bound). The default, ``"none"``, adds no delay.
        """
        self._tls = tls
        self.state = State()
        self.faults = FaultInjector(seed)
        self.latency = Latency(
            latency, chunk_builders=chunk_builders, builds_use_cpu=builds_use_cpu, calls_use_cpu=calls_use_cpu
        )
        self._app = App(self.state, self.faults, self.latency, check_answers=check_answers)
        self._host, self._port = host, port
        self._httpd: CvatHTTPServer | None = None
        self.webhooks: Webhooks | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- lifecycle
    def start(self) -> CvatTestServer:
        """Bind and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._httpd = CvatHTTPServer(self._app, self._host, self._port)
        if self._tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self._tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._app.api = Api(self.state, self.url, self.latency)
        self.webhooks = Webhooks(self._app.api)
        Access(self._app.api)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> CvatTestServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop()
        if exc_type is None:  # an exception already on its way is the more useful report
            self.assert_answers_valid()

    def assert_answers_valid(self) -> None:
        """Raise `SchemaViolation` listing the answers that broke CVAT's schema, if any."""
        found = self.answer_violations
        if found:
            lines = [f"{v['method']} {v['path']} -> {v['status']}: {v['message']}" for v in found]
            raise SchemaViolation(
                f"{len(found)} answer(s) of the test server do not match CVAT 2.73's schema:\n"
                + "\n".join(lines[:20])
            )

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"{'https' if self._tls else 'http'}://{host}:{port}"

    # ------------------------------------------------------------- seeding
    def add_user(self, username: str, password: str, *, is_superuser: bool = False) -> int:
        """Create a user; returns its id."""
        return self.state.add_user(username, password, is_superuser=is_superuser)

    def add_token(self, username: str, token: str, *, read_only: bool = False) -> None:
        """Give a user a personal access token (sent as `Authorization: Bearer`); a
        `read_only` one (CVAT's default when the write box is not ticked) may only read."""
        self.state.add_token(username, token, read_only=read_only)

    def revoke_token(self, token: str) -> None:
        """Revoke a personal access token or a legacy login key."""
        self.state.revoke_token(token)

    def add_project(
        self,
        name: str,
        *,
        owner: str,
        labels: Sequence[Mapping[str, Any]] = (),
        organization: str | None = None,
    ) -> int:
        """Create a project with labels like {"name", "type", "attributes": [...]}, in the
        organization with this slug (its tasks and jobs too) or the personal workspace."""
        return self.state.add_project(
            name, owner=owner, labels=[dict(lb) for lb in labels], organization=organization
        )

    def add_organization(self, slug: str, *, owner: str, name: str = "") -> int:
        """Create an organization owned by `owner` (an active member with role owner)."""
        return self.state.add_organization(slug, owner=owner, name=name)

    def add_member(self, slug: str, username: str, role: str = "worker", *, is_active: bool = True) -> int:
        """Add a user to an organization: owner, maintainer, supervisor or worker."""
        return self.state.add_member(slug, username, role, is_active=is_active)

    def add_label(self, project_id: int, label: Mapping[str, Any]) -> int:
        """Add one label to a project; returns its id."""
        return self.state.upsert_label(project_id, dict(label))["id"]

    def assign(self, kind: Literal["project", "task", "job"], obj_id: int, username: str | None) -> None:
        """Set the assignee of a project, task or job (None clears it)."""
        with self.state.lock:
            table = {
                "project": self.state.projects,
                "task": self.state.tasks,
                "job": self.state.jobs,
            }[kind]
            uid = self.state.user_by_name(username)["id"] if username else None
            table[obj_id]["assignee_id"] = uid

    def add_image_task(
        self,
        project_id: int,
        images: Sequence[ImageInput],
        *,
        name: str,
        segment_size: int,
        chunk_size: int = 72,
        deleted_frames: Iterable[int] = (),
        owner: str | None = None,
        image_quality: int = 70,
        start_frame: int = 0,
        stop_frame: int | None = None,
        frame_step: int = 1,
        overlap: int | None = None,
    ) -> int:
        """An image task from (filename, image bytes) pairs; jobs split by segment_size.

        `start_frame`, `stop_frame` and `frame_step` filter the upload as CVAT's data
        options do (the task keeps images start, start + step, ... up to stop); `overlap`
        as CVAT's task option (default 0 for images).
        """
        images = list(images)[start_frame : None if stop_frame is None else stop_frame + 1 : frame_step]
        frames = [media.image_frame(n, data) for n, data in images]
        return self.state.add_task(
            project_id,
            frames,
            name=name,
            owner=owner,
            segment_size=segment_size,
            chunk_size=chunk_size,
            media_type="image",
            image_quality=image_quality,
            deleted_frames=deleted_frames,
            data_start=start_frame,
            frame_step=frame_step,
            overlap=overlap,
        )

    def add_point_cloud_task(
        self,
        project_id: int,
        clouds: Sequence[tuple[str, bytes]],
        *,
        name: str,
        segment_size: int,
        chunk_size: int = 72,
        owner: str | None = None,
    ) -> int:
        """A 3D task (`dimension` "3d") from (filename, ``.pcd`` bytes) pairs; its chunks hold
        the files as they are. CVAT keeps a project's tasks all 2D or all 3D."""
        frames = [media.point_cloud_frame(n, data) for n, data in clouds]
        return self.state.add_task(
            project_id,
            frames,
            name=name,
            owner=owner,
            segment_size=segment_size,
            chunk_size=chunk_size,
            media_type="image",
            image_quality=70,
            dimension="3d",
        )

    def add_video_task(
        self,
        project_id: int,
        video: VideoInput,
        *,
        name: str,
        segment_size: int = 0,
        chunk_size: int = 36,
        fps: int = 25,
        filename: str = "clip.mp4",
        deleted_frames: Iterable[int] = (),
        owner: str | None = None,
        image_quality: int = 90,
        start_frame: int = 0,
        stop_frame: int | None = None,
        frame_step: int = 1,
        overlap: int | None = None,
        use_zip_chunks: bool = False,
    ) -> int:
        """A video task from mp4 bytes or a list of frames (PIL images or JPEG bytes).

        Chunks are H.264 mp4 segments (`data_compressed_chunk_type` "video"); with
        `use_zip_chunks`, as in CVAT, the compressed ones are zips of JPEGs instead.
        segment_size 0 means one job for the whole video. `start_frame`, `stop_frame`
        and `frame_step` filter the video as CVAT's data options do; jobs overlap by
        `overlap` frames, 5 by default as in CVAT (at most half the segment size).
        """
        if isinstance(video, bytes | bytearray):
            images = media.decode_video(bytes(video))
        else:
            images = [media.image_frame(filename, f).image if isinstance(f, bytes) else f for f in video]
        images = images[start_frame : None if stop_frame is None else stop_frame + 1 : frame_step]
        frames = [media.pil_frame(filename, im) for im in images]
        return self.state.add_task(
            project_id,
            frames,
            name=name,
            owner=owner,
            segment_size=segment_size,
            chunk_size=chunk_size,
            media_type="video",
            image_quality=image_quality,
            deleted_frames=deleted_frames,
            fps=fps,
            data_start=start_frame,
            frame_step=frame_step,
            overlap=overlap,
            use_zip_chunks=use_zip_chunks,
        )

    def add_ground_truth_job(self, task_id: int, frames: Sequence[int]) -> int:
        """Add a `ground_truth` job over the given task frames; returns its id."""
        return self.state.add_ground_truth_job(task_id, frames)

    def add_consensus_replicas(self, job_id: int, count: int = 1) -> list[int]:
        """Add `consensus_replica` jobs under an annotation job; returns their ids."""
        return self.state.add_consensus_replicas(job_id, count)

    def add_tag(
        self,
        job_id: int,
        frame: int,
        label_name: str,
        *,
        source: str = "manual",
        attributes: Mapping[str, Any] | None = None,
    ) -> int:
        """Plant a tag (as a human would) with attribute values by name; returns its id."""
        with self.state.lock:
            job = self.state.jobs[job_id]
            label = self.label(job["task_id"], label_name)
            specs = {a["name"]: a["id"] for a in label["attributes"]}
            tag = {
                "frame": frame,
                "label_id": label["id"],
                "source": source,
                "attributes": [{"spec_id": specs[k], "value": str(v)} for k, v in (attributes or {}).items()],
            }
            done = self.state.job_patch(job_id, "create", {"tags": [tag]}, validate=False)
            return done["tags"][0]["id"]

    def delete_task(self, task_id: int) -> None:
        """Delete a task as DELETE /api/tasks/{id} does: its jobs, annotations and issues go."""
        self.state.delete_task(task_id)

    # ---------------------------------------------------------- inspection
    def label(self, task_id: int, name: str) -> dict[str, Any]:
        """A task's label by name (a copy)."""
        for lb in self.state.task_labels(task_id):
            if lb["name"] == name:
                return copy.deepcopy(lb)
        raise KeyError(name)

    def labels(self, project_id: int) -> list[dict[str, Any]]:
        """A project's labels with their attributes (copies)."""
        with self.state.lock:
            return copy.deepcopy(
                sorted(
                    (lb for lb in self.state.labels.values() if lb["project_id"] == project_id),
                    key=lambda lb: lb["id"],
                )
            )

    def jobs(self, task_id: int, job_type: str | None = "annotation") -> list[dict[str, Any]]:
        """A task's jobs (of one type, or all with None), by start frame (copies)."""
        return copy.deepcopy(self.state.task_jobs(task_id, job_type))

    def job(self, job_id: int) -> dict[str, Any]:
        """One job record (a copy)."""
        with self.state.lock:
            return copy.deepcopy(self.state.jobs[job_id])

    def annotations(self, job_id: int) -> dict[str, Any]:
        """Stored annotations of a job: {"version", "tags", "shapes", "tracks"}."""
        return self.state.job_annotations(job_id)

    def task_annotations(self, task_id: int) -> dict[str, Any]:
        """Stored annotations of a task's annotation jobs, merged."""
        return self.state.task_annotations(task_id)

    def issues(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Stored issues (of one job), by id."""
        with self.state.lock:
            return copy.deepcopy(
                [i for _, i in sorted(self.state.issues.items()) if job_id in (None, i["job_id"])]
            )

    def comments(self, issue_id: int | None = None) -> list[dict[str, Any]]:
        """Stored comments (of one issue), by id."""
        with self.state.lock:
            return copy.deepcopy(
                [c for _, c in sorted(self.state.comments.items()) if issue_id in (None, c["issue_id"])]
            )

    @property
    def violations(self) -> list[dict[str, Any]]:
        """Client mistakes real CVAT accepts silently, and answers that broke CVAT's schema
        (kind "answer_schema"): {"kind", "message", ...}."""
        with self.state.lock:
            return copy.deepcopy(self.state.violations)

    def clear_violations(self) -> None:
        """Forget recorded violations."""
        with self.state.lock:
            self.state.violations.clear()

    @property
    def answer_violations(self) -> list[dict[str, Any]]:
        """Answers that broke CVAT 2.73's schema: {"kind", "message", "method", "path", "status"};
        unlike `violations`, `clear_violations` does not forget them."""
        with self._app._lock:
            return copy.deepcopy(self._app.answer_violations)

    @property
    def write_count(self) -> int:
        """Mutating API requests (POST/PUT/PATCH/DELETE, /api/auth/* excluded) handled,
        whatever their status; requests answered by a pre-write fault are not counted."""
        return self._app.write_count

    @property
    def requests(self) -> list[LoggedRequest]:
        """Every request seen, in order (status None: connection dropped)."""
        with self._app._lock:
            return list(self._app.log)

    def reset_counters(self) -> None:
        """Zero `write_count` and clear the request log."""
        self._app.reset_counters()

    def webhook_deliveries(self, flush: float = 10.0) -> list[dict[str, Any]]:
        """Every webhook delivery so far, oldest first, once those queued were attempted."""
        assert self.webhooks is not None, "server not started"
        if not self.webhooks.flush(flush):
            raise TimeoutError("webhook deliveries still pending")
        with self.state.lock:
            return copy.deepcopy(sorted(self.webhooks.deliveries.values(), key=lambda d: d["id"]))

    # --------------------------------------------------------------- faults
    def inject(self, kind: FaultKind, path: str = ".*", **options: Any) -> Fault:
        """Add a fault rule (see `faults.Fault` for options); returns it."""
        return self.faults.add(Fault(kind=kind, path=path, **options))

    def delay(
        self,
        path: str,
        seconds: float,
        *,
        method: str | None = None,
        times: int | None = 1,
        probability: float = 1.0,
    ) -> Fault:
        """Sleep before answering matching requests."""
        return self.inject("delay", path, delay=seconds, method=method, times=times, probability=probability)

    def fail(
        self,
        path: str,
        status: int = 503,
        *,
        method: str | None = None,
        times: int | None = 1,
        probability: float = 1.0,
        retry_after: int | None = None,
        body: Any = None,
    ) -> Fault:
        """Answer matching requests with `status` without handling them."""
        return self.inject(
            "status",
            path,
            status=status,
            method=method,
            times=times,
            probability=probability,
            retry_after=retry_after,
            body=body,
        )

    def drop(
        self,
        path: str,
        *,
        method: str | None = None,
        times: int | None = 1,
        probability: float = 1.0,
    ) -> Fault:
        """Close the connection of matching requests without answering."""
        return self.inject("drop", path, method=method, times=times, probability=probability)

    def fail_after_write(
        self,
        path: str,
        *,
        status: int | None = 502,
        method: str | None = None,
        times: int | None = 1,
        probability: float = 1.0,
    ) -> Fault:
        """Apply matching mutating requests, then answer `status` (None: drop)."""
        kind: FaultKind = "status_after_write" if status is not None else "drop_after_write"
        return self.inject(
            kind, path, status=status or 502, method=method, times=times, probability=probability
        )

    def set_global_delay(self, seconds: float, methods: Iterable[str] | None = None) -> None:
        """Sleep before every request (or only those methods), e.g. slow uploads."""
        self.faults.set_global_delay(seconds, set(methods) if methods is not None else None)

    def clear_faults(self, seed: int | None = None) -> None:
        """Remove every fault rule and the global delay."""
        self.faults.clear(seed)
