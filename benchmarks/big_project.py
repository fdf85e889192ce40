"""Big projects (issue 18): ``python -m benchmarks.big_project`` (``make bench-big``).

For each project size (``--jobs 200,2000``): a fresh CVAT test server with the latency model
of a real CVAT 2.73 on 2 cores (``--latency``), a project of that many jobs of
``--frames-per-job`` small JPEG frames (64x64, one chunk per job) spread over tasks of
``--jobs-per-task`` jobs, and a fresh real Redis. Then, each command as a real process of the
CLI (``python -m prelabel ...``, in a temporary working directory):

1. ``prelabel enqueue --project-id P`` into the empty Redis (planning included), timed;
2. ``prelabel status`` on that queue (every entry pending), timed;
3. ``prelabel run --project-id P --state FILE`` with the tiny model, every frame accepted:
   time to the first tag (the first tag PATCH in the server's request log, from the process
   start), the CLI's own time to first tag and model-loaded time where its stage timing
   reports them, run time, peak RSS (``ru_maxrss`` via ``os.wait4``), and the planning
   requests: GETs of job lists and jobs, data/meta, annotations, issues and comments, taken
   from the server's request log (in a run that streams, the labeling's own reads of these
   count too);
4. the same ``run`` again with the same state file: every job finished and unchanged, so
   all its requests are planning; its requests per job and run time.

Enqueue runs before the run because it only plans the jobs that still need labels. Every
first run is checked: each frame must hold exactly one tag afterwards. A command that
passes ``--timeout`` is killed and reported as a timeout. It prints a table and the issue's
targets (met / not met) and appends them to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.dataset import REPO, BenchProject, FrameSpec
from benchmarks.machine import OtherLoad, _cpu_model, percent
from benchmarks.prelabel_cli import MeasuredProcess, cli_env, run_measured, setup_project
from benchmarks.report import mib, today
from tests.conftest import TINY_MODEL
from tests.cvat_server import CvatTestServer
from tests.cvat_server.app import LoggedRequest
from tests.cvat_server.latency import PROFILES, Latency, profile
from tests.redis_fixture import redis_server

SECTION = "## Big projects (issue 18)"
PLANNING = ("jobs", "meta", "annotations", "issues", "comments")
"""The request kinds counted as planning (see `request_kind`)."""
_KINDS = (
    ("jobs", re.compile(r"^/api/jobs(/\d+)?$")),
    ("meta", re.compile(r"^/api/(jobs|tasks)/\d+/data/meta$")),
    ("annotations", re.compile(r"^/api/(jobs|tasks)/\d+/annotations$")),
    ("issues", re.compile(r"^/api/issues$")),
    ("comments", re.compile(r"^/api/comments$")),
)
_TAG_WRITE = re.compile(r"^/api/jobs/\d+/annotations/?$")
_FIRST_TAG = re.compile(r"first[ _-]?tag\D{0,30}?(\d+(?:\.\d+)?)\s*s\b", re.IGNORECASE)
_MODEL_LOADED = re.compile(
    r"(?:model[ _-]?(?:loaded|load|ready)|load(?:ed)?[ _-]model)\D{0,30}?(\d+(?:\.\d+)?)\s*s\b", re.IGNORECASE
)
_QUEUED = re.compile(r"queued (\d+)")

TARGETS = {
    "first_tag": 3.0,  # s after the model is loaded, at the largest size
    "rerun_per_job": 1.0,  # planning requests per finished, unchanged job
    "run_ratio": 10.5,  # run time, largest / smallest size, for 10x the jobs (scaled to other factors)
    "rss_ratio": 1.2,  # peak RSS, largest / smallest size
    "enqueue": 60.0,  # s, at the largest size
    "status": 2.0,  # s, at the largest size
}


def request_kind(entry: LoggedRequest) -> str | None:
    """The planning kind of a GET (``jobs``, ``meta``, ``annotations``, ``issues``, ``comments``),
    ``chunk`` for a data chunk, ``other`` for any other GET, None for a write."""
    if entry.method != "GET":
        return None
    path = entry.path.rstrip("/")
    if path.endswith("/data") and entry.query.get("type") == "chunk":
        return "chunk"
    for kind, pattern in _KINDS:
        if pattern.match(path):
            return kind
    return "other"


def count_requests(log: Sequence[LoggedRequest]) -> Counter[str]:
    """Requests by kind (`request_kind`; writes as ``write``) and in all (``all``)."""
    counts: Counter[str] = Counter(request_kind(entry) or "write" for entry in log)
    counts["all"] = len(log)
    return counts


def planning_requests(counts: Counter[str]) -> int:
    return sum(counts[kind] for kind in PLANNING)


def first_tag_write(log: Sequence[LoggedRequest], started: float) -> float | None:
    """Seconds from `started` to the answer of the first successful annotations PATCH, or None."""
    for entry in log:
        if entry.method == "PATCH" and entry.status == 200 and _TAG_WRITE.match(entry.path):
            return entry.finished - started
    return None


def reported_seconds(pattern: re.Pattern[str], text: str) -> float | None:
    """A figure the CLI printed (e.g. its time to first tag), or None where it prints none."""
    match = pattern.search(text)
    return float(match[1]) if match else None


@dataclass
class Command:
    """One measured CLI process and the requests the server saw meanwhile."""

    process: MeasuredProcess
    requests: Counter[str]
    log: list[LoggedRequest] = field(repr=False)

    @property
    def failed(self) -> str | None:
        """None if it exited with 0, else a short reason."""
        if self.process.timed_out:
            return f"timeout after {self.process.seconds:.0f}s"
        if self.process.returncode != 0:
            tail = (self.process.stderr.strip().splitlines() or ["?"])[-1]
            return f"exit {self.process.returncode}: {tail}"
        return None


@dataclass
class SizeResult:
    """Everything measured at one project size."""

    jobs: int
    tasks: int
    frames: int
    enqueue: Command
    queued: int | None
    status: Command
    run: Command
    rerun: Command | None
    other_load: float | None
    first_tag: float | None = None
    """From the run's process start to its first tag write on the server."""
    cli_first_tag: float | None = None
    cli_model_loaded: float | None = None


def say(message: str) -> None:
    print(message, flush=True)


def seed(
    server: CvatTestServer, jobs: int, frames_per_job: int, jobs_per_task: int
) -> tuple[BenchProject, int]:
    """The project: `jobs` jobs of `frames_per_job` 64x64 frames, one chunk per job, in tasks
    of up to `jobs_per_task` jobs; the tasks are made in the server's state (no uploads), on
    frames decoded once and shared. Returns the project and its task count."""
    spec = FrameSpec(
        count=frames_per_job, size=(64, 64), segment_size=frames_per_job, chunk_size=frames_per_job
    )
    project = BenchProject.create(server, spec)
    tasks = 0
    for first in range(0, jobs, jobs_per_task):
        project.new_task(times=min(jobs_per_task, jobs - first))
        tasks += 1
    return project, tasks


def measure_size(jobs: int, args: argparse.Namespace, folder: Path) -> SizeResult:
    """Seed a project of `jobs` jobs and measure enqueue, status, run and rerun on it."""
    load = OtherLoad()
    with redis_server() as queue_url, CvatTestServer(check_answers=False, latency=args.latency) as server:
        say(f"{jobs} jobs: seeding ...")
        project, tasks = seed(server, jobs, args.frames_per_job, args.jobs_per_task)
        setup_project(project)
        env = cli_env(project)
        model = ["--model", TINY_MODEL, "--pretrained", "none"]
        state = folder / f"state-{jobs}.db"

        def cli(name: str, *command: str) -> Command:
            work = folder / f"{name}-{jobs}"
            work.mkdir()
            seen = len(server.requests)
            process = run_measured(
                [sys.executable, "-m", "prelabel", *command],
                cwd=work,
                env=env,
                timeout=args.timeout,
                output=work,
            )
            log = server.requests[seen:]
            done = Command(process, count_requests(log), log)
            say(f"  {name}: {process.seconds:.1f}s, {done.requests['all']} requests "
                f"({planning_requests(done.requests)} planning), peak RSS {mib(process.peak_rss_bytes)}"
                + (f" -- FAILED ({done.failed})" if done.failed else ""))  # fmt: skip
            return done

        target = ["--project-id", str(project.project_id)]
        enqueue = cli("enqueue", "enqueue", *target, *model, "--queue", queue_url)
        queued = _QUEUED.search(enqueue.process.stdout)
        status = cli("status", "status", "--queue", queue_url)
        run_args = (*target, *model, "--accept-threshold", "0", "--min-margin", "0", "--no-progress")
        run = cli("run", "run", *run_args, "--state", str(state))
        result = SizeResult(
            jobs=jobs,
            tasks=tasks,
            frames=jobs * args.frames_per_job,
            enqueue=enqueue,
            queued=int(queued[1]) if queued else None,
            status=status,
            run=run,
            rerun=None,
            other_load=None,
        )
        result.first_tag = first_tag_write(run.log, run.process.started)
        result.cli_first_tag = reported_seconds(_FIRST_TAG, run.process.stdout)
        result.cli_model_loaded = reported_seconds(_MODEL_LOADED, run.process.stdout)
        if run.failed is None:
            for task_id in sorted(server.state.tasks):
                project.check_one_tag_per_frame(task_id, f"prelabel run on {jobs} jobs")
            result.rerun = cli("rerun", "run", *run_args, "--state", str(state))
        result.other_load = load.share()
    return result


def _seconds(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _timed(command: Command | None, digits: int = 1) -> str:
    if command is None:
        return "not run"
    if command.process.timed_out:
        return f"timeout ({command.process.seconds:.0f})"
    return f"{command.process.seconds:.{digits}f}" + (" (failed)" if command.failed else "")


def table(results: Sequence[SizeResult]) -> list[str]:
    """The results as Markdown table lines."""
    lines = [
        "| jobs (tasks) | frames | run s | first tag s (server log) | first tag s / model loaded s (CLI) "
        "| planning requests (per job) | by kind jobs/meta/annotations/issues/comments | all requests "
        "| peak RSS | rerun s | rerun planning requests per job | enqueue s (queued) | status s "
        "| other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        planning = planning_requests(r.run.requests)
        rerun_per_job = (
            f"{planning_requests(r.rerun.requests) / r.jobs:.2f}" if r.rerun and not r.rerun.failed else "n/a"
        )
        killed = " (until killed)" if r.run.process.timed_out else ""
        by_kind = "/".join(str(r.run.requests[kind]) for kind in PLANNING)
        lines.append(
            f"| {r.jobs:,} ({r.tasks}) | {r.frames:,} | {_timed(r.run)} | {_seconds(r.first_tag, 2)} "
            f"| {_seconds(r.cli_first_tag, 2)} / {_seconds(r.cli_model_loaded, 2)} "
            f"| {planning:,} ({planning / r.jobs:.2f}) | {by_kind} "
            f"| {r.run.requests['all']:,} | {mib(r.run.process.peak_rss_bytes)}{killed} | {_timed(r.rerun)} "
            f"| {rerun_per_job} | {_timed(r.enqueue)} ({_count(r.queued)}) "
            f"| {_timed(r.status, 2)} | {percent(r.other_load)} |"
        )
    return lines


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT MET")


def targets(results: Sequence[SizeResult]) -> list[str]:
    """The issue's targets, checked at the largest size (ratios: largest over smallest)."""
    small, large = min(results, key=lambda r: r.jobs), max(results, key=lambda r: r.jobs)
    lines = []
    if large.first_tag is not None and large.cli_model_loaded is not None:
        after = large.first_tag - large.cli_model_loaded
        lines.append(
            f"- time to first tag at {large.jobs:,} jobs within {TARGETS['first_tag']:g} s of the model "
            f"being loaded: {after:.2f} s after it: **{_verdict(after <= TARGETS['first_tag'])}**"
        )
    else:
        lines.append(
            f"- time to first tag at {large.jobs:,} jobs within {TARGETS['first_tag']:g} s of the model "
            f"being loaded: first tag at {_seconds(large.first_tag, 2)} s from the process start; "
            "the CLI does not report when its model was loaded: **n/a**"
        )
    if large.rerun is not None and not large.rerun.failed:
        per_job = planning_requests(large.rerun.requests) / large.jobs
        lines.append(
            f"- planning requests per finished, unchanged job (rerun, {large.jobs:,} jobs): {per_job:.2f}, "
            f"at most {TARGETS['rerun_per_job']:g}: **{_verdict(per_job <= TARGETS['rerun_per_job'])}**"
        )
    else:
        lines.append(
            f"- planning requests per finished, unchanged job: no rerun at {large.jobs:,} jobs: **n/a**"
        )
    if large is not small:
        factor = large.jobs / small.jobs
        run_limit = TARGETS["run_ratio"] / 10 * factor  # 10.5x for 10x the jobs
        run_ratio = rss_ratio = None
        at_least = ""
        if not small.run.failed and (not large.run.failed or large.run.process.timed_out):
            run_ratio = large.run.process.seconds / small.run.process.seconds
            at_least = "at least " if large.run.failed else ""  # a timeout: the run took longer
            if not large.run.failed:
                rss_ratio = large.run.process.peak_rss_bytes / small.run.process.peak_rss_bytes
        run_ok = (
            None if run_ratio is None or (at_least and run_ratio <= run_limit) else run_ratio <= run_limit
        )
        lines.append(
            f"- run time {large.jobs:,} vs {small.jobs:,} jobs ({factor:g}x the jobs): "
            f"{at_least}{_seconds(run_ratio, 2)}x, at most {run_limit:g}x: **{_verdict(run_ok)}**"
        )
        lines.append(
            f"- peak RSS {large.jobs:,} vs {small.jobs:,} jobs: {_seconds(rss_ratio, 2)}"
            f"{'' if rss_ratio is None else 'x'}, "
            f"at most {TARGETS['rss_ratio']:g}x: "
            f"**{_verdict(None if rss_ratio is None else rss_ratio <= TARGETS['rss_ratio'])}**"
        )
    enqueue_ok = None if large.enqueue.failed else large.enqueue.process.seconds < TARGETS["enqueue"]
    if large.enqueue.process.timed_out:
        enqueue_ok = False
    lines.append(
        f"- enqueue of {large.jobs:,} jobs under {TARGETS['enqueue']:g} s: {_timed(large.enqueue)} s: "
        f"**{_verdict(enqueue_ok)}**"
    )
    status_ok = None if large.status.failed else large.status.process.seconds < TARGETS["status"]
    lines.append(
        f"- status under {TARGETS['status']:g} s ({_count(large.queued)} entries "
        f"pending): {_timed(large.status, 2)} s: **{_verdict(status_ok)}**"
    )
    return lines


INTRO = f"""
{SECTION}

`make bench-big` (`python -m benchmarks.big_project`): for each project size, a fresh CVAT
test server with the latency model, a project of N jobs of 8 frames (64x64 JPEGs, one chunk
per job) in tasks of 50 jobs, the tiny model (`tests/assets/tiny-clip`, random weights,
every frame accepted) and a fresh Redis; every command is the CLI as a real process.
Columns: **run s**, `prelabel run --project-id P --state FILE` from process start to exit
(a timeout is marked); **first tag s (server log)**, from the process start to the answer
of its first tag PATCH; **first tag / model loaded (CLI)**, what the CLI's stage timing
reports, n/a where it reports nothing; **planning requests**, the run's GETs of job lists
and jobs, data/meta, annotations, issues and comments (in a run that streams, the labeling's
own reads of these count too), per job in brackets; **peak RSS**, `ru_maxrss` of the run
via `os.wait4`; **rerun**, the same command again with the same state file (every job
finished and unchanged); **enqueue s**, `prelabel enqueue --project-id P` as a process
(planning included) into an empty Redis, with the number of entries it queued; **status
s**, `prelabel status` as a process on that queue; **other load**, the CPU share of other
processes meanwhile. Targets from the issue are checked at the largest size.
"""


def report(results: Sequence[SizeResult], args: argparse.Namespace, latency: str) -> list[str]:
    """The dated report: machine, latency profile, table and targets."""
    return [
        f"\n### {today()}: {', '.join(f'{r.jobs:,}' for r in results)} jobs "
        f"of {args.frames_per_job} frames\n",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores; test server latency profile: {latency}; "
        f"tasks of {args.jobs_per_task} jobs; timeout {args.timeout:g} s per command; "
        "enqueue and status as CLI processes.\n",
        *table(results),
        "",
        "Targets:",
        "",
        *targets(results),
        "",
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.big_project", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--jobs", default="200,2000", help="project sizes in jobs, comma-separated (200,2000)"
    )
    parser.add_argument("--frames-per-job", type=int, default=8, help="frames per job (8)")
    parser.add_argument("--jobs-per-task", type=int, default=50, help="jobs per task (50)")
    parser.add_argument(
        "--latency",
        default="cvat-2.73-2core",
        help=f"the test server's latency profile, NAME or NAME*FACTOR ({', '.join(PROFILES)}; "
        "default cvat-2.73-2core)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measured command (900)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="report to append to"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --out")
    args = parser.parse_args(argv)
    try:
        args.jobs = sorted({int(value) for value in args.jobs.split(",") if value.strip()})
        profile(args.latency)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.jobs or min(args.jobs) < 1:
        parser.error("--jobs must name at least one size of 1 or more")
    for name in ("frames_per_job", "jobs_per_task", "timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("cvat_sdk").setLevel(logging.ERROR)
    latency = Latency(args.latency).describe()
    say(f"test server latency profile: {latency}")
    results = []
    with tempfile.TemporaryDirectory(prefix="prelabel-big-") as folder:
        for jobs in args.jobs:
            results.append(measure_size(jobs, args, Path(folder)))
    lines = report(results, args, latency)
    say("\n".join(lines))
    if not args.no_write:
        text = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        with args.out.open("a", encoding="utf-8") as handle:
            if SECTION not in text:
                handle.write(INTRO)
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
