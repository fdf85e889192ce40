"""What a job already holds on the server, told apart by who made it.

prelabel's own tags are recognised by ``source == "auto"`` plus a non-empty `model`
attribute; its issues by a first comment that starts with ``prelabel:``. Every other tag
is a human's (CVAT marks an auto tag that a person edited as ``semi-auto``, so an edited
suggestion is a human's too). Decisions about what to write are made from this, not from
the local state file, so a tag written just before a crash is never written twice.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field, replace

from connectors.cvat.labels import NEEDS_REVIEW_ATTRIBUTE, CvatLabel, text_value
from connectors.cvat.session import CvatSession
from connectors.cvat_xml import CONFIDENCE_ATTRIBUTE, MODEL_ATTRIBUTE
from prelabel.review import MESSAGE_PREFIX


@dataclass(frozen=True)
class OurTag:
    id: int
    frame: int
    label: str
    label_id: int
    needs_review: bool
    confidence: float = 0.0
    """Its `confidence` attribute as a probability (0 when missing)."""


@dataclass(frozen=True)
class OurIssue:
    id: int
    frame: int
    resolved: bool


@dataclass
class JobOnServer:
    """A job's annotations and issues, split into prelabel's and everybody else's."""

    tags: dict[int, list[OurTag]] = field(default_factory=lambda: defaultdict(list))
    issues: dict[int, list[OurIssue]] = field(default_factory=lambda: defaultdict(list))
    human_frames: set[int] = field(default_factory=set)
    """Frames with a tag that prelabel did not make (or that a person edited)."""
    human_labels: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    unreadable_frames: set[int] = field(default_factory=set)
    """Frames whose prelabel issue says they could not be read (no suggestion is possible)."""

    def copy(self) -> JobOnServer:
        """A copy whose tag and issue maps can change without changing this one."""
        return replace(
            self,
            tags=defaultdict(list, {frame: list(tags) for frame, tags in self.tags.items()}),
            issues=defaultdict(list, {frame: list(issues) for frame, issues in self.issues.items()}),
        )

    def open_issue_count(self) -> int:
        """Frames with an open prelabel issue."""
        return sum(self.open_issue(frame) is not None for frame in list(self.issues))

    def reviewed(self, frame: int) -> bool:
        """A reviewer resolved prelabel's issue on this frame."""
        return any(issue.resolved for issue in self.issues.get(frame, ()))

    def open_issue(self, frame: int) -> OurIssue | None:
        return next((issue for issue in self.issues.get(frame, ()) if not issue.resolved), None)

    def accepted_tags(self, frame: int) -> list[OurTag]:
        return [tag for tag in self.tags.get(frame, ()) if not tag.needs_review]

    def suggestions(self, frame: int) -> list[OurTag]:
        return [tag for tag in self.tags.get(frame, ()) if tag.needs_review]

    def complete(self, frame: int, *, suggestions: bool) -> bool:
        """Whether prelabel already finished this frame: accepted, or fully queued for review."""
        if self.accepted_tags(frame):
            return True
        if self.open_issue(frame) is not None:
            # An unreadable frame has no top-1 to suggest: its issue alone completes it.
            return bool(self.suggestions(frame)) or not suggestions or frame in self.unreadable_frames
        return False


def read_job(
    session: CvatSession, job_id: int, labels: dict[int, CvatLabel], issues: list | None = None
) -> JobOnServer:
    """Read a job's tags, issues and first comments, and sort them by author.

    `issues` are the job's issues when the caller already read them (see `TaskIssues`);
    comments are read only for a job that has issues.
    """
    api = session.client.api_client
    doing = f"reading the annotations and issues of job {job_id}"
    annotations, _ = session.call(doing, lambda: api.jobs_api.retrieve_annotations(job_id))
    if issues is None:
        issues = session.list_all(doing, api.issues_api.list_endpoint, job_id=job_id)
    comments = []
    if issues:
        comments = session.list_all(doing, api.comments_api.list_endpoint, job_id=job_id)
    state = JobOnServer()
    for tag in annotations.tags:
        label = labels.get(tag.label_id)
        values = {value.spec_id: value.value for value in tag.attributes}
        model = values.get(label.attributes.get(MODEL_ATTRIBUTE)) if label else None
        if label is not None and text_value(tag.source) == "auto" and model:
            needs_review = values.get(label.attributes.get(NEEDS_REVIEW_ATTRIBUTE)) == "true"
            confidence = _probability(values.get(label.attributes.get(CONFIDENCE_ATTRIBUTE)))
            state.tags[tag.frame].append(
                OurTag(tag.id, tag.frame, label.name, label.id, needs_review, confidence)
            )
        else:
            state.human_frames.add(tag.frame)
            state.human_labels[tag.frame].append(label.name if label else f"label {tag.label_id}")
    first_comment: dict[int, tuple[int, str]] = {}
    for comment in comments:
        issue_id = comment.issue
        if issue_id not in first_comment or comment.id < first_comment[issue_id][0]:
            first_comment[issue_id] = (comment.id, comment.message or "")
    for issue in issues:
        message = first_comment.get(issue.id, (0, ""))[1]
        if message.startswith(MESSAGE_PREFIX):
            state.issues[issue.frame].append(OurIssue(issue.id, issue.frame, bool(issue.resolved)))
            if message.startswith(f"{MESSAGE_PREFIX} unreadable"):
                state.unreadable_frames.add(issue.frame)
    return state


class TaskIssues:
    """The issues of each task, read once per task (`GET /api/issues?task_id=`) when a job of it
    first needs them, then handed out job by job; safe to use from several threads.

    One request per task instead of one per job. A job's issues are handed out once: they
    describe the server when its task was read, and a job is planned once.
    """

    def __init__(self, session: CvatSession) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._tasks: dict[int, threading.Lock] = {}
        self._issues: dict[int, dict[int, list]] = {}

    def of_job(self, task_id: int, job_id: int) -> list:
        """The job's issues, as they were when its task's issues were read."""
        with self._lock:
            task_lock = self._tasks.setdefault(task_id, threading.Lock())
        with task_lock:
            if task_id not in self._issues:
                api = self.session.client.api_client
                found = self.session.list_all(
                    f"reading the issues of task {task_id}", api.issues_api.list_endpoint, task_id=task_id
                )
                by_job: dict[int, list] = defaultdict(list)
                for issue in found:
                    by_job[issue.job].append(issue)
                self._issues[task_id] = by_job
            return self._issues[task_id].pop(job_id, [])


def _probability(value: str | None) -> float:
    try:
        return max(0.0, min(1.0, int(value or 0) / 100))
    except ValueError:
        return 0.0
