"""The distribution layer's overhead: ``python -m benchmarks.scale`` (``make bench-scale``).

For W = 1, 2 and 4 workers: a fresh CVAT test server with the same project, a fresh
Redis, W long-running worker processes (`benchmarks.scale_worker`: the real worker with a
stand-in model stage of fixed time per batch, which stands in for a GPU), then the
project's jobs are enqueued and timed until every entry has finished. Worker start-up
(imports, model load) is outside the timing: a warm-up task of 4W small jobs runs first,
and every worker must have taken one of them.

Efficiency(W) = throughput(W) / (W x throughput(1)); the target is >= 0.9 up to 4 workers.
It prints a table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvat_sdk import make_client
from redis import Redis
from rq import Worker

from benchmarks.dataset import REPO
from benchmarks.machine import _cpu_model
from connectors.cvat.queued import plan_entries
from connectors.cvat.session import CvatSession
from connectors.queue.enqueue import QueueOptions, enqueue_entries
from connectors.queue.entries import COMPLETIONS, open_queue
from connectors.queue.status import wait_for
from prelabel.config import load_config
from tests.conftest import TINY_MODEL, variants
from tests.cvat_fixtures import PASSWORD, Project
from tests.cvat_server import CvatTestServer
from tests.cvat_server.pytest_fixtures import CAPTURE_LABELS
from tests.redis_fixture import redis_server


def seed(
    server: CvatTestServer, jobs: int, frames_per_job: int, warmup_jobs: int
) -> tuple[Project, int, int]:
    """A project with a warm-up task (2-frame jobs) and the measured task; the two task ids."""
    server.add_user("annotator", PASSWORD)
    attributes = CAPTURE_LABELS[0]["attributes"]
    project_id = server.add_project(
        "scale",
        owner="annotator",
        labels=[
            {"name": name, "type": "tag", "attributes": attributes} for name in ("cat", "coffee", "rocket")
        ],
    )
    warmup = server.add_image_task(
        project_id, _jpegs(2 * warmup_jobs), name="warm-up", segment_size=2, chunk_size=2
    )
    task = server.add_image_task(
        project_id,
        _jpegs(jobs * frames_per_job),
        name="scale",
        segment_size=frames_per_job,
        chunk_size=frames_per_job // 2,
    )
    return Project(server, project_id, [task], warmup, set()), warmup, task


def _jpegs(count: int) -> list[tuple[str, bytes]]:
    frames = []
    for name, image in variants(count, (64, 48)):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        frames.append((f"{name}.jpg", buffer.getvalue()))
    return frames


def measure(workers: int, args: argparse.Namespace, folder: Path) -> tuple[float, int, float]:
    """Seconds from enqueue to the last finished entry, the frames labeled, and the
    worker-seconds spent inside the job function (the per-job path shared with `run`)."""
    config = load_config(
        None,
        {"model.name": TINY_MODEL, "model.pretrained": "none", "model.batch_size": args.batch,
         "model.cache_dir": str(folder / "cache"), "cvat.download_threads": 1},
    )  # fmt: skip
    with redis_server() as url, CvatTestServer(check_answers=False) as server:
        project, warmup, task = seed(server, args.jobs, args.frames_per_job, 4 * workers)
        env = {**os.environ, **project.env(), "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "benchmarks.scale_worker", str(args.standin), "--queue", url]
        processes = [
            subprocess.Popen(
                [*command, "--state", str(folder / f"w{workers}-{index}.db")],
                cwd=folder,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for index in range(workers)
        ]
        try:
            connection = Redis.from_url(url)
            queue = open_queue(connection)
            deadline = time.monotonic() + 120
            while Worker.count(queue=queue) < workers:
                if time.monotonic() > deadline:
                    raise SystemExit("the workers did not start")
                time.sleep(0.2)
            session = CvatSession(make_client(server.url, credentials=("annotator", PASSWORD)))

            def run(target: dict[str, int]) -> tuple[float, dict[str, list[str]]]:
                _, entries = plan_entries(session, target, config)
                start = time.perf_counter()
                done = enqueue_entries(connection, entries, QueueOptions())
                outcome = wait_for(connection, list(done.ids.values()), poll=0.05)
                return time.perf_counter() - start, outcome

            # Warm-up: every worker builds its pipeline (model, classifier) outside the timing.
            run({"task_id": warmup})
            warm = {item["worker"] for item in map(json.loads, connection.lrange(COMPLETIONS, 0, -1))}
            if len(warm) < workers:
                raise SystemExit(f"only {len(warm)} of {workers} workers took a warm-up job")
            before = connection.llen(COMPLETIONS)
            seconds, outcome = run({"task_id": task})
            timed = [json.loads(item) for item in connection.lrange(COMPLETIONS, before, -1)]
            in_jobs = sum(item["seconds"] for item in timed)
            if outcome["failed"]:
                raise SystemExit(f"{len(outcome['failed'])} entries failed")
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=60)
    return seconds, args.jobs * args.frames_per_job, in_jobs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--frames-per-job", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="Frames per model batch.")
    parser.add_argument("--standin", type=float, default=0.25, help="Seconds per model batch (stand-in).")
    parser.add_argument("--no-write", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="prelabel-scale-") as folder:
        base = None
        for workers in args.workers:
            seconds, frames, in_jobs = measure(workers, args, Path(folder))
            throughput = frames / seconds
            base = base or throughput / workers
            efficiency = throughput / (workers * base)
            outside = 1 - in_jobs / (workers * seconds)
            per_job = in_jobs / args.jobs
            rows.append((workers, seconds, throughput, efficiency, per_job, outside))
            print(f"{workers} workers: {frames} frames in {seconds:.2f}s, {throughput:.1f} frames/s, "
                  f"efficiency {efficiency:.3f}, {per_job:.3f}s per job in the job function, "
                  f"{outside:.1%} of worker time outside it", flush=True)  # fmt: skip
    ideal = args.frames_per_job / args.batch * args.standin
    table = [
        f"\n### Scale-out over the queue ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores; Redis and the CVAT "
        f"test server on loopback. {args.jobs} jobs x {args.frames_per_job} frames (64x48), batches of "
        f"{args.batch}, stand-in model stage {args.standin}s per batch ({ideal:.2f}s per job).\n",
        "| workers | seconds | frames/s | efficiency thr(W)/(W x thr(1)) | s per job in the job function "
        "| worker time outside it |",
        "|---|---|---|---|---|---|",
        *[f"| {w} | {s:.2f} | {t:.1f} | {e:.3f} | {j:.3f} | {o:.1%} |" for w, s, t, e, j, o in rows],
        "",
    ]
    print("\n".join(table))
    if not args.no_write:
        with open(REPO / "docs" / "benchmarks.md", "a", encoding="utf-8") as handle:
            handle.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
