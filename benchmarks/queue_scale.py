"""The queue and the state file at scale: ``python -m benchmarks.queue_scale [--jobs 2000]``.

Against a real `redis-server` (tests/redis_fixture.py): `enqueue_entries` of JOBS entries
into an empty queue, then again (every job already pending: nothing added), and
`prelabel status` (in-process and as the CLI) with JOBS entries (a tenth of them finished,
a twentieth failed). Then a state file of FRAMES frames over JOBS jobs (a third routed to
review, a tenth of those with an outcome): `review list`'s first page (in-process and as the
CLI) and the file's size. Prints one line per figure; no assertion, no file written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis

from benchmarks.dataset import REPO
from connectors.queue.enqueue import QueueOptions, enqueue_entries
from connectors.queue.entries import Entry, open_queue
from prelabel.config import load_config
from tests.redis_fixture import redis_server

HOST = "http://cvat.example:8080"


def entries(jobs: int) -> list[Entry]:
    """JOBS entries with the default config as payload, as `plan_entries` makes them."""
    data = load_config(None).model_dump(mode="json")
    return [
        Entry(host=HOST, job_id=1000 + job, organization=None, config=data, target="project 1")
        for job in range(jobs)
    ]


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def cli(*args: str) -> tuple[float, str]:
    """Seconds a `python -m prelabel ...` takes (process start and imports included), its stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "prelabel", *args], capture_output=True, text=True, env=env, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"prelabel {' '.join(args)} failed: {done.stderr.strip()}")
    return seconds, done.stdout


def finish_some(connection: Redis, ids: list[str], finished: int, failed: int) -> None:
    """Move entries to the finished and failed registries as a worker would (no CVAT needed)."""
    from rq.job import Job, JobStatus

    from connectors.queue.entries import SERIALIZER

    queue = open_queue(connection)
    for index, key in enumerate(ids[: finished + failed]):
        job = Job.fetch(key, connection=connection, serializer=SERIALIZER)
        queue.remove(job)
        with connection.pipeline() as pipe:
            if index < finished:
                job._handle_success(result_ttl=600, pipeline=pipe, worker_name="bench")
            else:
                job.set_status(JobStatus.FAILED, pipeline=pipe)
                job._handle_failure("Exception: bench", pipeline=pipe, worker_name="bench")
            pipe.execute()


def queue_figures(jobs: int) -> None:
    work = entries(jobs)
    options = QueueOptions()
    with redis_server() as url:
        connection = Redis.from_url(url)
        seconds, done = timed(lambda: enqueue_entries(connection, work, options))
        print(f"enqueue_entries, {jobs} new entries: {seconds:.2f} s ({len(done.added)} added)")
        seconds, done = timed(lambda: enqueue_entries(connection, work, options))
        print(f"enqueue_entries again, all {jobs} pending: {seconds:.2f} s ({len(done.added)} added)")
        finish_some(connection, [done.ids[entry.job_id] for entry in work], jobs // 10, jobs // 20)
        from connectors.queue.status import STATES, read_status

        seconds, _ = timed(lambda: read_status(connection))
        print(f"read_status, counts and workers (in-process), {jobs} entries: {seconds:.3f} s")
        seconds, _ = timed(lambda: read_status(connection, STATES))
        print(f"read_status, every entry listed (in-process): {seconds:.3f} s")
        seconds, out = cli("status", "--queue", url)
        first = out.splitlines()[0]
        print(f"`prelabel status` (CLI, process start included): {seconds:.2f} s; first line: {first}")
        seconds, out = cli("status", "--queue", url, "--format", "json")
        print(f"`prelabel status --format json` (CLI): {seconds:.2f} s, {len(out)} characters")
        seconds, out = cli("status", "--queue", url, "--list", "failed")
        print(f"`prelabel status --list failed` (CLI): {seconds:.2f} s, {len(out.splitlines())} lines")
        seconds, _ = cli("--help")
        print(f"`prelabel --help` (CLI start-up alone, for comparison): {seconds:.2f} s")


def state_file(path: Path, jobs: int, frames: int) -> None:
    """FRAMES frames spread over JOBS jobs, a third for review, a tenth of those with an outcome."""
    from prelabel.state import Outcome, RunState

    rng = random.Random(18)
    labels = ["cat", "dog", "fox", "rocket", "coffee"]
    per_job = frames // jobs
    with RunState(path) as state:
        state.set_meta("host", HOST)
        rows, outcomes = [], []
        for job in range(jobs):
            for frame in range(job * per_job, (job + 1) * per_job):
                top = rng.uniform(0.2, 0.99)
                second = rng.uniform(0.0, 1 - top)
                names = rng.sample(labels, 3)
                scores = [[names[0], top], [names[1], second], [names[2], (1 - top - second) / 2]]
                review = rng.random() < 1 / 3
                rows.append(
                    (1000 + job, frame, 10 + job // 100, f"frame_{frame:06d}.jpg", "fp", json.dumps(scores),
                     "review" if review else "accept", "low confidence" if review else None, "uploaded",
                     "[1]", 5 if review else None, time.time())
                )  # fmt: skip
                if review and rng.random() < 0.1:
                    outcomes.append(Outcome(1000 + job, frame, names[0], "review", "kept", [names[0]], True))
        with state.transaction() as tx:
            tx.executemany("INSERT INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            tx.executemany(
                "INSERT INTO jobs (job_id, task_id, fingerprint, review_items, routed, updated) "
                "VALUES (?, ?, 'fp', 1, 1, ?)",
                [(1000 + job, 10 + job // 100, time.time()) for job in range(jobs)],
            )
        for outcome in outcomes:
            state.record_outcome(outcome)


def state_figures(jobs: int, frames: int) -> None:
    from prelabel.state import RunState

    with tempfile.TemporaryDirectory(prefix="prelabel-bench-") as folder:
        path = Path(folder) / "state.db"
        seconds, _ = timed(lambda: state_file(path, jobs, frames))
        with RunState(path, lock=False) as state:
            state._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = path.stat().st_size
        print(f"state file, {frames} frames / {jobs} jobs: {size / 1e6:.1f} MB (written in {seconds:.1f} s)")
        import prelabel.review as review

        with RunState(path, lock=False) as state:
            for order in ("margin", "label"):
                seconds, page = timed(lambda order=order: review.review_page(state, order=order))
                print(
                    f"review_page, first page by {order} (in-process): {seconds:.3f} s, "
                    f"{len(page.items)} of {page.total} frames"
                )
            seconds, page = timed(lambda: review.review_page(state, limit=50, offset=page.total - 50))
            print(f"review_page, last page by margin (in-process): {seconds:.3f} s")
        for order in ("margin", "label"):
            seconds, out = cli("review", "list", "--state", str(path), "--order", order)
            lines = len(out.splitlines())
            print(f"`prelabel review list --order {order}` (CLI): {seconds:.2f} s, {lines} lines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--skip-queue", action="store_true")
    parser.add_argument("--skip-state", action="store_true")
    args = parser.parse_args()
    if not args.skip_queue:
        queue_figures(args.jobs)
    if not args.skip_state:
        state_figures(args.jobs, args.frames)


if __name__ == "__main__":
    main()
