"""CVAT labels: which are candidates, the attributes prelabel writes, and `setup`.

A candidate is a label of type `tag` or `any` (not a skeleton's sublabel). Each tag that
prelabel writes carries a `confidence` number attribute (0-100) and a `model` text
attribute; `needs_review` (a checkbox) marks a suggestion a reviewer must check. `setup`
adds whichever of these a label lacks and changes nothing else; `run` never does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cvat_sdk import models

from connectors.cvat.errors import CvatError
from connectors.cvat.session import CvatSession
from connectors.cvat_xml import CONFIDENCE_ATTRIBUTE, MODEL_ATTRIBUTE, confidence_value

log = logging.getLogger(__name__)

NEEDS_REVIEW_ATTRIBUTE = "needs_review"
CANDIDATE_TYPES = frozenset({"tag", "any"})

ATTRIBUTE_SPECS: dict[str, dict] = {
    CONFIDENCE_ATTRIBUTE: {
        "input_type": "number",
        "mutable": True,
        "default_value": "0",
        "values": ["0", "100", "1"],
    },
    MODEL_ATTRIBUTE: {"input_type": "text", "mutable": True, "default_value": "", "values": [""]},
    NEEDS_REVIEW_ATTRIBUTE: {
        "input_type": "checkbox",
        "mutable": True,
        "default_value": "false",
        "values": ["false"],
    },
}
REQUIRED_ATTRIBUTES = (CONFIDENCE_ATTRIBUTE, MODEL_ATTRIBUTE)


@dataclass(frozen=True)
class CvatLabel:
    """A candidate label and the spec ids of its attributes, by attribute name."""

    id: int
    name: str
    attributes: dict[str, int]
    input_types: dict[str, str]


def candidate_labels(labels: Iterable) -> list[CvatLabel]:
    """The labels a tag can use, from cvat-sdk label models (a project's or a task's)."""
    found = []
    for label in labels:
        if text_value(getattr(label, "type", "any")) not in CANDIDATE_TYPES or getattr(
            label, "parent_id", None
        ):
            continue
        found.append(
            CvatLabel(
                id=label.id,
                name=label.name,
                attributes={attr.name: attr.id for attr in label.attributes},
                input_types={attr.name: text_value(attr.input_type) for attr in label.attributes},
            )
        )
    return found


def text_value(value) -> str:
    """cvat-sdk wraps enum fields (input_type) in model objects that carry a `.value`."""
    return str(getattr(value, "value", value))


def missing_attributes(label: CvatLabel, wanted: Sequence[str] = tuple(ATTRIBUTE_SPECS)) -> list[str]:
    return [name for name in wanted if name not in label.attributes]


def check_schema(labels: Sequence[CvatLabel], where: str, setup_hint: str) -> None:
    """Fail unless there are candidates and each has the attributes `run` writes."""
    if not labels:
        raise CvatError(
            f"{where} has no labels of type tag or any, so there is nothing to tag with",
            hint="add tag labels to it in CVAT",
        )
    lacking = {label.name: missing_attributes(label, REQUIRED_ATTRIBUTES) for label in labels}
    lacking = {name: attrs for name, attrs in lacking.items() if attrs}
    if lacking:
        listed = "; ".join(f"{name!r} lacks {', '.join(attrs)}" for name, attrs in lacking.items())
        raise CvatError(
            f"{where}: labels lack the attributes prelabel writes: {listed}",
            hint=f"run `{setup_hint}` once to add them (it changes nothing else)",
        )
    for label in labels:
        if label.input_types.get(CONFIDENCE_ATTRIBUTE) != "number":
            raise CvatError(
                f"{where}: the {CONFIDENCE_ATTRIBUTE!r} attribute of {label.name!r} is not a number"
            )


def add_missing_attributes(session: CvatSession, labels: Sequence[CvatLabel]) -> dict[str, list[str]]:
    """Add the attributes each label lacks (PATCH /api/labels/{id}); returns what was added.

    Existing attributes are kept as they are; a second call adds nothing.
    """
    added = {}
    for label in labels:
        names = missing_attributes(label)
        if not names:
            continue
        request = models.PatchedLabelRequest(
            attributes=[models.AttributeRequest(name=name, **ATTRIBUTE_SPECS[name]) for name in names]
        )
        # Attributes are matched by name on the server, so a repeated request adds nothing twice.
        session.call(
            f"adding attributes to label {label.name!r}",
            lambda label=label, request=request: session.client.api_client.labels_api.partial_update(
                label.id, patched_label_request=request
            ),
        )
        added[label.name] = names
    return added


def tag_payload(
    label: CvatLabel, frame: int, probability: float, model_identity: str, *, needs_review: bool
) -> dict:
    """The JSON of one auto tag, for PATCH /api/jobs/{id}/annotations?action=create."""
    attributes = [
        {"spec_id": label.attributes[CONFIDENCE_ATTRIBUTE], "value": str(confidence_value(probability))},
        {"spec_id": label.attributes[MODEL_ATTRIBUTE], "value": model_identity[:1024]},
    ]
    if NEEDS_REVIEW_ATTRIBUTE in label.attributes:
        attributes.append(
            {
                "spec_id": label.attributes[NEEDS_REVIEW_ATTRIBUTE],
                "value": "true" if needs_review else "false",
            }
        )
    return {
        "frame": frame,
        "label_id": label.id,
        "source": "auto",
        "group": 0,
        "attributes": attributes,
    }
