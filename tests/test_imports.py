"""Every module of the package imports first and alone, in a fresh interpreter (no import cycle
hides behind another module having been imported before)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> list[str]:
    found = []
    for package in ("prelabel", "connectors"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py":  # runs the command line when imported
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def _import_alone(module: str) -> tuple[str, int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env, timeout=600
    )
    last = done.stderr.strip().splitlines()[-1:]
    return module, done.returncode, last[0] if last else ""


def test_every_module_imports_first_and_alone_in_a_fresh_interpreter():
    modules = _modules()
    expected = {"prelabel.cli", "prelabel.cli.queue", "connectors.queue.tasks", "prelabel.cvat_function"}
    assert expected <= set(modules)
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 2) as pool:
        results = list(pool.map(_import_alone, modules))
    failed = [f"{module}: {error}" for module, code, error in results if code != 0]
    assert not failed, "\n".join(failed)
