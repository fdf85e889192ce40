"""`prelabel folder`, `prelabel setup` and `prelabel run`: labeling a folder or CVAT jobs."""

from __future__ import annotations

import contextlib
import importlib
import threading
from pathlib import Path

import click

from prelabel.cli.options import (
    config_option,
    connect_to,
    labels_option,
    model_options,
    one_target,
    progress_option,
    server_options,
    state_option,
    target_options,
)


@click.command()
@click.argument("images_dir", type=click.Path(path_type=Path))
@labels_option("Comma-separated label names (or list them in the config).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder for annotations.xml, labels.json and review.jsonl.",
)
@model_options
@progress_option
def folder(
    images_dir: Path, labels: list[str], out_dir: Path, config_path, overrides, profile_path, progress
):
    """Pre-label every image in IMAGES_DIR (no CVAT server needed).

    Writes OUT/annotations.xml (accepted tags, "CVAT for images 1.1", to import with
    CVAT's "Upload annotations"), OUT/labels.json (the labels with their confidence and
    model attributes, for CVAT's raw label editor) and OUT/review.jsonl (images that
    need a human, with the top candidates and the reason).
    """
    from connectors.folder import FolderSink, FolderSource
    from prelabel.config import load_config

    config = load_config(config_path, overrides)
    names = labels or [label.name for label in config.labels]
    source = FolderSource(images_dir)

    from prelabel.assemble import build_image_pipeline  # imports torch: slow
    from prelabel.pipeline.runner import format_summary, run

    pipeline = build_image_pipeline(config, names)  # no other classifier is built
    sink = FolderSink(
        out_dir,
        labels=names,
        model_identity=pipeline.loaded.identity,
        size=len(source),
        task_name=images_dir.resolve().name,
    )
    stats = run(source, sink, pipeline, progress=progress)
    write_profile(profile_path, stats)
    click.echo(format_summary(stats, title=f"{images_dir}", labels=names, expected=pipeline.label_shares))
    if source.skipped:
        click.echo(f"  skipped {source.skipped} files that are not images")
    click.echo(f"  tags:   {sink.annotations_path}\n  review: {sink.review_path}")


@click.command()
@target_options
@config_option
@server_options
def setup(target, config_path, server):
    """Add the attributes prelabel writes to a project's (or task's) tag labels.

    Each label of type tag or any gets, where it lacks them, a `confidence` number
    attribute (0-100), a `model` text attribute and a `needs_review` checkbox. Existing
    attributes and everything else stay as they are; running it twice changes nothing.
    """
    from connectors.cvat.driver import setup_hint
    from connectors.cvat.jobs import find_labels
    from connectors.cvat.labels import add_missing_attributes, check_schema
    from prelabel.config import load_config

    target = one_target(target)
    if "job_id" in target:
        raise click.UsageError("setup works on a project or a task: give --project-id or --task-id")
    config = load_config(config_path)
    session = connect_to(config, server, target, writes="setup")
    where, labels = find_labels(session, **target)
    added = add_missing_attributes(session, labels)
    for name, attributes in added.items():
        click.echo(f"label {name!r}: added {', '.join(attributes)}")
    if not added:
        click.echo(f"{where}: every tag label already has the attributes; nothing changed")
    check_schema(find_labels(session, **target)[1], where, setup_hint(target))


@click.command(name="run")
@target_options
@model_options
@server_options
@click.option("--dry-run", is_flag=True, help="Print what would be done; write nothing.")
@click.option("--limit", type=click.IntRange(min=1), help="Label at most this many frames (trials).")
@click.option(
    "--quality",
    type=click.Choice(["compressed", "original"]),
    default="original",
    show_default=True,
    help="Which chunks to download: the uploaded files (original, as cvat-sdk reads them) or "
    "CVAT's re-encoded JPEGs (compressed).",
)
@click.option(
    "--include-tagged",
    is_flag=True,
    help="Also label frames that a person already tagged (their tags are never changed).",
)
@click.option(
    "--relabel",
    is_flag=True,
    help="Label again the frames prelabel already did (after a model or prompt change), replacing "
    "only prelabel's own tags and open issues.",
)
@state_option
@progress_option
@click.option("--queue", "queue_url", metavar="URL", help="Hand the jobs to workers on this Redis queue.")
def run_command(
    target, config_path, overrides, profile_path, server, dry_run, limit, quality, include_tagged, relabel,
    state_path, progress, queue_url,
):  # fmt: skip
    """Pre-label the jobs of a CVAT project, task or job that still need labels.

    Frames are streamed chunk by chunk through the model. Each accepted frame gets a tag
    (source "auto") with its confidence (0-100) and the model's name as attributes. Each
    other frame gets a CVAT issue listing the candidates (and, if configured, its top-1
    tag as a suggestion marked needs_review); jobs with review items go to a reviewer.
    Running it again writes nothing new; after a crash it completes what is missing.
    Frames a person tagged are skipped, and no human annotation is ever changed.
    """
    import time

    from prelabel.config import load_config

    started = time.perf_counter()
    started_at = time.time()  # the same moment on the wall clock, for --profile
    target = one_target(target)
    config = load_config(config_path, overrides)

    from connectors.cvat.assign import resolve_reviewers  # cvat-sdk: slow (torch is not imported yet)
    from connectors.cvat.driver import LabelRequest, candidate_names, label_target, plan_target, setup_hint
    from connectors.cvat.jobs import read_target
    from prelabel.state import RunState

    request = LabelRequest(
        include_tagged=include_tagged, relabel=relabel, quality=quality, limit=limit, progress=progress
    )
    if queue_url:  # scale-out: workers label the jobs (prelabel/cli/queue.py)
        from prelabel.cli.queue import run_on_queue

        if limit is not None:
            raise click.UsageError("--limit does not apply with --queue (workers label whole jobs)")
        if dry_run:
            raise click.UsageError("--dry-run does not apply with --queue; run it without --queue")
        return run_on_queue(queue_url, target, config, server, request)
    if not dry_run:  # torch and open_clip take seconds to import: the run logs in and plans meanwhile
        _import_meanwhile("prelabel.assemble")
    session = connect_to(config, server, target, writes=None if dry_run else "run")
    if dry_run:  # the whole plan, planned concurrently, as a run with this state file would plan it
        path = Path(state_path or config.state.path)
        with RunState(path, lock=False) if path.is_file() else contextlib.nullcontext() as state:
            if state is not None:
                state.check_host(session.host)
            planned = plan_target(session, target, config, request, state)
        resolve_reviewers(session, config.review.reviewers)
        print_plan(planned.work, planned.names, dry_run)
        return
    listing = read_target(session, **target)  # then each job is planned as the labeling takes it
    names = candidate_names(listing, config, setup_hint(target))
    reviewers = resolve_reviewers(session, config.review.reviewers)
    click.echo(f"{listing.where}: labels {', '.join(names)}")

    from prelabel.pipeline.runner import format_summary

    def pipeline_for(names: list[str]):  # on the model's thread, where the import waits for the early one
        from prelabel.assemble import build_image_pipeline

        return build_image_pipeline(config, names)  # one label set per target

    with RunState(Path(state_path or config.state.path)) as state:
        state.claim_host(session.host)
        per_job = {}

        def report(outcome) -> None:
            stats, plan, result = outcome.stats, outcome.plan, outcome.result
            click.echo(
                f"job {plan.job_id} (task {plan.task_id}): {stats.frames} frames, "
                f"{stats.accepted} accepted, {stats.review} for review, {stats.unreadable} unreadable, "
                f"{stats.images_per_second:.1f} images/s; wrote {len(result.tags_created)} tags, "
                f"{len(result.issues_created)} issues"
                + (
                    f"; job {', '.join(f'{k}={v}' for k, v in outcome.job_changes.items())}"
                    if outcome.job_changes
                    else ""
                )
                + (f"; job left as it is ({outcome.routing_refused})" if outcome.routing_refused else "")
            )
            per_job[plan.job_id] = stats

        outcome = label_target(
            session,
            target,
            config,
            pipeline_for,
            request=request,
            state=state,
            reviewers=reviewers,
            listing=listing,
            on_job=report,
            on_planned=print_planned,
            started=started,
        )
        work = outcome.plan.work
        click.echo(f"  {work.frame_count} frames in {len(work.jobs)} jobs")
        total = outcome.stats
        expected = outcome.pipeline.label_shares if outcome.pipeline is not None else None
        click.echo(format_summary(total, title=f"{work.where}", labels=names, expected=expected))
        write_profile(profile_path, total, per_job, started_at=started_at)
        click.echo("  review queue: prelabel review list")


def print_plan(work, names: list[str], dry_run: bool) -> None:
    """What `run --dry-run` (or `enqueue`) is about to do, job by job."""
    prefix = "dry run: would label" if dry_run else "labeling"
    click.echo(f"{work.where}: labels {', '.join(names)}")
    for plan in work.jobs:
        click.echo(_job_line(plan, prefix))
    for job_id, why in sorted(work.skipped_jobs.items()):
        click.echo(f"  job {job_id}: skipped, {why}")
    click.echo(f"  {work.frame_count} frames in {len(work.jobs)} jobs")


def print_planned(item) -> None:
    """One job as `run` plans it (a `connectors.cvat.jobs.Planned`), just before labeling it."""
    if item.skipped is not None:
        click.echo(f"  job {item.job_id}: skipped, {item.skipped}")
    elif item.plan is not None:
        click.echo(_job_line(item.plan, "labeling"))


def _job_line(plan, prefix: str) -> str:
    removed = f", {plan.removed} whose tags people removed" if plan.removed else ""
    return (
        f"  job {plan.job_id} (task {plan.task_id}): {prefix} {len(plan.frames)} frames"
        f" ({plan.already_done} done before, {plan.already_tagged} tagged by people,"
        f" {plan.deleted} deleted{removed})"
    )


def write_profile(
    path: Path | None, total, per_job: dict | None = None, started_at: float | None = None
) -> None:
    """--profile: the seconds per stage (download, unpack, decode, model, upload, waits) as JSON.

    `started_at` (Unix time) is when the run's clock started: the marks among the stages
    (``model_ready_at``, ``first_tag_at``) are seconds from it, so with it they can be placed
    next to another process's log, e.g. the server's.
    """
    if path is None:
        return
    import json

    def figures(stats) -> dict:
        return {
            "images": stats.frames,
            "seconds": round(stats.seconds, 4),
            "images_per_second": round(stats.images_per_second, 3),
            "stages": {name: round(seconds, 4) for name, seconds in sorted(stats.stages.items())},
        }

    document: dict = {"total": figures(total)}
    if started_at is not None:
        document["started_at"] = round(started_at, 4)
    if per_job:
        document["jobs"] = {str(job): figures(stats) for job, stats in per_job.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    click.echo(f"  profile: {path}")


def _import_meanwhile(module: str) -> None:
    """Start importing `module` on a thread of its own.

    The run reads its target and plans its first jobs meanwhile. Whoever imports the module
    next waits for this import to end (Python's import lock); if it failed, that import fails
    again with its own message. The thread is not a daemon, so the process never exits in
    the middle of the import.
    """

    def load() -> None:
        with contextlib.suppress(Exception):  # raised again by the import that needs the module
            importlib.import_module(module)

    threading.Thread(target=load, name="prelabel-import").start()
