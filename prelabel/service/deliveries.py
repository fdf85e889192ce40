"""The delivery log: which webhook events were taken on, so that a redelivery starts nothing.

A small SQLite file of its own (beside the run state). Each event that asks for work is
recorded under its key, with the work item, before the work is queued: a second delivery
with the same key is a duplicate while the first is queued, running or done. Work that
failed may be asked for again; work still queued when the service stopped is handed back
by `unfinished` at the next start. The log never holds a secret or a request body.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from prelabel.errors import PrelabelError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    key TEXT PRIMARY KEY,
    item TEXT NOT NULL,             -- JSON work item
    status TEXT NOT NULL,           -- queued, running, done, failed
    detail TEXT,
    received REAL NOT NULL,
    updated REAL NOT NULL,
    duplicates INTEGER NOT NULL DEFAULT 0
);
"""


class DeliveryLog:
    """One service's record of the events it took on. Thread-safe; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise PrelabelError(f"cannot use the delivery log {self.path}: {exc}") from None

    def __enter__(self) -> DeliveryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def claim(self, key: str, item: dict[str, Any]) -> bool:
        """Record the event as queued; False if it is already queued, running or done."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT status FROM deliveries WHERE key = ?", (key,)).fetchone()
                if row is not None and row[0] != "failed":
                    self._db.execute(
                        "UPDATE deliveries SET duplicates = duplicates + 1 WHERE key = ?", (key,)
                    )
                    self._db.execute("COMMIT")
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO deliveries (key, item, status, detail, received, updated)"
                    " VALUES (?, ?, 'queued', NULL, ?, ?)",
                    (key, json.dumps(item, sort_keys=True), now, now),
                )
                self._db.execute("COMMIT")
                return True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def release(self, key: str) -> None:
        """Forget a claim whose work could not be queued, so that a redelivery is taken on."""
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE key = ? AND status = 'queued'", (key,))

    def mark(self, key: str, status: str, detail: str | None = None) -> None:
        """Move an event's work on: running, done or failed (with a one-line detail)."""
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET status = ?, detail = ?, updated = ? WHERE key = ?",
                (status, detail, time.time(), key),
            )

    def unfinished(self) -> list[tuple[str, dict[str, Any]]]:
        """Events whose work was queued or running when the service stopped, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, item FROM deliveries WHERE status IN ('queued', 'running') ORDER BY received"
            ).fetchall()
        return [(key, json.loads(item)) for key, item in rows]

    def records(self) -> list[dict[str, Any]]:
        """Every recorded event, oldest first (for inspection and tests)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, item, status, detail, duplicates FROM deliveries ORDER BY received"
            ).fetchall()
        return [
            {"key": k, "item": json.loads(i), "status": s, "detail": d, "duplicates": n}
            for k, i, s, d, n in rows
        ]
