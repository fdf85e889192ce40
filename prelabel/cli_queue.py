"""The scale-out commands: `enqueue`, `worker`, `status`, `requeue-failed`, and `run --queue`.

They share work through an RQ queue on Redis (see connectors/queue/); `register` adds
them to the `prelabel` command group.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from prelabel.cli import (
    _check_access,
    _connect,
    _one_target,
    _overrides,
    _setup_hint,
    model_options,
    target_options,
)
from prelabel.errors import PrelabelError

log = logging.getLogger(__name__)

_QUEUE_HELP = "Redis URL of the queue, redis://HOST:PORT/DB (or PRELABEL_QUEUE)."


def queue_option(func):
    return click.option("--queue", "queue_url", metavar="URL", help=_QUEUE_HELP)(func)


def queue_run_options(func):
    """How long an entry may run and how often it is tried."""
    options = [
        click.option(
            "--attempts",
            type=click.IntRange(min=1),
            default=3,
            show_default=True,
            help="Tries per CVAT job (errors and dead workers alike) before it is listed as failed.",
        ),
        click.option(
            "--job-timeout",
            type=click.IntRange(min=10),
            default=4 * 3600,
            show_default=True,
            help="Seconds one CVAT job may take on a worker.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def login_options(func):
    """How a worker logs in to CVAT; the server itself comes with each entry."""
    options = [
        click.option(
            "--auth",
            metavar="USER[:PASS]",
            help="User and password; the PASS variable can hold the password. "
            "Without it: CVAT_ACCESS_TOKEN, CVAT_USERNAME/CVAT_PASSWORD, or a cvat-cli profile.",
        ),
        click.option("--cvat-profile", "profile", help="A saved cvat-cli profile."),
        click.option("--insecure", is_flag=True, help="Skip TLS certificate checks (trusted networks only)."),
        click.option(
            "--ca-bundle", type=click.Path(dir_okay=False), help="A PEM file of certificate authorities."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def enqueue_target(connection, client, target, config, *, relabel, include_tagged, quality, options):
    """Plan the target's jobs, print the plan, and enqueue them; returns `Enqueued`."""
    from connectors.queue.enqueue import enqueue_entries, plan_entries

    work, entries = plan_entries(
        client,
        target,
        config,
        _setup_hint(target),
        relabel=relabel,
        include_tagged=include_tagged,
        quality=quality,
    )
    done = enqueue_entries(connection, entries, options)
    click.echo(
        f"{work.where}: {len(entries)} jobs need work ({work.frame_count} frames); "
        f"queued {len(done.added)}, already pending or running {len(done.pending)}, "
        f"failed before {len(done.failed)}"
    )
    if done.failed:
        click.echo(
            f"  failed before, left in the failed list: jobs {', '.join(map(str, done.failed))} "
            "(prelabel requeue-failed sends them back)"
        )
    return done


@click.command()
@target_options
@model_options
@click.option("--server-host", help="CVAT URL, e.g. https://app.cvat.ai (or CVAT_HOST).")
@login_options
@click.option("--org", "organization", metavar="SLUG", help="Organization slug.")
@queue_option
@click.option("--relabel", is_flag=True, help="Label again what prelabel already did (see `run`).")
@click.option("--include-tagged", is_flag=True, help="Also label frames a person tagged (see `run`).")
@click.option("--quality", type=click.Choice(["compressed", "original"]), default="compressed")
@queue_run_options
def enqueue(
    project_id, task_id, job_id, config_path, server_host, auth, profile, insecure, ca_bundle,
    organization, queue_url, relabel, include_tagged, quality, attempts, job_timeout, **flags,
):  # fmt: skip
    """Put one queue entry per CVAT job that needs pre-labels; workers take them.

    An entry's id is derived from the server and the job, so enqueueing again adds nothing
    for a job that is pending or running. Entries hold the job id, the server URL and the
    config; never credentials: each worker logs in with its own.
    """
    from connectors.queue.enqueue import QueueOptions
    from connectors.queue.redis_url import connect_queue
    from prelabel.config import load_config

    target = _one_target(project_id, task_id, job_id)
    config = load_config(config_path, _overrides(**flags))
    connection = connect_queue(queue_url)
    client = _connect(config, server_host, auth, profile, organization, insecure, ca_bundle)
    _check_access(client, target)
    enqueue_target(
        connection,
        client,
        target,
        config,
        relabel=relabel,
        include_tagged=include_tagged,
        quality=quality,
        options=QueueOptions(job_timeout=job_timeout, attempts=attempts),
    )


@click.command()
@queue_option
@click.option("--device", help="This worker's device: cpu, cuda or cuda:N (one worker per GPU).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per model batch on this device.")
@click.option("--burst", is_flag=True, help="Exit when no entry is queued or running.")
@click.option(
    "--state",
    "state_path",
    type=click.Path(path_type=Path),
    help="This worker's state file; default the first free .prelabel/worker-N.db.",
)
@click.option(
    "--lease",
    type=click.IntRange(min=2),
    default=60,
    show_default=True,
    help="Seconds a running entry is held without renewal; a dead worker's entry is retried "
    "after about 3 leases.",
)
@login_options
def worker(queue_url, device, batch_size, burst, state_path, lease, auth, profile, insecure, ca_bundle):
    """Take CVAT jobs off the queue and pre-label them, one at a time, until stopped.

    The model and text classifier are loaded once per process. Run one worker per GPU
    (`make workers N=4` on a 4-GPU machine). SIGTERM finishes the current job, then exits.
    """
    from connectors.queue.redis_url import connect_queue

    connection = connect_queue(queue_url)  # a bad URL fails before the slow imports

    from connectors.queue import tasks
    from connectors.queue.worker import run_worker, worker_name

    quiet = click.get_current_context().find_root().params.get("quiet")
    level = logging.WARNING if quiet else logging.INFO
    logging.getLogger("connectors.queue").setLevel(level)
    name = worker_name(device)
    state = _worker_state(state_path)
    try:
        tasks.configure(
            tasks.WorkerSettings(
                name=name,
                state=state,
                device=device,
                batch_size=batch_size,
                auth=auth,
                profile=profile,
                insecure=insecure,
                ca_bundle=ca_bundle,
            ),
            connection,
            builder=_pipeline_builder(),
        )
        click.echo(f"worker {name}: state {state.path}; waiting for entries", err=True)
        run_worker(connection, name, burst=burst, lease=lease, level=level)
    finally:
        state.close()


def _pipeline_builder():
    from prelabel.runner import build_pipeline

    return build_pipeline


def _worker_state(path: Path | None):
    """The worker's own state file: `path`, or the first of .prelabel/worker-N.db no one holds."""
    from prelabel.state import DEFAULT_STATE_PATH, RunState, StateLockedError

    if path is not None:
        state = RunState(path)
        state.open()
        return state
    for index in range(256):
        state = RunState(DEFAULT_STATE_PATH.parent / f"worker-{index}.db")
        try:
            state.open()
        except StateLockedError:
            continue
        return state
    raise PrelabelError("256 workers already hold state files in .prelabel/", hint="pass --state FILE")


@click.command()
@queue_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def status(queue_url, fmt):
    """Show pending, running, finished and failed CVAT jobs, the workers and their throughput."""
    from connectors.queue.redis_url import connect_queue
    from connectors.queue.status import format_status, read_status

    current = read_status(connect_queue(queue_url))
    if fmt == "json":
        click.echo(json.dumps(current.as_dict(), indent=2))
    else:
        click.echo(format_status(current))


@click.command(name="requeue-failed")
@queue_option
@click.option("--attempts", type=click.IntRange(min=1), help="Tries each gets now (default: as enqueued).")
def requeue_failed_command(queue_url, attempts):
    """Send every failed entry back to the queue."""
    from connectors.queue.redis_url import connect_queue
    from connectors.queue.status import requeue_failed

    jobs = requeue_failed(connect_queue(queue_url), attempts)
    if jobs:
        click.echo(f"requeued {len(jobs)} failed entries: CVAT jobs {', '.join(map(str, sorted(jobs)))}")
    else:
        click.echo("no failed entries")


def run_on_queue(
    queue_url, target, config, server, *, relabel, include_tagged, quality, limit, dry_run, progress
):
    """`prelabel run --queue`: enqueue the target's jobs, then follow them to the end."""
    from rq import Worker
    from tqdm import tqdm

    from connectors.queue.enqueue import QueueOptions
    from connectors.queue.entries import open_queue
    from connectors.queue.redis_url import connect_queue, redacted
    from connectors.queue.status import read_status, wait_for

    if limit is not None:
        raise click.UsageError("--limit does not apply with --queue (workers label whole jobs)")
    if dry_run:
        raise click.UsageError("--dry-run does not apply with --queue; run it without --queue")
    connection = connect_queue(queue_url)
    client = _connect(config, **server)
    _check_access(client, target)
    done = enqueue_target(
        connection,
        client,
        target,
        config,
        relabel=relabel,
        include_tagged=include_tagged,
        quality=quality,
        options=QueueOptions(),
    )
    ids = [done.ids[job] for job in done.added + done.pending]
    if ids and Worker.count(queue=open_queue(connection)) == 0:
        log.warning("no worker is listening on %s yet: start one with `prelabel worker`", redacted(queue_url))
    bar = tqdm(total=len(ids), unit="job", disable=not progress, leave=False)

    def advance(finished: int, total: int) -> None:
        bar.update(finished - bar.n)

    try:
        outcome = wait_for(connection, ids, advance)
    finally:
        bar.close()
    by_id = {view.entry_id: view for view in read_status(connection).failed}
    click.echo(f"{len(outcome['finished'])} jobs finished, {len(outcome['failed'])} failed")
    for entry in outcome["failed"]:
        view = by_id.get(entry)
        click.echo(f"  CVAT job {view.cvat_job if view else entry}: {view.error if view else 'gone'}")
    if outcome["failed"]:
        raise PrelabelError(
            f"{len(outcome['failed'])} of {len(ids)} jobs failed",
            hint="prelabel status shows why; prelabel requeue-failed sends them back",
        )


def register(group: click.Group) -> None:
    """Add the queue commands to the `prelabel` group."""
    for command in (enqueue, worker, status, requeue_failed_command):
        group.add_command(command)
