"""Ground truth from local files: one subfolder per label, or a CSV of paths and labels.

- Folder layout: ``ROOT/<label>/<any depth>/<image>``; the first folder names the label.
  Images directly under ROOT have no label and are left out (and counted).
- CSV: a header with ``path`` and ``label`` columns; paths are relative to the CSV's
  folder; several labels are separated by ``;``; an empty label means "none of them".
"""

from __future__ import annotations

import csv
from collections.abc import Collection, Hashable, Iterator
from pathlib import Path

from connectors.folder import IMAGE_SUFFIXES, _hidden
from prelabel.errors import InputError
from prelabel.interface import Example, Frame


class LabeledFolder:
    """A `GroundTruthSource` over labeled image files."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise InputError(f"ground truth not found: {path}")
        self.where = f"{'CSV' if path.is_file() else 'folder'} {path}"
        self.skipped = 0
        rows = self._read_csv(path) if path.is_file() else self._read_tree(path)
        if not rows:
            raise InputError(
                f"no labeled images in {path}",
                hint="use one subfolder per label (ROOT/cat/1.jpg), or a CSV with 'path' and 'label' columns",
            )
        self._examples = [
            Example(ref=str(file), key=_key(file), labels=labels, source="labeled files")
            for file, labels in rows
        ]

    def examples(self) -> list[Example]:
        return list(self._examples)

    def frames(self, refs: Collection[Hashable]) -> Iterator[Frame]:
        for ref in refs:
            path = Path(str(ref))
            try:
                yield Frame(ref=ref, name=path.name, data=path.read_bytes())
            except OSError as exc:
                yield Frame(ref=ref, name=path.name, data=None, error=f"cannot read file: {exc.strerror}")

    def _read_tree(self, root: Path) -> list[tuple[Path, tuple[str, ...]]]:
        rows = []
        for file in sorted(root.rglob("*")):
            if not file.is_file() or _hidden(file, root) or file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            parts = file.relative_to(root).parts
            if len(parts) < 2:
                self.skipped += 1
                continue
            rows.append((file, (parts[0],)))
        return rows

    def _read_csv(self, path: Path) -> list[tuple[Path, tuple[str, ...]]]:
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                fields = [name.strip().lower() for name in reader.fieldnames or []]
                if "path" not in fields or "label" not in fields:
                    raise InputError(f"{path}: the CSV needs a header with 'path' and 'label' columns")
                reader.fieldnames = fields
                rows = []
                for line, row in enumerate(reader, start=2):
                    if not (row.get("path") or "").strip():
                        raise InputError(f"{path}:{line}: empty path")
                    file = (path.parent / row["path"].strip()).resolve()
                    if not file.is_file():
                        raise InputError(f"{path}:{line}: no such image file: {row['path'].strip()}")
                    labels = tuple(
                        part.strip() for part in (row.get("label") or "").split(";") if part.strip()
                    )
                    rows.append((file, labels))
                return rows
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 CSV file") from None
        except csv.Error as exc:
            raise InputError(f"{path}: malformed CSV: {exc}") from None


def _key(file: Path) -> str:
    """Names the file's content version: a changed file is encoded again."""
    stat = file.stat()
    return f"file:{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
