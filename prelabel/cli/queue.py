"""The scale-out commands: `enqueue`, `worker`, `status`, `requeue-failed`, and `run --queue`.

They share work through an RQ queue on Redis (see connectors/queue/).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from prelabel.cli.options import (
    connect_to,
    login_options,
    model_options,
    one_target,
    server_options,
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


def enqueue_target(connection, session, target, config, request, options):
    """Plan the target's jobs, print the plan, and enqueue them; returns `Enqueued`."""
    from connectors.cvat.queued import plan_entries
    from connectors.queue.enqueue import enqueue_entries

    planned, entries = plan_entries(session, target, config, request)
    work = planned.work
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
@server_options
@queue_option
@click.option("--relabel", is_flag=True, help="Label again what prelabel already did (see `run`).")
@click.option("--include-tagged", is_flag=True, help="Also label frames a person tagged (see `run`).")
@click.option("--quality", type=click.Choice(["compressed", "original"]), default="original")
@queue_run_options
def enqueue(
    target, config_path, overrides, profile_path, server, queue_url, relabel, include_tagged, quality,
    attempts, job_timeout,
):  # fmt: skip
    """Put one queue entry per CVAT job that needs pre-labels; workers take them.

    An entry's id is derived from the server and the job, so enqueueing again adds nothing
    for a job that is pending or running. Entries hold the job id, the server URL and the
    config; never credentials: each worker logs in with its own.
    """
    from connectors.cvat.driver import LabelRequest
    from connectors.queue.enqueue import QueueOptions
    from connectors.queue.redis_url import connect_queue
    from prelabel.config import load_config

    target = one_target(target)
    config = load_config(config_path, overrides)
    connection = connect_queue(queue_url)
    session = connect_to(config, server, target)
    request = LabelRequest(include_tagged=include_tagged, relabel=relabel, quality=quality)
    enqueue_target(
        connection, session, target, config, request, QueueOptions(job_timeout=job_timeout, attempts=attempts)
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
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve /metrics (Prometheus), /healthz and /readyz on this port.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="The address for --metrics-port (0.0.0.0: every interface).",
)
@login_options
def worker(queue_url, device, batch_size, burst, state_path, lease, metrics_port, metrics_host, server):
    """Take CVAT jobs off the queue and pre-label them, one at a time, until stopped.

    The model and text classifier are loaded once per process. Run one worker per GPU
    (`make workers N=4` on a 4-GPU machine). SIGTERM finishes the current job, then exits.
    """
    from connectors.queue.redis_url import connect_queue

    connection = connect_queue(queue_url)  # a bad URL fails before the slow imports

    from connectors.cvat.queued import EntryWorker, WorkerSettings
    from connectors.queue.entries import open_queue
    from connectors.queue.worker import run_worker, worker_name
    from prelabel.assemble import build_pipeline
    from prelabel.service.http import ProbeServer
    from prelabel.service.metrics import Metrics, Probes
    from prelabel.state import StatesByServer

    root = click.get_current_context().find_root()
    quiet = root.params.get("quiet")
    builder = (root.obj or {}).get("pipeline_builder", build_pipeline)  # benchmarks/scale_worker.py
    level = logging.WARNING if quiet else logging.INFO
    logging.getLogger("connectors.queue").setLevel(level)
    logging.getLogger("connectors.cvat.queued").setLevel(level)
    name = worker_name(device)
    states = StatesByServer(_worker_state(state_path))
    server_ = None
    try:
        settings = WorkerSettings(
            name=name,
            states=states,
            device=device,
            batch_size=batch_size,
            auth=server["auth"],
            profile=server["profile"],
            insecure=server["insecure"],
            ca_bundle=server["ca_bundle"],
        )
        metrics = Metrics()
        context = EntryWorker(settings, connection, builder, metrics)
        if metrics_port is not None:
            metrics.watch_queue(lambda: open_queue(connection).count)
            probes = Probes(metrics, {"redis": connection.ping, "cvat": context.check_servers})
            server_ = ProbeServer(probes, (metrics_host, metrics_port))
            host, port = server_.start()
            click.echo(f"worker {name}: metrics on http://{host}:{port}/metrics", err=True)
        click.echo(f"worker {name}: state {states.first.path}; waiting for entries", err=True)
        run_worker(connection, name, context, burst=burst, lease=lease, level=level)
    finally:
        if server_ is not None:
            server_.stop()
        states.close()


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
@click.option(
    "--list",
    "lists",
    type=click.Choice(["pending", "running", "finished", "failed", "scheduled", "deferred", "all"]),
    multiple=True,
    help="Also list the entries in this state (repeatable; all: every state). Default: counts only.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Entries listed per state at most (0: no limit).",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def status(queue_url, lists, limit, fmt):
    """Count the CVAT jobs by state (pending, running, finished, failed, ...) and show the workers
    and their throughput; list the entries of a state only when asked (--list failed)."""
    from connectors.queue.redis_url import connect_queue
    from connectors.queue.status import STATES, format_status, read_status

    states = STATES if "all" in lists else lists
    current = read_status(connect_queue(queue_url), states, limit or None)
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


def run_on_queue(queue_url, target, config, server, request):
    """`prelabel run --queue`: enqueue the target's jobs, then follow them to the end."""
    from rq import Worker
    from tqdm import tqdm

    from connectors.queue.enqueue import QueueOptions
    from connectors.queue.entries import open_queue
    from connectors.queue.redis_url import connect_queue, redacted
    from connectors.queue.status import read_status, wait_for

    connection = connect_queue(queue_url)
    session = connect_to(config, server, target)
    done = enqueue_target(connection, session, target, config, request, QueueOptions())
    ids = [done.ids[job] for job in done.added + done.pending]
    if ids and Worker.count(queue=open_queue(connection)) == 0:
        log.warning("no worker is listening on %s yet: start one with `prelabel worker`", redacted(queue_url))
    bar = tqdm(total=len(ids), unit="job", disable=not request.progress, leave=False)

    def advance(finished: int, total: int) -> None:
        bar.update(finished - bar.n)

    try:
        outcome = wait_for(connection, ids, advance)
    finally:
        bar.close()
    by_id = {view.entry_id: view for view in read_status(connection, ("failed",), workers=False).failed}
    click.echo(f"{len(outcome['finished'])} jobs finished, {len(outcome['failed'])} failed")
    for entry in outcome["failed"]:
        view = by_id.get(entry)
        click.echo(f"  CVAT job {view.cvat_job if view else entry}: {view.error if view else 'gone'}")
    if outcome["failed"]:
        raise PrelabelError(
            f"{len(outcome['failed'])} of {len(ids)} jobs failed",
            hint="prelabel status shows why; prelabel requeue-failed sends them back",
        )
