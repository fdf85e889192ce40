"""The local-folder connector: images from a folder in, CVAT-importable files out.

`FolderSource` yields every image file under a folder (recursively, sorted by path).
`FolderSink` writes, into an output folder:

- ``annotations.xml``: the accepted tags, "CVAT for images 1.1", for "Upload annotations";
- ``labels.json``: the labels with their attributes, for CVAT's raw label editor;
- ``review.jsonl``: one line per image that needs a human, with its candidates and reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from connectors.cvat_xml import TaggedImage, labels_spec, write_cvat_xml
from prelabel.errors import InputError
from prelabel.interface import Decision, Frame

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jfif", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class FolderRef:
    """Where a folder frame came from: its position in the sorted listing and its path."""

    index: int
    relative: str


class FolderSource:
    """The image files under `root`, recursively, in sorted order.

    Files whose suffix is not an image suffix are skipped (and counted in `skipped`);
    a file with an image suffix that turns out not to be an image still becomes a
    frame, which ends in review with the reason.
    """

    def __init__(self, root: Path) -> None:
        if not root.exists():
            raise InputError(f"folder not found: {root}")
        if not root.is_dir():
            raise InputError(f"not a folder: {root}")
        files = sorted(
            (path for path in root.rglob("*") if path.is_file() and not _hidden(path, root)),
            key=lambda path: path.relative_to(root).as_posix(),
        )
        self.root = root
        self.paths = [path for path in files if path.suffix.lower() in IMAGE_SUFFIXES]
        self.skipped = len(files) - len(self.paths)
        if not self.paths:
            raise InputError(
                f"no images in {root}"
                + (f" ({self.skipped} other files skipped)" if self.skipped else "")
                + f"; image suffixes are {', '.join(sorted(IMAGE_SUFFIXES))}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def frames(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            relative = path.relative_to(self.root).as_posix()
            ref = FolderRef(index, relative)
            try:
                yield Frame(ref=ref, name=relative, data=path.read_bytes())
            except OSError as exc:
                yield Frame(ref=ref, name=relative, data=None, error=f"cannot read file: {exc.strerror}")


class FolderSink:
    """Collects decisions and writes the annotation, label and review files on close."""

    def __init__(
        self,
        out_dir: Path,
        *,
        labels: Sequence[str],
        model_identity: str,
        size: int,
        task_name: str,
    ) -> None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder {out_dir}: {exc.strerror}") from None
        self.out_dir = out_dir
        self.labels = list(labels)
        self.model_identity = model_identity
        self.size = size
        self.task_name = task_name
        self._tagged: list[TaggedImage] = []
        self._review = (out_dir / "review.jsonl").open("w", encoding="utf-8")

    @property
    def annotations_path(self) -> Path:
        return self.out_dir / "annotations.xml"

    @property
    def review_path(self) -> Path:
        return self.out_dir / "review.jsonl"

    def write(self, decision: Decision) -> None:
        prediction = decision.prediction
        ref: FolderRef = prediction.ref
        if decision.accepted:
            width, height = prediction.size or (None, None)
            self._tagged.append(TaggedImage(ref.index, ref.relative, width, height, decision.tags))
            return
        record = {
            "image": ref.relative,
            "frame": ref.index,
            "reason": decision.reason,
            "candidates": [{"label": label, "score": round(p, 6)} for label, p in prediction.scores],
        }
        self._review.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._review.close()
        write_cvat_xml(
            self.annotations_path,
            task_name=self.task_name,
            size=self.size,
            labels=self.labels,
            model_identity=self.model_identity,
            images=self._tagged,
        )
        (self.out_dir / "labels.json").write_text(
            json.dumps(labels_spec(self.labels), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
