"""`prelabel serve` and `prelabel webhook install|remove`: hands-free pre-labeling from CVAT's webhooks."""

from __future__ import annotations

import logging
import os
import queue
from pathlib import Path

import click

from prelabel.cli.options import config_option, connect_to, server_options, state_option
from prelabel.errors import ConfigError, PrelabelError

SECRET_ENV = "PRELABEL_WEBHOOK_SECRET"


def _secret(config) -> str:
    secret = os.environ.get(SECRET_ENV) or (
        config.webhook.secret.get_secret_value() if config.webhook.secret else ""
    )
    if not secret:
        raise ConfigError(
            "no webhook secret",
            hint=f"set {SECRET_ENV} (the same for `webhook install` and `serve`) or webhook.secret",
        )
    if len(secret) > 64:
        raise ConfigError("the webhook secret is longer than the 64 characters CVAT stores")
    return secret


@click.command()
@click.option(
    "--listen", default="127.0.0.1:8765", show_default=True, help="HOST:PORT to receive deliveries on."
)
@config_option
@state_option
@click.option(
    "--project-id",
    "project_ids",
    type=int,
    multiple=True,
    help="Act only on these projects (repeatable; default: webhook.projects, else any).",
)
@click.option(
    "--queue",
    "queue_url",
    metavar="URL",
    help="Put new tasks' jobs on this RQ queue (redis://HOST:PORT/DB, or PRELABEL_QUEUE) for "
    "`prelabel worker` processes, instead of labeling them here.",
)
@server_options
def serve(listen, config_path, state_path, project_ids, queue_url, server):
    """Receive CVAT webhook deliveries and pre-label new tasks as they arrive.

    \b
    completed:request[create:task]  pre-label the new task's jobs (tags and review issues)
    update:job to acceptance/completed  `review sync` that job (ground truth for calibration)

    Deliveries must carry CVAT's X-Signature-256 for the secret in PRELABEL_WEBHOOK_SECRET
    (or webhook.secret); others get 401. Each is answered at once and the work runs in a
    background worker, one item at a time. The same event delivered twice starts nothing
    new. GET /metrics answers in Prometheus' format, GET /healthz while it runs, GET /readyz
    while CVAT (and Redis) can be reached; SIGTERM finishes the work in progress and
    stops (work still queued is resumed at the next start). With --queue (or
    PRELABEL_QUEUE), a new task's jobs go on the queue for `prelabel worker` processes;
    syncs still run here.
    """
    from connectors.cvat.observe import check_server
    from connectors.cvat.perform import CvatWork
    from prelabel.config import load_config
    from prelabel.service.deliveries import DeliveryLog
    from prelabel.service.http import (
        InProcessWorker,
        Limits,
        Service,
        emit,
        parse_listen,
        serve,
        use_json_logs,
    )
    from prelabel.service.metrics import Metrics
    from prelabel.state import RunState

    config = load_config(config_path)
    secret = _secret(config)
    address = parse_listen(listen)
    projects = set(project_ids or config.webhook.projects)
    use_json_logs()
    metrics = Metrics()
    connection = None
    if queue_url or os.environ.get("PRELABEL_QUEUE"):
        from connectors.queue.redis_url import connect_queue

        connection = connect_queue(queue_url)
    session = connect_to(config, server, writes="serve")
    checks = {"cvat": lambda: check_server(session)}
    if connection is not None:
        checks["redis"] = connection.ping
    state = Path(state_path or config.state.path)
    with RunState(state, lock=False) as records:  # another server's state file stops it here
        records.claim_host(session.host)
    with DeliveryLog(state.with_name("deliveries.db")) as deliveries:
        perform = CvatWork(session, config, state, connection, metrics)
        worker = InProcessWorker(perform, deliveries, config.webhook.queue_size, metrics)
        for key, item in deliveries.unfinished():
            try:
                worker.submit(key, item)
            except queue.Full:
                emit(logging.WARNING, "unfinished work left for the next start", delivery=key)
            else:
                emit(logging.INFO, "resuming unfinished work", delivery=key)
        service = Service(
            secret=secret,
            interpret=lambda body: _interpret(body, projects),
            deliveries=deliveries,
            dispatcher=worker,
            max_body=config.webhook.max_body_bytes,
            metrics=metrics,
            checks=checks,
        )
        limits = Limits(
            head_timeout=config.webhook.client_timeout,
            body_timeout=config.webhook.client_timeout,
            max_connections=config.webhook.max_connections,
        )
        serve(
            service,
            address,
            limits=limits,
            on_ready=lambda bound: click.echo(f"listening on {bound[0]}:{bound[1]}"),
        )


def _interpret(body, projects: set[int]):
    """A CVAT delivery as the service's `Intent`, ignoring projects not served."""
    from connectors.cvat.webhooks import read_event
    from prelabel.service.http import Intent

    event = read_event(body)
    if event.item is not None and projects and event.project_id not in projects:
        return Intent(event.fields(), reason=f"project {event.project_id} is not one this service serves")
    return Intent(event.fields(), event.key, event.item.to_dict() if event.item else None, event.reason)


@click.group()
def webhook() -> None:
    """The CVAT webhook that feeds `prelabel serve`."""


@webhook.command(name="install")
@click.option("--project-id", type=int, required=True, help="The CVAT project.")
@click.option("--url", required=True, help="Where CVAT delivers: the address of `prelabel serve`.")
@config_option
@server_options
def webhook_install(project_id, url, config_path, server):
    """Create (or update in place) the project's webhook for `prelabel serve`.

    It subscribes to exactly the events `serve` acts on and carries the secret from
    PRELABEL_WEBHOOK_SECRET (stored by CVAT, never printed). Running it again changes
    nothing but the URL, events and secret it gives.
    """
    from urllib.parse import urlsplit

    from connectors.cvat.webhooks import EVENTS, install_webhook
    from prelabel.config import load_config

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PrelabelError(f"--url {url!r} is not an http(s) URL", hint="e.g. --url http://10.0.0.5:8765/")
    config = load_config(config_path)
    secret = _secret(config)
    session = connect_to(config, server, {"project_id": project_id}, writes="webhook install")
    installed = install_webhook(session, project_id, url, secret)
    verb = "created" if installed.created else "updated in place"
    click.echo(f"project {project_id}: webhook {installed.webhook_id} {verb}: {url} ({', '.join(EVENTS)})")


@webhook.command(name="remove")
@click.option("--project-id", type=int, required=True, help="The CVAT project.")
@config_option
@server_options
def webhook_remove(project_id, config_path, server):
    """Delete the project's prelabel webhook (others are left alone)."""
    from connectors.cvat.webhooks import remove_webhook
    from prelabel.config import load_config

    session = connect_to(
        load_config(config_path), server, {"project_id": project_id}, writes="webhook remove"
    )
    removed = remove_webhook(session, project_id)
    if removed:
        click.echo(f"project {project_id}: removed webhook {', '.join(map(str, removed))}")
    else:
        click.echo(f"project {project_id}: no prelabel webhook; nothing changed")
