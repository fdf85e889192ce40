"""The options every command shares, defined once: the config, model overrides, the target,
the CVAT server and login, and connecting to it.

Each group of options reaches the command as one argument: `model_options` as
``overrides`` (dotted config keys for `load_config`), `target_options` as ``target`` (the
ids given), `server_options` and `login_options` as ``server`` (for `connect_to`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from prelabel.config import Config, model_overrides

if TYPE_CHECKING:
    from connectors.cvat.session import CvatSession

TARGET_KEYS = ("project_id", "task_id", "job_id")
SERVER_KEYS = ("server_host", "auth", "profile", "organization", "insecure", "ca_bundle")
MODEL_KEYS = (
    "model", "pretrained", "device", "batch_size", "quantize",
    "accept_threshold", "min_margin", "multi_label",
)  # fmt: skip


def _stack(options: list[Callable], func: Callable) -> Callable:
    for option in reversed(options):
        func = option(func)
    return func


def _bundle(name: str, keys: tuple[str, ...], make: Callable[..., Any]) -> Callable[[Callable], Callable]:
    """Pass the parameters `keys` to the command as one argument, ``name=make(**values)``."""

    def decorator(func: Callable) -> Callable:
        @functools.wraps(func)
        def command(*args, **kwargs):
            values = {key: kwargs.pop(key) for key in keys if key in kwargs}
            return func(*args, **{**kwargs, name: make(**values)})

        return command

    return decorator


def config_option(func: Callable) -> Callable:
    path = click.Path(path_type=Path)
    return click.option("--config", "config_path", type=path, help="YAML config file.")(func)


def state_option(func: Callable) -> Callable:
    return click.option(
        "--state", "state_path", type=click.Path(path_type=Path), help="State file (SQLite)."
    )(func)


def progress_option(func: Callable) -> Callable:
    return click.option("--progress/--no-progress", default=True, help="Show a progress bar.")(func)


def model_options(func: Callable) -> Callable:
    """--config, --profile and the flags that override the config's model and routing
    sections (passed as ``overrides``; see `prelabel.config.model_overrides`)."""
    options = [
        config_option,
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
    return _stack(options, _bundle("overrides", MODEL_KEYS, model_overrides)(func))


def target_options(func: Callable) -> Callable:
    """--project-id, --task-id, --job-id, passed as ``target``: the ones given (see `one_target`)."""
    options = [
        click.option("--project-id", type=int, help="Every job of this project."),
        click.option("--task-id", type=int, help="Every job of this task."),
        click.option("--job-id", type=int, help="This job only."),
    ]

    def given(**ids: int | None) -> dict[str, int]:
        return {key: value for key, value in ids.items() if value is not None}

    return _stack(options, _bundle("target", TARGET_KEYS, given)(func))


def one_target(target: dict[str, int]) -> dict[str, int]:
    """The target, checked to be exactly one of the three."""
    if len(target) != 1:
        raise click.UsageError("give exactly one of --project-id, --task-id or --job-id")
    return target


_AUTH = click.option(
    "--auth",
    metavar="USER[:PASS]",
    help="User and password; the PASS variable can hold the password. "
    "Without it: CVAT_ACCESS_TOKEN, CVAT_USERNAME/CVAT_PASSWORD, or a cvat-cli profile.",
)
_PROFILE = click.option(
    "--cvat-profile",
    "profile",
    help="A saved cvat-cli profile (server and token); the default profile is used "
    "when no host or credentials are given.",
)
_INSECURE = click.option(
    "--insecure", is_flag=True, help="Skip TLS certificate checks (trusted networks only)."
)
_CA_BUNDLE = click.option(
    "--ca-bundle",
    type=click.Path(dir_okay=False),
    help="A PEM file of certificate authorities to trust (a server with a private CA).",
)


def _server(**values: Any) -> dict[str, Any]:
    return {key: values.get(key) for key in SERVER_KEYS}


def server_options(func: Callable) -> Callable:
    """Where the CVAT server is and how to log in (as cvat-cli does), passed as ``server``."""
    options = [
        click.option("--server-host", help="CVAT URL, e.g. https://app.cvat.ai (or CVAT_HOST)."),
        _AUTH,
        _PROFILE,
        click.option("--org", "organization", metavar="SLUG", help="Organization slug."),
        _INSECURE,
        _CA_BUNDLE,
    ]
    return _stack(options, _bundle("server", SERVER_KEYS, _server)(func))


def login_options(func: Callable) -> Callable:
    """How a queue worker logs in, passed as ``server``; the server comes with each entry."""
    options = [_AUTH, _PROFILE, _INSECURE, _CA_BUNDLE]
    return _stack(options, _bundle("server", SERVER_KEYS, _server)(func))


def connect_to(
    config: Config, server: dict[str, Any], target: dict[str, int] | None = None, *, writes: str | None = None
) -> CvatSession:
    """Log in with the `server` options (else CVAT_HOST, else the config's host) under the
    config's retry policy and timeout, then, before any model is loaded, check what the
    credentials can do: a command that `writes` (its name) needs a token with write access,
    and the `target` is worked on in its organization (connectors/cvat/access.py)."""
    from connectors.cvat.access import check_access
    from connectors.cvat.connect import ServerOptions, connect

    organization = server.get("organization")
    session = connect(
        ServerOptions(
            host=server.get("server_host") or os.environ.get("CVAT_HOST") or config.cvat.host,
            auth=server.get("auth"),
            profile=server.get("profile"),
            organization=organization if organization is not None else config.cvat.organization,
            insecure=bool(server.get("insecure")),
            ca_bundle=server.get("ca_bundle"),
        ),
        config.retry,
    )
    for notice in check_access(session, target, writes=writes):
        click.echo(notice, err=True)
    return session


def labels_option(help_text: str) -> Callable[[Callable], Callable]:
    """--labels a,b,c, passed as a list of names (empty when not given)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
        from prelabel.config import split_labels

        names = split_labels(value)
        if value is not None and not names:
            raise click.BadParameter("give at least one label, e.g. --labels cat,dog,car")
        return names

    return click.option("--labels", callback=parse, help=help_text)
