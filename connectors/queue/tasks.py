"""The old name of the queue's job function, for entries queued by prelabel 0.1.

Entries name their function by dotted path; those queued before the function moved to
`connectors.queue.entries.FUNCTION` name ``connectors.queue.tasks.label_entry``. This
forwards them. The queue package does not import the CVAT connector: the function is
found by its path, as RQ finds it.
"""

from __future__ import annotations

from typing import Any

from rq.utils import import_attribute

from connectors.queue.entries import FUNCTION


def label_entry(payload: dict[str, Any], worker: object = None) -> dict[str, Any]:
    """Run an entry queued under the old path as the current job function."""
    return import_attribute(FUNCTION)(payload, worker=worker)
