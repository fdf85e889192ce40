"""`prelabel review list` and `prelabel review sync`: the review queue and its outcomes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from prelabel.cli.options import config_option, connect_to, server_options, state_option
from prelabel.errors import PrelabelError


@click.group()
def review() -> None:
    """The review queue: frames prelabel routed to a human, as CVAT issues."""


def _state_file(config, state_path: Path | None) -> Path:
    path = Path(state_path or config.state.path)
    if not path.exists():
        raise PrelabelError(f"no state file at {path}", hint="run `prelabel run` first, or pass --state")
    return path


@review.command(name="list")
@config_option
@state_option
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
@click.option("--all", "show_all", is_flag=True, help="Include items a reviewer already handled.")
@click.option(
    "--order",
    type=click.Choice(["margin", "label"]),
    default="margin",
    show_default=True,
    help="margin: the most uncertain frames first; label: grouped by the predicted label.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Frames per page (0: every frame on one page).",
)
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True, help="Which page.")
def review_list(config_path, state_path, fmt, show_all, order, limit, page):
    """Print the pending review items with direct links into CVAT, a page at a time.

    The table ends with the count (frames 1-50 of N); with csv and json, that line goes to
    stderr when there are more pages, so that stdout stays one document.
    """
    from prelabel.config import load_config
    from prelabel.review import page_summary, review_page, write_items
    from prelabel.state import RunState

    path = _state_file(load_config(config_path), state_path)
    with RunState(path, lock=False) as state:
        found = review_page(
            state, include_handled=show_all, order=order, limit=limit or None, offset=(page - 1) * limit
        )
    write_items(found.items, fmt, sys.stdout, found)
    if fmt != "table" and (found.more or found.offset):
        click.echo(page_summary(found), err=True)


@review.command(name="sync")
@config_option
@state_option
@click.option("--job-id", "job_ids", type=int, multiple=True, help="Only these jobs (repeatable).")
@server_options
def review_sync(config_path, state_path, job_ids, server):
    """Read back what reviewers did in CVAT and record each frame's outcome.

    Outcomes: kept (the predicted label stands), changed (another label), deleted (the tag
    is gone), added (a reviewer tagged a frame that had no suggestion), pending (the issue
    is still open). They are the ground truth that calibration learns from.
    """
    from connectors.cvat.sync import sync_reviews
    from prelabel.config import load_config
    from prelabel.state import RunState

    config = load_config(config_path)
    path = _state_file(config, state_path)
    session = connect_to(config, server)
    with RunState(path) as state:
        state.claim_host(session.host)
        counts = sync_reviews(session, state, list(job_ids) or None)
    summary = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())) or "nothing to sync"
    click.echo(f"synced: {summary}")
