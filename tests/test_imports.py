"""Every module of the package imports first and alone, in a fresh interpreter (no import cycle
hides behind another module having been imported before).

One fresh interpreter imports the heavy third-party libraries once (torch alone takes seconds),
then forks a child per module of ours: each child starts with no module of this repository
imported and imports just that one. A cycle among our modules fails there as it would in a
new process, and the whole check costs one torch import instead of one per module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imported once before forking; none of them imports a module of this repository.
THIRD_PARTY = (
    "numpy", "PIL", "torch", "torchvision", "open_clip", "cvat_sdk", "scipy", "matplotlib.pyplot",
    "pydantic", "click", "yaml", "tqdm", "av", "rq", "redis", "tenacity", "urllib3", "starlette", "uvicorn",
    "prometheus_client",
)  # fmt: skip

_CHECKER = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    packages, modules, preload = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3].split(",")
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    ours = [m for m in sys.modules if m.split(".")[0] in packages]
    assert not ours, f"preloading imported modules of ours: {ours}"
    failed = 0
    for module in modules:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(module)
                code = 0
            except BaseException:
                os.write(write, traceback.format_exc().strip().splitlines()[-1].encode())
                code = 1
            os._exit(code)
        os.close(write)
        with os.fdopen(read) as pipe:
            error = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed += 1
            print(f"{module}: {error or 'exit status ' + str(status)}")
    sys.exit(1 if failed else 0)
    """
)


def modules_of(root: Path, packages: tuple[str, ...]) -> list[str]:
    """Every importable module under the `packages` folders of `root` (``__main__`` aside)."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "__main__.py":  # runs the command line when imported
                continue
            parts = path.relative_to(root).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def import_each_alone(root: Path, packages: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run the checker in a fresh interpreter with `root` first on the path."""
    modules = modules_of(root, packages)
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", _CHECKER, ",".join(packages), ",".join(modules), ",".join(THIRD_PARTY)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )


def test_every_module_imports_first_and_alone_in_a_fresh_interpreter():
    assert {"prelabel.cli", "prelabel.cli.queue", "connectors.queue.tasks", "prelabel.cvat_function"} <= set(
        modules_of(ROOT, ("prelabel", "connectors"))
    )
    done = import_each_alone(ROOT, ("prelabel", "connectors"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_catches_an_import_cycle(tmp_path: Path):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import B\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\nB = 2\n")
    (package / "c.py").write_text("C = 3\n")
    done = import_each_alone(tmp_path, ("cyclic",))
    assert done.returncode == 1
    failures = sorted(line.split(":")[0] for line in done.stdout.splitlines())
    assert failures == ["cyclic.a", "cyclic.b"], done.stdout
    assert "partially initialized module" in done.stdout


def _imported_by(*modules: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing `modules`."""
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_heavy_libraries_are_imported_only_by_the_commands_that_use_them():
    """`prelabel --help` loads no model or server library; `prelabel run` none of calibration's,
    the service's or the queue's (start-up time)."""
    cli = _imported_by("prelabel.cli")
    assert "click" in cli
    heavy = {"scipy", "matplotlib", "pandas", "starlette", "uvicorn", "rq", "redis", "prometheus_client"}
    assert not cli & (heavy | {"torch", "numpy", "cvat_sdk"}), cli & (heavy | {"torch", "numpy", "cvat_sdk"})
    run = _imported_by(
        "prelabel.cli", "connectors.cvat.connect", "connectors.cvat.assign", "connectors.cvat.driver",
        "prelabel.assemble", "prelabel.state",
    )  # fmt: skip
    assert {"torch", "open_clip", "cvat_sdk"} <= run
    assert not run & (heavy | {"av"}), run & (heavy | {"av"})
