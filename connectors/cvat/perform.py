"""Doing the work a webhook asks for: pre-label a new task's jobs, or sync a reviewed job.

`CvatWork` is what `prelabel serve`'s worker calls for each `WorkItem`. It goes through the
same composition as `prelabel run` (`label_target`) and `review sync`
(sync_reviews), so the writes are as idempotent as theirs: doing an item twice writes
nothing the second time. The model is loaded once, at the first task; the text classifier
is built once per label set. With a queue, a task's jobs are put on it instead (one entry
per job, as `prelabel enqueue --task-id` does) and `prelabel worker` processes label them.
Each item is worked on in the organization of its task or job, as `run` follows its target's
(CVAT lists an organization's jobs only in its context), unless `--org` names the one to use.
With `metrics`, each labeled job is counted as it finishes, and each labeled task's time
from creation in CVAT to its pre-labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redis import Redis

from connectors.cvat.access import resolve_organization
from connectors.cvat.assign import Reviewer, resolve_reviewers
from connectors.cvat.driver import LabelRequest, label_target
from connectors.cvat.observe import observed, record_job, task_created_at
from connectors.cvat.queued import plan_entries
from connectors.cvat.session import CvatSession
from connectors.cvat.sync import sync_reviews
from connectors.cvat.webhooks import WorkItem
from connectors.queue.enqueue import QueueOptions, enqueue_entries
from prelabel.assemble import PipelineCache
from prelabel.config import Config
from prelabel.errors import PrelabelError
from prelabel.service.metrics import Metrics
from prelabel.state import RunState


class CvatWork:
    """Performs work items against one CVAT server with one config and state file."""

    def __init__(
        self,
        session: CvatSession,
        config: Config,
        state_path: Path,
        queue: Redis | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.session = observed(session, metrics) if metrics is not None else session
        self.queue = queue
        self.config = config
        self.state_path = Path(state_path)
        self.pipelines = PipelineCache()
        self._reviewers: list[Reviewer] | None = None
        self._organization = session.client.organization_slug
        """The organization asked for (--org, cvat.organization), or None: each item's own."""

    def __call__(self, item: dict[str, Any]) -> str:
        """Do one item (a `WorkItem` as a dict); returns a one-line summary."""
        work = WorkItem.from_dict(item)
        if work.kind == "label_task" and work.task_id is not None:
            self._work_in_organization_of({"task_id": work.task_id})
            return self.label_task(work.task_id)
        if work.kind != "label_task" and work.job_id is not None:
            self._work_in_organization_of({"job_id": work.job_id})
            return self.sync_job(work.job_id)
        raise PrelabelError(f"a {work.kind} work item without its task or job id: {item}")

    def label_task(self, task_id: int) -> str:
        """Pre-label what the task's annotation jobs still need, as `prelabel run --task-id` would."""
        if self.queue is not None:
            return self.enqueue_task(task_id)
        if self._reviewers is None:
            self._reviewers = resolve_reviewers(self.session, self.config.review.reviewers)
        with RunState(self.state_path) as state:
            state.claim_host(self.session.host)
            outcome = label_target(
                self.session,
                {"task_id": task_id},
                self.config,
                lambda names: self.pipelines.get(self.config, names),  # one model for all label sets
                request=LabelRequest(progress=False),
                state=state,
                reviewers=self._reviewers,
                on_job=(lambda job: record_job(self.metrics, job)) if self.metrics is not None else None,
            )
        work = outcome.plan.work
        if self.metrics is not None and work.jobs:
            self.metrics.task_labeled(task_created_at(self.session, task_id))
        if not work.jobs and not work.finished_jobs:
            return f"task {task_id}: no annotation jobs to label"
        total = outcome.stats
        return (
            f"task {task_id}: {len(work.jobs)} jobs labeled, {total.frames} frames, {total.accepted} "
            f"accepted, {total.review} for review; wrote {outcome.tags} tags, {outcome.issues} issues"
        )

    def enqueue_task(self, task_id: int) -> str:
        """Put one queue entry per job of the task that needs pre-labels (none twice)."""
        _, entries = plan_entries(self.session, {"task_id": task_id}, self.config)
        done = enqueue_entries(self.queue, entries, QueueOptions())
        return (
            f"task {task_id}: queued {len(done.added)} jobs for the workers"
            f" ({len(done.pending)} already pending or running, {len(done.failed)} in the failed list)"
        )

    def sync_job(self, job_id: int) -> str:
        """Record the reviewers' outcomes for one job's frames, as `review sync --job-id` would."""
        with RunState(self.state_path) as state:
            state.claim_host(self.session.host)
            counts = sync_reviews(self.session, state, [job_id])
        summary = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))
        return f"job {job_id}: synced {summary or 'nothing (prelabel has no frames of it)'}"

    def _work_in_organization_of(self, target: dict[str, int]) -> None:
        """Switch the session to the organization of `target`'s object (`resolve_organization`)."""
        self.session.client.organization_slug = self._organization
        resolve_organization(self.session, target)
