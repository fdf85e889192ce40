"""The `prelabel` command line.

Every problem a user can cause ends as one line on stderr and a non-zero exit code;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from prelabel.errors import PrelabelError

_state = {"debug": False}


def _split_labels(value: str | None) -> list[str] | None:
    if value is None:
        return None
    labels = [part.strip() for part in value.split(",") if part.strip()]
    if not labels:
        raise click.BadParameter("give at least one label, e.g. --labels cat,dog,car")
    return labels


def model_options(func):
    """The flags that override the config's model and routing sections."""
    options = [
        click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML config file."),
        click.option("--model", help="open_clip model name, hf-hub:org/repo or local-dir:PATH."),
        click.option(
            "--pretrained",
            help="Pretrained tag, a checkpoint file, or 'none' for random weights (tests only).",
        ),
        click.option("--device", help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Images per model batch."),
        click.option(
            "--quantize",
            type=click.Choice(["none", "int8"]),
            help="int8: dynamic quantization of the linear layers (CPU only).",
        ),
        click.option(
            "--profile",
            "profile_path",
            type=click.Path(path_type=Path),
            help="Write the time spent per stage to this JSON file.",
        ),
        click.option(
            "--accept-threshold",
            type=click.FloatRange(0, 1),
            help="Accept a tag when its probability is at least this.",
        ),
        click.option(
            "--min-margin",
            type=click.FloatRange(0, 1),
            help="...and it leads the second label by at least this.",
        ),
        click.option(
            "--multi-label/--single-label",
            default=None,
            help="Tag every label above its threshold instead of the top-1 only.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _overrides(**values) -> dict:
    """Dotted config keys from the model options; an explicit threshold or margin on the
    command line wins over the calibration file, which is then not applied."""
    explicit = values.get("accept_threshold") is not None or values.get("min_margin") is not None
    return {
        "calibration.use": False if explicit else None,
        "model.name": values.get("model"),
        "model.pretrained": values.get("pretrained"),
        "model.device": values.get("device"),
        "model.batch_size": values.get("batch_size"),
        "model.quantize": values.get("quantize"),
        "routing.accept_threshold": values.get("accept_threshold"),
        "routing.min_margin": values.get("min_margin"),
        "routing.multi_label": values.get("multi_label"),
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="prelabel")
def cli(debug: bool, quiet: bool) -> None:
    """Zero-shot pre-labeling for CVAT with OpenCLIP.

    Each image gets a tag with a confidence score from the label names (and optional
    descriptions) alone, with no training images. Confident tags are written out; the
    rest go to a human review queue.

    \b
    Start here:
      prelabel folder samples/images --labels cat,coffee,rocket --out out/demo
    """
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    for noisy in ("root", "urllib3", "PIL", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@cli.command()
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option("--labels", help="Comma-separated label names (or list them in the config).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder for annotations.xml, labels.json and review.jsonl.",
)
@model_options
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def folder(
    images_dir: Path,
    labels: str | None,
    out_dir: Path,
    config_path: Path | None,
    progress: bool,
    **flags,
):
    """Pre-label every image in IMAGES_DIR (no CVAT server needed).

    Writes OUT/annotations.xml (accepted tags, "CVAT for images 1.1", to import with
    CVAT's "Upload annotations"), OUT/labels.json (the labels with their confidence and
    model attributes, for CVAT's raw label editor) and OUT/review.jsonl (images that
    need a human, with the top candidates and the reason).
    """
    from connectors.folder import FolderSink, FolderSource
    from prelabel.config import load_config

    config = load_config(config_path, _overrides(**flags))
    names = _split_labels(labels) or [label.name for label in config.labels]
    source = FolderSource(images_dir)

    from prelabel.runner import build_pipeline, format_summary, run  # imports torch: slow

    pipeline = build_pipeline(config, names)
    sink = FolderSink(
        out_dir,
        labels=names,
        model_identity=pipeline.loaded.identity,
        size=len(source),
        task_name=images_dir.resolve().name,
    )
    stats = run(source, sink, pipeline, progress=progress)
    _write_profile(flags.get("profile_path"), stats)
    click.echo(format_summary(stats, title=f"{images_dir}", labels=names, expected=pipeline.label_shares))
    if source.skipped:
        click.echo(f"  skipped {source.skipped} files that are not images")
    click.echo(f"  tags:   {sink.annotations_path}\n  review: {sink.review_path}")


def server_options(func):
    """Where the CVAT server is and how to log in (as cvat-cli does)."""
    options = [
        click.option("--server-host", help="CVAT URL, e.g. https://app.cvat.ai (or CVAT_HOST)."),
        click.option(
            "--auth",
            metavar="USER[:PASS]",
            help="User and password; the PASS variable can hold the password. "
            "Without it: CVAT_ACCESS_TOKEN, CVAT_USERNAME/CVAT_PASSWORD, or a cvat-cli profile.",
        ),
        click.option(
            "--cvat-profile",
            "profile",
            help="A saved cvat-cli profile (server and token); the default profile is used "
            "when no host or credentials are given.",
        ),
        click.option("--org", "organization", metavar="SLUG", help="Organization slug."),
        click.option("--insecure", is_flag=True, help="Skip TLS certificate checks (trusted networks only)."),
        click.option(
            "--ca-bundle",
            type=click.Path(dir_okay=False),
            help="A PEM file of certificate authorities to trust (a server with a private CA).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def target_options(func):
    """Exactly one of --project-id, --task-id, --job-id."""
    options = [
        click.option("--project-id", type=int, help="Every job of this project."),
        click.option("--task-id", type=int, help="Every job of this task."),
        click.option("--job-id", type=int, help="This job only."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _one_target(project_id, task_id, job_id) -> dict:
    given = {
        key: value
        for key, value in (("project_id", project_id), ("task_id", task_id), ("job_id", job_id))
        if value is not None
    }
    if len(given) != 1:
        raise click.UsageError("give exactly one of --project-id, --task-id or --job-id")
    return given


def _connect(config, server_host, auth, profile, organization, insecure, ca_bundle):
    import os

    from connectors.cvat import retry
    from connectors.cvat.connect import ServerOptions, connect

    retry.configure(config.retry)
    host = server_host or os.environ.get("CVAT_HOST") or config.cvat.host
    return connect(
        ServerOptions(
            host=host,
            auth=auth,
            profile=profile,
            organization=organization if organization is not None else config.cvat.organization,
            insecure=insecure,
            ca_bundle=ca_bundle,
            timeout=config.retry.timeout,
        )
    )


def _setup_hint(target: dict) -> str:
    key, value = next(iter(target.items()))
    if key == "job_id":
        return "prelabel setup --project-id N (or --task-id N) for the job's project or task"
    return f"prelabel setup --{key.replace('_', '-')} {value}"


@cli.command()
@target_options
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML config file.")
@server_options
def setup(project_id, task_id, job_id, config_path, **server):
    """Add the attributes prelabel writes to a project's (or task's) tag labels.

    Each label of type tag or any gets, where it lacks them, a `confidence` number
    attribute (0-100), a `model` text attribute and a `needs_review` checkbox. Existing
    attributes and everything else stay as they are; running it twice changes nothing.
    """
    from connectors.cvat.jobs import find_labels
    from connectors.cvat.labels import add_missing_attributes, check_schema
    from prelabel.config import load_config

    target = _one_target(project_id, task_id, job_id)
    if "job_id" in target:
        raise click.UsageError("setup works on a project or a task: give --project-id or --task-id")
    config = load_config(config_path)
    client = _connect(config, **server)
    where, labels = find_labels(client, **target)
    added = add_missing_attributes(client, labels)
    for name, attributes in added.items():
        click.echo(f"label {name!r}: added {', '.join(attributes)}")
    if not added:
        click.echo(f"{where}: every tag label already has the attributes; nothing changed")
    check_schema(find_labels(client, **target)[1], where, _setup_hint(target))


@cli.command(name="run")
@target_options
@model_options
@server_options
@click.option("--dry-run", is_flag=True, help="Print what would be done; write nothing.")
@click.option("--limit", type=click.IntRange(min=1), help="Label at most this many frames (trials).")
@click.option(
    "--quality",
    type=click.Choice(["compressed", "original"]),
    default="compressed",
    show_default=True,
    help="Which frame quality to download.",
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
@click.option("--state", "state_path", type=click.Path(path_type=Path), help="State file (SQLite).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--queue", "queue_url", metavar="URL", help="Hand the jobs to workers on this Redis queue.")
def run_command(
    project_id, task_id, job_id, config_path, dry_run, limit, quality, include_tagged, relabel,
    state_path, progress, server_host, auth, profile, organization, insecure, ca_bundle, queue_url, **flags,
):  # fmt: skip
    """Pre-label the jobs of a CVAT project, task or job that still need labels.

    Frames are streamed chunk by chunk through the model. Each accepted frame gets a tag
    (source "auto") with its confidence (0-100) and the model's name as attributes. Each
    other frame gets a CVAT issue listing the candidates (and, if configured, its top-1
    tag as a suggestion marked needs_review); jobs with review items go to a reviewer.
    Running it again writes nothing new; after a crash it completes what is missing.
    Frames a person tagged are skipped, and no human annotation is ever changed.
    """
    from connectors.cvat.assign import resolve_reviewers
    from connectors.cvat.driver import JobOptions, candidate_names, label_jobs
    from connectors.cvat.jobs import find_work
    from prelabel.config import load_config
    from prelabel.state import RunState

    target = _one_target(project_id, task_id, job_id)
    config = load_config(config_path, _overrides(**flags))
    if queue_url:  # scale-out: workers label the jobs (prelabel/cli_queue.py)
        from prelabel.cli_queue import run_on_queue

        server = dict(server_host=server_host, auth=auth, profile=profile, organization=organization,
                      insecure=insecure, ca_bundle=ca_bundle)  # fmt: skip
        return run_on_queue(queue_url, target, config, server, relabel=relabel, include_tagged=include_tagged,
                            quality=quality, limit=limit, dry_run=dry_run, progress=progress)  # fmt: skip
    client = _connect(config, server_host, auth, profile, organization, insecure, ca_bundle)
    work = find_work(
        client,
        **target,
        include_tagged=include_tagged,
        relabel=relabel,
        suggestions=config.review.upload_suggestion,
        limit=limit,
    )
    names = candidate_names(work, config, _setup_hint(target))
    reviewers = resolve_reviewers(client, config.review.reviewers)
    _print_plan(work, names, dry_run)
    if dry_run:
        return

    from prelabel.runner import RunStats, build_pipeline, format_summary

    with RunState(Path(state_path or config.state.path)) as state:
        state.set_meta("host", client.api_map.host)
        pipeline = build_pipeline(config, names)
        total = RunStats()
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
            )
            total.merge(stats)
            per_job[plan.job_id] = stats

        options = JobOptions(quality=quality, relabel=relabel, progress=progress, reviewers=reviewers)
        label_jobs(client, work, pipeline, config, options, state, on_job=report)
        click.echo(format_summary(total, title=f"{work.where}", labels=names, expected=pipeline.label_shares))
        _write_profile(flags.get("profile_path"), total, per_job)
        click.echo("  review queue: prelabel review list")


@cli.group()
def review() -> None:
    """The review queue: frames prelabel routed to a human, as CVAT issues."""


@review.command(name="list")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML config file.")
@click.option("--state", "state_path", type=click.Path(path_type=Path), help="State file (SQLite).")
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
def review_list(config_path, state_path, fmt, show_all, order):
    """Print the pending review items with direct links into CVAT."""
    from prelabel.config import load_config
    from prelabel.review import pending_items, write_items
    from prelabel.state import RunState

    config = load_config(config_path)
    path = Path(state_path or config.state.path)
    if not path.exists():
        raise PrelabelError(f"no state file at {path}", hint="run `prelabel run` first, or pass --state")
    with RunState(path, lock=False) as state:
        items = pending_items(state, include_handled=show_all, order=order)
    write_items(items, fmt, sys.stdout)


@review.command(name="sync")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML config file.")
@click.option("--state", "state_path", type=click.Path(path_type=Path), help="State file (SQLite).")
@click.option("--job-id", "job_ids", type=int, multiple=True, help="Only these jobs (repeatable).")
@server_options
def review_sync(config_path, state_path, job_ids, **server):
    """Read back what reviewers did in CVAT and record each frame's outcome.

    Outcomes: kept (the predicted label stands), changed (another label), deleted (the tag
    is gone), added (a reviewer tagged a frame that had no suggestion), pending (the issue
    is still open). They are the ground truth that calibration learns from.
    """
    from connectors.cvat.sync import sync_reviews
    from prelabel.config import load_config
    from prelabel.state import RunState

    config = load_config(config_path)
    path = Path(state_path or config.state.path)
    if not path.exists():
        raise PrelabelError(f"no state file at {path}", hint="run `prelabel run` first, or pass --state")
    client = _connect(config, **server)
    with RunState(path) as state:
        counts = sync_reviews(client, state, list(job_ids) or None)
    summary = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())) or "nothing to sync"
    click.echo(f"synced: {summary}")


def _print_plan(work, names: list[str], dry_run: bool) -> None:
    prefix = "dry run: would label" if dry_run else "labeling"
    click.echo(f"{work.where}: labels {', '.join(names)}")
    for plan in work.jobs:
        click.echo(
            f"  job {plan.job_id} (task {plan.task_id}): {prefix} {len(plan.frames)} frames"
            f" ({plan.already_done} done before, {plan.already_tagged} tagged by people,"
            f" {plan.deleted} deleted)"
        )
    for job_id, why in sorted(work.skipped_jobs.items()):
        click.echo(f"  job {job_id}: skipped, {why}")
    click.echo(f"  {work.frame_count} frames in {len(work.jobs)} jobs")


def _write_profile(path: Path | None, total, per_job: dict | None = None) -> None:
    """--profile: the seconds per stage (download, unpack, decode, model, upload, waits) as JSON."""
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

    document = {"total": figures(total)}
    if per_job:
        document["jobs"] = {str(job): figures(stats) for job, stats in per_job.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    click.echo(f"  profile: {path}")


from prelabel.cli_webhooks import register as _register_webhooks  # noqa: E402

_register_webhooks(cli)

from prelabel.cli_queue import register as _register_queue_commands  # noqa: E402

_register_queue_commands(cli)

import prelabel.cli_calibrate  # noqa: E402, F401  (its `eval` and `calibrate` register on import)


def main() -> None:
    """Console entry point: runs the CLI and turns user errors into one-line messages."""
    from prelabel.memory import tune_allocator

    tune_allocator()
    try:
        cli.main(standalone_mode=False)
    except PrelabelError as exc:
        if _state["debug"]:
            raise
        click.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if _state["debug"]:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(
            f"internal error: {type(exc).__name__}: {message} (run with --debug for the traceback)",
            err=True,
        )
        sys.exit(1)
