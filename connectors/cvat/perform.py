"""Doing the work a webhook asks for: pre-label a new task's jobs, or sync a reviewed job.

`CvatWork` is what `prelabel serve`'s worker calls for each `WorkItem`. It goes through the
same per-job code path as `prelabel run` (find_work, then label_jobs) and `review sync`
(sync_reviews), so the writes are as idempotent as theirs: doing an item twice writes
nothing the second time. The model is loaded once, at the first task; the text classifier
is built once per label set. With a queue, a task's jobs are put on it instead (one entry
per job, as `prelabel enqueue --task-id` does) and `prelabel worker` processes label them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvat_sdk import Client
from redis import Redis

from connectors.cvat.assign import resolve_reviewers
from connectors.cvat.driver import JobOptions, candidate_names, label_jobs
from connectors.cvat.jobs import find_work
from connectors.cvat.sync import sync_reviews
from connectors.cvat.webhooks import WorkItem
from connectors.queue.enqueue import QueueOptions, enqueue_entries, plan_entries
from prelabel.config import Config
from prelabel.pipeline.runner import Pipeline, RunStats, build_pipeline
from prelabel.state import RunState


class CvatWork:
    """Performs work items against one CVAT server with one config and state file."""

    def __init__(self, client: Client, config: Config, state_path: Path, queue: Redis | None = None) -> None:
        self.client = client
        self.queue = queue
        self.config = config
        self.state_path = Path(state_path)
        self._pipelines: dict[tuple[str, ...], Pipeline] = {}
        self._reviewers = None

    def __call__(self, item: dict[str, Any]) -> str:
        """Do one item (a `WorkItem` as a dict); returns a one-line summary."""
        work = WorkItem.from_dict(item)
        if work.kind == "label_task":
            assert work.task_id is not None
            return self.label_task(work.task_id)
        assert work.job_id is not None
        return self.sync_job(work.job_id)

    def label_task(self, task_id: int) -> str:
        """Pre-label what the task's annotation jobs still need, as `prelabel run --task-id` would."""
        config = self.config
        if self.queue is not None:
            return self.enqueue_task(task_id)
        work = find_work(self.client, task_id=task_id, suggestions=config.review.upload_suggestion)
        if not work.jobs and not work.finished_jobs:
            return f"task {task_id}: no annotation jobs to label"
        names = candidate_names(work, config, f"prelabel setup --task-id {task_id}")
        pipeline = self._pipeline(names)
        if self._reviewers is None:
            self._reviewers = resolve_reviewers(self.client, config.review.reviewers)
        total = RunStats()
        tags = issues = 0
        with RunState(self.state_path) as state:
            state.set_meta("host", self.client.api_map.host)
            options = JobOptions(progress=False, reviewers=self._reviewers)
            for outcome in label_jobs(self.client, work, pipeline, config, options, state):
                total.merge(outcome.stats)
                tags += len(outcome.result.tags_created)
                issues += len(outcome.result.issues_created)
        return (
            f"task {task_id}: {len(work.jobs)} jobs labeled, {total.frames} frames, {total.accepted} "
            f"accepted, {total.review} for review; wrote {tags} tags, {issues} issues"
        )

    def enqueue_task(self, task_id: int) -> str:
        """Put one queue entry per job of the task that needs pre-labels (none twice)."""
        _, entries = plan_entries(
            self.client, {"task_id": task_id}, self.config, f"prelabel setup --task-id {task_id}"
        )
        assert self.queue is not None
        done = enqueue_entries(self.queue, entries, QueueOptions())
        return (
            f"task {task_id}: queued {len(done.added)} jobs for the workers"
            f" ({len(done.pending)} already pending or running, {len(done.failed)} in the failed list)"
        )

    def sync_job(self, job_id: int) -> str:
        """Record the reviewers' outcomes for one job's frames, as `review sync --job-id` would."""
        with RunState(self.state_path) as state:
            counts = sync_reviews(self.client, state, [job_id])
        summary = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))
        return f"job {job_id}: synced {summary or 'nothing (prelabel has no frames of it)'}"

    def _pipeline(self, names: list[str]) -> Pipeline:
        key = tuple(names)
        if key not in self._pipelines:
            loaded = next(iter(self._pipelines.values())).loaded if self._pipelines else None
            self._pipelines[key] = build_pipeline(self.config, names, loaded)  # one model for all
        return self._pipelines[key]
