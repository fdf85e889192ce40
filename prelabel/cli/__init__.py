"""The `prelabel` command line (`prelabel.cli:main`, `python -m prelabel`)."""

from prelabel.cli.label import cli, main

__all__ = ["cli", "main"]
