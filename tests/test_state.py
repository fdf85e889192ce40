"""The state file: a file written by the previous release opens, migrates and keeps its records."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from prelabel.errors import PrelabelError
from prelabel.state import SCHEMA_VERSION, FrameRecord, Outcome, RunState, StatesByServer, StateServerError

# prelabel 0.1's DDL, exactly as prelabel/state.py had it (schema version 0, none recorded).
PREVIOUS_RELEASE_DDL = """
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


def _previous_release_file(path: Path) -> None:
    """A state file as prelabel 0.1 wrote it: its DDL, its positional INSERTs, no version."""
    with sqlite3.connect(path) as db:
        db.executescript(PREVIOUS_RELEASE_DDL)
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("host", "http://cvat.example:8080"))
        scores = json.dumps([["cat", 0.91], ["dog", 0.05]])
        db.execute(
            "INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (7, 0, 3, "a.jpg", "f1", scores, "accept", None, "uploaded", json.dumps([101]), None, 1.0),
        )
        db.execute(
            "INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (7, 1, 3, "b.jpg", "f1", json.dumps([["dog", 0.4]]), "review", "low", "decided", "[]", 55, 2.0),
        )
        db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)", (7, 3, "f1", 1, 1, 3.0))
        db.execute(
            "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (7, 1, "dog", "review", "changed", json.dumps(["cat"]), 1, 4.0),
        )
        db.execute("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", ("m", "task 3 frame 0", b"\x00" * 8))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_previous_release_state_file_opens_migrates_and_keeps_its_records(tmp_path: Path):
    path = tmp_path / "state.db"
    _previous_release_file(path)

    with RunState(path) as state:
        assert state.schema_version() == SCHEMA_VERSION > 0
        assert state.meta("host") == "http://cvat.example:8080"
        assert state.frames() == [
            FrameRecord(
                7,
                0,
                3,
                "a.jpg",
                "f1",
                [("cat", 0.91), ("dog", 0.05)],
                "accept",
                None,
                "uploaded",
                [101],
                None,
            ),
            FrameRecord(7, 1, 3, "b.jpg", "f1", [("dog", 0.4)], "review", "low", "decided", [], 55),
        ]
        assert [f.frame for f in state.frames(decision="review")] == [1]
        assert state.job_routed(7) and state.job_ids() == [7]
        assert state.outcomes() == [Outcome(7, 1, "dog", "review", "changed", ["cat"], True)]
        assert state.embeddings("m", ["task 3 frame 0"]) == {"task 3 frame 0": b"\x00" * 8}
        # and it keeps working: new records next to the old ones
        state.record_upload(7, 1, tag_ids=[102])
        assert state.frames(job_id=7)[1].tag_ids == [102] and state.frames(job_id=7)[1].issue_id == 55

    with sqlite3.connect(path) as db:  # the migration step ran once and is recorded
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {row[1] for row in db.execute("PRAGMA index_list(frames)")}
        assert {"frames_by_decision", "frames_review_by_margin", "frames_review_by_label"} <= indexes
        assert "frames_by_task" in indexes
    with RunState(path) as state:  # opening again changes nothing
        assert state.schema_version() == SCHEMA_VERSION and len(state.frames()) == 2


def test_a_state_file_from_a_newer_release_is_refused(tmp_path: Path):
    path = tmp_path / "state.db"
    with RunState(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(PrelabelError, match="newer than this prelabel"):
        RunState(path).open()


def test_a_closed_state_says_so_instead_of_failing_an_assert(tmp_path: Path):
    state = RunState(tmp_path / "state.db")
    with pytest.raises(PrelabelError, match="not open"):
        state.meta("host")


def test_a_version_1_file_gains_the_review_and_task_indexes_and_pages_from_them(tmp_path: Path):
    """A file of the release before (schema 1) migrates to the indexes that `review list`
    pages from: a page's query reads the index in order, with no sort of every review frame."""
    path = tmp_path / "state.db"
    _previous_release_file(path)
    with sqlite3.connect(path) as db:  # what the release with schema 1 left behind
        db.execute("CREATE INDEX frames_by_decision ON frames (decision, job_id, frame)")
        db.execute("PRAGMA user_version = 1")

    with RunState(path) as state:
        assert state.schema_version() == SCHEMA_VERSION
        executed: list[str] = []  # the SQL the queries run, to ask SQLite how it runs them
        state.db.set_trace_callback(executed.append)
        for order in ("margin", "label"):
            for handled in (False, True):
                executed.clear()
                found = state.review_frames(order=order, include_handled=handled, limit=10)
                reviewed = state.frames(job_id=7)[1]  # its outcome: a reviewer changed the label
                assert found == ([(reviewed, "changed")] if handled else [])
                page = next(sql for sql in executed if "LIMIT" in sql)
                plan = " | ".join(row[3] for row in state.db.execute(f"EXPLAIN QUERY PLAN {page}"))
                assert f"USING INDEX frames_review_by_{order}" in plan and "TEMP B-TREE" not in plan, plan
        state.db.set_trace_callback(None)
        plan = " | ".join(
            row[3] for row in state.db.execute("EXPLAIN QUERY PLAN SELECT * FROM frames WHERE task_id = 3")
        )
        assert "frames_by_task" in plan, plan
        assert [f.frame for f in state.frames(task_id=3)] == [0, 1] and state.frames(task_id=4) == []


def test_a_state_file_is_bound_to_one_server(tmp_path: Path):
    path = tmp_path / "state.db"
    with RunState(path) as state:
        state.claim_host("https://cvat.example.com/")
        state.claim_host("HTTPS://CVAT.example.com")  # the same server, spelled otherwise
        state.record_job(5, 2, "fp", 0, routed=True)
        with pytest.raises(StateServerError) as refused:
            state.claim_host("https://staging.example.com")
        assert state.meta("host") == "https://cvat.example.com" and state.job_routed(5)
    assert "records the work of the CVAT server https://cvat.example.com, not of https://staging" in str(
        refused.value
    )

    states = StatesByServer(RunState(path))  # a worker whose file already serves one server
    states.first.open()
    try:
        other = states.for_host("https://staging.example.com:8443")
        assert other.path == tmp_path / "state@staging.example.com_8443.db"
        assert other.meta("host") == "https://staging.example.com:8443" and not other.job_routed(5)
        assert states.for_host("https://staging.example.com:8443") is other
        assert states.for_host("https://cvat.example.com") is states.first
    finally:
        states.close()
    with RunState(tmp_path / "state@staging.example.com_8443.db") as reopened:  # its lock was let go
        assert reopened.meta("host") == "https://staging.example.com:8443"
