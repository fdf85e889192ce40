"""The `prelabel` command line (`prelabel.cli:main`, `python -m prelabel`).

`group.py` holds the click group and registers the commands of `label.py` (folder, setup,
run), `review.py`, `calibrate.py` (eval, calibrate), `queue.py` (enqueue, worker, status,
requeue-failed) and `webhooks.py` (serve, webhook); `options.py` the options they share.
"""

from prelabel.cli.group import cli, main, run_command_line

__all__ = ["cli", "main", "run_command_line"]
