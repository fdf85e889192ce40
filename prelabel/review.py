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
PAGE_SIZE = 50
"""Frames per page of `review list` unless told otherwise."""


@dataclass(frozen=True)
class ReviewPage:
    """One page of the review queue and where it lies in the whole."""

    items: list[QueueItem]
    total: int
    """Frames in the whole queue (as filtered)."""
    offset: int
    """Frames before this page."""

    @property
    def more(self) -> bool:
        return self.offset + len(self.items) < self.total


def review_page(
    state: RunState,
    *,
    include_handled: bool = False,
    order: str = "margin",
    limit: int | None = PAGE_SIZE,
    offset: int = 0,
) -> ReviewPage:
    """`limit` review frames from `offset` (all with None), where a human look is worth most first.

    ``margin``: the most uncertain (smallest lead of the top-1 label) first, since those
    are the frames the model is likeliest to get wrong. ``label``: grouped by the top-1
    label (so a reviewer can work one label at a time), most uncertain first within each.
    Ties go by job and frame, so consecutive pages are disjoint and together complete.
    The state file does the paging: a page reads its own rows only.
    """
    host = (state.meta("host") or "").rstrip("/")
    rows = state.review_frames(include_handled=include_handled, order=order, limit=limit, offset=offset)
    items = [
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
        for record, outcome in rows
    ]
    total = state.count_review_frames(include_handled=include_handled)
    return ReviewPage(items=items, total=total, offset=offset)


def pending_items(
    state: RunState, *, include_handled: bool = False, order: str = "margin"
) -> list[QueueItem]:
    """Every review frame recorded in `state`, in `review_page`'s order."""
    return review_page(state, include_handled=include_handled, order=order, limit=None).items


def write_items(items: list[QueueItem], fmt: str, stream: TextIO, page: ReviewPage | None = None) -> None:
    """Write the queue as an aligned table, CSV or JSON; the table ends with a count line
    (which part of the whole `page` is, when given)."""
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
        stream.write(page_summary(page) if page is not None else f"{len(rows)} frames to review")
        stream.write("\n")


def page_summary(page: ReviewPage) -> str:
    """``frames 51-100 of 1234 to review (--page 3: the next 50)``, or ``12 frames to review``."""
    if page.offset == 0 and not page.more:
        return f"{page.total} frames to review"
    if not page.items:
        return f"no frames on this page; {page.total} frames to review"
    shown = f"frames {page.offset + 1}-{page.offset + len(page.items)} of {page.total} to review"
    if page.more:
        size = len(page.items)
        following = min(size, page.total - page.offset - size)
        return f"{shown} (--page {page.offset // size + 2}: the next {following})"
    return shown
