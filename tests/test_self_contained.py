"""The repository needs nothing beside it: no code names a path outside its own tree.

A clone in an empty folder has no sibling reference folder; the CVAT material the tests read
is vendored under `tests/assets/cvat-2.73/`. This guard keeps it that way.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("tests", "benchmarks", "prelabel", "connectors")

# Written so that this file does not match itself.
_OUTSIDE = [
    re.compile(r"(?<![.\w])\.\./"),  # "../x" (an ellipsis such as ".../annotations" is fine)
    re.compile(r"parent\s*/\s*[\"']" + "shared" + r"[\"']"),  # the checkout's parent, then shared
    re.compile(r"\b(?:REPO|ROOT|HERE)\.parent\b"),  # one level above the checkout
]
_PARENTS = re.compile(r"__file__\)\.resolve\(\)\.parents\[(\d+)\]")


def outside_references(path: Path, root: Path = REPO) -> list[str]:
    """The lines of `path` that name a location outside `root`, as "file:line: text"."""
    depth = len(path.resolve().relative_to(root.resolve()).parts) - 1  # folders between root and file
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        hit = any(pattern.search(line) for pattern in _OUTSIDE)
        hit = hit or any(int(k) > depth for k in _PARENTS.findall(line))  # parents[depth] is the root
        if hit:
            found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_code_reads_outside_the_repository():
    files = [p for folder in SCANNED for p in sorted((REPO / folder).rglob("*.py"))]
    files = [p for p in files if p.resolve() != Path(__file__).resolve()]  # this file names the patterns
    files.append(REPO / "Makefile")
    assert len(files) > 50
    offending = [line for path in files for line in outside_references(path)]
    assert offending == [], "paths outside the repository:\n" + "\n".join(offending)


SIBLING, UP = "shared", "../"  # apart, so that no line of this file names the sibling folder


def test_the_guard_catches_a_read_of_the_sibling_shared_folder(tmp_path: Path):
    tests = tmp_path / "tests"
    tests.mkdir()
    bad = tests / "test_bad.py"
    bad.write_text(
        "from pathlib import Path\n"
        "REPO = Path(__file__).resolve().parents[1]\n"
        f"A = REPO.parent / '{SIBLING}' / 'cvat'\n"
        f"C = Path('{UP}{SIBLING}/cvat/schema-2.73.0.yml')\n"
        "D = Path(__file__).resolve().parents[2] / 'shared'\n"
        "E = 'GET .../annotations?action=create'\n",
        encoding="utf-8",
    )
    flagged = outside_references(bad, root=tmp_path)
    assert [line.split(":")[1] for line in flagged] == ["3", "4", "5"]


def test_the_vendored_cvat_material_is_complete():
    assets = REPO / "tests" / "assets" / "cvat-2.73"
    assert (assets / "schema-2.73.0.yml").stat().st_size > 100_000
    assert len(list((assets / "responses").glob("*.json"))) >= 30
    assert {p.stem for p in (assets / "webhooks").glob("*.json")} >= {
        "create_task",
        "completed_request_create_task",
        "update_job",
        "create_issue",
    }
    assert "Latencies of a real CVAT 2.73.0 server" in (assets / "README.md").read_text(encoding="utf-8")
