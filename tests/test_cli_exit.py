"""What the console entry point does on its way out (`prelabel.cli.group._settle_before_exit`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

_SCRIPT = """
import gc
import sys
from pathlib import Path

from prelabel.cli import main


class Pending:
    '''Garbage in a reference cycle, so only the garbage collector can finalize it.'''

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        Path(sys.argv[1]).write_text("finalized")


gc.disable()  # no automatic collection: the cycle is still pending when the command ends
Pending()
main(["--version"])
"""


def test_finalizers_left_pending_by_a_command_still_run(tmp_path: Path) -> None:
    """The entry point exempts the surviving objects from the shutdown collections, but first
    collects the garbage the command left, so a finalizer still runs (and runs while the
    modules it uses are intact)."""
    marker = tmp_path / "marker"
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(marker)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "version" in done.stdout
    assert marker.read_text() == "finalized"
