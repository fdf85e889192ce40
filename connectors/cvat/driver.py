"""Pre-labeling CVAT jobs: each job's frames run source -> worker -> router -> sink.

The job is the unit of work. Labeling one job depends only on the job, the config and the
server's state, so jobs can be processed in any order, or on different machines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cvat_sdk import Client

from connectors.cvat.frames import JobFrameSource
from connectors.cvat.jobs import JobPlan, Work
from connectors.cvat.labels import CvatLabel, check_schema
from connectors.cvat.sink import JobResult, TagSink
from prelabel.config import Config
from prelabel.errors import ConfigError
from prelabel.runner import Pipeline, RunStats, run


@dataclass(frozen=True)
class JobOutcome:
    plan: JobPlan
    stats: RunStats
    result: JobResult


def candidate_names(work: Work, config: Config, setup_hint: str) -> list[str]:
    """The CVAT label names to classify into, checked against the config and the schema.

    A config label that names no CVAT candidate label is an error, as is a target without
    candidates or one whose labels lack the attributes `setup` adds.
    """
    check_schema(work.labels, work.where, setup_hint)
    names = [label.name for label in work.labels]
    unknown = [label.name for label in config.labels if label.name not in names]
    if unknown:
        raise ConfigError(
            f"the config describes labels that {work.where} does not have: {', '.join(map(repr, unknown))}",
            hint=f"its tag labels are: {', '.join(map(repr, names))}",
        )
    return names


def label_job(
    client: Client,
    plan: JobPlan,
    labels: dict[str, CvatLabel],
    pipeline: Pipeline,
    *,
    quality: str = "compressed",
    progress: bool = True,
) -> JobOutcome:
    """Label the planned frames of one job: tags for accepted frames, review items for the rest."""
    source = JobFrameSource(client, plan, quality=quality)
    sink = TagSink(client, plan, labels, pipeline.loaded.identity)
    stats = run(source, sink, pipeline, progress=progress)
    return JobOutcome(plan, stats, sink.result)


def label_jobs(
    client: Client,
    work: Work,
    pipeline: Pipeline,
    *,
    quality: str = "compressed",
    progress: bool = True,
    on_job: Callable[[JobOutcome], None] | None = None,
) -> list[JobOutcome]:
    """Label every planned job in turn; `on_job` hears about each as it finishes."""
    labels = {label.name: label for label in work.labels}
    outcomes = []
    for plan in work.jobs:
        outcome = label_job(client, plan, labels, pipeline, quality=quality, progress=progress)
        outcomes.append(outcome)
        if on_job:
            on_job(outcome)
    return outcomes
