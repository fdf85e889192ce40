"""Writing one job's decisions to CVAT, creating only what the job does not hold yet.

- An accepted frame gets its tag(s): ``source`` "auto", `confidence`, `model`.
- A frame routed to review gets an issue at that frame (the whole frame box) whose
  message lists the candidates, and, when configured, its top-1 tag as a suggestion
  marked `needs_review` (not when no label fits the frame).

What the job already holds (`JobPlan.existing`, read from the server) is never written
again, and a create whose answer was lost is retried only for what a re-read of the server
does not show (a create that timed out may still be running there: it is given the client
timeout once more to land before that re-read); so a run that follows a crash completes
half-done frames instead of duplicating them. Tags are created in bounded batches with
``PATCH .../annotations?action=create``; a job's first batch is smaller, so that its first
tags reach CVAT after about one model batch, not after `batch_size` frames.
Up to `write_concurrency` writes (tag batches, issues, --relabel removals) are in flight at
once; the writes that touch one frame run in the order they were made (its old tags and issue
removed, then its issue, then the batch with its suggestion tag).
The sink never updates or deletes a human's annotation; with `relabel` it deletes only
prelabel's own tags and open issues on the frames it labels again. It refuses to write
outside the job's relative frame range (from its `start_frame` to its `stop_frame`), which
real CVAT would silently accept, even beyond the task's size.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import urllib3
from cvat_sdk import models

from connectors.cvat.errors import failing_as
from connectors.cvat.existing import OurIssue, OurTag, read_job
from connectors.cvat.frames import CvatFrameRef
from connectors.cvat.jobs import JobPlan
from connectors.cvat.labels import NEEDS_REVIEW_ATTRIBUTE, CvatLabel, tag_payload
from connectors.cvat.session import CvatSession
from prelabel.interface import Decision
from prelabel.pipeline.stream import ConcurrentWriter
from prelabel.pipeline.timing import StageTimer
from prelabel.review import review_message
from prelabel.state import RunState


@dataclass(frozen=True)
class SinkSettings:
    model_identity: str
    fingerprint: str
    """Of model, prompts and thresholds: recorded with every decision."""
    suggestions: bool = True
    message_length: int = 500
    batch_size: int = 100
    first_batch_size: int = 32
    """Tags in a job's first upload (at most `batch_size`): a model batch's worth."""
    relabel: bool = False
    upload_queue: int = 32
    """Writes (tag batches, issues) that may wait for an upload thread before `write` blocks."""
    write_concurrency: int = 4
    """Write requests in flight at once (CVAT has no bulk form of `POST /api/issues`)."""


@dataclass
class ReviewItem:
    """A frame that needs a human, with the model's candidates."""

    job_id: int
    task_id: int
    frame: int
    name: str
    reason: str
    candidates: tuple[tuple[str, float], ...]


@dataclass
class JobResult:
    """What this run wrote to one job."""

    tags_created: list[int] = field(default_factory=list)
    issues_created: list[int] = field(default_factory=list)
    tags_deleted: list[int] = field(default_factory=list)
    issues_deleted: list[int] = field(default_factory=list)
    review: list[ReviewItem] = field(default_factory=list)
    open_issues: int = 0
    """Frames of the job with an open prelabel issue once the sink closed (new ones included)."""
    first_tag_at: float | None = None
    """`time.perf_counter()` when the server had stored this run's first tag in the job."""

    @property
    def writes(self) -> int:
        return sum(map(len, (self.tags_created, self.issues_created, self.tags_deleted, self.issues_deleted)))


class CvatSink:
    """Writes the decisions of one job; every decision is also recorded in the run state.

    The writes run on `upload_pool` (the run's upload threads, shared by its jobs) or else on
    threads of the sink's own; either way `close` returns once every write of this job is done.
    """

    def __init__(
        self,
        session: CvatSession,
        plan: JobPlan,
        labels: dict[str, CvatLabel],
        settings: SinkSettings,
        state: RunState | None = None,
        timer: StageTimer | None = None,
        upload_pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.session = session
        self.plan = plan
        self.labels = labels
        self.settings = settings
        self.state = state
        self.result = JobResult()
        self.timer = timer or StageTimer()
        self._pending: list[dict] = []
        self._flushed = False
        self._job_frames = set(plan.job_frames)
        self._writer = ConcurrentWriter(
            workers=settings.write_concurrency,
            depth=settings.upload_queue,
            name=f"upload-{plan.job_id}",
            pool=upload_pool,
        )
        self._lock = threading.Lock()  # the upload threads add to `result`
        self._labels_by_id = {label.id: label for label in labels.values()}
        self._existing = plan.existing.copy()
        """What the job holds as this sink goes: --relabel removes prelabel's old tags and issues."""

    def write(self, decision: Decision) -> None:
        prediction = decision.prediction
        ref: CvatFrameRef = prediction.ref
        if ref.job_id != self.plan.job_id or ref.frame not in self._job_frames:
            raise ValueError(f"frame {ref.frame} is not in job {self.plan.job_id}")
        frame, existing = ref.frame, self._existing
        if self.settings.relabel and (existing.tags.get(frame) or existing.open_issue(frame)):
            tags, issue = existing.tags.pop(frame, []), existing.open_issue(frame)
            if issue is not None:
                existing.issues[frame] = [other for other in existing.issues[frame] if other.id != issue.id]
            self._writer.submit(lambda: self._remove_ours(frame, tags, issue), keys=(frame,))
        # A half-done frame keeps the route its first pieces took; otherwise the decision's.
        review = existing.open_issue(frame) is not None or bool(existing.suggestions(frame))
        review = review or not decision.accepted
        if self.state is not None:
            self.state.record_decision(
                job_id=ref.job_id,
                frame=frame,
                task_id=self.plan.task_id,
                name=prediction.name,
                fingerprint=self.settings.fingerprint,
                scores=prediction.scores,
                decision="review" if review else "accept",
                reason=decision.reason,
            )
        if not review:
            if not existing.accepted_tags(frame):
                for label, probability in decision.tags:
                    self._queue_tag(frame, label, probability, needs_review=False)
            return
        self.result.review.append(
            ReviewItem(
                ref.job_id,
                self.plan.task_id,
                frame,
                prediction.name,
                decision.reason or "",
                prediction.scores,
            )
        )
        if existing.open_issue(frame) is None:
            message = review_message(decision, max_length=self.settings.message_length)
            self._writer.submit(lambda: self._create_issue(frame, message), keys=(frame,))
        # A frame no label fits gets no suggestion: the top-1 would be a guess among wrong labels.
        fits = decision.code != "no_fit"
        if self.settings.suggestions and fits and prediction.scores and not existing.suggestions(frame):
            label, probability = prediction.scores[0]
            self._queue_tag(frame, label, probability, needs_review=True)

    def send_pending(self) -> None:
        """Hand the tags still waiting for a full batch to the upload threads; does not wait."""
        self._flush()

    def close(self) -> None:
        """Upload what is pending and wait for every write; re-raise a failed one."""
        try:
            self._flush()
        finally:
            self._writer.close()
        self.result.open_issues = self._existing.open_issue_count() + len(self.result.issues_created)

    def _queue_tag(self, frame: int, label: str, probability: float, *, needs_review: bool) -> None:
        payload = tag_payload(
            self.labels[label], frame, probability, self.settings.model_identity, needs_review=needs_review
        )
        self._pending.append(payload)
        size = self.settings.batch_size
        if not self._flushed:
            size = min(size, self.settings.first_batch_size)
        if len(self._pending) >= size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            batch, self._pending, self._flushed = self._pending, [], True
            self._writer.submit(lambda: self._upload(batch), keys={tag["frame"] for tag in batch})

    def _upload(self, batch: list[dict]) -> None:
        """Create a batch of tags. If an attempt fails, the server is read again before the
        next, and only the tags it does not hold are sent: a create whose answer was lost
        may have been applied, and must not be applied twice."""
        job_id = self.plan.job_id
        doing = f"uploading {len(batch)} tags to job {job_id}"
        remaining, unknown = batch, Outcome()
        with self.timer.stage("upload"), failing_as(doing):
            for attempt in self.session.retrying(doing):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        unknown.settle(self.session.retry.timeout)
                        remaining = self._not_stored(remaining)
                    if remaining:
                        with unknown:
                            created = self._create_tags(remaining)
                        self._record_tags(created)

    def _create_tags(self, tags: list[dict]) -> list[dict]:
        request = models.PatchedLabeledDataRequest(
            version=0, tags=[_tag_request(tag) for tag in tags], shapes=[], tracks=[]
        )
        # The schema declares no body, but CVAT answers with the created objects.
        _, response = self.session.client.api_client.jobs_api.partial_update_annotations(
            "create", self.plan.job_id, patched_labeled_data_request=request, _parse_response=False
        )
        return json.loads(response.data).get("tags", [])

    def _not_stored(self, tags: list[dict]) -> list[dict]:
        """The tags of `tags` that the server does not hold yet; records the ones it does."""
        on_server = read_job(self.session, self.plan.job_id, self._labels_by_id)
        stored = {}
        for frame, ours in on_server.tags.items():
            for tag in ours:
                stored[(frame, tag.label_id, tag.needs_review)] = tag.id
        missing, found = [], []
        for tag in tags:
            key = (tag["frame"], tag["label_id"], _needs_review(tag, self._labels_by_id))
            if key in stored:
                found.append({"id": stored[key], "frame": tag["frame"]})
            else:
                missing.append(tag)
        self._record_tags(found)
        return missing

    def _record_tags(self, created: list[dict]) -> None:
        by_frame: dict[int, list[int]] = {}
        for tag in created:
            by_frame.setdefault(tag["frame"], []).append(tag["id"])
        with self._lock:
            self.result.tags_created.extend(tag["id"] for tag in created)
            if created and self.result.first_tag_at is None:
                self.result.first_tag_at = time.perf_counter()
        if self.state is not None:
            for frame, ids in by_frame.items():
                self.state.record_upload(self.plan.job_id, frame, tag_ids=ids)

    def _create_issue(self, frame: int, message: str) -> None:
        """Create the review issue of a frame, checking the server first on every retry."""
        job_id = self.plan.job_id
        width, height = self.plan.sizes.get(frame, (1, 1))
        request = models.IssueWriteRequest(
            frame=frame, position=[0.0, 0.0, float(width), float(height)], job=job_id, message=message
        )
        doing = f"creating the review issue for frame {frame} of job {job_id}"
        unknown = Outcome()
        with self.timer.stage("upload"), failing_as(doing):
            for attempt in self.session.retrying(doing):
                with attempt:
                    issue_id = None
                    if attempt.retry_state.attempt_number > 1:
                        unknown.settle(self.session.retry.timeout)
                        found = read_job(self.session, job_id, self._labels_by_id).open_issue(frame)
                        issue_id = found.id if found else None
                    if issue_id is None:
                        with unknown:
                            issue, _ = self.session.client.api_client.issues_api.create(request)
                        issue_id = issue.id
        with self._lock:
            self.result.issues_created.append(issue_id)
        if self.state is not None:
            self.state.record_upload(job_id, frame, issue_id=issue_id)

    def _remove_ours(self, frame: int, tags: list[OurTag], issue: OurIssue | None) -> None:
        """--relabel: delete prelabel's own open issue and tags on this frame, nothing else.

        The state file forgets them first: a tag it still records but the server no longer
        holds is one a person removed, which no later run writes again (`jobs._plan_job`).
        The issue goes first: CVAT refuses its deletion to a user who neither created it nor
        is staff of the task (issues.rego), and the refusal then leaves the frame as it was.
        """
        if self.state is not None:
            self.state.forget_uploads(self.plan.job_id, frame)
        if issue is not None:
            self.session.call(
                f"removing prelabel's issue from frame {frame} of job {self.plan.job_id}",
                lambda: self.session.client.api_client.issues_api.destroy(issue.id),
            )
            with self._lock:
                self.result.issues_deleted.append(issue.id)
        if tags:
            request = models.PatchedLabeledDataRequest(
                version=0,
                tags=[
                    models.LabeledImageRequest(id=tag.id, frame=frame, label_id=tag.label_id, source="auto")
                    for tag in tags
                ],
                shapes=[],
                tracks=[],
            )
            self.session.call(
                f"removing prelabel's tags from frame {frame} of job {self.plan.job_id}",
                lambda: self.session.client.api_client.jobs_api.partial_update_annotations(
                    "delete", self.plan.job_id, patched_labeled_data_request=request, _parse_response=False
                ),
            )
            with self._lock:
                self.result.tags_deleted.extend(tag.id for tag in tags)


class Outcome:
    """Around a create request: notes when it timed out, i.e. may still be running on the server."""

    def __init__(self) -> None:
        self.timed_out = False

    def __enter__(self) -> Outcome:
        self.timed_out = False
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.timed_out = isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError) or (
            isinstance(exc, urllib3.exceptions.MaxRetryError)
            and isinstance(exc.reason, urllib3.exceptions.TimeoutError)
        )

    def settle(self, seconds: float) -> None:
        """Before re-reading the server: give a create that timed out `seconds` more to land."""
        if self.timed_out:
            time.sleep(seconds)
            self.timed_out = False


def _tag_request(tag: dict) -> models.LabeledImageRequest:
    attributes = [models.AttributeValRequest(**attribute) for attribute in tag["attributes"]]
    return models.LabeledImageRequest(**{**tag, "attributes": attributes})


def _needs_review(tag: dict, labels: dict[int, CvatLabel]) -> bool:
    spec = labels[tag["label_id"]].attributes.get(NEEDS_REVIEW_ATTRIBUTE)
    return any(a["spec_id"] == spec and a["value"] == "true" for a in tag["attributes"])
