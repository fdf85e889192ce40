"""Writing tags as a "CVAT for images 1.1" annotation file, and the matching label spec.

CVAT imports the XML through "Upload annotations" (format "CVAT 1.1"), matching each
`<image>` to a task frame by its file name. The task's labels must carry the same
attributes; `labels_spec` gives them in the JSON that CVAT's raw label editor accepts.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

CONFIDENCE_ATTRIBUTE = "confidence"
MODEL_ATTRIBUTE = "model"


@dataclass(frozen=True)
class TaggedImage:
    """One image with the tags to write: (label, probability) pairs."""

    index: int
    """The frame number in the task (the image's position in the sorted folder)."""
    name: str
    width: int | None
    height: int | None
    tags: tuple[tuple[str, float], ...]


def confidence_value(probability: float) -> int:
    """A probability as CVAT's integer 0-100 number attribute."""
    return max(0, min(100, round(probability * 100)))


def labels_spec(labels: Sequence[str]) -> list[dict]:
    """Tag labels with the confidence and model attributes, in CVAT's raw label JSON."""
    return [
        {
            "name": label,
            "type": "tag",
            "attributes": [
                {
                    "name": CONFIDENCE_ATTRIBUTE,
                    "mutable": True,
                    "input_type": "number",
                    "default_value": "0",
                    "values": ["0", "100", "1"],
                },
                {
                    "name": MODEL_ATTRIBUTE,
                    "mutable": True,
                    "input_type": "text",
                    "default_value": "",
                    "values": [""],
                },
            ],
        }
        for label in labels
    ]


def write_cvat_xml(
    path: Path,
    *,
    task_name: str,
    size: int,
    labels: Sequence[str],
    model_identity: str,
    images: Sequence[TaggedImage],
) -> None:
    """Write the annotation file; `images` holds only the images that get tags."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    meta = ET.SubElement(root, "meta")
    task = ET.SubElement(meta, "task")
    ET.SubElement(task, "name").text = task_name
    ET.SubElement(task, "size").text = str(size)
    ET.SubElement(task, "mode").text = "annotation"
    labels_node = ET.SubElement(task, "labels")
    for spec in labels_spec(labels):
        label_node = ET.SubElement(labels_node, "label")
        ET.SubElement(label_node, "name").text = spec["name"]
        ET.SubElement(label_node, "type").text = spec["type"]
        attributes_node = ET.SubElement(label_node, "attributes")
        for attribute in spec["attributes"]:
            node = ET.SubElement(attributes_node, "attribute")
            ET.SubElement(node, "name").text = attribute["name"]
            ET.SubElement(node, "mutable").text = str(attribute["mutable"])
            ET.SubElement(node, "input_type").text = attribute["input_type"]
            ET.SubElement(node, "default_value").text = attribute["default_value"]
            ET.SubElement(node, "values").text = "\n".join(attribute["values"])
    ET.SubElement(meta, "dumped").text = datetime.now(UTC).isoformat()
    for image in sorted(images, key=lambda item: item.index):
        node = ET.SubElement(root, "image", id=str(image.index), name=image.name)
        if image.width and image.height:
            node.set("width", str(image.width))
            node.set("height", str(image.height))
        for label, probability in image.tags:
            tag = ET.SubElement(node, "tag", label=label, source="auto")
            ET.SubElement(tag, "attribute", name=CONFIDENCE_ATTRIBUTE).text = str(
                confidence_value(probability)
            )
            ET.SubElement(tag, "attribute", name=MODEL_ATTRIBUTE).text = model_identity
    ET.indent(root)
    tmp = path.with_suffix(path.suffix + ".tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(path)
