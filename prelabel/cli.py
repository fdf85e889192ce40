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

log = logging.getLogger("prelabel")

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
        click.option(
            "--config", "config_path", type=click.Path(path_type=Path), help="YAML config file."
        ),
        click.option("--model", help="open_clip model name, hf-hub:org/repo or local-dir:PATH."),
        click.option(
            "--pretrained",
            help="Pretrained tag, a checkpoint file, or 'none' for random weights (tests only).",
        ),
        click.option("--device", help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Images per model batch."),
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
    return {
        "model.name": values.get("model"),
        "model.pretrained": values.get("pretrained"),
        "model.device": values.get("device"),
        "model.batch_size": values.get("batch_size"),
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
    click.echo(format_summary(stats, title=f"{images_dir}"))
    if source.skipped:
        click.echo(f"  skipped {source.skipped} files that are not images")
    click.echo(f"  tags:   {sink.annotations_path}\n  review: {sink.review_path}")


def main() -> None:
    """Console entry point: runs the CLI and turns user errors into one-line messages."""
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
