"""The text a reviewer reads: one short, safe message per frame routed to review.

Label and frame names come from the server or the user, so they are treated as data:
control characters are removed, whitespace is collapsed and each name is bounded; the
whole message is bounded too.
"""

from __future__ import annotations

import csv
import json
import unicodedata
from dataclasses import dataclass
from typing import TextIO

from prelabel.interface import Decision
from prelabel.state import RunState

MESSAGE_PREFIX = "prelabel:"
NAME_LIMIT = 64


def clean_text(text: str, limit: int = NAME_LIMIT) -> str:
    """`text` without control characters, on one line, at most `limit` characters."""
    kept = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in str(text))
    single = " ".join(kept.split())
    return single if len(single) <= limit else single[: limit - 1] + "…"


def review_message(decision: Decision, *, max_length: int = 500, candidates: int = 3) -> str:
    """E.g. ``prelabel: low confidence 41% (margin 3%). Candidates: cat 41%, dog 38%, fox 9%``."""
    prediction = decision.prediction
    confidence, margin = prediction.confidence, prediction.margin
    if decision.code == "low_confidence":
        what = f"low confidence {confidence:.0%} (margin {margin:.0%})"
    elif decision.code == "small_margin":
        what = f"small margin {margin:.0%} (confidence {confidence:.0%})"
    elif decision.code == "no_label":
        what = "no label reached its threshold"
    else:
        what = clean_text(decision.reason or "needs a look", 200)
    text = f"{MESSAGE_PREFIX} {what}."
    if prediction.scores:
        listed = ", ".join(f"{clean_text(label)} {p:.0%}" for label, p in prediction.scores[:candidates])
        text += f" Candidates: {listed}"
    return clean_text(text, max_length)


@dataclass(frozen=True)
class QueueItem:
    """One frame in the review queue, with a direct link to it in CVAT."""

    job_id: int
    task_id: int
    frame: int
    name: str
    reason: str
    candidates: list[tuple[str, float]]
    link: str
    outcome: str
    """``pending`` until `review sync` finds what a reviewer did."""

    @property
    def margin(self) -> float:
        scores = [p for _, p in self.candidates] + [0.0, 0.0]
        return scores[0] - scores[1]


REVIEW_ORDERS = ("margin", "label")


def pending_items(
    state: RunState, *, include_handled: bool = False, order: str = "margin"
) -> list[QueueItem]:
    """The review frames recorded in `state`, where a human look is worth most first.

    ``margin``: the most uncertain (smallest lead of the top-1 label) first, since those
    are the frames the model is likeliest to get wrong. ``label``: grouped by the top-1
    label (so a reviewer can work one label at a time), most uncertain first within each.
    """
    host = (state.meta("host") or "").rstrip("/")
    outcomes = {(o.job_id, o.frame): o.outcome for o in state.outcomes()}
    items = []
    for record in state.frames(decision="review"):
        outcome = outcomes.get((record.job_id, record.frame), "pending")
        if outcome != "pending" and not include_handled:
            continue
        items.append(
            QueueItem(
                job_id=record.job_id,
                task_id=record.task_id,
                frame=record.frame,
                name=record.name,
                reason=record.reason or "",
                candidates=record.scores,
                link=f"{host}/tasks/{record.task_id}/jobs/{record.job_id}?frame={record.frame}",
                outcome=outcome,
            )
        )
    if order == "label":
        return sorted(items, key=lambda item: (_top(item), item.margin, item.job_id, item.frame))
    return sorted(items, key=lambda item: (item.margin, item.job_id, item.frame))


def _top(item: QueueItem) -> str:
    return item.candidates[0][0] if item.candidates else ""


def write_items(items: list[QueueItem], fmt: str, stream: TextIO) -> None:
    """Write the queue as an aligned table, CSV or JSON."""
    rows = [
        {
            "job": item.job_id,
            "task": item.task_id,
            "frame": item.frame,
            "name": clean_text(item.name, 80),
            "reason": clean_text(item.reason, 120),
            "candidates": ", ".join(f"{clean_text(label)} {p:.0%}" for label, p in item.candidates[:3]),
            "outcome": item.outcome,
            "link": item.link,
        }
        for item in items
    ]
    if fmt == "json":
        json.dump(rows, stream, ensure_ascii=False, indent=2)
        stream.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]) if rows else ["job"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        if not rows:
            stream.write("the review queue is empty\n")
            return
        for row in rows:
            stream.write(f"{row['link']}  {row['reason']}  [{row['candidates']}]  {row['outcome']}\n")
        stream.write(f"{len(rows)} frames to review\n")
