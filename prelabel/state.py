"""The run state: a SQLite file that records what prelabel decided and wrote, frame by frame.

It is a record and a cache, never the source of truth: a run decides what to write from
the server's state, so a lost state file costs a re-read, and the memory of which of
prelabel's tags people removed (`tagged_frames`). It serves one CVAT server (`claim_host`).
It holds, per (job, frame): the prediction (top-k with scores), the decision, the upload
status, the server ids of the created tags and issue, and the fingerprint of model, prompts
and thresholds; per job, whether its review routing was applied, its `created_date` on the
server, and the `updated_date` at which prelabel last saw it finished (a rerun skips reading
it while that date holds); and the outcomes that `review sync` read back. No secret is ever
stored here.

The file carries its schema version (SQLite's ``user_version``); opening a file of an older
release migrates it in place, step by step (`_MIGRATIONS`), keeping every record. Rows are
read by column name, never by position.

One process at a time holds the run lock (an exclusive `flock` beside the database, which
the kernel releases when the process dies, even on SIGKILL).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prelabel.errors import PrelabelError

DEFAULT_STATE_PATH = Path(".prelabel/state.db")

SCHEMA_VERSION = 4
"""The version this release writes. 0: prelabel 0.1 (no version recorded)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS frames (
    job_id INTEGER NOT NULL,
    frame INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    scores TEXT NOT NULL,           -- JSON [[label, probability], ...], most likely first
    decision TEXT NOT NULL,         -- 'accept' or 'review'
    reason TEXT,
    status TEXT NOT NULL,           -- 'decided', then 'uploaded'
    tag_ids TEXT NOT NULL DEFAULT '[]',
    issue_id INTEGER,
    updated REAL NOT NULL,
    PRIMARY KEY (job_id, frame)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    review_items INTEGER NOT NULL,
    routed INTEGER NOT NULL DEFAULT 0,  -- 1 once assignee/stage/state were applied
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outcomes (
    job_id INTEGER NOT NULL,
    frame INTEGER NOT NULL,
    predicted TEXT,                 -- prelabel's top-1 label
    decision TEXT NOT NULL,
    outcome TEXT NOT NULL,          -- kept, changed, deleted, added, pending
    final_labels TEXT NOT NULL,     -- JSON list of the frame's tag labels after review
    issue_resolved INTEGER,
    synced REAL NOT NULL,
    PRIMARY KEY (job_id, frame)
);
CREATE TABLE IF NOT EXISTS embeddings (
    model TEXT NOT NULL,            -- the model identity the vector came from
    key TEXT NOT NULL,              -- the example's key ('task 3 frame 7', 'file:cats/1.jpg:...')
    vector BLOB NOT NULL,           -- float32 unit image embedding
    PRIMARY KEY (model, key)
);
"""
"""The tables as prelabel 0.1 made them (schema version 0); `_MIGRATIONS` bring them up to date."""

_MARGIN = "ifnull(json_extract(scores, '$[0][1]'), 0) - ifnull(json_extract(scores, '$[1][1]'), 0)"
"""A frame's margin: the lead of its top-1 label's probability over the second's (0 if none)."""
_TOP = "ifnull(json_extract(scores, '$[0][0]'), '')"
"""A frame's top-1 label ('' if none)."""
_REVIEW_ORDERS = {
    "margin": ("frames_review_by_margin", f"{_MARGIN}, frames.job_id, frames.frame"),
    "label": ("frames_review_by_label", f"{_TOP}, {_MARGIN}, frames.job_id, frames.frame"),
}
"""Review order -> the index that holds the frames in that order, and the order itself."""
_STILL_PENDING = " AND (o.outcome IS NULL OR o.outcome = 'pending')"

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 0 -> 1: the review queue reads frames by decision.
    0: ("CREATE INDEX IF NOT EXISTS frames_by_decision ON frames (decision, job_id, frame)",),
    # 1 -> 2: `review list` pages through the review frames in either order without sorting
    # them all; a task's frames are found without reading every frame.
    1: (
        f"CREATE INDEX IF NOT EXISTS frames_review_by_margin ON frames ({_MARGIN}, job_id, frame) "
        "WHERE decision = 'review'",
        f"CREATE INDEX IF NOT EXISTS frames_review_by_label ON frames ({_TOP}, {_MARGIN}, job_id, frame) "
        "WHERE decision = 'review'",
        "CREATE INDEX IF NOT EXISTS frames_by_task ON frames (task_id, frame)",
    ),
    # 2 -> 3: the server's updated_date of a job when prelabel last saw it finished, and under
    # which planning flags, so that a rerun need not read an unchanged finished job again.
    2: (
        "ALTER TABLE jobs ADD COLUMN finished_at TEXT",
        "ALTER TABLE jobs ADD COLUMN finished_flags TEXT",
    ),
    # 3 -> 4: the server's created_date of a job, which tells it from a job of the same
    # number on a server rebuilt at the same address (CVAT numbers jobs from 1 again).
    3: ("ALTER TABLE jobs ADD COLUMN created_at TEXT",),
}
"""From version N to N + 1: the statements, run in one transaction with the version bump."""


class StateLockedError(PrelabelError):
    """Another prelabel process holds the run lock of this state file."""


class StateServerError(PrelabelError):
    """The state file records the work of another CVAT server than the one connected to."""


@dataclass(frozen=True)
class FrameRecord:
    job_id: int
    frame: int
    task_id: int
    name: str
    fingerprint: str
    scores: list[tuple[str, float]]
    decision: str
    reason: str | None
    status: str
    tag_ids: list[int]
    issue_id: int | None


_FRAME_COLUMNS = tuple(FrameRecord.__dataclass_fields__)


def _frame_record(row: sqlite3.Row) -> FrameRecord:
    values = {key: row[key] for key in _FRAME_COLUMNS}
    values["scores"] = [tuple(pair) for pair in json.loads(values["scores"])]
    values["tag_ids"] = json.loads(values["tag_ids"])
    return FrameRecord(**values)


@dataclass(frozen=True)
class Outcome:
    job_id: int
    frame: int
    predicted: str | None
    decision: str
    outcome: str
    final_labels: list[str]
    issue_resolved: bool | None


class RunState:
    """The state file of one project (or any set of jobs). Use as a context manager."""

    def __init__(self, path: Path = DEFAULT_STATE_PATH, *, lock: bool = True) -> None:
        self.path = Path(path)
        self._lock_wanted = lock
        self._lock_file = None
        self._db_lock = threading.RLock()  # the upload thread records too
        self.db: sqlite3.Connection | None = None

    def __enter__(self) -> RunState:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PrelabelError(
                f"cannot create the state folder {self.path.parent}: {exc.strerror}"
            ) from None
        if self._lock_wanted:
            self._acquire_lock()
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            self._migrate()
        except PrelabelError:
            self.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.close()
            raise PrelabelError(
                f"the state file {self.path} is not a usable SQLite database: {exc}"
            ) from None

    def _migrate(self) -> None:
        """Bring the file to `SCHEMA_VERSION`, one step per transaction; refuse a newer file."""
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise PrelabelError(
                f"the state file {self.path} has schema version {version}, newer than this prelabel's "
                f"{SCHEMA_VERSION}",
                hint="upgrade prelabel, or give this run its own --state file",
            )
        while version < SCHEMA_VERSION:
            with self.transaction() as db:
                if db.execute("PRAGMA user_version").fetchone()[0] == version:  # not done by another process
                    for statement in _MIGRATIONS[version]:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {version + 1}")
            version = self.schema_version()

    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _acquire_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open(lock_path, "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StateLockedError(
                f"{self.path} is in use by {holder}: only one prelabel run at a time may use a state file",
                hint="wait for it to finish, or give this run its own --state file",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock_file = handle

    def _connection(self) -> sqlite3.Connection:
        if self.db is None:
            raise PrelabelError(f"the state file {self.path} is not open (use RunState as a context manager)")
        return self.db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        with self._db_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _query(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        db = self._connection()
        with self._db_lock:
            return db.execute(sql, args).fetchall()

    # -- meta -------------------------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def claim_host(self, host: str) -> None:
        """Bind this file to the CVAT server at `host`: recorded in a file that names no server
        yet; a file that names another raises `StateServerError` and is left as it is.

        Its records are keyed by job, task and frame numbers, which every CVAT server counts
        from 1: another server's job 5 would read this one's records, and each frame prelabel
        tagged there would look like a tag a person removed here, never to be written again.
        """
        host = host.rstrip("/")
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'host'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('host', ?)", (host,))
            else:
                self._check_server(row["value"], host)

    def check_host(self, host: str) -> None:
        """`claim_host` without recording: for a look that writes nothing (``run --dry-run``)."""
        recorded = self.meta("host")
        if recorded is not None:
            self._check_server(recorded, host)

    def _check_server(self, recorded: str, host: str) -> None:
        if _server(recorded) != _server(host):
            raise StateServerError(
                f"the state file {self.path} records the work of the CVAT server {recorded}, "
                f"not of {host.rstrip('/')}: job numbers of two servers would mix",
                hint="give each server its own state file (--state FILE, or state.path in the config)",
            )

    # -- frames -----------------------------------------------------------------------------
    def record_decision(
        self,
        *,
        job_id: int,
        frame: int,
        task_id: int,
        name: str,
        fingerprint: str,
        scores: tuple[tuple[str, float], ...],
        decision: str,
        reason: str | None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                """INSERT INTO frames (job_id, frame, task_id, name, fingerprint, scores, decision,
                                       reason, status, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'decided', ?)
                   ON CONFLICT (job_id, frame) DO UPDATE SET
                       task_id = excluded.task_id, name = excluded.name,
                       fingerprint = excluded.fingerprint, scores = excluded.scores,
                       decision = excluded.decision, reason = excluded.reason, updated = excluded.updated,
                       status = CASE WHEN frames.decision = excluded.decision
                                     THEN frames.status ELSE 'decided' END""",
                (
                    job_id,
                    frame,
                    task_id,
                    name,
                    fingerprint,
                    json.dumps(scores),
                    decision,
                    reason,
                    time.time(),
                ),
            )

    def record_upload(
        self, job_id: int, frame: int, *, tag_ids: list[int] | None = None, issue_id: int | None = None
    ) -> None:
        with self.transaction() as db:
            row = db.execute(
                "SELECT tag_ids, issue_id FROM frames WHERE job_id = ? AND frame = ?", (job_id, frame)
            ).fetchone()
            if row is None:
                return
            tags = sorted(set(json.loads(row["tag_ids"])) | set(tag_ids or ()))
            issue = issue_id if issue_id is not None else row["issue_id"]
            db.execute(
                """UPDATE frames SET tag_ids = ?, issue_id = ?, status = 'uploaded', updated = ?
                   WHERE job_id = ? AND frame = ?""",
                (json.dumps(tags), issue, time.time(), job_id, frame),
            )

    def forget_uploads(self, job_id: int, frame: int) -> None:
        """After --relabel removed prelabel's own tags and issue from a frame."""
        with self.transaction() as db:
            db.execute(
                "UPDATE frames SET tag_ids = '[]', issue_id = NULL, status = 'decided' "
                "WHERE job_id = ? AND frame = ?",
                (job_id, frame),
            )

    def frames(
        self, *, job_id: int | None = None, decision: str | None = None, task_id: int | None = None
    ) -> list[FrameRecord]:
        query, args = f"SELECT {', '.join(_FRAME_COLUMNS)} FROM frames WHERE 1=1", []
        if job_id is not None:
            query, args = query + " AND job_id = ?", [*args, job_id]
        if task_id is not None:
            query, args = query + " AND task_id = ?", [*args, task_id]
        if decision is not None:
            query, args = query + " AND decision = ?", [*args, decision]
        rows = self._query(query + " ORDER BY job_id, frame", args)
        return [_frame_record(row) for row in rows]

    # -- jobs -------------------------------------------------------------------------------
    def record_job(
        self,
        job_id: int,
        task_id: int,
        fingerprint: str,
        review_items: int,
        routed: bool,
        *,
        finished_at: str | None = None,
        finished_flags: str | None = None,
        created_at: str | None = None,
    ) -> None:
        """Record a job's routing; `finished_at` is the server's `updated_date` of the job once
        nothing was left to label under `finished_flags` (None: not known finished), and
        `created_at` its `created_date`."""
        with self.transaction() as db:
            db.execute(
                """INSERT OR REPLACE INTO jobs (job_id, task_id, fingerprint, review_items, routed, updated,
                                               finished_at, finished_flags, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    job_id,
                    task_id,
                    fingerprint,
                    review_items,
                    int(routed),
                    time.time(),
                    finished_at,
                    finished_flags if finished_at is not None else None,
                    created_at,
                ),
            )

    def record_finished(self, job_id: int, finished_at: str, flags: str) -> None:
        """A recorded job was seen finished (nothing left to label under `flags`) at the
        server's `updated_date` `finished_at`; a job without a record is left alone."""
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET finished_at = ?, finished_flags = ?, updated = ? WHERE job_id = ?",
                (finished_at, flags, time.time(), job_id),
            )

    def finished_jobs(self, flags: str) -> dict[int, str]:
        """Job id -> the `updated_date` at which each routed job was last seen finished under
        `flags`."""
        rows = self._query(
            "SELECT job_id, finished_at FROM jobs WHERE routed = 1 AND finished_at IS NOT NULL"
            " AND finished_flags = ?",
            (flags,),
        )
        return {row["job_id"]: row["finished_at"] for row in rows}

    def tagged_frames(self, job_id: int, created_at: str | None) -> frozenset[int]:
        """The job's frames where prelabel's tags were written and confirmed by the server
        (status uploaded, tag ids recorded), as `record_upload` left them.

        Only for the job created at `created_at` (its `created_date`, recorded with its
        routing): a job of the same number on a server rebuilt at the same address, or a
        job whose routing was never recorded, gets none.
        """
        if created_at is None:
            return frozenset()
        rows = self._query(
            """SELECT frame FROM frames JOIN jobs USING (job_id)
               WHERE job_id = ? AND jobs.created_at = ? AND status = 'uploaded' AND tag_ids != '[]'""",
            (job_id, created_at),
        )
        return frozenset(row["frame"] for row in rows)

    def job_routed(self, job_id: int) -> bool:
        """Whether the job's routing was applied once, under any model or thresholds.

        New thresholds (a calibration, say) do not route a job again: a person may have
        moved it on since.
        """
        rows = self._query("SELECT routed FROM jobs WHERE job_id = ?", (job_id,))
        return bool(rows and rows[0]["routed"])

    def job_ids(self) -> list[int]:
        rows = self._query("SELECT DISTINCT job_id FROM frames ORDER BY job_id")
        return [row["job_id"] for row in rows]

    # -- outcomes ---------------------------------------------------------------------------
    def record_outcome(self, outcome: Outcome) -> None:
        with self.transaction() as db:
            db.execute(
                """INSERT OR REPLACE INTO outcomes (job_id, frame, predicted, decision, outcome, final_labels,
                                                   issue_resolved, synced)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    outcome.job_id,
                    outcome.frame,
                    outcome.predicted,
                    outcome.decision,
                    outcome.outcome,
                    json.dumps(outcome.final_labels, ensure_ascii=False),
                    None if outcome.issue_resolved is None else int(outcome.issue_resolved),
                    time.time(),
                ),
            )

    # -- the review queue -----------------------------------------------------------------------
    def review_frames(
        self,
        *,
        include_handled: bool = False,
        order: str = "margin",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[tuple[FrameRecord, str]]:
        """The frames routed to review, each with its outcome (``pending`` until synced), in
        `order`: ``margin`` (smallest lead of the top-1 label first) or ``label`` (by top-1 label,
        then margin), ties by job and frame; `limit` of them from `offset`. Read from the index
        that holds that order, so a page costs its own rows, not a sort of every review frame."""
        index, order_by = _REVIEW_ORDERS[order]
        columns = ", ".join(f"frames.{name}" for name in _FRAME_COLUMNS)
        rows = self._query(
            f"""SELECT {columns}, ifnull(o.outcome, 'pending') AS review_outcome
                FROM frames INDEXED BY {index}
                LEFT JOIN outcomes AS o ON o.job_id = frames.job_id AND o.frame = frames.frame
                WHERE frames.decision = 'review'{"" if include_handled else _STILL_PENDING}
                ORDER BY {order_by} LIMIT ? OFFSET ?""",
            (-1 if limit is None else limit, offset),
        )
        return [(_frame_record(row), row["review_outcome"]) for row in rows]

    def count_review_frames(self, *, include_handled: bool = False) -> int:
        """How many frames `review_frames` has in all."""
        rows = self._query(
            f"""SELECT count(*) FROM frames
                LEFT JOIN outcomes AS o ON o.job_id = frames.job_id AND o.frame = frames.frame
                WHERE frames.decision = 'review'{"" if include_handled else _STILL_PENDING}"""
        )
        return int(rows[0][0])

    # -- embeddings ---------------------------------------------------------------------------
    def embeddings(self, model: str, keys: list[str]) -> dict[str, bytes]:
        """The stored float32 embeddings (raw bytes) of these keys under `model`."""
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._query(
                f"SELECT key, vector FROM embeddings WHERE model = ? AND key IN ({marks})", [model, *part]
            )
            found.update((row["key"], row["vector"]) for row in rows)
        return found

    def record_embeddings(self, model: str, items: list[tuple[str, bytes]]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO embeddings (model, key, vector) VALUES (?, ?, ?)",
                [(model, k, v) for k, v in items],
            )

    def outcomes(self) -> list[Outcome]:
        rows = self._query(
            "SELECT job_id, frame, predicted, decision, outcome, final_labels, issue_resolved"
            " FROM outcomes ORDER BY job_id, frame"
        )
        return [
            Outcome(
                job_id=r["job_id"],
                frame=r["frame"],
                predicted=r["predicted"],
                decision=r["decision"],
                outcome=r["outcome"],
                final_labels=json.loads(r["final_labels"]),
                issue_resolved=None if r["issue_resolved"] is None else bool(r["issue_resolved"]),
            )
            for r in rows
        ]


def _server(host: str) -> str:
    """A CVAT server's address as two spellings of it compare."""
    return host.rstrip("/").lower()


@dataclass
class StatesByServer:
    """One state file per CVAT server, for a process that serves several (a queue worker):
    `first`, bound to the first server it is asked for (or the one it already records), and
    beside it ``<stem>@<server><suffix>`` for each other server, opened and locked on first use."""

    first: RunState
    _others: dict[str, RunState] = field(default_factory=dict)

    def for_host(self, host: str) -> RunState:
        """The open state file of the server at `host` (`RunState.claim_host`)."""
        recorded = self.first.meta("host")
        if recorded is None or _server(recorded) == _server(host):
            self.first.claim_host(host)
            return self.first
        key = _server(host)
        if key not in self._others:
            name = re.sub(r"[^a-z0-9.-]+", "_", key.split("://", 1)[-1]).strip("_")
            path = self.first.path
            state = RunState(path.with_name(f"{path.stem}@{name}{path.suffix}"))
            state.open()
            try:
                state.claim_host(host)
            except BaseException:
                state.close()
                raise
            self._others[key] = state
        return self._others[key]

    def close(self) -> None:
        for state in [*self._others.values(), self.first]:
            state.close()
